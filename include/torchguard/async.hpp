// Async loading and inference on futures, what asyncio.gather, Semaphore and a DataLoader give
// Python, without std::async's pitfalls (a thread per call, no bound, lost errors):
//
//   auto images = torchguard::gather(paths, load_image);  // all at once, results in input order
//
//   torchguard::GatherOptions options;
//   options.max_in_flight = 4;                              // a window: at most 4 loads at once
//   options.item_timeout = std::chrono::seconds(2);
//   for (auto& [index, image] : torchguard::gather(paths, load_image, options)) { ... }
//
//   torchguard::Prefetcher<Batch> batches(count, [&](std::size_t i) { return load_batch(i); });
//   while (auto batch = batches.next()) train_step(*batch);   // 4 loads stay ahead
//
//   torchguard::BatchedInference server(model, 32, std::chrono::milliseconds(2));
//   std::future<torch::Tensor> logits = server.submit(image);  // from any thread
//
// gather and Prefetcher run a fixed set of worker threads (max_in_flight of them, launched with
// std::async) that take items in order, so 10,000 items cost 4 threads, not 10,000. No thread
// outlives a gather or a Prefetcher. Cancellation and timeouts are cooperative: a task polls its
// CancellationToken; a task that ignores it is waited for (C++ cannot stop a thread safely), and
// its result is dropped.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <future>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ThreadLocalState.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "torchguard/detail/cuda_stage.hpp"
#include "torchguard/detail/logging.hpp"
#include "torchguard/detail/task_pool.hpp"

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
    if (!future.valid()) throw std::invalid_argument("gather: a future has no shared state");
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
    throw std::invalid_argument("gather: max_in_flight must be at least 1");
  }
  if (options.timeout && options.timeout->count() <= 0) {
    throw std::invalid_argument("gather: the timeout must be positive");
  }
  if (options.item_timeout && options.item_timeout->count() <= 0) {
    throw std::invalid_argument("gather: item_timeout must be positive");
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
    return std::to_string(pool.completion_order().size()) + " of " + std::to_string(pool.size()) +
           " items done";
  };
  std::size_t reported = 0;
  auto lock = pool.lock();
  for (;;) {
    const auto now = Clock::now();
    if (!pool.stopped()) {
      if (options.cancellation.cancelled()) {
        end_all(lock, std::make_exception_ptr(Cancelled("gather cancelled with " + done())));
      } else if (now >= deadline) {
        end_all(lock, std::make_exception_ptr(TimeoutError("gather timed out after " +
                                                           timeout_text(*options.timeout) +
                                                           " with " + done())));
      } else if (options.item_timeout) {
        const auto running = pool.running();  // a copy: fail() may change the list
        for (auto index : running) {
          if (item_deadline(index) <= now) {
            pool.fail(lock, index,
                      std::make_exception_ptr(TimeoutError("item " + std::to_string(index) +
                                                           " timed out after " +
                                                           timeout_text(*options.item_timeout))));
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

// ---------------------------------------------------------------------------------------------
// Prefetcher

struct PrefetchOptions {
  std::size_t depth = 4;    // items loading or loaded ahead of the consumer
  std::size_t workers = 0;  // loads at once (0: depth)
  Order order = Order::input;
  // A CUDA device: each item's tensors are pinned and copied there non-blocking on a side stream,
  // so the copy overlaps the consumer's compute; next() makes the current stream wait for it.
  std::optional<torch::Device> device;
  bool pin_memory = true;  // with a CUDA device
};

// Loads items 0..count-1 ahead of the consumer with load(index) (or load(index, token)), keeping
// `depth` in flight. An item's exception comes out of next() at that item's turn, as TaskError
// with its index; later items still come. The destructor cancels what runs and waits for it.
template <class T>
class Prefetcher {
 public:
  template <class Load>
  Prefetcher(std::size_t count, Load load, PrefetchOptions options = {})
      : options_(std::move(options)) {
    if (options_.depth == 0) throw std::invalid_argument("Prefetcher: depth must be at least 1");
    if (options_.device) {
      if constexpr (!detail::stageable<T>::value) {
        throw std::invalid_argument(
            "Prefetcher: a staging device needs items made of tensors (a tensor, an Example, or "
            "vectors, pairs and tuples of them)");
      }
      options_.device = detail::check_stage_device(*options_.device);  // with its index
    }
    const std::size_t workers = options_.workers ? options_.workers : options_.depth;
    if (workers > options_.depth) {
      throw std::invalid_argument("Prefetcher: workers (" + std::to_string(workers) +
                                  ") must not exceed depth (" + std::to_string(options_.depth) +
                                  ")");
    }
    // Loads run concurrently on the workers, with the caller's LibTorch thread-local state.
    pool_ = std::make_unique<detail::TaskPool<Item>>(
        count,
        [load = std::make_shared<Load>(std::move(load)), device = options_.device,
         pin = options_.pin_memory, state = at::ThreadLocalState()](
            std::size_t index, const CancellationToken& token) -> Item {
          (void)pin;
          at::ThreadLocalStateGuard caller_state(state);
          Item item{detail::invoke_with_token(*load, index, token), {}};
          if constexpr (detail::stageable<T>::value) {
            if (device) item.ready = detail::stage_to_device(item.value, *device, pin);
          }
          return item;
        },
        workers, options_.depth);
  }

  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;
  ~Prefetcher() { cancel(); }

  std::size_t size() const noexcept { return pool_->size(); }

  // The next item with its index, or nullopt after the last one (or after cancel()).
  std::optional<Indexed<T>> next_indexed() {
    auto lock = pool_->lock();
    std::size_t index = 0;
    for (;;) {
      if (taken_ >= pool_->size() || pool_->stopped()) return std::nullopt;
      if (options_.order == Order::input) {
        index = taken_;
        if (is_done(pool_->slot(index))) break;
      } else if (taken_ < pool_->completion_order().size()) {
        index = pool_->completion_order()[taken_];
        break;
      }
      pool_->wait_until(lock, std::chrono::steady_clock::time_point::max());
    }
    ++taken_;
    pool_->consume(lock);
    auto& slot = pool_->slot(index);
    if (slot.error) {
      auto error = std::move(slot.error);
      throw TaskError(index, error);
    }
    Item item = std::move(*slot.value);
    slot.value.reset();
    lock.unlock();
    if (item.ready) item.ready(item.value);
    return Indexed<T>{index, std::move(item.value)};
  }

  // The next item, or nullopt after the last one.
  std::optional<T> next() {
    auto item = next_indexed();
    if (!item) return std::nullopt;
    return std::move(item->value);
  }

  // Stops loading: running loads see their tokens cancelled and are waited for.
  void cancel() noexcept {
    if (!pool_) return;
    {
      auto lock = pool_->lock();
      pool_->stop(lock);
    }
    pool_->join();
  }

  // Range-for over the remaining items (an input range: each item is visited once).
  class iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using value_type = T;
    using difference_type = std::ptrdiff_t;
    using pointer = T*;
    using reference = T&;

    iterator() = default;
    explicit iterator(Prefetcher* owner) : owner_(owner) { advance(); }
    T& operator*() { return *current_; }
    T* operator->() { return &*current_; }
    iterator& operator++() {
      advance();
      return *this;
    }
    bool operator==(const iterator& other) const { return owner_ == other.owner_; }
    bool operator!=(const iterator& other) const { return !(*this == other); }

   private:
    void advance() {
      current_ = owner_->next();
      if (!current_) owner_ = nullptr;
    }
    Prefetcher* owner_ = nullptr;
    std::optional<T> current_;
  };
  iterator begin() { return iterator(this); }
  iterator end() { return iterator(); }

 private:
  struct Item {
    T value;
    std::function<void(T&)> ready;  // CUDA: makes the consumer's stream wait for the copy
  };

  static bool is_done(const typename detail::TaskPool<Item>::Slot& slot) {
    using Status = typename detail::TaskPool<Item>::Status;
    return slot.status == Status::succeeded || slot.status == Status::failed;
  }

  PrefetchOptions options_;
  std::unique_ptr<detail::TaskPool<Item>> pool_;
  std::size_t taken_ = 0;
};

// ---------------------------------------------------------------------------------------------
// BatchedInference

struct BatchedInferenceOptions {
  std::size_t max_batch = 32;
  std::chrono::microseconds max_delay{2000};  // how long the first request of a batch may wait
  // Intra-op threads for the model (0: leave LibTorch's setting). Model calls run on one thread,
  // one batch at a time, so concurrent callers never multiply the intra-op pool. LibTorch's
  // setting is process-wide.
  int intra_op_threads = 0;
  std::optional<torch::Device> device;  // where inputs go before the model (default: stay)
  std::shared_ptr<spdlog::logger> logger;
};

struct BatchedInferenceStats {
  std::uint64_t requests = 0;  // answered
  std::uint64_t failed = 0;    // answered with an error
  std::uint64_t batches = 0;
  std::size_t largest_batch = 0;
};

// Merges single inputs from concurrent callers into batches (up to max_batch, waiting at most
// max_delay for the batch to fill) and runs the model on them under inference mode, on one
// thread. Each caller gets a future of its own output row. A batch the model fails on is rerun
// one request at a time, so one bad input fails only its own request. Inputs of different shapes
// go in different batches. close() (and the destructor) stops new requests and answers every
// pending one.
class BatchedInference {
 public:
  using Model = std::function<torch::Tensor(const torch::Tensor&)>;

  template <class M>
  BatchedInference(M model, std::size_t max_batch, std::chrono::microseconds max_delay)
      : BatchedInference(std::move(model), options_for(max_batch, max_delay)) {}

  template <class M>
  BatchedInference(M model, BatchedInferenceOptions options)
      : model_(as_function(std::move(model))),
        options_(std::move(options)),
        logger_(detail::or_default(options_.logger)) {
    if (options_.max_batch == 0) {
      throw std::invalid_argument("BatchedInference: max_batch must be at least 1");
    }
    if (options_.max_delay.count() < 0) {
      throw std::invalid_argument("BatchedInference: max_delay must not be negative");
    }
    worker_ = std::thread([this] { run(); });
  }

  BatchedInference(const BatchedInference&) = delete;
  BatchedInference& operator=(const BatchedInference&) = delete;
  ~BatchedInference() { close(); }

  // Queues one input (no batch dimension) and returns the future of its output row.
  std::future<torch::Tensor> submit(torch::Tensor input) {
    if (!input.defined()) throw std::invalid_argument("BatchedInference: the input is undefined");
    std::promise<torch::Tensor> promise;
    auto future = promise.get_future();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (closing_) throw std::logic_error("BatchedInference: submit() after close()");
      queue_.push_back(Request{std::move(input), std::move(promise), Clock::now()});
    }
    cv_.notify_one();
    return future;
  }

  // Stops new requests, answers every queued one, and joins the model thread.
  void close() noexcept {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      closing_ = true;
    }
    cv_.notify_one();
    std::call_once(joined_, [this] {  // close() from two threads: one joins, both return
      if (worker_.joinable()) worker_.join();
    });
  }

  BatchedInferenceStats stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

 private:
  using Clock = std::chrono::steady_clock;
  struct Request {
    torch::Tensor input;
    std::promise<torch::Tensor> promise;
    Clock::time_point submitted;
  };

  static BatchedInferenceOptions options_for(std::size_t max_batch,
                                             std::chrono::microseconds max_delay) {
    BatchedInferenceOptions options;
    options.max_batch = max_batch;
    options.max_delay = max_delay;
    return options;
  }

  // A module holder (torch::nn::Linear), a shared_ptr to a module, or any callable on a tensor.
  template <class M>
  static Model as_function(M model) {
    if constexpr (std::is_invocable_r_v<torch::Tensor, M&, const torch::Tensor&>) {
      return [model = std::move(model)](const torch::Tensor& x) mutable -> torch::Tensor {
        return model(x);
      };
    } else {
      return [model = std::move(model)](const torch::Tensor& x) mutable -> torch::Tensor {
        return model->forward(x);
      };
    }
  }

  static bool same_kind(const torch::Tensor& a, const torch::Tensor& b) {
    return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.device() == b.device();
  }

  void run() noexcept {
    at::init_num_threads();
    if (options_.intra_op_threads > 0) at::set_num_threads(options_.intra_op_threads);
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      cv_.wait(lock, [this] { return closing_ || !queue_.empty(); });
      if (queue_.empty()) return;  // closing, and every request answered
      const auto deadline = queue_.front().submitted + options_.max_delay;
      cv_.wait_until(lock, deadline,
                     [this] { return closing_ || queue_.size() >= options_.max_batch; });
      std::vector<Request> batch;
      batch.push_back(std::move(queue_.front()));
      queue_.pop_front();
      for (auto it = queue_.begin(); it != queue_.end() && batch.size() < options_.max_batch;) {
        if (same_kind(it->input, batch.front().input)) {
          batch.push_back(std::move(*it));
          it = queue_.erase(it);
        } else {
          ++it;
        }
      }
      lock.unlock();
      const auto failed = run_batch(batch);
      lock.lock();
      stats_.requests += batch.size();
      stats_.failed += failed;
      stats_.batches += 1;
      stats_.largest_batch = std::max(stats_.largest_batch, batch.size());
    }
  }

  torch::Tensor forward(const torch::Tensor& batch, std::size_t rows) {
    c10::InferenceMode inference;
    auto input = options_.device ? batch.to(*options_.device) : batch;
    auto output = model_(input);
    if (!output.defined() || output.dim() == 0 ||
        output.size(0) != static_cast<std::int64_t>(rows)) {
      throw std::runtime_error("BatchedInference: the model returned " +
                               (output.defined() ? "a tensor of shape " + c10::str(output.sizes())
                                                 : std::string("an undefined tensor")) +
                               " for a batch of " + std::to_string(rows) +
                               " (expected one output row per input)");
    }
    return output;
  }

  // Answers every request of the batch; returns how many got an error.
  std::size_t run_batch(std::vector<Request>& batch) noexcept {
    try {
      std::vector<torch::Tensor> inputs;
      inputs.reserve(batch.size());
      for (auto& request : batch) inputs.push_back(request.input);
      auto output = forward(torch::stack(inputs), batch.size());
      for (std::size_t i = 0; i < batch.size(); ++i) {
        batch[i].promise.set_value(own_row(output, static_cast<std::int64_t>(i)));
      }
      return 0;
    } catch (...) {
      if (batch.size() == 1) {  // nothing to isolate: running it again would only cost twice
        set_error(batch.front(), std::current_exception());
        return 1;
      }
      logger_->warn("BatchedInference: a batch of {} failed ({}); running its requests one by one",
                    batch.size(), detail::describe_exception(std::current_exception()));
    }
    std::size_t failed = 0;
    for (auto& request : batch) {
      try {
        auto output = forward(request.input.unsqueeze(0), 1);
        request.promise.set_value(own_row(output, 0));
      } catch (...) {
        ++failed;
        set_error(request, std::current_exception());
      }
    }
    return failed;
  }

  // A caller's row as a tensor of its own: a normal tensor (the batch ran under inference mode,
  // whose tensors refuse in-place updates and autograd outside it) that does not keep the whole
  // batch's output alive.
  static torch::Tensor own_row(const torch::Tensor& output, std::int64_t row) {
    return output[row].clone();
  }

  static void set_error(Request& request, std::exception_ptr error) noexcept {
    try {
      request.promise.set_exception(std::move(error));
    } catch (...) {  // already satisfied: nothing more to tell
    }
  }

  Model model_;
  BatchedInferenceOptions options_;
  std::shared_ptr<spdlog::logger> logger_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Request> queue_;
  bool closing_ = false;
  BatchedInferenceStats stats_;
  std::once_flag joined_;
  std::thread worker_;  // last: starts after everything it uses is built
};

}  // namespace torchguard
