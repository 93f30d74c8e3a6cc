// session/log_file.hpp: a TrainingSession's log file keeps every line as it is logged.
#include "torchguard/session.hpp"

#include <unistd.h>

#include <filesystem>
#include <stdexcept>
#include <string>

#include "support.hpp"

namespace fs = std::filesystem;
using torchguard::TrainingSession;
using torchguard::TrainingSessionOptions;
using torchguard::testing::CapturedLogger;
using torchguard::testing::Contains;
using torchguard::testing::TempDir;

TEST_CASE("the log file keeps every line and is flushed on errors", "[session]") {
  TempDir dir;
  CapturedLogger captured;
  const fs::path log_file = dir.path / "train.log";
  {
    TrainingSession session("with-file", {captured.logger, log_file, {}, false});
    session.record_failure(std::make_exception_ptr(std::runtime_error("disk on fire")));
    // Already on disk while the session is still open: a crash now would not lose it.
    const std::string content = torchguard::testing::read_text(log_file);
    CHECK(content.find("Training session 'with-file' started") != std::string::npos);
    CHECK(content.find("std::runtime_error: disk on fire") != std::string::npos);
  }
  CHECK(torchguard::testing::read_text(log_file).find(
            "Training session 'with-file' failed after") != std::string::npos);
  // The user's own sinks still got every line.
  CHECK(captured.sink->contains(spdlog::level::err, "disk on fire"));
}

TEST_CASE("every log line reaches the file as it is logged, before any flush", "[session]") {
  TempDir dir;
  TrainingSessionOptions options;
  options.logger = CapturedLogger().logger;
  options.log_file = dir.path / "train.log";
  TrainingSession session("lines", options);
  session.logger()->info("step 1 done");
  session.logger()->debug("below the level: not written");
  CHECK_THAT(torchguard::testing::read_text(options.log_file), Contains("step 1 done"));
}
