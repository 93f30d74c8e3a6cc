// GpuMemoryGuard and retry_on_oom on the CPU: the no-op path, and the accounting driven through
// a fake allocator (detail::AllocatorSource). On a GPU: tests/test_cuda.cpp.
#include "torchguard/gpu.hpp"

#include <atomic>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include "support.hpp"

using torchguard::GpuMemoryGuard;
using torchguard::GpuMemoryOptions;
using torchguard::GpuMemoryStats;
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

constexpr std::int64_t MiB = 1 << 20;

// A caching allocator in miniature, for GpuMemoryGuard's accounting on the CPU: allocations are
// reserved in 2 MiB blocks and stay reserved when freed until empty_cache(); a memory fraction
// caps what may be reserved (1 GiB per device in all), past which an allocation fails as CUDA's
// does (c10::OutOfMemoryError, counted). Thread-safe, as the real one is. `events` records the
// calls that matter to retry_on_oom, in order.
class FakeAllocator final : public torchguard::detail::AllocatorSource {
 public:
  static constexpr std::int64_t block = 2 * MiB;
  static constexpr std::int64_t total = 1024 * MiB;

  bool usable() override { return true; }
  torchguard::detail::AllocatorCounters read(int device) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (fail_reads > 0) {
      --fail_reads;
      throw std::runtime_error("CUDA error: an illegal memory access was encountered");
    }
    return devices_[device];
  }
  void reset_peaks(int device) override {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& d = devices_[device];
    d.peak_allocated_bytes = d.allocated_bytes;
    d.peak_reserved_bytes = d.reserved_bytes;
  }
  void empty_cache() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [index, d] : devices_) d.reserved_bytes = round_up(d.allocated_bytes);
    events.push_back("empty_cache");
  }
  void set_memory_fraction(double fraction, int device) override {
    std::lock_guard<std::mutex> lock(mutex_);
    limits_[device] = static_cast<std::int64_t>(fraction * static_cast<double>(total));
    events.push_back(fmt::format("fraction {} on {}", fraction, device));
  }
  int current_device() override { return current_; }
  void set_device(int device) override { current_ = device; }

  void allocate(std::int64_t bytes, int device = 0) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& d = devices_[device];
    const std::int64_t reserved = std::max(d.reserved_bytes, round_up(d.allocated_bytes + bytes));
    const auto limit = limits_.find(device);
    if (reserved > (limit == limits_.end() ? total : limit->second)) {
      ++d.oom_events;
      events.push_back(fmt::format("out of memory at {} MiB", bytes / MiB));
      throw_oom(fmt::format("Tried to allocate {} MiB", bytes / MiB));
    }
    d.allocated_bytes += bytes;
    d.reserved_bytes = reserved;
    d.peak_allocated_bytes = std::max(d.peak_allocated_bytes, d.allocated_bytes);
    d.peak_reserved_bytes = std::max(d.peak_reserved_bytes, d.reserved_bytes);
    events.push_back(fmt::format("allocate {} MiB", bytes / MiB));
  }
  void free(std::int64_t bytes, int device = 0) {
    std::lock_guard<std::mutex> lock(mutex_);
    devices_[device].allocated_bytes -= bytes;
  }

  std::vector<std::string> events;  // read when no other thread uses the allocator
  int fail_reads = 0;               // the next reads throw, as a CUDA error would

 private:
  static std::int64_t round_up(std::int64_t bytes) { return (bytes + block - 1) / block * block; }

  std::mutex mutex_;
  std::map<int, torchguard::detail::AllocatorCounters> devices_;
  std::map<int, std::int64_t> limits_;
  std::atomic<int> current_{0};
};

// An allocation on the fake allocator, freed at the end of its scope.
class FakeBlock {
 public:
  FakeBlock(FakeAllocator& allocator, std::int64_t bytes, int device = 0)
      : allocator_(allocator), bytes_(bytes), device_(device) {
    allocator_.allocate(bytes_, device_);
  }
  ~FakeBlock() { allocator_.free(bytes_, device_); }
  FakeBlock(const FakeBlock&) = delete;
  FakeBlock& operator=(const FakeBlock&) = delete;

 private:
  FakeAllocator& allocator_;
  std::int64_t bytes_;
  int device_;
};

// A fake allocator in place of CUDA's for the test, with quiet guards.
struct FakeGpu {
  FakeAllocator allocator;
  torchguard::detail::ScopedAllocatorSource installed{allocator};
  CapturedLogger captured;
  GpuMemoryOptions options() const {
    GpuMemoryOptions options;
    options.logger = captured.logger;
    return options;
  }
};

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
  CHECK(captured.sink->contains(spdlog::level::info,
                                "batch 32 fits (out of memory at 256, 128, 64)"));
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

// ---- the accounting, on a fake allocator ---------------------------------------------------

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

TEST_CASE("fake allocator: retry_on_oom catches the OOM then frees the cache and shrinks the batch",
          "[gpu_memory][fake][oom]") {
  FakeGpu gpu;
  GpuMemoryOptions scope = gpu.options();
  scope.memory_fraction = 0.25;  // 256 MiB
  GpuMemoryGuard guard(scope);
  gpu.allocator.events.clear();
  RetryOnOomOptions options;
  options.logger = gpu.captured.logger;
  // A step: activations of batch/4 MiB, then batch MiB for the batch itself.
  const auto fitted = retry_on_oom(
      1024,
      [&](std::int64_t batch) {
        FakeBlock activations(gpu.allocator, batch / 4 * MiB);
        FakeBlock data(gpu.allocator, batch * MiB);
        return batch;
      },
      options);
  CHECK(fitted == 128);
  CHECK(gpu.allocator.events ==
        std::vector<std::string>{"allocate 256 MiB", "out of memory at 1024 MiB", "empty_cache",
                                 "allocate 128 MiB", "out of memory at 512 MiB", "empty_cache",
                                 "allocate 64 MiB", "out of memory at 256 MiB", "empty_cache",
                                 "allocate 32 MiB", "allocate 128 MiB"});
  CHECK(guard.stats().oom_events == 3);
  CHECK(gpu.captured.sink->contains(spdlog::level::info,
                                    "batch 128 fits (out of memory at 1024, 512, 256)"));
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
