// ScopeStack: a run-time LIFO stack of guards and callbacks (Python's contextlib.ExitStack).
#pragma once

#include "torchguard/core/scope_stack.hpp"
