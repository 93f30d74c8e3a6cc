// async/prefetcher.hpp: Prefetcher loads ahead of its consumer, in order or as loads complete, in
// a window that grows; errors at their turn; cancellation; moves while its threads run.
#include "torchguard/async.hpp"
#include "torchguard/gpu.hpp"

#include <algorithm>
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
#include "torchguard/core/guard.hpp"

using torchguard::BatchedInference;
using torchguard::CancellationSource;
using torchguard::CancellationToken;
using torchguard::Cancelled;
using torchguard::gather;
using torchguard::GatherOptions;
using torchguard::Order;
using torchguard::Prefetcher;
using torchguard::PrefetchOptions;
using torchguard::TaskError;
using torchguard::testing::Contains;
using torchguard::testing::iota;
using torchguard::testing::wait_until;
using namespace std::chrono_literals;

static_assert(torchguard::is_guard_v<Prefetcher<int>>);
static_assert(torchguard::is_guard_v<Prefetcher<torch::Tensor>>);
static_assert(torchguard::is_guard_v<BatchedInference>);

TEST_CASE("Prefetcher yields every item in order, at most depth ahead", "[async][prefetcher]") {
  // Items the consumer has asked for (next() calls begun): a load may start only for an index
  // below requested + depth.
  std::atomic<long> requested{0};
  std::atomic<long> most_ahead{0};
  PrefetchOptions options;
  options.depth = 3;
  options.max_depth = 3;  // a fixed window
  Prefetcher<int> items(
      50,
      [&](std::size_t index) {
        const long ahead = static_cast<long>(index) + 1 - requested.load();
        long seen = most_ahead.load();
        while (ahead > seen && !most_ahead.compare_exchange_weak(seen, ahead)) {
        }
        std::this_thread::sleep_for(std::chrono::microseconds(300 * (index % 3)));
        return static_cast<int>(index) * 3;
      },
      options);
  CHECK(items.size() == 50);
  int expected = 0;
  for (;;) {
    ++requested;
    auto item = items.next_indexed();
    if (!item) break;
    CHECK(item->index == static_cast<std::size_t>(expected));
    CHECK(item->value == expected * 3);
    ++expected;
  }
  CHECK(expected == 50);
  CHECK(most_ahead >= 1);
  CHECK(most_ahead <= 3);     // never more than depth ahead
  CHECK_FALSE(items.next());  // stays at the end
}

TEST_CASE("Prefetcher in completion order yields each item once", "[async][prefetcher]") {
  PrefetchOptions options;
  options.depth = 4;
  options.order = Order::completion;
  Prefetcher<std::string> items(
      12,
      [](std::size_t index) {
        std::this_thread::sleep_for(index == 0 ? 100ms : 1ms);
        return std::to_string(index);
      },
      options);
  std::vector<std::size_t> order;
  while (auto item = items.next_indexed()) {
    CHECK(item->value == std::to_string(item->index));
    order.push_back(item->index);
  }
  REQUIRE(order.size() == 12);
  CHECK(order.front() != 0);
  std::sort(order.begin(), order.end());
  for (std::size_t i = 0; i < order.size(); ++i) CHECK(order[i] == i);
}

TEST_CASE("Prefetcher delivers an item's error at that item's turn and goes on",
          "[async][prefetcher]") {
  Prefetcher<int> items(6, [](std::size_t index) {
    if (index == 2) throw std::runtime_error("corrupt record");
    return static_cast<int>(index);
  });
  CHECK(*items.next() == 0);
  CHECK(*items.next() == 1);
  try {
    items.next();
    FAIL("no error at item 2");
  } catch (const TaskError& error) {
    CHECK(error.index() == 2);
    CHECK(std::string(error.what()) == "corrupt record (item 2 of 6)");
  }
  std::vector<int> rest;
  for (int value : items) rest.push_back(value);
  CHECK(rest == std::vector<int>{3, 4, 5});
}

TEST_CASE("Prefetcher names a failed item with the user's item_name",
          "[async][prefetcher][errors]") {
  auto load = [](std::size_t index) {
    if (index == 2) throw std::runtime_error("corrupt record");
    return static_cast<int>(index);
  };
  PrefetchOptions options;
  options.item_name = [](std::size_t index) {
    return "batch " + std::to_string(index) + " of epoch 1";
  };
  Prefetcher<int> items(4, load, options);
  CHECK(*items.next() == 0);
  CHECK(*items.next() == 1);
  try {
    items.next();
    FAIL("no error at item 2");
  } catch (const TaskError& error) {
    CHECK(std::string(error.what()) == "corrupt record (input 'batch 2 of epoch 1'; item 2 of 4)");
    CHECK(error.input() == "batch 2 of epoch 1");
    CHECK(error.index() == 2);
    CHECK(error.total() == 4);
  }
  CHECK(*items.next() == 3);

  // A naming function that throws leaves the name out.
  options.item_name = [](std::size_t) -> std::string { throw std::runtime_error("no name"); };
  Prefetcher<int> unnamed(3, load, options);
  CHECK(*unnamed.next() == 0);
  CHECK(*unnamed.next() == 1);
  CHECK_THROWS_WITH(unnamed.next(), "corrupt record (item 2 of 3)");
}

TEST_CASE("Prefetcher's destructor cancels loads in flight and waits for them",
          "[async][prefetcher]") {
  std::atomic<int> running{0};
  std::atomic<int> cancelled{0};
  const auto started = std::chrono::steady_clock::now();
  {
    PrefetchOptions options;
    options.depth = 4;
    Prefetcher<torch::Tensor> items(
        1000,
        [&](std::size_t index, const CancellationToken& token) {
          ++running;
          auto tensor = torch::full({64}, static_cast<double>(index));
          if (index > 0 && token.wait_for(30s)) ++cancelled;
          --running;
          return tensor;
        },
        options);
    auto first = items.next();
    REQUIRE(first);
    CHECK(first->index({0}).item<double>() == 0.0);
    wait_until([&] { return running >= 4; });
  }
  CHECK(running == 0);
  CHECK(cancelled == 4);
  CHECK(std::chrono::steady_clock::now() - started < 20s);
}

TEST_CASE("Prefetcher::cancel() from another thread ends a consumer blocked in next()",
          "[async][prefetcher]") {
  // The load ignores its token and stays until released: the consumer must not wait for it.
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<int> running{0};
  PrefetchOptions options;
  options.depth = 2;
  Prefetcher<int> items(
      10,
      [&](std::size_t index) {
        ++running;
        released.wait_for(30s);  // bounded: a failed REQUIRE below must not hang the destructor
        --running;
        return static_cast<int>(index);
      },
      options);
  auto consumer = std::async(std::launch::async, [&] { return items.next(); });
  wait_until([&] { return running == 2; });
  CHECK(consumer.wait_for(50ms) == std::future_status::timeout);  // blocked on item 0
  std::thread canceller([&] { items.cancel(); });                 // waits for the loads
  const bool woke = consumer.wait_for(20s) == std::future_status::ready;
  CHECK(woke);
  CHECK(running == 2);  // the consumer came back while the loads still ran
  release.set_value();
  canceller.join();
  CHECK(running == 0);
  CHECK_FALSE(consumer.get().has_value());
  CHECK_FALSE(items.next().has_value());  // and stays ended
}

TEST_CASE("Prefetcher's window grows to max_depth while a slow item holds the consumer up",
          "[async][prefetcher]") {
  // Item 0 is slow; the others load at once. With depth 2, items 0 and 1 fill the window and the
  // consumer waits on item 0 while a loader waits for room: the window grows by one item per
  // waiting loader (one here) to max_depth 4, so items 2 and 3 load during item 0's load, and
  // item 4 does not.
  std::atomic<long> most_started{0};
  std::atomic<long> most_started_while_held{-1};
  PrefetchOptions options;
  options.depth = 2;
  options.workers = 2;
  options.max_depth = 4;
  Prefetcher<int> items(
      10,
      [&](std::size_t index) {
        const long mine = static_cast<long>(index);
        long seen = most_started.load();
        while (mine > seen && !most_started.compare_exchange_weak(seen, mine)) {
        }
        if (index == 0) {
          // Held until item 3 has started (10 s at most: without growth it never does), and a
          // little longer, which would let item 4 start if the window went past max_depth.
          const auto until = std::chrono::steady_clock::now() + 10s;
          while (most_started.load() < 3 && std::chrono::steady_clock::now() < until) {
            std::this_thread::sleep_for(1ms);
          }
          std::this_thread::sleep_for(50ms);
          most_started_while_held = most_started.load();
        }
        return static_cast<int>(index);
      },
      options);
  int expected = 0;
  while (auto item = items.next()) CHECK(*item == expected++);
  CHECK(expected == 10);
  CHECK(most_started_while_held == 3);
}

TEST_CASE("Prefetcher checks its options", "[async][prefetcher]") {
  auto load = [](std::size_t index) { return torch::zeros({1}) + static_cast<double>(index); };
  PrefetchOptions options;
  options.depth = 0;
  CHECK_THROWS_WITH(Prefetcher<torch::Tensor>(3, load, options), Contains("depth"));
  options.depth = 2;
  options.workers = 3;
  CHECK_THROWS_WITH(Prefetcher<torch::Tensor>(3, load, options), Contains("must not exceed depth"));
  options.workers = 0;
  options.max_depth = 1;
  CHECK_THROWS_WITH(Prefetcher<torch::Tensor>(3, load, options),
                    Contains("max_depth (1) must not be below depth (2)"));
  options.max_depth = 0;
  options.device = torch::Device(torch::kCPU);
  CHECK_THROWS_WITH(Prefetcher<torch::Tensor>(3, load, options), Contains("CUDA device"));
  options.device = torch::Device(torch::kCUDA);
  CHECK_THROWS_WITH(Prefetcher<int>(
                        3, [](std::size_t) { return 1; }, options),
                    Contains("items made of tensors"));
  if (!torchguard::cuda_available()) {
    CHECK_THROWS_AS(Prefetcher<torch::Tensor>(3, load, options), torchguard::OptionsError);
  }
}

TEST_CASE("a Prefetcher whose token is cancelled cancels its loads and ends next()",
          "[async][prefetcher]") {
  CancellationSource source;
  std::atomic<int> running{0};
  std::atomic<int> saw_cancel{0};
  PrefetchOptions options;
  options.depth = 3;
  options.cancellation = source.token();
  Prefetcher<int> items(
      100,
      [&](std::size_t index, const CancellationToken& token) {
        ++running;
        if (index > 0 && token.wait_for(30s)) ++saw_cancel;
        --running;
        return static_cast<int>(index);
      },
      options);
  REQUIRE(items.next() == 0);
  wait_until([&] { return running == 3; });
  source.cancel();  // no next() in flight: the loads still see their tokens cancelled
  wait_until([&] { return saw_cancel == 3; });
  CHECK_FALSE(items.next().has_value());
  CHECK_FALSE(items.next().has_value());

  // A consumer blocked in next() comes back when the token is cancelled.
  CancellationSource second;
  options.cancellation = second.token();
  Prefetcher<int> blocked(
      4,
      [](std::size_t index, const CancellationToken& token) {
        token.wait_for(30s);
        return static_cast<int>(index);
      },
      options);
  auto consumer = std::async(std::launch::async, [&] { return blocked.next(); });
  CHECK(consumer.wait_for(30ms) == std::future_status::timeout);
  second.cancel();
  REQUIRE(consumer.wait_for(10s) == std::future_status::ready);
  CHECK_FALSE(consumer.get().has_value());
}

TEST_CASE("Prefetcher and BatchedInference move while their threads run, and close once",
          "[async][prefetcher][batched]") {
  Prefetcher<int> first(20, [](std::size_t index) {
    std::this_thread::sleep_for(1ms);
    return static_cast<int>(index);
  });
  CHECK(first.next() == 0);
  Prefetcher<int> moved(std::move(first));
  std::vector<int> rest;
  for (int value : moved) rest.push_back(value);
  CHECK(rest.size() == 19);
  CHECK(rest.front() == 1);
  moved.close(torchguard::Outcome::success);
  moved.close(torchguard::Outcome::failure);  // idempotent
  CHECK_FALSE(moved.next().has_value());

  BatchedInference server([](const torch::Tensor& batch) { return batch + 1; }, 4, 1ms);
  auto before = server.submit(torch::zeros({1}));
  BatchedInference other(std::move(server));
  auto after = other.submit(torch::ones({1}));
  CHECK(before.get().item<float>() == 1.0F);
  CHECK(after.get().item<float>() == 2.0F);
  BatchedInference assigned([](const torch::Tensor& batch) { return batch; }, 4, 1ms);
  assigned = std::move(other);  // closes the server it held
  CHECK(assigned.submit(torch::zeros({1})).get().item<float>() == 1.0F);
  assigned.close(torchguard::Outcome::success);
  assigned.close(torchguard::Outcome::failure);
  CHECK_THROWS_AS(assigned.submit(torch::zeros({1})), torchguard::Error);
  CHECK(assigned.stats().requests == 3);
}

TEST_CASE("Prefetcher::cancelled() tells an interrupted run from a finished one",
          "[async][prefetcher][cancel]") {
  auto load = [](std::size_t index) { return static_cast<int>(index); };
  SECTION("finished: every item taken, then closed") {
    Prefetcher<int> items(3, load);
    std::vector<int> seen;
    for (int value : items) seen.push_back(value);
    CHECK(seen == std::vector<int>{0, 1, 2});
    CHECK_FALSE(items.cancelled());
    items.close(torchguard::Outcome::success);
    CHECK_FALSE(items.cancelled());  // a close after the last item ends nothing
    CHECK_FALSE(items.next().has_value());
  }
  SECTION("cancel(): next() returns nullopt, even for items already loaded") {
    std::atomic<int> loaded{0};
    PrefetchOptions options;
    options.depth = 4;
    options.max_depth = 4;  // a fixed window: a slow item 0 must not let more items load
    Prefetcher<int> items(
        10,
        [&](std::size_t index) {
          ++loaded;
          return static_cast<int>(index);
        },
        options);
    CHECK_FALSE(items.cancelled());
    REQUIRE(items.next() == 0);
    wait_until([&] { return loaded >= 5; });  // items 1 to 4 loaded (window of 4), waiting
    CHECK(loaded == 5);
    items.cancel();
    CHECK(items.cancelled());
    CHECK_FALSE(items.next().has_value());
    CHECK_FALSE(items.next_indexed().has_value());
    CHECK(items.cancelled());
  }
  SECTION("the token: cancelled() before next() has seen it; a range-for ends") {
    CancellationSource source;
    PrefetchOptions options;
    options.depth = 2;
    options.cancellation = source.token();
    Prefetcher<int> items(100, load, options);
    int taken = 0;
    for (int value : items) {
      CHECK(value == taken);
      if (++taken == 3) {
        source.cancel();
        CHECK(items.cancelled());
      }
    }
    CHECK(taken == 3);
    CHECK(items.cancelled());
  }
  SECTION("an empty Prefetcher is finished, not cancelled") {
    Prefetcher<int> items(0, load);
    CHECK_FALSE(items.next().has_value());
    items.cancel();
    CHECK_FALSE(items.cancelled());
  }
}

TEST_CASE("a Prefetcher whose token is already cancelled starts no load",
          "[async][prefetcher][cancel]") {
  CancellationSource source;
  source.cancel();
  std::atomic<int> loads{0};
  auto load = [&](std::size_t index) {
    ++loads;
    return static_cast<int>(index);
  };
  PrefetchOptions options;
  options.depth = 4;
  options.cancellation = source.token();
  {
    Prefetcher<int> items(10, load, options);
    CHECK(items.cancelled());
    CHECK_FALSE(items.next().has_value());
    int seen = 0;
    for (int value : items) {
      (void)value;
      ++seen;
    }
    CHECK(seen == 0);
    CHECK(items.cancelled());
    items.close(torchguard::Outcome::success);  // waits for any load that started
  }
  CHECK(loads == 0);
  // As a gather given that token: it runs nothing either.
  GatherOptions gather_options;
  gather_options.cancellation = source.token();
  CHECK_THROWS_AS(
      gather(
          iota(3), [&](int i) { return load(static_cast<std::size_t>(i)); }, gather_options),
      Cancelled);
  CHECK(loads == 0);
  // No items: finished, not cancelled.
  Prefetcher<int> empty(0, load, options);
  CHECK_FALSE(empty.next().has_value());
  CHECK_FALSE(empty.cancelled());
}
