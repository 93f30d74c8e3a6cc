// ProcessGroupGuard: a torch.distributed (c10d) process group for a scope, from torchrun's
// environment. See distributed/.
#pragma once

#include "torchguard/distributed/process_group_guard.hpp"
