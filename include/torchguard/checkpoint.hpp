// Checkpoints and tensors on disk:
//   - CheckpointGuard with CheckpointOptions: restore the newest valid checkpoint on entry, save
//     on exit, crash-safe, with retention and an optional background writer;
//   - safetensors files, byte for byte what Python's safetensors package writes:
//     save_safetensors / load_safetensors, SafetensorsFile (on disk, read per tensor),
//     SafetensorsView (in memory), RawTensor (any dtype as stored);
//   - state_dicts exchanged with PyTorch: save_state_dict / load_state_dict, one file or sharded
//     as Hugging Face lays them out.
// Includes core.hpp, checkpoint/{guard,options,safetensors,state_dict}.hpp (the others in
// checkpoint/ are their parts: the format, the manifest, the commit, retention, the restore).
#pragma once

#include "torchguard/checkpoint/guard.hpp"
#include "torchguard/checkpoint/options.hpp"
#include "torchguard/checkpoint/safetensors.hpp"
#include "torchguard/checkpoint/state_dict.hpp"
#include "torchguard/core.hpp"
