// ScopeStack: Python's contextlib.ExitStack for C++ guards and callbacks.
//
//   torchguard::ScopeStack stack;
//   auto& session = stack.emplace<torchguard::TrainingSession>("run-1");
//   stack.callback([&] { loader.shutdown(); });
//   stack.on_failure([&] { dump_state(); });
//   ...                        // entries run in reverse order when `stack` leaves scope
//
// Every entry runs, even when some throw. `close()` rethrows the first error (its own type) and
// keeps the others in `suppressed_errors()`, logging each; the destructor only logs.
#pragma once

#include <cstddef>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>

#include "torchguard/core/error.hpp"
#include "torchguard/core/guard.hpp"
#include "torchguard/core/logging.hpp"
#include "torchguard/core/outcome.hpp"

namespace torchguard {
namespace detail {

template <class G, class = void>
struct has_close : std::false_type {};
template <class G>
struct has_close<G, std::void_t<decltype(std::declval<G&>().close())>> : std::true_type {};

enum class RunWhen { always, on_success, on_failure };

template <class F>
void invoke_cleanup(F& fn, Outcome outcome) {
  if constexpr (std::is_invocable_v<F&, Outcome>) {
    std::invoke(fn, outcome);
  } else {
    static_assert(std::is_invocable_v<F&>, "a cleanup must be callable as f() or f(Outcome)");
    std::invoke(fn);
  }
}

inline bool should_run(RunWhen when, Outcome outcome) noexcept {
  return when == RunWhen::always || (when == RunWhen::on_success) == (outcome == Outcome::success);
}

template <class F, RunWhen When>
struct Callback {
  template <class Arg>
  explicit Callback(std::in_place_t, Arg&& fn) : fn(std::forward<Arg>(fn)) {}
  void exit(Outcome outcome) {
    if (should_run(When, outcome)) invoke_cleanup(fn, outcome);
  }
  F fn;
};

// Owns a guard. At its turn the guard is told how the scope ended, when it can be told
// (`close(Outcome)`, or `close()` on success, so that its errors propagate), then destroyed.
template <class G>
struct OwnedGuard {
  template <class... Args>
  explicit OwnedGuard(std::in_place_t, Args&&... args) : guard(std::forward<Args>(args)...) {}
  void exit(Outcome outcome) {
    if constexpr (has_close_outcome<G>::value) {
      guard.close(outcome);
    } else if constexpr (has_close<G>::value) {
      if (outcome == Outcome::success) guard.close();
    }
  }
  G guard;
};

// Entries are stored in place, without an allocation, when they are small and cannot throw
// when moved or destroyed (the stack moves them as it grows). The others live on the heap, and
// so do owned guards: emplace() hands out a reference that must survive the stack's growth.
inline constexpr std::size_t inline_size = 48;

template <class T>
struct stored_inline
    : std::bool_constant<sizeof(T) <= inline_size && alignof(T) <= alignof(std::max_align_t) &&
                         std::is_nothrow_move_constructible_v<T> &&
                         std::is_nothrow_destructible_v<T>> {};
template <class G>
struct stored_inline<OwnedGuard<G>> : std::false_type {};

// A hand-made vtable. `destroy` may throw: a guard whose destructor throws is reported like any
// other failed cleanup instead of terminating the program.
struct EntryOps {
  void (*exit)(void* storage, Outcome outcome);
  void (*destroy)(void* storage);                   // null: nothing to do
  void (*relocate)(void* from, void* to) noexcept;  // null: copying the bytes will do
};

template <class T, bool Inline = stored_inline<T>::value>
struct EntryOpsFor {
  static T* get(void* storage) noexcept {
    if constexpr (Inline) {
      return std::launder(static_cast<T*>(storage));
    } else {
      return *std::launder(static_cast<T**>(storage));
    }
  }
  static void exit(void* storage, Outcome outcome) { get(storage)->exit(outcome); }
  static void destroy(void* storage) {
    if constexpr (Inline) {
      get(storage)->~T();
    } else {
      delete get(storage);  // a delete-expression lets a throwing destructor propagate
    }
  }
  static void relocate(void* from, void* to) noexcept {
    ::new (to) T(std::move(*get(from)));
    get(from)->~T();
  }
  static constexpr EntryOps make_ops() {  // names `relocate` only for types it can move
    EntryOps ops{&exit, &destroy, nullptr};
    if constexpr (Inline && std::is_trivially_destructible_v<T>) ops.destroy = nullptr;
    if constexpr (Inline && !std::is_trivially_copyable_v<T>) ops.relocate = &relocate;
    return ops;
  }
  static constexpr EntryOps ops = make_ops();
};

// One entry of the stack: an object of any type T with `exit(Outcome)`, in place or on the heap.
class Entry {
 public:
  template <class T, class... Args>
  explicit Entry(std::in_place_type_t<T>, Args&&... args) {
    if constexpr (stored_inline<T>::value) {
      ::new (static_cast<void*>(storage_)) T(std::in_place, std::forward<Args>(args)...);
    } else {
      ::new (static_cast<void*>(storage_)) T*(new T(std::in_place, std::forward<Args>(args)...));
    }
    ops_ = &EntryOpsFor<T>::ops;
  }
  // Adopts an object built beforehand (on the heap), once the vector has room for the entry.
  template <class T>
  explicit Entry(std::unique_ptr<T>&& owned) noexcept {
    static_assert(!stored_inline<T>::value);
    ::new (static_cast<void*>(storage_)) T*(owned.release());
    ops_ = &EntryOpsFor<T>::ops;
  }
  Entry(Entry&& other) noexcept : ops_(std::exchange(other.ops_, nullptr)) {
    if (ops_ && ops_->relocate) {
      ops_->relocate(other.storage_, storage_);
    } else {
      std::memcpy(storage_, other.storage_, inline_size);
    }
  }
  Entry& operator=(Entry&&) = delete;
  // A live entry is destroyed here only when close() was cut short (its logging threw).
  ~Entry() {
    try {
      destroy();
    } catch (...) {
    }
  }

  void exit(Outcome outcome) { ops_->exit(storage_, outcome); }
  void destroy() {
    const EntryOps* ops = std::exchange(ops_, nullptr);
    if (ops && ops->destroy) ops->destroy(storage_);
  }

 private:
  alignas(std::max_align_t) unsigned char storage_[inline_size];
  const EntryOps* ops_ = nullptr;
};

}  // namespace detail

struct ScopeStackOptions {
  std::shared_ptr<spdlog::logger> logger;  // where failed cleanups are logged
};

namespace detail {

// A ScopeStack's entries, and how they close.
struct ScopeStackState {
  static constexpr const char* close_error_prefix =
      "ScopeStack: a cleanup failed while the stack was destroyed";

  explicit ScopeStackState(std::shared_ptr<spdlog::logger> logger_to_use)
      : logger(or_default(std::move(logger_to_use))) {}

  // Runs every entry, newest first (see ScopeStack::close).
  void close(Outcome outcome) {
    suppressed.clear();
    std::exception_ptr first_error;
    while (!entries.empty()) {
      Entry entry = std::move(entries.back());  // an entry may push while it runs
      entries.pop_back();
      if (std::exception_ptr error = run_entry(entry, outcome)) {
        outcome = Outcome::failure;
        if (!first_error) {
          first_error = error;
        } else {
          logger->error("ScopeStack: another cleanup failed too: {}", describe(error));
          suppressed.push_back(error);
        }
      }
    }
    if (first_error) std::rethrow_exception(first_error);
  }

  // Runs one entry's exit and destroys it; returns the first error of the two.
  std::exception_ptr run_entry(Entry& entry, Outcome outcome) {
    std::exception_ptr error;
    try {
      entry.exit(outcome);
    } catch (...) {
      error = std::current_exception();
    }
    try {
      entry.destroy();
    } catch (...) {
      if (!error) {
        error = std::current_exception();
      } else {
        logger->error("ScopeStack: a guard's destructor threw after its close() failed: {}",
                      describe(std::current_exception()));
        suppressed.push_back(std::current_exception());
      }
    }
    return error;
  }

  std::shared_ptr<spdlog::logger> logger;
  std::vector<Entry> entries;
  std::vector<std::exception_ptr> suppressed;
};

}  // namespace detail

// A run-time LIFO stack of guards and callbacks. Not thread-safe: one owner at a time. A
// moved-from stack is empty: it may be asked its size, closed, destroyed or assigned to.
class ScopeStack {
 public:
  using Options = ScopeStackOptions;

  explicit ScopeStack(std::shared_ptr<spdlog::logger> logger = nullptr)
      : s_(std::in_place, std::move(logger)) {}
  explicit ScopeStack(Options options) : ScopeStack(std::move(options.logger)) {}

  // A move assignment closes this stack's own entries first, then takes the other's. The
  // destructor runs what is left: failure when the scope is left by an exception. Never throws.
  ScopeStack(ScopeStack&&) noexcept = default;
  ScopeStack& operator=(ScopeStack&&) noexcept = default;

  // Builds a guard in place and owns it; returns a reference valid until the stack closes.
  template <class G, class... Args>
  G& emplace(Args&&... args) {
    // Built before it joins the vector: a guard's constructor may push onto this stack too.
    auto owned =
        std::make_unique<detail::OwnedGuard<G>>(std::in_place, std::forward<Args>(args)...);
    G& guard = owned->guard;
    s_->entries.emplace_back(std::move(owned));
    return guard;
  }

  // Adopts a movable guard (pass an rvalue); returns a reference to the stack's copy.
  template <class G>
  std::decay_t<G>& enter(G&& guard) {
    static_assert(!std::is_lvalue_reference_v<G>,
                  "enter() takes ownership: pass a temporary or std::move(guard)");
    return emplace<std::decay_t<G>>(std::forward<G>(guard));
  }

  // Runs `fn()` or `fn(Outcome)` at close, whatever the outcome. Move-only callables are fine.
  template <class F>
  void callback(F&& fn) {
    push_callback<detail::RunWhen::always>(std::forward<F>(fn));
  }

  // Runs `fn` at close only when the scope succeeded.
  template <class F>
  void on_success(F&& fn) {
    push_callback<detail::RunWhen::on_success>(std::forward<F>(fn));
  }

  // Runs `fn` at close only when the scope failed (an exception, or close(Outcome::failure)).
  template <class F>
  void on_failure(F&& fn) {
    push_callback<detail::RunWhen::on_failure>(std::forward<F>(fn));
  }

  // Moves every entry into a new stack and leaves this one empty: the usual way to keep
  // resources acquired in a constructor when the constructor succeeds.
  ScopeStack pop_all() {
    ScopeStack taken(s_->logger);
    taken.s_->entries = std::move(s_->entries);
    s_->entries.clear();
    return taken;
  }

  // Runs every entry now, newest first. Success unless an exception is unwinding this scope.
  void close() { close(s_.scope_outcome()); }

  // Runs every entry now, newest first, telling them `outcome`. Once an entry throws, the rest
  // are told Outcome::failure (as Python's __exit__ sees the exception). Every entry runs; the
  // first error is rethrown as it was thrown, the others are logged and kept.
  void close(Outcome outcome) { s_.close(outcome); }

  std::size_t size() const noexcept { return s_ ? s_->entries.size() : 0; }
  bool empty() const noexcept { return size() == 0; }

  // The errors of the last close() after the one it rethrew, in the order they happened.
  const std::vector<std::exception_ptr>& suppressed_errors() const noexcept {
    static const std::vector<std::exception_ptr> none;
    return s_ ? s_->suppressed : none;
  }

 private:
  template <detail::RunWhen When, class F>
  void push_callback(F&& fn) {
    try {
      // Strong guarantee: vector growth moves entries with noexcept moves only.
      s_->entries.emplace_back(std::in_place_type<detail::Callback<std::decay_t<F>, When>>,
                               std::forward<F>(fn));
    } catch (...) {
      // The entry could not be stored: run the cleanup now, as the scope it guards has failed.
      if (detail::should_run(When, Outcome::failure)) {
        try {
          detail::invoke_cleanup(fn, Outcome::failure);
        } catch (...) {
          s_->logger->error("ScopeStack: a cleanup run at push failed: {}",
                            describe(std::current_exception()));
        }
      }
      throw;
    }
  }

  detail::GuardState<detail::ScopeStackState> s_;
};

}  // namespace torchguard
