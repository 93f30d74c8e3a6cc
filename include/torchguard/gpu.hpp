// GPU memory: GpuMemoryGuard, per-scope CUDA memory accounting (what torch.cuda.memory_* gives
// Python, per scope; a cheap no-op without CUDA), and retry_on_oom, the largest batch that fits.
// Includes core.hpp, gpu/memory_guard.hpp and gpu/retry_on_oom.hpp (gpu/cuda_memory.hpp is
// their shim over LibTorch's caching allocator).
#pragma once

#include "torchguard/core.hpp"
#include "torchguard/gpu/memory_guard.hpp"
#include "torchguard/gpu/retry_on_oom.hpp"
