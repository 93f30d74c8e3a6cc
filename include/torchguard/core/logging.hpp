// The default logger every guard uses when none is passed to it, and the duration text of log
// lines.
#pragma once

#include <chrono>
#include <memory>
#include <mutex>
#include <string>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "torchguard/core/error.hpp"

namespace torchguard {
namespace detail {

inline std::mutex& default_logger_mutex() {
  static std::mutex mutex;
  return mutex;
}

inline std::shared_ptr<spdlog::logger> stderr_logger() {
  return std::make_shared<spdlog::logger>("torchguard",
                                          std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
}

inline std::shared_ptr<spdlog::logger>& default_logger_slot() {
  // A logger registered as "torchguard" by the user wins; otherwise one that writes to stderr.
  static std::shared_ptr<spdlog::logger> logger = [] {
    if (auto existing = spdlog::get("torchguard")) return existing;
    return stderr_logger();
  }();
  return logger;
}

}  // namespace detail

// The logger every guard uses when none is passed to it.
inline std::shared_ptr<spdlog::logger> default_logger() {
  std::lock_guard<std::mutex> lock(detail::default_logger_mutex());
  return detail::default_logger_slot();
}

// Replaces the logger guards use when none is passed (null restores a stderr logger).
inline void set_default_logger(std::shared_ptr<spdlog::logger> logger) {
  if (!logger) logger = detail::stderr_logger();
  std::lock_guard<std::mutex> lock(detail::default_logger_mutex());
  detail::default_logger_slot() = std::move(logger);
}

// "2.35 s", "3 min 05 s", "1 h 02 min": what a person reads in a log line.
inline std::string format_duration(std::chrono::nanoseconds elapsed) {
  const double seconds = std::chrono::duration<double>(elapsed).count();
  if (seconds < 1.0) return fmt::format("{:.1f} ms", seconds * 1e3);
  if (seconds < 60.0) return fmt::format("{:.2f} s", seconds);
  const auto total = static_cast<long long>(seconds);
  if (total < 3600) return fmt::format("{} min {:02} s", total / 60, total % 60);
  return fmt::format("{} h {:02} min", total / 3600, (total % 3600) / 60);
}

namespace detail {

inline std::shared_ptr<spdlog::logger> or_default(std::shared_ptr<spdlog::logger> logger) {
  return logger ? std::move(logger) : default_logger();
}

}  // namespace detail
}  // namespace torchguard
