// How a scope ended, and how a guard on the stack tells.
#pragma once

#include <exception>

namespace torchguard {

// The way a scope ended. Guards that act differently on failure (a checkpoint saved only on
// success, a session logged as failed) take it in `close(Outcome)`.
enum class Outcome { success, failure };

inline const char* to_string(Outcome outcome) noexcept {
  return outcome == Outcome::success ? "success" : "failure";
}

namespace detail {

// Tells, from a destructor, whether the scope is being left by an exception: more exceptions in
// flight now than when the guard was built means stack unwinding (Alexandrescu's ScopeGuard21).
class UncaughtExceptionDetector {
 public:
  UncaughtExceptionDetector() noexcept : count_at_entry_(std::uncaught_exceptions()) {}
  Outcome outcome() const noexcept {
    return std::uncaught_exceptions() > count_at_entry_ ? Outcome::failure : Outcome::success;
  }

 private:
  int count_at_entry_;
};

}  // namespace detail
}  // namespace torchguard
