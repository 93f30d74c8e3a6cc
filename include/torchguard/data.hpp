// Data loading that resumes: ResumableSampler, a sampler for LibTorch's data loaders whose place
// in the epoch a checkpoint saves (CheckpointOptions::samplers), and torchguard::resume(), the
// loop over such a loader that skips what the interrupted epoch already trained.
// Includes core.hpp and data/resumable_sampler.hpp.
#pragma once

#include "torchguard/core.hpp"
#include "torchguard/data/resumable_sampler.hpp"
