// What the tests of gpu/ share (tests/gpu/): a fake caching allocator in place of CUDA's, so that
// GpuMemoryGuard's accounting and retry_on_oom run on the CPU.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "support.hpp"
#include "torchguard/gpu.hpp"

namespace torchguard::testing {

// Throws what CUDA's allocator throws when it is out of memory.
[[noreturn]] inline void throw_oom(const std::string& what) {
  throw c10::OutOfMemoryError({__func__, __FILE__, static_cast<std::uint32_t>(__LINE__)},
                              "CUDA out of memory. " + what);
}

inline constexpr std::int64_t MiB = 1 << 20;

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

}  // namespace torchguard::testing
