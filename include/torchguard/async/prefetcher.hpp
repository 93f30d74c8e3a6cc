// Prefetcher: loads items ahead of the consumer on a bounded set of worker threads, in a window
// that grows (to max_depth) while a slow item holds the consumer up, optionally staging their
// tensors on a CUDA device.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include <ATen/ThreadLocalState.h>
#include <spdlog/fmt/fmt.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "torchguard/async/cuda_stage.hpp"
#include "torchguard/async/task_pool.hpp"
#include "torchguard/core/cancellation.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/core/guard.hpp"
#include "torchguard/core/logging.hpp"
#include "torchguard/core/outcome.hpp"

namespace torchguard {

struct PrefetchOptions {
  std::size_t depth = 4;  // items loading or loaded ahead of the consumer, to begin with
  // How far `depth` may grow (0: twice depth; set it to depth for a fixed window). In input order
  // a slow item holds up the consumer while the loads after it are done and loaders wait for
  // room: then the window grows by one item per waiting loader, and again while that lasts, up
  // to max_depth, and stays grown. Bounds the items held at once, as depth did.
  std::size_t max_depth = 0;
  std::size_t workers = 0;  // loads at once (0: depth)
  Order order = Order::input;
  // A CUDA device: each item's tensors are pinned and copied there non-blocking on a side stream,
  // so the copy overlaps the consumer's compute; next() makes the current stream wait for it.
  std::optional<torch::Device> device;
  bool pin_memory = true;                  // with a CUDA device
  CancellationToken cancellation;          // once cancelled: as cancel() (polled every 10 ms)
  std::shared_ptr<spdlog::logger> logger;  // for what the destructor cannot throw
  // Names item `index` in its TaskError (input()), in the user's terms: "batch 3 of epoch 2", a
  // file name. Unset (the default): no name, and the message says "item <index> of <count>".
  // Called on the consumer's thread, at the failed item's turn.
  std::function<std::string(std::size_t index)> item_name;
};

// Loads items 0..count-1 ahead of the consumer with load(index) (or load(index, token)), keeping
// `depth` in flight (more, up to max_depth, while a slow item holds the consumer up and loaders
// wait for room). An item's exception comes out of next() at that item's turn, as TaskError
// leading with the item's own message, then its name (item_name) and index; later items still
// come. close() and the destructor cancel what runs and wait for it. Move-only; a moved-from
// Prefetcher may only be destroyed or assigned to.
//
// Given a token already cancelled, it starts no load: next() returns nullopt and cancelled() is
// true (unless count is 0), as a gather with such a token runs nothing.
// After a cancel (cancel(), close(), or options.cancellation cancelled), next() and
// next_indexed() return nullopt, at once and from then on, even for items already loaded: a
// range-for ends as it does after the last item. They never throw Cancelled (the documented
// contract, and what a training loop that saves its checkpoint after the loop relies on).
// cancelled() tells the two ends apart: true when a cancel ended the items before the last one
// was taken.
template <class T>
class Prefetcher {
 public:
  using Options = PrefetchOptions;

  template <class Load>
  Prefetcher(std::size_t count, Load load, PrefetchOptions options = {})
      : s_(std::in_place, count, std::move(load), std::move(options)) {}

  // The loads run on the pool, which a move hands over whole: they never see `this`. A move
  // assignment (and the destructor) cancels the loads the Prefetcher held and waits for them.
  Prefetcher(Prefetcher&&) noexcept = default;
  Prefetcher& operator=(Prefetcher&&) noexcept = default;

  std::size_t size() const noexcept { return s_->pool->size(); }

  // The next item with its index, or nullopt after the last one, or after a cancel (cancel(),
  // close(), options.cancellation; cancelled() then says so). A failed item throws TaskError.
  std::optional<Indexed<T>> next_indexed() {
    auto& s = *s_;
    auto& pool = *s.pool;
    auto lock = pool.lock();
    std::size_t index = 0;
    for (;;) {
      if (s.options.cancellation.cancelled()) pool.stop(lock);
      if (s.taken >= pool.size() || pool.stopped()) return std::nullopt;
      if (s.options.order == Order::input) {
        index = s.taken;
        if (is_done(pool.slot(index))) break;
      } else if (s.taken < pool.completion_order().size()) {
        index = pool.completion_order()[s.taken];
        break;
      }
      // The consumer waits while loaders wait for room: the window is too short for this wait.
      if (pool.window_holds_workers()) pool.grow_window(lock, s.options.max_depth);
      // The pool stops when the token is cancelled, and notifies.
      pool.wait_until(lock, std::chrono::steady_clock::time_point::max());
    }
    ++s.taken;
    pool.consume(lock);
    auto& slot = pool.slot(index);
    if (slot.error) {
      auto error = std::move(slot.error);
      lock.unlock();  // the user's item_name runs without the pool's lock
      throw TaskError(index, pool.size(), name_of(index), std::move(error));
    }
    Item item = std::move(*slot.value);
    slot.value.reset();
    lock.unlock();
    if (item.ready) item.ready(item.value);
    return Indexed<T>{index, std::move(item.value)};
  }

  // The next item, or nullopt after the last one or after a cancel: as next_indexed().
  std::optional<T> next() {
    auto item = next_indexed();
    if (!item) return std::nullopt;
    return std::move(item->value);
  }

  // True when a cancel (cancel(), close(), or options.cancellation, even one that next() has not
  // seen yet) ended the items before the last one was taken: next() returns nullopt though items
  // remain. False while items remain and no cancel came, and after the last
  // item was taken (a cancel then, e.g. close(), ends nothing). Lets a loop tell an interrupted
  // epoch from a finished one:
  //   for (auto& batch : batches) train_step(batch);
  //   if (batches.cancelled()) { /* interrupted: save, exit 130 */ }
  bool cancelled() const {
    if (!s_) return false;
    auto lock = s_->pool->lock();
    if (s_->taken >= s_->pool->size()) return false;
    return s_->pool->stopped() || s_->options.cancellation.cancelled();
  }

  // Stops loading: running loads see their tokens cancelled and are waited for. next() returns
  // nullopt from then on; cancelled() is true if items remained.
  void cancel() noexcept {
    if (s_) s_->cancel();
  }

  // The guard's close: cancel(). Idempotent; the outcome changes nothing.
  void close(Outcome outcome = Outcome::success) { s_.close(outcome); }

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
  using Pool = detail::TaskPool<Item>;

  // The options, the pool of loads and the consumer's place.
  struct State {
    static constexpr const char* close_error_prefix = "Prefetcher: close failed";

    template <class Load>
    State(std::size_t count, Load load, PrefetchOptions prefetch_options)
        : options(std::move(prefetch_options)), logger(detail::or_default(options.logger)) {
      if (options.depth == 0) throw OptionsError("Prefetcher: depth must be at least 1");
      if (options.device) {
        if constexpr (!detail::stageable<T>::value) {
          throw OptionsError(
              "Prefetcher: a staging device needs items made of tensors (a tensor, an Example, "
              "or vectors, pairs and tuples of them)");
        }
        options.device = detail::check_stage_device(*options.device);  // with its index
      }
      if (options.max_depth == 0) {
        const auto most = std::numeric_limits<std::size_t>::max();
        options.max_depth = options.depth > most / 2 ? most : 2 * options.depth;
      }
      if (options.max_depth < options.depth) {
        throw OptionsError(fmt::format("Prefetcher: max_depth ({}) must not be below depth ({})",
                                       options.max_depth, options.depth));
      }
      const std::size_t workers = options.workers ? options.workers : options.depth;
      if (workers > options.depth) {
        throw OptionsError(fmt::format("Prefetcher: workers ({}) must not exceed depth ({})",
                                       workers, options.depth));
      }
      typename Pool::Config config;
      config.workers = workers;
      config.window = options.depth;
      config.outside = options.cancellation;  // already cancelled: no load starts
      // Loads run concurrently on the workers, with the caller's LibTorch thread-local state.
      pool = std::make_unique<Pool>(
          count,
          [load = std::make_shared<Load>(std::move(load)), device = options.device,
           pin = options.pin_memory, state = at::ThreadLocalState()](
              std::size_t index, const CancellationToken& token) -> Item {
            (void)pin;
            at::ThreadLocalStateGuard caller_state(state);
            Item item{detail::invoke_with_token(*load, index, token), {}};
            if constexpr (detail::stageable<T>::value) {
              if (device) item.ready = detail::stage_to_device(item.value, *device, pin);
            }
            return item;
          },
          std::move(config));
    }

    void cancel() noexcept {
      {
        auto lock = pool->lock();
        pool->stop(lock);
      }
      pool->join();
    }
    void close(Outcome) { cancel(); }

    PrefetchOptions options;
    std::shared_ptr<spdlog::logger> logger;
    std::unique_ptr<Pool> pool;
    std::size_t taken = 0;
  };

  // The item's name for its error, or empty; a failing item_name must not hide the item's error.
  std::string name_of(std::size_t index) const noexcept {
    try {
      return s_->options.item_name ? s_->options.item_name(index) : std::string();
    } catch (...) {
      return {};
    }
  }

  static bool is_done(const typename Pool::Slot& slot) {
    using Status = typename Pool::Status;
    return slot.status == Status::succeeded || slot.status == Status::failed;
  }

  detail::GuardState<State> s_;
};

}  // namespace torchguard
