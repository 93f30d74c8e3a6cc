// A module's state_dict exchanged with PyTorch through safetensors files: the keys are the names
// Python's `module.state_dict()` uses (`conv1.weight`, `bn.running_mean`), so
//   Python:  model.load_state_dict(safetensors.torch.load_file("model.safetensors"))
//   C++:     torchguard::load_state_dict(*model, "model.safetensors");
// work on the same architecture both ways. Loading checks everything before it changes anything
// and reports what Python's load_state_dict reports: missing keys, unexpected keys, and every
// shape or dtype mismatch, in one error.
#pragma once

#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <torch/torch.h>

#include "torchguard/checkpoint/safetensors.hpp"
#include "torchguard/core/error.hpp"

namespace torchguard {

struct LoadStateDictOptions {
  // Missing and unexpected keys are errors (Python's strict=True). Non-strict loads the keys
  // that match and returns the others; a shape or dtype mismatch is an error either way.
  bool strict = true;
  // A stored tensor of another dtype (F16 weights into an F32 model) is converted on request
  // only; by default it is a mismatch.
  bool convert_dtypes = false;
};

// What a load left out (Python's _IncompatibleKeys): always empty after a strict load.
struct LoadStateDictResult {
  std::vector<std::string> missing_keys;     // the module's, absent from the file
  std::vector<std::string> unexpected_keys;  // the file's, absent from the module
};

// A state_dict does not fit the module: every missing key, unexpected key and mismatch at once.
class StateDictError : public Error {
 public:
  StateDictError(const std::string& message, LoadStateDictResult keys,
                 std::vector<std::string> mismatches)
      : Error(message), keys_(std::move(keys)), mismatches_(std::move(mismatches)) {}
  const std::vector<std::string>& missing_keys() const noexcept { return keys_.missing_keys; }
  const std::vector<std::string>& unexpected_keys() const noexcept { return keys_.unexpected_keys; }
  // "fc.weight: shape [10, 20] in the file, [10, 30] in the module", one per tensor.
  const std::vector<std::string>& mismatches() const noexcept { return mismatches_; }

 private:
  LoadStateDictResult keys_;
  std::vector<std::string> mismatches_;
};

namespace detail {

// The module's parameters and buffers under their state_dict names (with `prefix` in front).
inline std::vector<NamedTensor> module_state(const torch::nn::Module& module,
                                             const std::string& prefix = "") {
  std::vector<NamedTensor> state;
  for (const auto& parameter : module.named_parameters()) {
    state.push_back({prefix + parameter.key(), parameter.value()});
  }
  for (const auto& buffer : module.named_buffers()) {
    state.push_back({prefix + buffer.key(), buffer.value()});
  }
  return state;
}

inline std::string quoted_list(const std::vector<std::string>& names) {
  std::string text;
  for (const auto& name : names) text += fmt::format("{}'{}'", text.empty() ? "" : ", ", name);
  return text;
}

// What loading a state into a module will copy, checked.
struct StatePlan {
  LoadStateDictResult result;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> copies;  // (target, source)
  // Copies the sources into the module's tensors, which keep their device.
  void apply() {
    torch::NoGradGuard no_grad;
    for (auto& [target, source] : copies) target.copy_(source);
  }
};

// Checks `stored` (its keys under `prefix`; others are not looked at) against the module and
// returns what to copy; changes nothing. `what` names the source in the error. Throws
// StateDictError.
inline StatePlan plan_module_state(const torch::nn::Module& module, const TensorMap& stored,
                                   const std::string& prefix, const LoadStateDictOptions& options,
                                   const std::string& what) {
  StatePlan plan;
  auto& result = plan.result;
  auto& copies = plan.copies;
  std::vector<std::string> mismatches;
  const auto targets = module_state(module);
  std::set<std::string> known;
  for (const auto& target : targets) {
    known.insert(prefix + target.name);
    const auto it = stored.find(prefix + target.name);
    if (it == stored.end()) {
      result.missing_keys.push_back(target.name);
      continue;
    }
    const torch::Tensor& source = it->second;
    if (source.sizes() != target.tensor.sizes()) {
      mismatches.push_back(fmt::format("{}: shape {} in {}, {} in the module", target.name,
                                       c10::str(source.sizes()), what,
                                       c10::str(target.tensor.sizes())));
    } else if (source.scalar_type() != target.tensor.scalar_type() && !options.convert_dtypes) {
      mismatches.push_back(fmt::format(
          "{}: dtype {} in {}, {} in the module (set convert_dtypes to convert)", target.name,
          c10::toString(source.scalar_type()), what, c10::toString(target.tensor.scalar_type())));
    } else {
      copies.emplace_back(target.tensor, source);
    }
  }
  for (auto it = stored.lower_bound(prefix);
       it != stored.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
    if (!known.count(it->first)) result.unexpected_keys.push_back(it->first.substr(prefix.size()));
  }
  const bool keys_wrong =
      options.strict && (!result.missing_keys.empty() || !result.unexpected_keys.empty());
  if (keys_wrong || !mismatches.empty()) {
    std::string message = fmt::format("the state_dict in {} does not fit the module", what);
    if (options.strict && !result.missing_keys.empty()) {
      message += fmt::format("; missing keys: {}", quoted_list(result.missing_keys));
    }
    if (options.strict && !result.unexpected_keys.empty()) {
      message += fmt::format("; unexpected keys: {}", quoted_list(result.unexpected_keys));
    }
    for (const auto& mismatch : mismatches) message += fmt::format("; {}", mismatch);
    throw StateDictError(message, std::move(result), std::move(mismatches));
  }
  return plan;
}

inline LoadStateDictResult load_module_state(torch::nn::Module& module, const TensorMap& stored,
                                             const std::string& prefix,
                                             const LoadStateDictOptions& options,
                                             const std::string& what) {
  StatePlan plan = plan_module_state(module, stored, prefix, options, what);
  plan.apply();
  return std::move(plan.result);
}

}  // namespace detail

// Loads tensors by state_dict name into the module's parameters and buffers (copied; they keep
// their device). Throws StateDictError naming every problem; on error the module is unchanged.
inline LoadStateDictResult load_state_dict(torch::nn::Module& module, const TensorMap& state,
                                           const LoadStateDictOptions& options = {}) {
  return detail::load_module_state(module, state, "", options, "the given tensors");
}

// Loads a safetensors file, such as Python's
// `safetensors.torch.save_file(model.state_dict(), path)` writes, into the module. Throws
// StateDictError, SafetensorsError, FileError; on error the module is unchanged.
inline LoadStateDictResult load_state_dict(torch::nn::Module& module,
                                           const std::filesystem::path& path,
                                           const LoadStateDictOptions& options = {}) {
  const SafetensorsFile file(path);
  return detail::load_module_state(module, file.tensors(), "", options,
                                   fmt::format("'{}'", path.string()));
}

// Saves the module's state_dict (parameters and buffers) as a safetensors file that Python's
// `model.load_state_dict(safetensors.torch.load_file(path))` loads. Crash-safe: the previous
// file at `path` stays whole until the new one is on disk. `metadata` goes to `__metadata__`,
// with "format": "pt" as PyTorch's tools write it.
inline void save_state_dict(const torch::nn::Module& module, const std::filesystem::path& path,
                            SafetensorsMetadata metadata = {}) {
  metadata.emplace("format", "pt");
  TensorMap state;
  for (auto& item : detail::module_state(module)) state.emplace(item.name, item.tensor);
  save_safetensors(path, state, metadata);
}

}  // namespace torchguard
