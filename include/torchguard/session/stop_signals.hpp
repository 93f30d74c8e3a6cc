// SIGINT/SIGTERM turned into a stop flag for the length of a scope.
#pragma once

#include <signal.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <iterator>
#include <mutex>
#include <stdexcept>
#include <string>

#include <spdlog/fmt/fmt.h>

#include "torchguard/core/error.hpp"

namespace torchguard {
namespace detail {

static_assert(std::atomic<int>::is_always_lock_free,
              "the stop flag is written from a signal handler: it must be lock-free");

// The signal that asked for a stop (0: none). Written only by the handler and at install time.
inline std::atomic<int> stop_signal_received{0};

extern "C" inline void torchguard_stop_signal_handler(int signal_number) {
  // Only async-signal-safe work here: an atomic exchange, signal() and raise().
  if (stop_signal_received.exchange(signal_number) != 0) {
    // A second signal: the user means it. Take the default action (terminate).
    ::signal(signal_number, SIG_DFL);
    ::raise(signal_number);
  }
}

inline const char* signal_name(int signal_number) noexcept {
  switch (signal_number) {
    case SIGINT:
      return "SIGINT";
    case SIGTERM:
      return "SIGTERM";
    default:
      return "signal";
  }
}

// Installs the stop handler for SIGINT and SIGTERM and puts the previous handlers back when
// destroyed. Nested installs restore in LIFO order; the flag is cleared by the outermost one.
// A signal inherited as ignored (nohup, a background job of a non-interactive shell) stays
// ignored, as POSIX programs do.
class StopSignalScope {
 public:
  StopSignalScope() {
    std::lock_guard<std::mutex> lock(mutex());
    if (depth()++ == 0) stop_signal_received.store(0);
    struct sigaction action {};
    action.sa_handler = torchguard_stop_signal_handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;  // a signal must not make the training loop's I/O fail
    for (Slot& slot : slots_) {
      if (::sigaction(slot.signal, nullptr, &slot.previous) != 0) fail(errno);
      slot.ignored = slot.previous.sa_handler == SIG_IGN;
      if (!slot.ignored && ::sigaction(slot.signal, &action, nullptr) != 0) fail(errno);
      slot.installed = !slot.ignored;
    }
  }
  ~StopSignalScope() {
    std::lock_guard<std::mutex> lock(mutex());
    restore();
    --depth();
  }
  StopSignalScope(const StopSignalScope&) = delete;
  StopSignalScope& operator=(const StopSignalScope&) = delete;

  // The signal received since the outermost scope began, or 0.
  static int received() noexcept { return stop_signal_received.load(); }

  // "SIGINT", "SIGINT and SIGTERM": the signals left ignored because they were ignored at entry.
  std::string left_ignored() const {
    std::string names;
    for (const Slot& slot : slots_) {
      if (slot.ignored)
        names += fmt::format("{}{}", names.empty() ? "" : " and ", signal_name(slot.signal));
    }
    return names;
  }

 private:
  struct Slot {
    int signal;
    struct sigaction previous {};
    bool ignored = false;
    bool installed = false;
  };

  void restore() noexcept {
    for (auto it = std::rbegin(slots_); it != std::rend(slots_); ++it) {
      if (it->installed) ::sigaction(it->signal, &it->previous, nullptr);
      it->installed = false;
    }
  }
  [[noreturn]] void fail(int error) {
    restore();
    --depth();
    throw Error(fmt::format("TrainingSession: cannot install the SIGINT/SIGTERM handler: {}",
                            std::strerror(error)));
  }

  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static int& depth() {
    static int d = 0;
    return d;
  }
  Slot slots_[2] = {{SIGINT}, {SIGTERM}};
};

}  // namespace detail
}  // namespace torchguard
