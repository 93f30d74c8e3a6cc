// checkpoint/format_v1.hpp: a checkpoint of torchguard 0.1 restores.
#include "torchguard/checkpoint.hpp"

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "checkpoint_support.hpp"

namespace fs = std::filesystem;
namespace cp = torchguard::detail;
using torchguard::CheckpointOptions;
using torchguard::testing::CapturedLogger;
using torchguard::testing::names_in;
using torchguard::testing::TempDir;

TEST_CASE(
    "a checkpoint of format 1 (tensors.bin, state.pt) restores, and the next save writes format 3",
    "[checkpoint][parts][restore]") {
  TempDir dir;
  torch::manual_seed(3);
  torch::nn::Linear saved(3, 2);
  const fs::path path = dir.path / "ckpt-000001-step-5";
  fs::create_directories(path);
  // tensors.bin as torchguard 0.1 wrote it: magic, header length, JSON, data aligned to 64.
  nlohmann::json header = nlohmann::json::array();
  std::string data;
  auto add = [&](const std::string& name, const torch::Tensor& t) {
    header.push_back({{"name", name},
                      {"dtype", "float32"},
                      {"shape", t.sizes().vec()},
                      {"offset", data.size()},
                      {"bytes", t.nbytes()}});
    data.append(static_cast<const char*>(t.data_ptr()), t.nbytes());
    data.resize(cp::align_up(data.size()), '\0');
  };
  add("model/weight", saved->weight.detach());
  add("model/bias", saved->bias.detach());
  add("optimizer/0/momentum_buffer", torch::full({2, 3}, 0.25));
  const std::string text = header.dump();
  const std::uint64_t length = text.size();
  std::string tensors_bin = "TGTENSR1";
  tensors_bin.append(reinterpret_cast<const char*>(&length), sizeof length);
  tensors_bin += text;
  tensors_bin.resize(cp::align_up(tensors_bin.size()), '\0');
  tensors_bin += data;
  auto archive = cp::new_archive();
  torch::serialize::OutputArchive group(archive->compilation_unit());
  torch::optim::SGDOptions(0.5).momentum(0.9).serialize(group);
  archive->write("optimizer_group/0", group);
  const std::string state_pt = cp::serialize_to_memory(*archive);
  nlohmann::json files = nlohmann::json::array();
  for (const auto& [name, bytes] :
       {std::pair<std::string, std::string>{"tensors.bin", tensors_bin}, {"state.pt", state_pt}}) {
    std::ofstream(path / name, std::ios::binary) << bytes;
    files.push_back(
        {{"name", name}, {"size", bytes.size()}, {"xxh3_64", cp::hex64(cp::checksum_of(bytes))}});
  }
  std::ofstream(path / "manifest.json") << nlohmann::json{
      {"format_version", 1}, {"sequence", 1}, {"step", 5},
      {"epoch", 2},          {"metrics", {}}, {"metadata", nlohmann::json::object()},
      {"optimizer", "sgd"},  {"files", files}}.dump();

  torch::nn::Linear model(3, 2);
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  CapturedLogger captured;
  CheckpointOptions options;
  options.directory = dir.path;
  options.logger = captured.logger;
  {
    torchguard::CheckpointGuard guard(model, sgd, options);
    REQUIRE(guard.resumed());
    CHECK(guard.current_step() == 5);
    CHECK(torch::equal(model->weight, saved->weight));
    CHECK(static_cast<torch::optim::SGDOptions&>(sgd.param_groups()[0].options()).lr() == 0.5);
    auto& state = static_cast<torch::optim::SGDParamState&>(*sgd.state().begin()->second);
    CHECK(torch::equal(state.momentum_buffer(), torch::full({2, 3}, 0.25)));
    guard.save();  // nothing trained: only asked for (the exit save would skip it)
  }
  const auto newest = cp::committed_paths(dir.path).back();
  CHECK(newest.filename() == "ckpt-000002-step-5");  // saved again, in the current format
  CHECK(names_in(newest) == std::vector<std::string>{"extra.safetensors", "manifest.json",
                                                     "model.safetensors", "optimizer.safetensors"});
  const auto manifest =
      nlohmann::json::parse(torchguard::testing::read_text(newest / "manifest.json"));
  CHECK(manifest["format_version"] == cp::checkpoint_format_version);
  const auto& saved_group = manifest["optimizers"]["optimizer"]["param_groups"][0];
  CHECK(saved_group["lr"] == 0.5);
  CHECK(saved_group["momentum"] == 0.9);
  CHECK(saved_group["params"] == nlohmann::json::array({0, 1}));
  CHECK(manifest["optimizers"]["optimizer"]["parameters"] ==
        nlohmann::json::array({"model/weight", "model/bias"}));
  const torchguard::SafetensorsFile optimizer(newest / "optimizer.safetensors");
  CHECK(torch::equal(*optimizer.tensor("state.0.momentum_buffer"), torch::full({2, 3}, 0.25)));
  torch::nn::Linear loaded(3, 2);
  torchguard::load_state_dict(*loaded, newest / "model.safetensors");
  CHECK(torch::equal(loaded->weight, saved->weight));
}
