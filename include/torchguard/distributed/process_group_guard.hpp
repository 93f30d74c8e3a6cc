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

#include "torchguard/core/error.hpp"
#include "torchguard/core/guard.hpp"
#include "torchguard/core/logging.hpp"
#include "torchguard/core/outcome.hpp"
#include "torchguard/distributed/options.hpp"
#include "torchguard/distributed/rendezvous.hpp"
#include "torchguard/version.hpp"

#if TORCHGUARD_WITH_CUDA && defined(USE_C10D_NCCL)
#define TORCHGUARD_WITH_NCCL 1
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#else
#define TORCHGUARD_WITH_NCCL 0
#endif

namespace torchguard {
namespace detail {

// A ProcessGroupGuard's group: the settings it was made with, the store and the c10d group.
struct ProcessGroupState {
  static constexpr const char* close_error_prefix = "ProcessGroupGuard";

  explicit ProcessGroupState(ProcessGroupOptions group_options)
      : options(std::move(group_options)), logger(or_default(options.logger)) {
    world_size = int_setting(options.world_size, "WORLD_SIZE", std::nullopt);
    if (world_size < 1) {
      throw DistributedError(
          fmt::format("ProcessGroupGuard: WORLD_SIZE must be at least 1, not {}", world_size));
    }
    rank = int_setting(options.rank, "RANK", std::nullopt);
    if (rank < 0 || rank >= world_size) {
      throw DistributedError(
          fmt::format("ProcessGroupGuard: RANK {} is out of range for WORLD_SIZE {} (0 to {})",
                      rank, world_size, world_size - 1));
    }
    local_rank = int_setting(options.local_rank, "LOCAL_RANK", rank);
    if (local_rank < 0) {
      throw DistributedError(
          fmt::format("ProcessGroupGuard: LOCAL_RANK must not be negative, not {}", local_rank));
    }
    if (options.timeout.count() <= 0) {
      throw DistributedError("ProcessGroupGuard: the timeout must be positive");
    }
    choose_backend();
    RendezvousPlace place{rank, world_size, options.timeout, {}, false, {}};
    store = join_group(options, place);
    create_group();
    logger->info("ProcessGroupGuard: rank {} of {} (local rank {}), {} on {}", rank, world_size,
                 local_rank, backend_name(), device.str());
  }

  // Releases the process group, then the store (see ProcessGroupGuard::close).
  void close(Outcome) {
    if (closed) return;
    closed = true;
#if TORCHGUARD_WITH_NCCL
    if (nccl && process_group) static_cast<c10d::ProcessGroupNCCL&>(*process_group).shutdown();
#endif
    process_group.reset();
    store.reset();
    logger->debug("ProcessGroupGuard: rank {} left the group", rank);
  }

  const char* backend_name() const noexcept { return nccl ? "nccl" : "gloo"; }

  const c10::intrusive_ptr<ProcessGroupBase>& group() const {
    if (!process_group) throw DistributedError("ProcessGroupGuard: the group is closed");
    return process_group;
  }

  // Waits for a collective, at most the timeout; a failure names it, the rank and the timeout.
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what) const {
    try {
      work->wait(options.timeout);
    } catch (const std::exception& e) {
      throw DistributedError(fmt::format(
          "ProcessGroupGuard: {} failed on rank {} of {} (a rank died, or did not get here within "
          "{}): {}",
          what, rank, world_size, format_duration(options.timeout), error_message(e)));
    }
  }

  void barrier() const {
    c10d::BarrierOptions barrier_options;
    barrier_options.timeout = options.timeout;
    if (nccl) barrier_options.device_ids = {device.index()};
    wait(group()->barrier(barrier_options), "barrier");
  }

  ProcessGroupOptions options;
  std::shared_ptr<spdlog::logger> logger;
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  bool nccl = false;
  torch::Device device{torch::kCPU};
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<ProcessGroupBase> process_group;
  bool closed = false;
  // Expires with the state: the checkpoint fence handed out tells a gone group by it.
  std::shared_ptr<const bool> alive = std::make_shared<const bool>(true);

 private:
  void choose_backend() {
    const bool gpu = TORCHGUARD_WITH_NCCL && torch::cuda::is_available();
    switch (options.backend) {
      case DistributedBackend::gloo:
        nccl = false;
        break;
      case DistributedBackend::nccl:
        if (!gpu) {
          throw DistributedError(
              "ProcessGroupGuard: the NCCL backend needs a CUDA-enabled LibTorch built with NCCL "
              "and a GPU; use DistributedBackend::gloo on the CPU");
        }
        nccl = true;
        break;
      case DistributedBackend::automatic:
        nccl = gpu;
        break;
    }
    device = torch::Device(torch::kCPU);
#if TORCHGUARD_WITH_NCCL
    if (nccl) {
      const int devices = static_cast<int>(torch::cuda::device_count());
      if (local_rank >= devices) {
        throw DistributedError(
            fmt::format("ProcessGroupGuard: LOCAL_RANK {} has no GPU: this machine has {}",
                        local_rank, devices));
      }
      device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank));
      if (options.select_cuda_device) c10::cuda::set_device(device.index());
    }
#endif
  }

  void create_group() {
    try {
#if TORCHGUARD_WITH_NCCL
      if (nccl) {
        auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
        nccl_options->timeout = options.timeout;
        process_group =
            c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, nccl_options);
        return;
      }
#endif
      auto gloo_options = c10d::ProcessGroupGloo::Options::create(options.timeout);
      gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      process_group =
          c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, gloo_options);
    } catch (const std::exception& e) {
      throw DistributedError(
          fmt::format("ProcessGroupGuard: creating the {} group failed on rank {}: {}",
                      backend_name(), rank, error_message(e)));
    }
  }
};

}  // namespace detail

class ProcessGroupGuard {
 public:
  using Options = ProcessGroupOptions;

  explicit ProcessGroupGuard(Options options = {}) : s_(std::in_place, std::move(options)) {}

  // The destructor (and a move assignment, for the group the guard held) tears the group down;
  // never throws (close() does).
  ProcessGroupGuard(ProcessGroupGuard&&) noexcept = default;
  ProcessGroupGuard& operator=(ProcessGroupGuard&&) noexcept = default;

  // The guard contract's close: the group is released the same way whatever the outcome.
  void close(Outcome outcome) { s_.close(outcome); }

  // Releases the process group, then the store. Idempotent. Ranks do not wait for each other
  // here: a rank that leaves early because of an error must not hang in teardown.
  void close() { close(Outcome::success); }

  int rank() const noexcept { return s_->rank; }
  int world_size() const noexcept { return s_->world_size; }
  int local_rank() const noexcept { return s_->local_rank; }
  bool is_main() const noexcept { return s_->rank == 0; }
  // Where this rank computes: cuda:LOCAL_RANK with NCCL, the CPU with Gloo.
  torch::Device device() const noexcept { return s_->device; }
  const char* backend_name() const noexcept { return s_->backend_name(); }
  // c10d's own objects, for collectives the guard does not wrap.
  const c10::intrusive_ptr<detail::ProcessGroupBase>& process_group() const { return s_->group(); }
  const c10::intrusive_ptr<c10d::Store>& store() const { return s_->store; }

  // Waits until every rank gets here (at most the timeout).
  void barrier() { s_->barrier(); }

  // Sums `tensors` in place over the ranks.
  void allreduce(std::vector<torch::Tensor>& tensors, const char* what = "allreduce") {
    if (tensors.empty()) return;
    c10d::AllreduceOptions allreduce_options;
    allreduce_options.timeout = s_->options.timeout;
    s_->wait(s_->group()->allreduce(tensors, allreduce_options), what);
  }

  // Averages every gradient of `module` over the ranks (one flat buffer: one collective).
  void allreduce_gradients(torch::nn::Module& module) {
    std::vector<torch::Tensor> gradients;
    for (auto& parameter : module.parameters()) {
      if (parameter.requires_grad() && parameter.grad().defined()) {
        gradients.push_back(parameter.grad());
      }
    }
    if (gradients.empty() || world_size() == 1) return;
    std::vector<torch::Tensor> flat{flatten(gradients)};
    allreduce(flat, "allreduce_gradients");
    flat[0].div_(world_size());
    unflatten_into(flat[0], gradients);
  }

  // Copies rank `root`'s parameters and buffers to every rank.
  void broadcast_parameters(torch::nn::Module& module, int root = 0) {
    if (root < 0 || root >= world_size()) {
      throw OptionsError(fmt::format(
          "ProcessGroupGuard: broadcast_parameters: root {} is not a rank of a group of {}", root,
          world_size()));
    }
    std::vector<torch::Tensor> tensors;
    for (auto& parameter : module.parameters()) tensors.push_back(parameter);
    for (auto& buffer : module.buffers()) tensors.push_back(buffer);
    if (tensors.empty() || world_size() == 1) return;
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> flat{flatten(tensors)};
    c10d::BroadcastOptions broadcast_options;
    broadcast_options.rootRank = root;
    broadcast_options.timeout = s_->options.timeout;
    s_->wait(s_->group()->broadcast(flat, broadcast_options), "broadcast_parameters");
    unflatten_into(flat[0], tensors);
  }

  // Throws unless every rank passes the same value (a restored step, a config hash).
  void check_same(std::int64_t value, const std::string& what) {
    // The largest of (value, -value) over the ranks gives the largest and the smallest value.
    const auto extremes = max_over_ranks({value, -value}, "check_same");
    if (extremes[0] != -extremes[1]) {
      throw DistributedError(
          fmt::format("ProcessGroupGuard: the ranks disagree on {}: from {} to {} (rank {} has {})",
                      what, -extremes[1], extremes[0], rank(), value));
    }
  }

  // True on every rank when `flag` is true on some rank. Ranks see a signal at different steps;
  // stopping on any() stops them all at the same step.
  bool any(bool flag) { return max_over_ranks({flag ? 1 : 0}, "any")[0] != 0; }

  // Sets up CheckpointOptions for this group: rank 0 writes, every rank waits at a barrier after
  // each save, and a recovery (options.recovery) is decided by all together.
  template <class CheckpointOptionsT>
  void configure_checkpoints(CheckpointOptionsT& checkpoint_options) {
    checkpoint_options.is_writer = [rank = rank()] { return rank == 0; };
    // The state stays where it is while the guard moves; `alive` tells when it is gone.
    checkpoint_options.after_save = [state = s_.get(),
                                     alive = std::weak_ptr<const bool>(s_->alive)] {
      if (alive.expired()) throw DistributedError("ProcessGroupGuard: the group is gone");
      state->barrier();
    };
    // A step that went wrong on one process goes back on every process (CheckpointGuard's
    // check_step): one all-reduce of the verdicts.
    checkpoint_options.recovery.agree = [state = s_.get(),
                                         alive = std::weak_ptr<const bool>(s_->alive)](bool bad) {
      if (alive.expired()) throw DistributedError("ProcessGroupGuard: the group is gone");
      return max_over_ranks(*state, {bad ? 1 : 0}, "agreeing on a step's verdict")[0] != 0;
    };
  }

 private:
  std::vector<std::int64_t> max_over_ranks(const std::vector<std::int64_t>& values,
                                           const char* what) {
    return max_over_ranks(*s_, values, what);
  }
  static std::vector<std::int64_t> max_over_ranks(detail::ProcessGroupState& state,
                                                  const std::vector<std::int64_t>& values,
                                                  const char* what) {
    if (state.world_size == 1) return values;
    std::vector<torch::Tensor> tensors{
        torch::tensor(values, torch::TensorOptions().dtype(torch::kInt64)).to(state.device)};
    c10d::AllreduceOptions allreduce_options;
    allreduce_options.reduceOp = c10d::ReduceOp::MAX;
    allreduce_options.timeout = state.options.timeout;
    state.wait(state.group()->allreduce(tensors, allreduce_options), what);
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

  detail::GuardState<detail::ProcessGroupState> s_;
};

}  // namespace torchguard
