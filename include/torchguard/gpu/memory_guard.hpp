// GpuMemoryGuard: per-scope CUDA memory accounting, what torch.cuda.memory_* gives Python, per
// scope.
//
//   torchguard::GpuMemoryOptions options;
//   options.label = "forward";
//   {
//     torchguard::GpuMemoryGuard memory(options);
//     auto out = model->forward(batch);
//   }  // logs: "GPU memory [forward] cuda:0: peak 1.20 GiB allocated, ... leaked 0 B"
//
// LibTorch's peak counter is process-wide; nested guards still report their own peaks: at each
// guard's entry and exit the counter is folded into the running peak of every guard open on that
// device, then reset. A guard's peak is the device's peak while it was open, on any thread: guards
// on a training thread and an inference worker may open and close in any order. That resets
// LibTorch's peak counter (what max_memory_allocated reads); `reset_peak = false` leaves it
// alone, and peaks are then the process's since its last reset.
// On a CPU-only LibTorch, or without a GPU, the guard is a cheap no-op that says so once.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "torchguard/core/error.hpp"
#include "torchguard/core/guard.hpp"
#include "torchguard/core/logging.hpp"
#include "torchguard/core/outcome.hpp"
#include "torchguard/gpu/cuda_memory.hpp"

namespace torchguard {

// True when this build has CUDA code paths and a GPU is present.
inline bool cuda_available() { return detail::cuda_usable(); }

struct GpuMemoryOptions {
  std::optional<int> device;          // the CUDA device for the scope (restored at exit)
  bool empty_cache_on_entry = false;  // synchronizes the device: opt-in
  bool empty_cache_on_exit = false;   // synchronizes the device: opt-in
  bool reset_peak = true;             // per-scope peaks (resets LibTorch's peak counter)
  std::string label;                  // names the scope in the log line
  std::shared_ptr<spdlog::logger> logger;
  std::int64_t leak_warning_bytes = 1 << 20;  // warn when the scope leaves more allocated
  std::optional<double> memory_fraction;      // cap for the scope (restored to 1.0 at exit)
};

struct GpuMemoryStats {
  bool available = false;  // false: CPU-only LibTorch or no GPU; every figure is 0
  int device = -1;
  std::int64_t allocated_bytes_at_entry = 0;
  std::int64_t allocated_bytes = 0;  // now
  std::int64_t reserved_bytes_at_entry = 0;
  std::int64_t reserved_bytes = 0;        // now
  std::int64_t peak_allocated_bytes = 0;  // inside the scope
  std::int64_t peak_reserved_bytes = 0;   // inside the scope
  std::int64_t leaked_bytes = 0;          // allocated now minus at entry
  double fragmentation = 0;               // (reserved - allocated) / reserved, now
  std::int64_t oom_events = 0;            // inside the scope
  std::int64_t alloc_retries = 0;         // inside the scope (cache flushed to satisfy a malloc)
};

namespace detail {

inline std::string format_bytes(std::int64_t bytes) {
  const double magnitude = static_cast<double>(bytes < 0 ? -bytes : bytes);
  if (magnitude >= double(1 << 30)) return fmt::format("{:.2f} GiB", bytes / double(1 << 30));
  if (magnitude >= double(1 << 20)) return fmt::format("{:.1f} MiB", bytes / double(1 << 20));
  if (magnitude >= 1024) return fmt::format("{:.1f} KiB", bytes / 1024.0);
  return fmt::format("{} B", bytes);
}

// The guards open with reset_peak, each with the highest peak seen by the counter's segments
// during its life so far. A segment runs from one reset of the counter to the next; every reset
// happens at a guard's entry or exit, under peak_mutex(), after folding the segment's peak into
// every guard open on that allocator and device. (An allocation made and freed on another thread
// between a guard's read and its reset is not seen: the allocator offers no atomic read-and-reset.)
struct PeakFrame {
  AllocatorSource* source;
  int device;
  std::int64_t running_peak_allocated;
  std::int64_t running_peak_reserved;
};

inline std::mutex& peak_mutex() {
  static std::mutex mutex;
  return mutex;
}
inline std::vector<PeakFrame*>& open_frames() {
  static std::vector<PeakFrame*> frames;
  return frames;
}

// Ends the counter's segment on (source, device): its peak goes to every open frame there, and
// the counter restarts. Call with peak_mutex() held.
inline AllocatorCounters end_segment(AllocatorSource& source, int device) {
  const auto counters = source.read(device);
  for (PeakFrame* frame : open_frames()) {
    if (frame->source != &source || frame->device != device) continue;
    frame->running_peak_allocated =
        std::max(frame->running_peak_allocated, counters.peak_allocated_bytes);
    frame->running_peak_reserved =
        std::max(frame->running_peak_reserved, counters.peak_reserved_bytes);
  }
  source.reset_peaks(device);
  return counters;
}

inline void say_unavailable_once(const std::shared_ptr<spdlog::logger>& logger) {
  static std::atomic<bool> said{false};
  if (said.exchange(true)) return;
  logger->info(
      "GpuMemoryGuard: {}: GPU memory guards do nothing in this process",
      built_with_cuda ? "no CUDA device is available" : "this LibTorch has no CUDA support");
}

// An open GpuMemoryGuard's scope on a usable allocator: the device it selected, the counters at
// entry, its running peaks (the frame in open_frames()), and the figures at exit.
struct GpuMemoryScope {
  static constexpr const char* close_error_prefix = "GpuMemoryGuard";

  GpuMemoryScope(GpuMemoryOptions scope_options, AllocatorSource& allocator)
      : options(std::move(scope_options)),
        logger(or_default(options.logger)),
        source(&allocator),
        previous_device(source->current_device()),
        device(options.device.value_or(previous_device)) {
    if (device != previous_device) source->set_device(device);
    if (options.memory_fraction) source->set_memory_fraction(*options.memory_fraction, device);
    if (options.empty_cache_on_entry) source->empty_cache();
    if (!options.reset_peak) {
      entry = source->read(device);
      return;
    }
    std::lock_guard<std::mutex> lock(peak_mutex());
    entry = end_segment(*source, device);  // the open guards' segment ends here
    frame = PeakFrame{source, device, entry.allocated_bytes, entry.reserved_bytes};
    open_frames().push_back(&frame);  // last: nothing throws once the frame is listed
    linked = true;
  }

  GpuMemoryScope(const GpuMemoryScope&) = delete;
  GpuMemoryScope& operator=(const GpuMemoryScope&) = delete;

  // The frame leaves the list even when close() failed before it got there: never dangling.
  ~GpuMemoryScope() {
    if (!linked) return;
    std::lock_guard<std::mutex> lock(peak_mutex());
    unlink();
  }

  // See GpuMemoryGuard::close.
  void close(Outcome) {
    if (closed) return;
    closed = true;
    if (options.empty_cache_on_exit) source->empty_cache();
    if (options.reset_peak) {
      std::lock_guard<std::mutex> lock(peak_mutex());
      AllocatorCounters now;
      try {
        // The segment ends for every open guard, this one included; the others measure on.
        now = end_segment(*source, device);
      } catch (...) {
        unlink();
        throw;
      }
      unlink();
      final_stats = figures(now, frame.running_peak_allocated, frame.running_peak_reserved);
    } else {
      final_stats = stats();
    }
    log_line(*final_stats);
    if (options.memory_fraction) source->set_memory_fraction(1.0, device);
    if (device != previous_device) source->set_device(previous_device);
  }

  // See GpuMemoryGuard::stats.
  GpuMemoryStats stats() const {
    if (final_stats) return *final_stats;
    if (!options.reset_peak) {
      const auto now = source->read(device);
      return figures(now, now.peak_allocated_bytes, now.peak_reserved_bytes);
    }
    std::lock_guard<std::mutex> lock(peak_mutex());
    const auto now = source->read(device);
    return figures(now, std::max(frame.running_peak_allocated, now.peak_allocated_bytes),
                   std::max(frame.running_peak_reserved, now.peak_reserved_bytes));
  }

  GpuMemoryOptions options;
  std::shared_ptr<spdlog::logger> logger;
  AllocatorSource* source;
  int previous_device;
  int device;
  AllocatorCounters entry;
  PeakFrame frame{};  // with reset_peak: in open_frames() while `linked`
  bool linked = false;
  bool closed = false;
  std::optional<GpuMemoryStats> final_stats;

 private:
  // Takes the frame off the open list. Call with peak_mutex() held.
  void unlink() noexcept {
    if (!linked) return;
    auto& frames = open_frames();
    frames.erase(std::remove(frames.begin(), frames.end(), &frame), frames.end());
    linked = false;
  }

  GpuMemoryStats figures(const AllocatorCounters& now, std::int64_t peak_allocated,
                         std::int64_t peak_reserved) const {
    GpuMemoryStats s;
    s.available = true;
    s.device = device;
    s.allocated_bytes_at_entry = entry.allocated_bytes;
    s.reserved_bytes_at_entry = entry.reserved_bytes;
    s.allocated_bytes = now.allocated_bytes;
    s.reserved_bytes = now.reserved_bytes;
    s.peak_allocated_bytes = peak_allocated;
    s.peak_reserved_bytes = peak_reserved;
    s.leaked_bytes = now.allocated_bytes - entry.allocated_bytes;
    s.fragmentation = now.reserved_bytes > 0
                          ? double(now.reserved_bytes - now.allocated_bytes) / now.reserved_bytes
                          : 0.0;
    s.oom_events = now.oom_events - entry.oom_events;
    s.alloc_retries = now.alloc_retries - entry.alloc_retries;
    return s;
  }

  void log_line(const GpuMemoryStats& s) const {
    const std::string label = options.label.empty() ? "" : fmt::format(" [{}]", options.label);
    logger->info(
        "GPU memory{} cuda:{}: peak {} allocated / {} reserved; now {} allocated ({} at entry), "
        "{} reserved ({:.0f}% fragmentation); leaked {}; {} OOM, {} allocator retries",
        label, s.device, format_bytes(s.peak_allocated_bytes), format_bytes(s.peak_reserved_bytes),
        format_bytes(s.allocated_bytes), format_bytes(s.allocated_bytes_at_entry),
        format_bytes(s.reserved_bytes), s.fragmentation * 100, format_bytes(s.leaked_bytes),
        s.oom_events, s.alloc_retries);
    if (s.leaked_bytes > options.leak_warning_bytes) {
      logger->warn("GPU memory{} cuda:{}: the scope left {} more allocated than at its entry",
                   label, s.device, format_bytes(s.leaked_bytes));
    }
  }
};

}  // namespace detail

class GpuMemoryGuard {
 public:
  using Options = GpuMemoryOptions;

  // Without a usable allocator (CPU-only LibTorch, no GPU) the guard holds nothing.
  explicit GpuMemoryGuard(Options options = {}) : s_(open(std::move(options))) {}

  // The destructor (and a move assignment, for the scope the guard held) logs the scope's
  // figures, restores the device and the memory fraction. Never throws.
  GpuMemoryGuard(GpuMemoryGuard&&) noexcept = default;
  GpuMemoryGuard& operator=(GpuMemoryGuard&&) noexcept = default;

  // Ends the scope now (idempotent): final figures, log line, device and fraction restored.
  void close(Outcome outcome = Outcome::success) { s_.close(outcome); }

  // The figures now (after close(): the figures at exit).
  GpuMemoryStats stats() const { return s_ ? s_->stats() : GpuMemoryStats{}; }

 private:
  static std::unique_ptr<detail::GpuMemoryScope> open(Options options) {
    auto& source = detail::allocator_source();
    if (!source.usable()) {
      detail::say_unavailable_once(detail::or_default(options.logger));
      return nullptr;
    }
    return std::make_unique<detail::GpuMemoryScope>(std::move(options), source);
  }

  detail::GuardState<detail::GpuMemoryScope> s_;
};

}  // namespace torchguard
