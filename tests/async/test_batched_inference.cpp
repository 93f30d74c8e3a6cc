// async/batched_inference.hpp: BatchedInference merges concurrent callers' inputs into batches
// for one model thread; each caller gets its own answer or its own error; close and cancel.
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
using torchguard::BatchedInferenceOptions;
using torchguard::CancellationSource;
using torchguard::Cancelled;
using torchguard::testing::CapturedLogger;
using torchguard::testing::Contains;
using torchguard::testing::Gate;
using torchguard::testing::HeldBatchServer;
using torchguard::testing::wait_until;
using namespace std::chrono_literals;

TEST_CASE("BatchedInference gives each caller what a one-by-one call gives", "[async][batched]") {
  torch::manual_seed(3);
  torch::nn::Sequential model(torch::nn::Linear(16, 32), torch::nn::ReLU(),
                              torch::nn::Linear(32, 4));
  model->eval();
  const int callers = 16;
  const int per_caller = 8;
  std::vector<torch::Tensor> inputs;
  for (int i = 0; i < callers * per_caller; ++i) inputs.push_back(torch::randn({16}));
  std::vector<torch::Tensor> expected;
  {
    torch::NoGradGuard no_grad;
    for (auto& input : inputs) expected.push_back(model->forward(input.unsqueeze(0))[0]);
  }
  std::vector<torch::Tensor> outputs(inputs.size());
  BatchedInferenceOptions options;
  options.max_batch = 16;
  options.max_delay = std::chrono::milliseconds(20);
  BatchedInference server(model, options);
  std::vector<std::thread> threads;
  for (int caller = 0; caller < callers; ++caller) {
    threads.emplace_back([&, caller] {
      std::vector<std::future<torch::Tensor>> futures;
      for (int j = 0; j < per_caller; ++j) {
        futures.push_back(server.submit(inputs[static_cast<std::size_t>(caller * per_caller + j)]));
      }
      for (int j = 0; j < per_caller; ++j) {
        outputs[static_cast<std::size_t>(caller * per_caller + j)] =
            futures[static_cast<std::size_t>(j)].get();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  server.close();  // the stats of the last batch are in
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    REQUIRE(outputs[i].sizes() == expected[i].sizes());
    CHECK(torch::allclose(outputs[i], expected[i], 1e-5, 1e-6));
  }
  const auto stats = server.stats();
  CHECK(stats.requests == inputs.size());
  CHECK(stats.failed == 0);
  CHECK(stats.largest_batch > 1);
  CHECK(stats.largest_batch <= 16);
  CHECK(stats.batches < inputs.size());
}

TEST_CASE("BatchedInference fails only the request the model fails on", "[async][batched]") {
  CapturedLogger captured;
  // Refuses any batch holding a negative first feature.
  auto model = [](const torch::Tensor& batch) {
    if ((batch.select(1, 0) < 0).any().item<bool>()) {
      throw std::domain_error("negative feature");
    }
    return batch * 2;
  };
  BatchedInferenceOptions options;
  options.max_batch = 8;
  options.max_delay = std::chrono::milliseconds(50);
  options.logger = captured.logger;
  BatchedInference server(model, options);
  std::vector<std::future<torch::Tensor>> futures;
  for (int i = 0; i < 8; ++i) {
    futures.push_back(server.submit(torch::full({3}, i == 5 ? -1.0 : static_cast<double>(i))));
  }
  for (int i = 0; i < 8; ++i) {
    if (i == 5) {
      CHECK_THROWS_WITH(futures[5].get(), Contains("negative feature"));
    } else {
      CHECK(futures[static_cast<std::size_t>(i)].get()[0].item<double>() == 2.0 * i);
    }
  }
  server.close();
  CHECK(server.stats().failed == 1);
}

TEST_CASE("BatchedInference batches inputs of one shape together only", "[async][batched]") {
  BatchedInference server([](const torch::Tensor& batch) { return batch.sum(1); }, 8,
                          std::chrono::milliseconds(20));
  auto small = server.submit(torch::ones({2}));
  auto large = server.submit(torch::ones({5}));
  auto small_too = server.submit(torch::ones({2}));
  CHECK(small.get().item<double>() == 2.0);
  CHECK(large.get().item<double>() == 5.0);
  CHECK(small_too.get().item<double>() == 2.0);
}

TEST_CASE("BatchedInference names a model that returns the wrong number of rows",
          "[async][batched]") {
  CapturedLogger captured;
  BatchedInferenceOptions options;
  options.logger = captured.logger;
  BatchedInference server(
      [](const torch::Tensor&) {
        return torch::zeros({1, 3, 3}).sum(0);
      },
      options);
  auto future = server.submit(torch::ones({4}));
  CHECK_THROWS_WITH(future.get(), Contains("one output row per input") && Contains("[3, 3]"));
}

TEST_CASE("BatchedInference drains pending requests on close, then refuses new ones",
          "[async][batched]") {
  std::atomic<int> calls{0};
  BatchedInferenceOptions options;
  options.max_batch = 4;
  options.max_delay = std::chrono::seconds(5);  // close() must not wait for it
  std::vector<std::future<torch::Tensor>> futures;
  const auto started = std::chrono::steady_clock::now();
  {
    BatchedInference server(
        [&](const torch::Tensor& batch) {
          ++calls;
          std::this_thread::sleep_for(2ms);
          return batch + 1;
        },
        options);
    for (int i = 0; i < 30; ++i) futures.push_back(server.submit(torch::full({1}, double(i))));
    server.close();
    CHECK_THROWS_AS(server.submit(torch::ones({1})), torchguard::Error);
    CHECK(server.stats().requests == 30);
    CHECK(server.stats().largest_batch <= 4);
  }
  CHECK(std::chrono::steady_clock::now() - started < 4s);
  for (int i = 0; i < 30; ++i) {
    CHECK(futures[static_cast<std::size_t>(i)].get().item<double>() == i + 1.0);
  }
  CHECK(calls >= 8);
}

TEST_CASE("BatchedInference::close() racing submit(): each request is answered or refused",
          "[async][batched]") {
  BatchedInferenceOptions options;
  options.max_batch = 8;
  options.max_delay = 200us;
  BatchedInference server([](const torch::Tensor& batch) { return batch * 2; }, options);
  constexpr int kCallers = 4;
  constexpr int kMostPerCaller = 200000;  // a caller never refused ends here, and fails below
  std::vector<std::vector<std::pair<double, std::future<torch::Tensor>>>> answers(kCallers);
  std::vector<std::string> refusals(kCallers);  // checked here: Catch's macros are not thread-safe
  std::atomic<int> submitted{0};
  std::vector<std::thread> callers;
  for (int caller = 0; caller < kCallers; ++caller) {
    callers.emplace_back([&, caller] {
      for (int i = 0; i < kMostPerCaller; ++i) {
        const double value = caller * 1e6 + i;
        try {
          answers[static_cast<std::size_t>(caller)].emplace_back(
              value, server.submit(torch::full({2}, value, torch::kDouble)));
          ++submitted;
        } catch (const torchguard::Error& e) {
          refusals[static_cast<std::size_t>(caller)] = e.what();
          return;
        }
      }
    });
  }
  wait_until([&] { return submitted >= 200; });
  server.close();
  for (auto& thread : callers) thread.join();
  for (const auto& refusal : refusals) CHECK_THAT(refusal, Contains("after close()"));
  std::size_t answered = 0;
  for (auto& per_caller : answers) {
    for (auto& [value, future] : per_caller) {
      REQUIRE(future.wait_for(10s) == std::future_status::ready);
      const auto output = future.get();
      CHECK(output[0].item<double>() == value * 2);
      ++answered;
    }
  }
  CHECK(server.stats().requests == answered);
}

TEST_CASE("a request that finds BatchedInference idle runs at once whatever max_delay",
          "[async][batched]") {
  BatchedInferenceOptions options;
  options.max_batch = 32;
  options.max_delay = std::chrono::seconds(10);  // an upper bound: a lone request never waits it
  BatchedInference server([](const torch::Tensor& batch) { return batch + 1; }, options);
  for (int i = 0; i < 3; ++i) {  // the first request, and each after the previous answer
    auto answer = server.submit(torch::full({2}, double(i)));
    REQUIRE(answer.wait_for(5s) == std::future_status::ready);
    CHECK(answer.get()[0].item<float>() == float(i + 1));
  }
  server.close();  // the stats of the last batch are in
  CHECK(server.stats().batches == 3);
  CHECK(server.stats().largest_batch == 1);
}

TEST_CASE("requests that arrive while a batch runs make the next batch at once",
          "[async][batched]") {
  BatchedInferenceOptions options;
  options.max_batch = 3;
  options.max_delay = std::chrono::seconds(10);
  Gate gate;  // holds the first batch in the model
  BatchedInference server(
      [&](const torch::Tensor& batch) {
        gate.pass();
        return batch * 2;
      },
      options);
  auto first = server.submit(torch::full({1}, 0.0));
  gate.wait_entered();  // the first request runs alone: it found the model thread idle
  std::vector<std::future<torch::Tensor>> queued;
  for (int i = 1; i <= 4; ++i) queued.push_back(server.submit(torch::full({1}, double(i))));
  gate.open();
  CHECK(first.get()[0].item<float>() == 0.0F);
  for (int i = 1; i <= 4; ++i) {
    auto& answer = queued[static_cast<std::size_t>(i - 1)];
    REQUIRE(answer.wait_for(5s) == std::future_status::ready);  // not max_delay later
    CHECK(answer.get()[0].item<float>() == float(2 * i));
  }
  server.close();
  const auto stats = server.stats();
  CHECK(stats.batches == 3);  // {0}, then {1, 2, 3} (max_batch), then {4}
  CHECK(stats.largest_batch == 3);
  CHECK(stats.requests == 5);
}

TEST_CASE("BatchedInference checks its arguments", "[async][batched]") {
  auto identity = [](const torch::Tensor& x) { return x; };
  CHECK_THROWS_WITH(BatchedInference(identity, 0, std::chrono::milliseconds(1)),
                    Contains("max_batch must be at least 1"));
  BatchedInference server(identity, 4, std::chrono::milliseconds(1));
  CHECK_THROWS_WITH(server.submit(torch::Tensor()), Contains("undefined"));
}

TEST_CASE(
    "BatchedInference answers are tensors of their own, and a failing single request "
    "runs once",
    "[async][batched]") {
  std::atomic<int> calls{0};
  BatchedInferenceOptions options;
  options.max_batch = 1;
  BatchedInference server(
      [&](const torch::Tensor& batch) {
        ++calls;
        if (batch.sum().item<double>() < 0) throw std::domain_error("negative input");
        return batch * 3;
      },
      options);
  auto answer = server.submit(torch::ones({2})).get();
  CHECK_FALSE(answer.is_inference());
  answer.add_(1);  // allowed: not an inference tensor
  CHECK(answer.sum().item<double>() == 8.0);
  CHECK(answer.storage().nbytes() == 2 * sizeof(float));  // not a view of a larger batch
  calls = 0;
  CHECK_THROWS_WITH(server.submit(-torch::ones({2})).get(), Contains("negative input"));
  CHECK(calls == 1);
}

TEST_CASE("a BatchedInference whose token is cancelled answers queued requests with Cancelled",
          "[async][batched]") {
  HeldBatchServer held(5);
  auto& [source, gate, server, running, futures] = held;
  CHECK(futures[0].wait_for(30ms) == std::future_status::timeout);
  source.cancel();
  gate.open();
  CHECK(running.get()[0].item<float>() == 2.0F);  // the running batch finishes
  for (auto& future : futures) {
    REQUIRE(future.wait_for(10s) == std::future_status::ready);
    CHECK_THROWS_AS(future.get(), Cancelled);
  }
  CHECK_THROWS_AS(server.submit(torch::ones({2})), Cancelled);
  server.close();
  CHECK(server.stats().requests == 6);
  CHECK(server.stats().failed == 5);
  CHECK(server.stats().batches == 1);
}

TEST_CASE("BatchedInference::submit() after a cancel throws Cancelled, closed or not",
          "[async][batched][cancel]") {
  CancellationSource source;
  BatchedInferenceOptions options;
  options.cancellation = source.token();
  BatchedInference server([](const torch::Tensor& batch) { return batch; }, options);
  SECTION("closed, then cancelled") {
    server.close();
    try {
      server.submit(torch::ones({1}));
      FAIL("submit() did not throw");
    } catch (const Cancelled&) {
      FAIL("Cancelled before any cancel");
    } catch (const torchguard::Error& error) {
      CHECK_THAT(error.what(), Contains("after close()"));
    }
    source.cancel();
    CHECK_THROWS_AS(server.submit(torch::ones({1})), Cancelled);
  }
  SECTION("cancelled, then closed") {
    source.cancel();
    server.close();
    CHECK_THROWS_AS(server.submit(torch::ones({1})), Cancelled);
    CHECK_THROWS_WITH(server.submit(torch::ones({1})), Contains("after cancellation"));
  }
}

TEST_CASE("BatchedInference::close() from the model's own thread does not wait for itself",
          "[async][batched]") {
  // As every guard's close(): it may throw (what a join throws); the destructor logs instead.
  static_assert(!noexcept(std::declval<BatchedInference&>().close()));
  BatchedInference* self = nullptr;
  BatchedInferenceOptions options;
  options.max_batch = 1;
  BatchedInference server(
      [&](const torch::Tensor& batch) {
        self->close();  // the model shuts its server down: no join of its own thread
        return batch + 1;
      },
      options);
  self = &server;
  CHECK(server.submit(torch::zeros({1})).get().item<float>() == 1.0F);  // answered all the same
  CHECK_THROWS_WITH(server.submit(torch::zeros({1})), Contains("after close()"));
  server.close();  // joins the model thread, which has ended
  server.close(torchguard::Outcome::failure);
  CHECK(server.stats().requests == 1);
}
