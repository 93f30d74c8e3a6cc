// checkpoint/format.hpp: a checkpoint's named parts, format 2 read into them.
#include "torchguard/checkpoint.hpp"
#include "torchguard/data.hpp"

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "checkpoint_support.hpp"

namespace fs = std::filesystem;
namespace cp = torchguard::detail;
using torchguard::CheckpointOptions;
using torchguard::testing::CapturedLogger;
using torchguard::testing::Contains;
using torchguard::testing::TempDir;

TEST_CASE("a checkpoint of format 2 restores into the named parts it had",
          "[checkpoint][parts][restore]") {
  // Format 2 as torchguard 0.2 wrote it: the model, Adam, options.modules["ema"] and the
  // scheduler's count in extra.safetensors, a sampler's state as options.tensors["sampler"].
  TempDir dir;
  torch::manual_seed(4);
  torch::nn::Linear saved(3, 2), ema(3, 2);
  const fs::path path = dir.path / "ckpt-000001-step-7";
  fs::create_directories(path);
  nlohmann::ordered_json files = nlohmann::ordered_json::array();
  auto write = [&](const std::string& name, const torchguard::TensorMap& tensors) {
    torchguard::save_safetensors(path / name, tensors, {{"format", "pt"}});
    const std::string bytes = torchguard::testing::read_text(path / name);
    files.push_back(
        {{"name", name}, {"size", bytes.size()}, {"xxh3_64", cp::hex64(cp::checksum_of(bytes))}});
  };
  write("model.safetensors", {{"weight", saved->weight}, {"bias", saved->bias}});
  write("optimizer.safetensors", {{"state.0.step", torch::tensor(std::int64_t{7})},
                                  {"state.0.exp_avg", torch::full({2, 3}, 0.5)},
                                  {"state.0.exp_avg_sq", torch::full({2, 3}, 0.25)},
                                  {"state.1.step", torch::tensor(std::int64_t{7})},
                                  {"state.1.exp_avg", torch::full({2}, 0.5)},
                                  {"state.1.exp_avg_sq", torch::full({2}, 0.25)}});
  write("extra.safetensors", {{"modules.ema.weight", ema->weight},
                              {"modules.ema.bias", ema->bias},
                              {"scheduler.step_count", torch::tensor(std::int64_t{7})},
                              {"tensors.sampler", torch::tensor({1, 30, 100, 5, 1}, torch::kInt64)},
                              {"rng.cpu", at::detail::getDefaultCPUGenerator().get_state()}});
  nlohmann::ordered_json manifest;
  manifest["format_version"] = 2;
  manifest["sequence"] = 1;
  manifest["step"] = 7;
  manifest["epoch"] = 1;
  manifest["metrics"] = {{"loss", 0.5}};
  manifest["metadata"] = {{"settings", {{"--seed", 5}}}};
  manifest["optimizer"] = "adam";
  manifest["optimizer_groups"] = {{{"lr", 0.25},
                                   {"betas", {0.8, 0.9}},
                                   {"eps", 1e-8},
                                   {"weight_decay", 0.0},
                                   {"amsgrad", false}}};
  manifest["libtorch_version"] = "1.13.0";
  manifest["created_unix_s"] = 0;
  manifest["files"] = files;
  std::ofstream(path / "manifest.json") << cp::manifest_text(manifest);

  torch::nn::Linear model(3, 2), average(3, 2);
  torch::optim::Adam adam(model->parameters());
  torch::optim::StepLR schedule(adam, 3, 0.5);
  torchguard::ResumableSampler sampler(100, {/*seed=*/5});
  CapturedLogger captured;
  CheckpointOptions options;
  options.directory = dir.path;
  options.logger = captured.logger;
  options.modules["ema"] = average;  // format 2's spelling; models["ema"] reads the same
  options.scheduler = &schedule;
  options.samplers["sampler"] = sampler;
  options.settings.values = {{"--seed", 6}};
  options.settings.exact = {"--seed"};
  options.save_on_exit = torchguard::SaveOnExit::never;
  // The settings the demo kept in the metadata are compared too.
  CHECK_THROWS_WITH(torchguard::CheckpointGuard(model, adam, options),
                    Contains("--seed is 6 in this run but was 5"));
  options.settings.values = {{"--seed", 5}};
  torchguard::CheckpointGuard guard(model, adam, options);
  CHECK(guard.current_step() == 7);
  CHECK(torch::equal(model->weight, saved->weight));
  CHECK(torch::equal(average->weight, ema->weight));
  CHECK(static_cast<torch::optim::AdamOptions&>(adam.param_groups()[0].options()).lr() == 0.25);
  CHECK(std::get<0>(
            static_cast<torch::optim::AdamOptions&>(adam.param_groups()[0].options()).betas()) ==
        0.8);
  CHECK(adam.state().size() == 2);
  CHECK(torchguard::detail::SchedulerStepAccess::step_count(schedule) == 7);
  CHECK(sampler.epoch() == 1);
  CHECK(sampler.position() == 30);
  CHECK(guard.epoch() == 1);  // the sampler's
}
