// The examples' check that two runs ended equal: XXH3 of every parameter's bytes, in order.
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include <torch/torch.h>

#define XXH_INLINE_ALL  // header-only, as torchguard uses it
#include <xxhash.h>

namespace examples {

// The modules' parameters in the order given, one module after the other, as one hash: a program
// of several models (a GAN's generator and discriminator) compares runs by one value.
inline std::uint64_t parameter_hash(
    const std::vector<std::reference_wrapper<const torch::nn::Module>>& modules) {
  std::vector<torch::Tensor> bytes;
  for (const torch::nn::Module& module : modules) {
    for (const auto& parameter : module.parameters()) {
      bytes.push_back(
          parameter.detach().to(torch::kCPU).contiguous().reshape({-1}).view(torch::kUInt8));
    }
  }
  const auto all = torch::cat(bytes);
  return XXH3_64bits(all.data_ptr(), static_cast<std::size_t>(all.numel()));
}

inline std::uint64_t parameter_hash(const torch::nn::Module& module) {
  const std::vector<std::reference_wrapper<const torch::nn::Module>> one{module};
  return parameter_hash(one);
}

// 16 hexadecimal digits.
inline std::string parameter_fingerprint(
    const std::vector<std::reference_wrapper<const torch::nn::Module>>& modules) {
  char text[17];
  std::snprintf(text, sizeof text, "%016llx",
                static_cast<unsigned long long>(parameter_hash(modules)));
  return text;
}

inline std::string parameter_fingerprint(const torch::nn::Module& module) {
  const std::vector<std::reference_wrapper<const torch::nn::Module>> one{module};
  return parameter_fingerprint(one);
}

}  // namespace examples
