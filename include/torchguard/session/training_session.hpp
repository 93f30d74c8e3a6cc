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
// Start, end (success with the duration, or failure) and errors (type and message) are logged;
// nothing is swallowed. With `handle_signals`, SIGINT/SIGTERM only request a stop, which the loop
// reads with stop_requested(); a second signal terminates as usual. With `tensorboard_dir`, the
// metrics and the start, failure and end also go to a TensorBoard event file.
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

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "torchguard/core/cancellation.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/core/guard.hpp"
#include "torchguard/core/logging.hpp"
#include "torchguard/core/outcome.hpp"
#include "torchguard/detail/stop_signals.hpp"
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
};

class TrainingSession {
 public:
  using Options = TrainingSessionOptions;

  explicit TrainingSession(std::string name, std::shared_ptr<spdlog::logger> logger = nullptr)
      : TrainingSession(std::move(name), with_logger(std::move(logger))) {}

  TrainingSession(std::string name, Options options)
      : state_(std::make_unique<State>(std::move(name), make_logger(options))) {
    const std::string started =
        fmt::format("Training session '{}' started{}", state_->name,
                    options.handle_signals ? " (SIGINT/SIGTERM request a stop)" : "");
    // The files first: one that cannot be opened fails the constructor before it changes
    // anything in the process (default logger, signal handlers).
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
    } catch (...) {
      record_failure(std::current_exception());
      throw;
    }
  }

  // Logs the end of the session now (idempotent). ScopeStack calls this with the scope's outcome.
  void close(Outcome outcome) {
    if (!state_ || state_->closed) return;
    State& s = *state_;
    s.closed = true;
    if (s.failure) outcome = Outcome::failure;
    const std::string duration = format_duration(elapsed());
    std::string stopped;
    if (const int signal_number = detail::StopSignalScope::received(); s.signals && signal_number) {
      stopped = fmt::format("Training session '{}' stopped by {} after {}", s.name,
                            detail::signal_name(signal_number), duration);
      s.logger->warn("{}", stopped);
    }
    std::string end;
    if (outcome == Outcome::success) {
      end = fmt::format("Training session '{}' completed successfully in {}", s.name, duration);
      s.logger->info("{}", end);
    } else {
      end = fmt::format("Training session '{}' failed after {}{}", s.name, duration,
                        s.failure ? "" : " (left by an exception)");
      s.logger->error("{}", end);
    }
    {
      std::lock_guard<std::mutex> lock(s.metrics_mutex);
      // The failure's line again: the web server shows only this text at the last step.
      for (const auto& line : {s.failure_line, stopped}) {
        if (!line.empty()) end = line + "  \n" + end;
      }
      board_noexcept([&](detail::SessionBoard& board) {
        board.text(end);
        board.flush();
      });
    }
    s.signals.reset();  // the previous SIGINT/SIGTERM handlers come back here
    if (s.previous_default_logger && torchguard::default_logger() == s.logger) {
      torchguard::set_default_logger(std::move(s.previous_default_logger));
    }
    s.logger->flush();
  }

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
    State(std::string n, std::shared_ptr<spdlog::logger> l)
        : name(std::move(n)), logger(std::move(l)), start(Clock::now()) {}
    std::string name;
    std::shared_ptr<spdlog::logger> logger;
    Clock::time_point start;
    detail::UncaughtExceptionDetector exit_detector;
    std::optional<detail::StopSignalScope> signals;
    CancellationSource stop;
    mutable std::atomic<bool> signal_reported{false};
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

  static std::shared_ptr<spdlog::logger> make_logger(const Options& options) {
    auto base = detail::or_default(options.logger);
    if (options.log_file.empty()) return base;
    // A logger of our own: the user's sinks plus the file, so that the user's logger is unchanged.
    std::vector<spdlog::sink_ptr> sinks = base->sinks();
    try {
      sinks.push_back(
          std::make_shared<spdlog::sinks::basic_file_sink_mt>(options.log_file.string(), false));
    } catch (const spdlog::spdlog_ex& e) {
      throw Error(fmt::format("TrainingSession: cannot open the log file '{}': {}",
                              options.log_file.string(), e.what()));
    }
    auto logger = std::make_shared<spdlog::logger>(base->name(), sinks.begin(), sinks.end());
    logger->set_level(base->level());
    logger->flush_on(spdlog::level::warn);  // errors reach the disk before a crash can lose them
    return logger;
  }

  std::unique_ptr<State> state_;
};

}  // namespace torchguard
