// async/gather_futures.hpp: gather over futures, values in input order or the first failure; a
// cancelled answer is Cancelled, not a TaskError.
#include "torchguard/async.hpp"

#include <atomic>
#include <chrono>
#include <future>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "async_support.hpp"

using torchguard::BatchedInference;
using torchguard::Cancelled;
using torchguard::gather;
using torchguard::TaskError;
using torchguard::testing::Contains;
using torchguard::testing::HeldBatchServer;
using torchguard::testing::message_of;
using namespace std::chrono_literals;

TEST_CASE("gather over futures returns values in input order", "[async][gather]") {
  std::vector<std::future<int>> futures;
  for (int i = 0; i < 5; ++i) {
    futures.push_back(std::async(std::launch::async, [i] {
      std::this_thread::sleep_for(std::chrono::milliseconds(5 * (5 - i)));  // last finishes first
      return i * i;
    }));
  }
  CHECK(gather(std::move(futures)) == std::vector<int>{0, 1, 4, 9, 16});
}

TEST_CASE("gather over futures waits for all, then throws the first error with its index",
          "[async][gather]") {
  std::atomic<bool> slow_one_finished{false};
  std::vector<std::future<int>> futures;
  futures.push_back(std::async(std::launch::async, [] { return 1; }));
  futures.push_back(
      std::async(std::launch::async, []() -> int { throw std::runtime_error("bad 1"); }));
  futures.push_back(std::async(std::launch::async, [&] {
    std::this_thread::sleep_for(50ms);
    slow_one_finished = true;
    return 3;
  }));
  futures.push_back(
      std::async(std::launch::async, []() -> int { throw std::logic_error("bad 3"); }));
  try {
    gather(std::move(futures));
    FAIL("gather did not throw");
  } catch (const TaskError& error) {
    CHECK(slow_one_finished);
    CHECK(error.index() == 1);
    CHECK(std::string(error.what()) == "bad 1 (item 1 of 4, and 1 more failure)");
    CHECK(error.total() == 4);
    CHECK(error.input().empty());  // a future has no name
    REQUIRE(error.others().size() == 1);
    CHECK(error.others()[0].first == 3);
    CHECK(message_of(error.others()[0].second) == "bad 3");
    CHECK_THROWS_AS(error.rethrow_cause(), std::runtime_error);
  }
}

TEST_CASE("gather over futures of different types gives a tuple", "[async][gather]") {
  auto [number, text, nothing] =
      gather(std::async(std::launch::async, [] { return 42; }),
             std::async(std::launch::async, [] { return std::string("tensor"); }),
             std::async(std::launch::async, [] {}));
  CHECK(number == 42);
  CHECK(text == "tensor");
  (void)nothing;

  CHECK_THROWS_MATCHES(
      gather(std::async(std::launch::async, [] { return 1; }),
             std::async(std::launch::async, []() -> int { throw std::runtime_error("second"); })),
      TaskError, Catch::Predicate<TaskError>([](const TaskError& e) { return e.index() == 1; }));
}

TEST_CASE("gather over futures refuses an empty future", "[async][gather]") {
  std::vector<std::future<int>> futures(1);
  CHECK_THROWS_AS(gather(std::move(futures)), torchguard::OptionsError);
}

TEST_CASE("gather over futures throws Cancelled for cancelled answers, not TaskError",
          "[async][gather][cancel]") {
  SECTION("BatchedInference's answers to a cancel") {
    HeldBatchServer held(5);
    auto& [source, gate, server, running, futures] = held;
    source.cancel();
    gate.open();
    running.get();
    try {
      gather(std::move(futures));
      FAIL("gather did not throw");
    } catch (const TaskError& error) {
      FAIL("a cancellation came out as TaskError: " << error.what());
    } catch (const Cancelled& error) {
      CHECK_THAT(error.what(), Contains("cancelled before the request ran") &&
                                   Contains("(5 of 5 items cancelled)"));
    }
  }
  SECTION("some answered, some cancelled") {
    std::vector<std::promise<int>> promises(3);
    std::vector<std::future<int>> futures;
    for (auto& promise : promises) futures.push_back(promise.get_future());
    promises[0].set_value(1);
    promises[1].set_exception(std::make_exception_ptr(Cancelled("stopped")));
    promises[2].set_value(3);
    CHECK_THROWS_WITH(gather(std::move(futures)), "stopped (1 of 3 items cancelled)");
  }
  SECTION("a real failure is a TaskError, without the cancellations") {
    std::vector<std::promise<int>> promises(4);
    std::vector<std::future<int>> futures;
    for (auto& promise : promises) futures.push_back(promise.get_future());
    promises[0].set_exception(std::make_exception_ptr(Cancelled("stopped")));
    promises[1].set_value(1);
    promises[2].set_exception(std::make_exception_ptr(std::domain_error("bad input")));
    promises[3].set_exception(std::make_exception_ptr(Cancelled("stopped")));
    try {
      gather(std::move(futures));
      FAIL("gather did not throw");
    } catch (const TaskError& error) {
      CHECK(error.index() == 2);
      CHECK_THROWS_AS(error.rethrow_cause(), std::domain_error);
      CHECK(error.others().empty());
      CHECK_THAT(error.what(), !Contains("more failure"));
    }
  }
  SECTION("futures of different types") {
    std::promise<int> number;
    std::promise<std::string> text;
    number.set_value(1);
    text.set_exception(std::make_exception_ptr(Cancelled("stopped")));
    CHECK_THROWS_AS(gather(number.get_future(), text.get_future()), Cancelled);
  }
}
