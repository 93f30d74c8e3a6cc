// async/gather.hpp: gather and gather_settled over inputs on bounded worker threads: order, the
// window, fail-fast, timeouts, progress, errors in the user's terms, and cancellation.
#include "torchguard/async.hpp"

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <future>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "async_support.hpp"

using Catch::Matchers::EndsWith;
using Catch::Matchers::StartsWith;
using torchguard::CancellationSource;
using torchguard::CancellationToken;
using torchguard::Cancelled;
using torchguard::gather;
using torchguard::gather_settled;
using torchguard::GatherOptions;
using torchguard::GatherProgress;
using torchguard::Order;
using torchguard::Prefetcher;
using torchguard::TaskError;
using torchguard::TimeoutError;
using torchguard::testing::Contains;
using torchguard::testing::iota;
using torchguard::testing::message_of;
using torchguard::testing::wait_until;
using namespace std::chrono_literals;

namespace {

// Counts tasks running at once, and the most seen.
struct ConcurrencyMeter {
  std::atomic<int> running{0};
  std::atomic<int> peak{0};
  void enter() {
    const int now = ++running;
    int seen = peak.load();
    while (now > seen && !peak.compare_exchange_weak(seen, now)) {
    }
  }
  void leave() { --running; }
};

}  // namespace

TEST_CASE("gather runs every input and keeps input order", "[async][gather]") {
  GatherOptions options;
  options.max_in_flight = 3;
  const auto results = gather(
      iota(20),
      [](int i) {
        std::this_thread::sleep_for(std::chrono::microseconds(200 * (i % 4)));
        return i * 10;
      },
      options);
  REQUIRE(results.size() == 20);
  for (std::size_t i = 0; i < results.size(); ++i) {
    CHECK(results[i].index == i);
    CHECK(results[i].value == static_cast<int>(i) * 10);
  }
  CHECK(gather(std::vector<int>{}, [](int i) { return i; }).empty());
}

TEST_CASE("gather in completion order gives each result with its index", "[async][gather]") {
  GatherOptions options;
  options.max_in_flight = 4;
  options.order = Order::completion;
  // Item 0 is slow, so it cannot come first.
  const auto results = gather(
      iota(4),
      [](int i) {
        std::this_thread::sleep_for(i == 0 ? 200ms : 1ms);
        return std::to_string(i);
      },
      options);
  REQUIRE(results.size() == 4);
  std::set<std::size_t> seen;
  for (const auto& result : results) {
    CHECK(result.value == std::to_string(result.index));
    seen.insert(result.index);
  }
  CHECK(seen.size() == 4);
  CHECK(results.back().index == 0);
  CHECK(torchguard::values(std::vector<torchguard::Indexed<int>>{{1, 7}, {0, 8}}) ==
        std::vector<int>{7, 8});
}

TEST_CASE("10,000 tiny tasks under max_in_flight 4 never run more than 4 at once",
          "[async][gather]") {
  ConcurrencyMeter meter;
  std::mutex threads_mutex;
  std::set<std::thread::id> threads;
  GatherOptions options;
  options.max_in_flight = 4;
  const auto results = gather(
      iota(10000),
      [&](int i) {
        meter.enter();
        {
          std::lock_guard<std::mutex> lock(threads_mutex);
          threads.insert(std::this_thread::get_id());
        }
        meter.leave();
        return i + 1;
      },
      options);
  REQUIRE(results.size() == 10000);
  long long sum = 0;
  for (const auto& result : results) sum += result.value;
  CHECK(sum == 10000LL * 10001 / 2);
  CHECK(meter.peak <= 4);
  CHECK(meter.peak >= 1);
  CHECK(threads.size() <= 4);  // workers, not a thread per item
}

TEST_CASE("a full window is backpressure: max_in_flight tasks overlap, no more",
          "[async][gather]") {
  ConcurrencyMeter meter;
  GatherOptions options;
  options.max_in_flight = 3;
  gather(
      iota(9),
      [&](int) {
        meter.enter();
        std::this_thread::sleep_for(30ms);
        meter.leave();
      },
      options);
  CHECK(meter.peak == 3);
}

TEST_CASE("fail-fast gather stops launching, cancels the running tasks and waits for them",
          "[async][gather]") {
  std::atomic<int> started{0};
  std::atomic<int> running{0};
  std::atomic<int> saw_cancel{0};
  GatherOptions options;
  options.max_in_flight = 3;
  try {
    gather(
        iota(100),
        [&](int i, const CancellationToken& token) {
          ++started;
          ++running;
          if (i == 4) {
            std::this_thread::sleep_for(50ms);  // items 5 and 6 start meanwhile
            --running;
            throw std::runtime_error("item four is broken");
          }
          if (i > 4 && token.wait_for(5s)) ++saw_cancel;
          --running;
          return i;
        },
        options);
    FAIL("gather did not throw");
  } catch (const TaskError& error) {
    CHECK(running == 0);  // no task outlives the gather
    CHECK(error.index() == 4);
    CHECK_THAT(error.what(), StartsWith("item four is broken (") && Contains("item 4 of 100"));
    CHECK(started < 100);
    CHECK(saw_cancel >= 1);
  }
}

TEST_CASE("fail-fast gather keeps the failures after the first", "[async][gather]") {
  GatherOptions options;
  options.max_in_flight = 2;
  try {
    gather(
        iota(2),
        [](int i) -> int {
          std::this_thread::sleep_for(i == 0 ? 1ms : 100ms);
          throw std::runtime_error("failure " + std::to_string(i));
        },
        options);
    FAIL("gather did not throw");
  } catch (const TaskError& error) {
    CHECK(error.index() == 0);  // the first to fail, in time
    CHECK_THAT(error.what(), Contains("item 0 of 2, and 1 more failure)"));
    REQUIRE(error.others().size() == 1);
    CHECK(error.others()[0].first == 1);
    CHECK(message_of(error.others()[0].second) == "failure 1");
  }
}

TEST_CASE("gather_settled returns every value and every error with its index", "[async][gather]") {
  GatherOptions options;
  options.max_in_flight = 4;
  auto results = gather_settled(
      iota(50),
      [](int i) {
        if (i % 7 == 3) throw std::runtime_error("bad " + std::to_string(i));
        return i * 2;
      },
      options);
  REQUIRE(results.size() == 50);
  for (std::size_t i = 0; i < results.size(); ++i) {
    CHECK(results[i].index == i);
    if (i % 7 == 3) {
      CHECK_FALSE(results[i].ok());
      CHECK(message_of(results[i].error) == "bad " + std::to_string(i));
      CHECK_THROWS_AS(results[i].get(), std::runtime_error);
    } else {
      REQUIRE(results[i].ok());
      CHECK(results[i].get() == static_cast<int>(i) * 2);
    }
  }
}

TEST_CASE("gather_settled with every task failing", "[async][gather]") {
  auto results = gather_settled(iota(10), [](int) -> int { throw std::out_of_range("nope"); });
  REQUIRE(results.size() == 10);
  for (auto& result : results) CHECK_THROWS_AS(result.get(), std::out_of_range);
  CHECK_THROWS_AS(gather(iota(10), [](int) -> int { throw std::out_of_range("nope"); }), TaskError);
}

TEST_CASE("a gather is cancelled from outside through a CancellationSource", "[async][gather]") {
  CancellationSource source;
  std::atomic<int> started{0};
  std::atomic<int> running{0};
  GatherOptions options;
  options.max_in_flight = 2;
  options.cancellation = source.token();
  std::thread canceller([&] {
    wait_until([&] { return started >= 2; });
    source.cancel();
  });
  try {
    gather(
        iota(1000),
        [&](int, const CancellationToken& token) {
          ++started;
          ++running;
          token.wait_for(10s);
          --running;
        },
        options);
    FAIL("gather did not throw");
  } catch (const Cancelled& error) {
    CHECK(running == 0);
    CHECK_THAT(error.what(), Contains("cancelled"));
  }
  canceller.join();
  CHECK(started < 1000);
}

TEST_CASE("an item that runs past its timeout fails with TimeoutError", "[async][gather]") {
  GatherOptions options;
  options.max_in_flight = 2;
  options.item_timeout = 300ms;
  const auto started = std::chrono::steady_clock::now();
  auto results = gather_settled(
      iota(4),
      [](int i, const CancellationToken& token) {
        if (i == 1) token.wait_for(20s);  // returns when the timeout cancels it
        return i;
      },
      options);
  CHECK(std::chrono::steady_clock::now() - started < 10s);  // not the task's 20 s
  REQUIRE(results.size() == 4);
  CHECK(results[0].ok());
  CHECK(results[2].ok());
  CHECK(results[3].ok());
  REQUIRE_FALSE(results[1].ok());
  CHECK_THROWS_AS(results[1].get(), TimeoutError);
  CHECK_THAT(message_of(results[1].error), StartsWith("timed out after "));

  // Fail-fast: the timeout is the gather's error, with the item's index.
  try {
    gather(
        iota(4),
        [](int i, const CancellationToken& token) {
          if (i == 2) token.wait_for(20s);
          return i;
        },
        options);
    FAIL("gather did not throw");
  } catch (const TaskError& error) {
    CHECK(error.index() == 2);
    CHECK_THROWS_AS(error.rethrow_cause(), TimeoutError);
    CHECK_THAT(error.what(), StartsWith("timed out after ") && Contains("item 2 of 4)"));
  }
}

TEST_CASE("a gather that runs past its own timeout throws TimeoutError", "[async][gather]") {
  std::atomic<int> running{0};
  GatherOptions options;
  options.max_in_flight = 2;
  options.timeout = 100ms;
  auto slow = [&](int, const CancellationToken& token) {
    ++running;
    token.wait_for(20s);
    --running;
  };
  try {
    gather(iota(6), slow, options);
    FAIL("gather did not throw");
  } catch (const TimeoutError& error) {
    CHECK(running == 0);
    CHECK_THAT(error.what(), Contains("gather timed out after") && Contains("0 of 6 items done"));
  }
  // Settled: every unfinished item carries the timeout.
  auto results = gather_settled(iota(6), slow, options);
  REQUIRE(results.size() == 6);
  for (auto& result : results) CHECK_THROWS_AS(result.get(), TimeoutError);
}

TEST_CASE("gather reports progress, and a throwing progress callback stops it", "[async][gather]") {
  std::vector<GatherProgress> reports;
  GatherOptions options;
  options.max_in_flight = 2;
  options.on_progress = [&](const GatherProgress& progress) { reports.push_back(progress); };
  auto results = gather_settled(
      iota(10),
      [](int i) {
        if (i == 5) throw std::runtime_error("five");
        return i;
      },
      options);
  REQUIRE_FALSE(reports.empty());
  CHECK(reports.back().done == 10);
  CHECK(reports.back().failed == 1);
  CHECK(reports.back().total == 10);
  for (std::size_t i = 1; i < reports.size(); ++i) CHECK(reports[i].done > reports[i - 1].done);

  std::atomic<int> started{0};
  options.on_progress = [](const GatherProgress&) { throw std::runtime_error("display broke"); };
  CHECK_THROWS_WITH(gather(
                        iota(1000),
                        [&](int i) {
                          ++started;
                          std::this_thread::sleep_for(1ms);
                          return i;
                        },
                        options),
                    Contains("display broke"));
  CHECK(started < 1000);
}

TEST_CASE("gather refuses max_in_flight 0", "[async][gather]") {
  GatherOptions options;
  options.max_in_flight = 0;
  CHECK_THROWS_WITH(gather(
                        iota(3), [](int i) { return i; }, options),
                    Contains("max_in_flight must be at least 1"));
}

namespace {

// Runs gather over `inputs` itself (not their indices), failing input `bad` only.
template <class Input>
TaskError gather_failing(const std::vector<Input>& inputs, std::size_t bad,
                         const GatherOptions& options = {}, const std::string& message = "broken") {
  try {
    gather(
        inputs,
        [&](const Input& input) {
          if (&input == &inputs[bad]) throw std::runtime_error(message);
          return 0;
        },
        options);
  } catch (const TaskError& error) {
    return error;
  }
  FAIL("gather did not throw");
  throw std::logic_error("unreachable");
}

// An input fmt cannot format.
struct Shard {
  int split = 0;
  int part = 0;
};

enum Color { red, green, blue };  // fmt's conversion of an unscoped enum is deprecated

}  // namespace

TEST_CASE("a gather's error leads with the task's own message, then names its input",
          "[async][gather][errors]") {
  const std::vector<std::string> files{"a.pt", "b.pt", "c.pt"};
  const auto error = gather_failing(files, 1, {}, "no such file: /data/b.pt");
  CHECK(std::string(error.what()) == "no such file: /data/b.pt (input 'b.pt'; item 1 of 3)");
  CHECK(error.input() == "b.pt");
  CHECK(error.index() == 1);  // still there, as a detail
  CHECK(error.total() == 3);
  CHECK(error.others().empty());
  CHECK(message_of(error.cause()) == "no such file: /data/b.pt");
  CHECK_THROWS_AS(error.rethrow_cause(), std::runtime_error);

  // Numbers are their own names.
  const auto number = gather_failing(std::vector<double>{0.5, 1.5}, 1);
  CHECK(std::string(number.what()) == "broken (input '1.5'; item 1 of 2)");
}

TEST_CASE("a gather over paths names the path, without c10's type name or backtrace",
          "[async][gather][errors]") {
  const std::vector<std::filesystem::path> paths{"/data/train-images-idx3-ubyte.gz",
                                                 "/data/train-labels-idx1-ubyte.gz"};
  try {
    gather(paths, [](const std::filesystem::path& path) -> int {
      TORCH_CHECK(path.filename() != "train-images-idx3-ubyte.gz", "Error opening images file at ",
                  path.string());
      return 1;
    });
    FAIL("gather did not throw");
  } catch (const TaskError& error) {
    CHECK(std::string(error.what()) ==
          "Error opening images file at /data/train-images-idx3-ubyte.gz (input "
          "'/data/train-images-idx3-ubyte.gz'; item 0 of 2)");
    CHECK_THAT(error.what(), !Contains("c10::Error") && !Contains("Exception raised from"));
    CHECK(error.input() == "/data/train-images-idx3-ubyte.gz");
    CHECK_THROWS_AS(error.rethrow_cause(), c10::Error);
  }
}

TEST_CASE("a long or multi-line input is named on one short line", "[async][gather][errors]") {
  const std::string long_path =
      "/very/" + std::string(120, 'd') + "/and/deeper/still/train-images-idx3-ubyte.gz";
  const auto error = gather_failing(std::vector<std::string>{"ok", long_path}, 1);
  CHECK(error.input().size() <= 80);
  CHECK_THAT(error.input(), StartsWith("/very/") && Contains("...") &&
                                EndsWith("/train-images-idx3-ubyte.gz"));  // keeps the file name
  CHECK_THAT(error.what(), StartsWith("broken (input '/very/"));

  const auto lines = gather_failing(std::vector<std::string>{"first line\nsecond line"}, 0);
  CHECK(lines.input() == "first line second line");
}

TEST_CASE("a gather names its inputs with the user's item_name", "[async][gather][errors]") {
  const std::vector<Shard> shards{{0, 0}, {0, 1}, {1, 0}};
  GatherOptions options;
  options.item_name = [&](std::size_t index) {
    return "split " + std::to_string(shards[index].split) + ", part " +
           std::to_string(shards[index].part);
  };
  const auto error = gather_failing(shards, 2, options, "bad shard");
  CHECK(std::string(error.what()) == "bad shard (input 'split 1, part 0'; item 2 of 3)");
  CHECK(error.input() == "split 1, part 0");
  CHECK(error.index() == 2);

  // It wins over the default name of a formattable input.
  options.item_name = [](std::size_t index) { return "file #" + std::to_string(index + 1); };
  const auto named = gather_failing(std::vector<std::string>{"a", "b"}, 0, options);
  CHECK(std::string(named.what()) == "broken (input 'file #1'; item 0 of 2)");

  // A naming function that throws leaves the name out, not the task's error.
  options.item_name = [](std::size_t) -> std::string { throw std::runtime_error("no name"); };
  const auto unnamed = gather_failing(shards, 1, options, "bad shard");
  CHECK(std::string(unnamed.what()) == "bad shard (item 1 of 3)");
  CHECK(unnamed.input().empty());
}

TEST_CASE("an input fmt cannot format falls back to its index", "[async][gather][errors]") {
  const auto error = gather_failing(std::vector<Shard>{{0, 0}, {0, 1}, {1, 0}}, 2, {}, "bad shard");
  CHECK(std::string(error.what()) == "bad shard (item 2 of 3)");
  CHECK(error.input().empty());
  CHECK(error.index() == 2);
  CHECK(error.total() == 3);

  const auto color = gather_failing(std::vector<Color>{red, green, blue}, 1);
  CHECK(std::string(color.what()) == "broken (item 1 of 3)");

  // A task that throws something other than a std::exception: its type is all there is.
  try {
    gather(std::vector<Shard>(1), [](const Shard&) -> int { throw 7; });
    FAIL("gather did not throw");
  } catch (const TaskError& error) {
    CHECK(std::string(error.what()) == "int (not derived from std::exception) (item 0 of 1)");
  }
}

TEST_CASE("a gather's error counts the failures that followed", "[async][gather][errors]") {
  // Every future is waited for: the first (by index) is named, the others are counted.
  std::vector<std::future<int>> futures;
  for (int i = 0; i < 3; ++i) {
    futures.push_back(std::async(std::launch::async, [i]() -> int {
      throw std::runtime_error("failure " + std::to_string(i));
    }));
  }
  try {
    gather(std::move(futures));
    FAIL("gather did not throw");
  } catch (const TaskError& error) {
    CHECK(std::string(error.what()) == "failure 0 (item 0 of 3, and 2 more failures)");
    CHECK(error.others().size() == 2);
  }
}

TEST_CASE("a fail-fast gather does not count its own cancellations as failures",
          "[async][gather]") {
  GatherOptions options;
  options.max_in_flight = 4;
  try {
    gather(
        iota(4),
        [](int i, const CancellationToken& token) {
          if (i == 0) {
            std::this_thread::sleep_for(20ms);
            throw std::runtime_error("real failure");
          }
          token.wait_for(20s);
          token.throw_if_cancelled();  // what a well-behaved task does when told to stop
          return i;
        },
        options);
    FAIL("gather did not throw");
  } catch (const TaskError& error) {
    CHECK(error.index() == 0);
    CHECK(error.others().empty());
    CHECK_THAT(error.what(), !Contains("more failure"));
  }
}

TEST_CASE("an item that ignores its token is waited for and its late result dropped",
          "[async][gather]") {
  std::atomic<bool> returned{false};
  GatherOptions options;
  options.max_in_flight = 2;
  options.item_timeout = 100ms;
  auto results = gather_settled(
      iota(3),
      [&](int i) {
        if (i == 1) {
          std::this_thread::sleep_for(600ms);  // no token: cannot be told to stop
          returned = true;
        }
        return i;
      },
      options);
  CHECK(returned);  // no thread outlives the gather
  REQUIRE(results.size() == 3);
  CHECK(results[0].ok());
  CHECK(results[2].ok());
  CHECK_THROWS_AS(results[1].get(), TimeoutError);
}

TEST_CASE("gather accepts timeouts too large to add, and refuses non-positive ones",
          "[async][gather]") {
  GatherOptions options;
  options.max_in_flight = 2;
  options.timeout = std::chrono::steady_clock::duration::max();
  options.item_timeout = std::chrono::hours(24 * 365 * 200);  // past the clock's end
  CHECK(gather(
            iota(8), [](int i) { return i; }, options)
            .size() == 8);
  options.timeout = std::chrono::milliseconds(-5);
  CHECK_THROWS_WITH(gather(
                        iota(8), [](int i) { return i; }, options),
                    Contains("timeout must be positive"));
  options.timeout.reset();
  options.item_timeout = std::chrono::milliseconds(0);
  CHECK_THROWS_WITH(gather_settled(
                        iota(8), [](int i) { return i; }, options),
                    Contains("item_timeout must be positive"));
}

TEST_CASE("tasks and loads run with the caller's grad mode", "[async][gather][prefetcher]") {
  const auto weight = torch::ones({3}, torch::requires_grad());
  auto doubled = [&](int) { return weight * 2; };
  {
    torch::NoGradGuard no_grad;
    for (const auto& result : gather(iota(4), doubled)) {
      CHECK_FALSE(result.value.requires_grad());
    }
    Prefetcher<torch::Tensor> items(3, [&](std::size_t) { return weight * 2; });
    for (auto& item : items) CHECK_FALSE(item.requires_grad());
  }
  for (const auto& result : gather(iota(4), doubled)) CHECK(result.value.requires_grad());
}

TEST_CASE("gather_settled tells cancelled items from failed ones", "[async][gather][cancel]") {
  // A stop the tasks watch themselves (not the gather's own token, which would make
  // gather_settled throw): each item answers it with Cancelled, its own outcome.
  CancellationSource stop;
  GatherOptions options;
  options.max_in_flight = 8;
  // Items 0 and 1 succeed and item 2 fails at once; the others wait for the stop, so it comes
  // once the first three are done and before any other is.
  options.on_progress = [&](const GatherProgress& progress) {
    if (progress.done >= 3) stop.cancel();
  };
  const auto stop_token = stop.token();
  auto results = gather_settled(
      iota(8),
      [&stop_token](int i) {
        if (i == 2) throw std::runtime_error("bad file");
        if (i > 2) {
          stop_token.wait_for(30s);
          stop_token.throw_if_cancelled();
        }
        return i;
      },
      options);
  REQUIRE(results.size() == 8);
  std::size_t succeeded = 0;
  std::size_t failed = 0;
  std::size_t cancelled = 0;
  for (auto& result : results) {
    CHECK_FALSE((result.ok() && result.cancelled()));
    if (result.ok()) ++succeeded;
    if (result.cancelled()) ++cancelled;
    if (!result.ok() && !result.cancelled()) ++failed;  // the skip-bad-files count
  }
  CHECK(succeeded == 2);
  CHECK(failed == 1);
  CHECK(cancelled == 5);
  CHECK(results[0].ok());
  CHECK(*results[1].value == 1);
  CHECK_FALSE(results[2].cancelled());
  CHECK_THROWS_WITH(results[2].get(), "bad file");
  for (std::size_t i = 3; i < 8; ++i) {
    CHECK(results[i].cancelled());
    CHECK_FALSE(results[i].value.has_value());
    CHECK_THROWS_AS(results[i].get(), Cancelled);
  }
}

TEST_CASE("a lone item past item_timeout fails with TimeoutError, not a cancellation",
          "[async][gather][cancel]") {
  // One item: nothing else finishes to wake the gather, so the item's start must arm its timeout.
  GatherOptions options;
  options.item_timeout = 20ms;
  auto results = gather_settled(
      iota(1),
      [](int i, const CancellationToken& token) {
        token.wait_for(30s);
        return i;
      },
      options);
  REQUIRE(results.size() == 1);
  CHECK_FALSE(results[0].ok());
  CHECK_FALSE(results[0].cancelled());  // a timeout is a failure
  CHECK_THROWS_AS(results[0].get(), TimeoutError);
}

TEST_CASE("a gather whose token is already cancelled runs nothing", "[async][gather][cancel]") {
  CancellationSource source;
  source.cancel();
  GatherOptions options;
  options.cancellation = source.token();
  std::atomic<int> ran{0};
  auto task = [&](int i) {
    ++ran;
    return i;
  };
  CHECK_THROWS_AS(gather(iota(5), task, options), Cancelled);
  CHECK_THROWS_WITH(gather(iota(5), task, options), Contains("0 of 5 items done"));
  // gather_settled too: the gather itself is cancelled, so it throws rather than returning.
  try {
    gather_settled(iota(5), task, options);
    FAIL("gather_settled did not throw");
  } catch (const Cancelled& error) {
    CHECK(std::string(error.what()) == "gather cancelled before it started (0 of 5 items done)");
  }
  CHECK(ran == 0);
}

TEST_CASE("a cancellation after every item is done leaves the gather's results",
          "[async][gather][cancel]") {
  CancellationSource source;
  GatherOptions options;
  options.max_in_flight = 2;
  options.cancellation = source.token();
  // Runs on the gathering thread once every item is done, before the gather returns.
  options.on_progress = [&](const GatherProgress& progress) {
    if (progress.done == progress.total) source.cancel();
  };
  auto results = gather(
      iota(4), [](int i) { return i * 10; }, options);
  CHECK(source.cancelled());
  REQUIRE(results.size() == 4);
  CHECK(torchguard::values(std::move(results)) == std::vector<int>{0, 10, 20, 30});

  CancellationSource settled_source;
  options.cancellation = settled_source.token();
  options.on_progress = [&](const GatherProgress& progress) {
    if (progress.done == progress.total) settled_source.cancel();
  };
  auto settled = gather_settled(
      iota(3), [](int i) { return i; }, options);
  CHECK(settled_source.cancelled());
  REQUIRE(settled.size() == 3);
  for (auto& result : settled) CHECK(result.ok());

  // A single item, as in the report: "1 of 1 items done" is a result, not Cancelled.
  CancellationSource single_source;
  options.cancellation = single_source.token();
  options.on_progress = [&](const GatherProgress&) { single_source.cancel(); };
  CHECK(gather(
            iota(1), [](int i) { return i + 7; }, options)
            .at(0)
            .value == 7);
}

TEST_CASE("a gather's timeout that passes after every item is done leaves the results",
          "[async][gather][cancel]") {
  GatherOptions options;
  options.timeout = 1s;
  const auto deadline = std::chrono::steady_clock::now() + 1s;
  // Holds the gathering thread, once every item is done, until the timeout has passed.
  options.on_progress = [&](const GatherProgress& progress) {
    if (progress.done == progress.total) std::this_thread::sleep_until(deadline + 200ms);
  };
  auto results = gather(
      iota(3), [](int i) { return i; }, options);
  CHECK(std::chrono::steady_clock::now() > deadline);
  CHECK(torchguard::values(std::move(results)) == std::vector<int>{0, 1, 2});
}

namespace {

// A result whose task has returned, held before the gather records it: `after_return` runs in
// the destructor of the object the worker moved the result out of, so between the task's return
// and the worker taking the pool's lock (the moment a cancel or a timeout can race the result).
struct Landing {
  int value = 0;
  std::function<void()> after_return;
  bool moved_from = false;

  Landing(int value, std::function<void()> after_return)
      : value(value), after_return(std::move(after_return)) {}
  Landing(Landing&& other) noexcept : value(other.value) { other.moved_from = true; }
  Landing& operator=(Landing&& other) noexcept {
    value = other.value;
    other.moved_from = true;
    return *this;
  }
  ~Landing() {
    if (moved_from && after_return) after_return();
  }
};

}  // namespace

TEST_CASE("a cancel that comes once an item's task has returned leaves its result",
          "[async][gather][cancel]") {
  // The item's token is cancelled when the gather fails the item: without the rule, the wait ends
  // early and the result is dropped ("gather cancelled with 0 of 1 items done").
  CancellationSource source;
  GatherOptions options;
  options.cancellation = source.token();
  auto task = [&](int i, const CancellationToken& token) {
    return Landing(i + 7, [&source, token] {
      source.cancel();
      token.wait_for(300ms);
    });
  };
  auto results = gather(iota(1), task, options);
  CHECK(source.cancelled());
  REQUIRE(results.size() == 1);
  CHECK(results[0].value.value == 7);

  // Settled, one item: its task returned before the cancel, so every item is done and the
  // results stand.
  CancellationSource single_source;
  options.cancellation = single_source.token();
  auto single = gather_settled(
      iota(1),
      [&](int i, const CancellationToken& token) {
        return Landing(i + 5, [&single_source, token] {
          single_source.cancel();
          token.wait_for(300ms);
        });
      },
      options);
  CHECK(single_source.cancelled());
  REQUIRE(single.size() == 1);
  CHECK(single[0].ok());
  CHECK(single[0].get().value == 5);

  // Settled, two items, one unfinished: the gather is cancelled and throws; the returned item
  // counts as done.
  CancellationSource settled_source;
  options.cancellation = settled_source.token();
  options.max_in_flight = 2;
  CHECK_THROWS_MATCHES(gather_settled(
                           iota(2),
                           [&](int i, const CancellationToken& token) {
                             if (i == 1) {
                               token.wait_for(30s);
                               return Landing(i, {});
                             }
                             return Landing(i, [&settled_source, token] {
                               settled_source.cancel();
                               token.wait_for(300ms);
                             });
                           },
                           options),
                       Cancelled,
                       Catch::Matchers::Message("gather cancelled with 1 of 2 items done"));
}

TEST_CASE("a gather timeout that passes once every task has returned leaves the results",
          "[async][gather][cancel]") {
  GatherOptions options;
  options.timeout = 50ms;
  // The result is held past the gather's deadline, before the gather has recorded it.
  auto results = gather(
      iota(1),
      [](int i, const CancellationToken& token) {
        return Landing(i + 3, [token] { token.wait_for(300ms); });
      },
      options);
  REQUIRE(results.size() == 1);
  CHECK(results[0].value.value == 3);
}

TEST_CASE("a task's own Cancelled that nothing asked for is that item's failure in gather",
          "[async][gather][cancel]") {
  GatherOptions options;
  options.max_in_flight = 1;
  auto task = [](int i) {
    if (i == 1) throw Cancelled("told to stop");
    return i;
  };
  try {
    gather(iota(5), task, options);
    FAIL("gather did not throw");
  } catch (const TaskError& error) {
    CHECK(error.index() == 1);
    CHECK(std::string(error.what()) == "told to stop (input '1'; item 1 of 5)");
    CHECK(error.others().empty());
    CHECK(torchguard::is_cancellation(error.cause()));
    CHECK_THROWS_AS(error.rethrow_cause(), Cancelled);
  } catch (const Cancelled& error) {
    FAIL("nothing cancelled the gather, yet it threw Cancelled: " << error.what());
  }
  // Settled: each item's own outcome; the item is cancelled, the others stand.
  auto results = gather_settled(iota(5), task, options);
  REQUIRE(results.size() == 5);
  CHECK(results[1].cancelled());
  for (std::size_t i : {0U, 2U, 3U, 4U}) CHECK(results[i].ok());
}

TEST_CASE("a task's Cancelled once the gather's own token is cancelled is a cancellation",
          "[async][gather][cancel]") {
  CancellationSource source;
  GatherOptions options;
  options.max_in_flight = 1;
  options.cancellation = source.token();
  // The task watches the gather's token (as it is told to) and answers its cancel.
  auto task = [&](int i) {
    if (i == 1) {
      source.cancel();
      throw Cancelled("saw the stop");
    }
    return i;
  };
  CHECK_THROWS_AS(gather(iota(5), task, options), Cancelled);

  // Every item done when the gather looks: Cancelled too, never TaskError.
  CancellationSource last_source;
  options.cancellation = last_source.token();
  CHECK_THROWS_AS(gather(
                      iota(2),
                      [&](int i) {
                        if (i == 1) {
                          last_source.cancel();
                          throw Cancelled("saw the stop");
                        }
                        return i;
                      },
                      options),
                  Cancelled);
}

TEST_CASE("gather_settled throws Cancelled when its own token fires mid-gather",
          "[async][gather][cancel]") {
  CancellationSource source;
  std::atomic<int> started{0};
  std::atomic<int> running{0};
  std::atomic<int> ended{0};
  GatherOptions options;
  options.max_in_flight = 2;
  options.cancellation = source.token();
  // Items 0 and 1 return at once; the others wait for their tokens, so the cancel comes with
  // exactly two items done.
  options.on_progress = [&](const GatherProgress& progress) {
    if (progress.done >= 2) source.cancel();
  };
  try {
    gather_settled(
        iota(6),
        [&](int i, const CancellationToken& token) {
          ++started;
          ++running;
          if (i >= 2) token.wait_for(30s);
          --running;
          ++ended;
          return i;
        },
        options);
    FAIL("gather_settled returned results after its own token was cancelled");
  } catch (const Cancelled& error) {
    CHECK(std::string(error.what()) == "gather cancelled with 2 of 6 items done");
    // Every task that started has ended before the throw: no work is left behind.
    CHECK(running == 0);
    CHECK(ended == started.load());
    CHECK(started < 6);  // items not started by the cancel never start
  }
}

TEST_CASE("gather_settled keeps an item's own Cancelled or TaskError or timeout in its results",
          "[async][gather][cancel]") {
  // The gather's own token is watched but never cancelled: each item's failure or cancellation
  // is that item's outcome, and gather_settled returns normally.
  CancellationSource source;
  GatherOptions options;
  options.max_in_flight = 2;
  options.cancellation = source.token();
  options.item_timeout = 100ms;
  std::vector<torchguard::Settled<int>> results;
  REQUIRE_NOTHROW(results = gather_settled(
                      iota(5),
                      [](int i, const CancellationToken& token) {
                        if (i == 1) throw Cancelled("the item's own stop");
                        if (i == 2) {  // a nested gather that fails: TaskError
                          gather(iota(1), [](int) -> int { throw std::runtime_error("inner"); });
                        }
                        if (i == 3) token.wait_for(30s);  // past item_timeout
                        return i;
                      },
                      options));
  CHECK_FALSE(source.cancelled());
  REQUIRE(results.size() == 5);
  CHECK(results[0].ok());
  CHECK(results[4].ok());
  CHECK(results[1].cancelled());
  CHECK(message_of(results[1].error) == "the item's own stop");
  CHECK_FALSE(results[2].ok());
  CHECK_FALSE(results[2].cancelled());
  CHECK_THROWS_AS(results[2].get(), TaskError);
  CHECK_FALSE(results[3].ok());
  CHECK_FALSE(results[3].cancelled());
  CHECK_THROWS_AS(results[3].get(), TimeoutError);
}

TEST_CASE("a failure recorded before an outside cancel is acted on wins: TaskError",
          "[async][gather][cancel]") {
  CancellationSource source;
  std::promise<void> release_failure;
  std::shared_future<void> failure_released = release_failure.get_future().share();
  // Item 3 starts only on a worker freed by item 1 (item 2 waits for its token): once it starts,
  // item 1's failure is recorded.
  std::promise<void> third_started;
  auto after_failure = third_started.get_future();
  GatherOptions options;
  options.max_in_flight = 2;
  options.cancellation = source.token();
  bool acted = false;
  // Runs on the gathering thread after item 0 is done: while it runs, that thread watches
  // nothing. Item 1 fails, the failure is recorded, then the cancel comes, all before the
  // gather's loop looks again.
  options.on_progress = [&](const GatherProgress&) {
    if (acted) return;
    acted = true;
    release_failure.set_value();
    REQUIRE(after_failure.wait_for(30s) == std::future_status::ready);
    source.cancel();
  };
  try {
    gather(
        iota(4),
        [&](int i, const CancellationToken& token) {
          if (i == 1) {
            failure_released.wait_for(30s);
            throw std::runtime_error("real failure");
          }
          if (i == 3) third_started.set_value();
          if (i >= 2) token.wait_for(30s);
          return i;
        },
        options);
    FAIL("gather did not throw");
  } catch (const TaskError& error) {
    CHECK(error.index() == 1);
    CHECK_THAT(error.what(), StartsWith("real failure ("));
    CHECK(error.others().empty());
  } catch (const Cancelled& error) {
    FAIL("the failure was lost to a later cancel: " << error.what());
  }
  CHECK(source.cancelled());
}

TEST_CASE("GatherProgress counts failures and cancellations apart", "[async][gather][cancel]") {
  GatherProgress last;
  GatherOptions options;
  options.on_progress = [&](const GatherProgress& progress) { last = progress; };
  SECTION("fail-fast: the running tasks' answers to the stop are cancellations") {
    // Item 0 fails once items 1 and 2 run; they answer the stop with Cancelled.
    std::vector<std::promise<void>> started(3);
    std::vector<std::shared_future<void>> running;
    for (auto& promise : started) running.push_back(promise.get_future().share());
    options.max_in_flight = 3;
    CHECK_THROWS_AS(gather(
                        iota(3),
                        [&](int i, const CancellationToken& token) {
                          if (i == 0) {
                            running[1].wait_for(30s);
                            running[2].wait_for(30s);
                            throw std::runtime_error("bad");
                          }
                          started[static_cast<std::size_t>(i)].set_value();
                          token.wait_for(30s);
                          token.throw_if_cancelled();
                          return i;
                        },
                        options),
                    TaskError);
    CHECK(last.done == 3);
    CHECK(last.failed == 1);
    CHECK(last.cancelled == 2);
    CHECK(last.total == 3);
  }
  SECTION("fail-fast: a task's own Cancelled that nothing asked for is a failure") {
    options.max_in_flight = 1;
    CHECK_THROWS_AS(gather(
                        iota(3),
                        [](int i) -> int {
                          if (i == 0) throw Cancelled("unasked");
                          return i;
                        },
                        options),
                    TaskError);
    CHECK(last.done >= 1);  // item 1 may start before the gather stops: it succeeds
    CHECK(last.failed == 1);
    CHECK(last.cancelled == 0);
  }
  SECTION("settled: a task's own Cancelled is a cancellation, as Settled::cancelled() says") {
    options.max_in_flight = 2;
    auto results = gather_settled(
        iota(4),
        [](int i) {
          if (i == 1) throw std::runtime_error("bad");
          if (i == 2) throw Cancelled("unasked");
          return i;
        },
        options);
    CHECK(results[2].cancelled());
    CHECK(last.done == 4);
    CHECK(last.failed == 1);
    CHECK(last.cancelled == 1);
    CHECK(last.total == 4);
  }
}

TEST_CASE("a timed-out item's message shows the timeout as formatted, and settled names no input",
          "[async][gather][errors]") {
  CHECK(torchguard::detail::timeout_text(2s) == "2.00 s");  // TaskError's comment's example
  GatherOptions options;
  options.item_timeout = 20ms;
  std::atomic<int> named{0};
  options.item_name = [&](std::size_t index) {
    ++named;
    return "sample " + std::to_string(index);
  };
  auto stuck = [](int i, const CancellationToken& token) {
    token.wait_for(30s);  // returns when the timeout cancels it
    return i;
  };
  try {
    gather(iota(1), stuck, options);
    FAIL("gather did not throw");
  } catch (const TaskError& error) {
    CHECK(std::string(error.what()) == "timed out after 20.0 ms (input 'sample 0'; item 0 of 1)");
  }
  CHECK(named == 1);
  auto results = gather_settled(iota(2), stuck, options);
  REQUIRE(results.size() == 2);
  for (auto& result : results) {
    CHECK(message_of(result.error) == "timed out after 20.0 ms");  // results[i].index names it
  }
  CHECK(named == 1);  // gather_settled never calls item_name
}
