// gather over futures: waits for every future, then returns their values in input order, or
// throws the first failure (TaskError) or, when nothing failed but something was cancelled,
// Cancelled. detail::Failures, the rule for which error a gather throws, serves the gather over
// inputs (gather.hpp) too.
#pragma once

#include <cstddef>
#include <exception>
#include <functional>
#include <future>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>

#include "torchguard/async/task_pool.hpp"
#include "torchguard/core/cancellation.hpp"
#include "torchguard/core/error.hpp"

namespace torchguard {

namespace detail {

// A gather's errors in the order recorded. Failures (any error but a cancellation) are thrown
// as TaskError: the first, with the others. A cancellation is never a failure: when there is no
// failure, the first cancellation is thrown as Cancelled, saying how many items were cancelled.
class Failures {
 public:
  using Namer = std::function<std::string(std::size_t)>;

  // A Cancelled is a cancellation.
  void add(std::size_t index, std::exception_ptr error) {
    const bool cancellation = is_cancellation(error);
    add(index, std::move(error), cancellation);
  }
  // `cancellation`: the caller's verdict (a gather over inputs calls a task's unasked Cancelled a
  // failure; TaskPool::Config).
  void add(std::size_t index, std::exception_ptr error, bool cancellation) {
    if (cancellation) {
      if (!cancellation_) cancellation_ = std::move(error);
      ++cancelled_;
    } else if (first_error_) {
      others_.emplace_back(index, std::move(error));
    } else {
      first_index_ = index;
      first_error_ = std::move(error);
    }
  }
  // No failure recorded (cancellations aside).
  bool empty() const noexcept { return !first_error_; }
  // `total`: the number of items; `name`, when given, names the failed input (empty: no name).
  void throw_if_any(std::size_t total, const Namer& name = {}) {
    if (!first_error_) {
      if (cancellation_) throw Cancelled(cancelled_text(total));
      return;
    }
    std::string input;
    // A failing name must not hide the item's own error: the message then goes without it.
    try {
      if (name) input = name(first_index_);
    } catch (...) {
      input.clear();
    }
    throw TaskError(first_index_, total, std::move(input), first_error_, std::move(others_));
  }

 private:
  // "BatchedInference: cancelled before the request ran (3 of 10 items cancelled)".
  std::string cancelled_text(std::size_t total) const {
    std::string text;
    try {
      std::rethrow_exception(cancellation_);
    } catch (const std::exception& e) {
      text = error_message(e);
    } catch (...) {
    }
    if (text.empty()) text = "cancelled";
    return fmt::format("{} ({} of {} items cancelled)", text, cancelled_, total);
  }

  std::size_t first_index_ = 0;
  std::exception_ptr first_error_;
  std::vector<TaskError::Failure> others_;
  std::exception_ptr cancellation_;
  std::size_t cancelled_ = 0;
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

// Waits for every future, then returns their values in input order. Every future is waited for
// even when one fails, so nothing keeps running behind the caller's back. Then:
// - a future failed (with anything but Cancelled): throws TaskError for the first failed future
//   (by index), the later failures in others(); cancelled futures are not failures and are not
//   listed;
// - otherwise, a future answered Cancelled (e.g. a BatchedInference request its token cancelled):
//   throws Cancelled, "<the first one's message> (<k> of <n> items cancelled)", never TaskError;
// - otherwise returns the values.
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
  failures.throw_if_any(futures.size());
  return values;
}

// Waits for futures of different types: `auto [a, b] = gather(std::async(...), std::async(...))`.
// Throws as the gather over a vector of futures does: TaskError, else Cancelled.
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
  failures.throw_if_any(sizeof...(T));
  return std::apply([](auto&... value) { return std::make_tuple(std::move(*value)...); }, taken);
}

}  // namespace torchguard
