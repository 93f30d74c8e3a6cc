// What a checkpoint holds of a training run and how it goes back: the model's state_dict, the
// extra modules' and tensors, the optimizer (built-in kinds as tensors and JSON settings, others
// through their own serialize()), the CPU and CUDA RNG states, the scheduler's step count. One
// loader serves both formats (format_v1.hpp hands it format 1's tensors under format 2's names).
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "torchguard/checkpoint/commit.hpp"
#include "torchguard/checkpoint/format.hpp"
#include "torchguard/checkpoint/format_v1.hpp"
#include "torchguard/checkpoint/optimizer_state.hpp"
#include "torchguard/checkpoint/options.hpp"
#include "torchguard/checkpoint/restore.hpp"
#include "torchguard/checkpoint/staging.hpp"
#include "torchguard/checkpoint/state_dict.hpp"
#include "torchguard/core/error.hpp"

namespace torchguard {
namespace detail {

class TrainingState {
 public:
  TrainingState(ModuleRef model, OptimizerRef optimizer, const CheckpointOptions& options)
      : model_(std::move(model)), optimizer_(std::move(optimizer)), options_(&options) {}

  // Fills the snapshot's tensor files, optimizer kind and settings (and the archive of an
  // optimizer that is not built in). With `staging`, the tensors are copied into its buffer and
  // the archive is serialized now (training may go on while another thread writes); without,
  // they are written later from the tensors' own memory. With `defer` too, the copies of what
  // only the optimizer changes (parameters, the optimizer's tensors) are returned, not made.
  DeferredCopies capture(Snapshot& snapshot, HostStaging* staging, bool defer = false) const {
    TensorFile model{model_file, module_state(*model_), {{"format", "pt"}}};
    TensorFile optimizer{optimizer_file, {}, {{"format", "pt"}}};
    TensorFile extra{extra_file, {}, {}};
    for (const auto& [name, module] : options_->modules) {
      for (auto& item : module_state(*module, module_prefix(name))) {
        extra.tensors.push_back(std::move(item));
      }
    }
    for (const auto& [name, tensor] : options_->tensors) {
      extra.tensors.push_back({tensor_key(name), tensor});
    }
    if (optimizer_) capture_optimizer(snapshot, optimizer.tensors);
    {
      auto generator = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(generator.mutex());
      extra.tensors.push_back({cpu_rng_key, generator.get_state()});
    }
    const auto cuda_devices = static_cast<int>(torch::cuda::device_count());
    for (int index = 0; index < cuda_devices; ++index) {
      auto generator = at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, index));
      std::lock_guard<std::mutex> lock(generator.mutex());
      extra.tensors.push_back({cuda_rng_key(index), generator.get_state()});
    }
    if (options_->scheduler) {
      const auto count = SchedulerStepAccess::step_count(*options_->scheduler);
      extra.tensors.push_back(
          {scheduler_step_key, torch::tensor(static_cast<std::int64_t>(count))});
    }
    std::unordered_set<const c10::TensorImpl*> later;  // what only the optimizer changes
    if (staging && defer) {
      auto add = [&later](const torch::Tensor& tensor) {
        later.insert(tensor.unsafeGetTensorImpl());
      };
      for (const auto& parameter : model_->parameters()) add(parameter);
      for (const auto& [name, module] : options_->modules) {
        for (const auto& parameter : module->parameters()) add(parameter);
      }
      for (const auto& item : optimizer.tensors) add(item.tensor);
    }
    snapshot.files.push_back(std::move(model));
    if (!snapshot.optimizer_groups.is_null()) {  // a built-in optimizer
      snapshot.files.push_back(std::move(optimizer));
    }
    snapshot.files.push_back(std::move(extra));
    DeferredCopies deferred;
    if (staging) {
      deferred = staging->stage(snapshot.files, [&](const torch::Tensor& tensor) {
        return later.count(tensor.unsafeGetTensorImpl()) > 0;
      });
      if (snapshot.state) {
        snapshot.state_bytes = serialize_to_memory(*snapshot.state);
        snapshot.state.reset();
      }
    } else {  // a host copy only for device tensors
      for (auto& file : snapshot.files) {
        for (auto& item : file.tensors) item.tensor = host_tensor(item.name, item.tensor);
      }
    }
    return deferred;
  }

  // Loads a verified checkpoint. Everything is checked before anything changes: a checkpoint
  // that does not fit leaves the model as it was. Throws CheckpointError.
  void load(const VerifiedCheckpoint& checkpoint, spdlog::logger& logger) const {
    try {
      if (options_->load_device) {
        model_->to(*options_->load_device);
        for (auto& [name, module] : options_->modules) module->to(*options_->load_device);
      }
      const int version = checkpoint.manifest.at("format_version").get<int>();
      const CheckpointTensors tensors = checkpoint_tensors(checkpoint, version);
      std::unique_ptr<torch::serialize::InputArchive> state;
      if (checkpoint.files.count(state_name)) {  // format 1, or an optimizer not built in
        const std::string_view state_bytes = checkpoint.bytes(state_name);
        state = std::make_unique<torch::serialize::InputArchive>();
        state->load_from(state_bytes.data(), state_bytes.size(), torch::Device(torch::kCPU));
      }
      // Everything is checked before anything changes.
      std::vector<StatePlan> plans;
      plans.push_back(plan_module_state(*model_, tensors.model, "", {}, model_file));
      for (auto& [name, module] : options_->modules) {
        plans.push_back(plan_module_state(*module, tensors.extra, module_prefix(name), {},
                                          fmt::format("{} (module '{}')", extra_file, name)));
      }
      for (auto& [name, tensor] : options_->tensors) {
        const auto stored = tensors.extra.find(tensor_key(name));
        if (stored == tensors.extra.end()) {
          throw CheckpointError(fmt::format("it holds no tensor '{}'", name));
        }
        if (stored->second.sizes() != tensor.sizes()) {
          throw CheckpointError(fmt::format("tensor '{}' is {} in the checkpoint, {} here", name,
                                            c10::str(stored->second.sizes()),
                                            c10::str(tensor.sizes())));
        }
      }
      for (auto& plan : plans) plan.apply();
      for (auto& [name, tensor] : options_->tensors) {
        torch::NoGradGuard no_grad;
        tensor.copy_(tensors.extra.at(tensor_key(name)));
      }
      if (optimizer_) {
        load_optimizer(checkpoint.manifest.value("optimizer", ""), tensors.optimizer,
                       checkpoint.manifest.find("optimizer_groups") != checkpoint.manifest.end()
                           ? &checkpoint.manifest.at("optimizer_groups")
                           : nullptr,
                       state.get());
      }
      load_generators(tensors.extra, logger);
      if (options_->scheduler) {
        const auto count = tensors.extra.find(scheduler_step_key);
        if (count != tensors.extra.end()) {
          SchedulerStepAccess::step_count(*options_->scheduler) =
              static_cast<unsigned>(count->second.item<std::int64_t>());
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
  // The tensors of a verified checkpoint, as views of its mapped files.
  static CheckpointTensors checkpoint_tensors(const VerifiedCheckpoint& checkpoint, int version) {
    if (version < 2) return read_format1_tensors(checkpoint.bytes(format1_tensors_name));
    CheckpointTensors tensors;
    auto read = [&](const char* name, TensorMap& into) {
      if (!checkpoint.files.count(name)) return;
      into = SafetensorsView(checkpoint.bytes(name), name).tensors();
    };
    read(model_file, tensors.model);
    read(optimizer_file, tensors.optimizer);
    read(extra_file, tensors.extra);
    return tensors;
  }

  void capture_optimizer(Snapshot& snapshot, std::vector<NamedTensor>& out) const {
    if (auto kind = save_optimizer_state(*optimizer_, out, snapshot.optimizer_groups)) {
      snapshot.optimizer_kind = *kind;
      return;
    }
    // not a built-in optimizer: its own serialize(), slower but complete
    snapshot.optimizer_kind = "archive";
    snapshot.state = new_archive();
    torch::serialize::OutputArchive archive(snapshot.state->compilation_unit());
    optimizer_->save(archive);
    snapshot.state->write("optimizer", archive);
    const auto& groups = optimizer_->param_groups();
    for (std::size_t i = 0; i < groups.size(); ++i) {
      torch::serialize::OutputArchive group(snapshot.state->compilation_unit());
      groups[i].options().serialize(group);
      snapshot.state->write(fmt::format("optimizer_group/{}", i), group);
    }
  }

  // `groups`: the settings in JSON (format 2, built-in optimizers); otherwise in `state`.
  void load_optimizer(const std::string& kind, const TensorMap& tensors,
                      const nlohmann::json* groups, torch::serialize::InputArchive* state) const {
    if (kind.empty()) throw CheckpointError("it holds no optimizer state");
    if (kind == "archive") {
      if (!state) throw CheckpointError("it lists no state.pt for its optimizer");
      torch::serialize::InputArchive archive;
      state->read("optimizer", archive);
      optimizer_->load(archive);
    } else if (!load_optimizer_state(*optimizer_, kind, tensors, groups)) {
      throw CheckpointError(fmt::format(
          "its optimizer state is of a built-in {} optimizer, not this program's", kind));
    }
    if (groups) return;
    if (!state) throw CheckpointError("it holds no settings of the optimizer's groups");
    // LibTorch's own optimizer load keeps the state but drops each group's settings (lr, ...).
    auto& param_groups = optimizer_->param_groups();
    for (std::size_t i = 0; i < param_groups.size(); ++i) {
      torch::serialize::InputArchive group;
      if (!state->try_read(fmt::format("optimizer_group/{}", i), group)) {
        throw CheckpointError(fmt::format("it holds the settings of fewer than {} optimizer groups",
                                          param_groups.size()));
      }
      param_groups[i].options().serialize(group);
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

  static void load_generators(const TensorMap& tensors, spdlog::logger& logger) {
    const auto cpu = tensors.find(cpu_rng_key);
    if (cpu != tensors.end()) {
      set_generator_state(at::detail::getDefaultCPUGenerator(), cpu->second, "CPU", logger);
    }
    const auto cuda_devices = static_cast<int>(torch::cuda::device_count());
    for (int index = 0; index < cuda_devices; ++index) {
      const auto rng = tensors.find(cuda_rng_key(index));
      if (rng == tensors.end()) continue;  // saved on a machine with fewer GPUs
      set_generator_state(at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, index)),
                          rng->second, fmt::format("CUDA:{}", index), logger);
    }
  }

  ModuleRef model_;
  OptimizerRef optimizer_;
  const CheckpointOptions* options_;
};

}  // namespace detail
}  // namespace torchguard
