#include "torchguard/gpu_memory_guard.hpp"

#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/torch.h>
#if TORCHGUARD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include "support.hpp"

using torchguard::GpuMemoryGuard;
using torchguard::GpuMemoryOptions;
using torchguard::OutOfMemoryRetryError;
using torchguard::retry_on_oom;
using torchguard::RetryOnOomOptions;
using torchguard::testing::CapturedLogger;
using torchguard::testing::Contains;

namespace {

[[noreturn]] void throw_oom(const std::string& what) {
  throw c10::OutOfMemoryError({__func__, __FILE__, static_cast<std::uint32_t>(__LINE__)},
                              "CUDA out of memory. " + what);
}

}  // namespace

TEST_CASE("without a GPU the guard is a no-op that says so once", "[gpu_memory]") {
  if (torchguard::detail::cuda_usable()) return;  // the [cuda] tests cover that machine
  CapturedLogger captured;
  torchguard::set_default_logger(captured.logger);
  {
    GpuMemoryGuard first;
    GpuMemoryGuard second(GpuMemoryOptions{});
    CHECK_FALSE(first.stats().available);
    CHECK(first.stats().peak_allocated_bytes == 0);
    GpuMemoryGuard moved(std::move(second));
    moved.close(torchguard::Outcome::success);
    CHECK_FALSE(torchguard::cuda_available());
  }
  torchguard::set_default_logger(nullptr);
  // Said at most once per process (maybe already by an earlier test): never twice here.
  CHECK(captured.sink->count(spdlog::level::info) <= 1);
  CHECK(captured.sink->count(spdlog::level::warn) == 0);
}

TEST_CASE("retry_on_oom halves the batch until it fits", "[gpu_memory][oom]") {
  CapturedLogger captured;
  RetryOnOomOptions options;
  options.logger = captured.logger;
  std::vector<std::int64_t> calls;
  const auto result = retry_on_oom(
      256,
      [&](std::int64_t batch) {
        calls.push_back(batch);
        if (batch > 40) throw_oom("Tried to allocate 2.00 GiB");
        return batch * 10;
      },
      options);
  CHECK(result == 320);
  CHECK(calls == std::vector<std::int64_t>{256, 128, 64, 32});
  CHECK(
      captured.sink->contains(spdlog::level::warn, "out of memory at batch 256; retrying at 128"));
}

TEST_CASE("retry_on_oom takes the user's shrink function and a minimum", "[gpu_memory][oom]") {
  RetryOnOomOptions options;
  options.logger = CapturedLogger().logger;
  options.shrink = [](std::int64_t batch) { return batch - 100; };
  options.minimum_batch = 150;
  std::vector<std::int64_t> calls;
  try {
    retry_on_oom(
        500,
        [&](std::int64_t batch) -> int {
          calls.push_back(batch);
          throw_oom("Tried to allocate 1.00 GiB");
        },
        options);
    FAIL("expected OutOfMemoryRetryError");
  } catch (const OutOfMemoryRetryError& e) {
    // 200 - 100 is below the minimum: the minimum itself is tried last.
    CHECK(e.batch_sizes_tried() == std::vector<std::int64_t>{500, 400, 300, 200, 150});
    CHECK_THAT(std::string(e.what()), Contains("500, 400, 300, 200, 150") &&
                                          Contains("minimum 150") &&
                                          Contains("Tried to allocate 1.00 GiB"));
  }
  CHECK(calls.size() == 5);
}

TEST_CASE("retry_on_oom treats an old-style CUDA out-of-memory c10::Error as OOM",
          "[gpu_memory][oom]") {
  RetryOnOomOptions options;
  options.logger = CapturedLogger().logger;
  int calls = 0;
  const int result = retry_on_oom(
      8,
      [&](std::int64_t batch) {
        ++calls;
        if (batch == 8) {
          throw c10::Error({__func__, __FILE__, static_cast<std::uint32_t>(__LINE__)},
                           "CUDA out of memory. Tried to allocate 20.00 MiB");
        }
        return static_cast<int>(batch);
      },
      options);
  CHECK(result == 4);
  CHECK(calls == 2);
}

TEST_CASE("retry_on_oom lets other errors through unchanged", "[gpu_memory][oom]") {
  int calls = 0;
  CHECK_THROWS_AS(retry_on_oom(64,
                               [&](std::int64_t) -> int {
                                 ++calls;
                                 throw std::domain_error("bad input");
                               }),
                  std::domain_error);
  CHECK(calls == 1);
  CHECK_THROWS_WITH(retry_on_oom(0, [](std::int64_t b) { return b; }), Contains("at least"));
}

// ---- on a GPU ---------------------------------------------------------------------------

#if !TORCHGUARD_WITH_CUDA
TEST_CASE("GPU memory figures on a GPU", "[gpu_memory][cuda]") {
  std::cout << "SKIPPED: this LibTorch has no CUDA support" << std::endl;
}
#else
namespace {

// ctest reports a test that prints this as skipped (SKIP_REGULAR_EXPRESSION).
bool skip_without_gpu() {
  if (torchguard::detail::cuda_usable()) return false;
  std::cout << "SKIPPED: no CUDA device (or a CPU-only LibTorch)" << std::endl;
  return true;
}

constexpr std::int64_t MiB = 1 << 20;

}  // namespace

TEST_CASE("known allocations give exact allocated, peak and leak figures", "[gpu_memory][cuda]") {
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

TEST_CASE("an out-of-memory retry from a huge batch converges", "[gpu_memory][cuda]") {
  if (skip_without_gpu()) return;
  const auto free_total = [] {
    std::size_t free_bytes = 0, total = 0;
    cudaMemGetInfo(&free_bytes, &total);
    return static_cast<std::int64_t>(total);
  }();
  RetryOnOomOptions options;
  options.logger = CapturedLogger().logger;
  // 1 KiB per sample; the first batch asks for 4x the device's memory.
  const std::int64_t fitted = retry_on_oom(
      4 * free_total / 1024,
      [](std::int64_t batch) {
        auto t = torch::empty({batch, 1024}, torch::dtype(torch::kUInt8).device(torch::kCUDA));
        return batch;
      },
      options);
  CHECK(fitted * 1024 < free_total);
  CHECK(fitted * 1024 > free_total / 8);
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
#endif  // TORCHGUARD_WITH_CUDA
