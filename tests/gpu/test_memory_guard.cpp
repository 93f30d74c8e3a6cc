// gpu/memory_guard.hpp: GpuMemoryGuard on the CPU: the no-op path, and the accounting driven
// through a fake allocator (detail::AllocatorSource). On a GPU: tests/test_cuda.cpp.
#include "torchguard/gpu.hpp"

#include <atomic>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>

#include <torch/torch.h>

#include "gpu_support.hpp"

using torchguard::GpuMemoryGuard;
using torchguard::GpuMemoryOptions;
using torchguard::GpuMemoryStats;
using torchguard::testing::CapturedLogger;
using torchguard::testing::Contains;
using torchguard::testing::FakeBlock;
using torchguard::testing::FakeGpu;
using torchguard::testing::MiB;

namespace {

std::int64_t own_peak(const GpuMemoryStats& stats) {
  return stats.peak_allocated_bytes - stats.allocated_bytes_at_entry;
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

TEST_CASE("fake allocator: nested guards each report their own peak", "[gpu_memory][fake]") {
  FakeGpu gpu;
  FakeBlock resident(gpu.allocator, 10 * MiB);  // before the outer scope: not its peak
  GpuMemoryStats outer_stats, first_stats, second_stats, third_stats;
  {
    GpuMemoryGuard outer(gpu.options());
    { FakeBlock big(gpu.allocator, 128 * MiB); }
    {
      GpuMemoryGuard first(gpu.options());
      { FakeBlock small(gpu.allocator, 32 * MiB); }
      CHECK(own_peak(first.stats()) == 32 * MiB);  // while open, too
      first.close();
      first_stats = first.stats();
    }
    {
      GpuMemoryGuard second(gpu.options());
      FakeBlock kept(gpu.allocator, 8 * MiB);
      {
        GpuMemoryGuard third(gpu.options());  // nested twice
        { FakeBlock large(gpu.allocator, 200 * MiB); }
        third.close();
        third_stats = third.stats();
      }
      { FakeBlock medium(gpu.allocator, 64 * MiB); }
      second.close();
      second_stats = second.stats();
    }
    CHECK(own_peak(outer.stats()) == 208 * MiB);
    outer.close();
    outer_stats = outer.stats();
  }
  CHECK(first_stats.allocated_bytes_at_entry == 10 * MiB);
  CHECK(own_peak(first_stats) == 32 * MiB);
  CHECK(own_peak(third_stats) == 200 * MiB);
  CHECK(third_stats.allocated_bytes_at_entry == 18 * MiB);
  CHECK(own_peak(second_stats) == 208 * MiB);  // its 8 MiB kept, then its child's 200
  CHECK(second_stats.leaked_bytes == 8 * MiB);
  CHECK(own_peak(outer_stats) == 208 * MiB);
  CHECK(outer_stats.leaked_bytes == 0);
  CHECK(torchguard::detail::open_frames().empty());
}

TEST_CASE("fake allocator: guards that do not nest (two threads' order) keep the device's peaks",
          "[gpu_memory][fake]") {
  // A training thread's guard A and its child A2, and an inference worker's guard B, closing in
  // the order two threads may close them. Each sees every allocation made while it was open.
  FakeGpu gpu;
  std::optional<GpuMemoryGuard> a(std::in_place, gpu.options());
  { FakeBlock before_b(gpu.allocator, 16 * MiB); }
  std::optional<GpuMemoryGuard> b(std::in_place, gpu.options());
  std::optional<GpuMemoryGuard> a2(std::in_place, gpu.options());
  { FakeBlock of_b(gpu.allocator, 100 * MiB); }
  a2->close();
  { FakeBlock after_a2(gpu.allocator, 40 * MiB); }
  b->close();
  { FakeBlock after_b(gpu.allocator, 24 * MiB); }
  a->close();
  CHECK(own_peak(a2->stats()) == 100 * MiB);
  CHECK(own_peak(b->stats()) == 100 * MiB);
  CHECK(own_peak(a->stats()) == 100 * MiB);  // its child's segment, though B was opened later
  a.reset();
  b.reset();
  a2.reset();
  CHECK(torchguard::detail::open_frames().empty());
  // Without reset_peak, a guard reads the counter as it is: the peak since the last reset.
  GpuMemoryOptions options = gpu.options();
  options.reset_peak = false;
  { FakeBlock before_plain(gpu.allocator, 12 * MiB); }
  GpuMemoryGuard plain(options);
  { FakeBlock in_plain(gpu.allocator, 4 * MiB); }
  CHECK(plain.stats().peak_allocated_bytes == 12 * MiB);
  CHECK(torchguard::detail::open_frames().empty());
}

TEST_CASE("fake allocator: leak and fragmentation and emptied cache and the log line",
          "[gpu_memory][fake]") {
  FakeGpu gpu;
  GpuMemoryOptions options = gpu.options();
  options.label = "eval";
  options.leak_warning_bytes = 4 * MiB;
  options.empty_cache_on_exit = true;
  std::optional<FakeBlock> kept;
  GpuMemoryStats open_stats, closed_stats;
  {
    GpuMemoryGuard guard(options);
    { FakeBlock temporary(gpu.allocator, 63 * MiB); }  // 64 MiB reserved, then cached
    kept.emplace(gpu.allocator, 5 * MiB);
    open_stats = guard.stats();
  }
  CHECK(open_stats.reserved_bytes == 64 * MiB);
  CHECK(open_stats.fragmentation == 59.0 / 64.0);  // exact in binary
  CHECK(open_stats.peak_reserved_bytes == 64 * MiB);
  CHECK(gpu.captured.sink->contains(spdlog::level::warn,
                                    "GPU memory [eval] cuda:0: the scope left 5.0 MiB more"));
  CHECK(gpu.captured.sink->contains(spdlog::level::info,
                                    "peak 63.0 MiB allocated / 64.0 MiB "
                                    "reserved; now 5.0 MiB allocated (0 B at "
                                    "entry), 6.0 MiB reserved (17% "
                                    "fragmentation); leaked 5.0 MiB; 0 OOM"));
  CHECK(gpu.allocator.events.back() == "empty_cache");
  {
    GpuMemoryGuard guard(gpu.options());
    guard.close();
    closed_stats = guard.stats();
  }
  CHECK(closed_stats.reserved_bytes == 6 * MiB);  // the exit emptied the cache
  CHECK(closed_stats.leaked_bytes == 0);
}

TEST_CASE("fake allocator: the scope's device and memory fraction are restored at exit",
          "[gpu_memory][fake]") {
  FakeGpu gpu;
  GpuMemoryOptions options = gpu.options();
  options.device = 1;
  options.memory_fraction = 0.25;
  {
    GpuMemoryGuard guard(options);
    CHECK(gpu.allocator.current_device() == 1);
    CHECK_THROWS_AS(FakeBlock(gpu.allocator, 300 * MiB, 1), c10::OutOfMemoryError);
    FakeBlock fits(gpu.allocator, 200 * MiB, 1);
    CHECK(guard.stats().device == 1);
    CHECK(guard.stats().oom_events == 1);
    CHECK(own_peak(guard.stats()) == 200 * MiB);
  }
  CHECK(gpu.allocator.current_device() == 0);
  CHECK(gpu.allocator.events.back() == "fraction 1 on 1");
  FakeBlock whole(gpu.allocator, 300 * MiB, 1);  // the cap is gone
}

TEST_CASE(
    "fake allocator: an allocator error at close is thrown by close() and logged by the "
    "destructor",
    "[gpu_memory][fake][failure]") {
  FakeGpu gpu;
  GpuMemoryStats outer_stats;
  {
    GpuMemoryGuard outer(gpu.options());
    {
      GpuMemoryGuard failing(gpu.options());
      gpu.allocator.fail_reads = 1;
      CHECK_THROWS_WITH(failing.close(), Contains("illegal memory access"));
      failing.close();  // idempotent: the failed close ended it
    }
    {
      GpuMemoryGuard logged(gpu.options());
      gpu.allocator.fail_reads = 1;
    }  // the destructor logs what close() would have thrown
    CHECK(gpu.captured.sink->contains(spdlog::level::err,
                                      "GpuMemoryGuard: std::runtime_error: CUDA error"));
    { FakeBlock block(gpu.allocator, 20 * MiB); }
    outer.close();
    outer_stats = outer.stats();
  }
  CHECK(torchguard::detail::open_frames().empty());  // no frame left behind, none dangling
  CHECK(own_peak(outer_stats) == 20 * MiB);
}

TEST_CASE("fake allocator: a moved guard keeps its frame", "[gpu_memory][fake]") {
  FakeGpu gpu;
  GpuMemoryStats outer_stats, child_stats;
  {
    GpuMemoryGuard outer(gpu.options());
    {
      GpuMemoryGuard child(gpu.options());
      GpuMemoryGuard moved(std::move(child));
      { FakeBlock block(gpu.allocator, 48 * MiB); }
      child.close();  // moved from: nothing to close
      moved.close();
      child_stats = moved.stats();
    }
    outer.close();
    outer_stats = outer.stats();
  }
  CHECK(own_peak(child_stats) == 48 * MiB);
  CHECK(own_peak(outer_stats) == 48 * MiB);
  CHECK(torchguard::detail::open_frames().empty());
}

TEST_CASE("fake allocator: guards on two threads are race-free and each sees its scope's peak",
          "[gpu_memory][fake][threads]") {
  // A training thread and an inference worker, each with nested guards, opening and closing in
  // any order (run under ThreadSanitizer in CI).
  FakeGpu gpu;
  std::atomic<int> violations{0};
  auto work = [&](std::uint32_t seed, std::int64_t unit) {
    std::mt19937 random(seed);
    for (int round = 0; round < 200; ++round) {
      GpuMemoryGuard outer(gpu.options());
      const std::int64_t mine = unit * (1 + random() % 4);
      GpuMemoryStats child;
      {
        GpuMemoryGuard inner(gpu.options());
        FakeBlock block(gpu.allocator, mine);
        if (random() % 2) std::this_thread::yield();
        inner.close();
        child = inner.stats();
      }
      outer.close();
      const auto stats = outer.stats();
      // The device held at least this thread's block while the child was open; the parent was
      // open all that time.
      if (child.peak_allocated_bytes < mine) ++violations;
      if (stats.peak_allocated_bytes < child.peak_allocated_bytes) ++violations;
      if (stats.peak_allocated_bytes > 8 * unit) ++violations;  // both threads' largest blocks
    }
  };
  std::thread training(work, 1u, 1 * MiB);
  std::thread inference(work, 2u, 1 * MiB);
  training.join();
  inference.join();
  CHECK(violations == 0);
  CHECK(torchguard::detail::open_frames().empty());
}
