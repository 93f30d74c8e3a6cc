// The engine under gather and Prefetcher: a fixed number of worker threads (launched with
// std::async) claim item indices in order, at most `window` (which the owner may grow) claimed
// and not yet consumed, and keep each item's result or error in its slot. Cancellation is
// cooperative (a token per item); an outside token, when given, is polled and stops the pool (or
// left to the pool's owner to poll). An item's error is a failure or a cancellation: see
// TaskPool::Config.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

#include <spdlog/fmt/fmt.h>

#include "torchguard/core/cancellation.hpp"
#include "torchguard/core/error.hpp"

namespace torchguard {

// An item failed. The message leads with the item's own error, then says which input it was,
// the index only as a detail:
//   "no such file: /data/b.pt (input '/data/b.pt'; item 1 of 4, and 1 more failure)"
//   "timed out after 2.00 s (item 7 of 100)"                     (an input without a name)
// Accessors: index(), total() (the number of items; 0 when unknown), input() (the input's name
// in the user's terms; empty when it has none), cause() (the item's own exception) and, from a
// fail-fast gather, others(): the failures that followed it, in completion order.
class TaskError : public Error {
 public:
  using Failure = std::pair<std::size_t, std::exception_ptr>;

  TaskError(std::size_t index, std::exception_ptr cause, std::vector<Failure> others = {})
      : TaskError(index, 0, std::string(), std::move(cause), std::move(others)) {}

  // `total`: how many items there were (0: unknown); `input`: the failed input's name, or empty.
  TaskError(std::size_t index, std::size_t total, std::string input, std::exception_ptr cause,
            std::vector<Failure> others = {})
      : Error(message(index, total, input, cause, others.size())),
        index_(index),
        total_(total),
        input_(std::move(input)),
        cause_(std::move(cause)),
        others_(std::move(others)) {}

  std::size_t index() const noexcept { return index_; }
  std::size_t total() const noexcept { return total_; }
  const std::string& input() const noexcept { return input_; }
  const std::exception_ptr& cause() const noexcept { return cause_; }
  const std::vector<Failure>& others() const noexcept { return others_; }
  // Throws the item's own exception, with its original type.
  [[noreturn]] void rethrow_cause() const { std::rethrow_exception(cause_); }

 private:
  // The cause's own words: its message without describe()'s type name, which means little to a
  // user (and c10's backtrace stripped); the type only when there is no message to show.
  static std::string cause_text(const std::exception_ptr& cause) {
    if (!cause) return describe(cause);
    try {
      std::rethrow_exception(cause);
    } catch (const std::exception& e) {
      auto text = error_message(e);
      return text.empty() ? describe(cause) : text;
    } catch (...) {
      return describe(cause);  // not a std::exception: its type is all there is
    }
  }

  static std::string message(std::size_t index, std::size_t total, const std::string& input,
                             const std::exception_ptr& cause, std::size_t others) {
    std::string where = input.empty() ? std::string() : fmt::format("input '{}'; ", input);
    where += total > 0 ? fmt::format("item {} of {}", index, total) : fmt::format("item {}", index);
    if (others > 0) where += fmt::format(", and {} more failure{}", others, others > 1 ? "s" : "");
    return fmt::format("{} ({})", cause_text(cause), where);
  }

  std::size_t index_;
  std::size_t total_;
  std::string input_;
  std::exception_ptr cause_;
  std::vector<Failure> others_;
};

// The order results come out in: the inputs' order, or the order items finished in.
enum class Order { input, completion };

// A result with the index of the input it came from.
template <class T>
struct Indexed {
  std::size_t index;
  T value;
};

// The values of indexed results, in the results' order.
template <class T>
std::vector<T> values(std::vector<Indexed<T>>&& results) {
  std::vector<T> out;
  out.reserve(results.size());
  for (auto& result : results) out.push_back(std::move(result.value));
  return out;
}

namespace detail {

// A function's result as stored: void becomes std::monostate.
template <class R>
using stored_t = std::conditional_t<std::is_void_v<R>, std::monostate, R>;

template <class F, class... Args>
auto invoke_stored(F& f, Args&&... args) {
  using R = std::invoke_result_t<F&, Args...>;
  if constexpr (std::is_void_v<R>) {
    std::invoke(f, std::forward<Args>(args)...);
    return std::monostate{};
  } else {
    return std::invoke(f, std::forward<Args>(args)...);
  }
}

// Calls f(arg, token) when f takes a token, f(arg) otherwise.
template <class F, class Arg>
auto invoke_with_token(F& f, Arg&& arg, const CancellationToken& token) {
  if constexpr (std::is_invocable_v<F&, Arg, const CancellationToken&>) {
    return invoke_stored(f, std::forward<Arg>(arg), token);
  } else {
    static_assert(std::is_invocable_v<F&, Arg>,
                  "the task must be callable with (input) or (input, const CancellationToken&); "
                  "it is called from several threads at once, so it should not mutate state");
    return invoke_stored(f, std::forward<Arg>(arg));
  }
}

inline std::size_t default_concurrency() noexcept {
  return std::max(1u, std::thread::hardware_concurrency());
}

template <class R>
class TaskPool {
 public:
  using Clock = std::chrono::steady_clock;
  using Work = std::function<R(std::size_t, const CancellationToken&)>;
  enum class Status : unsigned char { pending, running, succeeded, failed };

  struct Slot {
    Status status = Status::pending;
    std::optional<R> value;
    std::exception_ptr error;
    bool cancelled = false;  // failed with a cancellation, which is not a failure (Config)
    Clock::time_point started;
    std::shared_ptr<CancelState> cancel;
    // The task has returned (or thrown): its outcome is in, though the worker may not have
    // recorded it yet. fail() leaves such an item alone. Set without the pool's lock.
    std::atomic<bool> returned{false};
  };

  struct Config {
    std::size_t workers = 1;
    std::size_t window = 1;  // how many items may be claimed and not yet consumed (consume())
    // The caller's stop signal. With `watch`: cancelled already, the pool starts nothing (it is
    // built stopped); cancelled later, it stops as stop() does (polled every 10 ms while workers
    // run). Without `watch`, the pool's owner polls it (gather's driver). Either way, a task's
    // Cancelled once it is cancelled is a cancellation.
    CancellationToken outside;
    bool watch = true;
    // A task's own Cancelled while neither its token nor `outside` was cancelled (nothing asked
    // for a stop): that item's failure when set (the fail-fast gather), else a cancellation.
    bool unasked_cancel_fails = false;
  };

  TaskPool(std::size_t count, Work work, Config config)
      : work_(std::move(work)),
        slots_(count),
        window_(config.window),
        outside_(std::move(config.outside)),
        unasked_cancel_fails_(config.unasked_cancel_fails) {
    if (config.workers == 0) throw OptionsError("the number of workers must be at least 1");
    if (window_ == 0) throw OptionsError("the window (depth) must be at least 1");
    const bool watch = config.watch && outside_.can_be_cancelled();
    // Stopped before it started: nothing runs (as a gather whose token is already cancelled).
    if (watch && outside_.cancelled()) {
      stopping_ = true;
      return;
    }
    const std::size_t workers = std::min(config.workers, count);
    // Reserved up front: nothing allocates once workers run (run_worker is noexcept).
    futures_.reserve(workers + 1);
    completion_order_.reserve(count);
    running_.reserve(workers);
    std::unique_lock<std::mutex> lock(mutex_);
    for (std::size_t i = 0; i < workers; ++i) {
      try {
        ++active_workers_;
        lock.unlock();
        futures_.push_back(std::async(std::launch::async, [this] { run_worker(); }));
        lock.lock();
      } catch (...) {
        if (!lock.owns_lock()) lock.lock();
        --active_workers_;
        // Fewer threads than asked still finish the work; none at all cannot.
        if (futures_.empty()) throw;
        break;
      }
    }
    if (!watch || futures_.empty()) return;
    lock.unlock();
    try {
      futures_.push_back(std::async(std::launch::async, [this] { watch_outside(); }));
    } catch (...) {
      {
        std::unique_lock<std::mutex> relock(mutex_);
        stop(relock);
      }
      join();
      throw;
    }
  }

  TaskPool(const TaskPool&) = delete;
  TaskPool& operator=(const TaskPool&) = delete;

  // No worker outlives the pool.
  ~TaskPool() {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      stop(lock);
    }
    join();
  }

  std::unique_lock<std::mutex> lock() { return std::unique_lock<std::mutex>(mutex_); }

  // Waits for a change (an item finished, a worker exited) or until `deadline`.
  void wait_until(std::unique_lock<std::mutex>& lock, Clock::time_point deadline) {
    if (deadline == Clock::time_point::max()) {
      progress_cv_.wait(lock);
    } else {
      progress_cv_.wait_until(lock, deadline);
    }
  }

  std::size_t size() const noexcept { return slots_.size(); }
  Slot& slot(std::size_t index) { return slots_[index]; }
  const std::vector<std::size_t>& completion_order() const { return completion_order_; }
  const std::vector<std::size_t>& running() const { return running_; }
  // Items that failed (timeouts included), and items that ended with a cancellation: apart.
  std::size_t failed_count() const { return failed_; }
  std::size_t cancelled_count() const { return cancelled_; }
  bool stopped() const { return stopping_; }
  bool is_running(std::size_t index) const { return slots_[index].status == Status::running; }
  // Items done: recorded, or running with their task returned (their outcome stands).
  std::size_t done_count() const {
    std::size_t landing = 0;
    for (auto index : running_) landing += slots_[index].returned.load() ? 1 : 0;
    return completion_order_.size() + landing;
  }
  // True when every worker has exited: nothing runs and nothing more will start.
  bool finished() const { return active_workers_ == 0; }

  // The window is all that holds a worker back: it is full, items remain, and a worker waits for
  // room (fewer items run than there are workers).
  bool window_holds_workers() const {
    return next_ < slots_.size() && next_ - consumed_ >= window_ &&
           running_.size() < active_workers_;
  }
  // Lets one more item be claimed ahead of the consumer per worker waiting for room, up to `most`.
  void grow_window(std::unique_lock<std::mutex>&, std::size_t most) {
    const std::size_t idle = active_workers_ - std::min(active_workers_, running_.size());
    if (window_ >= most || idle == 0) return;
    window_ += std::min(idle, most - window_);
    window_cv_.notify_all();
  }

  // The consumer took an item: the window moves on by one.
  void consume(std::unique_lock<std::mutex>&) {
    ++consumed_;
    window_cv_.notify_all();
  }

  // Fails a running or pending item from outside (a timeout, a gather's cancel: a Cancelled
  // counts as a cancellation); a late result is dropped. An item whose task has returned is done:
  // its outcome stands, even if the worker has not recorded it yet.
  void fail(std::unique_lock<std::mutex>&, std::size_t index, std::exception_ptr error) {
    Slot& slot = slots_[index];
    if (slot.status != Status::running && slot.status != Status::pending) return;
    if (slot.returned.load()) return;
    if (slot.cancel) slot.cancel->cancel();
    const bool cancelled = is_cancellation(error);
    finish(index, std::nullopt, std::move(error), cancelled);
  }

  // Starts nothing more and cancels what runs.
  void stop(std::unique_lock<std::mutex>&) {
    if (stopping_) return;
    stopping_ = true;
    for (auto index : running_) {
      if (slots_[index].cancel) slots_[index].cancel->cancel();
    }
    window_cv_.notify_all();
    // A consumer waiting for an item sees the stop now, not when the running tasks return.
    progress_cv_.notify_all();
  }

  // Waits for every worker to return. Call without the lock.
  void join() noexcept {
    for (auto& future : futures_) {
      if (future.valid()) future.wait();
    }
  }

 private:
  void run_worker() noexcept {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      window_cv_.wait(lock, [this] {
        return stopping_ || next_ >= slots_.size() || next_ - consumed_ < window_;
      });
      if (stopping_ || next_ >= slots_.size()) break;
      const std::size_t index = next_++;
      Slot& slot = slots_[index];
      std::optional<R> value;
      std::exception_ptr error;
      try {
        slot.cancel = std::make_shared<CancelState>();
        slot.status = Status::running;
        slot.started = Clock::now();
        running_.push_back(index);
        const bool only_one = running_.size() == 1;
        const CancellationToken token(slot.cancel);
        lock.unlock();
        // A gather's driver that went to sleep with nothing running (no item deadline to wake
        // for) learns of the start and arms the item's timeout; otherwise a lone item past
        // item_timeout would be waited for to its end. With others running, their deadlines
        // or ends wake it.
        if (only_one) progress_cv_.notify_all();
        try {
          R result = work_(index, token);
          slot.returned.store(true);
          value.emplace(std::move(result));
        } catch (...) {
          slot.returned.store(true);
          error = std::current_exception();
        }
        lock.lock();
      } catch (...) {  // bookkeeping ran out of memory: the item fails, the pool goes on
        if (!lock.owns_lock()) lock.lock();
        error = std::current_exception();
      }
      running_.erase(std::remove(running_.begin(), running_.end(), index), running_.end());
      if (slot.status == Status::running || slot.status == Status::pending) {
        // Asked for: the item's token (stop(), a timeout) or the outside token was cancelled.
        const bool cancelled =
            is_cancellation(error) &&
            (!unasked_cancel_fails_ || (slot.cancel && slot.cancel->is_cancelled()) ||
             outside_.cancelled());
        finish(index, std::move(value), std::move(error), cancelled);
      }
    }
    --active_workers_;
    progress_cv_.notify_all();
    window_cv_.notify_all();
  }

  // Stops the pool once `outside_` is cancelled; returns when the pool stops or its workers exit.
  // A token linked to a signal flag cannot notify: poll.
  void watch_outside() noexcept {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stopping_ && active_workers_ > 0) {
      if (outside_.cancelled()) {
        stop(lock);
        return;
      }
      progress_cv_.wait_for(lock, std::chrono::milliseconds(10));
    }
  }

  void finish(std::size_t index, std::optional<R> value, std::exception_ptr error, bool cancelled) {
    Slot& slot = slots_[index];
    if (error) {
      slot.status = Status::failed;
      slot.error = std::move(error);
      slot.cancelled = cancelled;
      ++(cancelled ? cancelled_ : failed_);
    } else {
      slot.status = Status::succeeded;
      slot.value = std::move(value);
    }
    completion_order_.push_back(index);
    progress_cv_.notify_all();
  }

  Work work_;
  std::mutex mutex_;
  std::condition_variable progress_cv_;  // the consumer waits here
  std::condition_variable window_cv_;    // workers wait here for room in the window
  std::vector<Slot> slots_;
  std::vector<std::size_t> completion_order_;
  std::vector<std::size_t> running_;
  std::vector<std::future<void>> futures_;
  std::size_t window_;
  CancellationToken outside_;
  bool unasked_cancel_fails_;
  std::size_t next_ = 0;
  std::size_t consumed_ = 0;
  std::size_t failed_ = 0;
  std::size_t cancelled_ = 0;
  std::size_t active_workers_ = 0;
  bool stopping_ = false;
};

}  // namespace detail
}  // namespace torchguard
