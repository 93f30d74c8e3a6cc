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
#include "torchguard/core/metrics.hpp"
#include "torchguard/core/outcome.hpp"
#include "torchguard/detail/directory_lock.hpp"
#include "torchguard/session/log_file.hpp"
#include "torchguard/session/metrics_log.hpp"
#include "torchguard/session/session_board.hpp"
#include "torchguard/session/stop_signals.hpp"

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

namespace detail {

// A TrainingSession's run: its files, logger, stop request and end.
struct TrainingSessionState {
  using Clock = std::chrono::steady_clock;
  static constexpr const char* close_error_prefix = "Training session";

  TrainingSessionState(std::string session_name, const TrainingSessionOptions& options)
      : name(std::move(session_name)), start(Clock::now()) {
    // The locks first, then the files: a second run on the directory fails before it opens (or
    // writes into) any of them, and a file that cannot be opened fails the constructor before it
    // changes anything in the process (default logger, signal handlers).
    if (options.lock_directories) lock_directories(options);
    logger = make_logger(options, log_sink);
    const std::string started =
        fmt::format("Training session '{}' started{}", name,
                    options.handle_signals ? " (SIGINT/SIGTERM request a stop)" : "");
    if (!options.metrics_file.empty()) metrics.emplace(options.metrics_file);
    if (!options.tensorboard_dir.empty()) board.emplace(options.tensorboard_dir, started);
    metrics_log_interval = options.metrics_log_interval;
    if (options.share_logger) {
      previous_default_logger = torchguard::default_logger();
      torchguard::set_default_logger(logger);
    }
    if (options.handle_signals) {
      signals.emplace();
      stop.link(&stop_signal_received);
      if (const auto ignored = signals->left_ignored(); !ignored.empty()) {
        logger->info(
            "Training session '{}': {} ignored by this process (nohup, a background "
            "job): left ignored",
            name, ignored);
      }
    }
    logger->info("{}", started);
    if (board) {
      logger->info("Training session '{}': TensorBoard events in '{}'", name,
                   board->path().string());
    }
  }

  // See TrainingSession::close.
  void close(Outcome outcome) {
    if (closed) return;
    closed = true;
    const std::string duration = format_duration(Clock::now() - start);
    const std::int64_t at = step.load();
    const std::string at_step = at >= 0 ? fmt::format(" at step {}", at) : std::string();
    const int signal_number = signals ? StopSignalScope::received() : 0;
    std::string end;
    if (failure || (outcome == Outcome::failure && !stop.cancelled())) {
      end = fmt::format("Training session '{}' failed{} after {}{}", name, at_step, duration,
                        failure ? "" : " (left by an exception)");
      logger->error("{}", end);
    } else if (stop.cancelled()) {
      end = fmt::format("Training session '{}' stopped{} by {} after {}", name, at_step,
                        signal_number ? signal_name(signal_number) : "a stop request", duration);
      logger->warn("{}", end);
    } else {
      end = fmt::format("Training session '{}' completed successfully in {}", name, duration);
      logger->info("{}", end);
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
      std::lock_guard<std::mutex> lock(metrics_mutex);
      // The failure's line again: the web server shows only this text at the last step.
      if (!failure_line.empty()) end = failure_line + "  \n" + end;
      if (board) {
        keep([&] { board->text(end); });
        keep([&] { board->close(); });
      }
      if (metrics) keep([&] { metrics->close(); });
    }
    signals.reset();  // the previous SIGINT/SIGTERM handlers come back here
    if (previous_default_logger && torchguard::default_logger() == logger) {
      torchguard::set_default_logger(std::move(previous_default_logger));
    }
    logger->flush();
    if (log_sink) keep([&] { log_sink->close(); });
    if (error) {
      logger->error("Training session '{}': {}", name, error->what());
      throw *error;
    }
  }

  // Runs `fn` on the TensorBoard file, logging a failure instead of throwing it: for the texts of
  // close() and of the failure path. Call with metrics_mutex held.
  template <class F>
  void board_noexcept(F&& fn) noexcept {
    if (!board) return;
    try {
      fn(*board);
    } catch (const std::exception& e) {
      logger->error("Training session '{}': {}", name, error_message(e));
    }
  }

  std::string name;
  std::vector<DirectoryLock> locks;  // first: held while the files below are open
  std::shared_ptr<LogFileSink> log_sink;
  std::shared_ptr<spdlog::logger> logger;
  Clock::time_point start;
  std::optional<StopSignalScope> signals;
  CancellationSource stop;
  mutable std::atomic<bool> signal_reported{false};
  std::atomic<std::int64_t> step{-1};
  bool failure = false;
  bool closed = false;
  std::mutex metrics_mutex;
  std::optional<MetricsLog> metrics;
  std::shared_ptr<spdlog::logger> previous_default_logger;  // set while the session shares
  std::chrono::milliseconds metrics_log_interval{0};
  bool metrics_logged = false;
  Clock::time_point last_metrics_line;
  std::optional<SessionBoard> board;  // with tensorboard_dir; under metrics_mutex
  std::string failure_line;           // record_failure()'s, repeated at the end

 private:
  // Locks the directory of each file the session writes (created first when missing).
  void lock_directories(const TrainingSessionOptions& options) {
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
        locks.emplace_back(directory, "TrainingSession: the run directory");
      }
    }
  }

  static std::shared_ptr<spdlog::logger> make_logger(const TrainingSessionOptions& options,
                                                     std::shared_ptr<LogFileSink>& sink) {
    auto base = or_default(options.logger);
    if (options.log_file.empty()) return base;
    // A logger of our own: the user's sinks plus the file, so that the user's logger is unchanged.
    std::vector<spdlog::sink_ptr> sinks = base->sinks();
    if (options.log_file.has_parent_path()) {
      std::error_code ignored;  // missing parent directories are created
      std::filesystem::create_directories(options.log_file.parent_path(), ignored);
    }
    sink = std::make_shared<LogFileSink>(options.log_file);
    sinks.push_back(sink);
    auto made = std::make_shared<spdlog::logger>(base->name(), sinks.begin(), sinks.end());
    made->set_level(base->level());
    made->flush_on(spdlog::level::warn);  // the user's sinks: errors reach them at once
    return made;
  }
};

}  // namespace detail

class TrainingSession {
 public:
  using Options = TrainingSessionOptions;

  explicit TrainingSession(std::string name, std::shared_ptr<spdlog::logger> logger = nullptr)
      : TrainingSession(std::move(name), with_logger(std::move(logger))) {}

  TrainingSession(std::string name, Options options)
      : s_(std::in_place, std::move(name), options) {}

  // The destructor (and a move assignment, for the session it held) logs the end: success with
  // the duration, or failure when an exception unwinds the scope.
  TrainingSession(TrainingSession&&) noexcept = default;
  TrainingSession& operator=(TrainingSession&&) noexcept = default;

  // Runs `fn` inside the session. An exception is logged with its type and message, marks the
  // session failed, and is rethrown unchanged.
  template <class F>
  decltype(auto) run(F&& fn) {
    try {
      return std::invoke(std::forward<F>(fn));
    } catch (const Cancelled&) {
      if (!s_->stop.cancelled()) record_failure(std::current_exception());
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
  void close(Outcome outcome) { s_.close(outcome); }

  // The step the run has reached (log_metrics() sets it too): the end line names it.
  void set_step(std::int64_t step) noexcept { s_->step.store(step); }

  // Logs a failure seen by the caller (the type and message of `error`).
  void record_failure(const std::exception_ptr& error) {
    auto& s = *s_;
    s.failure = true;
    const std::string line = fmt::format("Training session '{}': {}", s.name, describe(error));
    s.logger->error("{}", line);
    s.logger->flush();
    std::lock_guard<std::mutex> lock(s.metrics_mutex);
    s.board_noexcept([&](detail::SessionBoard& board) { board.text(line); });
    s.failure_line = line;
  }

  // True once a stop was requested: by request_stop(), or by SIGINT/SIGTERM with handle_signals.
  bool stop_requested() const {
    const auto& s = *s_;
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
  CancellationToken stop_token() const { return s_->stop.token(); }

  // Asks the loop to stop at its next check, as a signal would. Thread-safe.
  void request_stop() noexcept { s_->stop.cancel(); }

  // Appends {"step": step, "elapsed_s": ..., name: value...} to the metrics file (when set) and
  // writes a readable line to the log (at most every metrics_log_interval). Non-finite values
  // are written as null in the file.
  void log_metrics(std::int64_t step, const Metrics& metrics) {
    auto& s = *s_;
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
    auto& s = *s_;
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
    auto& s = *s_;
    s.logger->flush();
    if (s.log_sink) s.log_sink->sync();
    std::lock_guard<std::mutex> lock(s.metrics_mutex);
    if (s.metrics) s.metrics->flush();
    if (s.board) s.board->flush();
  }

  const std::string& name() const noexcept { return s_->name; }
  const std::shared_ptr<spdlog::logger>& logger() const noexcept { return s_->logger; }
  std::chrono::nanoseconds elapsed() const { return Clock::now() - s_->start; }
  bool failed() const noexcept { return s_->failure; }

 private:
  using Clock = detail::TrainingSessionState::Clock;

  static Options with_logger(std::shared_ptr<spdlog::logger> logger) {
    Options options;
    options.logger = std::move(logger);
    return options;
  }

  detail::GuardState<detail::TrainingSessionState> s_;
};

}  // namespace torchguard
