// The earlier name of torchguard/gpu.hpp, kept for programs that include it.
#pragma once

#include "torchguard/gpu.hpp"
