// safetensors files (huggingface/safetensors): the format Python's `safetensors.torch`, the
// Hugging Face Hub and its tools read and write. An 8-byte little-endian header length, a JSON
// header ({"__metadata__": {string: string}, name: {dtype, shape, data_offsets}}, padded with
// spaces to a multiple of 8), then the tensors' bytes, contiguous. The writer orders tensors as
// the reference does (dtype descending, then name), so its files are byte for byte Python's. The
// reader checks every rule of the reference before it hands out a tensor, and never reads past
// the bytes it was given.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "torchguard/core/error.hpp"
#include "torchguard/detail/files.hpp"

namespace torchguard {

// A safetensors file breaks a rule of the format; the message names the file, the tensor and
// the rule.
class SafetensorsError : public Error {
 public:
  using Error::Error;
};

// Tensors by name, as a safetensors file holds them (and as a state_dict names them).
using TensorMap = std::map<std::string, torch::Tensor>;
// A file's `__metadata__`: string keys, string values.
using SafetensorsMetadata = std::map<std::string, std::string>;

namespace detail {

// One tensor to write: on the CPU and contiguous (see host_tensor()).
struct NamedTensor {
  std::string name;
  torch::Tensor tensor;
};

// The tensor as a file stores it: detached, on the CPU, contiguous (a copy only if needed).
inline torch::Tensor host_tensor(const torch::Tensor& tensor) {
  return tensor.detach().to(torch::kCPU).contiguous();
}

struct SafetensorsDtype {
  c10::ScalarType type;
  const char* name;
  int order;  // the reference's Dtype declaration order: files sort by it, descending
};

inline const std::vector<SafetensorsDtype>& safetensors_dtypes() {
  static const std::vector<SafetensorsDtype> dtypes = {
      {torch::kBool, "BOOL", 0},    {torch::kUInt8, "U8", 4},     {torch::kInt8, "I8", 5},
      {torch::kInt16, "I16", 11},   {torch::kFloat16, "F16", 13}, {torch::kBFloat16, "BF16", 14},
      {torch::kInt32, "I32", 15},   {torch::kFloat32, "F32", 17}, {torch::kComplexFloat, "C64", 18},
      {torch::kFloat64, "F64", 19}, {torch::kInt64, "I64", 20}};
  return dtypes;
}

inline const SafetensorsDtype& safetensors_dtype(c10::ScalarType type) {
  for (const auto& dtype : safetensors_dtypes()) {
    if (dtype.type == type) return dtype;
  }
  throw SafetensorsError(fmt::format(
      "safetensors: tensors of dtype {} cannot be stored (supported: BOOL, U8, I8, I16, F16, "
      "BF16, I32, F32, C64, F64, I64)",
      c10::toString(type)));
}

// Writes a safetensors file to `out` (anything with write(data, size)) from host tensors,
// straight from their memory. Throws SafetensorsError for a duplicate name or a dtype the
// format has no name for.
template <class Out>
void write_safetensors(Out& out, const std::vector<NamedTensor>& tensors,
                       const SafetensorsMetadata& metadata = {}) {
  std::vector<const NamedTensor*> order;
  order.reserve(tensors.size());
  for (const auto& item : tensors) order.push_back(&item);
  std::sort(order.begin(), order.end(), [](const NamedTensor* a, const NamedTensor* b) {
    const int da = safetensors_dtype(a->tensor.scalar_type()).order;
    const int db = safetensors_dtype(b->tensor.scalar_type()).order;
    return da != db ? da > db : a->name < b->name;
  });
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < order.size(); ++i) {
    const NamedTensor& item = *order[i];
    if (item.name == "__metadata__" || (i > 0 && order[i - 1]->name == item.name)) {
      throw SafetensorsError(fmt::format("safetensors: the name '{}' is used twice", item.name));
    }
    const auto bytes = static_cast<std::uint64_t>(item.tensor.nbytes());
    header[item.name] = {{"dtype", safetensors_dtype(item.tensor.scalar_type()).name},
                         {"shape", item.tensor.sizes().vec()},
                         {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  unsigned char length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>(text.size() >> (8 * i));
  out.write(length, sizeof length);
  out.write(text.data(), text.size());
  for (const NamedTensor* item : order) {
    out.write(item->tensor.data_ptr(), static_cast<std::size_t>(item->tensor.nbytes()));
  }
}

inline constexpr std::uint64_t safetensors_max_header = 100'000'000;  // the reference's limit

}  // namespace detail

// A safetensors file's tensors, read from bytes held elsewhere (a mapped file): every rule of
// the format is checked on construction, and tensor() returns views into those bytes (valid while
// they are; clone what must outlive them).
class SafetensorsView {
 public:
  // `source` names the bytes in messages (a path). Throws SafetensorsError.
  explicit SafetensorsView(std::string_view bytes, std::string source = "safetensors data")
      : source_(std::move(source)) {
    if (bytes.size() < 8) {
      fail(fmt::format("it has {} bytes, fewer than the 8 of its header length", bytes.size()));
    }
    std::uint64_t length = 0;
    for (int i = 0; i < 8; ++i) {
      length |= static_cast<std::uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
    }
    if (length > detail::safetensors_max_header) {
      fail(fmt::format("its header length {} is over the format's limit of 100 MB", length));
    }
    if (length > bytes.size() - 8) {
      fail(fmt::format("its header length {} runs past the end of the file ({} bytes): truncated?",
                       length, bytes.size()));
    }
    const std::string_view text = bytes.substr(8, length);
    if (text.empty() || text.front() != '{') fail("its header does not start with '{'");
    parse_header(text);
    data_ = bytes.substr(8 + length);
    check_offsets();
  }

  // The tensor called `name` (a view of the bytes), or nullopt.
  std::optional<torch::Tensor> tensor(const std::string& name) const {
    const auto it = entries_.find(name);
    if (it == entries_.end()) return std::nullopt;
    return view(it->second);
  }
  // Every tensor, by name (views of the bytes).
  TensorMap tensors() const {
    TensorMap all;
    for (const auto& [name, entry] : entries_) all.emplace(name, view(entry));
    return all;
  }
  std::vector<std::string> names() const {
    std::vector<std::string> names;
    for (const auto& entry : entries_) names.push_back(entry.first);
    return names;
  }
  const SafetensorsMetadata& metadata() const noexcept { return metadata_; }
  std::size_t size() const noexcept { return entries_.size(); }

 private:
  struct Entry {
    c10::ScalarType dtype;
    std::vector<std::int64_t> shape;
    std::uint64_t begin;
    std::uint64_t end;
  };

  torch::Tensor view(const Entry& e) const {
    return torch::from_blob(const_cast<char*>(data_.data() + e.begin), e.shape,
                            torch::TensorOptions().dtype(e.dtype));
  }

  [[noreturn]] void fail(const std::string& why) const {
    throw SafetensorsError(fmt::format("'{}' is not a valid safetensors file: {}", source_, why));
  }

  void parse_header(std::string_view text) {
    // nlohmann keeps the last of two equal keys; the reference rejects the file, and so do we.
    std::set<std::string> seen;
    std::string duplicate;
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(
          text.begin(), text.end(),
          [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
            if (depth == 1 && event == nlohmann::json::parse_event_t::key &&
                !seen.insert(parsed.get<std::string>()).second && duplicate.empty()) {
              duplicate = parsed.get<std::string>();
            }
            return true;
          });
    } catch (const nlohmann::json::exception& e) {
      fail(fmt::format("its header is not valid JSON ({})", e.what()));
    }
    if (!duplicate.empty()) fail(fmt::format("its header names '{}' twice", duplicate));
    if (!header.is_object()) fail("its header is not a JSON object");
    for (const auto& [name, info] : header.items()) {
      if (name == "__metadata__") {
        if (!info.is_object()) fail("its __metadata__ is not an object");
        for (const auto& [key, value] : info.items()) {
          if (!value.is_string()) {
            fail(fmt::format("__metadata__ '{}' is not a string (the format allows only strings)",
                             key));
          }
          metadata_[key] = value.get<std::string>();
        }
        continue;
      }
      entries_.emplace(name, parse_entry(name, info));
    }
  }

  Entry parse_entry(const std::string& name, const nlohmann::json& info) const {
    auto bad = [&](const std::string& why) { fail(fmt::format("tensor '{}': {}", name, why)); };
    if (!info.is_object()) bad("its entry is not an object");
    const auto dtype = info.find("dtype");
    const auto shape = info.find("shape");
    const auto offsets = info.find("data_offsets");
    if (dtype == info.end() || !dtype->is_string()) bad("no dtype");
    if (shape == info.end() || !shape->is_array()) bad("no shape");
    if (offsets == info.end() || !offsets->is_array() || offsets->size() != 2 ||
        !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
      bad("data_offsets is not a pair of non-negative integers");
    }
    Entry e{};
    const auto dtype_name = dtype->get<std::string>();
    const auto& known = detail::safetensors_dtypes();
    const auto it = std::find_if(known.begin(), known.end(),
                                 [&](const auto& d) { return dtype_name == d.name; });
    if (it == known.end()) bad(fmt::format("dtype '{}' is not supported here", dtype_name));
    e.dtype = it->type;
    // Sizes from the file are multiplied without overflow: a damaged header must not make a
    // view reach past the bytes.
    std::uint64_t expected = c10::elementSize(e.dtype);
    for (const auto& dim : *shape) {
      if (!dim.is_number_unsigned() ||
          dim.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX) ||
          __builtin_mul_overflow(expected, dim.get<std::uint64_t>(), &expected)) {
        bad(fmt::format("shape {} is not a list of sizes that fit in memory", shape->dump()));
      }
      e.shape.push_back(dim.get<std::int64_t>());
    }
    e.begin = (*offsets)[0].get<std::uint64_t>();
    e.end = (*offsets)[1].get<std::uint64_t>();
    if (e.end < e.begin) {
      bad(fmt::format("data_offsets [{}, {}] end before they begin", e.begin, e.end));
    }
    if (e.end - e.begin != expected) {
      bad(fmt::format("data_offsets [{}, {}] span {} bytes; dtype {} with shape {} needs {}",
                      e.begin, e.end, e.end - e.begin, dtype_name, shape->dump(), expected));
    }
    return e;
  }

  // The reference's rule: sorted by offset, the tensors cover the data section exactly, with no
  // hole, no overlap and nothing after the last.
  void check_offsets() const {
    std::vector<std::pair<const std::string*, const Entry*>> sorted;
    for (const auto& [name, entry] : entries_) sorted.emplace_back(&name, &entry);
    std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) {
      return std::make_pair(a.second->begin, a.second->end) <
             std::make_pair(b.second->begin, b.second->end);
    });
    std::uint64_t position = 0;
    const std::string* previous = nullptr;
    for (const auto& [name, entry] : sorted) {
      if (entry->begin != position) {
        const std::string after = previous ? fmt::format("'{}', which ends at", *previous)
                                           : std::string("the start of the data, at");
        fail(fmt::format("tensor '{}': data_offsets [{}, {}] {} {} ({})", *name, entry->begin,
                         entry->end, entry->begin > position ? "leave a hole after" : "overlap",
                         after, position));
      }
      position = entry->end;
      previous = name;
    }
    if (position != data_.size()) {
      fail(fmt::format("its tensors cover {} bytes of data, the file holds {} ({})", position,
                       data_.size(), position > data_.size() ? "truncated?" : "bytes left over"));
    }
  }

  std::string source_;
  std::string_view data_;
  std::map<std::string, Entry> entries_;
  SafetensorsMetadata metadata_;
};

// A safetensors file on disk, mapped read-only and checked: tensor() returns views of the mapping
// (valid while this object lives). Throws FileError, SafetensorsError.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path)
      : file_(std::make_unique<detail::MappedFile>(path)), view_(file_->bytes(), path.string()) {}
  const SafetensorsView& view() const noexcept { return view_; }
  std::optional<torch::Tensor> tensor(const std::string& name) const { return view_.tensor(name); }
  TensorMap tensors() const { return view_.tensors(); }
  const SafetensorsMetadata& metadata() const noexcept { return view_.metadata(); }

 private:
  std::unique_ptr<detail::MappedFile> file_;
  SafetensorsView view_;
};

// Reads a safetensors file into tensors of their own (one copy, from the page cache), as
// Python's safetensors.torch.load_file does. Throws FileError, SafetensorsError.
inline TensorMap load_safetensors(const std::filesystem::path& path) {
  const SafetensorsFile file(path);  // the views below point into its mapping
  TensorMap tensors = file.tensors();
  for (auto& [name, tensor] : tensors) tensor = tensor.clone();
  return tensors;
}

namespace detail {

// Writes `write(out)` to `path` crash-safely: a temporary beside it, fsync, rename over `path`,
// fsync of the directory. A failure leaves `path` as it was. Throws FileError.
template <class Write>
void write_file_atomically(const std::filesystem::path& path, Write&& write) {
  const std::filesystem::path directory =
      path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  const std::filesystem::path temporary =
      directory / fmt::format(".tmp-{}-{}", path.filename().string(), ::getpid());
  try {
    DurableFile out(temporary);
    write(out);
    out.commit();
    if (::rename(temporary.c_str(), path.c_str()) != 0) {
      throw FileError("cannot rename a temporary file to", path, errno);
    }
    fsync_directory(directory);
  } catch (...) {
    std::error_code ignored;
    std::filesystem::remove(temporary, ignored);
    throw;
  }
}

}  // namespace detail

// Writes tensors (on any device; stored from the CPU) to a safetensors file that Python's
// safetensors.torch.load_file reads. Crash-safe: a temporary beside `path` renamed over it, so a
// failure (a full disk) leaves the previous file whole. Throws SafetensorsError, FileError.
inline void save_safetensors(const std::filesystem::path& path, const TensorMap& tensors,
                             const SafetensorsMetadata& metadata = {}) {
  std::vector<detail::NamedTensor> host;
  host.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) host.push_back({name, detail::host_tensor(tensor)});
  detail::write_file_atomically(path,
                                [&](auto& out) { detail::write_safetensors(out, host, metadata); });
}

}  // namespace torchguard
