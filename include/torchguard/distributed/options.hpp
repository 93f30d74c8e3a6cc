// ProcessGroupGuard's options, its error, and how it reads torchrun's variables.
#pragma once

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include "torchguard/core/error.hpp"

namespace torchguard {

// A process group could not be formed or a collective failed: a variable, the master, a rank.
class DistributedError : public Error {
 public:
  using Error::Error;
};

enum class DistributedBackend { automatic, gloo, nccl };  // automatic: NCCL with a GPU

struct ProcessGroupOptions {
  // Unset: read from torchrun's variables RANK, WORLD_SIZE, LOCAL_RANK (default: RANK).
  std::optional<int> rank;
  std::optional<int> world_size;
  std::optional<int> local_rank;
  std::string master_addr;         // empty: MASTER_ADDR (default 127.0.0.1 when WORLD_SIZE is 1)
  std::optional<int> master_port;  // unset: MASTER_PORT (default 29500)
  std::string file_store;          // a path: rendezvous through a FileStore, not TCP
  DistributedBackend backend = DistributedBackend::automatic;
  // How long to wait for the master, for the other ranks, and for any collective.
  std::chrono::milliseconds timeout = std::chrono::seconds(60);
  bool select_cuda_device = true;  // LOCAL_RANK selects the CUDA device (NCCL)
  std::shared_ptr<spdlog::logger> logger;
};

namespace detail {

#if TORCH_VERSION_MAJOR >= 2
using ProcessGroupBase = c10d::Backend;  // 2.x: Gloo and NCCL are backends of a ProcessGroup
#else
using ProcessGroupBase = c10d::ProcessGroup;
#endif

// An integer variable: the option when given, else the environment, else the fallback.
inline int int_setting(const std::optional<int>& option, const char* variable,
                       std::optional<int> fallback) {
  if (option) return *option;
  const char* text = std::getenv(variable);
  if (!text || !*text) {
    if (fallback) return *fallback;
    throw DistributedError(fmt::format(
        "ProcessGroupGuard: {} is not set (start the program with torchrun or scripts/launch.sh, "
        "or set it in ProcessGroupOptions)",
        variable));
  }
  char* end = nullptr;
  errno = 0;
  const long value = std::strtol(text, &end, 10);
  if (*end != '\0' || errno != 0 || value < INT_MIN || value > INT_MAX) {
    throw DistributedError(
        fmt::format("ProcessGroupGuard: {}='{}' is not an integer", variable, text));
  }
  return static_cast<int>(value);
}

}  // namespace detail

}  // namespace torchguard
