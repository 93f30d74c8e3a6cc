// What needs a GPU: every test here is tagged [cuda] and skips visibly (ctest: "Skipped") on a
// machine without one or against a CPU-only LibTorch. Its own executable, torchguard_cuda_tests,
// so that scripts/gpu-check.sh builds only this on a GPU machine. Every allocation is bounded and
// goes through LibTorch's caching allocator (never managed memory): a real out-of-memory error
// comes from a memory fraction set for the scope, never from filling the device.
#include <cstdint>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>
#if TORCHGUARD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include "cuda_overlap.hpp"  // bench/: the overlap measurement that bench_gpu prints
#include "support.hpp"
#include "torchguard/async.hpp"
#include "torchguard/checkpoint.hpp"
#include "torchguard/distributed.hpp"
#include "torchguard/gpu.hpp"

using torchguard::GpuMemoryGuard;
using torchguard::GpuMemoryOptions;
using torchguard::GpuMemoryStats;
using torchguard::retry_on_oom;
using torchguard::RetryOnOomOptions;
using torchguard::testing::bitwise_equal;
using torchguard::testing::CapturedLogger;
using torchguard::testing::host_copies;
using torchguard::testing::TempDir;

namespace {

// ctest reports a test that prints this as skipped (SKIP_REGULAR_EXPRESSION).
bool skip_without_gpu() {
  if (torchguard::detail::cuda_usable()) return false;
  std::cout << "SKIPPED: "
            << (torchguard::built_with_cuda ? "no CUDA device"
                                            : "this LibTorch has no CUDA support")
            << std::endl;
  return true;
}

constexpr std::int64_t MiB = 1 << 20;

}  // namespace

// ---- GpuMemoryGuard and retry_on_oom ----------------------------------------------------------

TEST_CASE("known allocations give exact allocated and peak and leak figures",
          "[gpu_memory][cuda]") {
  if (skip_without_gpu()) return;
  CapturedLogger captured;
  GpuMemoryOptions options;
  options.logger = captured.logger;
  options.label = "exact";
  options.leak_warning_bytes = 8 * MiB;
  torch::Tensor kept;
  torchguard::GpuMemoryStats stats;
  {
    GpuMemoryGuard guard(options);
    {
      torch::Tensor temporary =
          torch::empty({64 * MiB}, torch::dtype(torch::kUInt8).device(torch::kCUDA));
      kept = torch::empty({16 * MiB}, torch::dtype(torch::kUInt8).device(torch::kCUDA));
    }
    guard.close();
    stats = guard.stats();
  }
  CHECK(stats.available);
  CHECK(stats.leaked_bytes == 16 * MiB);
  CHECK(stats.peak_allocated_bytes - stats.allocated_bytes_at_entry == 80 * MiB);
  CHECK(stats.reserved_bytes >= stats.allocated_bytes);
  CHECK(captured.sink->contains(spdlog::level::warn, "left 16.0 MiB more allocated"));
  CHECK(captured.sink->contains(spdlog::level::info, "GPU memory [exact] cuda:"));
}

TEST_CASE("emptying the cache lowers reserved bytes", "[gpu_memory][cuda]") {
  if (skip_without_gpu()) return;
  GpuMemoryOptions options;
  options.logger = CapturedLogger().logger;
  { torch::Tensor t = torch::empty({256 * MiB}, torch::dtype(torch::kUInt8).device(torch::kCUDA)); }
  torchguard::GpuMemoryStats before;
  {
    GpuMemoryGuard guard(options);
    before = guard.stats();
  }
  options.empty_cache_on_entry = true;
  GpuMemoryGuard emptied(options);
  CHECK(emptied.stats().reserved_bytes_at_entry <= before.reserved_bytes - 256 * MiB);
}

TEST_CASE("a moved guard keeps its frame: the parent still sees the child's peak",
          "[gpu_memory][cuda]") {
  static_assert(torchguard::is_guard_v<GpuMemoryGuard>);
  if (skip_without_gpu()) return;
  GpuMemoryOptions options;
  options.logger = CapturedLogger().logger;
  torchguard::GpuMemoryStats outer_stats, child_stats;
  {
    GpuMemoryGuard outer(options);
    {
      GpuMemoryGuard child(options);
      GpuMemoryGuard moved(std::move(child));
      { auto block = torch::empty({48 * MiB}, torch::dtype(torch::kUInt8).device(torch::kCUDA)); }
      moved.close();
      child_stats = moved.stats();
    }
    outer.close();
    outer_stats = outer.stats();
  }
  CHECK(child_stats.peak_allocated_bytes - child_stats.allocated_bytes_at_entry == 48 * MiB);
  CHECK(outer_stats.peak_allocated_bytes - outer_stats.allocated_bytes_at_entry >= 48 * MiB);
}

TEST_CASE("nested guards each report their own peak", "[gpu_memory][cuda]") {
  if (skip_without_gpu()) return;
  GpuMemoryOptions options;
  options.logger = CapturedLogger().logger;
  auto allocate = [](std::int64_t bytes) {
    return torch::empty({bytes}, torch::dtype(torch::kUInt8).device(torch::kCUDA));
  };
  torchguard::GpuMemoryStats outer_stats, first_stats, second_stats;
  {
    GpuMemoryGuard outer(options);
    { auto big = allocate(128 * MiB); }  // outer's own peak: +128 MiB
    {
      GpuMemoryGuard first(options);
      { auto small = allocate(32 * MiB); }
      first.close();
      first_stats = first.stats();
    }
    {
      GpuMemoryGuard second(options);
      { auto medium = allocate(64 * MiB); }
      second.close();
      second_stats = second.stats();
    }
    outer.close();
    outer_stats = outer.stats();
  }
  CHECK(first_stats.peak_allocated_bytes - first_stats.allocated_bytes_at_entry == 32 * MiB);
  CHECK(second_stats.peak_allocated_bytes - second_stats.allocated_bytes_at_entry == 64 * MiB);
  CHECK(outer_stats.peak_allocated_bytes - outer_stats.allocated_bytes_at_entry == 128 * MiB);
}

TEST_CASE("the scope selects its device and restores the previous one", "[gpu_memory][cuda]") {
  if (skip_without_gpu()) return;
  const int before = torchguard::detail::current_device();
  const int target = static_cast<int>(torch::cuda::device_count()) - 1;
  GpuMemoryOptions options;
  options.logger = CapturedLogger().logger;
  options.device = target;
  {
    GpuMemoryGuard guard(options);
    CHECK(torchguard::detail::current_device() == target);
    CHECK(guard.stats().device == target);
  }
  CHECK(torchguard::detail::current_device() == before);
}
TEST_CASE(
    "a real out-of-memory error in retry_on_oom is caught and the batch shrunk and the sizes "
    "reported",
    "[gpu_memory][oom][cuda]") {
  if (skip_without_gpu()) return;
#if TORCHGUARD_WITH_CUDA
  std::size_t free_bytes = 0, total_bytes = 0;
  REQUIRE(cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess);
  REQUIRE(free_bytes > 2048 * MiB);
  CapturedLogger captured;
  GpuMemoryOptions scope;
  scope.logger = captured.logger;
  scope.empty_cache_on_entry = true;
  scope.memory_fraction = 1024.0 * MiB / static_cast<double>(total_bytes);  // a 1 GiB cap
  RetryOnOomOptions options;
  options.logger = captured.logger;
  std::vector<std::int64_t> calls;
  std::int64_t fitted = 0;
  GpuMemoryStats stats;
  {
    GpuMemoryGuard guard(scope);
    // A step of `batch` MiB: activations of a quarter, then the batch itself.
    fitted = retry_on_oom(
        4096,
        [&](std::int64_t batch) {
          calls.push_back(batch);
          auto bytes = torch::dtype(torch::kUInt8).device(torch::kCUDA);
          auto activations = torch::empty({batch / 4 * MiB}, bytes);
          auto data = torch::empty({batch * MiB}, bytes);
          return batch;
        },
        options);
    guard.close();
    stats = guard.stats();
  }
  // 5, 2.5 and 1.25 GiB do not fit under the cap; 640 MiB does.
  CHECK(fitted == 512);
  CHECK(calls == std::vector<std::int64_t>{4096, 2048, 1024, 512});
  CHECK(stats.oom_events == 3);
  CHECK(stats.peak_reserved_bytes <= 1024 * MiB);
  CHECK(captured.sink->contains(spdlog::level::warn,
                                "out of memory at batch 4096; retrying at 2048"));
  CHECK(captured.sink->contains(spdlog::level::info,
                                "batch 512 fits (out of memory at 4096, 2048, 1024)"));
  // The cap is gone with the scope.
  auto whole = torch::empty({1536 * MiB}, torch::dtype(torch::kUInt8).device(torch::kCUDA));
  CHECK(whole.is_cuda());
#endif
}

// ---- Prefetcher ----------------------------------------------------------------------------

TEST_CASE("Prefetcher stages batches on the GPU from pinned memory on a side stream",
          "[async][prefetcher][cuda]") {
  if (skip_without_gpu()) return;
  torchguard::PrefetchOptions options;
  options.depth = 3;
  options.device = torch::Device(torch::kCUDA, 0);
  using Batch = torch::data::Example<>;
  torchguard::Prefetcher<Batch> batches(
      8,
      [](std::size_t index) {
        return Batch(torch::full({256, 1024}, static_cast<double>(index)),
                     torch::full({256}, static_cast<std::int64_t>(index)));
      },
      options);
  std::size_t expected = 0;
  for (auto& batch : batches) {
    REQUIRE(batch.data.is_cuda());
    REQUIRE(batch.target.is_cuda());
    // Compute on the consumer's stream reads the copied values.
    CHECK(batch.data.sum().item<double>() == 256.0 * 1024.0 * static_cast<double>(expected));
    CHECK(batch.target.max().item<std::int64_t>() == static_cast<std::int64_t>(expected));
    ++expected;
  }
  CHECK(expected == 8);
}

TEST_CASE("the Prefetcher's host-to-device copies overlap the consumer's compute (CUDA events)",
          "[async][prefetcher][cuda]") {
  if (skip_without_gpu()) return;
#if TORCHGUARD_WITH_CUDA
  // Compute sized to take as long as a copy: in sequence, a batch would take copy + compute.
  const auto figures = torchguard_bench::measure_prefetch_overlap(/*batches=*/12, /*batch_mib=*/64);
  INFO("per batch: copy " << figures.copy_ms << " ms, compute " << figures.compute_ms << " ms ("
                          << figures.matmuls << " matmuls), pipelined " << figures.pipelined_ms
                          << " ms; overlap " << figures.overlap());
  CHECK(figures.pipelined_ms < 0.8 * (figures.copy_ms + figures.compute_ms));
  CHECK(figures.overlap() > 0.75);
#endif
}

// ---- CheckpointGuard ---------------------------------------------------------------------------

TEST_CASE("a checkpoint saved on CUDA restores on the CPU and on CUDA with the same values and RNG",
          "[checkpoint][cuda]") {
  if (skip_without_gpu()) return;
  for (const bool background : {false, true}) {
    INFO((background ? "background save, overlapped with the next step" : "synchronous save"));
    TempDir dir;
    torch::manual_seed(11);
    torch::nn::Linear model(64, 32);
    model->to(torch::kCUDA);
    torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-2));
    const auto input = torch::randn({8, 64});
    auto train_step = [&](torch::nn::Linear& net, torch::optim::Optimizer& opt,
                          torchguard::CheckpointGuard* guard) {
      opt.zero_grad();
      net->forward(input.to(net->weight.device())).pow(2).sum().backward();
      if (guard) guard->before_optimizer_step();
      opt.step();
    };
    train_step(model, optimizer, nullptr);
    train_step(model, optimizer, nullptr);
    torchguard::CheckpointOptions options;
    options.directory = dir.path;
    options.save_on_exit = torchguard::SaveOnExit::never;
    options.background = background;
    options.logger = CapturedLogger().logger;
    std::vector<torch::Tensor> saved, after_one_step;
    torch::Tensor cuda_draw, cpu_draw;
    {
      torchguard::CheckpointGuard guard(model, optimizer, options);
      guard.save();
      saved = host_copies(model->parameters());
      // What follows the checkpoint: the next draws of both generators, and one more step
      // (changing the parameters while a background save may still be copying them).
      cuda_draw = torch::randn({16}, torch::kCUDA).cpu();
      cpu_draw = torch::randn({16});
      train_step(model, optimizer, &guard);
      after_one_step = host_copies(model->parameters());
      guard.wait();
    }
    for (const auto device : {torch::Device(torch::kCPU), torch::Device(torch::kCUDA, 0)}) {
      INFO("restored on " << device.str());
      torch::manual_seed(99);  // other parameters, other generator states
      torch::randn({3}, torch::kCUDA);
      torch::nn::Linear fresh(64, 32);
      torch::optim::Adam fresh_optimizer(fresh->parameters(), torch::optim::AdamOptions(1e-2));
      options.load_device = device;
      torchguard::CheckpointGuard restored(fresh, fresh_optimizer, options);
      REQUIRE(restored.resumed());
      CHECK(fresh->weight.device() == device);
      CHECK(bitwise_equal(fresh->parameters(), saved));
      CHECK(torch::randn({16}, torch::kCUDA).cpu().equal(cuda_draw));
      CHECK(torch::randn({16}).equal(cpu_draw));
      // The optimizer's state came back too: the next step lands where the original's did.
      train_step(fresh, fresh_optimizer, nullptr);
      const auto stepped = host_copies(fresh->parameters());
      for (std::size_t i = 0; i < stepped.size(); ++i) {
        CHECK(torch::allclose(stepped[i], after_one_step[i], 1e-4, 1e-5));  // CPU or CUDA math
      }
    }
  }
}

// ---- ProcessGroupGuard -------------------------------------------------------------------------

TEST_CASE("a one-rank NCCL group initialises and allreduces and tears down",
          "[distributed][cuda]") {
  if (skip_without_gpu()) return;
#if TORCHGUARD_WITH_NCCL
  TempDir dir;
  torchguard::ProcessGroupOptions options;
  options.rank = 0;
  options.world_size = 1;
  options.local_rank = 0;
  options.file_store = (dir.path / "store").string();
  options.backend = torchguard::DistributedBackend::nccl;
  options.logger = CapturedLogger().logger;
  torchguard::ProcessGroupGuard group(options);
  CHECK(std::string(group.backend_name()) == "nccl");
  CHECK(group.device() == torch::Device(torch::kCUDA, 0));
  std::vector<torch::Tensor> tensors{torch::full({1024}, 2.0, torch::kCUDA)};
  group.allreduce(tensors);
  CHECK(tensors[0].is_cuda());
  CHECK(tensors[0].sum().item<double>() == 2048.0);
  group.barrier();
  torch::nn::Linear model(8, 4);
  model->to(group.device());
  const auto before = host_copies(model->parameters());
  group.broadcast_parameters(*model);
  CHECK(bitwise_equal(before, model->parameters()));
  group.close();
#else
  std::cout << "SKIPPED: this LibTorch has no NCCL" << std::endl;
#endif
}
