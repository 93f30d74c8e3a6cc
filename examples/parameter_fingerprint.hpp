// The examples' check that two runs ended equal: XXH3 of every parameter's bytes, in order.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <torch/torch.h>

#define XXH_INLINE_ALL  // header-only, as torchguard uses it
#include <xxhash.h>

namespace examples {

inline std::uint64_t parameter_hash(const torch::nn::Module& module) {
  std::vector<torch::Tensor> bytes;
  for (const auto& parameter : module.parameters()) {
    bytes.push_back(
        parameter.detach().to(torch::kCPU).contiguous().reshape({-1}).view(torch::kUInt8));
  }
  const auto all = torch::cat(bytes);
  return XXH3_64bits(all.data_ptr(), static_cast<std::size_t>(all.numel()));
}

inline std::string parameter_fingerprint(const torch::nn::Module& module) {
  char text[17];
  std::snprintf(text, sizeof text, "%016llx",
                static_cast<unsigned long long>(parameter_hash(module)));
  return text;
}

}  // namespace examples
