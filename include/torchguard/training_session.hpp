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
// reads with stop_requested(); a second signal terminates as usual.
#pragma once

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

#include "torchguard/detail/logging.hpp"
#include "torchguard/detail/outcome.hpp"
#include "torchguard/detail/stop_signals.hpp"

namespace torchguard {

struct TrainingSessionOptions {
  std::shared_ptr<spdlog::logger> logger;  // where lines go; default: torchguard::default_logger()
  std::filesystem::path log_file;          // also append every line here; flushed on warnings
  std::filesystem::path metrics_file;      // log_metrics() appends one JSON object per line here
  // (missing parent directories of either file are created)
  bool handle_signals = false;  // SIGINT/SIGTERM request a stop instead of killing
};

class TrainingSession {
 public:
  explicit TrainingSession(std::string name, std::shared_ptr<spdlog::logger> logger = nullptr)
      : TrainingSession(std::move(name), TrainingSessionOptions{std::move(logger), {}, {}, false}) {
  }

  TrainingSession(std::string name, TrainingSessionOptions options)
      : name_(std::move(name)), logger_(make_logger(options)), start_(Clock::now()) {
    if (!options.metrics_file.empty()) open_metrics(options.metrics_file);
    if (options.handle_signals) signals_.emplace();
    logger_->info("Training session '{}' started{}", name_,
                  options.handle_signals ? " (SIGINT/SIGTERM request a stop)" : "");
  }

  TrainingSession(const TrainingSession&) = delete;
  TrainingSession& operator=(const TrainingSession&) = delete;

  // Logs the end: success with the duration, or failure when an exception unwinds the scope.
  ~TrainingSession() {
    if (closed_) return;
    try {
      close(exit_detector_.outcome());
    } catch (...) {
    }
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
    if (closed_) return;
    closed_ = true;
    if (failure_) outcome = Outcome::failure;
    const std::string duration = detail::format_duration(elapsed());
    if (const int signal_number = detail::StopSignalScope::received(); signals_ && signal_number) {
      logger_->warn("Training session '{}' stopped by {} after {}", name_,
                    detail::signal_name(signal_number), duration);
    }
    if (outcome == Outcome::success) {
      logger_->info("Training session '{}' completed successfully in {}", name_, duration);
    } else {
      logger_->error("Training session '{}' failed after {}{}", name_, duration,
                     failure_ ? "" : " (left by an exception)");
    }
    signals_.reset();  // the previous SIGINT/SIGTERM handlers come back here
    logger_->flush();
  }

  // Logs a failure seen by the caller (the type and message of `error`).
  void record_failure(const std::exception_ptr& error) {
    failure_ = true;
    logger_->error("Training session '{}': {}", name_, detail::describe_exception(error));
    logger_->flush();
  }

  // True once a stop was requested: by request_stop(), or by SIGINT/SIGTERM with handle_signals.
  bool stop_requested() const {
    if (stop_requested_.load()) return true;
    const int signal_number = signals_ ? detail::StopSignalScope::received() : 0;
    if (signal_number == 0) return false;
    if (!signal_reported_.exchange(true)) {
      logger_->warn("Training session '{}': {} received, stopping (send it again to terminate)",
                    name_, detail::signal_name(signal_number));
    }
    return true;
  }

  // Asks the loop to stop at its next check, as a signal would. Thread-safe.
  void request_stop() noexcept { stop_requested_.store(true); }

  // Appends {"step": step, "elapsed_s": ..., name: value...} to the metrics file (when set) and
  // writes a readable line to the log. Non-finite values are written as null in the file.
  void log_metrics(std::int64_t step, const Metrics& metrics) {
    std::string line = fmt::format("step {}", step);
    for (const auto& [metric_name, value] : metrics) {
      line += fmt::format(" | {}={:.6g}", metric_name, value);
    }
    logger_->info("{}", line);
    std::lock_guard<std::mutex> lock(metrics_mutex_);
    if (!metrics_stream_.is_open()) return;
    nlohmann::ordered_json record;
    record["step"] = step;
    record["elapsed_s"] = std::chrono::duration<double>(elapsed()).count();
    for (const auto& [metric_name, value] : metrics) {
      if (std::isfinite(value)) {
        record[metric_name] = value;
      } else {
        record[metric_name] = nullptr;
      }
    }
    metrics_stream_ << record.dump() << '\n';
    metrics_stream_.flush();
    if (!metrics_stream_) {
      throw std::runtime_error(fmt::format("TrainingSession '{}': cannot write metrics to '{}'",
                                           name_, metrics_path_.string()));
    }
  }

  const std::string& name() const noexcept { return name_; }
  const std::shared_ptr<spdlog::logger>& logger() const noexcept { return logger_; }
  std::chrono::nanoseconds elapsed() const { return Clock::now() - start_; }
  bool failed() const noexcept { return failure_; }

 private:
  using Clock = std::chrono::steady_clock;

  static std::shared_ptr<spdlog::logger> make_logger(const TrainingSessionOptions& options) {
    auto base = detail::or_default(options.logger);
    if (options.log_file.empty()) return base;
    // A logger of our own: the user's sinks plus the file, so that the user's logger is unchanged.
    std::vector<spdlog::sink_ptr> sinks = base->sinks();
    try {
      sinks.push_back(
          std::make_shared<spdlog::sinks::basic_file_sink_mt>(options.log_file.string(), false));
    } catch (const spdlog::spdlog_ex& e) {
      throw std::runtime_error(fmt::format("TrainingSession: cannot open the log file '{}': {}",
                                           options.log_file.string(), e.what()));
    }
    auto logger = std::make_shared<spdlog::logger>(base->name(), sinks.begin(), sinks.end());
    logger->set_level(base->level());
    logger->flush_on(spdlog::level::warn);  // errors reach the disk before a crash can lose them
    return logger;
  }

  void open_metrics(const std::filesystem::path& path) {
    metrics_path_ = path;
    std::error_code ignored;  // like the log file, missing parent directories are created
    if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path(), ignored);
    metrics_stream_.open(path, std::ios::out | std::ios::app);
    if (!metrics_stream_) {
      throw std::runtime_error(fmt::format("TrainingSession: cannot open the metrics file '{}': {}",
                                           path.string(), std::strerror(errno)));
    }
  }

  std::string name_;
  std::shared_ptr<spdlog::logger> logger_;
  Clock::time_point start_;
  detail::UncaughtExceptionDetector exit_detector_;
  std::optional<detail::StopSignalScope> signals_;
  std::atomic<bool> stop_requested_{false};
  mutable std::atomic<bool> signal_reported_{false};
  bool failure_ = false;
  bool closed_ = false;
  std::mutex metrics_mutex_;
  std::filesystem::path metrics_path_;
  std::ofstream metrics_stream_;
};

}  // namespace torchguard
