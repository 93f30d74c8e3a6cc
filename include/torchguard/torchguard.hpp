// torchguard: RAII guards for LibTorch training and inference. Includes every part.
#pragma once

#include "torchguard/core/cancellation.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/core/exit_status.hpp"
#include "torchguard/core/guard.hpp"
#include "torchguard/core/logging.hpp"
#include "torchguard/core/outcome.hpp"

#include "torchguard/async.hpp"
#include "torchguard/checkpoint_guard.hpp"
#include "torchguard/data.hpp"
#include "torchguard/safetensors.hpp"
// ProcessGroupGuard needs LibTorch's distributed build and Gloo's headers (Debian: libgloo-dev).
#if defined(USE_DISTRIBUTED) && __has_include(<gloo/rendezvous/store.h>)
#include "torchguard/distributed.hpp"
#endif
#include "torchguard/gpu_memory_guard.hpp"
#include "torchguard/scope_stack.hpp"
#include "torchguard/training_session.hpp"
#include "torchguard/version.hpp"
