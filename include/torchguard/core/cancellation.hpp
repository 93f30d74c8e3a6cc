// One stop signal for the whole library: a CancellationSource cancels, its tokens are polled by
// tasks, gathers, Prefetchers, BatchedInference and CheckpointGuard. TrainingSession's stop
// request (SIGINT/SIGTERM) is such a token: `session.stop_token()`.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "torchguard/core/error.hpp"

namespace torchguard {

// Thrown by CancellationToken::throw_if_cancelled, and by work cancelled from outside.
class Cancelled : public Error {
 public:
  explicit Cancelled(const std::string& what = "cancelled") : Error(what) {}
};

// An item, a whole gather, or a wait ran past its timeout.
class TimeoutError : public Error {
 public:
  using Error::Error;
};

// True when `error` holds a Cancelled (or a class derived from it): work stopped because it was
// told to, not because it failed. False for an empty exception_ptr and for anything else,
// TimeoutError included (a timeout is a limit the work did not meet: a failure).
inline bool is_cancellation(const std::exception_ptr& error) noexcept {
  if (!error) return false;
  try {
    std::rethrow_exception(error);
  } catch (const Cancelled&) {
    return true;
  } catch (...) {
    return false;
  }
}

namespace detail {

struct CancelState {
  std::atomic<bool> cancelled{false};
  // Also cancelled once this flag is non-zero: a flag that a signal handler sets, since a
  // handler may not lock the mutex below. Waits poll while it is linked.
  const std::atomic<int>* linked_flag = nullptr;
  std::mutex mutex;
  std::condition_variable cv;

  bool is_cancelled() const noexcept {
    return cancelled.load(std::memory_order_acquire) ||
           (linked_flag && linked_flag->load(std::memory_order_acquire) != 0);
  }
  void cancel() noexcept {
    {
      std::lock_guard<std::mutex> lock(mutex);
      cancelled.store(true, std::memory_order_release);
    }
    cv.notify_all();
  }
};

}  // namespace detail

// What a task polls to learn it should stop early. A default-built token is never cancelled.
// Copies share one state; tokens are cheap to copy and safe to read from any thread.
class CancellationToken {
 public:
  CancellationToken() = default;
  explicit CancellationToken(std::shared_ptr<detail::CancelState> state)
      : state_(std::move(state)) {}

  bool cancelled() const noexcept { return state_ && state_->is_cancelled(); }
  bool can_be_cancelled() const noexcept { return static_cast<bool>(state_); }
  void throw_if_cancelled() const {
    if (cancelled()) throw Cancelled();
  }
  // Sleeps for `duration`, waking early when cancelled. Returns true when cancelled.
  template <class Rep, class Period>
  bool wait_for(std::chrono::duration<Rep, Period> duration) const {
    if (!state_) {
      std::this_thread::sleep_for(duration);
      return false;
    }
    const auto deadline = std::chrono::steady_clock::now() + duration;
    std::unique_lock<std::mutex> lock(state_->mutex);
    if (!state_->linked_flag) {
      return state_->cv.wait_until(lock, deadline, [this] { return cancelled(); });
    }
    // A signal handler cannot notify: wake every 10 ms to look at its flag.
    while (!cancelled()) {
      const auto now = std::chrono::steady_clock::now();
      if (now >= deadline) return false;
      state_->cv.wait_until(lock, std::min(deadline, now + std::chrono::milliseconds(10)));
    }
    return true;
  }

 private:
  std::shared_ptr<detail::CancelState> state_;
};

namespace detail {
struct TrainingSessionState;  // links its signal flag
}  // namespace detail

// Cancels from outside: hand out `token()`, call `cancel()` from any thread (not from a signal
// handler: TrainingSession's signal handling does that part).
class CancellationSource {
 public:
  CancellationSource() : state_(std::make_shared<detail::CancelState>()) {}
  void cancel() noexcept { state_->cancel(); }
  bool cancelled() const noexcept { return state_->is_cancelled(); }
  CancellationToken token() const { return CancellationToken(state_); }

 private:
  friend struct detail::TrainingSessionState;
  // Cancelled also once `*flag` is non-zero (a flag written by a signal handler).
  void link(const std::atomic<int>* flag) noexcept { state_->linked_flag = flag; }
  std::shared_ptr<detail::CancelState> state_;
};

}  // namespace torchguard
