// A module's state_dict exchanged with PyTorch and the Hugging Face Hub through safetensors files:
// the keys are the names Python's `module.state_dict()` uses (`conv1.weight`, `bn.running_mean`),
// so
//   Python:  model.load_state_dict(safetensors.torch.load_file("model.safetensors"))
//   C++:     torchguard::load_state_dict(*model, "model.safetensors");
// work on the same architecture both ways, and so do Hugging Face's sharded directories:
//   Python:  model.save_pretrained("out", max_shard_size="2GB")   # or from_pretrained("out")
//   C++:     torchguard::load_state_dict(*model, "out");           // or save_state_dict(...)
//
//   load_state_dict(module, path, LoadStateDictOptions)   into a module; `path` is a .safetensors
//                                                          file, an *.index.json, or a directory
//                                                          with model.safetensors or
//                                                          model.safetensors.index.json
//   load_state_dict(path) -> TensorMap                     the same files, without a module
//   save_state_dict(module, path, SaveStateDictOptions)    one file, or HF's sharded directory
//   save_state_dict(tensors, path, SaveStateDictOptions)   the same from a TensorMap
//   save_state_dict(module, path, SafetensorsMetadata)     one file (the original signature)
//
// Loading checks everything before it changes anything and reports what Python's
// load_state_dict reports: missing keys, unexpected keys, and every shape or dtype mismatch, in
// one error, across all shards. A sharded directory is checked as a whole before its tensors are
// read: the index's shard names stay inside the directory, every shard exists, holds exactly the
// tensors the index places in it, and belongs to the save the index describes.
//
// Sharded saves (SaveStateDictOptions::max_shard_size) write what transformers' save_pretrained
// writes: the same split (huggingface_hub's, see sharded.hpp), the same file names, the same index
// ({"metadata": {"total_size", "total_parameters" for a module}, "weight_map"}), and a plain
// model.safetensors without an index when everything fits in one shard. One shard at a time is
// copied to the host. Each file is written crash-safely (a temporary beside it, fsync, rename),
// the shards first, the index last; only then are the previous save's files that the new one does
// not use removed (model-NNNNN-of-NNNNN.safetensors shards, and the model.safetensors or index the
// new save replaces). Every shard and the index carry the save's id
// (__metadata__["torchguard_save_id"], random). A crash in the middle of a save into a directory
// leaves the previous save or the new one, never a mix of them:
// - before the new index (or model.safetensors) is in place: the previous save, whole; but where
//   new shards took the names of the previous save's (as many shards), the load refuses the
//   directory, naming the shard from the other save, until it is saved again. Python's
//   from_pretrained does not check ids: it would mix them;
// - after: the new save, whole; stale files of the previous save may remain, never read, except a
//   previous model.safetensors, which both loaders look for first: until it is removed the
//   previous save loads, whole;
// - temporaries (.tmp-<file>-<pid>) beside the files, which no loader reads.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <torch/torch.h>

#include "torchguard/checkpoint/safetensors.hpp"
#include "torchguard/checkpoint/sharded.hpp"
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

// The module's parameters and buffers under their state_dict names (with `prefix` in front), in
// the order of Python's state_dict(): each module's own parameters, its own buffers, then its
// children's, depth first (the order a sharded save splits in, as transformers does).
inline void append_module_state(const torch::nn::Module& module, const std::string& prefix,
                                std::vector<NamedTensor>& state) {
  for (const auto& parameter : module.named_parameters(/*recurse=*/false)) {
    if (parameter.value().defined()) state.push_back({prefix + parameter.key(), parameter.value()});
  }
  for (const auto& buffer : module.named_buffers(/*recurse=*/false)) {
    if (buffer.value().defined()) state.push_back({prefix + buffer.key(), buffer.value()});
  }
  for (const auto& child : module.named_children()) {
    append_module_state(*child.value(), prefix + child.key() + ".", state);
  }
}

inline std::vector<NamedTensor> module_state(const torch::nn::Module& module,
                                             const std::string& prefix = "") {
  std::vector<NamedTensor> state;
  append_module_state(module, prefix, state);
  return state;
}

// What transformers' index calls total_parameters: the module's parameters' elements, a shared
// parameter once.
inline std::uint64_t parameter_count(const torch::nn::Module& module) {
  std::set<const void*> seen;
  std::uint64_t count = 0;
  for (const auto& parameter : module.parameters()) {
    if (seen.insert(parameter.unsafeGetTensorImpl()).second) {
      count += static_cast<std::uint64_t>(parameter.numel());
    }
  }
  return count;
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

// Loads a state_dict saved by Python or C++ into the module: `path` is a safetensors file (Python's
// `safetensors.torch.save_file(model.state_dict(), path)`), an index (*.index.json) with its
// shards beside it, or a directory holding model.safetensors or model.safetensors.index.json
// (what transformers' save_pretrained writes; the first one found, in that order, as
// from_pretrained looks). Every file is checked, and the tensors checked against the module,
// before the module changes; all of them are read into host memory first. Throws StateDictError,
// SafetensorsError, FileError; on error the module is unchanged.
inline LoadStateDictResult load_state_dict(torch::nn::Module& module,
                                           const std::filesystem::path& path,
                                           const LoadStateDictOptions& options = {}) {
  const auto location = detail::locate_state_dict(path);
  const std::string what = fmt::format("'{}'", location.file.string());
  if (!location.sharded) {
    const SafetensorsFile file(location.file);
    return detail::load_module_state(module, file.tensors(), "", options, what);
  }
  const detail::ShardedSafetensors shards(location.file);
  return detail::load_module_state(module, shards.tensors(), "", options, what);
}

// Reads the state_dict at `path` (a file, an index or a directory, as above) into tensors of
// their own, every file checked first, as Python's `load_file` does for one file. A tensor this
// LibTorch has no dtype for is an error that names it and its file. Throws FileError,
// SafetensorsError.
inline TensorMap load_state_dict(const std::filesystem::path& path) {
  const auto location = detail::locate_state_dict(path);
  if (!location.sharded) return load_safetensors(location.file);
  const detail::ShardedSafetensors shards(location.file);
  const auto& unsupported = shards.unsupported();
  if (!unsupported.empty()) {
    throw SafetensorsError(fmt::format(
        "'{}': LibTorch {} has no tensor for {} of its tensors ('{}' in '{}'{}); open the shard "
        "with SafetensorsFile to read the others, and those with raw()",
        location.file.string(), TORCH_VERSION, unsupported.size(), unsupported.front().first,
        unsupported.front().second, unsupported.size() > 1 ? ", ..." : ""));
  }
  return shards.tensors();
}

// How save_state_dict writes; with C++20,
//   save_state_dict(*model, "out", {.max_shard_size = 2'000'000'000});
struct SaveStateDictOptions {
  // 0: one safetensors file at `path`. Otherwise `path` is a directory (created if missing) that
  // receives Hugging Face's layout: shards of at most this many bytes each (a tensor larger than
  // that gets a shard of its own) and model.safetensors.index.json, or model.safetensors alone
  // when everything fits in one. Bytes: transformers' "5GB" is 5'000'000'000.
  std::uint64_t max_shard_size = 0;
  // Goes to every file's __metadata__ (with "format": "pt", as PyTorch's tools write it) and to
  // the index's "metadata". The keys "total_size", "total_parameters" and "torchguard_save_id"
  // belong to the layout.
  SafetensorsMetadata metadata = {};
};

namespace detail {

inline void save_state(const std::vector<NamedTensor>& state, const std::filesystem::path& path,
                       const SaveStateDictOptions& options, nlohmann::json index_metadata) {
  if (options.max_shard_size == 0) {
    SafetensorsMetadata metadata = options.metadata;
    metadata.emplace("format", "pt");
    TensorMap tensors;
    for (const auto& item : state) tensors.emplace(item.name, item.tensor);
    save_safetensors(path, tensors, metadata);
    return;
  }
  if (path.extension() == ".safetensors") {
    throw OptionsError(fmt::format(
        "save_state_dict: with max_shard_size, '{}' is to be a directory (Hugging Face's layout), "
        "not a .safetensors file",
        path.string()));
  }
  save_sharded_safetensors(path, state, options.max_shard_size, options.metadata,
                           std::move(index_metadata));
}

}  // namespace detail

// Saves the module's state_dict (parameters and buffers) as `options` says: one safetensors file
// that Python's `model.load_state_dict(safetensors.torch.load_file(path))` loads, or a directory
// that transformers' `from_pretrained` loads (with the model's config.json beside it), split as
// save_pretrained splits Python's state_dict of the same module. Crash-safe: see the top of this
// file. Throws SafetensorsError, OptionsError (before anything is written), FileError.
inline void save_state_dict(const torch::nn::Module& module, const std::filesystem::path& path,
                            const SaveStateDictOptions& options) {
  detail::save_state(detail::module_state(module), path, options,
                     {{"total_parameters", detail::parameter_count(module)}});
}

// Saves the module's state_dict as one safetensors file; `metadata` goes to `__metadata__`, with
// "format": "pt". Crash-safe: the previous file at `path` stays whole until the new one is on disk.
// (A template only so that `save_state_dict(module, path, {})` picks the overload above.)
template <class Metadata = SafetensorsMetadata,
          std::enable_if_t<std::is_same_v<Metadata, SafetensorsMetadata>, int> = 0>
void save_state_dict(const torch::nn::Module& module, const std::filesystem::path& path,
                     Metadata metadata = {}) {
  SaveStateDictOptions options;
  options.metadata = std::move(metadata);
  save_state_dict(module, path, options);
}

// Saves tensors by state_dict name, as save_state_dict of a module does. A sharded save splits
// them in the order of their names (a TensorMap's); the index has no total_parameters (which
// tensors are parameters is the module's to say), as huggingface_hub's save_torch_state_dict.
inline void save_state_dict(const TensorMap& tensors, const std::filesystem::path& path,
                            const SaveStateDictOptions& options = {}) {
  std::vector<detail::NamedTensor> state;
  state.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) state.push_back({name, tensor});
  detail::save_state(state, path, options, nlohmann::json::object());
}

}  // namespace torchguard
