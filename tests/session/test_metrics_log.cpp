// session/metrics_log.hpp: metrics.jsonl, one JSON object per log_metrics call, cut back to the
// resumed step.
#include "torchguard/session.hpp"

#include <filesystem>
#include <fstream>
#include <limits>
#include <string>

#include <nlohmann/json.hpp>

#include "support.hpp"

namespace fs = std::filesystem;
using torchguard::TrainingSession;
using torchguard::TrainingSessionOptions;
using torchguard::testing::CapturedLogger;
using torchguard::testing::TempDir;

namespace {

// A session's options writing metrics.jsonl in a fresh directory, logging to a capture.
struct MetricsRun {
  TempDir dir;
  CapturedLogger captured;
  fs::path metrics = dir.path / "metrics.jsonl";
  TrainingSessionOptions options = [this] {
    TrainingSessionOptions o;
    o.logger = captured.logger;
    o.metrics_file = metrics;
    return o;
  }();
};

std::vector<nlohmann::json> read_rows(const fs::path& path) {
  std::ifstream in(path);
  std::string line;
  std::vector<nlohmann::json> rows;
  while (std::getline(in, line)) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

}  // namespace

TEST_CASE("log_metrics appends one JSON object per line and logs a readable line", "[session]") {
  MetricsRun run;
  auto& [dir, captured, metrics, options] = run;
  {
    TrainingSession session("metrics", options);
    session.log_metrics(10, {{"loss", 0.25}, {"accuracy", 0.875}});
    session.log_metrics(20, {{"loss", std::numeric_limits<double>::quiet_NaN()}});
  }
  {
    TrainingSession resumed("metrics", options);  // a resumed run appends
    resumed.log_metrics(30, {{"loss", 0.125}, {"epoch", 2}});
  }
  CHECK(captured.sink->contains(spdlog::level::info, "step 10 | loss=0.25 | accuracy=0.875"));
  // One readable line per session here (the interval is 10 s), every row in the file.
  CHECK(captured.sink->count(spdlog::level::info, "step ") == 2);
  const auto records = read_rows(metrics);
  REQUIRE(records.size() == 3);
  CHECK(records[0]["step"] == 10);
  CHECK(records[0]["loss"] == 0.25);
  CHECK(records[0]["accuracy"] == 0.875);
  CHECK(records[0]["elapsed_s"].is_number());
  CHECK(records[1]["loss"].is_null());  // NaN is not JSON: written as null
  CHECK(records[2]["step"] == 30);
  CHECK(records[2]["epoch"].is_number_integer());  // an integer metric stays an integer
  CHECK(records[2]["epoch"] == 2);
  CHECK(records[2]["loss"].is_number_float());
  CHECK(captured.sink->contains(spdlog::level::info, "step 30 | loss=0.125 | epoch=2"));
}

TEST_CASE("resume_metrics() drops the rows past the resumed step and a partial last row",
          "[session]") {
  MetricsRun run;
  auto& [dir, captured, metrics, options] = run;
  {
    TrainingSession first("first", options);
    for (int step = 10; step <= 40; step += 10) first.log_metrics(step, {{"loss", 1.0 / step}});
  }
  {
    std::ofstream partial(metrics, std::ios::app);  // a run killed in the middle of a row
    partial << "{\"step\": 50, \"lo";
  }
  TrainingSession resumed("resumed", options);
  resumed.resume_metrics(20);  // the checkpoint it resumes from is older than the last rows
  resumed.log_metrics(30, {{"loss", 0.5}});
  auto rows = read_rows(metrics);
  REQUIRE(rows.size() == 3);
  CHECK(rows[0]["step"] == 10);
  CHECK(rows[1]["step"] == 20);
  CHECK(rows[2]["step"] == 30);
  CHECK(rows[2]["loss"] == 0.5);
  CHECK(captured.sink->contains(spdlog::level::info, "3 metrics rows past it dropped"));
  resumed.resume_metrics(30);  // nothing past it: the file is left as it is
  CHECK(read_rows(metrics).size() == 3);
}
