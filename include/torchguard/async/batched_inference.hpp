// BatchedInference: merges single inputs from concurrent callers into batches for one model
// thread; a batch is what queued while the previous one ran (it never waits to fill).
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
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "torchguard/core/cancellation.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/core/guard.hpp"
#include "torchguard/core/logging.hpp"
#include "torchguard/core/outcome.hpp"

namespace torchguard {

struct BatchedInferenceOptions {
  std::size_t max_batch = 32;
  // The most a request waits for others to join its batch. An upper bound only: a batch runs as
  // soon as the model thread is free, with what queued while the previous batch ran (up to
  // max_batch), so a request that finds the thread idle runs at once and never waits for company.
  std::chrono::microseconds max_delay{2000};
  // Intra-op threads for the model (0: leave LibTorch's setting). Model calls run on one thread,
  // one batch at a time, so concurrent callers never multiply the intra-op pool. LibTorch's
  // setting is process-wide.
  int intra_op_threads = 0;
  std::optional<torch::Device> device;  // where inputs go before the model (default: stay)
  // Once cancelled: submit() throws Cancelled, and queued requests are answered with Cancelled
  // (checked before each batch; a batch already running finishes).
  CancellationToken cancellation;
  std::shared_ptr<spdlog::logger> logger;
};

struct BatchedInferenceStats {
  std::uint64_t requests = 0;  // answered
  std::uint64_t failed = 0;    // answered with an error (Cancelled included)
  std::uint64_t batches = 0;
  std::size_t largest_batch = 0;
};

namespace detail {

// BatchedInference's state and model thread. It stays at one address (on the heap), so a
// BatchedInference can move while the thread runs. Its owner closes it before it goes.
class BatchServer {
 public:
  using Model = std::function<torch::Tensor(const torch::Tensor&)>;
  static constexpr const char* close_error_prefix = "BatchedInference: close failed";

  BatchServer(Model model, BatchedInferenceOptions options)
      : logger(or_default(options.logger)), model_(std::move(model)), options_(std::move(options)) {
    if (options_.max_batch == 0) {
      throw OptionsError("BatchedInference: max_batch must be at least 1");
    }
    if (options_.max_delay.count() < 0) {
      throw OptionsError("BatchedInference: max_delay must not be negative");
    }
    worker_ = std::thread([this] { run(); });
  }

  BatchServer(const BatchServer&) = delete;
  BatchServer& operator=(const BatchServer&) = delete;

  // Where a failed batch and a failed close are logged. Built first, from the options before
  // options_ takes them.
  const std::shared_ptr<spdlog::logger> logger;

  std::future<torch::Tensor> submit(torch::Tensor input) {
    if (!input.defined()) throw OptionsError("BatchedInference: the input is undefined");
    std::promise<torch::Tensor> promise;
    auto future = promise.get_future();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // A cancel wins over a close, whichever came first: a caller stopping on Cancelled stops.
      if (options_.cancellation.cancelled()) {
        throw Cancelled("BatchedInference: submit() after cancellation");
      }
      if (closing_) throw Error("BatchedInference: submit() after close()");
      queue_.push_back(Request{std::move(input), std::move(promise)});
    }
    cv_.notify_one();
    return future;
  }

  // Stops new requests, answers every queued one, and joins the model thread. Idempotent. Throws
  // what the join throws (std::system_error). Called from the model's own thread (the model
  // closes its server), it cannot wait for itself: it stops new requests and returns; the thread
  // answers what is queued and ends, and a later close() or the destructor joins it.
  void close() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      closing_ = true;
    }
    cv_.notify_one();
    if (serving() == this) return;
    std::call_once(joined_, [this] {  // close() from two threads: one joins, both return
      if (worker_.joinable()) worker_.join();
    });
  }
  void close(Outcome) { close(); }

  BatchedInferenceStats stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

 private:
  struct Request {
    torch::Tensor input;
    std::promise<torch::Tensor> promise;
  };

  static bool same_kind(const torch::Tensor& a, const torch::Tensor& b) {
    return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.device() == b.device();
  }

  // The server whose model thread this is, on that thread; null elsewhere.
  static const BatchServer*& serving() noexcept {
    static thread_local const BatchServer* server = nullptr;
    return server;
  }

  void run() noexcept {
    serving() = this;
    at::init_num_threads();
    if (options_.intra_op_threads > 0) at::set_num_threads(options_.intra_op_threads);
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      cv_.wait(lock, [this] { return closing_ || !queue_.empty(); });
      if (queue_.empty()) return;  // closing, and every request answered
      // No wait for the batch to fill: what queued while the model ran is the next batch, and a
      // request that finds this thread idle runs at once (continuous batching). The token is
      // checked before each batch.
      if (options_.cancellation.cancelled()) {
        refuse_queued();
        continue;
      }
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

  // Answers every queued request with Cancelled. Called with the lock held.
  void refuse_queued() noexcept {
    for (auto& request : queue_) {
      set_error(request, std::make_exception_ptr(
                             Cancelled("BatchedInference: cancelled before the request ran")));
    }
    stats_.requests += queue_.size();
    stats_.failed += queue_.size();
    queue_.clear();
  }

  torch::Tensor forward(const torch::Tensor& batch, std::size_t rows) {
    c10::InferenceMode inference;
    auto input = options_.device ? batch.to(*options_.device) : batch;
    auto output = model_(input);
    if (!output.defined() || output.dim() == 0 ||
        output.size(0) != static_cast<std::int64_t>(rows)) {
      throw Error(fmt::format(
          "BatchedInference: the model returned {} for a batch of {} (expected one output row per "
          "input)",
          output.defined() ? fmt::format("a tensor of shape {}", c10::str(output.sizes()))
                           : std::string("an undefined tensor"),
          rows));
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
      logger->warn("BatchedInference: a batch of {} failed ({}); running its requests one by one",
                   batch.size(), describe(std::current_exception()));
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
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Request> queue_;
  bool closing_ = false;
  BatchedInferenceStats stats_;
  std::once_flag joined_;
  std::thread worker_;  // last: starts after everything it uses is built
};

}  // namespace detail

// Merges single inputs from concurrent callers into batches (up to max_batch) and runs the model
// on them under inference mode, on one thread. A request that finds the thread idle runs at once;
// requests that arrive while a batch runs make the next batch, which runs as soon as the model
// is free (continuous batching: a lone caller pays no delay, many callers get large batches).
// Each caller gets a future of its own output row. A batch the model fails on is rerun one
// request at a time, so one bad input fails only its own request. Inputs of different shapes go
// in different batches. close() (and the destructor) stops new requests and answers every
// pending one. Move-only; a moved-from BatchedInference may only be destroyed or assigned to.
//
// After options.cancellation is cancelled: submit() throws Cancelled; every request still queued
// is answered with Cancelled (its future's get() throws it), a batch already running finishes
// and answers normally; gather() over the futures then throws Cancelled, not TaskError (unless a
// request failed for another reason). close() returns normally; stats() counts the cancelled
// requests as answered and failed. submit() after a cancel throws Cancelled, after close() too.
class BatchedInference {
 public:
  using Options = BatchedInferenceOptions;
  using Model = detail::BatchServer::Model;

  template <class M>
  BatchedInference(M model, std::size_t max_batch, std::chrono::microseconds max_delay)
      : BatchedInference(std::move(model), options_for(max_batch, max_delay)) {}

  template <class M>
  BatchedInference(M model, BatchedInferenceOptions options)
      : s_(std::in_place, as_function(std::move(model)), std::move(options)) {}

  // The destructor (and a move assignment, for the old server) closes, logging what it throws.
  BatchedInference(BatchedInference&&) noexcept = default;
  BatchedInference& operator=(BatchedInference&&) noexcept = default;

  // Queues one input (no batch dimension) and returns the future of its output row. Throws
  // Cancelled once options.cancellation is cancelled (closed or not), else Error after close().
  std::future<torch::Tensor> submit(torch::Tensor input) { return s_->submit(std::move(input)); }

  // The guard's close: stops new requests, answers every queued one, and joins the model thread.
  // Idempotent; the outcome changes nothing. Throws what goes wrong (the join's
  // std::system_error), as every guard's close() does; the destructor logs it instead. From the
  // model's own thread it does not wait for that thread: see BatchServer::close().
  void close(Outcome outcome = Outcome::success) { s_.close(outcome); }

  BatchedInferenceStats stats() const { return s_->stats(); }

 private:
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

  detail::GuardState<detail::BatchServer> s_;
};

}  // namespace torchguard
