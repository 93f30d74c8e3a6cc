// What a checkpoint holds of a training run and how it goes back: the model's, the extra
// modules' and tensors' tensors, the optimizer (built-in kinds as tensors, others through their
// own serialize()) with its groups' settings, the CPU and CUDA RNG states, the scheduler's step
// count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "torchguard/checkpoint/commit.hpp"
#include "torchguard/checkpoint/format.hpp"
#include "torchguard/checkpoint/optimizer_state.hpp"
#include "torchguard/checkpoint/options.hpp"
#include "torchguard/checkpoint/restore.hpp"
#include "torchguard/core/error.hpp"

namespace torchguard {
namespace detail {

inline std::string module_prefix(const std::string& name) {
  return fmt::format("module/{}/", name);
}
inline std::string tensor_key(const std::string& name) { return fmt::format("tensor/{}", name); }
inline std::string cuda_rng_key(int index) { return fmt::format("rng/cuda/{}", index); }

class TrainingState {
 public:
  TrainingState(ModuleRef model, OptimizerRef optimizer, const CheckpointOptions& options)
      : model_(std::move(model)), optimizer_(std::move(optimizer)), options_(&options) {}

  // Fills the snapshot's tensors, optimizer kind and state archive. With `staging`, the tensors
  // are copied into its buffer and the archive is serialized now (training may go on while
  // another thread writes); without, they are written later from the tensors' own memory.
  void capture(Snapshot& snapshot, HostStaging* staging) const {
    std::vector<NamedTensor> live;
    collect_module_tensors(*model_, "model/", live);
    for (const auto& [name, module] : options_->modules) {
      collect_module_tensors(*module, module_prefix(name), live);
    }
    for (const auto& [name, tensor] : options_->tensors) live.push_back({tensor_key(name), tensor});
    snapshot.state = new_archive();
    if (optimizer_) capture_optimizer(snapshot, live);
    {
      auto generator = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(generator.mutex());
      live.push_back({"rng/cpu", generator.get_state()});
    }
    const auto cuda_devices = static_cast<int>(torch::cuda::device_count());
    for (int index = 0; index < cuda_devices; ++index) {
      auto generator = at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, index));
      std::lock_guard<std::mutex> lock(generator.mutex());
      live.push_back({cuda_rng_key(index), generator.get_state()});
    }
    if (options_->scheduler) {
      const auto count = SchedulerStepAccess::step_count(*options_->scheduler);
      live.push_back({"scheduler/step_count", torch::tensor(static_cast<std::int64_t>(count))});
    }
    if (staging) {
      snapshot.tensors = staging->stage(live);
      snapshot.state_bytes = serialize_to_memory(*snapshot.state);
      snapshot.state.reset();
    } else {  // a host copy only for device tensors
      snapshot.tensors.reserve(live.size());
      for (auto& item : live)
        snapshot.tensors.push_back({std::move(item.name), host_tensor(item.tensor)});
    }
  }

  // Loads a verified checkpoint. Everything is checked before anything changes: a checkpoint
  // that does not fit leaves the model as it was. Throws CheckpointError.
  void load(const VerifiedCheckpoint& checkpoint, spdlog::logger& logger) const {
    try {
      if (options_->load_device) {
        model_->to(*options_->load_device);
        for (auto& [name, module] : options_->modules) module->to(*options_->load_device);
      }
      const TensorFileView tensors(checkpoint.bytes(tensors_name));
      const std::string_view state_bytes = checkpoint.bytes(state_name);
      torch::serialize::InputArchive state;
      state.load_from(state_bytes.data(), state_bytes.size(), torch::Device(torch::kCPU));
      check_module_tensors(*model_, "model/", tensors);
      for (auto& [name, module] : options_->modules) {
        check_module_tensors(*module, module_prefix(name), tensors);
      }
      for (auto& [name, tensor] : options_->tensors) {
        const auto stored = tensors.get(tensor_key(name));
        if (!stored) throw CheckpointError(fmt::format("it holds no tensor '{}'", name));
        if (stored->sizes() != tensor.sizes()) {
          throw CheckpointError(fmt::format("tensor '{}' is {} in the checkpoint, {} here", name,
                                            c10::str(stored->sizes()), c10::str(tensor.sizes())));
        }
      }
      load_module_tensors(*model_, "model/", tensors);
      for (auto& [name, module] : options_->modules) {
        load_module_tensors(*module, module_prefix(name), tensors);
      }
      for (auto& [name, tensor] : options_->tensors) {
        torch::NoGradGuard no_grad;
        tensor.copy_(*tensors.get(tensor_key(name)));
      }
      if (optimizer_) load_optimizer(checkpoint.manifest.value("optimizer", ""), tensors, state);
      load_generators(tensors, logger);
      if (options_->scheduler) {
        if (const auto count = tensors.get("scheduler/step_count")) {
          SchedulerStepAccess::step_count(*options_->scheduler) =
              static_cast<unsigned>(count->item<std::int64_t>());
        }
      }
    } catch (const std::exception& e) {
      // The files are intact (checksums match): the program's model does not match them.
      throw CheckpointError(fmt::format(
          "CheckpointGuard: checkpoint '{}' is intact but does not fit this program's model or "
          "optimizer: {}",
          checkpoint.path.string(), error_message(e)));
    }
  }

 private:
  void capture_optimizer(Snapshot& snapshot, std::vector<NamedTensor>& live) const {
    if (auto kind = save_optimizer_state(*optimizer_, live)) {
      snapshot.optimizer_kind = *kind;
    } else {  // not a built-in optimizer: its own serialize(), slower but complete
      snapshot.optimizer_kind = "archive";
      torch::serialize::OutputArchive archive(snapshot.state->compilation_unit());
      optimizer_->save(archive);
      snapshot.state->write("optimizer", archive);
    }
    const auto& groups = optimizer_->param_groups();
    for (std::size_t i = 0; i < groups.size(); ++i) {
      torch::serialize::OutputArchive group(snapshot.state->compilation_unit());
      groups[i].options().serialize(group);
      snapshot.state->write(fmt::format("optimizer_group/{}", i), group);
    }
  }

  void load_optimizer(const std::string& kind, const TensorFileView& tensors,
                      torch::serialize::InputArchive& state) const {
    if (kind.empty()) throw CheckpointError("it holds no optimizer state");
    if (kind == "archive") {
      torch::serialize::InputArchive archive;
      state.read("optimizer", archive);
      optimizer_->load(archive);
    } else if (!load_optimizer_state(*optimizer_, kind, tensors)) {
      throw CheckpointError(fmt::format(
          "its optimizer state is of a built-in {} optimizer, not this program's", kind));
    }
    // LibTorch's own optimizer load keeps the state but drops each group's settings (lr, ...).
    auto& groups = optimizer_->param_groups();
    for (std::size_t i = 0; i < groups.size(); ++i) {
      torch::serialize::InputArchive group;
      if (!state.try_read(fmt::format("optimizer_group/{}", i), group)) {
        throw CheckpointError(
            fmt::format("it holds the settings of fewer than {} optimizer groups", groups.size()));
      }
      groups[i].options().serialize(group);
    }
  }

  // An RNG state from another LibTorch version may not fit this one's generator: resuming goes
  // on (with a warning), only not bitwise.
  static void set_generator_state(at::Generator generator, const torch::Tensor& state,
                                  const std::string& which, spdlog::logger& logger) {
    try {
      std::lock_guard<std::mutex> lock(generator.mutex());
      generator.set_state(state.clone());
    } catch (const std::exception& e) {
      logger.warn("CheckpointGuard: cannot restore the {} RNG state ({}); resuming without it",
                  which, error_message(e));
    }
  }

  static void load_generators(const TensorFileView& tensors, spdlog::logger& logger) {
    if (const auto rng = tensors.get("rng/cpu")) {
      set_generator_state(at::detail::getDefaultCPUGenerator(), *rng, "CPU", logger);
    }
    const auto cuda_devices = static_cast<int>(torch::cuda::device_count());
    for (int index = 0; index < cuda_devices; ++index) {
      const auto rng = tensors.get(cuda_rng_key(index));
      if (!rng) continue;  // saved on a machine with fewer GPUs
      set_generator_state(at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, index)),
                          *rng, fmt::format("CUDA:{}", index), logger);
    }
  }

  ModuleRef model_;
  OptimizerRef optimizer_;
  const CheckpointOptions* options_;
};

}  // namespace detail
}  // namespace torchguard
