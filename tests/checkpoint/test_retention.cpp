// checkpoint/retention.hpp: which committed checkpoints stay.
#include "torchguard/checkpoint/retention.hpp"

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "checkpoint_support.hpp"
#include "torchguard/checkpoint/restore.hpp"

namespace fs = std::filesystem;
namespace cp = torchguard::detail;
using torchguard::CheckpointInfo;
using torchguard::CheckpointOptions;
using torchguard::testing::CapturedLogger;
using torchguard::testing::commit;
using torchguard::testing::names_in;
using torchguard::testing::TempDir;

TEST_CASE("retention keeps the newest, the best by a finite metric, and the resumed one",
          "[checkpoint][parts][retention]") {
  std::vector<CheckpointInfo> all;
  for (int i = 1; i <= 6; ++i) {
    all.push_back({fs::path("c") / std::to_string(i), static_cast<std::uint64_t>(i), i, 0,
                   nlohmann::json::object()});
  }
  all[0].metrics["acc"] = 0.5;
  all[1].metrics["acc"] = nullptr;  // a NaN, as stored
  all[2].metrics["acc"] = 0.9;
  all[3].metrics["loss"] = 0.1;  // another metric
  CheckpointOptions options;
  options.keep_last = 2;
  auto kept = [&](std::optional<fs::path> resumed) {
    std::vector<std::string> names;
    for (const auto& path : cp::select_retained(all, options, resumed)) {
      names.push_back(path.filename().string());
    }
    return names;
  };
  CHECK(kept(std::nullopt) == std::vector<std::string>{"5", "6"});
  options.keep_best = 1;
  options.best_metric = "acc";
  options.best_mode = torchguard::MetricMode::max;
  CHECK(kept(std::nullopt) == std::vector<std::string>{"3", "5", "6"});
  options.best_mode = torchguard::MetricMode::min;
  CHECK(kept(fs::path("c") / "2") == std::vector<std::string>{"1", "2", "5", "6"});
}

TEST_CASE("retention deletes what it does not keep and leaves no trash",
          "[checkpoint][parts][retention]") {
  TempDir dir;
  for (int i = 1; i <= 4; ++i) commit(dir.path, i, i * 10);
  CheckpointOptions options;
  options.directory = dir.path;
  options.keep_last = 2;
  CapturedLogger captured;
  cp::apply_retention(options, dir.path / cp::checkpoint_name(1, 10), *captured.logger);
  CHECK(names_in(dir.path) == std::vector<std::string>{"ckpt-000001-step-10", "ckpt-000003-step-30",
                                                       "ckpt-000004-step-40"});
}
