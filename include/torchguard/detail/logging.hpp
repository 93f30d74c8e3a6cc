// The default logger, and the text used to describe errors and durations in log lines.
#pragma once

#include <cxxabi.h>

#include <chrono>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <typeinfo>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace torchguard {
namespace detail {

inline std::mutex& default_logger_mutex() {
  static std::mutex mutex;
  return mutex;
}

inline std::shared_ptr<spdlog::logger>& default_logger_slot() {
  // A logger registered as "torchguard" by the user wins; otherwise one that writes to stderr.
  static std::shared_ptr<spdlog::logger> logger = [] {
    if (auto existing = spdlog::get("torchguard")) return existing;
    return std::make_shared<spdlog::logger>(
        "torchguard", std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
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
  if (!logger) {
    logger = std::make_shared<spdlog::logger>(
        "torchguard", std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  }
  std::lock_guard<std::mutex> lock(detail::default_logger_mutex());
  detail::default_logger_slot() = std::move(logger);
}

namespace detail {

inline std::shared_ptr<spdlog::logger> or_default(std::shared_ptr<spdlog::logger> logger) {
  return logger ? std::move(logger) : default_logger();
}

inline std::string demangle(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> name(
      abi::__cxa_demangle(mangled, nullptr, nullptr, &status), std::free);
  return status == 0 && name ? std::string(name.get()) : std::string(mangled);
}

// c10::Error's what() appends a C++ backtrace; a log line wants the message only.
inline std::string first_part_of_message(const char* what) {
  std::string message(what ? what : "");
  const auto backtrace = message.find("\nException raised from ");
  if (backtrace != std::string::npos) message.erase(backtrace);
  return message;
}

// "Type: message" for an error, whatever was thrown (an int, a string, a std::exception).
inline std::string describe_exception(const std::exception_ptr& error) {
  if (!error) return "no exception";
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return demangle(typeid(e).name()) + ": " + first_part_of_message(e.what());
  } catch (...) {
    const std::type_info* type = abi::__cxa_current_exception_type();
    return type ? demangle(type->name()) + " (not derived from std::exception)"
                : std::string("unknown exception");
  }
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

}  // namespace detail
}  // namespace torchguard
