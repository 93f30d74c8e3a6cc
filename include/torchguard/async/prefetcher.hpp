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

#include "torchguard/async/task_pool.hpp"
#include "torchguard/core/cancellation.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/core/logging.hpp"
#include "torchguard/core/outcome.hpp"
#include "torchguard/detail/cuda_stage.hpp"

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
      : options_(std::move(options)) {
    if (options_.depth == 0) throw OptionsError("Prefetcher: depth must be at least 1");
    if (options_.device) {
      if constexpr (!detail::stageable<T>::value) {
        throw OptionsError(
            "Prefetcher: a staging device needs items made of tensors (a tensor, an Example, or "
            "vectors, pairs and tuples of them)");
      }
      options_.device = detail::check_stage_device(*options_.device);  // with its index
    }
    if (options_.max_depth == 0) {
      const auto most = std::numeric_limits<std::size_t>::max();
      options_.max_depth = options_.depth > most / 2 ? most : 2 * options_.depth;
    }
    if (options_.max_depth < options_.depth) {
      throw OptionsError(fmt::format("Prefetcher: max_depth ({}) must not be below depth ({})",
                                     options_.max_depth, options_.depth));
    }
    const std::size_t workers = options_.workers ? options_.workers : options_.depth;
    if (workers > options_.depth) {
      throw OptionsError(fmt::format("Prefetcher: workers ({}) must not exceed depth ({})", workers,
                                     options_.depth));
    }
    typename detail::TaskPool<Item>::Config config;
    config.workers = workers;
    config.window = options_.depth;
    config.outside = options_.cancellation;  // already cancelled: no load starts
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
        std::move(config));
  }

  // The loads run on the pool, which a move hands over whole: they never see `this`.
  Prefetcher(Prefetcher&&) noexcept = default;
  Prefetcher& operator=(Prefetcher&&) noexcept = default;  // the old loads are cancelled
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  ~Prefetcher() {
    try {
      close(Outcome::success);
    } catch (...) {
      detail::or_default(options_.logger)
          ->error("Prefetcher: close failed: {}", describe(std::current_exception()));
    }
  }

  std::size_t size() const noexcept { return pool_->size(); }

  // The next item with its index, or nullopt after the last one, or after a cancel (cancel(),
  // close(), options.cancellation; cancelled() then says so). A failed item throws TaskError.
  std::optional<Indexed<T>> next_indexed() {
    auto lock = pool_->lock();
    std::size_t index = 0;
    for (;;) {
      if (options_.cancellation.cancelled()) pool_->stop(lock);
      if (taken_ >= pool_->size() || pool_->stopped()) return std::nullopt;
      if (options_.order == Order::input) {
        index = taken_;
        if (is_done(pool_->slot(index))) break;
      } else if (taken_ < pool_->completion_order().size()) {
        index = pool_->completion_order()[taken_];
        break;
      }
      // The consumer waits while loaders wait for room: the window is too short for this wait.
      if (pool_->window_holds_workers()) pool_->grow_window(lock, options_.max_depth);
      // The pool stops when the token is cancelled, and notifies.
      pool_->wait_until(lock, std::chrono::steady_clock::time_point::max());
    }
    ++taken_;
    pool_->consume(lock);
    auto& slot = pool_->slot(index);
    if (slot.error) {
      auto error = std::move(slot.error);
      lock.unlock();  // the user's item_name runs without the pool's lock
      throw TaskError(index, pool_->size(), name_of(index), std::move(error));
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
    if (!pool_) return false;
    auto lock = pool_->lock();
    if (taken_ >= pool_->size()) return false;
    return pool_->stopped() || options_.cancellation.cancelled();
  }

  // Stops loading: running loads see their tokens cancelled and are waited for. next() returns
  // nullopt from then on; cancelled() is true if items remained.
  void cancel() noexcept {
    if (!pool_) return;
    {
      auto lock = pool_->lock();
      pool_->stop(lock);
    }
    pool_->join();
  }

  // The guard's close: cancel(). Idempotent; the outcome changes nothing.
  void close(Outcome /*outcome*/ = Outcome::success) { cancel(); }

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

  // The item's name for its error, or empty; a failing item_name must not hide the item's error.
  std::string name_of(std::size_t index) const noexcept {
    try {
      return options_.item_name ? options_.item_name(index) : std::string();
    } catch (...) {
      return {};
    }
  }

  static bool is_done(const typename detail::TaskPool<Item>::Slot& slot) {
    using Status = typename detail::TaskPool<Item>::Status;
    return slot.status == Status::succeeded || slot.status == Status::failed;
  }

  PrefetchOptions options_;
  std::unique_ptr<detail::TaskPool<Item>> pool_;
  std::size_t taken_ = 0;
};

}  // namespace torchguard
