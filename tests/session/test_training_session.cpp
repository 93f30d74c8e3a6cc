// session/training_session.hpp: TrainingSession logs a run from start to end, with its outcome;
// its stop request, its files, one run per directory, and files that cannot be written.
#include "torchguard/session.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <thread>

#include "support.hpp"
#include "torchguard/core.hpp"

namespace fs = std::filesystem;
using torchguard::Outcome;
using torchguard::TrainingSession;
using torchguard::TrainingSessionOptions;
using torchguard::testing::CapturedLogger;
using torchguard::testing::Contains;
using torchguard::testing::TempDir;

TEST_CASE("a session logs its start and its success with the duration", "[session]") {
  CapturedLogger captured;
  {
    TrainingSession session("experiment_001", captured.logger);
    CHECK(
        captured.sink->contains(spdlog::level::info, "Training session 'experiment_001' started"));
    CHECK_FALSE(session.failed());
  }
  CHECK(captured.sink->contains(spdlog::level::info,
                                "Training session 'experiment_001' completed successfully in "));
  CHECK(captured.sink->count(spdlog::level::err) == 0);
}

TEST_CASE("a session left by an exception logs a failure", "[session]") {
  CapturedLogger captured;
  try {
    TrainingSession session("unwound", captured.logger);
    throw std::runtime_error("out of data");
  } catch (const std::runtime_error&) {
  }
  CHECK(captured.sink->contains(spdlog::level::err, "Training session 'unwound' failed after"));
  CHECK_FALSE(captured.sink->contains(spdlog::level::info, "completed successfully"));
}

TEST_CASE("run() logs the exception's type and message and rethrows it", "[session]") {
  CapturedLogger captured;
  {
    TrainingSession session("diverged", captured.logger);
    CHECK_THROWS_AS(session.run([] { throw std::domain_error("loss is NaN at step 17"); }),
                    std::domain_error);
    CHECK(session.failed());
  }
  CHECK(captured.sink->contains(
      spdlog::level::err,
      "Training session 'diverged': std::domain_error: loss is NaN at step 17"));
  CHECK(captured.sink->contains(spdlog::level::err, "Training session 'diverged' failed after"));
}

TEST_CASE("run() returns the function's result and names non-standard exceptions", "[session]") {
  CapturedLogger captured;
  TrainingSession session("values", captured.logger);
  CHECK(session.run([] { return 41 + 1; }) == 42);
  int out = 0;
  session.run([&]() -> void { out = 7; });
  CHECK(out == 7);
  CHECK_THROWS_AS(session.run([] { throw 42; }), int);
  CHECK(captured.sink->contains(spdlog::level::err, "int (not derived from std::exception)"));
}

TEST_CASE("a session inside a ScopeStack is told the stack's outcome", "[session][scope_stack]") {
  CapturedLogger captured;
  {
    torchguard::ScopeStack stack;
    stack.emplace<TrainingSession>("stacked", captured.logger);
    stack.close(Outcome::failure);
  }
  CHECK(captured.sink->contains(spdlog::level::err, "Training session 'stacked' failed after"));
}

TEST_CASE("a cleanup that fails at a normal return surfaces: close() inside run() fails the run",
          "[session][scope_stack]") {
  CapturedLogger captured;
  auto cleanup_fails = [] { throw std::runtime_error("the final save failed: disk full"); };

  // The pattern: the guards' stack is closed inside run(), so that its error is the run's.
  TrainingSession session("closed", captured.logger);
  CHECK_THROWS_WITH(session.run([&] {
    torchguard::ScopeStack stack;
    stack.callback(cleanup_fails);
    stack.close();  // throws what the cleanup threw
    return 0;
  }),
                    Contains("disk full"));
  CHECK(session.failed());
  CHECK(captured.sink->contains(spdlog::level::err, "the final save failed: disk full"));
  session.close(Outcome::success);
  CHECK(captured.sink->contains(spdlog::level::err, "Training session 'closed' failed after"));

  // Without it the stack's destructor can only log: the error is reported, but nothing else
  // knows, and the session in the same stack ends as failed.
  {
    torchguard::ScopeStack stack(captured.logger);
    stack.emplace<TrainingSession>("destroyed", captured.logger);
    stack.callback(cleanup_fails);
  }
  CHECK(captured.sink->contains(spdlog::level::err,
                                "a cleanup failed while the stack was destroyed"));
  CHECK(captured.sink->contains(spdlog::level::err, "Training session 'destroyed' failed after"));
}

TEST_CASE("an unopenable log or metrics file is a clear error", "[session]") {
  TempDir dir;
  std::ofstream(dir.path / "a-file") << "not a directory";
  const fs::path missing = dir.path / "a-file" / "train.log";
  TrainingSessionOptions log_options;
  log_options.log_file = missing;
  CHECK_THROWS_WITH(TrainingSession("bad-log", log_options),
                    Contains("cannot open the log file") && Contains(missing.string()));
  TrainingSessionOptions metrics_options;
  metrics_options.metrics_file = missing;
  CHECK_THROWS_WITH(TrainingSession("bad-metrics", metrics_options),
                    Contains("cannot open the metrics file") && Contains("Not a directory"));
}

TEST_CASE("missing parent directories of the log and metrics files are created", "[session]") {
  TempDir dir;
  TrainingSessionOptions options;
  options.logger = CapturedLogger().logger;
  options.log_file = dir.path / "logs" / "train.log";
  options.metrics_file = dir.path / "runs" / "1" / "metrics.jsonl";
  {
    TrainingSession session("nested-dirs", options);
    session.log_metrics(1, {{"loss", 1.0}});
  }
  CHECK(fs::file_size(options.log_file) > 0);
  CHECK(fs::file_size(options.metrics_file) > 0);
}

TEST_CASE("request_stop() is seen by stop_requested()", "[session]") {
  CapturedLogger captured;
  TrainingSession session("stoppable", captured.logger);
  CHECK_FALSE(session.stop_requested());
  session.request_stop();
  CHECK(session.stop_requested());
}

TEST_CASE("the stop token is cancelled by request_stop() and wakes a waiting task",
          "[session][cancellation]") {
  CapturedLogger captured;
  TrainingSession session("token", captured.logger);
  const torchguard::CancellationToken token = session.stop_token();
  CHECK(token.can_be_cancelled());
  CHECK_FALSE(token.cancelled());
  std::thread stopper([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    session.request_stop();
  });
  const auto started = std::chrono::steady_clock::now();
  CHECK(token.wait_for(std::chrono::seconds(30)));
  CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(20));
  stopper.join();
  CHECK(token.cancelled());
  CHECK(session.stop_requested());
}

TEST_CASE("guards built without a logger inside a session log to the session's log file",
          "[session]") {
  TempDir dir;
  CapturedLogger captured;
  const auto before = torchguard::default_logger();
  {
    TrainingSessionOptions options;
    options.logger = captured.logger;
    options.log_file = dir.path / "train.log";
    TrainingSession session("shared", options);
    torchguard::ScopeStack stack;  // no logger given: the session's
    stack.callback([] { throw std::runtime_error("a cleanup failed"); });
    CHECK_THROWS(stack.close());
    stack.callback([] { throw std::runtime_error("and another"); });
    stack.callback([] { throw std::runtime_error("a second one"); });
    CHECK_THROWS(stack.close());
  }
  CHECK(torchguard::default_logger() == before);  // given back at close
  CHECK(captured.sink->contains(spdlog::level::err, "another cleanup failed too"));
  CHECK_THAT(torchguard::testing::read_text(dir.path / "train.log"),
             Contains("another cleanup failed too"));
}

TEST_CASE("a moved session logs its end once, from where it lives", "[session][contract]") {
  static_assert(torchguard::is_guard_v<TrainingSession>);
  CapturedLogger captured;
  {
    TrainingSession first("moved", captured.logger);
    TrainingSession second(std::move(first));
    TrainingSession third("other", captured.logger);
    third = std::move(second);  // "other" ends here
    CHECK(captured.sink->count(spdlog::level::info, "'other' completed successfully") == 1);
  }
  CHECK(captured.sink->count(spdlog::level::info, "'moved' completed successfully") == 1);
}

TEST_CASE("a stopped session ends with the step and the reason, never as completed", "[session]") {
  CapturedLogger captured;
  {
    TrainingSession session("stopped", captured.logger);
    session.log_metrics(40, {{"loss", 0.5}});
    session.set_step(42);
    session.request_stop();
  }
  CHECK(captured.sink->contains(spdlog::level::warn,
                                "Training session 'stopped' stopped at step 42 by a stop request"));
  CHECK_FALSE(captured.sink->contains(spdlog::level::info, "completed successfully"));
  // A stop that interrupts loading (a Cancelled from run()) is a stop too, not a failure.
  CapturedLogger cancelled;
  {
    TrainingSession session("cancelled", cancelled.logger);
    session.request_stop();
    CHECK_THROWS_AS(session.run([] { throw torchguard::Cancelled("loading stopped"); }),
                    torchguard::Cancelled);
  }
  CHECK(cancelled.sink->contains(spdlog::level::warn, "'cancelled' stopped by a stop request"));
  CHECK(cancelled.sink->count(spdlog::level::err) == 0);
}

namespace {

// A child test's session options: its log and metrics files in `dir` ($TORCHGUARD_RUN_DIR),
// TensorBoard's events in `board`, and a logger of its own.
TrainingSessionOptions child_options(const fs::path& dir, const fs::path& board) {
  TrainingSessionOptions options;
  options.logger = std::make_shared<spdlog::logger>("child");
  options.log_file = dir / "train.log";
  options.metrics_file = dir / "metrics.jsonl";
  options.tensorboard_dir = board;
  return options;
}

}  // namespace

// Run by the lock test in a child: a session on $TORCHGUARD_RUN_DIR until killed.
TEST_CASE("session lock child: hold a run directory until killed", "[.session_lock_child]") {
  const char* dir = std::getenv("TORCHGUARD_RUN_DIR");
  if (!dir) return;
  TrainingSession session("holder", child_options(dir, dir));
  session.log_metrics(1, {{"loss", 1.0}});
  const char ready = 1;
  if (::write(3, &ready, 1) != 1) return;
  for (int i = 0; i < 600; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
}

TEST_CASE("a second run on a run directory fails at once and writes nothing into its files",
          "[session]") {
  TempDir dir;
  int report[2];
  REQUIRE(::pipe(report) == 0);
  const pid_t holder = torchguard::testing::spawn_test_child(
      "[.session_lock_child]", {"TORCHGUARD_RUN_DIR=" + dir.path.string()}, "", report[1]);
  ::close(report[1]);
  char ready = 0;
  REQUIRE(::read(report[0], &ready, 1) == 1);
  ::close(report[0]);
  std::map<std::string, std::string> before;
  for (const auto& entry : fs::directory_iterator(dir.path)) {
    before[entry.path().filename().string()] = torchguard::testing::read_text(entry.path());
  }
  TrainingSessionOptions options;
  CapturedLogger captured;
  options.logger = captured.logger;
  options.log_file = dir.path / "train.log";
  options.metrics_file = dir.path / "metrics.jsonl";
  options.tensorboard_dir = dir.path;
  CHECK_THROWS_WITH(TrainingSession("second", options),
                    Contains("TrainingSession: the run directory") &&
                        Contains("in use by another run (pid " + std::to_string(holder) + ")"));
  std::map<std::string, std::string> after;
  for (const auto& entry : fs::directory_iterator(dir.path)) {
    after[entry.path().filename().string()] = torchguard::testing::read_text(entry.path());
  }
  CHECK(after == before);  // no line, no row, no event file of the refused run
  CHECK(captured.sink->lines().empty());
  ::kill(holder, SIGKILL);
  int status = 0;
  ::waitpid(holder, &status, 0);
  TrainingSession third("third", options);  // the kernel released the dead holder's lock
}

// Run by the file-error test below in a child under tests/io_faults.c: one session whose files
// fail as $TORCHGUARD_FAULTS says; prints what each call threw.
TEST_CASE("session child: files that cannot be written", "[.session_faults_child]") {
  const char* dir = std::getenv("TORCHGUARD_RUN_DIR");
  if (!dir) return;
  TrainingSession session("faulty", child_options(dir, fs::path(dir) / "board"));
  auto attempt = [](const char* what, auto&& fn) {
    try {
      fn();
      std::cout << what << ": ok" << std::endl;
    } catch (const torchguard::FileError& e) {
      std::cout << what << ": FileError: " << e.what() << std::endl;
    }
  };
  attempt("log_metrics", [&] { session.log_metrics(1, {{"loss", 1.0}}); });
  attempt("close", [&] { session.close(Outcome::success); });
}

TEST_CASE("a metrics, log or TensorBoard file that cannot be written fails the run, never loops",
          "[session][faults]") {
  TempDir dir;
  const auto run = [&](const std::string& faults) {
    const auto child = torchguard::testing::run_with_faults(
        "[.session_faults_child]", faults, {"TORCHGUARD_RUN_DIR=" + dir.path.string()});
    INFO(child.output);
    CHECK(child.exit_status == 0);
    CHECK_THAT(child.output, Contains("io_faults:"));
    return child.output;
  };
  // A write that writes nothing (a full FUSE or network file system): an error at once.
  CHECK_THAT(run("write:metrics.jsonl:0"),
             Contains("log_metrics: FileError: cannot write metrics to") &&
                 Contains("No space left on device") && Contains("close: ok"));
  // At the end: the TensorBoard file's fsync, the log file's close.
  CHECK_THAT(
      run("fsync:events.out.tfevents:EIO"),
      Contains("log_metrics: ok") && Contains("close: FileError: TensorBoard: cannot fsync"));
  CHECK_THAT(run("close:train.log:EIO"), Contains("close: FileError: cannot close the log file") &&
                                             Contains("Input/output error"));
  CHECK_THAT(run("write:train.log:ENOSPC:2"),
             Contains("close: FileError: cannot write the log file") &&
                 Contains("No space left on device"));
}
