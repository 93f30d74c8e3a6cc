// Data loading that resumes: ResumableSampler, a sampler for LibTorch's data loaders whose place
// in the epoch a checkpoint saves, and torchguard::resume(), the loop over such a loader. See
// data/.
#pragma once

#include "torchguard/data/resumable_sampler.hpp"
