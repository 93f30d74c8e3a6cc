// torchguard: RAII guards for LibTorch training and inference. Includes every guard.
#pragma once

#include "torchguard/async.hpp"
#include "torchguard/checkpoint_guard.hpp"
#include "torchguard/gpu_memory_guard.hpp"
#include "torchguard/scope_stack.hpp"
#include "torchguard/training_session.hpp"
#include "torchguard/version.hpp"
