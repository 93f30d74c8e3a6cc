// TrainingSession: a named training run, logged with spdlog from start to end.
//
//   torchguard::TrainingSessionOptions options;
//   options.log_file = "train.log";
//   options.metrics_file = "metrics.jsonl";
//   options.handle_signals = true;
//   torchguard::TrainingSession session("experiment-001", options);
//   session.run([&] {
//     for (int step = 0; step < steps && !session.stop_requested(); ++step) {
//       ...
//       session.log_metrics(step, {{"loss", loss}});
//     }
//   });
//
// Start, end (success with the duration, a stop with its step and signal, or failure) and errors
// (type and message) are logged; nothing is swallowed. With `handle_signals`, SIGINT/SIGTERM
// only request a stop, which the loop reads with stop_requested(); a second signal terminates as
// usual. With `tensorboard_dir`, the metrics and the start, failure and end also go to a
// TensorBoard event file. Every log line and metrics row reaches its file as it is written; a
// file that cannot be written makes log_metrics() or close() throw (the run's status is then not
// success), never a silent gap.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "torchguard/core/cancellation.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/core/guard.hpp"
#include "torchguard/core/logging.hpp"
#include "torchguard/core/outcome.hpp"
#include "torchguard/detail/directory_lock.hpp"
#include "torchguard/detail/stop_signals.hpp"
#include "torchguard/session/log_file.hpp"
#include "torchguard/session/metrics_log.hpp"
#include "torchguard/session/session_board.hpp"

namespace torchguard {

struct TrainingSessionOptions {
  std::shared_ptr<spdlog::logger> logger;  // where lines go; default: torchguard::default_logger()
  std::filesystem::path log_file;          // also append every line here; flushed on warnings
  std::filesystem::path metrics_file;      // log_metrics() appends one JSON object per line here
  // (missing parent directories of either file are created)
  bool handle_signals = false;  // SIGINT/SIGTERM request a stop instead of killing
  // While the session is open, guards built without a logger log to the session's (its console
  // and log file): torchguard::default_logger() is the session's logger until close().
  bool share_logger = true;
  // log_metrics() writes every row to the metrics file, and a readable line to the log at most
  // this often (the first one always; zero: every call).
  std::chrono::milliseconds metrics_log_interval = std::chrono::seconds(10);
  // Also write a TensorBoard event file in this directory (`tensorboard --logdir` it): the
  // scalars of log_metrics with their steps, and the run's start, errors and end as text (tag
  // "session"). Each call's records reach the file before it returns.
  std::filesystem::path tensorboard_dir = {};
  // The directories of those files are locked for the session's life (<directory>/.lock, as
  // CheckpointGuard locks its own): a second run on them fails at once, before it opens, or
  // writes a line into, any of them.
  bool lock_directories = true;
};

class TrainingSession {
 public:
  using Options = TrainingSessionOptions;

  explicit TrainingSession(std::string name, std::shared_ptr<spdlog::logger> logger = nullptr)
      : TrainingSession(std::move(name), with_logger(std::move(logger))) {}

  TrainingSession(std::string name, Options options)
      : state_(std::make_unique<State>(std::move(name))) {
    // The locks first, then the files: a second run on the directory fails before it opens (or
    // writes into) any of them, and a file that cannot be opened fails the constructor before it
    // changes anything in the process (default logger, signal handlers).
    if (options.lock_directories) lock_directories(options);
    state_->logger = make_logger(options, state_->log_sink);
    const std::string started =
        fmt::format("Training session '{}' started{}", state_->name,
                    options.handle_signals ? " (SIGINT/SIGTERM request a stop)" : "");
    if (!options.metrics_file.empty()) state_->metrics.emplace(options.metrics_file);
    if (!options.tensorboard_dir.empty()) state_->board.emplace(options.tensorboard_dir, started);
    state_->metrics_log_interval = options.metrics_log_interval;
    if (options.share_logger) {
      state_->previous_default_logger = torchguard::default_logger();
      torchguard::set_default_logger(state_->logger);
    }
    if (options.handle_signals) {
      state_->signals.emplace();
      state_->stop.link(&detail::stop_signal_received);
      if (const auto ignored = state_->signals->left_ignored(); !ignored.empty()) {
        logger()->info(
            "Training session '{}': {} ignored by this process (nohup, a background "
            "job): left ignored",
            state_->name, ignored);
      }
    }
    logger()->info("{}", started);
    if (state_->board) {
      logger()->info("Training session '{}': TensorBoard events in '{}'", state_->name,
                     state_->board->path().string());
    }
  }

  TrainingSession(TrainingSession&&) noexcept = default;
  TrainingSession& operator=(TrainingSession&& other) noexcept {
    if (this != &other) {
      close_noexcept(Outcome::success);
      state_ = std::move(other.state_);
    }
    return *this;
  }

  // Logs the end: success with the duration, or failure when an exception unwinds the scope.
  ~TrainingSession() {
    close_noexcept(state_ ? state_->exit_detector.outcome() : Outcome::success);
  }

  // Runs `fn` inside the session. An exception is logged with its type and message, marks the
  // session failed, and is rethrown unchanged.
  template <class F>
  decltype(auto) run(F&& fn) {
    try {
      return std::invoke(std::forward<F>(fn));
    } catch (const Cancelled&) {
      if (!state_->stop.cancelled()) record_failure(std::current_exception());
      throw;  // a stop that interrupted loading or inference: the session ends as stopped
    } catch (...) {
      record_failure(std::current_exception());
      throw;
    }
  }

  // Logs the end of the session now and closes its files (idempotent): "completed
  // successfully", "stopped at step N by SIGINT" (a stop requested, by a signal or
  // request_stop()), or "failed". Throws FileError when a file could not be written, synced or
  // closed. ScopeStack calls this with the scope's outcome.
  void close(Outcome outcome) {
    if (!state_ || state_->closed) return;
    State& s = *state_;
    s.closed = true;
    const std::string duration = format_duration(elapsed());
    const std::int64_t step = s.step.load();
    const std::string at_step = step >= 0 ? fmt::format(" at step {}", step) : std::string();
    const int signal_number = s.signals ? detail::StopSignalScope::received() : 0;
    std::string end;
    if (s.failure || (outcome == Outcome::failure && !s.stop.cancelled())) {
      end = fmt::format("Training session '{}' failed{} after {}{}", s.name, at_step, duration,
                        s.failure ? "" : " (left by an exception)");
      s.logger->error("{}", end);
    } else if (s.stop.cancelled()) {
      end = fmt::format("Training session '{}' stopped{} by {} after {}", s.name, at_step,
                        signal_number ? detail::signal_name(signal_number) : "a stop request",
                        duration);
      s.logger->warn("{}", end);
    } else {
      end = fmt::format("Training session '{}' completed successfully in {}", s.name, duration);
      s.logger->info("{}", end);
    }
    std::optional<FileError> error;
    auto keep = [&](auto&& fn) {
      try {
        fn();
      } catch (const FileError& e) {
        if (!error) error = e;
      }
    };
    {
      std::lock_guard<std::mutex> lock(s.metrics_mutex);
      // The failure's line again: the web server shows only this text at the last step.
      if (!s.failure_line.empty()) end = s.failure_line + "  \n" + end;
      if (s.board) {
        keep([&] { s.board->text(end); });
        keep([&] { s.board->close(); });
      }
      if (s.metrics) keep([&] { s.metrics->close(); });
    }
    s.signals.reset();  // the previous SIGINT/SIGTERM handlers come back here
    if (s.previous_default_logger && torchguard::default_logger() == s.logger) {
      torchguard::set_default_logger(std::move(s.previous_default_logger));
    }
    s.logger->flush();
    if (s.log_sink) keep([&] { s.log_sink->close(); });
    if (error) {
      s.logger->error("Training session '{}': {}", s.name, error->what());
      throw *error;
    }
  }

  // The step the run has reached (log_metrics() sets it too): the end line names it.
  void set_step(std::int64_t step) noexcept { state_->step.store(step); }

  // Logs a failure seen by the caller (the type and message of `error`).
  void record_failure(const std::exception_ptr& error) {
    State& s = *state_;
    s.failure = true;
    const std::string line = fmt::format("Training session '{}': {}", s.name, describe(error));
    s.logger->error("{}", line);
    s.logger->flush();
    std::lock_guard<std::mutex> lock(s.metrics_mutex);
    board_noexcept([&](detail::SessionBoard& board) { board.text(line); });
    s.failure_line = line;
  }

  // True once a stop was requested: by request_stop(), or by SIGINT/SIGTERM with handle_signals.
  bool stop_requested() const {
    const State& s = *state_;
    if (!s.stop.cancelled()) return false;
    const int signal_number = s.signals ? detail::StopSignalScope::received() : 0;
    if (signal_number != 0 && !s.signal_reported.exchange(true)) {
      s.logger->warn("Training session '{}': {} received, stopping (send it again to terminate)",
                     s.name, detail::signal_name(signal_number));
    }
    return true;
  }

  // The stop request as a token for the rest of the library (CheckpointOptions::stop_token,
  // GatherOptions/PrefetchOptions/BatchedInferenceOptions::cancellation): a Ctrl-C stops
  // loading and inference as well as training. Valid after the session is gone.
  CancellationToken stop_token() const { return state_->stop.token(); }

  // Asks the loop to stop at its next check, as a signal would. Thread-safe.
  void request_stop() noexcept { state_->stop.cancel(); }

  // Appends {"step": step, "elapsed_s": ..., name: value...} to the metrics file (when set) and
  // writes a readable line to the log (at most every metrics_log_interval). Non-finite values
  // are written as null in the file.
  void log_metrics(std::int64_t step, const Metrics& metrics) {
    State& s = *state_;
    std::lock_guard<std::mutex> lock(s.metrics_mutex);
    s.step.store(std::max(s.step.load(), step));
    const auto now = Clock::now();
    if (!s.metrics_logged || now - s.last_metrics_line >= s.metrics_log_interval) {
      s.metrics_logged = true;
      s.last_metrics_line = now;
      std::string line = fmt::format("step {}", step);
      for (const auto& [metric_name, value] : metrics) {
        line += fmt::format(" | {}={}", metric_name, value.text());
      }
      s.logger->info("{}", line);
    }
    if (s.board) s.board->scalars(step, metrics);
    if (!s.metrics) return;
    nlohmann::ordered_json record;
    record["step"] = step;
    record["elapsed_s"] = std::chrono::duration<double>(elapsed()).count();
    for (const auto& [metric_name, value] : metrics) record[metric_name] = value;
    s.metrics->append(record);
  }

  // A run that resumed from a checkpoint of `step` calls this: the metrics file keeps only the
  // rows up to that step (the rows of the interrupted run past it would be logged twice), and
  // TensorBoard forgets the steps past it (a SessionLog START at step + 1).
  void resume_metrics(std::int64_t step) {
    State& s = *state_;
    std::lock_guard<std::mutex> lock(s.metrics_mutex);
    if (s.board) s.board->resume(step);
    if (!s.metrics) return;
    if (const auto dropped = s.metrics->cut_back_to(step)) {
      s.logger->info(
          "Training session '{}': resuming at step {}: {} metrics rows past it dropped "
          "from '{}'",
          s.name, step, dropped, s.metrics->path().string());
    }
  }

  // Makes the log, the metrics rows and the TensorBoard records durable (fsync where the file
  // allows it): for a checkpoint's after_save, so that the metrics on disk match it.
  void flush() {
    State& s = *state_;
    s.logger->flush();
    if (s.log_sink) s.log_sink->sync();
    std::lock_guard<std::mutex> lock(s.metrics_mutex);
    if (s.metrics) s.metrics->flush();
    if (s.board) s.board->flush();
  }

  const std::string& name() const noexcept { return state_->name; }
  const std::shared_ptr<spdlog::logger>& logger() const noexcept { return state_->logger; }
  std::chrono::nanoseconds elapsed() const { return Clock::now() - state_->start; }
  bool failed() const noexcept { return state_->failure; }

 private:
  using Clock = std::chrono::steady_clock;

  struct State {
    explicit State(std::string n) : name(std::move(n)), start(Clock::now()) {}
    std::string name;
    std::vector<detail::DirectoryLock> locks;  // first: held while the files below are open
    std::shared_ptr<detail::LogFileSink> log_sink;
    std::shared_ptr<spdlog::logger> logger;
    Clock::time_point start;
    detail::UncaughtExceptionDetector exit_detector;
    std::optional<detail::StopSignalScope> signals;
    CancellationSource stop;
    mutable std::atomic<bool> signal_reported{false};
    std::atomic<std::int64_t> step{-1};
    bool failure = false;
    bool closed = false;
    std::mutex metrics_mutex;
    std::optional<detail::MetricsLog> metrics;
    std::shared_ptr<spdlog::logger> previous_default_logger;  // set while the session shares
    std::chrono::milliseconds metrics_log_interval{0};
    bool metrics_logged = false;
    Clock::time_point last_metrics_line;
    std::optional<detail::SessionBoard> board;  // with tensorboard_dir; under metrics_mutex
    std::string failure_line;                   // record_failure()'s, repeated at the end
  };

  // Locks the directory of each file the session writes (created first when missing).
  void lock_directories(const Options& options) {
    std::vector<std::filesystem::path> directories;
    for (const auto& file : {options.log_file, options.metrics_file}) {
      if (!file.empty()) {
        directories.push_back(file.has_parent_path() ? file.parent_path()
                                                     : std::filesystem::path("."));
      }
    }
    if (!options.tensorboard_dir.empty()) directories.push_back(options.tensorboard_dir);
    for (const auto& directory : directories) {
      std::error_code ignored;  // a directory that cannot be made fails when its file opens
      std::filesystem::create_directories(directory, ignored);
      if (std::filesystem::is_directory(directory)) {
        state_->locks.emplace_back(directory, "TrainingSession: the run directory");
      }
    }
  }

  static Options with_logger(std::shared_ptr<spdlog::logger> logger) {
    Options options;
    options.logger = std::move(logger);
    return options;
  }

  // Runs `fn` on the TensorBoard file, logging a failure instead of throwing it: for the texts of
  // close() and of the failure path. Call with metrics_mutex held.
  template <class F>
  void board_noexcept(F&& fn) noexcept {
    State& s = *state_;
    if (!s.board) return;
    try {
      fn(*s.board);
    } catch (const std::exception& e) {
      s.logger->error("Training session '{}': {}", s.name, error_message(e));
    }
  }

  void close_noexcept(Outcome outcome) noexcept {
    try {
      close(outcome);
    } catch (...) {
      try {
        state_->logger->error("Training session: {}", describe(std::current_exception()));
      } catch (...) {
      }
    }
  }

  static std::shared_ptr<spdlog::logger> make_logger(const Options& options,
                                                     std::shared_ptr<detail::LogFileSink>& sink) {
    auto base = detail::or_default(options.logger);
    if (options.log_file.empty()) return base;
    // A logger of our own: the user's sinks plus the file, so that the user's logger is unchanged.
    std::vector<spdlog::sink_ptr> sinks = base->sinks();
    if (options.log_file.has_parent_path()) {
      std::error_code ignored;  // missing parent directories are created
      std::filesystem::create_directories(options.log_file.parent_path(), ignored);
    }
    sink = std::make_shared<detail::LogFileSink>(options.log_file);
    sinks.push_back(sink);
    auto logger = std::make_shared<spdlog::logger>(base->name(), sinks.begin(), sinks.end());
    logger->set_level(base->level());
    logger->flush_on(spdlog::level::warn);  // the user's sinks: errors reach them at once
    return logger;
  }

  std::unique_ptr<State> state_;
};

}  // namespace torchguard
