// GpuMemoryGuard (per-scope CUDA memory accounting) and retry_on_oom (the largest batch that
// fits). See gpu/.
#pragma once

#include "torchguard/gpu/memory_guard.hpp"
#include "torchguard/gpu/retry_on_oom.hpp"
