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
#include <exception>
#include <functional>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>

#include "torchguard/core/guard.hpp"
#include "torchguard/core/logging.hpp"
#include "torchguard/core/outcome.hpp"

namespace torchguard {
namespace detail {

template <class G, class = void>
struct has_close : std::false_type {};
template <class G>
struct has_close<G, std::void_t<decltype(std::declval<G&>().close())>> : std::true_type {};

// One entry of the stack. The destructor may throw: a guard whose destructor throws is reported
// like any other failed cleanup instead of terminating the program.
class ScopeEntry {
 public:
  virtual ~ScopeEntry() noexcept(false) = default;
  virtual void exit(Outcome outcome) = 0;
};

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

template <class F>
class CallbackEntry final : public ScopeEntry {
 public:
  template <class Arg>
  CallbackEntry(Arg&& fn, RunWhen when) : fn_(std::forward<Arg>(fn)), when_(when) {}
  void exit(Outcome outcome) override {
    if (should_run(when_, outcome)) invoke_cleanup(fn_, outcome);
  }

 private:
  F fn_;
  RunWhen when_;
};

// Owns a guard. At its turn the guard is told how the scope ended, when it can be told
// (`close(Outcome)`, or `close()` on success, so that its errors propagate), then destroyed.
template <class G>
class GuardEntry final : public ScopeEntry {
 public:
  template <class... Args>
  explicit GuardEntry(std::in_place_t, Args&&... args) : guard_(std::forward<Args>(args)...) {}
  G& guard() noexcept { return guard_; }
  void exit(Outcome outcome) override {
    if constexpr (has_close_outcome<G>::value) {
      guard_.close(outcome);
    } else if constexpr (has_close<G>::value) {
      if (outcome == Outcome::success) guard_.close();
    }
  }

 private:
  G guard_;
};

}  // namespace detail

struct ScopeStackOptions {
  std::shared_ptr<spdlog::logger> logger;  // where failed cleanups are logged
};

// A run-time LIFO stack of guards and callbacks. Not thread-safe: one owner at a time.
class ScopeStack {
 public:
  using Options = ScopeStackOptions;

  explicit ScopeStack(std::shared_ptr<spdlog::logger> logger = nullptr)
      : logger_(detail::or_default(std::move(logger))) {}
  explicit ScopeStack(Options options) : ScopeStack(std::move(options.logger)) {}

  ScopeStack(ScopeStack&& other) noexcept
      : logger_(other.logger_), entries_(std::move(other.entries_)) {
    other.entries_.clear();
  }

  // Closes this stack's own entries first, then takes the other's.
  ScopeStack& operator=(ScopeStack&& other) noexcept {
    if (this != &other) {
      close_noexcept(Outcome::success);
      entries_ = std::move(other.entries_);
      other.entries_.clear();
      logger_ = other.logger_;
    }
    return *this;
  }

  ScopeStack(const ScopeStack&) = delete;
  ScopeStack& operator=(const ScopeStack&) = delete;

  // Runs what is left. Failure when the scope is left by an exception. Never throws.
  ~ScopeStack() { close_noexcept(exit_detector_.outcome()); }

  // Builds a guard in place and owns it; returns a reference valid until the stack closes.
  template <class G, class... Args>
  G& emplace(Args&&... args) {
    reserve_one();
    auto entry =
        std::make_unique<detail::GuardEntry<G>>(std::in_place, std::forward<Args>(args)...);
    G& guard = entry->guard();
    entries_.push_back(std::move(entry));  // cannot throw: capacity reserved above
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
    push_callback(std::forward<F>(fn), detail::RunWhen::always);
  }

  // Runs `fn` at close only when the scope succeeded.
  template <class F>
  void on_success(F&& fn) {
    push_callback(std::forward<F>(fn), detail::RunWhen::on_success);
  }

  // Runs `fn` at close only when the scope failed (an exception, or close(Outcome::failure)).
  template <class F>
  void on_failure(F&& fn) {
    push_callback(std::forward<F>(fn), detail::RunWhen::on_failure);
  }

  // Moves every entry into a new stack and leaves this one empty: the usual way to keep
  // resources acquired in a constructor when the constructor succeeds.
  ScopeStack pop_all() {
    ScopeStack taken(logger_);
    taken.entries_ = std::move(entries_);
    entries_.clear();
    return taken;
  }

  // Runs every entry now, newest first. Success unless an exception is unwinding this scope.
  void close() { close(exit_detector_.outcome()); }

  // Runs every entry now, newest first, telling them `outcome`. Once an entry throws, the rest
  // are told Outcome::failure (as Python's __exit__ sees the exception). Every entry runs; the
  // first error is rethrown as it was thrown, the others are logged and kept.
  void close(Outcome outcome) {
    suppressed_.clear();
    std::exception_ptr first_error;
    while (!entries_.empty()) {
      std::unique_ptr<detail::ScopeEntry> entry = std::move(entries_.back());
      entries_.pop_back();
      if (std::exception_ptr error = run_entry(std::move(entry), outcome)) {
        outcome = Outcome::failure;
        if (!first_error) {
          first_error = error;
        } else {
          logger_->error("ScopeStack: another cleanup failed too: {}", describe(error));
          suppressed_.push_back(error);
        }
      }
    }
    if (first_error) std::rethrow_exception(first_error);
  }

  std::size_t size() const noexcept { return entries_.size(); }
  bool empty() const noexcept { return entries_.empty(); }

  // The errors of the last close() after the one it rethrew, in the order they happened.
  const std::vector<std::exception_ptr>& suppressed_errors() const noexcept { return suppressed_; }

 private:
  void reserve_one() {
    // Grow geometrically here so that push_back below never allocates (and never throws).
    if (entries_.size() == entries_.capacity()) {
      entries_.reserve(entries_.empty() ? 8 : entries_.capacity() * 2);
    }
  }

  template <class F>
  void push_callback(F&& fn, detail::RunWhen when) {
    using Fn = std::decay_t<F>;
    try {
      reserve_one();
      entries_.push_back(std::make_unique<detail::CallbackEntry<Fn>>(std::forward<F>(fn), when));
    } catch (...) {
      // The entry could not be stored: run the cleanup now, as the scope it guards has failed.
      if (detail::should_run(when, Outcome::failure)) {
        try {
          detail::invoke_cleanup(fn, Outcome::failure);
        } catch (...) {
          logger_->error("ScopeStack: a cleanup run at push failed: {}",
                         describe(std::current_exception()));
        }
      }
      throw;
    }
  }

  // Runs one entry's exit and destroys it; returns the first error of the two.
  std::exception_ptr run_entry(std::unique_ptr<detail::ScopeEntry> entry, Outcome outcome) {
    std::exception_ptr error;
    try {
      entry->exit(outcome);
    } catch (...) {
      error = std::current_exception();
    }
    try {
      delete entry.release();  // a delete-expression lets a throwing destructor propagate
    } catch (...) {
      if (!error) {
        error = std::current_exception();
      } else {
        logger_->error("ScopeStack: a guard's destructor threw after its close() failed: {}",
                       describe(std::current_exception()));
        suppressed_.push_back(std::current_exception());
      }
    }
    return error;
  }

  void close_noexcept(Outcome outcome) noexcept {
    if (entries_.empty()) return;
    try {
      close(outcome);
    } catch (...) {
      try {
        logger_->error("ScopeStack: a cleanup failed while the stack was destroyed: {}",
                       describe(std::current_exception()));
      } catch (...) {
      }
    }
  }

  std::shared_ptr<spdlog::logger> logger_;
  std::vector<std::unique_ptr<detail::ScopeEntry>> entries_;
  std::vector<std::exception_ptr> suppressed_;
  detail::UncaughtExceptionDetector exit_detector_;
};

}  // namespace torchguard
