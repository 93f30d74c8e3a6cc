#include "torchguard/session.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "support.hpp"
#include "torchguard/core.hpp"

namespace fs = std::filesystem;
using torchguard::Outcome;
using torchguard::TrainingSession;
using torchguard::TrainingSessionOptions;
using torchguard::testing::CapturedLogger;
using torchguard::testing::Contains;
using torchguard::testing::TempDir;

namespace {

// Waits (bounded) for a signal sent to this process to be handled.
bool wait_for_stop(const TrainingSession& session) {
  for (int i = 0; i < 1000 && !session.stop_requested(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return session.stop_requested();
}

std::atomic<int> custom_handler_calls{0};
extern "C" void custom_handler(int) { custom_handler_calls.fetch_add(1); }

}  // namespace

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

TEST_CASE("exit_status turns how main's work ended into a status, never an abort", "[session]") {
  CHECK(torchguard::exit_status([] { return 3; }) == 3);
  CHECK(torchguard::exit_status([] {}) == 0);
  CHECK(torchguard::exit_status([]() -> int { throw torchguard::Cancelled("stopped"); }) == 130);
  CHECK(torchguard::exit_status([]() -> int { throw std::runtime_error("bad data"); }) == 1);
  CHECK(torchguard::exit_status([]() -> int { throw 42; }) == 1);
  // A session's failure: logged by run() with its type, then the status.
  CapturedLogger captured;
  CHECK(torchguard::exit_status([&] {
          TrainingSession session("failing", captured.logger);
          return session.run([]() -> int { throw std::domain_error("loss is nan"); });
        }) == 1);
  CHECK(captured.sink->contains(spdlog::level::err, "std::domain_error: loss is nan"));
}

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

TEST_CASE("SIGTERM sent to the process requests a stop and handlers come back at exit",
          "[session][signal]") {
  CapturedLogger captured;
  struct sigaction custom {};
  custom.sa_handler = custom_handler;
  sigemptyset(&custom.sa_mask);
  struct sigaction saved_term {
  }, saved_int{};
  REQUIRE(::sigaction(SIGTERM, &custom, &saved_term) == 0);
  REQUIRE(::sigaction(SIGINT, &custom, &saved_int) == 0);
  custom_handler_calls = 0;
  {
    TrainingSessionOptions options;
    options.logger = captured.logger;
    options.handle_signals = true;
    TrainingSession session("signalled", options);
    CHECK_FALSE(session.stop_requested());
    REQUIRE(::kill(::getpid(), SIGTERM) == 0);
    CHECK(wait_for_stop(session));
    CHECK(session.stop_token().cancelled());  // the one stop signal the other guards take
    CHECK(custom_handler_calls == 0);         // the session's handler took it, the process lives
    CHECK(captured.sink->contains(spdlog::level::warn, "SIGTERM received, stopping"));
  }
  CHECK(captured.sink->contains(spdlog::level::warn, "stopped by SIGTERM"));
  CHECK_FALSE(captured.sink->contains(spdlog::level::info, "completed successfully"));
  // The previous handlers are back.
  struct sigaction now {};
  REQUIRE(::sigaction(SIGTERM, nullptr, &now) == 0);
  CHECK(now.sa_handler == custom_handler);
  REQUIRE(::kill(::getpid(), SIGINT) == 0);
  for (int i = 0; i < 1000 && custom_handler_calls == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  CHECK(custom_handler_calls == 1);
  ::sigaction(SIGTERM, &saved_term, nullptr);
  ::sigaction(SIGINT, &saved_int, nullptr);
}

TEST_CASE("a signal inherited as ignored stays ignored, and the log says so once",
          "[session][signal]") {
  CapturedLogger captured;
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  struct sigaction saved_int {};
  REQUIRE(::sigaction(SIGINT, &ignore, &saved_int) == 0);
  {
    TrainingSessionOptions options;
    options.logger = captured.logger;
    options.handle_signals = true;
    TrainingSession session("nohup", options);
    struct sigaction now {};
    REQUIRE(::sigaction(SIGINT, nullptr, &now) == 0);
    CHECK(now.sa_handler == SIG_IGN);
    REQUIRE(::sigaction(SIGTERM, nullptr, &now) == 0);
    CHECK(now.sa_handler != SIG_IGN);  // SIGTERM was not ignored: the session takes it
    REQUIRE(::kill(::getpid(), SIGINT) == 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK_FALSE(session.stop_requested());
    CHECK(captured.sink->count(spdlog::level::info, "SIGINT ignored by this process") == 1);
  }
  struct sigaction after {};
  REQUIRE(::sigaction(SIGINT, nullptr, &after) == 0);
  CHECK(after.sa_handler == SIG_IGN);
  ::sigaction(SIGINT, &saved_int, nullptr);
}

TEST_CASE("without handle_signals a session leaves the handlers alone", "[session][signal]") {
  struct sigaction before {};
  REQUIRE(::sigaction(SIGINT, nullptr, &before) == 0);
  {
    CapturedLogger captured;
    TrainingSession session("plain", captured.logger);
    struct sigaction during {};
    REQUIRE(::sigaction(SIGINT, nullptr, &during) == 0);
    CHECK(during.sa_handler == before.sa_handler);
  }
}

TEST_CASE("nested sessions restore handlers in order", "[session][signal]") {
  CapturedLogger captured;
  TrainingSessionOptions options;
  options.logger = captured.logger;
  options.handle_signals = true;
  struct sigaction before {};
  REQUIRE(::sigaction(SIGINT, nullptr, &before) == 0);
  {
    TrainingSession outer("outer", options);
    struct sigaction outer_handler {};
    REQUIRE(::sigaction(SIGINT, nullptr, &outer_handler) == 0);
    {
      TrainingSession inner("inner", options);
      REQUIRE(::kill(::getpid(), SIGINT) == 0);
      CHECK(wait_for_stop(inner));
      CHECK(outer.stop_requested());  // a signal is for the whole process
    }
    struct sigaction after_inner {};
    REQUIRE(::sigaction(SIGINT, nullptr, &after_inner) == 0);
    CHECK(after_inner.sa_handler == outer_handler.sa_handler);
  }
  struct sigaction after {};
  REQUIRE(::sigaction(SIGINT, nullptr, &after) == 0);
  CHECK(after.sa_handler == before.sa_handler);
}

namespace {

// Runs `child` in a forked process and returns its wait status. The child never returns into
// Catch2: it _exit()s with the code `child` returns.
template <class F>
int run_in_child(F child, int parent_signals_after_ready) {
  int ready[2];
  REQUIRE(::pipe(ready) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(ready[0]);
    ::_exit(child(ready[1]));
  }
  ::close(ready[1]);
  char byte = 0;
  REQUIRE(::read(ready[0], &byte, 1) == 1);  // the child's session is up
  for (int i = 0; i < parent_signals_after_ready; ++i) {
    ::kill(pid, SIGTERM);
    if (i == 0) REQUIRE(::read(ready[0], &byte, 1) == 1);  // the child saw the first one
  }
  ::close(ready[0]);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  return status;
}

// A child with a signal-handling session: reports when it is up and when it saw a stop, then
// lingers `linger_ms` (a second signal, if sent, ends it there).
int child_session(int ready_fd, int linger_ms) {
  TrainingSessionOptions options;
  options.logger = std::make_shared<spdlog::logger>("child");  // no sinks: quiet
  options.handle_signals = true;
  TrainingSession session("child", options);
  const char byte = 'r';
  if (::write(ready_fd, &byte, 1) != 1) return 10;
  for (int i = 0; i < 5000 && !session.stop_requested(); ++i) ::usleep(1000);
  if (!session.stop_requested()) return 11;
  if (::write(ready_fd, &byte, 1) != 1) return 12;
  for (int i = 0; i < linger_ms; ++i) ::usleep(1000);
  return 0;
}

}  // namespace

TEST_CASE("a real SIGTERM from another process stops the loop and the process exits normally",
          "[session][signal]") {
  const int status = run_in_child([](int fd) { return child_session(fd, 0); }, 1);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("a second SIGTERM takes the default action", "[session][signal]") {
  const int status = run_in_child([](int fd) { return child_session(fd, 10000); }, 2);
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGTERM);
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

// Run by the lock test in a child: a session on $TORCHGUARD_RUN_DIR until killed.
TEST_CASE("session lock child: hold a run directory until killed", "[.session_lock_child]") {
  const char* dir = std::getenv("TORCHGUARD_RUN_DIR");
  if (!dir) return;
  TrainingSessionOptions options;
  options.logger = std::make_shared<spdlog::logger>("child");
  options.log_file = fs::path(dir) / "train.log";
  options.metrics_file = fs::path(dir) / "metrics.jsonl";
  options.tensorboard_dir = dir;
  TrainingSession session("holder", options);
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
  TrainingSessionOptions options;
  options.logger = std::make_shared<spdlog::logger>("child");
  options.log_file = fs::path(dir) / "train.log";
  options.metrics_file = fs::path(dir) / "metrics.jsonl";
  options.tensorboard_dir = fs::path(dir) / "board";
  TrainingSession session("faulty", options);
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
