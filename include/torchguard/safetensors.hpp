// Tensors and state_dicts exchanged with PyTorch through safetensors files: save_state_dict /
// load_state_dict for any module, save_safetensors / load_safetensors / SafetensorsFile for any
// tensors. Files are byte for byte what Python's safetensors package writes. See checkpoint/.
#pragma once

#include "torchguard/checkpoint/safetensors.hpp"
#include "torchguard/checkpoint/state_dict.hpp"
