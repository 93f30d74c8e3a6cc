// Reading checkpoints of format 1 (torchguard 0.1): one tensors.bin of this project's own (magic
// "TGTENSR1", a u64 header length, a JSON array of {name, dtype, shape, offset, bytes}, the bytes
// 64-byte aligned) and state.pt, LibTorch's archive, with the optimizer groups' settings. Their
// tensors are handed to the loader under format 2's file and key names, so one loader serves
// both. Format 1 is read, never written.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "torchguard/checkpoint/format.hpp"
#include "torchguard/core/error.hpp"

namespace torchguard {
namespace detail {

inline constexpr const char* format1_tensors_name = "tensors.bin";

inline c10::ScalarType format1_dtype(const std::string& name) {
  static const std::vector<std::pair<const char*, c10::ScalarType>> names = {
      {"float32", torch::kFloat32},
      {"float64", torch::kFloat64},
      {"float16", torch::kFloat16},
      {"bfloat16", torch::kBFloat16},
      {"int64", torch::kInt64},
      {"int32", torch::kInt32},
      {"int16", torch::kInt16},
      {"int8", torch::kInt8},
      {"uint8", torch::kUInt8},
      {"bool", torch::kBool},
      {"complex64", torch::kComplexFloat},
      {"complex128", torch::kComplexDouble}};
  for (const auto& [known, type] : names) {
    if (name == known) return type;
  }
  throw Error(fmt::format("tensors.bin (format 1): unknown dtype '{}'", name));
}

// Format 1's key for a tensor -> format 2's file and key ("model/fc.weight" -> model
// "fc.weight", "optimizer/3/exp_avg" -> optimizer "state.3.exp_avg", "module/ema/w" -> extra
// "modules.ema.w", "tensor/t" -> "tensors.t", "rng/cpu" -> "rng.cpu", ...).
inline std::pair<TensorMap*, std::string> format1_place(CheckpointTensors& out,
                                                        const std::string& name) {
  auto after = [&](const char* prefix) -> std::optional<std::string> {
    const std::size_t n = std::strlen(prefix);
    if (name.compare(0, n, prefix) != 0) return std::nullopt;
    return name.substr(n);
  };
  if (auto rest = after("model/")) return {&out.model, *rest};
  if (auto rest = after("optimizer/")) {
    const auto slash = rest->find('/');
    return {&out.optimizer, optimizer_state_key(rest->substr(0, slash), rest->substr(slash + 1))};
  }
  if (auto rest = after("module/")) {
    const auto slash = rest->find('/');
    return {&out.extra, module_prefix(rest->substr(0, slash)) + rest->substr(slash + 1)};
  }
  if (auto rest = after("tensor/")) return {&out.extra, tensor_key(*rest)};
  if (auto rest = after("rng/cuda/")) return {&out.extra, cuda_rng_key(std::stoi(*rest))};
  if (name == "rng/cpu") return {&out.extra, cpu_rng_key};
  if (name == "scheduler/step_count") return {&out.extra, scheduler_step_key};
  throw Error(fmt::format("tensors.bin (format 1): unknown tensor '{}'", name));
}

// The tensors of a format 1 tensors.bin held in memory, as views of it. Throws Error.
inline CheckpointTensors read_format1_tensors(std::string_view bytes) {
  auto malformed = [](const std::string& why) {
    throw Error(fmt::format("tensors.bin (format 1) is malformed: {}", why));
  };
  constexpr std::size_t alignment = 64;
  auto align_up = [](std::uint64_t value) {
    return (value + alignment - 1) / alignment * alignment;
  };
  std::uint64_t header_size = 0;
  if (bytes.size() < 16 || std::memcmp(bytes.data(), "TGTENSR1", 8) != 0) malformed("bad magic");
  std::memcpy(&header_size, bytes.data() + 8, sizeof header_size);
  if (header_size > bytes.size() - 16) malformed("header past the end");
  const std::uint64_t data_start = align_up(16 + header_size);
  if (data_start > bytes.size()) malformed("header past the end");
  const std::uint64_t data_size = bytes.size() - data_start;
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.substr(16, header_size));
  } catch (const nlohmann::json::exception& e) {
    malformed(e.what());
  }
  CheckpointTensors out;
  try {
    for (const auto& entry : header) {
      const auto name = entry.at("name").get<std::string>();
      const auto dtype = format1_dtype(entry.at("dtype").get<std::string>());
      const auto shape = entry.at("shape").get<std::vector<std::int64_t>>();
      const auto offset = entry.at("offset").get<std::uint64_t>();
      std::uint64_t size = c10::elementSize(dtype);
      for (const auto dim : shape) {
        if (dim < 0 || __builtin_mul_overflow(size, static_cast<std::uint64_t>(dim), &size)) {
          malformed(fmt::format("tensor '{}' has an impossible shape", name));
        }
      }
      if (offset > data_size || size > data_size - offset) {
        malformed(fmt::format("tensor '{}' does not fit the file", name));
      }
      auto [map, key] = format1_place(out, name);
      map->emplace(key, torch::from_blob(const_cast<char*>(bytes.data() + data_start + offset),
                                         shape, torch::TensorOptions().dtype(dtype)));
    }
  } catch (const nlohmann::json::exception& e) {
    malformed(e.what());
  }
  return out;
}

}  // namespace detail
}  // namespace torchguard
