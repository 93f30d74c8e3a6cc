// A checkpoint's files (format 4). Its parts are named (CheckpointOptions::models, optimizers,
// ...), and each model or optimizer has a safetensors file that PyTorch's tools open:
//   model.safetensors              the model named "model" (the constructors' model): its
//                                  state_dict, under Python's names ("conv1.weight")
//   model.<name>.safetensors       any other model
//   optimizer.safetensors          a built-in optimizer's per-parameter state, named as Python's
//   optimizer.<name>.safetensors   optimizer.state_dict()["state"] is keyed: "state.<i>.<field>",
//                                  i counting the parameters of every group in order
//   shared.model(.<name>).safetensors  an incremental checkpoint's (incremental.hpp): the
//                                  model's tensors that did not change since an earlier commit,
//                                  often a hard link to that commit's file; the model's state is
//                                  both files together (its manifest record names it
//                                  "shared_file"; a reader merges any part's shared_file)
//   optimizer(.<name>).pt          only for an optimizer torchguard does not know: its serialize()
//   extra.safetensors              "rng.cpu", "rng.cuda.<i>", "tensors.<name>" (options.tensors)
// and manifest.json with everything else in JSON: step, epoch, metrics, metadata, the run's
// settings, whether the run is complete, each optimizer's param_groups as Python's state_dict
// holds them (settings, "params" indices, "param_names"), each scheduler's step count, each
// sampler's state, each file's size and checksum (manifest.hpp), and for a hard-linked file the
// checkpoint it was linked from ("linked_from"). The tensors are written straight from their
// memory (or from one reused staging buffer for a background save), hashed as they go.
//
// Format 3 (read) is format 4 without shared files; format 2 (read): model.safetensors,
// optimizer.safetensors or state.pt, extra.safetensors with "modules.<name>.<key>" and
// "scheduler.step_count"; format 1 (read): format_v1.hpp.
#pragma once

#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <torch/torch.h>

#include "torchguard/checkpoint/manifest.hpp"
#include "torchguard/checkpoint/safetensors.hpp"
#include "torchguard/core/error.hpp"

namespace torchguard {
namespace detail {

inline constexpr const char* model_file = "model.safetensors";
inline constexpr const char* optimizer_file = "optimizer.safetensors";
inline constexpr const char* extra_file = "extra.safetensors";
inline constexpr const char* state_name = "state.pt";  // formats 1 and 2

// The file of each named part (format 3): a part named like its kind keeps the kind's name.
inline std::string model_file_of(const std::string& name) {
  return name == "model" ? std::string(model_file) : fmt::format("model.{}.safetensors", name);
}
inline std::string optimizer_file_of(const std::string& name) {
  return name == "optimizer" ? std::string(optimizer_file)
                             : fmt::format("optimizer.{}.safetensors", name);
}
// The shared file of the model whose own file is `file` (incremental.hpp).
inline std::string shared_file_of(const std::string& file) { return "shared." + file; }
inline std::string optimizer_archive_of(const std::string& name) {
  return name == "optimizer" ? std::string("optimizer.pt") : fmt::format("optimizer.{}.pt", name);
}

inline constexpr const char* cpu_rng_key = "rng.cpu";
inline constexpr const char* scheduler_step_key = "scheduler.step_count";  // format 2
inline std::string module_prefix(const std::string& name) {                // format 2
  return fmt::format("modules.{}.", name);
}
inline std::string tensor_key(const std::string& name) { return fmt::format("tensors.{}", name); }
inline std::string cuda_rng_key(int index) { return fmt::format("rng.cuda.{}", index); }
inline std::string optimizer_state_key(const std::string& index, const std::string& field) {
  return fmt::format("state.{}.{}", index, field);
}

// One safetensors file of a snapshot: host tensors (live CPU tensors, or staged copies).
struct TensorFile {
  std::string name;
  std::vector<NamedTensor> tensors;
  SafetensorsMetadata metadata;
};

// A checkpoint of format 1 or 2 as the loader sees it: the tensors of its three files.
struct CheckpointTensors {
  TensorMap model;
  TensorMap optimizer;
  TensorMap extra;
};

// Serializes an archive through `sink(data, size)`. Torch must never see our I/O errors (its
// stream writer would throw again from a destructor): the first one is kept and rethrown after.
template <class Sink>
void serialize_archive(torch::serialize::OutputArchive& archive, Sink&& sink) {
  std::exception_ptr error;
  archive.save_to([&](const void* data, std::size_t size) -> std::size_t {
    if (!error) {
      try {
        sink(data, size);
      } catch (...) {
        error = std::current_exception();
      }
    }
    return size;
  });
  if (error) std::rethrow_exception(error);
}

inline std::string serialize_to_memory(torch::serialize::OutputArchive& archive) {
  std::string bytes;
  serialize_archive(archive, [&](const void* data, std::size_t size) {
    bytes.append(static_cast<const char*>(data), size);
  });
  return bytes;
}

inline std::unique_ptr<torch::serialize::OutputArchive> new_archive() {
  return std::make_unique<torch::serialize::OutputArchive>(
      std::make_shared<torch::jit::CompilationUnit>());
}

// LRScheduler keeps its step count protected; a derived class may name it.
struct SchedulerStepAccess : torch::optim::LRScheduler {
  static unsigned& step_count(torch::optim::LRScheduler& scheduler) {
    return scheduler.*(&SchedulerStepAccess::step_count_);
  }
};

}  // namespace detail
}  // namespace torchguard
