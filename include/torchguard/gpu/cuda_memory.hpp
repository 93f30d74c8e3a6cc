// Version shim over LibTorch's CUDA caching allocator: the calls that exist from 1.13 to 2.x
// (getDeviceStats, index 0 of each stat array for the aggregate, resetPeakStats, emptyCache,
// setMemoryFraction). Compiled only against a CUDA-enabled LibTorch (TORCHGUARD_WITH_CUDA).
// GpuMemoryGuard and retry_on_oom reach it through one seam, AllocatorSource, so that tests
// drive their accounting with a fake allocator on a machine without a GPU.
#pragma once

#include <atomic>
#include <cstdint>

#include <torch/torch.h>

#include "torchguard/version.hpp"

#if TORCHGUARD_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace torchguard {
namespace detail {

// The allocator's counters for one device, as plain numbers.
struct AllocatorCounters {
  std::int64_t allocated_bytes = 0;
  std::int64_t reserved_bytes = 0;
  std::int64_t peak_allocated_bytes = 0;  // since the last resetPeakStats
  std::int64_t peak_reserved_bytes = 0;
  std::int64_t oom_events = 0;
  std::int64_t alloc_retries = 0;
};

// True when CUDA code paths are compiled in and a GPU is present.
inline bool cuda_usable() {
#if TORCHGUARD_WITH_CUDA
  return torch::cuda::is_available();
#else
  return false;
#endif
}

#if TORCHGUARD_WITH_CUDA
inline AllocatorCounters read_counters(int device) {
  const auto stats =
      c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
  constexpr std::size_t aggregate = 0;  // StatType::AGGREGATE in every version
  AllocatorCounters counters;
  counters.allocated_bytes = stats.allocated_bytes[aggregate].current;
  counters.reserved_bytes = stats.reserved_bytes[aggregate].current;
  counters.peak_allocated_bytes = stats.allocated_bytes[aggregate].peak;
  counters.peak_reserved_bytes = stats.reserved_bytes[aggregate].peak;
  counters.oom_events = stats.num_ooms;
  counters.alloc_retries = stats.num_alloc_retries;
  return counters;
}

inline void reset_peaks(int device) {
  c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
}

inline void empty_cache() {
  c10::cuda::device_synchronize();  // blocks still in use by queued kernels are not freed
  c10::cuda::CUDACachingAllocator::emptyCache();
}

inline void set_memory_fraction(double fraction, int device) {
  c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction,
                                                     static_cast<c10::DeviceIndex>(device));
}

inline int current_device() { return static_cast<int>(c10::cuda::current_device()); }
inline void set_device(int device) { c10::cuda::set_device(static_cast<c10::DeviceIndex>(device)); }
#else
inline AllocatorCounters read_counters(int) { return {}; }
inline void reset_peaks(int) {}
inline void empty_cache() {}
inline void set_memory_fraction(double, int) {}
inline int current_device() { return 0; }
inline void set_device(int) {}
#endif

// Everything GpuMemoryGuard and retry_on_oom ask of the allocator. Implementations are called
// from any thread.
class AllocatorSource {
 public:
  virtual ~AllocatorSource() = default;
  virtual bool usable() = 0;  // false: the guards are no-ops
  virtual AllocatorCounters read(int device) = 0;
  virtual void reset_peaks(int device) = 0;
  virtual void empty_cache() = 0;
  virtual void set_memory_fraction(double fraction, int device) = 0;
  virtual int current_device() = 0;
  virtual void set_device(int device) = 0;
};

// LibTorch's CUDA caching allocator.
class CudaAllocatorSource final : public AllocatorSource {
 public:
  bool usable() override { return cuda_usable(); }
  AllocatorCounters read(int device) override { return read_counters(device); }
  void reset_peaks(int device) override { detail::reset_peaks(device); }
  void empty_cache() override { detail::empty_cache(); }
  void set_memory_fraction(double fraction, int device) override {
    detail::set_memory_fraction(fraction, device);
  }
  int current_device() override { return detail::current_device(); }
  void set_device(int device) override { detail::set_device(device); }
};

inline std::atomic<AllocatorSource*>& allocator_source_slot() {
  static CudaAllocatorSource cuda;
  static std::atomic<AllocatorSource*> slot{&cuda};
  return slot;
}

// The source guards created now use: LibTorch's CUDA allocator unless a test replaced it.
inline AllocatorSource& allocator_source() { return *allocator_source_slot().load(); }

// Replaces the allocator source for its lifetime (tests). Guards keep the source they began with.
class ScopedAllocatorSource {
 public:
  explicit ScopedAllocatorSource(AllocatorSource& source)
      : previous_(allocator_source_slot().exchange(&source)) {}
  ~ScopedAllocatorSource() { allocator_source_slot().store(previous_); }
  ScopedAllocatorSource(const ScopedAllocatorSource&) = delete;
  ScopedAllocatorSource& operator=(const ScopedAllocatorSource&) = delete;

 private:
  AllocatorSource* previous_;
};

}  // namespace detail
}  // namespace torchguard
