// The guard contract every torchguard guard keeps, checked at compile time (is_guard_v):
//   - built from its required arguments, an `Options` struct (with a `logger` member) and nothing
//     else; `T::Options` names that struct;
//   - `close(Outcome)` ends the guard's work: idempotent, and it throws what went wrong;
//   - the destructor is noexcept: it closes with the scope's outcome and logs what close() would
//     have thrown;
//   - move-only: a guard owns what it opened, exactly once.
// and the part of it written in code once, for every guard: GuardState, which holds a guard's
// state on the heap and closes it when it goes.
#pragma once

#include <exception>
#include <memory>
#include <type_traits>
#include <utility>

#include <spdlog/spdlog.h>

#include "torchguard/core/error.hpp"
#include "torchguard/core/outcome.hpp"

namespace torchguard {
namespace detail {

template <class T, class = void>
struct has_options_with_logger : std::false_type {};
template <class T>
struct has_options_with_logger<T,
                               std::void_t<decltype(std::declval<typename T::Options&>().logger)>>
    : std::is_convertible<decltype(std::declval<typename T::Options&>().logger),
                          std::shared_ptr<spdlog::logger>> {};

template <class T, class = void>
struct has_close_outcome : std::false_type {};
template <class T>
struct has_close_outcome<T, std::void_t<decltype(std::declval<T&>().close(Outcome{}))>>
    : std::true_type {};

// The destructor's half of the contract, written once. A guard keeps everything it owns in a
// State held by a GuardState<State> (its only member), so that
//   - it moves by moving one pointer (defaulted moves): threads and callbacks that point into the
//     State never see the guard move;
//   - the State is closed when it goes (the guard's destructor, or a move assignment over the
//     guard) with the outcome of the scope the guard was built in (an exception unwinding it, or
//     not), and what close throws is logged, never thrown;
//   - a moved-from guard holds nothing: its close() does nothing, and it may be destroyed or
//     assigned to.
// A State has
//   void close(Outcome);                                // idempotent; may throw
//   std::shared_ptr<spdlog::logger> logger;             // not null
//   static constexpr const char* close_error_prefix;    // starts the line that logs what close
//                                                       // threw: the guard's name
// and does all its acquiring in its constructor: a State that fails to build is not closed.
template <class State>
class GuardState {
 public:
  GuardState() noexcept = default;  // nothing to close: a guard with nothing to do
  explicit GuardState(std::unique_ptr<State> state) noexcept : state_(std::move(state)) {}
  template <class... Args>
  explicit GuardState(std::in_place_t, Args&&... args)
      : state_(std::make_unique<State>(std::forward<Args>(args)...)) {}

  GuardState(GuardState&&) noexcept = default;
  GuardState& operator=(GuardState&& other) noexcept {
    if (this != &other) {
      end();
      state_ = std::move(other.state_);
      scope_ = other.scope_;
    }
    return *this;
  }
  ~GuardState() { end(); }

  // The guard's close(Outcome): the State's, when there is one.
  void close(Outcome outcome) {
    if (state_) state_->close(outcome);
  }
  // How the scope the guard was built in is ending: failure while an exception unwinds it.
  Outcome scope_outcome() const noexcept { return scope_.outcome(); }

  State* get() const noexcept { return state_.get(); }
  State* operator->() const noexcept { return state_.get(); }
  State& operator*() const noexcept { return *state_; }
  explicit operator bool() const noexcept { return state_ != nullptr; }

 private:
  void end() noexcept {
    if (!state_) return;
    try {
      state_->close(scope_.outcome());
    } catch (...) {
      try {
        state_->logger->error("{}: {}", State::close_error_prefix,
                              describe(std::current_exception()));
      } catch (...) {  // a logger that fails cannot be told: the destructor goes on
      }
    }
    state_.reset();
  }

  std::unique_ptr<State> state_;
  UncaughtExceptionDetector scope_;
};

}  // namespace detail

template <class T>
struct is_guard
    : std::bool_constant<detail::has_options_with_logger<T>::value &&
                         detail::has_close_outcome<T>::value && std::is_nothrow_destructible_v<T> &&
                         std::is_move_constructible_v<T> && !std::is_copy_constructible_v<T> &&
                         !std::is_copy_assignable_v<T>> {};

template <class T>
inline constexpr bool is_guard_v = is_guard<T>::value;

#if defined(__cpp_concepts) && __cpp_concepts >= 201907L
template <class T>
concept Guard = is_guard_v<T>;
#endif

}  // namespace torchguard
