// SIGINT/SIGTERM turned into a stop flag for the length of a scope.
#pragma once

#include <signal.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

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
class StopSignalScope {
 public:
  StopSignalScope() {
    std::lock_guard<std::mutex> lock(mutex());
    if (depth()++ == 0) stop_signal_received.store(0);
    struct sigaction action {};
    action.sa_handler = torchguard_stop_signal_handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;  // a signal must not make the training loop's I/O fail
    if (::sigaction(SIGINT, &action, &previous_interrupt_) != 0 ||
        ::sigaction(SIGTERM, &action, &previous_terminate_) != 0) {
      const int error = errno;
      ::sigaction(SIGINT, &previous_interrupt_, nullptr);
      --depth();
      throw std::runtime_error(std::string("cannot install the SIGINT/SIGTERM handler: ") +
                               std::strerror(error));
    }
  }
  ~StopSignalScope() {
    std::lock_guard<std::mutex> lock(mutex());
    ::sigaction(SIGTERM, &previous_terminate_, nullptr);
    ::sigaction(SIGINT, &previous_interrupt_, nullptr);
    --depth();
  }
  StopSignalScope(const StopSignalScope&) = delete;
  StopSignalScope& operator=(const StopSignalScope&) = delete;

  // The signal received since the outermost scope began, or 0.
  static int received() noexcept { return stop_signal_received.load(); }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static int& depth() {
    static int d = 0;
    return d;
  }
  struct sigaction previous_interrupt_ {};
  struct sigaction previous_terminate_ {};
};

}  // namespace detail
}  // namespace torchguard
