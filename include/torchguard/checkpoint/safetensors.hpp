// safetensors files (huggingface/safetensors): the format Python's `safetensors.torch`, the
// Hugging Face Hub and its tools read and write. An 8-byte little-endian header length, a JSON
// header ({"__metadata__": {string: string}, name: {dtype, shape, data_offsets}}, padded with
// spaces to a multiple of 8), then the tensors' bytes, contiguous. The header's rules and its
// reader live in safetensors_header.hpp (no LibTorch there); this file maps the format's dtypes
// to LibTorch's and reads and writes tensors.
//
// Every dtype of the format is read: those this LibTorch has (the F8 family from 2.1, U16-U64
// from 2.3, F8_E8M0 and F4 where torch names them) as tensors of that dtype; the others (F6_*,
// or F8 on LibTorch 1.13) are listed by unsupported() and read as raw bytes with raw(), never
// converted. Files are read with pread, never mapped: a read error is a FileError, not SIGBUS.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <torch/torch.h>
#include <torch/version.h>

#include "torchguard/checkpoint/safetensors_header.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/detail/files.hpp"

namespace torchguard {

// Tensors by name, as a safetensors file holds them (and as a state_dict names them).
using TensorMap = std::map<std::string, torch::Tensor>;

// A tensor as the file stores it, for a dtype this LibTorch has no tensors of (F6_E2M3 anywhere;
// F8_E4M3 on LibTorch 1.13; ...): the format's dtype name, the shape the file gives (F4 and F6
// count elements, not bytes) and the little-endian bytes.
struct RawTensor {
  std::string dtype;
  std::vector<std::uint64_t> shape;
  std::string bytes;
};
using RawTensorMap = std::map<std::string, RawTensor>;

namespace detail {

// One tensor to write.
struct NamedTensor {
  std::string name;
  torch::Tensor tensor;
};

// The format's dtypes and LibTorch's, where it has them. Enumerators are looked up in a template
// so that a LibTorch without them still compiles.
#define TORCHGUARD_HAS_SCALAR_TYPE(Name)              \
  template <class E, class = void>                    \
  struct has_scalar_type_##Name : std::false_type {}; \
  template <class E>                                  \
  struct has_scalar_type_##Name<E, std::void_t<decltype(E::Name)>> : std::true_type {};
TORCHGUARD_HAS_SCALAR_TYPE(Float8_e5m2)
TORCHGUARD_HAS_SCALAR_TYPE(Float8_e4m3fn)
TORCHGUARD_HAS_SCALAR_TYPE(Float8_e8m0fnu)
TORCHGUARD_HAS_SCALAR_TYPE(Float8_e4m3fnuz)
TORCHGUARD_HAS_SCALAR_TYPE(Float8_e5m2fnuz)
TORCHGUARD_HAS_SCALAR_TYPE(UInt16)
TORCHGUARD_HAS_SCALAR_TYPE(UInt32)
TORCHGUARD_HAS_SCALAR_TYPE(UInt64)
TORCHGUARD_HAS_SCALAR_TYPE(Float4_e2m1fn_x2)
#undef TORCHGUARD_HAS_SCALAR_TYPE

struct TorchDtype {
  int format;  // index into safetensors_dtype_table
  c10::ScalarType type;
};

template <class E = c10::ScalarType>
std::vector<TorchDtype> make_torch_dtypes() {
  std::vector<TorchDtype> dtypes;
  auto add = [&](const char* name, E type) {
    dtypes.push_back({*safetensors_dtype_index(name), type});
  };
  add("BOOL", E::Bool);
  add("U8", E::Byte);
  add("I8", E::Char);
  add("I16", E::Short);
  add("F16", E::Half);
  add("BF16", E::BFloat16);
  add("I32", E::Int);
  add("F32", E::Float);
  add("C64", E::ComplexFloat);
  add("F64", E::Double);
  add("I64", E::Long);
  if constexpr (has_scalar_type_Float8_e5m2<E>::value) add("F8_E5M2", E::Float8_e5m2);
  if constexpr (has_scalar_type_Float8_e4m3fn<E>::value) add("F8_E4M3", E::Float8_e4m3fn);
  if constexpr (has_scalar_type_Float8_e8m0fnu<E>::value) add("F8_E8M0", E::Float8_e8m0fnu);
  if constexpr (has_scalar_type_Float8_e4m3fnuz<E>::value) {
    add("F8_E4M3FNUZ", E::Float8_e4m3fnuz);
  }
  if constexpr (has_scalar_type_Float8_e5m2fnuz<E>::value) {
    add("F8_E5M2FNUZ", E::Float8_e5m2fnuz);
  }
  if constexpr (has_scalar_type_UInt16<E>::value) add("U16", E::UInt16);
  if constexpr (has_scalar_type_UInt32<E>::value) add("U32", E::UInt32);
  if constexpr (has_scalar_type_UInt64<E>::value) add("U64", E::UInt64);
  if constexpr (has_scalar_type_Float4_e2m1fn_x2<E>::value) add("F4", E::Float4_e2m1fn_x2);
  return dtypes;
}

inline const std::vector<TorchDtype>& torch_dtypes() {
  static const std::vector<TorchDtype> dtypes = make_torch_dtypes();
  return dtypes;
}

// F4 is stored two elements to a byte: torch's float4_e2m1fn_x2 counts bytes, the file elements.
inline bool is_packed_fp4(int format) { return format == *safetensors_dtype_index("F4"); }

inline const char* format_dtype_name(int format) {
  return safetensors_dtype_table[static_cast<std::size_t>(format)].name;
}

// The torch dtype and shape of a stored tensor, or nullopt when this LibTorch cannot hold it
// (no such dtype; a dimension over int64; an F4 row of odd length).
inline std::optional<std::pair<c10::ScalarType, std::vector<std::int64_t>>> torch_form(
    const SafetensorsEntry& entry) {
  const auto& dtypes = torch_dtypes();
  const auto it = std::find_if(dtypes.begin(), dtypes.end(),
                               [&](const TorchDtype& d) { return d.format == entry.dtype; });
  if (it == dtypes.end()) return std::nullopt;
  std::vector<std::int64_t> shape;
  for (const std::uint64_t dim : entry.shape) {
    if (dim > static_cast<std::uint64_t>(INT64_MAX)) return std::nullopt;
    shape.push_back(static_cast<std::int64_t>(dim));
  }
  if (is_packed_fp4(entry.dtype)) {
    if (shape.empty() || shape.back() % 2 != 0) return std::nullopt;
    shape.back() /= 2;
  }
  return std::make_pair(it->type, std::move(shape));
}

// The tensor as a file stores it: detached, on the CPU, contiguous (a copy only if needed).
// Throws SafetensorsError, naming it, for a tensor the format cannot hold.
inline torch::Tensor host_tensor(const std::string& name, const torch::Tensor& tensor) {
  auto refuse = [&](const std::string& why) {
    throw SafetensorsError(fmt::format("safetensors: cannot store tensor '{}': {}", name, why));
  };
  if (!tensor.defined()) refuse("it is undefined");
  if (tensor.layout() != torch::kStrided) {
    refuse(fmt::format("its layout is {}; the format holds dense tensors (to_dense() first)",
                       c10::str(tensor.layout())));
  }
  if (tensor.is_meta()) refuse("it is on the meta device and has no data");
  if (tensor.is_quantized()) refuse("it is quantized; the format holds plain dtypes");
  return tensor.detach().to(torch::kCPU).contiguous();
}

// What the header writer needs of a host tensor. Throws SafetensorsError.
inline SafetensorsOutput output_of(const std::string& name, const torch::Tensor& tensor) {
  const auto& dtypes = torch_dtypes();
  const auto it = std::find_if(dtypes.begin(), dtypes.end(),
                               [&](const TorchDtype& d) { return d.type == tensor.scalar_type(); });
  if (it == dtypes.end()) {
    throw SafetensorsError(
        fmt::format("safetensors: cannot store tensor '{}': the format has no dtype for {}", name,
                    c10::toString(tensor.scalar_type())));
  }
  SafetensorsOutput out{
      name, it->format, {}, tensor.data_ptr(), static_cast<std::uint64_t>(tensor.nbytes())};
  for (const auto dim : tensor.sizes()) out.shape.push_back(static_cast<std::uint64_t>(dim));
  if (is_packed_fp4(it->format)) {
    if (out.shape.empty()) {
      throw SafetensorsError(fmt::format(
          "safetensors: cannot store tensor '{}': a 0-d float4_e2m1fn_x2 holds two elements, "
          "which the format's shape cannot say",
          name));
    }
    out.shape.back() *= 2;
  }
  return out;
}

// A file ready to write: its header (checked) and each tensor's bytes, in the file's order.
struct PreparedSafetensors {
  std::string header;
  std::vector<SafetensorsOutput> tensors;  // point into the caller's tensors
};

// Checks everything a file needs before its first byte goes out. Throws SafetensorsError for a
// name twice, a tensor the format cannot hold, a header over the format's limit.
inline PreparedSafetensors prepare_safetensors(const std::vector<NamedTensor>& tensors,
                                               const SafetensorsMetadata& metadata = {},
                                               const RawTensorMap& raw = {}) {
  PreparedSafetensors prepared;
  prepared.tensors.reserve(tensors.size() + raw.size());
  for (const auto& item : tensors) prepared.tensors.push_back(output_of(item.name, item.tensor));
  for (const auto& [name, tensor] : raw) {
    const auto dtype = safetensors_dtype_index(tensor.dtype);
    if (!dtype) {
      throw SafetensorsError(fmt::format(
          "safetensors: cannot store tensor '{}': '{}' is not one of the format's dtypes", name,
          tensor.dtype));
    }
    prepared.tensors.push_back(
        {name, *dtype, tensor.shape, tensor.bytes.data(), tensor.bytes.size()});
  }
  prepared.header = safetensors_header_bytes(prepared.tensors, metadata);
  return prepared;
}

template <class Out>
void write_prepared(Out& out, const PreparedSafetensors& prepared) {
  out.write(prepared.header.data(), prepared.header.size());
  for (const auto& item : prepared.tensors) {
    out.write(item.data, static_cast<std::size_t>(item.size));
  }
}

// Writes a safetensors file to `out` (anything with write(data, size)) from host tensors (and raw
// ones), straight from their memory; nothing is written when a check fails.
template <class Out>
void write_safetensors(Out& out, const std::vector<NamedTensor>& tensors,
                       const SafetensorsMetadata& metadata = {}, const RawTensorMap& raw = {}) {
  write_prepared(out, prepare_safetensors(tensors, metadata, raw));
}

// A checked header and its tensors by name; the bytes come from memory or a file.
class SafetensorsIndex {
 public:
  SafetensorsIndex() = default;
  SafetensorsIndex(SafetensorsHeader header, std::string source)
      : header_(std::move(header)), source_(std::move(source)) {}

  const SafetensorsEntry* find(const std::string& name) const {
    const auto& by_name = header_.by_name;
    const auto it = std::lower_bound(by_name.begin(), by_name.end(), name,
                                     [&](std::size_t index, const std::string& key) {
                                       return header_.entries[index].name < key;
                                     });
    if (it == by_name.end() || header_.entries[*it].name != name) return nullptr;
    return &header_.entries[*it];
  }
  std::vector<std::string> names() const {
    std::vector<std::string> names;
    names.reserve(header_.by_name.size());
    for (const std::size_t index : header_.by_name) names.push_back(header_.entries[index].name);
    return names;
  }
  std::vector<std::string> unsupported() const {
    std::vector<std::string> names;
    for (const std::size_t index : header_.by_name) {
      if (!torch_form(header_.entries[index])) names.push_back(header_.entries[index].name);
    }
    return names;
  }
  const SafetensorsHeader& header() const noexcept { return header_; }
  const std::string& source() const noexcept { return source_; }

  // The torch form of `entry`, or a SafetensorsError that says why there is none and what to do.
  std::pair<c10::ScalarType, std::vector<std::int64_t>> require_torch_form(
      const SafetensorsEntry& entry) const {
    if (auto form = torch_form(entry)) return std::move(*form);
    throw SafetensorsError(fmt::format(
        "'{}': tensor '{}' is {} of shape [{}], which LibTorch {} has no tensor for; read its "
        "bytes with raw(\"{}\")",
        source_, entry.name, format_dtype_name(entry.dtype), fmt::join(entry.shape, ", "),
        TORCH_VERSION, entry.name));
  }

 private:
  SafetensorsHeader header_;
  std::string source_;
};

}  // namespace detail

// A safetensors file's tensors, read from bytes held elsewhere (a file read into memory): every
// rule of the format is checked on construction, and tensor() returns views into those bytes
// (valid while they are; clone what must outlive them).
class SafetensorsView {
 public:
  // `source` names the bytes in messages (a path). Throws SafetensorsError.
  explicit SafetensorsView(std::string_view bytes, std::string source = "safetensors data") {
    const std::uint64_t length = detail::safetensors_header_length(bytes, bytes.size(), source);
    auto header = detail::parse_safetensors_header(bytes.substr(8, length), bytes.size(), source);
    data_ = bytes.substr(static_cast<std::size_t>(header.data_offset));
    index_ = detail::SafetensorsIndex(std::move(header), std::move(source));
  }

  // The tensor called `name` (a view of the bytes; a copy where they are not aligned for its
  // dtype), or nullopt. Throws SafetensorsError for a tensor this LibTorch cannot hold.
  std::optional<torch::Tensor> tensor(const std::string& name) const {
    const auto* entry = index_.find(name);
    if (!entry) return std::nullopt;
    return view(*entry);
  }
  // Every tensor this LibTorch can hold, by name (views of the bytes); unsupported() lists the
  // others.
  TensorMap tensors() const {
    TensorMap all;
    for (const auto& entry : index_.header().entries) {
      if (detail::torch_form(entry)) all.emplace(entry.name, view(entry));
    }
    return all;
  }
  // The names of the tensors this LibTorch has no dtype for: read them with raw().
  std::vector<std::string> unsupported() const { return index_.unsupported(); }
  // Any tensor as the file stores it, or nullopt.
  std::optional<RawTensor> raw(const std::string& name) const {
    const auto* entry = index_.find(name);
    if (!entry) return std::nullopt;
    return RawTensor{detail::format_dtype_name(entry->dtype), entry->shape,
                     std::string(bytes_of(*entry))};
  }
  // Every tensor's name, sorted.
  std::vector<std::string> names() const { return index_.names(); }
  const SafetensorsMetadata& metadata() const noexcept { return index_.header().metadata; }
  std::size_t size() const noexcept { return index_.header().entries.size(); }

 private:
  std::string_view bytes_of(const detail::SafetensorsEntry& entry) const {
    return data_.substr(static_cast<std::size_t>(entry.begin),
                        static_cast<std::size_t>(entry.end - entry.begin));
  }
  torch::Tensor view(const detail::SafetensorsEntry& entry) const {
    const auto [dtype, shape] = index_.require_torch_form(entry);
    const auto options = torch::TensorOptions().dtype(dtype);
    const std::string_view bytes = bytes_of(entry);
    if (bytes.empty()) return torch::empty(shape, options);
    if (reinterpret_cast<std::uintptr_t>(bytes.data()) % c10::elementSize(dtype) != 0) {
      auto copy = torch::empty(shape, options);
      std::memcpy(copy.data_ptr(), bytes.data(), bytes.size());
      return copy;
    }
    return torch::from_blob(const_cast<char*>(bytes.data()), shape, options);
  }

  std::string_view data_;
  detail::SafetensorsIndex index_;
};

// A safetensors file on disk: its header read and checked on construction, each tensor read
// (with pread) when asked for, into a tensor of its own. Throws FileError, SafetensorsError.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path)
      : file_(std::make_unique<detail::InputFile>(path)) {
    const std::string source = path.string();
    char prefix[8] = {};
    if (file_->size() >= 8) file_->read(0, prefix, 8);
    const std::uint64_t length =
        detail::safetensors_header_length({prefix, 8}, file_->size(), source);
    std::string text(static_cast<std::size_t>(length), '\0');
    file_->read(8, text.data(), text.size());
    index_ = detail::SafetensorsIndex(detail::parse_safetensors_header(text, file_->size(), source),
                                      source);
  }

  // The tensor called `name`, read now, or nullopt. Throws SafetensorsError for a tensor this
  // LibTorch cannot hold.
  std::optional<torch::Tensor> tensor(const std::string& name) const {
    const auto* entry = index_.find(name);
    if (!entry) return std::nullopt;
    return read(*entry);
  }
  // Every tensor this LibTorch can hold, read now; unsupported() lists the others.
  TensorMap tensors() const {
    TensorMap all;
    for (const auto& entry : index_.header().entries) {
      if (detail::torch_form(entry)) all.emplace(entry.name, read(entry));
    }
    return all;
  }
  std::vector<std::string> unsupported() const { return index_.unsupported(); }
  std::optional<RawTensor> raw(const std::string& name) const {
    const auto* entry = index_.find(name);
    if (!entry) return std::nullopt;
    RawTensor raw{detail::format_dtype_name(entry->dtype), entry->shape,
                  std::string(static_cast<std::size_t>(entry->end - entry->begin), '\0')};
    file_->read(index_.header().data_offset + entry->begin, raw.bytes.data(), raw.bytes.size());
    return raw;
  }
  std::vector<std::string> names() const { return index_.names(); }
  const SafetensorsMetadata& metadata() const noexcept { return index_.header().metadata; }
  std::size_t size() const noexcept { return index_.header().entries.size(); }

 private:
  torch::Tensor read(const detail::SafetensorsEntry& entry) const {
    const auto [dtype, shape] = index_.require_torch_form(entry);
    auto tensor = torch::empty(shape, torch::TensorOptions().dtype(dtype));
    const auto size = static_cast<std::size_t>(entry.end - entry.begin);
    if (size > 0) file_->read(index_.header().data_offset + entry.begin, tensor.data_ptr(), size);
    return tensor;
  }

  std::unique_ptr<detail::InputFile> file_;
  detail::SafetensorsIndex index_;
};

// Reads a safetensors file into tensors of their own, as Python's safetensors.torch.load_file
// does. A tensor this LibTorch has no dtype for is an error that names it (SafetensorsFile reads
// the others, and raw() its bytes). Throws FileError, SafetensorsError.
inline TensorMap load_safetensors(const std::filesystem::path& path) {
  const SafetensorsFile file(path);
  const auto unsupported = file.unsupported();
  if (!unsupported.empty()) {
    throw SafetensorsError(
        fmt::format("'{}': LibTorch {} has no tensor for {} of its tensors ('{}'{}); open it with "
                    "SafetensorsFile to read the others, and those with raw()",
                    path.string(), TORCH_VERSION, unsupported.size(), unsupported.front(),
                    unsupported.size() > 1 ? ", ..." : ""));
  }
  return file.tensors();
}

namespace detail {

// Host copies of `tensors`, each checked (a sparse or meta tensor is refused by name).
inline std::vector<NamedTensor> host_tensors(const TensorMap& tensors) {
  std::vector<NamedTensor> host;
  host.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) host.push_back({name, host_tensor(name, tensor)});
  return host;
}

}  // namespace detail

// Writes tensors (on any device; stored from the CPU), and raw ones (read with raw()), to a
// safetensors file that Python's safetensors.torch.load_file reads. Crash-safe: a temporary
// beside `path` renamed over it, so a failure (a full disk) leaves the previous file whole.
// Throws SafetensorsError (before anything is written), FileError.
inline void save_safetensors(const std::filesystem::path& path, const TensorMap& tensors,
                             const SafetensorsMetadata& metadata = {},
                             const RawTensorMap& raw = {}) {
  const auto host = detail::host_tensors(tensors);
  const auto prepared = detail::prepare_safetensors(host, metadata, raw);  // before any file
  detail::write_file_atomically(path, [&](auto& out) { detail::write_prepared(out, prepared); });
}

}  // namespace torchguard
