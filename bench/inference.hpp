// BatchedInference against one-by-one model calls: c closed-loop callers (1, 8, 64) each send
// requests one at a time to an MLP; throughput and p50/p99 latency of both. On the CPU in
// bench_async, on CUDA in bench_gpu (inputs on the host, answers back on the host, as a server's).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include "torchguard/async.hpp"

namespace torchguard_bench {

struct InferenceResult {
  double requests_per_second;
  double p50_ms;
  double p99_ms;
};

inline double percentile(std::vector<double> values, double p) {
  std::sort(values.begin(), values.end());
  const auto rank = static_cast<std::size_t>(p * static_cast<double>(values.size() - 1) + 0.5);
  return values[std::min(rank, values.size() - 1)];
}

// Each caller sends `per_caller` requests, one at a time, through `call`.
template <class Call>
InferenceResult run_callers(int callers, int per_caller, Call call) {
  using Clock = std::chrono::steady_clock;
  std::vector<std::vector<double>> latencies(static_cast<std::size_t>(callers));
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int c = 0; c < callers; ++c) {
    threads.emplace_back([&, c] {
      auto input = torch::randn({784});
      auto& mine = latencies[static_cast<std::size_t>(c)];
      for (int r = 0; r < per_caller; ++r) {
        const auto sent = Clock::now();
        auto output = call(input);
        if (output.size(0) != 10) std::abort();
        mine.push_back(std::chrono::duration<double, std::milli>(Clock::now() - sent).count());
      }
    });
  }
  for (auto& thread : threads) thread.join();
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  std::vector<double> all;
  for (auto& mine : latencies) all.insert(all.end(), mine.begin(), mine.end());
  return {static_cast<double>(all.size()) / elapsed, percentile(all, 0.50), percentile(all, 0.99)};
}

// Prints one-by-one and batched figures at 1, 8 and 64 callers, the model on `device`.
inline void bench_inference(int requests, const torch::Device& device) {
  std::printf("== BatchedInference on %s: MLP 784-1024-1024-10, %d requests per setting ==\n",
              device.str().c_str(), requests);
  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(784, 1024), torch::nn::ReLU(),
                              torch::nn::Linear(1024, 1024), torch::nn::ReLU(),
                              torch::nn::Linear(1024, 10));
  model->eval();
  model->to(device);
  for (int callers : {1, 8, 64}) {
    const int per_caller = std::max(1, requests / callers);
    const auto direct = run_callers(callers, per_caller, [&](const torch::Tensor& input) {
      c10::InferenceMode inference;
      return model->forward(input.to(device).unsqueeze(0))[0].cpu();
    });
    torchguard::BatchedInferenceOptions options;
    options.max_batch = 64;
    options.max_delay = std::chrono::microseconds(1000);
    options.device = device;
    torchguard::BatchedInference server(model, options);
    const auto batched = run_callers(callers, per_caller, [&](const torch::Tensor& input) {
      return server.submit(input).get().cpu();
    });
    const auto stats = server.stats();
    std::printf("  callers %2d  one-by-one: %8.0f req/s  p50 %6.2f ms  p99 %6.2f ms\n", callers,
                direct.requests_per_second, direct.p50_ms, direct.p99_ms);
    std::printf(
        "  callers %2d  batched:    %8.0f req/s  p50 %6.2f ms  p99 %6.2f ms  (mean batch "
        "%.1f)\n",
        callers, batched.requests_per_second, batched.p50_ms, batched.p99_ms,
        static_cast<double>(stats.requests) / static_cast<double>(stats.batches));
    std::printf("  callers %2d  throughput batched / one-by-one: %.2fx\n", callers,
                batched.requests_per_second / direct.requests_per_second);
  }
}

}  // namespace torchguard_bench
