// Beyond one machine: ProcessGroupGuard, a torch.distributed (c10d) process group for a scope,
// from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), with the collectives
// a training loop needs and the fence that makes rank 0's checkpoints every rank's.
// Needs LibTorch's distributed build and Gloo's headers (torchguard.hpp includes it only then).
// Includes core.hpp and distributed/{options,process_group_guard}.hpp (rendezvous.hpp: the
// checked rendezvous behind it).
#pragma once

#include "torchguard/core.hpp"
#include "torchguard/distributed/options.hpp"
#include "torchguard/distributed/process_group_guard.hpp"
