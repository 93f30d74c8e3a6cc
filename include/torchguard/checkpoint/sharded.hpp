// Sharded state_dicts as Hugging Face lays them out (transformers' `save_pretrained(dir,
// max_shard_size=...)`, huggingface_hub's `save_torch_state_dict`): a directory holding
// model-00001-of-0000N.safetensors ... model-0000N-of-0000N.safetensors and
// model.safetensors.index.json,
//   {"metadata": {"total_size": bytes, ...}, "weight_map": {tensor name: shard file name}},
// or a plain model.safetensors when everything fits in one shard. The split is huggingface_hub's,
// so the same tensors in the same order under the same limit give the same files. The functions
// users call are in state_dict.hpp; this file holds the layout's rules.
#pragma once

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <torch/torch.h>
#include <torch/version.h>
#include <nlohmann/json.hpp>

#include "torchguard/checkpoint/safetensors.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/detail/files.hpp"

namespace torchguard {
namespace detail {

// The names transformers' from_pretrained looks for in a directory, the first one first.
inline constexpr const char* single_safetensors_name = "model.safetensors";
inline constexpr const char* safetensors_index_name = "model.safetensors.index.json";
// In every shard's __metadata__ and in the index's metadata: which save the file belongs to, so
// that a load never mixes the shards of two saves (files without it: written by other tools).
inline constexpr const char* save_id_key = "torchguard_save_id";
// An index is metadata: one over this is refused before it is parsed (the format's header limit).
inline constexpr std::uint64_t max_index_size = 100'000'000;

// "model-00002-of-00005.safetensors", as huggingface_hub names shard 2 of 5.
inline std::string shard_file_name(std::size_t number, std::size_t count) {
  return fmt::format("model-{:05d}-of-{:05d}.safetensors", number, count);
}

// True for a name of that pattern: what a save may remove once its index no longer lists it.
inline bool is_shard_file_name(const std::string& name) {
  auto digits = [&](std::size_t at) {
    return std::all_of(name.begin() + static_cast<std::ptrdiff_t>(at),
                       name.begin() + static_cast<std::ptrdiff_t>(at + 5),
                       [](char c) { return c >= '0' && c <= '9'; });
  };
  return name.size() == 32 && name.compare(0, 6, "model-") == 0 && digits(6) &&
         name.compare(11, 4, "-of-") == 0 && digits(15) &&
         name.compare(20, 12, ".safetensors") == 0;
}

// How huggingface_hub splits a state_dict (split_state_dict_into_shards_factory in
// huggingface_hub/serialization/_base.py, with get_torch_storage_size/_id of _torch.py):
// - tensors are taken in the state_dict's order; a tensor's size is its storage's bytes (a view
//   counts its whole storage);
// - tensors sharing a storage (same device, data pointer and storage size: every empty tensor on
//   a device, too) go where the first of them went, and count once;
// - a tensor over the limit gets a shard of its own, placed at once, before the shard being filled;
// - another closes the shard being filled when it would take it over the limit (a shard may
//   reach the limit exactly);
// - total_size is the sum of the sizes counted.
struct ShardSplit {
  std::vector<std::vector<std::size_t>> shards;  // indexes into the tensors, in their order
  std::uint64_t total_size = 0;
};

inline ShardSplit split_into_shards(const std::vector<NamedTensor>& tensors,
                                    std::uint64_t max_shard_size) {
  using StorageKey = std::tuple<int, int, const void*, std::uint64_t>;
  std::map<StorageKey, std::size_t> group_of;
  std::vector<std::vector<std::size_t>> groups;  // tensors by storage, in first appearance
  ShardSplit split;
  std::vector<std::size_t> current;
  std::uint64_t current_size = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const torch::Tensor& tensor = tensors[i].tensor;
    const c10::Storage& storage = tensor.storage();
    const auto size = static_cast<std::uint64_t>(storage.nbytes());
    const StorageKey key{static_cast<int>(tensor.device().type()), tensor.device().index(),
                         storage.data_ptr().get(), size};
    const auto [group, first] = group_of.emplace(key, groups.size());
    if (!first) {
      groups[group->second].push_back(i);
      continue;
    }
    groups.push_back({i});
    if (size > max_shard_size) {
      split.total_size += size;
      split.shards.push_back({i});
      continue;
    }
    if (size > max_shard_size - current_size) {  // current_size <= max_shard_size
      split.shards.push_back(std::move(current));
      current.clear();
      current_size = 0;
    }
    current.push_back(i);
    current_size += size;
    split.total_size += size;
  }
  if (!current.empty()) split.shards.push_back(std::move(current));
  for (const auto& group : groups) {
    if (group.size() == 1) continue;
    for (auto& shard : split.shards) {
      if (std::find(shard.begin(), shard.end(), group.front()) != shard.end()) {
        shard.insert(shard.end(), group.begin() + 1, group.end());
        break;
      }
    }
  }
  return split;
}

// A save's id: random, so that two saves of the same tensors under the same names differ too.
inline std::string new_save_id() {
  std::random_device random;
  return hex64((std::uint64_t{random()} << 32) ^ random());
}

// The refusals of host_tensor() (undefined, sparse, meta, quantized), without copying a tensor
// off its device. Throws SafetensorsError.
inline void check_storable(const std::string& name, const torch::Tensor& tensor) {
  if (!tensor.defined() || tensor.layout() != torch::kStrided || tensor.is_meta() ||
      tensor.is_quantized()) {
    host_tensor(name, tensor);  // throws before it copies anything
  }
}

// Writes `tensors` (in the state_dict's order: the split follows it) into `directory` as Hugging
// Face lays them out; see save_state_dict in state_dict.hpp for the promises. `metadata` goes to
// every file ("format": "pt" added) and to the index; `index_metadata` to the index only.
inline void save_sharded_safetensors(const std::filesystem::path& directory,
                                     const std::vector<NamedTensor>& tensors,
                                     std::uint64_t max_shard_size, SafetensorsMetadata metadata,
                                     nlohmann::json index_metadata = nlohmann::json::object()) {
  namespace fs = std::filesystem;
  if (max_shard_size == 0) throw OptionsError("save_state_dict: max_shard_size must be over 0");
  for (const char* reserved : {save_id_key, "total_size", "total_parameters"}) {
    if (metadata.count(reserved)) {
      throw OptionsError(fmt::format(
          "save_state_dict: the metadata key '{}' is the sharded layout's own", reserved));
    }
  }
  for (const auto& item : tensors) check_storable(item.name, item.tensor);
  const ShardSplit split = split_into_shards(tensors, max_shard_size);
  const bool one_file = split.shards.size() <= 1;  // HF writes no file at all for no tensors

  std::vector<std::string> names;                // of the files, in the split's order
  std::vector<std::vector<NamedTensor>> shards;  // their tensors
  nlohmann::json index;
  for (const auto& [key, value] : metadata) index_metadata[key] = value;
  metadata.emplace("format", "pt");
  if (one_file) {
    names.push_back(single_safetensors_name);
    shards.push_back(tensors);
  } else {
    const std::string save_id = new_save_id();
    metadata[save_id_key] = save_id;
    index_metadata[save_id_key] = save_id;
    index_metadata["total_size"] = split.total_size;
    nlohmann::json weight_map = nlohmann::json::object();
    for (std::size_t s = 0; s < split.shards.size(); ++s) {
      names.push_back(shard_file_name(s + 1, split.shards.size()));
      shards.emplace_back();
      for (const std::size_t i : split.shards[s]) {
        shards.back().push_back(tensors[i]);
        weight_map[tensors[i].name] = names.back();
      }
    }
    index = {{"metadata", std::move(index_metadata)}, {"weight_map", std::move(weight_map)}};
  }
  // Every check before the first file: each header, from the tensors where they are.
  for (const auto& shard : shards) prepare_safetensors(shard, metadata);

  std::error_code error;
  const bool existed = fs::exists(directory, error);
  if (existed && !fs::is_directory(directory, error)) {
    throw FileError("cannot save a sharded state_dict into", directory, "it is not a directory",
                    ENOTDIR);
  }
  if (!existed) {
    if (!fs::create_directories(directory, error) && error) {
      throw FileError("cannot create directory", directory, error.value());
    }
    const fs::path parent = directory.parent_path();
    fsync_directory(parent.empty() ? fs::path(".") : parent);
  }
  // One shard on the host at a time: a model on the GPU is never copied whole.
  for (std::size_t s = 0; s < shards.size(); ++s) {
    std::vector<NamedTensor> host;
    host.reserve(shards[s].size());
    for (const auto& item : shards[s]) {
      host.push_back({item.name, host_tensor(item.name, item.tensor)});
    }
    const auto prepared = prepare_safetensors(host, metadata);
    write_file_atomically(directory / names[s], [&](auto& out) { write_prepared(out, prepared); });
  }
  if (!one_file) {
    // As transformers writes it: json.dumps(index, indent=2, sort_keys=True) + "\n".
    const std::string text = index.dump(2, ' ', true) + "\n";
    write_file_atomically(directory / safetensors_index_name,
                          [&](auto& out) { out.write(text.data(), text.size()); });
  }
  // Only now is the previous save's stale part removed: a model.safetensors would shadow the new
  // index (from_pretrained looks for it first), an index beside the new model.safetensors would
  // mislead, shards the new index does not list are never read but take the space.
  const std::set<std::string> written(names.begin(), names.end());
  std::vector<fs::path> stale;
  fs::directory_iterator listing(directory, error);
  if (error) throw FileError("cannot list directory", directory, error.value());
  for (const auto& entry : listing) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_regular_file(error) || written.count(name)) continue;
    if (is_shard_file_name(name) ||
        name == (one_file ? safetensors_index_name : single_safetensors_name)) {
      stale.push_back(entry.path());
    }
  }
  for (const auto& path : stale) {
    if (!fs::remove(path, error) && error) {
      throw FileError("cannot remove a file of the previous save", path, error.value());
    }
  }
  if (!stale.empty()) fsync_directory(directory);
}

// Where the state_dict at `path` lives: a safetensors file, or an index and its shards. A
// directory holds model.safetensors or model.safetensors.index.json, looked for in that order (as
// transformers' from_pretrained does); a file whose name ends in ".index.json" is an index.
struct StateDictLocation {
  std::filesystem::path file;
  bool sharded = false;
};

inline StateDictLocation locate_state_dict(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  std::error_code error;
  if (fs::is_directory(path, error)) {
    if (fs::exists(path / single_safetensors_name, error)) {
      return {path / single_safetensors_name, false};
    }
    if (fs::exists(path / safetensors_index_name, error))
      return {path / safetensors_index_name, true};
    throw FileError(
        "cannot find a state_dict in", path,
        fmt::format("it holds neither {} nor {}", single_safetensors_name, safetensors_index_name),
        ENOENT);
  }
  const std::string name = path.filename().string();
  const std::string suffix = ".index.json";
  const bool index = name.size() > suffix.size() &&
                     name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  return {path, index};
}

// An index, read and checked: which tensors each shard holds, and the save it describes.
struct SafetensorsIndexFile {
  std::filesystem::path path;
  std::filesystem::path directory;                         // its shard names are relative to it
  std::map<std::string, std::string> weight_map;           // tensor name -> shard file name
  std::map<std::string, std::vector<std::string>> shards;  // shard file name -> tensor names
  std::optional<std::string> save_id;
};

// Why an index's shard name may not be opened, or "": it must stay inside the directory (no
// absolute path, drive or ".." part, with '\' read as a separator too, as huggingface_hub reads
// it) and name a .safetensors file (an index of pickles is not read as safetensors).
inline std::string shard_name_problem(const std::string& name, const std::string& directory) {
  const std::string outside = fmt::format("leads outside '{}'", directory);
  if (name.empty()) return "is empty";
  if (name.find('\0') != std::string::npos) return "holds a NUL character";
  if (name.front() == '/' || name.front() == '\\') return outside;
  if (name.size() >= 2 && name[1] == ':' && std::isalpha(static_cast<unsigned char>(name[0]))) {
    return outside;
  }
  std::size_t start = 0;
  while (start <= name.size()) {
    const std::size_t end = std::min(name.find_first_of("/\\", start), name.size());
    if (name.compare(start, end - start, "..") == 0 && end - start == 2) return outside;
    start = end + 1;
  }
  const std::string suffix = ".safetensors";
  if (name.size() < suffix.size() ||
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
    return "is not a .safetensors file";
  }
  return {};
}

// Reads and checks an index. Throws FileError, SafetensorsError (naming the index).
inline SafetensorsIndexFile read_safetensors_index(const std::filesystem::path& path) {
  SafetensorsIndexFile index;
  index.path = path;
  index.directory = path.parent_path();
  const std::string directory = index.directory.empty() ? "." : index.directory.string();
  auto refuse = [&](const std::string& why) {
    throw SafetensorsError(fmt::format("'{}': not a safetensors index: {}", path.string(), why));
  };
  const InputFile file(path);
  if (file.size() > max_index_size) {
    refuse(fmt::format("{} bytes, over the {} an index may have", file.size(), max_index_size));
  }
  std::string text(static_cast<std::size_t>(file.size()), '\0');
  file.read(0, text.data(), text.size());
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    refuse(e.what());
  }
  if (!json.is_object() || !json.contains("weight_map") || !json["weight_map"].is_object()) {
    refuse("no \"weight_map\" object");
  }
  for (const auto& [tensor, shard] : json["weight_map"].items()) {
    if (!shard.is_string()) refuse(fmt::format("the shard of tensor '{}' is not a string", tensor));
    const auto name = shard.get<std::string>();
    if (!index.shards.count(name)) {
      const std::string problem = shard_name_problem(name, directory);
      if (!problem.empty()) {
        throw SafetensorsError(fmt::format("'{}': shard '{}' (of tensor '{}') {}", path.string(),
                                           name, tensor, problem));
      }
    }
    index.weight_map.emplace(tensor, name);
    index.shards[name].push_back(tensor);
  }
  const auto metadata = json.find("metadata");
  if (metadata != json.end() && metadata->is_object()) {
    const auto save_id = metadata->find(save_id_key);
    if (save_id != metadata->end()) {
      if (!save_id->is_string())
        refuse(fmt::format("its metadata's {} is not a string", save_id_key));
      index.save_id = save_id->get<std::string>();
    }
  }
  return index;
}

// Opens shard `shard` of `index` and checks it against the index: from the same save (when
// either file carries a save id), holding every tensor the index places in it and no other.
// Throws FileError, SafetensorsError (naming the shard and the index).
inline SafetensorsFile open_shard(const SafetensorsIndexFile& index, const std::string& shard) {
  const std::filesystem::path path = index.directory / shard;
  std::error_code error;
  if (!std::filesystem::exists(path, error)) {
    throw FileError("cannot open shard", path,
                    fmt::format("it does not exist, though '{}' lists it", index.path.string()),
                    ENOENT);
  }
  SafetensorsFile file(path);
  const auto found = file.metadata().find(save_id_key);
  const std::optional<std::string> save_id =
      found == file.metadata().end() ? std::nullopt : std::optional<std::string>(found->second);
  if (save_id != index.save_id) {
    throw SafetensorsError(fmt::format(
        "'{}' is not from the save that '{}' describes (save id {} in the shard, {} in the "
        "index): a save into that directory did not finish; save again",
        path.string(), index.path.string(), save_id.value_or("none"),
        index.save_id.value_or("none")));
  }
  const std::vector<std::string> names = file.names();  // sorted
  for (const auto& tensor : index.shards.at(shard)) {
    if (!std::binary_search(names.begin(), names.end(), tensor)) {
      throw SafetensorsError(fmt::format("'{}': no tensor '{}', which '{}' places in it",
                                         path.string(), tensor, index.path.string()));
    }
  }
  for (const auto& tensor : names) {
    const auto listed = index.weight_map.find(tensor);
    if (listed == index.weight_map.end()) {
      throw SafetensorsError(fmt::format("'{}' holds tensor '{}', which '{}' does not list",
                                         path.string(), tensor, index.path.string()));
    }
    if (listed->second != shard) {
      throw SafetensorsError(fmt::format("'{}' holds tensor '{}', which '{}' places in '{}'",
                                         path.string(), tensor, index.path.string(),
                                         listed->second));
    }
  }
  return file;
}

// A sharded state_dict: its index and every shard checked on construction (headers only), the
// tensors read when asked for.
class ShardedSafetensors {
 public:
  explicit ShardedSafetensors(const std::filesystem::path& index_path)
      : index_(read_safetensors_index(index_path)) {
    for (const auto& entry : index_.shards) {
      const SafetensorsFile file = open_shard(index_, entry.first);
      for (auto& name : file.unsupported()) unsupported_.push_back({std::move(name), entry.first});
    }
  }

  // Every tensor this LibTorch can hold, read now, shard by shard (each shard checked again:
  // it may have been replaced since).
  TensorMap tensors() const {
    TensorMap all;
    for (const auto& entry : index_.shards) {
      auto part = open_shard(index_, entry.first).tensors();
      all.insert(std::make_move_iterator(part.begin()), std::make_move_iterator(part.end()));
    }
    return all;
  }
  // The tensors this LibTorch has no dtype for, with their shards.
  const std::vector<std::pair<std::string, std::string>>& unsupported() const noexcept {
    return unsupported_;
  }
  const SafetensorsIndexFile& index() const noexcept { return index_; }

 private:
  SafetensorsIndexFile index_;
  std::vector<std::pair<std::string, std::string>> unsupported_;
};

}  // namespace detail
}  // namespace torchguard
