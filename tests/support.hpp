// What the tests share: Catch2 v2 or v3, and a sink that keeps log lines to assert on.
#pragma once

#include <string>

#if __has_include(<catch2/catch_test_macros.hpp>)
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
namespace torchguard::testing {
inline auto Contains(const std::string& text) { return Catch::Matchers::ContainsSubstring(text); }
}  // namespace torchguard::testing
#else
#include <catch2/catch.hpp>
namespace torchguard::testing {
inline auto Contains(const std::string& text) { return Catch::Matchers::Contains(text); }
}  // namespace torchguard::testing
#endif

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <torch/version.h>

namespace torchguard::testing {

struct LogLine {
  spdlog::level::level_enum level;
  std::string text;
};

// Keeps every message (without pattern decoration) with its level.
class CaptureSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  std::vector<LogLine> lines() {
    std::lock_guard<std::mutex> lock(mutex_);
    return lines_;
  }
  // True when some line at `level` contains `needle`.
  bool contains(spdlog::level::level_enum level, const std::string& needle) {
    auto all = lines();
    return std::any_of(all.begin(), all.end(), [&](const LogLine& line) {
      return line.level == level && line.text.find(needle) != std::string::npos;
    });
  }
  // The number of lines at `level` (containing `needle`).
  std::size_t count(spdlog::level::level_enum level, const std::string& needle = "") {
    auto all = lines();
    return static_cast<std::size_t>(std::count_if(all.begin(), all.end(), [&](const LogLine& line) {
      return line.level == level && line.text.find(needle) != std::string::npos;
    }));
  }
  std::string dump() {
    std::string out;
    for (const auto& line : lines()) {
      out +=
          std::string(spdlog::level::to_string_view(line.level).data()) + ": " + line.text + "\n";
    }
    return out;
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    lines_.push_back({msg.level, std::string(msg.payload.data(), msg.payload.size())});
  }
  void flush_() override { ++flushes; }

 public:
  int flushes = 0;

 private:
  std::vector<LogLine> lines_;
};

// A logger writing only to a new CaptureSink.
struct CapturedLogger {
  std::shared_ptr<CaptureSink> sink = std::make_shared<CaptureSink>();
  std::shared_ptr<spdlog::logger> logger = std::make_shared<spdlog::logger>("test", sink);
  CapturedLogger() { logger->set_level(spdlog::level::trace); }
};

// A fresh directory under the system's temporary directory, removed at scope exit.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "torchguard-test-XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    path = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::permissions(path, std::filesystem::perms::owner_all,
                                 std::filesystem::perm_options::add, ignored);
    std::filesystem::remove_all(path, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

inline std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream content;
  content << in.rdbuf();
  return content.str();
}

// The names of the entries in `dir`, sorted.
inline std::vector<std::string> names_in(const std::filesystem::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

// Starts this test program again, running only the (hidden) test `test_tag`, with `extra_env`
// ("NAME=value") added to our environment. Its stdout goes to `output` (empty: /dev/null), and
// `fd3`, when not -1, becomes its fd 3. Returns the child's pid.
inline pid_t spawn_test_child(const std::string& test_tag,
                              const std::vector<std::string>& extra_env,
                              const std::string& output = "", int fd3 = -1) {
  const std::string exe = std::filesystem::read_symlink("/proc/self/exe").string();
  // extra_env's variables replace ours of the same name (getenv finds the first one: under
  // AddressSanitizer, the ASAN_OPTIONS that scripts/test.sh sets would hide the child's own).
  std::vector<std::string> env_strings = extra_env;
  const auto named_in_extra = [&extra_env](const std::string& variable) {
    const std::string name = variable.substr(0, variable.find('=') + 1);
    return std::any_of(extra_env.begin(), extra_env.end(), [&name](const std::string& e) {
      return e.compare(0, name.size(), name) == 0;
    });
  };
  for (char** e = ::environ; *e; ++e) {
    if (!named_in_extra(*e)) env_strings.emplace_back(*e);
  }
  std::vector<char*> envp;
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (fd3 != -1) posix_spawn_file_actions_adddup2(&actions, fd3, 3);
  const std::string out = output.empty() ? "/dev/null" : output;
  posix_spawn_file_actions_addopen(&actions, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  std::string arg0 = exe, arg1 = test_tag;
  char* argv[] = {arg0.data(), arg1.data(), nullptr};
  pid_t pid = 0;
  const int error = ::posix_spawn(&pid, exe.c_str(), &actions, nullptr, argv, envp.data());
  posix_spawn_file_actions_destroy(&actions);
  REQUIRE(error == 0);
  return pid;
}

// What a child of run_with_faults() printed and how it ended.
struct ChildResult {
  std::string output;    // stdout and stderr
  int exit_status = -1;  // -1: killed by a signal
  int signal = 0;
};

// Runs the hidden test `test_tag` in a child under tests/io_faults.c, with `faults` as its
// TORCHGUARD_FAULTS and `extra_env` added, and waits for it. The shim prints "io_faults: ..."
// for every call it fails. Empty output and exit status -1 when the shim was not built.
inline ChildResult run_with_faults(const std::string& test_tag, const std::string& faults,
                                   std::vector<std::string> extra_env = {}) {
  ChildResult result;
#ifdef TORCHGUARD_IO_FAULTS
  const std::string output =
      (std::filesystem::temp_directory_path() / fmt::format("torchguard-faults-{}", ::getpid()))
          .string();
  extra_env.push_back("LD_PRELOAD=" TORCHGUARD_IO_FAULTS);
  extra_env.push_back("TORCHGUARD_FAULTS=" + faults);
  // Under AddressSanitizer the shim comes before its runtime: allowed here.
  extra_env.push_back("ASAN_OPTIONS=verify_asan_link_order=0:detect_leaks=0");
  const pid_t pid = spawn_test_child(test_tag, extra_env, output);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  result.output = read_text(output);
  std::filesystem::remove(output);
  if (WIFEXITED(status)) result.exit_status = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) result.signal = WTERMSIG(status);
#else
  (void)test_tag, (void)faults, (void)extra_env;
#endif
  return result;
}

// Detached copies on the host of `tensors` (a model's parameters): what a test compares later.
inline std::vector<torch::Tensor> host_copies(const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> copies;
  for (const auto& tensor : tensors) copies.push_back(tensor.detach().cpu().clone());
  return copies;
}

// True when both lists hold the same tensors, bit for bit, wherever each one lives.
inline bool bitwise_equal(const std::vector<torch::Tensor>& a,
                          const std::vector<torch::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!a[i].cpu().equal(b[i].cpu())) return false;
  }
  return true;
}

// The standard output of a shell command, and whether it exited with 0.
inline std::pair<std::string, bool> command_output(const std::string& command) {
  std::string output;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) return {output, false};
  char buffer[4096];
  while (const std::size_t n = std::fread(buffer, 1, sizeof buffer, pipe)) output.append(buffer, n);
  return {output, ::pclose(pipe) == 0};
}

// One of tests/script_support.sh's Python lookups (`function`, with `arguments`), where the venvs
// are found as the scripts find them: its answer, or "" after printing its SKIPPED line.
inline std::string python_from_scripts(const std::string& function, const std::string& arguments) {
  const auto [output, found] =
      command_output(fmt::format("bash -c 'source \"{}/script_support.sh\" && {} {}'",
                                 TORCHGUARD_TESTS_DIR, function, arguments));
  const std::string line = output.substr(0, output.find('\n'));
  if (!found) {
    std::cout << line << std::endl;
    return {};
  }
  return line;
}

// The Python of the interop tests (the other side of a border): $TORCHGUARD_PYTHON, or the venv
// of scripts/setup.sh --torch2, when it can `import` every one of `modules` (comma-separated);
// otherwise "" after printing the SKIPPED line.
inline std::string interop_python(const std::string& modules) {
  return python_from_scripts("interop_python", "\"" + modules + "\"");
}

// The Python whose torch is this build's LibTorch (the same major and minor version: the same
// kernels on both sides), that imports `modules`, with the repository's python/ package on its
// path: "env PYTHONPATH=... <python>", a command prefix. Debian's python3-torch for Debian's
// LibTorch (the venv scripts/setup.sh makes over it), the torch2 venv for the wheel's. Otherwise
// "" after printing the SKIPPED line.
inline std::string libtorch_python(const std::string& modules) {
  return python_from_scripts(
      "libtorch_python", fmt::format("{}.{}.{} \"{}\"", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR,
                                     TORCH_VERSION_PATCH, modules));
}

// Runs `fn` with the file size limit at `bytes` (SIGXFSZ ignored, so writes fail with EFBIG).
template <class F>
void with_file_size_limit(rlim_t bytes, F&& fn) {
  struct rlimit saved {};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &saved) == 0);
  struct sigaction ignore {
  }, previous{};
  ignore.sa_handler = SIG_IGN;
  ::sigaction(SIGXFSZ, &ignore, &previous);
  struct rlimit limited = saved;
  limited.rlim_cur = bytes;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &limited) == 0);
  try {
    fn();
  } catch (...) {
    ::setrlimit(RLIMIT_FSIZE, &saved);
    ::sigaction(SIGXFSZ, &previous, nullptr);
    throw;
  }
  ::setrlimit(RLIMIT_FSIZE, &saved);
  ::sigaction(SIGXFSZ, &previous, nullptr);
}

}  // namespace torchguard::testing
