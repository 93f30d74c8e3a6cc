// The earlier name of torchguard/core.hpp, kept for programs that include it.
#pragma once

#include "torchguard/core.hpp"
