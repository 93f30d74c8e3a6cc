// torchguard's version, and whether it was built against a CUDA-enabled LibTorch.
#pragma once

#define TORCHGUARD_VERSION_MAJOR 0
#define TORCHGUARD_VERSION_MINOR 2
#define TORCHGUARD_VERSION_PATCH 0

// Set by CMake (from the Torch package it found): a CPU-only LibTorch still ships the c10/cuda
// headers, so __has_include cannot tell.
#ifndef TORCHGUARD_WITH_CUDA
#define TORCHGUARD_WITH_CUDA 0
#endif

namespace torchguard {
inline constexpr const char* version = "0.2.0";
inline constexpr bool built_with_cuda = TORCHGUARD_WITH_CUDA != 0;
}  // namespace torchguard
