// Which committed checkpoints stay: the newest keep_last, the best keep_best by a metric (never
// a NaN or a missing one), and the one training resumed from. The others are renamed to
// .trash-<name>, then deleted.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>

#include "torchguard/checkpoint/commit.hpp"
#include "torchguard/checkpoint/options.hpp"

namespace torchguard {
namespace detail {

// The paths of `all` (oldest first) that the options keep.
inline std::set<std::filesystem::path> select_retained(
    const std::vector<CheckpointInfo>& all, const CheckpointOptions& options,
    const std::optional<std::filesystem::path>& resumed_from) {
  std::set<std::filesystem::path> keep;
  for (std::size_t i = 0; i < all.size(); ++i) {
    if (i + static_cast<std::size_t>(options.keep_last) >= all.size()) keep.insert(all[i].path);
  }
  if (options.keep_best > 0) {
    std::vector<std::pair<double, std::filesystem::path>> scored;
    for (const auto& info : all) {
      const auto it = info.metrics.find(options.best_metric);
      if (it == info.metrics.end() || !it->is_number()) continue;  // NaN is stored as null
      const double value = it->get<double>();
      if (!std::isfinite(value)) continue;
      scored.emplace_back(options.best_mode == MetricMode::min ? value : -value, info.path);
    }
    std::sort(scored.begin(), scored.end());
    const auto best = std::min(scored.size(), static_cast<std::size_t>(options.keep_best));
    for (std::size_t i = 0; i < best; ++i) keep.insert(scored[i].second);
  }
  if (resumed_from) keep.insert(*resumed_from);
  return keep;
}

// Deletes the committed checkpoints in `directory` that select_retained() does not keep.
// Renamed first: a deletion cut short leaves a .trash- directory (removed at the next start-up),
// never a half-deleted checkpoint that still looks committed. Failures are logged.
inline void apply_retention(const CheckpointOptions& options,
                            const std::optional<std::filesystem::path>& resumed_from,
                            spdlog::logger& logger) {
  const std::vector<CheckpointInfo> all = list_committed(options.directory);
  const auto keep = select_retained(all, options, resumed_from);
  for (const auto& info : all) {
    if (keep.count(info.path)) continue;
    const auto trash =
        info.path.parent_path() / fmt::format(".trash-{}", info.path.filename().string());
    std::error_code error;
    std::filesystem::rename(info.path, trash, error);
    if (!error) std::filesystem::remove_all(trash, error);
    if (error) {
      logger.warn("CheckpointGuard: cannot remove old checkpoint '{}': {}", info.path.string(),
                  error.message());
    }
  }
}

}  // namespace detail
}  // namespace torchguard
