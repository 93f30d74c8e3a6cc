// The earlier name of torchguard/session.hpp, kept for programs that include it.
#pragma once

#include "torchguard/session.hpp"
