// One error vocabulary: every error torchguard throws itself derives from torchguard::Error, so
// `catch (const torchguard::Error&)` catches them all; each keeps its own type for finer handling.
// Messages are built with fmt::format and read "<Part>: <what failed>: <why>".
#pragma once

#include <cxxabi.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <typeinfo>

#include <spdlog/fmt/fmt.h>

namespace torchguard {

// The base of every error the library throws itself.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An option or argument that cannot work; the message names it and the rule it breaks.
class OptionsError : public Error {
 public:
  using Error::Error;
};

// An I/O error that names the operation, the file and the system's reason (errno).
class FileError : public Error {
 public:
  FileError(const std::string& operation, const std::filesystem::path& path, int error_number)
      : Error(fmt::format("{} '{}': {}", operation, path.string(), std::strerror(error_number))),
        error_number_(error_number) {}
  // A failure errno does not describe (a file that ended early): `reason` says it, and
  // `error_number` is the errno it stands for.
  FileError(const std::string& operation, const std::filesystem::path& path,
            const std::string& reason, int error_number)
      : Error(fmt::format("{} '{}': {}", operation, path.string(), reason)),
        error_number_(error_number) {}
  int error_number() const noexcept { return error_number_; }

 private:
  int error_number_;
};

// An error's message without the C++ backtrace that c10::Error appends: what a person reads.
inline std::string error_message(const std::exception& error) {
  std::string message(error.what() ? error.what() : "");
  const auto backtrace = message.find("\nException raised from ");
  if (backtrace != std::string::npos) message.erase(backtrace);
  return message;
}

namespace detail {

inline std::string demangle(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> name(
      abi::__cxa_demangle(mangled, nullptr, nullptr, &status), std::free);
  return status == 0 && name ? std::string(name.get()) : std::string(mangled);
}

}  // namespace detail

// "Type: message" for whatever was thrown (a std::exception, an int, a string).
inline std::string describe(const std::exception_ptr& error) {
  if (!error) return "no exception";
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return fmt::format("{}: {}", detail::demangle(typeid(e).name()), error_message(e));
  } catch (...) {
    const std::type_info* type = abi::__cxa_current_exception_type();
    return type
               ? fmt::format("{} (not derived from std::exception)", detail::demangle(type->name()))
               : std::string("unknown exception");
  }
}

}  // namespace torchguard
