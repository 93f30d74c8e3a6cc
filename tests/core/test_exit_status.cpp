// core/exit_status.hpp: how main's work ended, as an exit status.
#include "torchguard/core.hpp"

#include <stdexcept>
#include <string>

#include "support.hpp"
#include "torchguard/session.hpp"

using torchguard::TrainingSession;
using torchguard::testing::CapturedLogger;

TEST_CASE("exit_status turns how main's work ended into a status, never an abort", "[session]") {
  CHECK(torchguard::exit_status([] { return 3; }) == 3);
  CHECK(torchguard::exit_status([] {}) == 0);
  CHECK(torchguard::exit_status([]() -> int { throw torchguard::Cancelled("stopped"); }) == 130);
  CHECK(torchguard::exit_status([]() -> int { throw std::runtime_error("bad data"); }) == 1);
  CHECK(torchguard::exit_status([]() -> int { throw 42; }) == 1);
  // A session's failure: logged by run() with its type, then the status.
  CapturedLogger captured;
  CHECK(torchguard::exit_status([&] {
          TrainingSession session("failing", captured.logger);
          return session.run([]() -> int { throw std::domain_error("loss is nan"); });
        }) == 1);
  CHECK(captured.sink->contains(spdlog::level::err, "std::domain_error: loss is nan"));
}
