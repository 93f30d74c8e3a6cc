// checkpoint/sharded.hpp: state_dicts in Hugging Face's sharded layout, split as
// huggingface_hub splits, each failure of a sharded directory named, saves that never mix, and
// the exchange with the real transformers package.
#include "torchguard/checkpoint.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "support.hpp"

namespace fs = std::filesystem;
using torchguard::SaveStateDictOptions;
using torchguard::TensorMap;
using torchguard::testing::Contains;
using torchguard::testing::names_in;
using torchguard::testing::TempDir;

namespace {

nlohmann::json read_json(const fs::path& path) {
  return nlohmann::json::parse(torchguard::testing::read_text(path));
}

void write_json(const fs::path& path, const nlohmann::json& json) {
  std::ofstream(path) << json.dump(2);
}

// A float32 tensor of `bytes` bytes with values of its own (from `start`).
torch::Tensor of_bytes(std::int64_t bytes, float start = 0) {
  return torch::arange(bytes / 4, torch::kFloat32) + start;
}

SaveStateDictOptions sharded(std::uint64_t max_shard_size,
                             torchguard::SafetensorsMetadata metadata = {}) {
  SaveStateDictOptions options;
  options.max_shard_size = max_shard_size;
  options.metadata = std::move(metadata);
  return options;
}

std::string shard(int number, int count) {
  return fmt::format("model-{:05d}-of-{:05d}.safetensors", number, count);
}

// The weight_map a split into `shards` (each a list of tensor names) gives.
nlohmann::json weight_map_of(const std::vector<std::vector<std::string>>& shards) {
  nlohmann::json map = nlohmann::json::object();
  for (std::size_t s = 0; s < shards.size(); ++s) {
    for (const auto& name : shards[s]) {
      map[name] = shard(static_cast<int>(s + 1), static_cast<int>(shards.size()));
    }
  }
  return map;
}

// Same dtype, same shape, same bytes.
bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const auto ca = a.contiguous(), cb = b.contiguous();
  if (ca.nbytes() != cb.nbytes()) return false;
  // An empty tensor has no data pointer: memcmp must not see it.
  return ca.nbytes() == 0 || std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.nbytes()) == 0;
}

bool same_state(const TensorMap& a, const TensorMap& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [name, tensor] : a) {
    const auto other = b.find(name);
    if (other == b.end() || !same_bits(tensor, other->second)) return false;
  }
  return true;
}

TensorMap state_of(const torch::nn::Module& module) {
  TensorMap state;
  for (const auto& item : torchguard::detail::module_state(module)) {
    state.emplace(item.name, item.tensor.detach().clone());
  }
  return state;
}

// Linear(4, 3), BatchNorm1d(3), Linear(3, 2); float32. Its state_dict in Python's order, in bytes:
// 0.weight 48, 0.bias 12, 1.weight 12, 1.bias 12, 1.running_mean 12, 1.running_var 12,
// 1.num_batches_tracked 8 (int64), 2.weight 24, 2.bias 8.
torch::nn::Sequential small_model(float shift = 0) {
  torch::nn::Sequential model(torch::nn::Linear(4, 3), torch::nn::BatchNorm1d(3),
                              torch::nn::Linear(3, 2));
  torch::NoGradGuard no_grad;
  for (auto& tensor : model->parameters()) tensor.add_(shift);
  for (auto& tensor : model->buffers()) {
    if (tensor.is_floating_point()) tensor.add_(torch::rand_like(tensor) + shift);
  }
  model[1]->as<torch::nn::BatchNorm1d>()->num_batches_tracked.fill_(7);
  return model;
}

// What huggingface_hub makes of small_model() under a 40-byte limit: 0.weight (48) over the
// limit alone; then 12+12+12 until 1.running_mean would make 48; 12+12+8 until 2.weight would
// make 56; 24+8.
const std::vector<std::vector<std::string>> small_model_split_40 = {
    {"0.weight"},
    {"0.bias", "1.weight", "1.bias"},
    {"1.running_mean", "1.running_var", "1.num_batches_tracked"},
    {"2.weight", "2.bias"}};

}  // namespace

TEST_CASE("sharded save: huggingface_hub's split, shard names and index", "[state_dict]") {
  TempDir dir;
  // huggingface_hub's own example: sizes [6, 6, 2, 6, 2, 2] under 10 give [6], [6+2], [6+2+2].
  const TensorMap tensors{{"a", of_bytes(600)},    {"b", of_bytes(600, 1)}, {"c", of_bytes(200)},
                          {"d", of_bytes(600, 2)}, {"e", of_bytes(200, 3)}, {"f", of_bytes(200)}};
  torchguard::save_state_dict(tensors, dir.path, sharded(1000, {{"note", "hello"}}));
  CHECK(names_in(dir.path) == std::vector<std::string>{shard(1, 3), shard(2, 3), shard(3, 3),
                                                       "model.safetensors.index.json"});
  const auto index = read_json(dir.path / "model.safetensors.index.json");
  CHECK(index["weight_map"] == weight_map_of({{"a"}, {"b", "c"}, {"d", "e", "f"}}));
  const std::string save_id = index["metadata"].value("torchguard_save_id", "");
  CHECK(save_id.size() == 16);
  // transformers' format: json.dumps(index, indent=2, sort_keys=True) + "\n"; no
  // total_parameters for tensors that are not a module's.
  CHECK(torchguard::testing::read_text(dir.path / "model.safetensors.index.json") ==
        fmt::format(R"({{
  "metadata": {{
    "note": "hello",
    "torchguard_save_id": "{}",
    "total_size": 2400
  }},
  "weight_map": {{
    "a": "model-00001-of-00003.safetensors",
    "b": "model-00002-of-00003.safetensors",
    "c": "model-00002-of-00003.safetensors",
    "d": "model-00003-of-00003.safetensors",
    "e": "model-00003-of-00003.safetensors",
    "f": "model-00003-of-00003.safetensors"
  }}
}}
)",
                    save_id));
  for (int s = 1; s <= 3; ++s) {
    const torchguard::SafetensorsFile file(dir.path / shard(s, 3));
    CHECK(file.metadata() == torchguard::SafetensorsMetadata{{"format", "pt"},
                                                             {"note", "hello"},
                                                             {"torchguard_save_id", save_id}});
  }
  CHECK(same_state(torchguard::load_state_dict(dir.path), tensors));
  CHECK(
      same_state(torchguard::load_state_dict(dir.path / "model.safetensors.index.json"), tensors));

  // Another save has another id, even of the same tensors.
  torchguard::save_state_dict(tensors, dir.path, sharded(1000));
  CHECK(read_json(dir.path / "model.safetensors.index.json")["metadata"]["torchguard_save_id"] !=
        save_id);
}

TEST_CASE("sharded save: a tensor over the limit has a shard of its own, placed at once",
          "[state_dict]") {
  TempDir dir;
  // a (400) starts a shard; b (1600) is over 1000: its own shard, placed before a's; c and d fill
  // a's shard to exactly 1000, which stays; e would go over: a new shard.
  const TensorMap tensors{{"a", of_bytes(400)},
                          {"b", of_bytes(1600, 1)},
                          {"c", of_bytes(400, 2)},
                          {"d", of_bytes(200, 3)},
                          {"e", of_bytes(400, 4)}};
  torchguard::save_state_dict(tensors, dir.path, sharded(1000));
  const auto index = read_json(dir.path / "model.safetensors.index.json");
  CHECK(index["weight_map"] == weight_map_of({{"b"}, {"a", "c", "d"}, {"e"}}));
  CHECK(index["metadata"]["total_size"] == 3000);
  CHECK(same_state(torchguard::load_state_dict(dir.path), tensors));
}

TEST_CASE("sharded save: tensors sharing a storage go to one shard and count once",
          "[state_dict]") {
  TempDir dir;
  const auto base = of_bytes(1600);  // a and c are views of it: each counts the whole storage
  const TensorMap tensors{{"a", base.narrow(0, 0, 100)},
                          {"b", of_bytes(800, 1)},
                          {"c", base.narrow(0, 100, 100)},
                          {"d", of_bytes(400, 2)},
                          // Empty tensors have no data pointer: one storage for huggingface_hub.
                          {"e0", torch::zeros({0})},
                          {"f", of_bytes(400, 3)},
                          {"g0", torch::zeros({0, 3})}};
  // a: 1600 > 1000, alone; b 800; c joins a; d: 1200 > 1000, new shard; e0 (0) with d; f: 800;
  // g0 joins e0.
  torchguard::save_state_dict(tensors, dir.path, sharded(1000));
  const auto index = read_json(dir.path / "model.safetensors.index.json");
  CHECK(index["weight_map"] == weight_map_of({{"a", "c"}, {"b"}, {"d", "e0", "f", "g0"}}));
  CHECK(index["metadata"]["total_size"] == 1600 + 800 + 400 + 400);
  // The shards hold the views' own bytes (800), not their storage's (1600 each).
  CHECK(fs::file_size(dir.path / shard(1, 3)) < 1600);
  CHECK(same_state(torchguard::load_state_dict(dir.path), tensors));
}

TEST_CASE("sharded save of a module: Python's state_dict order, total_parameters, loads back",
          "[state_dict]") {
  TempDir dir;
  auto saved = small_model();
  torchguard::save_state_dict(*saved, dir.path / "out", sharded(40, {{"epoch", "3"}}));
  const auto index = read_json(dir.path / "out" / "model.safetensors.index.json");
  CHECK(index["weight_map"] == weight_map_of(small_model_split_40));
  CHECK(index["metadata"]["total_size"] == 48 + 5 * 12 + 8 + 24 + 8);
  CHECK(index["metadata"]["total_parameters"] == 12 + 3 + 3 + 3 + 6 + 2);
  CHECK(index["metadata"]["epoch"] == "3");

  for (const fs::path& path :
       {dir.path / "out", dir.path / "out" / "model.safetensors.index.json"}) {
    auto loaded = small_model(1);
    const auto result = torchguard::load_state_dict(*loaded, path);
    CHECK(result.missing_keys.empty());
    CHECK(result.unexpected_keys.empty());
    CHECK(same_state(state_of(*loaded), state_of(*saved)));
  }

  // Python's order in a module that registers a child before its own tensors: the module's own
  // parameters, its buffers, then the child's.
  struct Net : torch::nn::Module {
    Net() {
      register_module("child", torch::nn::Linear(2, 2));
      register_parameter("w", torch::zeros({2}));
      register_buffer("b", torch::zeros({2}));
    }
  } net;
  std::vector<std::string> names;
  for (const auto& item : torchguard::detail::module_state(net)) names.push_back(item.name);
  CHECK(names == std::vector<std::string>{"w", "b", "child.weight", "child.bias"});

  // Everything fits in one shard: a plain model.safetensors, no index, as Hugging Face does.
  torchguard::save_state_dict(*saved, dir.path / "one", sharded(1'000'000, {{"epoch", "3"}}));
  CHECK(names_in(dir.path / "one") == std::vector<std::string>{"model.safetensors"});
  const torchguard::SafetensorsFile file(dir.path / "one" / "model.safetensors");
  CHECK(file.metadata() == torchguard::SafetensorsMetadata{{"format", "pt"}, {"epoch", "3"}});
  auto loaded = small_model(1);
  torchguard::load_state_dict(*loaded, dir.path / "one");
  CHECK(same_state(state_of(*loaded), state_of(*saved)));
  CHECK(same_state(torchguard::load_state_dict(dir.path / "one"), state_of(*saved)));

  // The original signature: one file at the path.
  torchguard::save_state_dict(*saved, dir.path / "plain.safetensors", {{"epoch", "3"}});
  torchguard::save_state_dict(*saved, dir.path / "plain2.safetensors");
  CHECK(same_state(torchguard::load_state_dict(dir.path / "plain.safetensors"),
                   torchguard::load_state_dict(dir.path / "plain2.safetensors")));

  // A sharded save names a directory, and its metadata leaves the layout's keys alone.
  CHECK_THROWS_WITH(torchguard::save_state_dict(*saved, dir.path / "x.safetensors", sharded(40)),
                    Contains("is to be a directory"));
  CHECK_THROWS_AS(
      torchguard::save_state_dict(*saved, dir.path / "y", sharded(40, {{"total_size", "1"}})),
      torchguard::OptionsError);
  std::ofstream(dir.path / "a_file") << "not a directory";
  CHECK_THROWS_WITH(torchguard::save_state_dict(*saved, dir.path / "a_file", sharded(40)),
                    Contains(fmt::format("cannot save a sharded state_dict into '{}': it is not a "
                                         "directory",
                                         (dir.path / "a_file").string())));
}

TEST_CASE("loading shards: one error for every key and mismatch across shards, and strict=false",
          "[state_dict]") {
  TempDir dir;
  auto saved = small_model();
  torchguard::save_state_dict(*saved, dir.path, sharded(40));
  const std::string index = (dir.path / "model.safetensors.index.json").string();

  torch::nn::Sequential other(torch::nn::Linear(4, 3), torch::nn::BatchNorm1d(3),
                              torch::nn::Linear(3, 5), torch::nn::Linear(5, 1));
  const auto before = state_of(*other);
  try {
    torchguard::load_state_dict(*other, dir.path);
    FAIL("no error");
  } catch (const torchguard::StateDictError& e) {
    CHECK(e.missing_keys() == std::vector<std::string>{"3.weight", "3.bias"});
    CHECK(e.unexpected_keys().empty());
    CHECK(e.mismatches() ==
          std::vector<std::string>{
              fmt::format("2.weight: shape [2, 3] in '{}', [5, 3] in the module", index),
              fmt::format("2.bias: shape [2] in '{}', [5] in the module", index)});
  }
  CHECK(same_state(state_of(*other), before));

  // Non-strict: what matches loads, from shards 1 and 2; the rest, from every shard, is returned.
  torch::nn::Sequential smaller(torch::nn::Linear(4, 3));
  torchguard::LoadStateDictOptions non_strict;
  non_strict.strict = false;
  const auto result = torchguard::load_state_dict(*smaller, dir.path, non_strict);
  CHECK(result.missing_keys.empty());
  CHECK(result.unexpected_keys == std::vector<std::string>{"1.bias", "1.num_batches_tracked",
                                                           "1.running_mean", "1.running_var",
                                                           "1.weight", "2.bias", "2.weight"});
  CHECK(same_bits(smaller[0]->as<torch::nn::Linear>()->weight,
                  saved[0]->as<torch::nn::Linear>()->weight));
  CHECK(same_bits(smaller[0]->as<torch::nn::Linear>()->bias,
                  saved[0]->as<torch::nn::Linear>()->bias));
}

TEST_CASE("loading shards: a broken directory is refused, naming the file", "[state_dict]") {
  TempDir dir;
  auto saved = small_model();
  const fs::path index_path = dir.path / "model.safetensors.index.json";
  const std::string index = index_path.string();
  auto fresh_save = [&] {
    for (const auto& name : names_in(dir.path)) fs::remove(dir.path / name);
    torchguard::save_state_dict(*saved, dir.path, sharded(40));
  };
  auto refused = [&](const std::string& what) {
    INFO(what);
    auto target = small_model(1);
    const auto before = state_of(*target);
    std::string message;
    try {
      torchguard::load_state_dict(*target, dir.path);
    } catch (const torchguard::Error& e) {
      message = e.what();
    }
    CHECK(same_state(state_of(*target), before));  // unchanged
    std::string free_message;
    try {
      torchguard::load_state_dict(dir.path);
    } catch (const torchguard::Error& e) {
      free_message = e.what();
    }
    CHECK(free_message == message);
    return message;
  };
  auto edit_index = [&](auto&& edit) {
    auto json = read_json(index_path);
    edit(json);
    write_json(index_path, json);
  };

  SECTION("a shard the index names is missing") {
    fresh_save();
    fs::remove(dir.path / shard(3, 4));
    CHECK_THAT(
        refused("missing"),
        Contains(fmt::format("cannot open shard '{}': it does not exist, though '{}' lists it",
                             (dir.path / shard(3, 4)).string(), index)));
  }
  SECTION("a tensor is not in the shard the index names") {
    fresh_save();
    edit_index([&](nlohmann::json& json) { json["weight_map"]["2.bias"] = shard(1, 4); });
    CHECK_THAT(refused("not there"),
               Contains(fmt::format("'{}': no tensor '2.bias', which '{}' places in it",
                                    (dir.path / shard(1, 4)).string(), index)));
  }
  SECTION("a shard holds a tensor the index does not list") {
    fresh_save();
    edit_index([&](nlohmann::json& json) { json["weight_map"].erase("2.bias"); });
    CHECK_THAT(refused("unlisted"),
               Contains(fmt::format("'{}' holds tensor '2.bias', which '{}' does not list",
                                    (dir.path / shard(4, 4)).string(), index)));
  }
  SECTION("a shard name leads outside the directory, or is not a .safetensors file") {
    fresh_save();
    // The real file, reached from outside: refused all the same.
    const std::string absolute = (dir.path / shard(1, 4)).string();
    const std::string up = "../" + dir.path.filename().string() + "/" + shard(1, 4);
    for (const std::string& name : {up, absolute, std::string("a\\..\\..\\x.safetensors")}) {
      edit_index([&](nlohmann::json& json) { json["weight_map"]["0.weight"] = name; });
      CHECK_THAT(refused(name),
                 Contains(fmt::format("'{}': shard '{}' (of tensor '0.weight') leads outside '{}'",
                                      index, name, dir.path.string())));
    }
    edit_index([&](nlohmann::json& json) { json["weight_map"]["0.weight"] = "model.bin"; });
    CHECK_THAT(refused("bin"), Contains("shard 'model.bin' (of tensor '0.weight') is not a "
                                        ".safetensors file"));
  }
  SECTION("an index that is not one") {
    fresh_save();
    std::ofstream(index_path) << "{\"weight_map\": ";
    CHECK_THAT(refused("truncated"), Contains(fmt::format("'{}': not a safetensors index", index)));
    write_json(index_path, {{"metadata", {{"total_size", 1}}}});
    CHECK_THAT(refused("no map"), Contains("not a safetensors index: no \"weight_map\" object"));
    write_json(index_path, {{"weight_map", {{"0.weight", 3}}}});
    CHECK_THAT(refused("number"), Contains("the shard of tensor '0.weight' is not a string"));
  }
  SECTION("a directory without a state_dict") {
    fs::create_directories(dir.path / "empty");
    CHECK_THROWS_WITH(torchguard::load_state_dict(dir.path / "empty"),
                      Contains(fmt::format("cannot find a state_dict in '{}': it holds neither "
                                           "model.safetensors nor model.safetensors.index.json",
                                           (dir.path / "empty").string())));
  }
  SECTION("a tensor this LibTorch has no dtype for, in a shard") {
    // Written as another tool would: no save ids.
    torchguard::save_safetensors(dir.path / shard(1, 2), {{"w", of_bytes(8)}}, {{"format", "pt"}});
    torchguard::save_safetensors(dir.path / shard(2, 2), {}, {{"format", "pt"}},
                                 {{"f6", torchguard::RawTensor{"F6_E2M3", {4}, "abc"}}});
    write_json(index_path, {{"metadata", {{"total_size", 11}}},
                            {"weight_map", {{"w", shard(1, 2)}, {"f6", shard(2, 2)}}}});
    CHECK_THROWS_WITH(torchguard::load_state_dict(dir.path),
                      Contains(fmt::format("'{}': LibTorch", index)) &&
                          Contains(fmt::format("has no tensor for 1 of its tensors ('f6' in '{}')",
                                               shard(2, 2))));
    // Into a module it is an unexpected key, as from one file.
    torch::nn::Linear linear(2, 1);
    torchguard::LoadStateDictOptions non_strict;
    non_strict.strict = false;
    const auto result = torchguard::load_state_dict(*linear, dir.path, non_strict);
    CHECK(result.unexpected_keys == std::vector<std::string>{"w"});
  }
}

TEST_CASE("sharded saves never mix: an interrupted re-save is refused, by shard", "[state_dict]") {
  TempDir dir;
  const fs::path index_path = dir.path / "model.safetensors.index.json";
  // a (400) alone as b would make 1200; c (4000) over the limit; then b: 3 shards, the second
  // large.
  auto tensors = [](float start) {
    return TensorMap{
        {"a", of_bytes(400, start)}, {"b", of_bytes(800, start)}, {"c", of_bytes(4000, start)}};
  };
  torchguard::save_state_dict(tensors(0), dir.path, sharded(1000));
  CHECK(read_json(index_path)["weight_map"] == weight_map_of({{"a"}, {"c"}, {"b"}}));
  const std::string first_id = read_json(index_path)["metadata"]["torchguard_save_id"];

  // The same save again, cut short by the disk after its first shard (files over 2000 bytes fail).
  torchguard::testing::with_file_size_limit(2000, [&] {
    CHECK_THROWS_AS(torchguard::save_state_dict(tensors(1), dir.path, sharded(1000)),
                    torchguard::FileError);
  });
  const std::string second_id =
      torchguard::SafetensorsFile(dir.path / shard(1, 3)).metadata().at("torchguard_save_id");
  CHECK(second_id != first_id);
  // The index and shards 2 and 3 are the first save's, shard 1 the second's: refused.
  CHECK_THROWS_WITH(
      torchguard::load_state_dict(dir.path),
      Contains(fmt::format("'{}' is not from the save that '{}' describes (save id {} in the "
                           "shard, {} in the index)",
                           (dir.path / shard(1, 3)).string(), index_path.string(), second_id,
                           first_id)));
  // Saved again, whole: the second save's tensors.
  torchguard::save_state_dict(tensors(1), dir.path, sharded(1000));
  CHECK(same_state(torchguard::load_state_dict(dir.path), tensors(1)));

  // Files other tools wrote carry no id: nothing to compare, they load...
  auto json = read_json(index_path);
  json["metadata"].erase("torchguard_save_id");
  write_json(index_path, json);
  for (int s = 1; s <= 3; ++s) {
    const auto path = dir.path / shard(s, 3);
    const torchguard::SafetensorsFile file(path);
    auto part = file.tensors();
    torchguard::save_safetensors(path, part, {{"format", "pt"}});
  }
  CHECK(same_state(torchguard::load_state_dict(dir.path), tensors(1)));
  // ... but a shard of ours under their index is a mix all the same.
  torchguard::save_state_dict(tensors(2), dir.path / "ours", sharded(1000));
  fs::copy_file(dir.path / "ours" / shard(2, 3), dir.path / shard(2, 3),
                fs::copy_options::overwrite_existing);
  CHECK_THROWS_WITH(
      torchguard::load_state_dict(dir.path),
      Contains(fmt::format("'{}' is not from the save", (dir.path / shard(2, 3)).string())) &&
          Contains("in the shard, none in the index"));
}

TEST_CASE("sharded saves remove the previous save's stale files, and only those, after the index",
          "[state_dict]") {
  TempDir dir;
  auto model = small_model();
  for (const char* name : {"config.json", "notes.txt", "other-00001-of-00002.safetensors",
                           "model-00001-of-00004.safetensors.bak", "model-1-of-4.safetensors"}) {
    std::ofstream(dir.path / name) << "kept";
  }
  const std::vector<std::string> kept = {"config.json", "model-00001-of-00004.safetensors.bak",
                                         "model-1-of-4.safetensors", "notes.txt",
                                         "other-00001-of-00002.safetensors"};
  auto expect = [&](std::vector<std::string> written) {
    written.insert(written.end(), kept.begin(), kept.end());
    std::sort(written.begin(), written.end());
    CHECK(names_in(dir.path) == written);
    auto loaded = small_model(1);
    torchguard::load_state_dict(*loaded, dir.path);
    CHECK(same_state(state_of(*loaded), state_of(*model)));
  };
  torchguard::save_state_dict(*model, dir.path, sharded(40));
  expect({shard(1, 4), shard(2, 4), shard(3, 4), shard(4, 4), "model.safetensors.index.json"});
  // 48+12 fill 60; 1.weight to 2.bias's 12+12+12+12+8; 24+8: three shards, the four removed.
  torchguard::save_state_dict(*model, dir.path, sharded(60));
  expect({shard(1, 3), shard(2, 3), shard(3, 3), "model.safetensors.index.json"});
  // One shard: model.safetensors replaces the index and the shards.
  torchguard::save_state_dict(*model, dir.path, sharded(1'000'000));
  expect({"model.safetensors"});
  // And the reverse: a model.safetensors left behind would shadow the new index.
  torchguard::save_state_dict(*model, dir.path, sharded(40));
  expect({shard(1, 4), shard(2, 4), shard(3, 4), shard(4, 4), "model.safetensors.index.json"});
}

namespace {

// tests/transformers_interop.py serve, in the background: one interpreter for both of its parts
// (importing transformers takes seconds), with C++'s part in between. Files in `dir` say who is
// done: Python's `written`, then C++'s `cpp_written` (or `cpp_failed`), then Python's exit status.
class PythonServer {
 public:
  PythonServer(const std::string& python, fs::path dir, std::uint64_t limit)
      : dir_(std::move(dir)) {
    const std::string command =
        fmt::format("({} {}/transformers_interop.py serve '{}' {} >'{}' 2>&1; echo $? >'{}') &",
                    python, TORCHGUARD_TESTS_DIR, dir_.string(), limit,
                    (dir_ / "python.log").string(), (dir_ / "python.exit").string());
    REQUIRE(std::system(command.c_str()) == 0);
  }
  ~PythonServer() {
    if (!told_) {
      std::ofstream(dir_ / "cpp_failed").close();
      wait_for("python.exit");
    }
  }
  PythonServer(const PythonServer&) = delete;
  PythonServer& operator=(const PythonServer&) = delete;

  // True once Python wrote its part; false when it stopped first.
  bool written() { return wait_for("written") == "written"; }
  // Tells Python that C++'s part is written; true when Python's checks pass.
  bool check() {
    std::ofstream(dir_ / "cpp_written").close();
    told_ = true;
    wait_for("python.exit");
    return torchguard::testing::read_text(dir_ / "python.exit") == "0\n";
  }
  std::string log() const { return torchguard::testing::read_text(dir_ / "python.log"); }

 private:
  // Waits (150 s at most) until `name` is there or Python has exited; returns which.
  std::string wait_for(const std::string& name) const {
    auto there = [&](const std::string& file) {
      std::error_code error;
      if (file != "python.exit") return fs::exists(dir_ / file, error);
      const auto size = fs::file_size(dir_ / file, error);  // complete once it has its line
      return !error && size > 0;
    };
    for (int i = 0; i < 150 * 50; ++i) {
      if (there(name)) return name;
      if (there("python.exit")) return "python.exit";
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return "";
  }

  fs::path dir_;
  bool told_ = false;
};

}  // namespace

TEST_CASE(
    "interop: transformers' sharded save_pretrained loads in C++, and C++'s in from_pretrained",
    "[state_dict][interop]") {
  const std::string python = torchguard::testing::interop_python("transformers, safetensors.torch");
  if (python.empty()) return;  // skipped
  TempDir dir;
  PythonServer python_side(python, dir.path, 10'000);
  {
    const bool written = python_side.written();
    INFO(python_side.log());
    REQUIRE(written);
  }

  // Python's shards (20 KB each) read in C++: every tensor bitwise the single file's.
  const fs::path hf = dir.path / "hf";
  const auto index = read_json(hf / "model.safetensors.index.json");
  REQUIRE(index["metadata"]["total_size"] > 20'000 * 2);  // several shards
  const TensorMap from_shards = torchguard::load_state_dict(hf);
  const TensorMap reference = torchguard::load_safetensors(dir.path / "reference.safetensors");
  REQUIRE(from_shards.size() == reference.size());
  for (const auto& [name, tensor] : reference) {
    INFO(name);
    REQUIRE(from_shards.count(name));
    CHECK(same_bits(from_shards.at(name), tensor));
  }

  // transformers' own split of its state_dict (in the module's order), redone here.
  std::vector<torchguard::detail::NamedTensor> in_order;
  std::ifstream order(dir.path / "order.txt");
  for (std::string name; std::getline(order, name);)
    in_order.push_back({name, from_shards.at(name)});
  REQUIRE(in_order.size() == reference.size());
  const auto split = torchguard::detail::split_into_shards(in_order, 20'000);
  std::vector<std::vector<std::string>> shards;
  for (const auto& part : split.shards) {
    shards.emplace_back();
    for (const std::size_t i : part) shards.back().push_back(in_order[i].name);
  }
  CHECK(weight_map_of(shards) == index["weight_map"]);
  CHECK(index["metadata"]["total_size"] == split.total_size);

  // C++ shards of 10 KB (some tensors are over it) that from_pretrained loads: checked in Python,
  // with huggingface_hub's split of the same tensors.
  torchguard::save_state_dict(from_shards, dir.path / "cpp", sharded(10'000));
  fs::copy_file(hf / "config.json", dir.path / "cpp" / "config.json");
  const bool checked = python_side.check();
  INFO(python_side.log());
  CHECK(checked);
}
