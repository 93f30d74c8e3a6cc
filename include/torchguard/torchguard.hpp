// torchguard: RAII guards for LibTorch training and inference. Includes every part's face:
// core.hpp, session.hpp, checkpoint.hpp, gpu.hpp, async.hpp, data.hpp, distributed.hpp (when
// LibTorch has its distributed build), and version.hpp.
#pragma once

#include "torchguard/async.hpp"
#include "torchguard/checkpoint.hpp"
#include "torchguard/core.hpp"
#include "torchguard/data.hpp"
// ProcessGroupGuard needs LibTorch's distributed build and Gloo's headers (Debian: libgloo-dev).
#if defined(USE_DISTRIBUTED) && __has_include(<gloo/rendezvous/store.h>)
#include "torchguard/distributed.hpp"
#endif
#include "torchguard/gpu.hpp"
#include "torchguard/session.hpp"
#include "torchguard/version.hpp"
