// gather: runs a function over inputs on a bounded set of worker threads (GatherOptions:
// max_in_flight, order, timeouts, progress, cancellation), fail-fast (gather) or settled
// (gather_settled). The gather over futures is in gather_futures.hpp, included here.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <exception>
#include <filesystem>
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

#include "torchguard/async/gather_futures.hpp"
#include "torchguard/async/task_pool.hpp"
#include "torchguard/core/cancellation.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/core/logging.hpp"

namespace torchguard {

// done = succeeded + failed + cancelled. A cancellation is never a failure: `failed` counts the
// items that failed (timeouts included; in a fail-fast gather, a task's own Cancelled that
// nothing asked for, see gather), `cancelled` those that ended with a Cancelled (the running
// tasks' answers to a fail-fast stop or to options.cancellation; in gather_settled, any
// Cancelled). `cancelled` comes last so that {done, failed, total} still reads as it did.
struct GatherProgress {
  std::size_t done = 0;    // finished: succeeded, failed or cancelled
  std::size_t failed = 0;  // of those, failed (timeouts included; cancellations never)
  std::size_t total = 0;
  std::size_t cancelled = 0;  // of those, cancelled
};

struct GatherOptions {
  std::size_t max_in_flight = detail::default_concurrency();  // tasks running at once
  Order order = Order::input;
  std::optional<std::chrono::steady_clock::duration> item_timeout;  // from an item's start
  std::optional<std::chrono::steady_clock::duration> timeout;       // for the whole gather
  // Called on the gathering thread after items finish; an exception from it stops the gather.
  std::function<void(const GatherProgress&)> on_progress;
  CancellationToken cancellation;  // from a CancellationSource: cancels the gather from outside
  // Names input `index` in a failed gather's TaskError (input()), in the user's terms: a file
  // name, a sample id. Unset (the default): the input itself when fmt can format it (a string,
  // a path, a number), elided in the middle past 80 characters; otherwise no name, and the
  // message says "item <index> of <total>" only. Called on the gathering thread, once, for the
  // TaskError's item. Used by gather's TaskError only: gather_settled never calls it (each
  // Settled carries its index, and a loop over the results names inputs[index] itself).
  std::function<std::string(std::size_t index)> item_name;
};

// One item's outcome from gather_settled: a value or an error, with the input's index. Three
// cases, told apart by ok() and cancelled():
// - ok():        the item succeeded; `value` holds its result;
// - cancelled(): the item's task ended with Cancelled (it threw Cancelled itself, asked or not,
//   e.g. answering a token it watches: gather_settled reports each item's own outcome, where a
//   fail-fast gather calls an unasked Cancelled a failure): `value` is empty, `error` holds a
//   Cancelled. Not the input's fault. (A cancel of the gather's own token while items are
//   unfinished makes gather_settled throw Cancelled instead of returning results.)
// - neither:     the item failed: `error` holds its exception. A TimeoutError (the item ran past
//   item_timeout, or the whole gather past its timeout before the item finished) is a failure,
//   not a cancellation: check the error's type to tell a timeout from other failures.
template <class T>
struct Settled {
  std::size_t index = 0;
  std::optional<T> value;
  std::exception_ptr error;

  // Succeeded: false for a failed and for a cancelled item.
  bool ok() const noexcept { return !error; }
  // Cancelled: `error` holds a torchguard::Cancelled (never a TimeoutError).
  bool cancelled() const noexcept { return is_cancellation(error); }
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

// `text` on one line and at most `most` bytes: longer, its middle becomes "..." (a path keeps
// its file name), never splitting a UTF-8 character.
inline std::string one_short_line(std::string text, std::size_t most = 80) {
  std::replace_if(
      text.begin(), text.end(), [](char c) { return c == '\n' || c == '\r' || c == '\t'; }, ' ');
  if (text.size() <= most) return text;
  auto continuation = [&](std::size_t at) {
    return (static_cast<unsigned char>(text[at]) & 0xC0) == 0x80;
  };
  std::size_t head = most / 4;
  std::size_t tail = text.size() - (most - head - 3);
  while (head > 0 && continuation(head)) --head;
  while (tail < text.size() && continuation(tail)) ++tail;
  return text.substr(0, head) + "..." + text.substr(tail);
}

// An input as an error names it by default: formatted by fmt, or empty when fmt cannot format
// its type. A path formats as its string; an enum never (fmt's enum conversion is deprecated).
template <class T>
std::string default_input_name(const T& input) {
  if constexpr (std::is_same_v<T, std::filesystem::path>) {
    return one_short_line(input.string());
  } else if constexpr (std::is_enum_v<T>) {
    return {};
  } else if constexpr (fmt::is_formattable<T>::value) {
    return one_short_line(fmt::format("{}", input));
  } else {
    return {};
  }
}

// What names a gather's failed input: the user's item_name, or the default.
template <class Range>
Failures::Namer input_namer(const Range& inputs, const GatherOptions& options) {
  if (options.item_name) return options.item_name;
  using Input = std::decay_t<decltype(*std::begin(inputs))>;
  return [first = std::begin(inputs)](std::size_t index) {
    return default_input_name<Input>(first[static_cast<std::ptrdiff_t>(index)]);
  };
}

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
// launching on the first failure (fail_fast). A gather timeout or an outside cancellation that
// comes while an item is unfinished fails every unfinished item with that error (GatherEnd);
// once every item is done, neither changes anything. An item is done once its task has returned,
// even before its worker has recorded the outcome: a cancel or a timeout at that moment leaves
// its value or error. Fail-fast, a failure already recorded when the loop looks wins over a
// cancellation or a timeout it has not acted on yet: the gather stops for the failure and throws
// its TaskError, so a real error is never lost to a later cancel.
template <class R>
GatherEnd drive(TaskPool<R>& pool, const GatherOptions& options, bool fail_fast) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const auto deadline =
      options.timeout ? saturating_add(start, *options.timeout) : Clock::time_point::max();
  GatherEnd end;
  // Fails each unfinished item before stop() cancels the running tokens: a task that answers its
  // cancelled token by returning must not count as done (TaskPool::fail). Under the lock
  // throughout, so no worker claims an item in between.
  auto end_all = [&](std::unique_lock<std::mutex>& lock, std::exception_ptr error) {
    end.error = error;
    for (std::size_t i = 0; i < pool.size(); ++i) pool.fail(lock, i, error);
    pool.stop(lock);
  };
  // Only while an item still runs: a timed-out item that ignores its token has no deadline left,
  // nor has an item whose task has returned.
  auto item_deadline = [&](std::size_t index) {
    return pool.is_running(index) && !pool.slot(index).returned.load()
               ? saturating_add(pool.slot(index).started, *options.item_timeout)
               : Clock::time_point::max();
  };
  auto done = [&] { return fmt::format("{} of {} items done", pool.done_count(), pool.size()); };
  std::size_t reported = 0;
  auto lock = pool.lock();
  for (;;) {
    const auto now = Clock::now();
    // Every item done (its task returned, recorded or not yet): a cancellation or a timeout now
    // has nothing left to stop, and the results stand.
    const bool all_done = pool.done_count() == pool.size();
    if (!pool.stopped() && !all_done) {
      if (fail_fast && pool.failed_count() > 0) {
        pool.stop(lock);  // a failure already recorded wins over a cancel or timeout not acted on
      } else if (options.cancellation.cancelled()) {
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
            pool.fail(lock, index,
                      std::make_exception_ptr(TimeoutError(
                          fmt::format("timed out after {}", timeout_text(*options.item_timeout)))));
          }
        }
      }
      if (fail_fast && pool.failed_count() > 0) pool.stop(lock);
    }
    if (options.on_progress && pool.completion_order().size() > reported && !end.error) {
      reported = pool.completion_order().size();
      const GatherProgress progress{reported, pool.failed_count(), pool.size(),
                                    pool.cancelled_count()};
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
    // Once stopped, or once every item is done, only the workers' records and exits are
    // awaited: they notify.
    const bool waiting_for_workers = pool.stopped() || all_done;
    auto wake = waiting_for_workers ? Clock::time_point::max() : deadline;
    if (options.item_timeout && !waiting_for_workers) {
      for (auto index : pool.running()) wake = std::min(wake, item_deadline(index));
    }
    if (options.cancellation.can_be_cancelled() && !waiting_for_workers) {
      // A source's cancel() cannot wake this thread: poll it.
      wake = std::min(wake, now + std::chrono::milliseconds(10));
    }
    pool.wait_until(lock, wake);
  }
  lock.unlock();
  pool.join();
  return end;
}

// Checks the options, refuses a token already cancelled (Cancelled: nothing runs), and starts
// the items on a pool.
template <class R, class Range, class F>
std::unique_ptr<TaskPool<R>> start_gather(const Range& inputs, F& fn, const GatherOptions& options,
                                          bool fail_fast) {
  check_gather_options(options);
  if (options.cancellation.cancelled()) {
    throw Cancelled(
        fmt::format("gather cancelled before it started (0 of {} items done)", range_size(inputs)));
  }
  auto first = std::begin(inputs);
  static_assert(
      std::is_base_of_v<std::random_access_iterator_tag,
                        typename std::iterator_traits<decltype(first)>::iterator_category>,
      "gather: the inputs must be a random-access range (a vector, an array, a deque)");
  const auto count = range_size(inputs);
  typename TaskPool<R>::Config config;
  config.workers = options.max_in_flight;
  config.window = count + 1;
  config.outside = options.cancellation;
  config.watch = false;  // drive() polls it
  config.unasked_cancel_fails = fail_fast;
  // Tasks run with the caller's LibTorch thread-local state: grad mode, inference mode, ...
  return std::make_unique<TaskPool<R>>(
      count,
      [first, &fn, state = at::ThreadLocalState()](std::size_t index,
                                                   const CancellationToken& token) -> R {
        at::ThreadLocalStateGuard caller_state(state);
        return invoke_with_token(fn, first[static_cast<std::ptrdiff_t>(index)], token);
      },
      std::move(config));
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
// throws TaskError (the first failure, its input's name and index, the others). The running
// tasks' answers to that stop (Cancelled) are cancellations, never failures: not in others().
// A task that throws Cancelled itself:
// - while a stop was asked for (its token cancelled: after a failure, a cancel, a timeout; or
//   options.cancellation cancelled): a cancellation;
// - while nothing asked for a stop: that item's failure, like any other exception: TaskError,
//   cause() the Cancelled ("told to stop (input '1'; item 1 of 5)"). gather throws Cancelled
//   only when the gather was cancelled, so a token the tasks watch belongs in
//   options.cancellation. (gather_settled reports such an item as cancelled().)
// A failure recorded before the gather acts on a cancel or its timeout wins: TaskError.
// With options.cancellation, and options.timeout:
// - the token already cancelled when gather is called: throws Cancelled, and runs nothing;
// - cancelled while an item is unfinished (before a failure stopped the gather): cancels the
//   running tasks, waits for them, and throws Cancelled ("gather cancelled with <k> of <n>
//   items done"); the finished results are dropped;
// - past the timeout while an item is unfinished: the same, with TimeoutError;
// - cancelled or past the timeout once every item is done: returns the results (or throws the
//   TaskError of a failure, or, when none failed and tasks answered the cancel with Cancelled,
//   Cancelled: "<its message> (<k> of <n> items cancelled)").
template <class Range, class F>
std::vector<Indexed<detail::gather_result_t<Range, F>>> gather(const Range& inputs, F&& fn,
                                                               const GatherOptions& options = {}) {
  using R = detail::gather_result_t<Range, F>;
  auto pool = detail::start_gather<R>(inputs, fn, options, /*fail_fast=*/true);
  const auto end = detail::drive(*pool, options, /*fail_fast=*/true);
  if (end.error) std::rethrow_exception(end.error);
  detail::Failures failures;
  for (auto index : pool->completion_order()) {
    const auto& slot = pool->slot(index);
    if (slot.error) failures.add(index, slot.error, slot.cancelled);
  }
  failures.throw_if_any(pool->size(), detail::input_namer(inputs, options));
  std::vector<Indexed<R>> results;
  results.reserve(pool->size());
  for (auto index : detail::result_order(*pool, options.order)) {
    results.push_back(Indexed<R>{index, std::move(*pool->slot(index).value)});
  }
  return results;
}

// Like gather, but runs every item whatever fails, and returns every outcome (value or error)
// with its index; Settled::ok() and Settled::cancelled() tell success, cancellation and failure
// apart (a task's own Cancelled is cancelled() here, asked for or not: an item's own failure or
// cancellation never makes gather_settled throw). options.item_name is not used:
// results[i].index names the input. The gather's own token (options.cancellation) cancels the
// gather itself, as asyncio's gather raises CancelledError even with return_exceptions=True:
// - the token already cancelled when gather_settled is called: runs nothing, and throws Cancelled
//   ("gather cancelled before it started (0 of <n> items done)");
// - cancelled while items are unfinished: the running tasks' tokens are cancelled and waited for
//   (no task runs once it throws), then throws Cancelled ("gather cancelled with <k> of <n> items
//   done"; an item whose task had returned at that moment counts as done); the results are
//   dropped;
// - cancelled once every item is done: changes nothing, the results are returned.
// A gather timeout (options.timeout) does not throw: every unfinished item carries a TimeoutError
// ("gather timed out after ..."; a failure, cancelled() is false), the finished ones keep their
// outcomes, and the results are returned. Throws otherwise only for a throwing progress callback
// (or an option that cannot work: OptionsError).
template <class Range, class F>
std::vector<Settled<detail::gather_result_t<Range, F>>> gather_settled(
    const Range& inputs, F&& fn, const GatherOptions& options = {}) {
  using R = detail::gather_result_t<Range, F>;
  auto pool = detail::start_gather<R>(inputs, fn, options, /*fail_fast=*/false);
  const auto end = detail::drive(*pool, options, /*fail_fast=*/false);
  // The progress callback's error, or the gather's own cancellation (drive() has waited for
  // every task); a gather timeout stays in the results.
  if (end.callback_failed || is_cancellation(end.error)) std::rethrow_exception(end.error);
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
