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

class ProcessGroupGuard {
 public:
  using Options = ProcessGroupOptions;

  explicit ProcessGroupGuard(Options options = {})
      : options_(std::move(options)), logger_(detail::or_default(options_.logger)) {
    world_size_ = detail::int_setting(options_.world_size, "WORLD_SIZE", std::nullopt);
    if (world_size_ < 1) {
      throw DistributedError(
          fmt::format("ProcessGroupGuard: WORLD_SIZE must be at least 1, not {}", world_size_));
    }
    rank_ = detail::int_setting(options_.rank, "RANK", std::nullopt);
    if (rank_ < 0 || rank_ >= world_size_) {
      throw DistributedError(
          fmt::format("ProcessGroupGuard: RANK {} is out of range for WORLD_SIZE {} (0 to {})",
                      rank_, world_size_, world_size_ - 1));
    }
    local_rank_ = detail::int_setting(options_.local_rank, "LOCAL_RANK", rank_);
    if (local_rank_ < 0) {
      throw DistributedError(
          fmt::format("ProcessGroupGuard: LOCAL_RANK must not be negative, not {}", local_rank_));
    }
    if (options_.timeout.count() <= 0) {
      throw DistributedError("ProcessGroupGuard: the timeout must be positive");
    }
    choose_backend();
    detail::RendezvousPlace place{rank_, world_size_, options_.timeout, {}, false, {}};
    store_ = detail::join_group(options_, place);
    where_ = place.where;
    serves_store_ = place.serves_store;
    create_group();
    logger_->info("ProcessGroupGuard: rank {} of {} (local rank {}), {} on {}", rank_, world_size_,
                  local_rank_, backend_name(), device_.str());
  }

  ProcessGroupGuard(ProcessGroupGuard&& other) noexcept
      : options_(std::move(other.options_)),
        logger_(other.logger_),
        rank_(other.rank_),
        world_size_(other.world_size_),
        local_rank_(other.local_rank_),
        nccl_(other.nccl_),
        device_(other.device_),
        where_(std::move(other.where_)),
        serves_store_(other.serves_store_),
        store_(std::move(other.store_)),
        group_(std::move(other.group_)),
        closed_(std::exchange(other.closed_, true)),
        self_(std::move(other.self_)) {
    if (self_) *self_ = this;  // what configure_checkpoints() handed out follows the move
  }
  ProcessGroupGuard& operator=(ProcessGroupGuard&& other) noexcept {
    if (this != &other) {
      this->~ProcessGroupGuard();
      new (this) ProcessGroupGuard(std::move(other));
    }
    return *this;
  }

  // Tears the group down; never throws (close() does).
  ~ProcessGroupGuard() {
    try {
      close();
    } catch (...) {
      logger_->error("ProcessGroupGuard: {}", describe(std::current_exception()));
    }
    if (self_) *self_ = nullptr;
  }

  // The guard contract's close: the group is released the same way whatever the outcome.
  void close(Outcome) { close(); }

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
      throw OptionsError(fmt::format(
          "ProcessGroupGuard: broadcast_parameters: root {} is not a rank of a group of {}", root,
          world_size_));
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
      throw DistributedError(
          fmt::format("ProcessGroupGuard: the ranks disagree on {}: from {} to {} (rank {} has {})",
                      what, -extremes[1], extremes[0], rank_, value));
    }
  }

  // True on every rank when `flag` is true on some rank. Ranks see a signal at different steps;
  // stopping on any() stops them all at the same step.
  bool any(bool flag) { return max_over_ranks({flag ? 1 : 0}, "any")[0] != 0; }

  // Sets up checkpoint options (CheckpointOptions, or anything with `is_writer` and
  // `after_save`) for this group: rank 0 writes, every rank waits at a barrier after each save.
  template <class CheckpointOptionsT>
  void configure_checkpoints(CheckpointOptionsT& checkpoint_options) {
    checkpoint_options.is_writer = [rank = rank_] { return rank == 0; };
    checkpoint_options.after_save = [self = self_] {
      if (!self || !*self) throw DistributedError("ProcessGroupGuard: the group is gone");
      (*self)->barrier();
    };
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
      throw DistributedError(fmt::format(
          "ProcessGroupGuard: {} failed on rank {} of {} (a rank died, or did not get here within "
          "{}): {}",
          what, rank_, world_size_, format_duration(options_.timeout), error_message(e)));
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
        throw DistributedError(
            fmt::format("ProcessGroupGuard: LOCAL_RANK {} has no GPU: this machine has {}",
                        local_rank_, devices));
      }
      device_ = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank_));
      if (options_.select_cuda_device) c10::cuda::set_device(device_.index());
    }
#endif
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
      throw DistributedError(
          fmt::format("ProcessGroupGuard: creating the {} group failed on rank {}: {}",
                      backend_name(), rank_, error_message(e)));
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
  // Where this guard lives now, for the checkpoint fence handed out (null once destroyed).
  std::shared_ptr<ProcessGroupGuard*> self_ = std::make_shared<ProcessGroupGuard*>(this);
};

}  // namespace torchguard
