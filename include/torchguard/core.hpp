// torchguard's core: what every part speaks and what composes the parts.
//   - ScopeStack (Python's contextlib.ExitStack): guards and callbacks closed in reverse order;
//   - Outcome and the guard contract (is_guard_v; GuardState, the destructor's half in code);
//   - the error family (Error, OptionsError, FileError, describe), exit_status for main();
//   - the stop signal: CancellationSource and CancellationToken (Cancelled, TimeoutError);
//   - the default logger, Metrics (the named values of a step), Stateful (what a checkpoint keeps
//     of an object known only by what it can do).
// Includes core/{cancellation,error,exit_status,guard,logging,metrics,outcome,scope_stack,
// stateful}.hpp.
#pragma once

#include "torchguard/core/cancellation.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/core/exit_status.hpp"
#include "torchguard/core/guard.hpp"
#include "torchguard/core/logging.hpp"
#include "torchguard/core/metrics.hpp"
#include "torchguard/core/outcome.hpp"
#include "torchguard/core/scope_stack.hpp"
#include "torchguard/core/stateful.hpp"
