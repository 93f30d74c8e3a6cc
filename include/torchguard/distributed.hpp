// ProcessGroupGuard: a torch.distributed (c10d) process group for a scope, from torchrun's
// environment: what `dist.init_process_group()` ... `dist.destroy_process_group()` is in Python.
//
//   torchguard::ProcessGroupGuard group;           // RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
//   group.broadcast_parameters(*model);            // every rank starts from rank 0's weights
//   for (...) {
//     loss.backward();
//     group.allreduce_gradients(*model);           // averaged over the ranks
//     optimizer.step();
//   }
//
// c10d is the engine: a TCPStore (or a FileStore) for the rendezvous, Gloo on the CPU, NCCL on
// CUDA. The guard adds what hand-written init/teardown leaves out: variables checked with errors
// that name them, a rendezvous that verifies every rank agrees on the world size and that no
// rank is claimed twice, timeouts on every wait (a dead rank is an error, not a hang), the CUDA
// device chosen from LOCAL_RANK, and an orderly teardown.
#pragma once

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "torchguard/detail/logging.hpp"
#include "torchguard/version.hpp"

#if TORCHGUARD_WITH_CUDA && defined(USE_C10D_NCCL)
#define TORCHGUARD_WITH_NCCL 1
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#else
#define TORCHGUARD_WITH_NCCL 0
#endif

namespace torchguard {

// A process group could not be formed or a collective failed: a variable, the master, a rank.
class DistributedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
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
    throw DistributedError(std::string("ProcessGroupGuard: ") + variable +
                           " is not set (start the program with torchrun or "
                           "scripts/launch.sh, or set it in ProcessGroupOptions)");
  }
  char* end = nullptr;
  errno = 0;
  const long value = std::strtol(text, &end, 10);
  if (*end != '\0' || errno != 0 || value < INT_MIN || value > INT_MAX) {
    throw DistributedError(std::string("ProcessGroupGuard: ") + variable + "='" + text +
                           "' is not an integer");
  }
  return static_cast<int>(value);
}

inline std::vector<std::uint8_t> to_bytes(const std::string& text) {
  return std::vector<std::uint8_t>(text.begin(), text.end());
}

inline std::string to_text(const std::vector<std::uint8_t>& bytes) {
  return std::string(bytes.begin(), bytes.end());
}

}  // namespace detail

class ProcessGroupGuard {
 public:
  explicit ProcessGroupGuard(ProcessGroupOptions options = {})
      : options_(std::move(options)), logger_(detail::or_default(options_.logger)) {
    world_size_ = detail::int_setting(options_.world_size, "WORLD_SIZE", std::nullopt);
    if (world_size_ < 1) {
      throw DistributedError("ProcessGroupGuard: WORLD_SIZE must be at least 1, not " +
                             std::to_string(world_size_));
    }
    rank_ = detail::int_setting(options_.rank, "RANK", std::nullopt);
    if (rank_ < 0 || rank_ >= world_size_) {
      throw DistributedError("ProcessGroupGuard: RANK " + std::to_string(rank_) +
                             " is out of range for WORLD_SIZE " + std::to_string(world_size_) +
                             " (0 to " + std::to_string(world_size_ - 1) + ")");
    }
    local_rank_ = detail::int_setting(options_.local_rank, "LOCAL_RANK", rank_);
    if (local_rank_ < 0) {
      throw DistributedError("ProcessGroupGuard: LOCAL_RANK must not be negative, not " +
                             std::to_string(local_rank_));
    }
    if (options_.timeout.count() <= 0) {
      throw DistributedError("ProcessGroupGuard: the timeout must be positive");
    }
    choose_backend();
    connect_store();
    rendezvous();
    create_group();
    logger_->info("ProcessGroupGuard: rank {} of {} (local rank {}), {} on {}", rank_, world_size_,
                  local_rank_, backend_name(), device_.str());
  }

  ProcessGroupGuard(const ProcessGroupGuard&) = delete;
  ProcessGroupGuard& operator=(const ProcessGroupGuard&) = delete;

  // Tears the group down; never throws (close() does).
  ~ProcessGroupGuard() {
    try {
      close();
    } catch (...) {
      logger_->error("ProcessGroupGuard: {}", detail::describe_exception(std::current_exception()));
    }
  }

  // Releases the process group, then the store. Idempotent. Ranks do not wait for each other
  // here: a rank that leaves early because of an error must not hang in teardown.
  void close() {
    if (closed_) return;
    closed_ = true;
#if TORCHGUARD_WITH_NCCL
    if (nccl_ && group_) static_cast<c10d::ProcessGroupNCCL&>(*group_).shutdown();
#endif
    group_.reset();
    store_.reset();
    logger_->debug("ProcessGroupGuard: rank {} left the group", rank_);
  }

  int rank() const noexcept { return rank_; }
  int world_size() const noexcept { return world_size_; }
  int local_rank() const noexcept { return local_rank_; }
  bool is_main() const noexcept { return rank_ == 0; }
  // Where this rank computes: cuda:LOCAL_RANK with NCCL, the CPU with Gloo.
  torch::Device device() const noexcept { return device_; }
  const char* backend_name() const noexcept { return nccl_ ? "nccl" : "gloo"; }
  // c10d's own objects, for collectives the guard does not wrap.
  const c10::intrusive_ptr<detail::ProcessGroupBase>& process_group() const { return group(); }
  const c10::intrusive_ptr<c10d::Store>& store() const { return store_; }

  // Waits until every rank gets here (at most the timeout).
  void barrier() {
    c10d::BarrierOptions barrier_options;
    barrier_options.timeout = options_.timeout;
    if (nccl_) barrier_options.device_ids = {device_.index()};
    wait(group()->barrier(barrier_options), "barrier");
  }

  // Sums `tensors` in place over the ranks.
  void allreduce(std::vector<torch::Tensor>& tensors, const char* what = "allreduce") {
    if (tensors.empty()) return;
    c10d::AllreduceOptions allreduce_options;
    allreduce_options.timeout = options_.timeout;
    wait(group()->allreduce(tensors, allreduce_options), what);
  }

  // Averages every gradient of `module` over the ranks (one flat buffer: one collective).
  void allreduce_gradients(torch::nn::Module& module) {
    std::vector<torch::Tensor> gradients;
    for (auto& parameter : module.parameters()) {
      if (parameter.requires_grad() && parameter.grad().defined()) {
        gradients.push_back(parameter.grad());
      }
    }
    if (gradients.empty() || world_size_ == 1) return;
    std::vector<torch::Tensor> flat{flatten(gradients)};
    allreduce(flat, "allreduce_gradients");
    flat[0].div_(world_size_);
    unflatten_into(flat[0], gradients);
  }

  // Copies rank `root`'s parameters and buffers to every rank.
  void broadcast_parameters(torch::nn::Module& module, int root = 0) {
    if (root < 0 || root >= world_size_) {
      throw std::invalid_argument("broadcast_parameters: root " + std::to_string(root) +
                                  " is not a rank of a group of " + std::to_string(world_size_));
    }
    std::vector<torch::Tensor> tensors;
    for (auto& parameter : module.parameters()) tensors.push_back(parameter);
    for (auto& buffer : module.buffers()) tensors.push_back(buffer);
    if (tensors.empty() || world_size_ == 1) return;
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> flat{flatten(tensors)};
    c10d::BroadcastOptions broadcast_options;
    broadcast_options.rootRank = root;
    broadcast_options.timeout = options_.timeout;
    wait(group()->broadcast(flat, broadcast_options), "broadcast_parameters");
    unflatten_into(flat[0], tensors);
  }

  // Throws unless every rank passes the same value (a restored step, a config hash).
  void check_same(std::int64_t value, const std::string& what) {
    // The largest of (value, -value) over the ranks gives the largest and the smallest value.
    const auto extremes = max_over_ranks({value, -value}, "check_same");
    if (extremes[0] != -extremes[1]) {
      throw DistributedError("ProcessGroupGuard: the ranks disagree on " + what + ": from " +
                             std::to_string(-extremes[1]) + " to " + std::to_string(extremes[0]) +
                             " (rank " + std::to_string(rank_) + " has " + std::to_string(value) +
                             ")");
    }
  }

  // True on every rank when `flag` is true on some rank. Ranks see a signal at different steps;
  // stopping on any() stops them all at the same step.
  bool any(bool flag) { return max_over_ranks({flag ? 1 : 0}, "any")[0] != 0; }

  // Sets up checkpoint options (CheckpointOptions, or anything with `is_writer` and
  // `after_save`) for this group: rank 0 writes, every rank waits at a barrier after each save.
  template <class CheckpointOptionsT>
  void configure_checkpoints(CheckpointOptionsT& checkpoint_options) {
    checkpoint_options.is_writer = [this] { return is_main(); };
    checkpoint_options.after_save = [this] { barrier(); };
  }

 private:
  const c10::intrusive_ptr<detail::ProcessGroupBase>& group() const {
    if (!group_) throw DistributedError("ProcessGroupGuard: the group is closed");
    return group_;
  }

  std::vector<std::int64_t> max_over_ranks(const std::vector<std::int64_t>& values,
                                           const char* what) {
    if (world_size_ == 1) return values;
    std::vector<torch::Tensor> tensors{
        torch::tensor(values, torch::TensorOptions().dtype(torch::kInt64)).to(device_)};
    c10d::AllreduceOptions allreduce_options;
    allreduce_options.reduceOp = c10d::ReduceOp::MAX;
    allreduce_options.timeout = options_.timeout;
    wait(group()->allreduce(tensors, allreduce_options), what);
    const auto result = tensors[0].to(torch::kCPU);
    return std::vector<std::int64_t>(result.data_ptr<std::int64_t>(),
                                     result.data_ptr<std::int64_t>() + result.numel());
  }

  // One collective over a flat buffer instead of one per tensor.
  static torch::Tensor flatten(const std::vector<torch::Tensor>& tensors) {
    std::vector<torch::Tensor> flat;
    flat.reserve(tensors.size());
    for (const auto& tensor : tensors) flat.push_back(tensor.detach().reshape(-1));
    return torch::cat(flat);
  }

  static void unflatten_into(const torch::Tensor& flat, std::vector<torch::Tensor>& tensors) {
    std::int64_t offset = 0;
    for (auto& tensor : tensors) {
      const auto count = tensor.numel();
      tensor.copy_(flat.slice(0, offset, offset + count).view_as(tensor));
      offset += count;
    }
  }

  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what) {
    try {
      work->wait(options_.timeout);
    } catch (const std::exception& e) {
      throw DistributedError("ProcessGroupGuard: " + std::string(what) + " failed on rank " +
                             std::to_string(rank_) + " of " + std::to_string(world_size_) +
                             " (a rank died, or did not get here within " +
                             detail::format_duration(options_.timeout) +
                             "): " + detail::first_part_of_message(e.what()));
    }
  }

  void choose_backend() {
    const bool gpu = TORCHGUARD_WITH_NCCL && torch::cuda::is_available();
    switch (options_.backend) {
      case DistributedBackend::gloo:
        nccl_ = false;
        break;
      case DistributedBackend::nccl:
        if (!gpu) {
          throw DistributedError(
              "ProcessGroupGuard: the NCCL backend needs a CUDA-enabled LibTorch built with NCCL "
              "and a GPU; use DistributedBackend::gloo on the CPU");
        }
        nccl_ = true;
        break;
      case DistributedBackend::automatic:
        nccl_ = gpu;
        break;
    }
    device_ = torch::Device(torch::kCPU);
#if TORCHGUARD_WITH_NCCL
    if (nccl_) {
      const int devices = static_cast<int>(torch::cuda::device_count());
      if (local_rank_ >= devices) {
        throw DistributedError("ProcessGroupGuard: LOCAL_RANK " + std::to_string(local_rank_) +
                               " has no GPU: this machine has " + std::to_string(devices));
      }
      device_ = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank_));
      if (options_.select_cuda_device) c10::cuda::set_device(device_.index());
    }
#endif
  }

  void connect_store() {
    c10::intrusive_ptr<c10d::Store> store;
    if (!options_.file_store.empty()) {
      try {
        store = c10::make_intrusive<c10d::FileStore>(options_.file_store, world_size_);
      } catch (const std::exception& e) {
        throw DistributedError("ProcessGroupGuard: cannot open the FileStore '" +
                               options_.file_store +
                               "': " + detail::first_part_of_message(e.what()));
      }
      store->setTimeout(options_.timeout);
      where_ = "FileStore '" + options_.file_store + "'";
    } else {
      std::string host = options_.master_addr;
      if (host.empty()) {
        const char* variable = std::getenv("MASTER_ADDR");
        if (variable && *variable) {
          host = variable;
        } else if (world_size_ == 1) {
          host = "127.0.0.1";
        } else {
          throw DistributedError(
              "ProcessGroupGuard: MASTER_ADDR is not set (the address of rank 0's machine; "
              "torchrun and scripts/launch.sh set it)");
        }
      }
      const int port = detail::int_setting(options_.master_port, "MASTER_PORT", 29500);
      if (port < 1 || port > 65535) {
        throw DistributedError("ProcessGroupGuard: MASTER_PORT " + std::to_string(port) +
                               " is not a TCP port (1 to 65535)");
      }
      where_ = host + ":" + std::to_string(port);
      c10d::TCPStoreOptions store_options;
      store_options.port = static_cast<std::uint16_t>(port);
      // Under torchrun, its agent may serve the store already (as Python's env:// knows).
      const char* agent_store = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
      serves_store_ = rank_ == 0 && !(agent_store && std::string(agent_store) == "True");
      store_options.isServer = serves_store_;
      store_options.numWorkers = static_cast<std::size_t>(world_size_);
      store_options.waitWorkers = false;  // the rendezvous below waits, and says who is missing
      store_options.timeout = options_.timeout;
      try {
        store = c10::make_intrusive<c10d::TCPStore>(host, store_options);
      } catch (const std::exception& e) {
        throw DistributedError(
            std::string("ProcessGroupGuard: rank ") + std::to_string(rank_) +
            (rank_ == 0 ? " could not serve the store at " : " could not reach the master at ") +
            where_ + " within " + detail::format_duration(options_.timeout) + ": " +
            detail::first_part_of_message(e.what()));
      }
    }
    // Keys of an earlier attempt may still be in torchrun's store after an elastic restart.
    const char* restart = std::getenv("TORCHELASTIC_RESTART_COUNT");
    store_ = c10::make_intrusive<c10d::PrefixStore>(
        std::string("torchguard/") + (restart && *restart ? restart : "0"), store);
  }

  // Every rank announces its rank and world size; each checks the others against its own.
  // A rank that serves the store keeps it up, on a mismatch, until every rank that joined has
  // read what it needs: otherwise the other ranks would see a closed connection, not the cause.
  void rendezvous() {
    const std::string mine = std::to_string(world_size_);
    const auto lost = [&](const std::exception& e) {
      return DistributedError("ProcessGroupGuard: rank " + std::to_string(rank_) +
                              " lost the store at " + where_ +
                              " during the rendezvous: " + detail::first_part_of_message(e.what()));
    };
    try {
      if (store_->add("rank/" + std::to_string(rank_), 1) > 1) {
        throw DistributedError("ProcessGroupGuard: two processes claim RANK " +
                               std::to_string(rank_) + " (at " + where_ + ")");
      }
      // Counted before the key is visible, so a rank that sees the key also sees the count.
      store_->add("joined", 1);
      store_->set("world_size/" + std::to_string(rank_), detail::to_bytes(mine));
    } catch (const DistributedError&) {
      throw;
    } catch (const std::exception& e) {
      throw lost(e);
    }
    std::optional<DistributedError> mismatch;
    for (int other = 0; other < world_size_ && !mismatch; ++other) {
      const std::string key = "world_size/" + std::to_string(other);
      const auto started = std::chrono::steady_clock::now();
      try {
        store_->wait({key}, options_.timeout);
      } catch (const std::exception& e) {
        if (std::chrono::steady_clock::now() - started < options_.timeout) throw lost(e);
        throw DistributedError(
            "ProcessGroupGuard: rank " + std::to_string(other) + " did not join at " + where_ +
            " within " + detail::format_duration(options_.timeout) + " (WORLD_SIZE is " + mine +
            " here: is it the same on every rank, and did every rank start?)");
      }
      std::string theirs;
      try {
        theirs = detail::to_text(store_->get(key));
      } catch (const std::exception& e) {
        throw lost(e);
      }
      if (theirs != mine) {
        mismatch.emplace("ProcessGroupGuard: WORLD_SIZE differs between ranks: rank " +
                         std::to_string(other) + " has " + theirs + ", rank " +
                         std::to_string(rank_) + " has " + mine);
      }
    }
    if (!mismatch) return;
    try {
      const auto checked = store_->add("checked", 1);
      if (serves_store_) {
        // Bounded: a rank that joined but hangs must not hold this one past the timeout.
        const auto deadline = std::chrono::steady_clock::now() + options_.timeout;
        auto done = checked;
        while (done < store_->add("joined", 0) && std::chrono::steady_clock::now() < deadline) {
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
          done = store_->add("checked", 0);
        }
      }
    } catch (const std::exception&) {
      // The mismatch is the error to report; a store gone by now changes nothing.
    }
    throw *mismatch;
  }

  void create_group() {
    try {
#if TORCHGUARD_WITH_NCCL
      if (nccl_) {
        auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
        nccl_options->timeout = options_.timeout;
        group_ =
            c10::make_intrusive<c10d::ProcessGroupNCCL>(store_, rank_, world_size_, nccl_options);
        return;
      }
#endif
      auto gloo_options = c10d::ProcessGroupGloo::Options::create(options_.timeout);
      gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      group_ =
          c10::make_intrusive<c10d::ProcessGroupGloo>(store_, rank_, world_size_, gloo_options);
    } catch (const std::exception& e) {
      throw DistributedError("ProcessGroupGuard: creating the " + std::string(backend_name()) +
                             " group failed on rank " + std::to_string(rank_) + ": " +
                             detail::first_part_of_message(e.what()));
    }
  }

  ProcessGroupOptions options_;
  std::shared_ptr<spdlog::logger> logger_;
  int rank_ = 0;
  int world_size_ = 1;
  int local_rank_ = 0;
  bool nccl_ = false;
  torch::Device device_{torch::kCPU};
  std::string where_;
  bool serves_store_ = false;  // this rank's process is the TCPStore's server
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<detail::ProcessGroupBase> group_;
  bool closed_ = false;
};

}  // namespace torchguard
