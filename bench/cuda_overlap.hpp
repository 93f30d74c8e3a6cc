// The Prefetcher's copy/compute overlap on a GPU, timed with CUDA events on the consumer's stream
// (GPU time, not the host's): a batch's host-to-device copy alone, a batch's compute alone, and
// the two pipelined through a Prefetcher that stages batches on a side stream. Shared by
// bench_gpu and the [cuda] test that proves the overlap (tests/test_cuda.cpp).
#pragma once

#if TORCHGUARD_WITH_CUDA
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAFunctions.h>
#include <torch/torch.h>

#include "torchguard/async.hpp"

namespace torchguard_bench {

struct OverlapFigures {
  double copy_ms;       // per batch, alone
  double compute_ms;    // per batch, alone
  double pipelined_ms;  // per batch, copy and compute through the Prefetcher
  int matmuls;          // per batch: the compute, sized to take about as long as a copy
  // max(copy, compute) / pipelined: 1 when the shorter hides entirely behind the longer; 0.5
  // when nothing overlaps and both take as long.
  double overlap() const { return std::max(copy_ms, compute_ms) / pipelined_ms; }
};

// Milliseconds of GPU time between two events on the current stream, around the work `work` queues.
template <class F>
double gpu_milliseconds(F&& work) {
  at::cuda::CUDAEvent start(cudaEventDefault);  // with timing (the default disables it)
  at::cuda::CUDAEvent stop(cudaEventDefault);
  start.record();
  work();
  stop.record();
  stop.synchronize();
  return static_cast<double>(start.elapsed_time(stop));
}

// `batches` batches of `batch_mib` MiB (float32 rows of 4096) from pinned host memory, on the
// current device. Device memory used: at most max(batches, 32) * batch_mib MiB, plus 80 MiB.
inline OverlapFigures measure_prefetch_overlap(int batches, int batch_mib) {
  const torch::Device gpu(torch::kCUDA, c10::cuda::current_device());
  const std::int64_t rows = std::int64_t{batch_mib} * (1 << 20) / (4096 * 4);
  // Two pinned sources, only read by the copies in flight.
  std::vector<torch::Tensor> sources;
  for (int i = 0; i < 2; ++i) sources.push_back(torch::rand({rows, 4096}).pin_memory());
  const auto weight = torch::rand({4096, 4096}, torch::TensorOptions(gpu));
  torch::Tensor sink;
  auto compute = [&](const torch::Tensor& batch, int matmuls) {
    const auto slice = batch.narrow(0, 0, std::min<std::int64_t>(rows, 1024));
    for (int i = 0; i < matmuls; ++i) sink = torch::mm(slice, weight);
  };
  auto pipeline = [&](int count, int matmuls) {
    torchguard::PrefetchOptions options;
    options.depth = 2;
    options.device = gpu;
    torchguard::Prefetcher<torch::Tensor> prefetched(
        static_cast<std::size_t>(count),
        [&sources](std::size_t index) { return sources[index % 2]; }, options);
    auto first = prefetched.next();  // its copy comes before the clock starts
    return gpu_milliseconds([&] {
      compute(*first, matmuls);
      for (auto& batch : prefetched) compute(batch, matmuls);
    });
  };

  auto on_gpu = sources[0].to(gpu, /*non_blocking=*/true);
  compute(on_gpu, 1);  // cuBLAS's handle and workspace
  const double copy_ms = gpu_milliseconds([&] {
                           for (int i = 0; i < batches; ++i) {
                             on_gpu = sources[static_cast<std::size_t>(i % 2)].to(gpu, true);
                           }
                         }) /
                         batches;
  const double matmul_ms = gpu_milliseconds([&] { compute(on_gpu, 10); }) / 10;
  const int matmuls = std::max(1, static_cast<int>(std::lround(copy_ms / matmul_ms)));
  const double compute_ms = gpu_milliseconds([&] {
                              for (int i = 0; i < batches; ++i) compute(on_gpu, matmuls);
                            }) /
                            batches;
  // Warm: each copy runs on the next of LibTorch's 32 pooled side streams, and the caching
  // allocator keeps blocks per stream; once every stream has one, no copy waits for cudaMalloc.
  pipeline(32, matmuls);
  const double pipelined_ms = pipeline(batches, matmuls) / batches;
  return {copy_ms, compute_ms, pipelined_ms, matmuls};
}

}  // namespace torchguard_bench
#endif  // TORCHGUARD_WITH_CUDA
