// What the benchmarks share: timing, medians, resident memory and CPU figures, a directory's
// bytes, and a Python child driven over pipes (the peer measured in the same run).
#pragma once

#include <fcntl.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <utility>
#include <vector>

extern char** environ;

namespace torchguard_bench {

inline double seconds_of(const std::function<void()>& fn) {
  const auto start = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

inline double median(std::vector<double> samples) {
  if (samples.empty()) return 0;
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

// The bytes of the regular files under `dir`.
inline std::uint64_t directory_bytes(const std::filesystem::path& dir) {
  std::uint64_t total = 0;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file()) total += entry.file_size();
  }
  return total;
}

// A resident-memory figure of /proc/self/status ("VmRSS:", "VmHWM:"), in bytes.
inline double status_bytes(const char* key) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(key, 0) == 0) return std::stod(line.substr(std::strlen(key))) * 1024.0;
  }
  return 0;
}

// VmHWM starts again from the resident memory now.
inline void reset_peak() { std::ofstream("/proc/self/clear_refs") << "5"; }

// The process's user + system CPU time, in seconds.
inline double cpu_seconds() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  auto seconds = [](const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec * 1e-6; };
  return seconds(usage.ru_utime) + seconds(usage.ru_stime);
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

// `python arguments...` started once and driven over pipes: a line out, a line back.
class PythonChild {
 public:
  PythonChild(const std::string& python, std::vector<std::string> arguments) {
    int to_child[2], from_child[2];
    if (::pipe2(to_child, O_CLOEXEC) != 0) return;
    if (::pipe2(from_child, O_CLOEXEC) != 0) {
      ::close(to_child[0]);
      ::close(to_child[1]);
      return;
    }
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, to_child[0], 0);
    posix_spawn_file_actions_adddup2(&actions, from_child[1], 1);
    arguments.insert(arguments.begin(), python);
    std::vector<char*> argv;
    for (auto& argument : arguments) argv.push_back(argument.data());
    argv.push_back(nullptr);
    const bool spawned =
        ::posix_spawn(&pid_, python.c_str(), &actions, nullptr, argv.data(), environ) == 0;
    posix_spawn_file_actions_destroy(&actions);
    ::close(to_child[0]);
    ::close(from_child[1]);
    to_ = ::fdopen(to_child[1], "w");
    from_ = ::fdopen(from_child[0], "r");
    if (!spawned) pid_ = -1;
  }
  ~PythonChild() {
    if (to_) std::fclose(to_);  // EOF: the script's loop ends
    if (from_) std::fclose(from_);
    if (pid_ > 0) ::waitpid(pid_, nullptr, 0);
  }
  PythonChild(const PythonChild&) = delete;
  PythonChild& operator=(const PythonChild&) = delete;

  // Sends `line`, returns the answer's line ("" once the child is gone).
  std::string request(const std::string& line) {
    if (!to_ || !from_) return {};
    std::fprintf(to_, "%s\n", line.c_str());
    std::fflush(to_);
    return answer();
  }
  // The next line the child prints, without its newline.
  std::string answer() {
    std::string line;
    char buffer[1 << 16];
    while (from_ && std::fgets(buffer, sizeof buffer, from_)) {
      line += buffer;
      if (!line.empty() && line.back() == '\n') {
        line.pop_back();
        break;
      }
    }
    return line;
  }

 private:
  pid_t pid_ = -1;
  FILE* to_ = nullptr;
  FILE* from_ = nullptr;
};

}  // namespace torchguard_bench
