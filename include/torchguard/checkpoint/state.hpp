// What a checkpoint holds of a training run and how it goes back: each named model's state_dict,
// each named optimizer (built-in kinds as tensors and Python's param_groups in JSON, others
// through their own serialize()), the schedulers' step counts, the samplers' states, the extra
// tensors, the CPU and CUDA RNG states. Loading is all or nothing: every part is checked against
// the checkpoint before any part changes. One loader serves formats 1 to 4 (format_v1.hpp hands
// it format 1's tensors under format 2's names; format 2's parts are the ones named "model",
// "optimizer" and "scheduler", and its options.modules; format 4's parts may have a shared file
// beside their own, incremental.hpp, which decides at each capture what is written and what
// linked).
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "torchguard/checkpoint/commit.hpp"
#include "torchguard/checkpoint/format.hpp"
#include "torchguard/checkpoint/format_v1.hpp"
#include "torchguard/checkpoint/incremental.hpp"
#include "torchguard/checkpoint/optimizer_state.hpp"
#include "torchguard/checkpoint/options.hpp"
#include "torchguard/checkpoint/restore.hpp"
#include "torchguard/checkpoint/staging.hpp"
#include "torchguard/checkpoint/state_dict.hpp"
#include "torchguard/core/error.hpp"

namespace torchguard {
namespace detail {

// The parts of a run a CheckpointGuard saves, by name.
struct Parts {
  std::map<std::string, ModuleRef> models;
  std::map<std::string, OptimizerRef> optimizers;
  std::map<std::string, SchedulerRef> schedulers;
  std::map<std::string, Stateful> samplers;
  std::map<std::string, torch::Tensor> tensors;
};

class TrainingState {
 public:
  TrainingState(Parts parts, const CheckpointOptions& options)
      : parts_(std::move(parts)), options_(&options) {}

  const Parts& parts() const noexcept { return parts_; }

  // Fills the snapshot's files and its manifest's parts. With `staging`, the tensors are copied
  // into its buffer and archives are serialized now (training may go on while another thread
  // writes); without, they are written later from the tensors' own memory. With `defer` too, the
  // copies of what only the optimizers change (parameters, the optimizers' tensors) are returned,
  // not made.
  DeferredCopies capture(Snapshot& snapshot, HostStaging* staging, bool defer = false) const {
    auto& parts = snapshot.parts;
    parts["models"] = nlohmann::ordered_json::object();
    parts["optimizers"] = nlohmann::ordered_json::object();
    parts["schedulers"] = nlohmann::ordered_json::object();
    parts["samplers"] = nlohmann::ordered_json::object();
    std::unordered_set<const c10::TensorImpl*> later;  // what only the optimizers change
    // What this commit may link (incremental.hpp), and what the next one may.
    std::map<std::string, PartRecord> last = history_->take(), records;
    for (const auto& [name, model] : parts_.models) {
      parts["models"][name] = capture_model(snapshot, name, *model, last, records, later);
    }
    const auto names = parameter_names();
    for (const auto& [name, optimizer] : parts_.optimizers) {
      parts["optimizers"][name] = capture_optimizer(snapshot, name, *optimizer, names, later);
    }
    if (options_->incremental) {
      snapshot.committed = [history = history_, records = std::move(records)](
                               const std::filesystem::path& path,
                               const nlohmann::ordered_json& files) mutable {
        try {
          history->committed(path, files, std::move(records));
        } catch (...) {
          history->forget();  // the next commit writes every file
        }
      };
    }
    for (const auto& [name, scheduler] : parts_.schedulers) {
      parts["schedulers"][name] = {
          {"step_count", static_cast<std::uint64_t>(SchedulerStepAccess::step_count(*scheduler))}};
    }
    for (const auto& [name, sampler] : parts_.samplers) parts["samplers"][name] = sampler.save();
    TensorFile extra{extra_file, {}, {}};
    for (const auto& [name, tensor] : parts_.tensors) {
      extra.tensors.push_back({tensor_key(name), tensor});
    }
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
    snapshot.files.push_back(std::move(extra));
    DeferredCopies deferred;
    if (staging) {
      deferred = staging->stage(snapshot.files, [&](const torch::Tensor& tensor) {
        return defer && later.count(tensor.unsafeGetTensorImpl()) > 0;
      });
      for (auto& archive : snapshot.archives) {
        archive.bytes = serialize_to_memory(*archive.archive);
        archive.archive.reset();
      }
    } else {  // a host copy only for device tensors
      for (auto& file : snapshot.files) {
        for (auto& item : file.tensors) item.tensor = host_tensor(item.name, item.tensor);
      }
    }
    return deferred;
  }

  // The versions of every tensor a save would write but the RNG states: all unchanged means no
  // parameter, buffer, optimizer state or extra tensor was changed in place since they were read.
  std::vector<std::int64_t> versions() const {
    std::vector<std::int64_t> all;
    auto add = [&](const torch::Tensor& tensor) {
      if (tensor.defined()) all.push_back(static_cast<std::int64_t>(tensor._version()));
    };
    for (const auto& [name, model] : parts_.models) {
      for (const auto& item : module_state(*model)) add(item.tensor);
    }
    for (const auto& [name, optimizer] : parts_.optimizers) {
      std::vector<NamedTensor> state;
      nlohmann::json groups;
      if (save_optimizer_state(*optimizer, state, groups)) {
        all.push_back(static_cast<std::int64_t>(state.size()));
        for (const auto& item : state) add(item.tensor);
      }
    }
    for (const auto& [name, scheduler] : parts_.schedulers) {
      all.push_back(SchedulerStepAccess::step_count(*scheduler));
    }
    for (const auto& [name, tensor] : parts_.tensors) add(tensor);
    return all;
  }

  // Loads a verified checkpoint. Everything is checked before anything changes: a checkpoint
  // that does not fit leaves every part as it was. Throws CheckpointError.
  void load(const VerifiedCheckpoint& checkpoint, spdlog::logger& logger) const {
    try {
      if (options_->load_device) {
        for (auto& [name, model] : parts_.models) model->to(*options_->load_device);
      }
      const int version = checkpoint.manifest.at("format_version").get<int>();
      std::vector<std::function<void()>> apply =
          version >= 3 ? plan(checkpoint, logger) : plan_format2(checkpoint, version);
      for (auto& step : apply) step();
      load_generators(read_tensors(checkpoint, extra_file), logger);
      history_->forget();  // the next commit writes every file, the shared ones afresh
    } catch (const std::exception& e) {
      // The files are intact (checksums match): the program's parts do not match them.
      throw CheckpointError(fmt::format(
          "CheckpointGuard: checkpoint '{}' is intact but does not fit this program's parts: {}",
          checkpoint.path.string(), error_message(e)));
    }
  }

 private:
  // "<model>/<parameter name>" of every parameter of the models, by its TensorImpl.
  std::unordered_map<const c10::TensorImpl*, std::string> parameter_names() const {
    std::unordered_map<const c10::TensorImpl*, std::string> names;
    for (const auto& [model_name, model] : parts_.models) {
      for (const auto& parameter : model->named_parameters()) {
        names.emplace(parameter.value().unsafeGetTensorImpl(),
                      fmt::format("{}/{}", model_name, parameter.key()));
      }
    }
    return names;
  }

  // The manifest's record of one optimizer; its tensors go to a file of the snapshot.
  nlohmann::ordered_json capture_optimizer(
      Snapshot& snapshot, const std::string& name, torch::optim::Optimizer& optimizer,
      const std::unordered_map<const c10::TensorImpl*, std::string>& names,
      std::unordered_set<const c10::TensorImpl*>& later) const {
    nlohmann::ordered_json record;
    std::vector<std::string> parameters;  // which model parameter each index is, when known
    for (const auto& group : optimizer.param_groups()) {
      for (const auto& parameter : group.params()) {
        const auto it = names.find(parameter.unsafeGetTensorImpl());
        parameters.push_back(it == names.end() ? std::string() : it->second);
      }
    }
    std::vector<NamedTensor> tensors;
    nlohmann::json groups;
    if (auto kind = save_optimizer_state(optimizer, tensors, groups)) {
      const std::string file = optimizer_file_of(name);
      for (const auto& item : tensors) later.insert(item.tensor.unsafeGetTensorImpl());
      snapshot.files.push_back({file, std::move(tensors), {{"format", "pt"}}});
      record["kind"] = *kind;
      record["file"] = file;
      record["param_groups"] = groups;
    } else {  // not a built-in optimizer: its own serialize(), slower but complete
      ArchiveFile archive{optimizer_archive_of(name), new_archive(), {}};
      torch::serialize::OutputArchive state(archive.archive->compilation_unit());
      optimizer.save(state);
      archive.archive->write("optimizer", state);
      const auto& param_groups = optimizer.param_groups();
      for (std::size_t i = 0; i < param_groups.size(); ++i) {
        torch::serialize::OutputArchive group(archive.archive->compilation_unit());
        param_groups[i].options().serialize(group);
        archive.archive->write(fmt::format("optimizer_group/{}", i), group);
      }
      record["kind"] = "archive";
      record["file"] = archive.name;
      record["param_groups"] = nlohmann::json::array();
      snapshot.archives.push_back(std::move(archive));
    }
    record["parameters"] = parameters;
    return record;
  }

  // The tensors of one of the checkpoint's safetensors files (views of its bytes), or none.
  static TensorMap read_tensors(const VerifiedCheckpoint& checkpoint, const std::string& name) {
    if (!checkpoint.files.count(name)) return {};
    return SafetensorsView(checkpoint.bytes(name), name).tensors();
  }

  // The tensors of a part (format 3 and 4): its file's, and its shared file's when it has one.
  static TensorMap read_part(const VerifiedCheckpoint& checkpoint, const nlohmann::json& record) {
    const auto file = record.at("file").get<std::string>();
    TensorMap tensors = read_tensors(checkpoint, file);
    const auto shared = record.find("shared_file");
    if (shared == record.end()) return tensors;
    const auto shared_name = shared->get<std::string>();
    for (auto& [name, tensor] : read_tensors(checkpoint, shared_name)) {
      if (!tensors.emplace(name, std::move(tensor)).second) {
        throw CheckpointError(fmt::format("{} and {} both hold '{}'", file, shared_name, name));
      }
    }
    return tensors;
  }

  // The manifest's record of one model; its tensors go to its file, and with
  // options.incremental those that stay unchanged to a shared file, written or linked
  // (incremental.hpp). `last`: the models of the commit to link from; `records` gets this one's.
  nlohmann::ordered_json capture_model(Snapshot& snapshot, const std::string& name,
                                       const torch::nn::Module& model,
                                       const std::map<std::string, PartRecord>& last,
                                       std::map<std::string, PartRecord>& records,
                                       std::unordered_set<const c10::TensorImpl*>& later) const {
    const std::string file = model_file_of(name);
    nlohmann::ordered_json record = {{"file", file}};
    std::vector<NamedTensor> tensors = module_state(model);
    std::set<std::string> frozen, buffers;
    for (const auto& parameter : model.named_parameters()) {
      // What is hashed is copied at capture, not later: the copy is then what was hashed.
      if (options_->incremental && !parameter.value().requires_grad()) {
        frozen.insert(parameter.key());
      } else {
        later.insert(parameter.value().unsafeGetTensorImpl());
      }
    }
    if (!options_->incremental) {
      snapshot.files.push_back({file, std::move(tensors), {{"format", "pt"}}});
      return record;
    }
    for (const auto& buffer : model.named_buffers()) buffers.insert(buffer.key());
    const auto found = last.find(file);
    // A file moved or removed since (quarantined, deleted by hand) is not linked from.
    std::error_code missing;
    const PartRecord* from =
        found != last.end() && (found->second.shared.empty() ||
                                std::filesystem::exists(found->second.shared_file.source, missing))
            ? &found->second
            : nullptr;
    PartPlan plan = plan_part(tensors, frozen, buffers, from);
    snapshot.files.push_back({file, std::move(plan.own), {{"format", "pt"}}});
    if (!plan.record.shared.empty()) record["shared_file"] = shared_file_of(file);
    if (!plan.shared.empty()) {
      snapshot.files.push_back({shared_file_of(file), std::move(plan.shared), {{"format", "pt"}}});
    }
    if (plan.link) snapshot.links.push_back(std::move(*plan.link));
    records.emplace(file, std::move(plan.record));
    return record;
  }

  // "models 'a', 'b'" or "no models"; without a kind, the names alone.
  static std::string listed(const char* kind, const std::set<std::string>& names) {
    std::string text;
    for (const auto& name : names) text += fmt::format("{}'{}'", text.empty() ? "" : ", ", name);
    if (!*kind) return text;
    return text.empty() ? fmt::format("no {}s", kind) : fmt::format("{}s {}", kind, text);
  }

  // Every part of a kind the program registers must be in the checkpoint (else it would go on
  // without its state); a part the checkpoint holds but the program does not register is left
  // out, with a warning (a program may read the generator of a GAN's checkpoint alone).
  template <class Map>
  static void check_names(const char* kind, const char* option, const nlohmann::json& stored,
                          const Map& registered, spdlog::logger& logger) {
    std::set<std::string> in_checkpoint, in_program, missing;
    for (const auto& item : stored.items()) in_checkpoint.insert(item.key());
    for (const auto& item : registered) {
      in_program.insert(item.first);
      if (!in_checkpoint.count(item.first)) missing.insert(item.first);
    }
    if (!missing.empty()) {
      throw CheckpointError(fmt::format(
          "it holds {}, this program registers {} (options.{}): {} would go on without a restored "
          "state",
          listed(kind, in_checkpoint), listed(kind, in_program), option, listed("", missing)));
    }
    for (const auto& name : in_checkpoint) {
      if (!in_program.count(name)) {
        logger.warn(
            "CheckpointGuard: the checkpoint holds {} '{}', which this program does not "
            "register (options.{}): left out",
            kind, name, option);
      }
    }
  }

  // Format 3: the parts by name, as the manifest lists them.
  std::vector<std::function<void()>> plan(const VerifiedCheckpoint& checkpoint,
                                          spdlog::logger& logger) const {
    const auto& manifest = checkpoint.manifest;
    check_names("model", "models", manifest.at("models"), parts_.models, logger);
    check_names("optimizer", "optimizers", manifest.at("optimizers"), parts_.optimizers, logger);
    check_names("scheduler", "schedulers", manifest.at("schedulers"), parts_.schedulers, logger);
    check_names("sampler", "samplers", manifest.at("samplers"), parts_.samplers, logger);
    std::vector<std::function<void()>> apply;
    std::vector<StatePlan> models;
    for (const auto& [name, model] : parts_.models) {
      const auto& record = manifest.at("models").at(name);
      const std::string file = record.at("file").get<std::string>();
      models.push_back(plan_module_state(*model, read_part(checkpoint, record), "", {},
                                         fmt::format("{} (model '{}')", file, name)));
    }
    for (const auto& [name, optimizer] : parts_.optimizers) {
      const auto& record = manifest.at("optimizers").at(name);
      const auto kind = record.at("kind").get<std::string>();
      const auto file = record.at("file").get<std::string>();
      try {
        if (kind == "archive") {  // applied first: LibTorch's load cannot be checked beforehand
          apply.insert(apply.begin(), archive_loader(*optimizer, checkpoint.bytes(file)));
        } else if (auto plan = plan_optimizer_state(*optimizer, kind, read_part(checkpoint, record),
                                                    &record.at("param_groups"))) {
          apply.push_back(std::move(*plan));
        } else {
          throw CheckpointError(
              fmt::format("its state is of a built-in {} optimizer, not this program's", kind));
        }
      } catch (const std::exception& e) {
        throw CheckpointError(fmt::format("optimizer '{}': {}", name, error_message(e)));
      }
    }
    for (auto& model : models)
      apply.push_back([plan = std::move(model)]() mutable { plan.apply(); });
    for (const auto& [name, scheduler] : parts_.schedulers) {
      const auto count = manifest.at("schedulers").at(name).at("step_count").get<std::uint64_t>();
      apply.push_back([scheduler = scheduler, count] {
        SchedulerStepAccess::step_count(*scheduler) = static_cast<unsigned>(count);
      });
    }
    for (const auto& [name, sampler] : parts_.samplers) {
      apply.push_back(sampler_loader(name, sampler, manifest.at("samplers").at(name)));
    }
    apply.push_back(tensors_loader(read_tensors(checkpoint, extra_file)));
    return apply;
  }

  // Formats 1 and 2: one model and one optimizer, the models of options.modules (now named
  // models) in extra.safetensors, the scheduler's count there too.
  std::vector<std::function<void()>> plan_format2(const VerifiedCheckpoint& checkpoint,
                                                  int version) const {
    const auto& manifest = checkpoint.manifest;
    CheckpointTensors tensors;
    if (version < 2) {
      tensors = read_format1_tensors(checkpoint.bytes(format1_tensors_name));
    } else {
      tensors.model = read_tensors(checkpoint, model_file);
      tensors.optimizer = read_tensors(checkpoint, optimizer_file);
      tensors.extra = read_tensors(checkpoint, extra_file);
    }
    std::shared_ptr<torch::serialize::InputArchive> state;  // the loaders below keep it
    if (checkpoint.files.count(state_name)) {  // format 1, or an optimizer not built in
      const std::string_view bytes = checkpoint.bytes(state_name);
      state = std::make_shared<torch::serialize::InputArchive>();
      state->load_from(bytes.data(), bytes.size(), torch::Device(torch::kCPU));
    }
    std::vector<std::function<void()>> apply;
    std::vector<StatePlan> models;
    for (const auto& [name, model] : parts_.models) {
      models.push_back(name == "model"
                           ? plan_module_state(*model, tensors.model, "", {}, model_file)
                           : plan_module_state(*model, tensors.extra, module_prefix(name), {},
                                               fmt::format("{} (module '{}')", extra_file, name)));
    }
    for (const auto& [name, optimizer] : parts_.optimizers) {
      if (name != "optimizer") {
        throw CheckpointError(fmt::format(
            "it is of format {}, which holds one optimizer; this program registers '{}'", version,
            name));
      }
      const std::string kind = manifest.value("optimizer", "");
      if (kind.empty()) throw CheckpointError("it holds no optimizer state");
      if (kind == "archive" || version < 2) {
        if (!state) throw CheckpointError("it lists no state.pt for its optimizer");
      }
      if (kind == "archive") {
        apply.insert(apply.begin(), archive_loader(*optimizer, checkpoint.bytes(state_name)));
        continue;
      }
      const auto groups = manifest.find("optimizer_groups");
      auto plan = plan_optimizer_state(*optimizer, kind, tensors.optimizer,
                                       groups != manifest.end() ? &*groups : nullptr);
      if (!plan) {
        throw CheckpointError(fmt::format(
            "its optimizer state is of a built-in {} optimizer, not this program's", kind));
      }
      apply.push_back(std::move(*plan));
      if (groups == manifest.end()) {  // format 1: the groups' settings are in the archive
        apply.push_back(format1_groups_loader(*optimizer, state));
      }
    }
    for (auto& model : models)
      apply.push_back([plan = std::move(model)]() mutable { plan.apply(); });
    for (const auto& [name, scheduler] : parts_.schedulers) {
      const auto count = tensors.extra.find(scheduler_step_key);
      if (name != "scheduler" || count == tensors.extra.end()) continue;  // none saved
      const auto value = static_cast<unsigned>(count->second.item<std::int64_t>());
      apply.push_back(
          [scheduler = scheduler, value] { SchedulerStepAccess::step_count(*scheduler) = value; });
    }
    for (const auto& [name, sampler] : parts_.samplers) {  // then kept as a tensor
      const auto stored = tensors.extra.find(tensor_key(name));
      if (stored == tensors.extra.end() || stored->second.numel() != 5 ||
          stored->second.scalar_type() != torch::kInt64) {
        throw CheckpointError(fmt::format("it holds no state of the sampler '{}'", name));
      }
      const auto* v = stored->second.data_ptr<std::int64_t>();
      apply.push_back(sampler_loader(name, sampler,
                                     {{"epoch", v[0]},
                                      {"consumed", v[1]},
                                      {"size", v[2]},
                                      {"seed", static_cast<std::uint64_t>(v[3])},
                                      {"shuffle", v[4] != 0}}));
    }
    apply.push_back(tensors_loader(tensors.extra));
    return apply;
  }

  static std::function<void()> archive_loader(torch::optim::Optimizer& optimizer,
                                              std::string_view bytes) {
    return [&optimizer, bytes] {
      auto state = std::make_shared<torch::serialize::InputArchive>();
      state->load_from(bytes.data(), bytes.size(), torch::Device(torch::kCPU));
      torch::serialize::InputArchive archive;
      state->read("optimizer", archive);
      optimizer.load(archive);
      format1_groups_loader(optimizer, state)();
    };
  }

  // LibTorch's own optimizer load keeps the state but drops each group's settings (lr, ...): they
  // are in the archive beside it.
  static std::function<void()> format1_groups_loader(
      torch::optim::Optimizer& optimizer, std::shared_ptr<torch::serialize::InputArchive> state) {
    return [&optimizer, state] {
      auto& param_groups = optimizer.param_groups();
      for (std::size_t i = 0; i < param_groups.size(); ++i) {
        torch::serialize::InputArchive group;
        if (!state->try_read(fmt::format("optimizer_group/{}", i), group)) {
          throw CheckpointError(fmt::format(
              "it holds the settings of fewer than {} optimizer groups", param_groups.size()));
        }
        param_groups[i].options().serialize(group);
      }
    };
  }

  static std::function<void()> sampler_loader(const std::string& name, const Stateful& sampler,
                                              nlohmann::json state) {
    if (const std::string problem = sampler.check(state); !problem.empty()) {
      throw CheckpointError(fmt::format("sampler '{}': {}", name, problem));
    }
    return [sampler, state = std::move(state)] { sampler.load(state); };
  }

  // options.tensors from "tensors.<name>", checked now, copied in place later.
  std::function<void()> tensors_loader(const TensorMap& extra) const {
    std::vector<std::pair<torch::Tensor, torch::Tensor>> copies;
    for (const auto& [name, tensor] : parts_.tensors) {
      const auto stored = extra.find(tensor_key(name));
      if (stored == extra.end())
        throw CheckpointError(fmt::format("it holds no tensor '{}'", name));
      if (stored->second.sizes() != tensor.sizes()) {
        throw CheckpointError(fmt::format("tensor '{}' is {} in the checkpoint, {} here", name,
                                          c10::str(stored->second.sizes()),
                                          c10::str(tensor.sizes())));
      }
      copies.emplace_back(tensor, stored->second);
    }
    return [copies = std::move(copies)]() mutable {
      torch::NoGradGuard no_grad;
      for (auto& [target, source] : copies) target.copy_(source);
    };
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

  Parts parts_;
  const CheckpointOptions* options_;
  // What the last commit holds: what the next one may link. Shared with the snapshots' commit
  // callbacks (the writer thread's, for a background save).
  std::shared_ptr<IncrementalHistory> history_ = std::make_shared<IncrementalHistory>();
};

}  // namespace detail
}  // namespace torchguard
