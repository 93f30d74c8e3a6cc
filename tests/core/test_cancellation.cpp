// core/cancellation.hpp: what counts as a cancellation.
#include "torchguard/async.hpp"  // TaskError
#include "torchguard/core.hpp"

#include <stdexcept>
#include <string>

#include <torch/torch.h>

#include "support.hpp"

using torchguard::Cancelled;
using torchguard::TaskError;
using torchguard::TimeoutError;

TEST_CASE("is_cancellation recognises Cancelled only", "[async][cancel]") {
  struct Interrupted : Cancelled {
    Interrupted() : Cancelled("interrupted") {}
  };
  CHECK(torchguard::is_cancellation(std::make_exception_ptr(Cancelled())));
  CHECK(torchguard::is_cancellation(std::make_exception_ptr(Interrupted())));
  CHECK_FALSE(torchguard::is_cancellation(std::exception_ptr()));
  CHECK_FALSE(torchguard::is_cancellation(std::make_exception_ptr(TimeoutError("slow"))));
  CHECK_FALSE(torchguard::is_cancellation(std::make_exception_ptr(std::runtime_error("bad"))));
  CHECK_FALSE(torchguard::is_cancellation(std::make_exception_ptr(42)));
  // A task's failure whose cause is a cancellation is still a failure as such.
  CHECK_FALSE(torchguard::is_cancellation(
      std::make_exception_ptr(TaskError(0, std::make_exception_ptr(Cancelled())))));
}
