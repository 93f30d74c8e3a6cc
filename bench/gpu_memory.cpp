// What a GpuMemoryGuard costs per guarded scope: the no-op path (CPU-only LibTorch or no GPU)
// and, on a GPU, the CUDA path with and without emptying the cache, against an empty scope.
// Prints nanoseconds per scope (median of rounds) and the ratio measured in this run.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include <torch/torch.h>
#include <torchguard/gpu.hpp>

namespace {

template <class F>
double median_ns_per_scope(int scopes_per_round, F&& scope) {
  std::vector<double> samples;
  for (int round = 0; round < 21; ++round) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < scopes_per_round; ++i) scope();
    const std::chrono::duration<double, std::nano> elapsed =
        std::chrono::steady_clock::now() - start;
    samples.push_back(elapsed.count() / scopes_per_round);
  }
  std::nth_element(samples.begin(), samples.begin() + 10, samples.end());
  return samples[10];
}

volatile int sink = 0;

}  // namespace

int main() {
  auto quiet = std::make_shared<spdlog::logger>("quiet");  // no sinks: measure the guard
  torchguard::set_default_logger(quiet);
  const double empty = median_ns_per_scope(100000, [] { sink = sink + 1; });
  torchguard::GpuMemoryOptions options;
  options.logger = quiet;
  const double guarded = median_ns_per_scope(100000, [&] {
    torchguard::GpuMemoryGuard guard(options);
    sink = sink + 1;
  });
  const bool gpu = torchguard::detail::cuda_usable();
  std::printf("GpuMemoryGuard, %s path: %.0f ns per scope (empty scope: %.1f ns)\n",
              gpu ? "CUDA" : "no-op", guarded, empty);
  if (!gpu) {
    std::printf("CUDA path: skipped (no GPU, or a CPU-only LibTorch)\n");
    return 0;
  }
  torchguard::GpuMemoryOptions emptying = options;
  emptying.empty_cache_on_entry = true;
  emptying.empty_cache_on_exit = true;
  const double with_empty = median_ns_per_scope(1000, [&] {
    torchguard::GpuMemoryGuard guard(emptying);
    sink = sink + 1;
  });
  std::printf("GpuMemoryGuard, CUDA path with empty_cache on entry and exit: %.0f ns per scope\n",
              with_empty);
  std::printf("ratio emptying / plain CUDA scope: %.1fx\n", with_empty / guarded);
  return 0;
}
