// CheckpointGuard: restore the newest valid checkpoint on entry, save on exit, crash-safe. The
// guard and its parts live in torchguard/checkpoint/ (guard.hpp composes them).
#pragma once

#include "torchguard/checkpoint/guard.hpp"
