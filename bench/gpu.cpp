// What only a GPU can measure, each against its peer in the same run (medians):
//   overlap: the Prefetcher's host-to-device copies against the consumer's compute, timed with
//            CUDA events (bench/cuda_overlap.hpp): max(copy, compute) / pipelined, target >= 0.9
//   stall:   how long a training loop on CUDA is blocked by a checkpoint: the background writer
//            (copy in step(), and overlapped with the next forward/backward up to the fence
//            before optimizer.step()) against a synchronous save of the same state
//   inference: BatchedInference on CUDA at 1, 8 and 64 callers against one-by-one model calls
// Without a GPU (or against a CPU-only LibTorch) it says so and exits 0.
//   bench_gpu [--requests M] [directory]   (default: a new directory under /tmp)
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "cuda_overlap.hpp"
#include "inference.hpp"
#include "torchguard/checkpoint.hpp"
#include "torchguard/gpu.hpp"

namespace fs = std::filesystem;

namespace {

#if TORCHGUARD_WITH_CUDA
constexpr int rounds = 5;

double median(std::vector<double> samples) {
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

// Host seconds that `fn` blocks, the GPU idle before it starts.
double seconds_blocked(const std::function<void()>& fn) {
  torch::cuda::synchronize();
  const auto start = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void bench_overlap() {
  std::vector<torchguard_bench::OverlapFigures> runs;
  for (int round = 0; round < 3; ++round) {
    runs.push_back(torchguard_bench::measure_prefetch_overlap(/*batches=*/32, /*batch_mib=*/128));
  }
  std::sort(runs.begin(), runs.end(),
            [](const auto& a, const auto& b) { return a.overlap() < b.overlap(); });
  const auto& mid = runs[1];
  std::printf("== Prefetcher on CUDA: 32 batches of 128 MiB from pinned memory, median of 3 ==\n");
  std::printf("  per batch: copy %.3f ms, compute %.3f ms (%d matmuls), pipelined %.3f ms\n",
              mid.copy_ms, mid.compute_ms, mid.matmuls, mid.pipelined_ms);
  std::printf("  ratio overlap max(copy, compute) / pipelined: %.2f (target >= 0.90)\n",
              mid.overlap());
  std::fflush(stdout);
}

void bench_checkpoint_stall(const fs::path& base) {
  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(4096, 4096), torch::nn::Linear(4096, 4096),
                              torch::nn::Linear(4096, 4096));
  model->to(torch::kCUDA);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  const auto input = torch::randn({256, 4096}, torch::kCUDA);
  auto forward_backward = [&] {
    optimizer.zero_grad();
    model->forward(input).sum().backward();
  };
  forward_backward();
  optimizer.step();  // the momentum buffers exist

  torchguard::CheckpointOptions options;
  options.keep_last = 1;
  options.save_on_exit = torchguard::SaveOnExit::never;
  options.directory = base / "synchronous";
  torchguard::CheckpointGuard synchronous(model, optimizer, options);
  synchronous.save();  // warm
  std::vector<double> saves;
  for (int round = 0; round < rounds; ++round) {
    saves.push_back(seconds_blocked([&] { synchronous.save(); }));
  }

  options.background = true;
  options.every_n_steps = 1;
  options.directory = base / "background";
  torchguard::CheckpointGuard background(model, optimizer, options);
  background.step();  // the first background save also allocates its staging buffer
  std::vector<double> in_step;
  for (int round = 0; round < rounds; ++round) {
    background.wait();
    in_step.push_back(seconds_blocked([&] { background.step(); }));
  }
  background.wait();

  // Overlapped: the copy runs on a side stream during the next forward/backward; the loop waits
  // at the fence before optimizer.step(), and in step() for what it queues.
  options.directory = base / "overlapped";
  torchguard::CheckpointGuard overlapped(model, optimizer, options);
  overlapped.before_optimizer_step();  // the loop has a fence: saves overlap
  overlapped.step();
  std::vector<double> overlapped_stalls;
  for (int round = 0; round < rounds; ++round) {
    overlapped.wait();
    double stall = seconds_blocked([&] { overlapped.step(); });
    forward_backward();
    stall += seconds_blocked([&] { overlapped.before_optimizer_step(); });
    optimizer.step();
    overlapped_stalls.push_back(stall);
  }
  overlapped.wait();

  std::int64_t bytes = 0;
  for (const auto& p : model->parameters()) bytes += 2 * p.numel() * p.element_size();
  const double sync_save = median(saves);
  std::printf(
      "== CheckpointGuard on CUDA: %.0f MiB (3 x Linear 4096 + SGD momentum), median of %d ==\n",
      static_cast<double>(bytes) / (1 << 20), rounds);
  std::printf("  synchronous save:                  %.3f s\n", sync_save);
  std::printf("  background, copy in step():        %.3f s\n", median(in_step));
  std::printf("  background, overlapped (fence):    %.3f s\n", median(overlapped_stalls));
  std::printf("  ratio background stall / synchronous save: %.3f (target <= 0.10)\n",
              median(in_step) / sync_save);
  std::printf("  ratio overlapped stall / synchronous save: %.3f (target <= 0.05)\n",
              median(overlapped_stalls) / sync_save);
  std::fflush(stdout);
}
#endif

}  // namespace

int main(int argc, char** argv) {
  int requests = 4096;
  std::string directory;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--requests" && i + 1 < argc) {
      requests = std::atoi(argv[++i]);
    } else if (!arg.empty() && arg[0] != '-' && directory.empty()) {
      directory = arg;
    } else {
      std::fprintf(stderr, "usage: %s [--requests M] [directory]\n", argv[0]);
      return 2;
    }
  }
  if (requests < 1) {
    std::fprintf(stderr, "requests must be positive\n");
    return 2;
  }
  if (!torchguard::detail::cuda_usable()) {
    std::printf("GPU benchmarks: skipped (%s)\n", torchguard::built_with_cuda
                                                      ? "no CUDA device"
                                                      : "this LibTorch has no CUDA support");
    return 0;
  }
#if TORCHGUARD_WITH_CUDA
  const bool temporary = directory.empty();
  if (temporary) {
    directory = "/tmp/torchguard-bench-gpu-XXXXXX";
    if (::mkdtemp(directory.data()) == nullptr) return 1;
  }
  fs::create_directories(directory);
  torchguard::set_default_logger(std::make_shared<spdlog::logger>("quiet"));
  std::printf("device: %s\n", at::cuda::getCurrentDeviceProperties()->name);
  bench_overlap();
  bench_checkpoint_stall(directory);
  torchguard_bench::bench_inference(requests, torch::Device(torch::kCUDA, 0));
  if (temporary) fs::remove_all(directory);
#endif
  return 0;
}
