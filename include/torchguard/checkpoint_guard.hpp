// The earlier name of torchguard/checkpoint.hpp, kept for programs that include it.
#pragma once

#include "torchguard/checkpoint.hpp"
