// gather: waits for futures, or runs a function over inputs on a bounded set of worker threads
// (GatherOptions: max_in_flight, order, timeouts, progress, cancellation), fail-fast (gather) or
// settled (gather_settled).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <exception>
#include <functional>
#include <future>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ThreadLocalState.h>
#include <spdlog/fmt/fmt.h>

#include "torchguard/async/task_pool.hpp"
#include "torchguard/core/cancellation.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/core/logging.hpp"

namespace torchguard {

// ---------------------------------------------------------------------------------------------
// gather over futures

namespace detail {

// A gather's failures in the order recorded: the first is thrown as TaskError, with the others.
class Failures {
 public:
  void add(std::size_t index, std::exception_ptr error) {
    if (first_error_) {
      others_.emplace_back(index, std::move(error));
    } else {
      first_index_ = index;
      first_error_ = std::move(error);
    }
  }
  bool empty() const noexcept { return !first_error_; }
  void throw_if_any() {
    if (first_error_) throw TaskError(first_index_, first_error_, std::move(others_));
  }

 private:
  std::size_t first_index_ = 0;
  std::exception_ptr first_error_;
  std::vector<TaskError::Failure> others_;
};

// A future's value as gather stores it (void: std::monostate).
template <class T>
stored_t<T> get_stored(std::future<T>& future) {
  if constexpr (std::is_void_v<T>) {
    future.get();
    return {};
  } else {
    return future.get();
  }
}

}  // namespace detail

// Waits for every future, then returns their values in input order. The first failed future (by
// index) is thrown as TaskError with the later failures in others(); every future is waited for
// even when one fails, so nothing keeps running behind the caller's back.
template <class T>
std::vector<detail::stored_t<T>> gather(std::vector<std::future<T>> futures) {
  for (auto& future : futures) {
    if (!future.valid()) throw OptionsError("gather: a future has no shared state");
  }
  for (auto& future : futures) future.wait();
  std::vector<detail::stored_t<T>> values;
  values.reserve(futures.size());
  detail::Failures failures;
  for (std::size_t i = 0; i < futures.size(); ++i) {
    try {
      values.push_back(detail::get_stored(futures[i]));
    } catch (...) {
      failures.add(i, std::current_exception());
    }
  }
  failures.throw_if_any();
  return values;
}

// Waits for futures of different types: `auto [a, b] = gather(std::async(...), std::async(...))`.
template <class... T, class = std::enable_if_t<(sizeof...(T) > 0)>>
std::tuple<detail::stored_t<T>...> gather(std::future<T>&&... futures) {
  (futures.wait(), ...);
  detail::Failures failures;
  std::size_t index = 0;
  auto take = [&](auto& future) {
    std::optional<decltype(detail::get_stored(future))> value;
    try {
      value.emplace(detail::get_stored(future));
    } catch (...) {
      failures.add(index, std::current_exception());
    }
    ++index;
    return value;
  };
  // Braces: the futures are taken left to right, so each index is its position.
  std::tuple<std::optional<detail::stored_t<T>>...> taken{take(futures)...};
  failures.throw_if_any();
  return std::apply([](auto&... value) { return std::make_tuple(std::move(*value)...); }, taken);
}

// ---------------------------------------------------------------------------------------------
// gather over inputs, bounded

struct GatherProgress {
  std::size_t done = 0;    // finished, successfully or not
  std::size_t failed = 0;  // of those, failed (timeouts included)
  std::size_t total = 0;
};

struct GatherOptions {
  std::size_t max_in_flight = detail::default_concurrency();  // tasks running at once
  Order order = Order::input;
  std::optional<std::chrono::steady_clock::duration> item_timeout;  // from an item's start
  std::optional<std::chrono::steady_clock::duration> timeout;       // for the whole gather
  // Called on the gathering thread after items finish; an exception from it stops the gather.
  std::function<void(const GatherProgress&)> on_progress;
  CancellationToken cancellation;  // from a CancellationSource: cancels the gather from outside
};

// One item's outcome from gather_settled: a value or an error, with the input's index.
template <class T>
struct Settled {
  std::size_t index = 0;
  std::optional<T> value;
  std::exception_ptr error;

  bool ok() const noexcept { return !error; }
  // The value, or the item's own exception thrown.
  T& get() {
    if (error) std::rethrow_exception(error);
    return *value;
  }
};

namespace detail {

template <class Range>
std::size_t range_size(const Range& inputs) {
  return static_cast<std::size_t>(std::size(inputs));
}

template <class Range, class F>
using gather_result_t = stored_t<decltype(invoke_with_token(
    std::declval<F&>(), *std::begin(std::declval<const Range&>()),
    std::declval<const CancellationToken&>()))>;

inline std::string timeout_text(std::chrono::steady_clock::duration duration) {
  return format_duration(std::chrono::duration_cast<std::chrono::nanoseconds>(duration));
}

// `from + duration`, or the end of time when that would overflow ("no limit").
inline std::chrono::steady_clock::time_point saturating_add(
    std::chrono::steady_clock::time_point from, std::chrono::steady_clock::duration duration) {
  using Clock = std::chrono::steady_clock;
  if (duration >= Clock::time_point::max() - from) return Clock::time_point::max();
  return from + duration;
}

inline void check_gather_options(const GatherOptions& options) {
  if (options.max_in_flight == 0) {
    throw OptionsError("gather: max_in_flight must be at least 1");
  }
  if (options.timeout && options.timeout->count() <= 0) {
    throw OptionsError("gather: the timeout must be positive");
  }
  if (options.item_timeout && options.item_timeout->count() <= 0) {
    throw OptionsError("gather: item_timeout must be positive");
  }
}

// Why a gather ended early as a whole, if it did.
struct GatherEnd {
  std::exception_ptr error;      // TimeoutError, Cancelled, or the progress callback's error
  bool callback_failed = false;  // the error is the progress callback's
};

// Runs the pool to the end on the calling thread: enforces timeouts, reports progress, and stops
// launching on the first failure (fail_fast). A gather timeout or an outside cancellation fails
// every unfinished item with that error.
template <class R>
GatherEnd drive(TaskPool<R>& pool, const GatherOptions& options, bool fail_fast) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const auto deadline =
      options.timeout ? saturating_add(start, *options.timeout) : Clock::time_point::max();
  GatherEnd end;
  auto end_all = [&](std::unique_lock<std::mutex>& lock, std::exception_ptr error) {
    end.error = error;
    pool.stop(lock);
    for (std::size_t i = 0; i < pool.size(); ++i) pool.fail(lock, i, error);
  };
  // Only while an item still runs: a timed-out item that ignores its token has no deadline left.
  auto item_deadline = [&](std::size_t index) {
    return pool.is_running(index) ? saturating_add(pool.slot(index).started, *options.item_timeout)
                                  : Clock::time_point::max();
  };
  auto done = [&] {
    return fmt::format("{} of {} items done", pool.completion_order().size(), pool.size());
  };
  std::size_t reported = 0;
  auto lock = pool.lock();
  for (;;) {
    const auto now = Clock::now();
    if (!pool.stopped()) {
      if (options.cancellation.cancelled()) {
        end_all(lock, std::make_exception_ptr(
                          Cancelled(fmt::format("gather cancelled with {}", done()))));
      } else if (now >= deadline) {
        end_all(lock,
                std::make_exception_ptr(TimeoutError(fmt::format(
                    "gather timed out after {} with {}", timeout_text(*options.timeout), done()))));
      } else if (options.item_timeout) {
        const auto running = pool.running();  // a copy: fail() may change the list
        for (auto index : running) {
          if (item_deadline(index) <= now) {
            pool.fail(
                lock, index,
                std::make_exception_ptr(TimeoutError(fmt::format(
                    "item {} timed out after {}", index, timeout_text(*options.item_timeout)))));
          }
        }
      }
      if (fail_fast && pool.failed_count() > 0) pool.stop(lock);
    }
    if (options.on_progress && pool.completion_order().size() > reported && !end.error) {
      reported = pool.completion_order().size();
      const GatherProgress progress{reported, pool.failed_count(), pool.size()};
      lock.unlock();
      try {
        options.on_progress(progress);
      } catch (...) {
        end.error = std::current_exception();
        end.callback_failed = true;
      }
      lock.lock();
      if (end.callback_failed) pool.stop(lock);
      continue;
    }
    if (pool.finished()) break;
    // Once stopped, only the workers' exits are awaited: they notify.
    auto wake = pool.stopped() ? Clock::time_point::max() : deadline;
    if (options.item_timeout && !pool.stopped()) {
      for (auto index : pool.running()) wake = std::min(wake, item_deadline(index));
    }
    if (options.cancellation.can_be_cancelled() && !pool.stopped()) {
      // A source's cancel() cannot wake this thread: poll it.
      wake = std::min(wake, now + std::chrono::milliseconds(10));
    }
    pool.wait_until(lock, wake);
  }
  lock.unlock();
  pool.join();
  return end;
}

template <class R, class Range, class F>
std::unique_ptr<TaskPool<R>> start_gather(const Range& inputs, F& fn,
                                          const GatherOptions& options) {
  check_gather_options(options);
  auto first = std::begin(inputs);
  static_assert(
      std::is_base_of_v<std::random_access_iterator_tag,
                        typename std::iterator_traits<decltype(first)>::iterator_category>,
      "gather: the inputs must be a random-access range (a vector, an array, a deque)");
  const auto count = range_size(inputs);
  // Tasks run with the caller's LibTorch thread-local state: grad mode, inference mode, ...
  return std::make_unique<TaskPool<R>>(
      count,
      [first, &fn, state = at::ThreadLocalState()](std::size_t index,
                                                   const CancellationToken& token) -> R {
        at::ThreadLocalStateGuard caller_state(state);
        return invoke_with_token(fn, first[static_cast<std::ptrdiff_t>(index)], token);
      },
      options.max_in_flight, count + 1);
}

inline bool is_cancellation(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const Cancelled&) {
    return true;
  } catch (...) {
    return false;
  }
}

template <class R>
std::vector<std::size_t> result_order(TaskPool<R>& pool, Order order) {
  std::vector<std::size_t> indices;
  if (order == Order::completion) {
    indices = pool.completion_order();
    // Items that never ran (after a failure stopped a fail-fast gather) come last.
    std::vector<bool> listed(pool.size(), false);
    for (auto index : indices) listed[index] = true;
    for (std::size_t i = 0; i < pool.size(); ++i) {
      if (!listed[i]) indices.push_back(i);
    }
  } else {
    indices.resize(pool.size());
    for (std::size_t i = 0; i < indices.size(); ++i) indices[i] = i;
  }
  return indices;
}

}  // namespace detail

// Runs fn(input) (or fn(input, token)) for every input, at most max_in_flight at once, and
// returns every result with its index, in input order (or completion order). Fail-fast: on the
// first failure it starts nothing more, cancels the running tasks' tokens, waits for them, and
// throws TaskError (the first failure, its index, the others). A gather timeout throws
// TimeoutError, an outside cancellation Cancelled.
template <class Range, class F>
std::vector<Indexed<detail::gather_result_t<Range, F>>> gather(const Range& inputs, F&& fn,
                                                               const GatherOptions& options = {}) {
  using R = detail::gather_result_t<Range, F>;
  auto pool = detail::start_gather<R>(inputs, fn, options);
  const auto end = detail::drive(*pool, options, /*fail_fast=*/true);
  if (end.error) std::rethrow_exception(end.error);
  detail::Failures failures;
  for (auto index : pool->completion_order()) {
    const auto& error = pool->slot(index).error;
    // After the first failure, cancellations are the gather's own doing, not failures.
    if (error && (failures.empty() || !detail::is_cancellation(error))) failures.add(index, error);
  }
  failures.throw_if_any();
  std::vector<Indexed<R>> results;
  results.reserve(pool->size());
  for (auto index : detail::result_order(*pool, options.order)) {
    results.push_back(Indexed<R>{index, std::move(*pool->slot(index).value)});
  }
  return results;
}

// Like gather, but runs every item whatever fails, and returns every outcome (value or error)
// with its index. Items a gather timeout or a cancellation kept from finishing carry
// TimeoutError or Cancelled. Throws only for a throwing progress callback.
template <class Range, class F>
std::vector<Settled<detail::gather_result_t<Range, F>>> gather_settled(
    const Range& inputs, F&& fn, const GatherOptions& options = {}) {
  using R = detail::gather_result_t<Range, F>;
  auto pool = detail::start_gather<R>(inputs, fn, options);
  const auto end = detail::drive(*pool, options, /*fail_fast=*/false);
  if (end.callback_failed) std::rethrow_exception(end.error);
  std::vector<Settled<R>> results;
  results.reserve(pool->size());
  for (auto index : detail::result_order(*pool, options.order)) {
    auto& slot = pool->slot(index);
    Settled<R> result;
    result.index = index;
    result.error = slot.error;
    result.value = std::move(slot.value);
    results.push_back(std::move(result));
  }
  return results;
}

}  // namespace torchguard
