// What the tests of checkpoint/ share (tests/checkpoint/, tests/data/): a training run to guard,
// a committed checkpoint without a guard, and the Python side of the safetensors exchange.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "support.hpp"
#include "torchguard/checkpoint.hpp"
#include "torchguard/checkpoint/commit.hpp"
#include "torchguard/checkpoint/format.hpp"

namespace torchguard::testing {

namespace fs = std::filesystem;
namespace cp = torchguard::detail;

struct NetImpl : torch::nn::Module {
  NetImpl()
      : fc1(register_module("fc1", torch::nn::Linear(8, 16))),
        norm(register_module("norm", torch::nn::BatchNorm1d(16))),
        dropout(register_module("dropout", torch::nn::Dropout(0.2))),
        fc2(register_module("fc2", torch::nn::Linear(16, 1))) {}
  torch::Tensor forward(torch::Tensor x) { return fc2(dropout(torch::relu(norm(fc1(x))))); }
  torch::nn::Linear fc1;
  torch::nn::BatchNorm1d norm;
  torch::nn::Dropout dropout;
  torch::nn::Linear fc2;
};
TORCH_MODULE(Net);

// Everything a training run holds, built from a seed (different seeds: different weights).
struct Run {
  explicit Run(std::uint64_t seed) {
    torch::manual_seed(seed);
    model = Net();
    optimizer =
        std::make_unique<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(1e-2));
    scheduler = std::make_unique<torch::optim::StepLR>(*optimizer, 3, 0.5);
  }
  // One step on random data: uses the RNG for data and dropout, like real training.
  // `before_update` runs just before the optimizer steps (a CheckpointGuard's fence).
  double train_step(const std::function<void()>& before_update = {}) {
    model->train();
    const torch::Tensor x = torch::randn({32, 8});
    const torch::Tensor y = x.sum(1, true);
    optimizer->zero_grad();
    torch::Tensor loss = torch::mse_loss(model->forward(x), y);
    loss.backward();
    if (before_update) before_update();
    optimizer->step();
    scheduler->step();
    return loss.item<double>();
  }
  CheckpointOptions options(const fs::path& dir, std::shared_ptr<spdlog::logger> logger) {
    CheckpointOptions o;
    o.directory = dir;
    o.scheduler = scheduler.get();
    o.logger = std::move(logger);
    return o;
  }
  Net model{nullptr};
  std::unique_ptr<torch::optim::Adam> optimizer;
  std::unique_ptr<torch::optim::StepLR> scheduler;
};

// True when both modules hold the same parameters and buffers, by name.
inline bool same_parameters(const torch::nn::Module& a, const torch::nn::Module& b) {
  const auto pa = a.named_parameters();
  const auto pb = b.named_parameters();
  if (pa.size() != pb.size()) return false;
  for (const auto& item : pa) {
    if (!torch::equal(item.value(), pb[item.key()])) return false;
  }
  const auto ba = a.named_buffers();
  const auto bb = b.named_buffers();
  for (const auto& item : ba) {
    if (!torch::equal(item.value(), bb[item.key()])) return false;
  }
  return true;
}

// Saves `count` checkpoints of `run` at steps 1..count (one per step).
inline void make_checkpoints(const fs::path& dir, int count, Run& run) {
  CapturedLogger captured;
  auto options = run.options(dir, captured.logger);
  options.keep_last = count;
  options.every_n_steps = 1;
  options.save_on_exit = SaveOnExit::never;
  CheckpointGuard guard(run.model, *run.optimizer, options);
  for (int i = 0; i < count; ++i) {
    run.train_step();
    guard.step({{"loss", 1.0 / (i + 1)}});
  }
}

// A snapshot of a model and an optimizer archive as the guard would capture them, for the
// commit, retention and restore tests that work without a guard.
inline cp::Snapshot small_snapshot(std::uint64_t sequence, std::int64_t step) {
  cp::Snapshot snapshot;
  snapshot.sequence = sequence;
  snapshot.step = step;
  snapshot.epoch = 1;
  snapshot.metrics = {{"loss", 0.25}};
  snapshot.parts["models"]["model"] = {{"file", cp::model_file}};
  snapshot.parts["optimizers"]["optimizer"] = {
      {"kind", "archive"}, {"file", "optimizer.pt"}, {"param_groups", nlohmann::json::array()}};
  snapshot.files.push_back(
      {cp::model_file,
       {{"w", torch::arange(10, torch::kFloat32)}, {"b", torch::tensor({true, false, true})}},
       {{"format", "pt"}}});
  snapshot.files.push_back(
      {cp::extra_file, {{cp::cpu_rng_key, torch::zeros({4}, torch::kUInt8)}}, {}});
  snapshot.archives.push_back({"optimizer.pt", nullptr, "state bytes"});
  return snapshot;
}

// Commits small_snapshot(sequence, step) into `dir`; returns the checkpoint's path.
inline fs::path commit(const fs::path& dir, std::uint64_t sequence, std::int64_t step) {
  auto snapshot = small_snapshot(sequence, step);
  cp::write_checkpoint(dir, snapshot);
  return dir / cp::checkpoint_name(sequence, step);
}

// Runs tests/safetensors_interop.py with `python`; true when it succeeds.
inline bool python_side(const std::string& python, const std::string& command,
                        const fs::path& target) {
  const std::string line = fmt::format("{} {}/safetensors_interop.py {} '{}'", python,
                                       TORCHGUARD_TESTS_DIR, command, target.string());
  return std::system(line.c_str()) == 0;
}

// The checkpoints in `dir` (its ckpt-* entries), sorted: oldest first.
inline std::vector<fs::path> checkpoint_dirs(const fs::path& dir) {
  std::vector<fs::path> found;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().filename().string().rfind("ckpt-", 0) == 0) found.push_back(entry.path());
  }
  std::sort(found.begin(), found.end());
  return found;
}

// Options for `directory` that log nowhere: what child processes and their parents use.
inline CheckpointOptions quiet_options(const fs::path& directory) {
  CheckpointOptions options;
  options.directory = directory;
  options.logger = std::make_shared<spdlog::logger>("quiet");
  return options;
}

}  // namespace torchguard::testing
