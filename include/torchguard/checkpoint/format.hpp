// A checkpoint's files (format 2): its tensors in safetensors files that PyTorch's tools open,
//   model.safetensors      the model's state_dict, under Python's names ("conv1.weight")
//   optimizer.safetensors  a built-in optimizer's per-parameter state: "state.<i>.<field>", i
//                          counting the parameters of every group in order (the keys of
//                          Python's optimizer.state_dict()["state"]), e.g. "state.0.exp_avg"
//   extra.safetensors      "modules.<name>.<key>" (options.modules), "tensors.<name>"
//                          (options.tensors), "rng.cpu", "rng.cuda.<i>", "scheduler.step_count"
//   state.pt               only for an optimizer torchguard does not know: its own serialize()
// and manifest.json with everything else in JSON (step, epoch, metrics, metadata, the optimizer
// groups' settings, each file's size and checksum). The tensors are written straight from their
// memory (or from one reused staging buffer for a background save), hashed as they go.
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
inline constexpr const char* state_name = "state.pt";

inline constexpr const char* cpu_rng_key = "rng.cpu";
inline constexpr const char* scheduler_step_key = "scheduler.step_count";
inline std::string module_prefix(const std::string& name) {
  return fmt::format("modules.{}.", name);
}
inline std::string tensor_key(const std::string& name) { return fmt::format("tensors.{}", name); }
inline std::string cuda_rng_key(int index) { return fmt::format("rng.cuda.{}", index); }
inline std::string optimizer_state_key(const std::string& index, const std::string& field) {
  return fmt::format("state.{}.{}", index, field);
}

// One safetensors file of a snapshot: host tensors (live CPU tensors, or staged copies).
struct TensorFile {
  const char* name;
  std::vector<NamedTensor> tensors;
  SafetensorsMetadata metadata;
};

// A checkpoint's tensors as the loader sees them, whatever the format: views of the mapped files.
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
