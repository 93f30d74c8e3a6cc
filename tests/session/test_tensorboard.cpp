// session/tensorboard.hpp and session/session_board.hpp: TensorBoard event files
// (TensorBoardWriter, TrainingSessionOptions::tensorboard_dir), read back by the real `tensorboard`
// package (tests/tensorboard_interop.py): the scalars, the texts, a torn last record, a SIGKILL, a
// resumed run, a write that fails.
#include "torchguard/session.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <ostream>
#include <regex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "support.hpp"

namespace fs = std::filesystem;
using torchguard::Metrics;
using torchguard::TensorBoardWriter;
using torchguard::TrainingSession;
using torchguard::TrainingSessionOptions;
using torchguard::testing::CapturedLogger;
using torchguard::testing::Contains;
using torchguard::testing::TempDir;

namespace {

// A scalar as TensorBoard holds it: its step and the bits of its float32.
struct Point {
  std::int64_t step;
  std::uint32_t bits;
  bool operator==(const Point& other) const { return step == other.step && bits == other.bits; }
};

std::ostream& operator<<(std::ostream& out, const Point& point) {
  return out << "{step " << point.step << ", bits " << point.bits << "}";
}

Point point(std::int64_t step, double value) {
  const auto single = static_cast<float>(value);
  std::uint32_t bits = 0;
  std::memcpy(&bits, &single, sizeof bits);
  return {step, bits};
}

// What tests/tensorboard_interop.py read from each directory, keyed by the directory's path; an
// empty object when the Python side is missing (the test prints SKIPPED and returns).
nlohmann::json tensorboard_reads(const std::vector<fs::path>& directories) {
  const std::string python = torchguard::testing::interop_python("tensorboard");
  if (python.empty()) return nlohmann::json::object();
  std::string command = python + " " + TORCHGUARD_TESTS_DIR + "/tensorboard_interop.py read";
  for (const auto& directory : directories) command += " '" + directory.string() + "'";
  const auto [output, ok] = torchguard::testing::command_output(command);
  REQUIRE(ok);
  return nlohmann::json::parse(output);
}

std::vector<Point> scalars(const nlohmann::json& read, const std::string& tag,
                           const char* reader = "scalars") {
  std::vector<Point> points;
  for (const auto& row : read.at(reader).value(tag, nlohmann::json::array())) {
    points.push_back({row[0].get<std::int64_t>(), row[1].get<std::uint32_t>()});
  }
  return points;
}

// The session texts (tag "session"), as (step, text).
std::vector<std::pair<std::int64_t, std::string>> texts(const nlohmann::json& read) {
  std::vector<std::pair<std::int64_t, std::string>> rows;
  for (const auto& row : read.at("texts").value("session", nlohmann::json::array())) {
    rows.emplace_back(row[0].get<std::int64_t>(), row[1].get<std::string>());
  }
  return rows;
}

// The event file of a directory that holds one (beside the session's .lock).
fs::path event_file(const fs::path& directory) {
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(directory)) {
    if (entry.path().filename().string().rfind("events.out.tfevents.", 0) == 0) {
      files.push_back(entry.path());
    }
  }
  REQUIRE(files.size() == 1);
  return files.front();
}

TrainingSessionOptions board_options(const fs::path& directory,
                                     std::shared_ptr<spdlog::logger> logger) {
  TrainingSessionOptions options;
  options.logger = std::move(logger);
  options.tensorboard_dir = directory;
  return options;
}

}  // namespace

TEST_CASE("TensorBoard reads the scalars of log_metrics exactly and the session's texts",
          "[tensorboard][interop]") {
  TempDir dir;
  CapturedLogger captured;
  const fs::path good = dir.path / "good", failed = dir.path / "failed";
  const double before = TensorBoardWriter::now();
  std::vector<std::pair<std::int64_t, Metrics>> logged = {
      {1, {{"loss", 2.5}, {"accuracy", 0.125}}},
      {2, {{"loss", 0.1}, {"epoch", 1}}},  // 0.1 is not a float32: TensorBoard holds float(0.1)
      {3, {{"loss", std::numeric_limits<double>::quiet_NaN()}}},
      {5, {{"loss", -1e30}, {"accuracy", 1}, {"big", std::int64_t{1} << 40}}},
      {8, {{"loss", std::numeric_limits<double>::infinity()}, {"epoch", 2}}},
  };
  {
    TrainingSession session("board", board_options(good, captured.logger));
    for (const auto& [step, metrics] : logged) session.log_metrics(step, metrics);
  }
  {
    TrainingSession session("board", board_options(failed, captured.logger));
    session.log_metrics(4, {{"loss", 1.0}});
    CHECK_THROWS_AS(session.run([] { throw std::out_of_range("batch 7 is missing"); }),
                    std::out_of_range);
  }
  const double after = TensorBoardWriter::now();
  const auto reads = tensorboard_reads({good, failed});
  if (reads.empty()) return;

  const auto& read = reads.at(good.string());
  for (const std::string tag : {"loss", "accuracy", "epoch", "big"}) {
    std::vector<Point> expected;
    for (const auto& [step, metrics] : logged) {
      for (const auto& [name, value] : metrics) {
        if (name == tag) expected.push_back(point(step, value.value()));
      }
    }
    INFO("tag " << tag);
    CHECK(scalars(read, tag) == expected);  // the steps, the values, in order
    CHECK(scalars(read, tag, "legacy_scalars") == expected);
  }
  CHECK(read.at("scalars").size() == 4);
  for (const auto& row : read.at("scalars").at("loss")) {
    CHECK(row[2].get<double>() >= before);
    CHECK(row[2].get<double>() <= after);
  }
  const auto good_texts = texts(read);
  REQUIRE(good_texts.size() == 2);
  CHECK(good_texts[0].first == 1);
  CHECK(good_texts[0].second == "Training session 'board' started");
  CHECK(good_texts[1].first == 8);
  CHECK_THAT(good_texts[1].second, Contains("Training session 'board' completed successfully in"));
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  CHECK(std::regex_match(event_file(good).filename().string(),
                         std::regex("events\\.out\\.tfevents\\.[0-9]{10}\\." + std::string(host) +
                                    "\\." + std::to_string(::getpid()))));

  const auto failed_texts = texts(reads.at(failed.string()));
  REQUIRE(failed_texts.size() == 3);
  CHECK(failed_texts[1].first == 4);
  CHECK(failed_texts[1].second ==
        "Training session 'board': std::out_of_range: batch 7 is missing");
  CHECK(failed_texts[2].first == 4);  // the end repeats the error (the web server shows the last)
  CHECK_THAT(failed_texts[2].second,
             Contains("batch 7 is missing") &&
                 Contains("Training session 'board' failed at step 4 after"));
}

TEST_CASE("a torn last record hides only itself from TensorBoard", "[tensorboard][interop]") {
  TempDir dir;
  const fs::path whole = dir.path / "whole";
  std::uintmax_t before_last = 0;
  {
    TensorBoardWriter board(whole);
    for (int step = 1; step <= 5; ++step) {
      before_last = fs::file_size(board.path());
      board.add_scalar("loss", 1.0 / step, step);
    }
  }
  const fs::path file = event_file(whole);
  const auto size = fs::file_size(file);
  // Cut in the length, in its CRC, in the data and in the data's CRC.
  std::vector<fs::path> directories{whole};
  for (const std::uintmax_t cut : {before_last + 3, before_last + 10, before_last + 20, size - 2}) {
    const fs::path torn = dir.path / ("torn-at-" + std::to_string(cut));
    fs::create_directories(torn);
    fs::copy_file(file, torn / file.filename());
    fs::resize_file(torn / file.filename(), cut);
    directories.push_back(torn);
  }
  // A second writer in the same directory, the same second: its file sorts after the first.
  TensorBoardWriter next(whole);
  CHECK(next.path().filename().string() > file.filename().string());

  const auto reads = tensorboard_reads(directories);
  if (reads.empty()) return;
  std::vector<Point> expected;
  for (int step = 1; step <= 5; ++step) expected.push_back(point(step, 1.0 / step));
  CHECK(scalars(reads.at(whole.string()), "loss") == expected);
  expected.pop_back();
  for (std::size_t i = 1; i < directories.size(); ++i) {
    INFO(directories[i].filename().string());
    CHECK(scalars(reads.at(directories[i].string()), "loss") == expected);
  }
}

TEST_CASE(
    "a SIGKILLed run keeps every step it logged and its resumed run replaces those past "
    "the checkpoint",
    "[tensorboard][interop]") {
  TempDir dir;
  const fs::path run = dir.path / "run";
  int report[2];
  REQUIRE(::pipe(report) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {  // logs steps until killed, reporting each one logged
    ::close(report[0]);
    try {
      TrainingSession session("killed",
                              board_options(run, std::make_shared<spdlog::logger>("quiet")));
      for (std::int64_t step = 1;; ++step) {
        session.log_metrics(step, {{"loss", static_cast<double>(step)}, {"lr", 0.5}});
        if (::write(report[1], &step, sizeof step) != sizeof step) ::_exit(1);
      }
    } catch (...) {
      ::_exit(2);
    }
  }
  ::close(report[1]);
  std::int64_t reported = 0;
  while (reported < 40) REQUIRE(::read(report[0], &reported, sizeof reported) == sizeof reported);
  ::kill(pid, SIGKILL);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  ::close(report[0]);
  REQUIRE(WIFSIGNALED(status));

  // What the killed run left, before the resumed run writes.
  const fs::path killed = dir.path / "killed";
  fs::copy(run, killed);
  {
    CapturedLogger captured;
    TrainingSession session("resumed", board_options(run, captured.logger));
    session.resume_metrics(10);  // from the checkpoint of step 10
    for (std::int64_t step = 11; step <= 15; ++step) {
      session.log_metrics(step, {{"loss", 100.0 + static_cast<double>(step)}});
    }
  }
  const auto reads = tensorboard_reads({killed, run});
  if (reads.empty()) return;
  const auto left = scalars(reads.at(killed.string()), "loss");
  REQUIRE(left.size() >= 40);  // every step reported as logged, perhaps a few more
  for (std::size_t i = 0; i < left.size(); ++i) {
    CHECK(left[i] == point(static_cast<std::int64_t>(i) + 1, static_cast<double>(i + 1)));
  }

  const auto& resumed = reads.at(run.string());
  std::vector<Point> expected;
  for (std::int64_t step = 1; step <= 10; ++step) expected.push_back(point(step, step));
  for (std::int64_t step = 11; step <= 15; ++step) expected.push_back(point(step, 100.0 + step));
  CHECK(scalars(resumed, "loss") == expected);  // steps 11.. of the killed run are gone
  CHECK(scalars(resumed, "loss", "legacy_scalars") == expected);
  CHECK(scalars(resumed, "lr").size() == 10);  // a tag the resumed run did not log: up to 10
  const auto resumed_texts = texts(resumed);
  REQUIRE(resumed_texts.size() == 3);
  CHECK(resumed_texts[0] ==
        std::pair<std::int64_t, std::string>(1, "Training session 'killed' started"));
  CHECK(resumed_texts[1].first == 11);
  CHECK(resumed_texts[1].second ==
        "Training session 'resumed' started  \nresumed from the checkpoint of step 10");
  CHECK(resumed_texts[2].first == 15);
}

TEST_CASE("a TensorBoard write that fails is cut off and names the file, and later steps read",
          "[tensorboard][interop][failure]") {
  TempDir dir;
  CapturedLogger captured;
  const fs::path board = dir.path / "board";
  fs::path file;
  {
    TrainingSession session("limited", board_options(board, captured.logger));
    session.log_metrics(1, {{"loss", 1.0}});
    file = event_file(board);
    const auto size = fs::file_size(file);
    torchguard::testing::with_file_size_limit(size + 10, [&] {  // room for half a record
      CHECK_THROWS_WITH(session.log_metrics(2, {{"loss", 2.0}}),
                        Contains("TensorBoard: cannot write an event to") &&
                            Contains(file.string()) && Contains("File too large"));
    });
    CHECK(fs::file_size(file) == size);  // the partial record is cut off again
    session.log_metrics(3, {{"loss", 3.0}});
  }
  const auto reads = tensorboard_reads({board});
  if (reads.empty()) return;
  CHECK(scalars(reads.at(board.string()), "loss") == std::vector<Point>{point(1, 1), point(3, 3)});
  CHECK(texts(reads.at(board.string())).size() == 2);  // the start and the end
}

TEST_CASE("a TensorBoard directory that cannot be made is a clear error that changes nothing",
          "[tensorboard][failure]") {
  TempDir dir;
  const fs::path blocker = dir.path / "file";
  { std::ofstream(blocker) << "not a directory"; }
  CapturedLogger captured;
  const auto default_before = torchguard::default_logger();
  CHECK_THROWS_WITH(TrainingSession("blocked", board_options(blocker / "board", captured.logger)),
                    Contains("TensorBoard: cannot create the directory") &&
                        Contains((blocker / "board").string()));
  CHECK(torchguard::default_logger() == default_before);
  CHECK(torchguard::testing::read_text(blocker) == "not a directory");
}
