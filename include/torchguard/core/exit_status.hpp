// The end of a program's main(): how the run ended, as an exit status, with the error said once,
// last, where the user looks.
//
//   int main() {
//     return torchguard::exit_status([&] {
//       torchguard::TrainingSession session("run", options);
//       return session.run([&] { ...; return 0; });   // logs an error with its type, rethrows
//     });
//   }
//
// An exception that leaves main() aborts the process (status 134) before anything is said, and a
// cleanup that fails in a destructor is only logged: docs/guides/scope-stack.md shows the pattern
// that closes the guards where their errors still count.
#pragma once

#include <cstdio>
#include <exception>
#include <string>
#include <type_traits>

#include "torchguard/core/cancellation.hpp"
#include "torchguard/core/error.hpp"

namespace torchguard {

// The status of a program stopped on request (Ctrl-C, SIGTERM) before it finished: 128 + SIGINT,
// what a shell reports for a program killed by SIGINT.
inline constexpr int interrupted_exit_status = 130;

// Runs fn() and returns its status (0 when fn returns void). A Cancelled that reaches it (a stop
// request that interrupted loading or inference) returns 130 after "interrupted: <message>" on
// stderr; any other exception returns 1 after "error: <its first line>" (error_message; a
// non-standard exception by its type). Never throws.
template <class F>
int exit_status(F&& fn) noexcept {
  try {
    if constexpr (std::is_void_v<std::invoke_result_t<F&>>) {
      fn();
      return 0;
    } else {
      return static_cast<int>(fn());
    }
  } catch (const Cancelled& e) {
    std::fprintf(stderr, "interrupted: %s\n", error_message(e).c_str());
    return interrupted_exit_status;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", error_message(e).c_str());
    return 1;
  } catch (...) {
    try {
      std::fprintf(stderr, "error: %s\n", describe(std::current_exception()).c_str());
    } catch (...) {
    }
    return 1;
  }
}

}  // namespace torchguard
