// The on-disk format: a flat file of named tensors, written straight from tensor memory (a JSON
// header with the name, dtype, shape and offset of each, then the raw bytes, each 64-byte
// aligned; no serializer copy and no per-record CRC: the manifest's XXH3 covers the file), the
// archive (state.pt) helpers, and how a module's tensors are named, checked and loaded.
#pragma once

#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "torchguard/core/error.hpp"
#include "torchguard/detail/files.hpp"

namespace torchguard {
namespace detail {

inline constexpr char tensor_file_magic[8] = {'T', 'G', 'T', 'E', 'N', 'S', 'R', '1'};
inline constexpr std::size_t tensor_file_alignment = 64;

// One tensor to write: on the CPU and contiguous (see host_tensor()).
struct NamedTensor {
  std::string name;
  torch::Tensor tensor;
};

inline const std::vector<std::pair<c10::ScalarType, const char*>>& dtype_names() {
  static const std::vector<std::pair<c10::ScalarType, const char*>> names = {
      {torch::kFloat32, "float32"},
      {torch::kFloat64, "float64"},
      {torch::kFloat16, "float16"},
      {torch::kBFloat16, "bfloat16"},
      {torch::kInt64, "int64"},
      {torch::kInt32, "int32"},
      {torch::kInt16, "int16"},
      {torch::kInt8, "int8"},
      {torch::kUInt8, "uint8"},
      {torch::kBool, "bool"},
      {torch::kComplexFloat, "complex64"},
      {torch::kComplexDouble, "complex128"}};
  return names;
}

inline const char* dtype_name(c10::ScalarType type) {
  for (const auto& [known, name] : dtype_names()) {
    if (known == type) return name;
  }
  throw OptionsError(
      fmt::format("tensors of dtype {} cannot be checkpointed", c10::toString(type)));
}

inline c10::ScalarType dtype_from_name(const std::string& name) {
  for (const auto& [type, known] : dtype_names()) {
    if (name == known) return type;
  }
  throw Error(fmt::format("unknown dtype '{}'", name));
}

// The tensor as the file stores it: detached, on the CPU, contiguous (a copy only if needed).
inline torch::Tensor host_tensor(const torch::Tensor& tensor) {
  return tensor.detach().to(torch::kCPU).contiguous();
}

inline std::size_t align_up(std::size_t value) {
  return (value + tensor_file_alignment - 1) / tensor_file_alignment * tensor_file_alignment;
}

// Writes the tensor file to `out` (a DurableFile, or anything with write(data, size)).
template <class Out>
void write_tensor_file(Out& out, const std::vector<NamedTensor>& tensors) {
  nlohmann::ordered_json entries = nlohmann::ordered_json::array();
  std::size_t offset = 0;
  for (const auto& item : tensors) {
    const auto bytes = static_cast<std::size_t>(item.tensor.nbytes());
    entries.push_back({{"name", item.name},
                       {"dtype", dtype_name(item.tensor.scalar_type())},
                       {"shape", item.tensor.sizes().vec()},
                       {"offset", offset},
                       {"bytes", bytes}});
    offset = align_up(offset + bytes);
  }
  const std::string header = entries.dump();
  const std::uint64_t header_size = header.size();
  out.write(tensor_file_magic, sizeof tensor_file_magic);
  out.write(&header_size, sizeof header_size);
  out.write(header.data(), header.size());
  static const char zeros[tensor_file_alignment] = {};
  const std::size_t prefix = sizeof tensor_file_magic + sizeof header_size + header.size();
  out.write(zeros, align_up(prefix) - prefix);
  std::size_t written = 0;
  for (const auto& item : tensors) {
    const auto bytes = static_cast<std::size_t>(item.tensor.nbytes());
    out.write(item.tensor.data_ptr(), bytes);
    out.write(zeros, align_up(written + bytes) - (written + bytes));
    written = align_up(written + bytes);
  }
}

// Reads the tensors of a file held in memory. get() returns views into that memory: copy what
// must outlive it.
class TensorFileView {
 public:
  explicit TensorFileView(std::string_view bytes) : bytes_(bytes) {
    auto malformed = [](const std::string& why) {
      throw Error(fmt::format("malformed tensor file: {}", why));
    };
    std::uint64_t header_size = 0;
    if (bytes.size() < sizeof tensor_file_magic + sizeof header_size ||
        std::memcmp(bytes.data(), tensor_file_magic, sizeof tensor_file_magic) != 0) {
      malformed("bad magic");
    }
    std::memcpy(&header_size, bytes.data() + sizeof tensor_file_magic, sizeof header_size);
    const std::size_t header_start = sizeof tensor_file_magic + sizeof header_size;
    if (header_size > bytes.size() - header_start) malformed("header past the end");
    const auto header = nlohmann::json::parse(bytes.data() + header_start,
                                              bytes.data() + header_start + header_size);
    data_start_ = align_up(header_start + header_size);
    if (data_start_ > bytes.size()) malformed("header past the end");
    const std::size_t data_size = bytes.size() - data_start_;
    for (const auto& entry : header) {
      const auto name = entry.at("name").get<std::string>();
      Entry e{dtype_from_name(entry.at("dtype").get<std::string>()),
              entry.at("shape").get<std::vector<std::int64_t>>(),
              entry.at("offset").get<std::uint64_t>(), entry.at("bytes").get<std::uint64_t>()};
      // Sizes from the file are checked without overflow: a damaged header must not make a
      // view reach past the mapped bytes.
      std::uint64_t expected = c10::elementSize(e.dtype);
      for (const auto dim : e.shape) {
        if (dim < 0 ||
            __builtin_mul_overflow(expected, static_cast<std::uint64_t>(dim), &expected)) {
          malformed(fmt::format("tensor '{}' has an impossible shape", name));
        }
      }
      if (expected != e.bytes || e.offset > data_size || e.bytes > data_size - e.offset ||
          e.offset % tensor_file_alignment != 0) {
        malformed(fmt::format("tensor '{}' does not fit the file", name));
      }
      entries_.emplace(name, std::move(e));
    }
  }

  std::optional<torch::Tensor> get(const std::string& name) const {
    const auto it = entries_.find(name);
    if (it == entries_.end()) return std::nullopt;
    const Entry& e = it->second;
    return torch::from_blob(const_cast<char*>(bytes_.data() + data_start_ + e.offset), e.shape,
                            torch::TensorOptions().dtype(e.dtype));
  }

  // The names that start with `prefix`, in order.
  std::vector<std::string> names_with_prefix(const std::string& prefix) const {
    std::vector<std::string> names;
    for (auto it = entries_.lower_bound(prefix);
         it != entries_.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
      names.push_back(it->first);
    }
    return names;
  }

 private:
  struct Entry {
    c10::ScalarType dtype;
    std::vector<std::int64_t> shape;
    std::uint64_t offset;
    std::uint64_t bytes;
  };
  std::string_view bytes_;
  std::size_t data_start_ = 0;
  std::map<std::string, Entry> entries_;
};

// A host buffer reused from one background save to the next, so that copying the state out
// of the training loop is a memcpy into memory already mapped, not fresh page faults.
class HostStaging {
 public:
  // Copies `tensors` into the buffer (growing it if needed); the result views the buffer and is
  // valid until the next call.
  std::vector<NamedTensor> stage(const std::vector<NamedTensor>& tensors) {
    std::size_t total = 0;
    for (const auto& item : tensors) total = align_up(total + item.tensor.nbytes());
    if (!buffer_.defined() || static_cast<std::size_t>(buffer_.numel()) < total) {
      buffer_ = torch::empty({static_cast<std::int64_t>(total)}, torch::kUInt8);
    }
    std::vector<NamedTensor> staged;
    staged.reserve(tensors.size());
    std::size_t offset = 0;
    auto* base = static_cast<char*>(buffer_.data_ptr());
    for (const auto& item : tensors) {
      torch::Tensor copy = torch::from_blob(base + offset, item.tensor.sizes(),
                                            torch::TensorOptions().dtype(item.tensor.dtype()));
      copy.copy_(item.tensor.detach());
      staged.push_back({item.name, copy});
      offset = align_up(offset + item.tensor.nbytes());
    }
    return staged;
  }

 private:
  torch::Tensor buffer_;
};

// ---- the checkpoint directory's files ------------------------------------------------------

inline constexpr int checkpoint_format_version = 1;
inline constexpr const char* manifest_name = "manifest.json";
inline constexpr const char* tensors_name = "tensors.bin";
inline constexpr const char* state_name = "state.pt";

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

// A module's parameters and buffers as named tensors under `prefix`.
inline void collect_module_tensors(const torch::nn::Module& module, const std::string& prefix,
                                   std::vector<NamedTensor>& out) {
  for (const auto& parameter : module.named_parameters()) {
    out.push_back({prefix + parameter.key(), parameter.value()});
  }
  for (const auto& buffer : module.named_buffers()) {
    out.push_back({prefix + buffer.key(), buffer.value()});
  }
}

// Checks that the tensors under `prefix` match the module's parameters and buffers one for one
// (names, shapes, dtypes); throws naming the first that does not. Changes nothing.
inline void check_module_tensors(const torch::nn::Module& module, const std::string& prefix,
                                 const TensorFileView& tensors) {
  std::vector<NamedTensor> targets;
  collect_module_tensors(module, prefix, targets);
  for (const auto& target : targets) {
    const auto stored = tensors.get(target.name);
    if (!stored) throw Error(fmt::format("it has no tensor '{}'", target.name));
    if (stored->sizes() != target.tensor.sizes() ||
        stored->scalar_type() != target.tensor.scalar_type()) {
      throw Error(fmt::format("'{}' is {}{} in the checkpoint, {}{} here", target.name,
                              c10::toString(stored->scalar_type()), c10::str(stored->sizes()),
                              c10::toString(target.tensor.scalar_type()),
                              c10::str(target.tensor.sizes())));
    }
  }
  const auto stored = tensors.names_with_prefix(prefix);
  if (stored.size() != targets.size()) {
    throw Error(fmt::format("it has {} tensors under '{}', this module has {}", stored.size(),
                            prefix, targets.size()));
  }
}

// Copies the tensors under `prefix` into the module's parameters and buffers, which keep their
// device. Call check_module_tensors() first.
inline void load_module_tensors(torch::nn::Module& module, const std::string& prefix,
                                const TensorFileView& tensors) {
  torch::NoGradGuard no_grad;
  std::vector<NamedTensor> targets;
  collect_module_tensors(module, prefix, targets);
  for (auto& target : targets) target.tensor.copy_(*tensors.get(target.name));
}

// LRScheduler keeps its step count protected; a derived class may name it.
struct SchedulerStepAccess : torch::optim::LRScheduler {
  static unsigned& step_count(torch::optim::LRScheduler& scheduler) {
    return scheduler.*(&SchedulerStepAccess::step_count_);
  }
};

}  // namespace detail
}  // namespace torchguard
