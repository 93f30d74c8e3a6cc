// The huggingface/safetensors test cases that test_safetensors_reference.cpp judges, as data:
// each file's bytes (or the tensors a writer is given) with the reference's verdict, and where
// each case comes from in the reference's repository.
#pragma once

#include "torchguard/checkpoint/safetensors.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <map>
#include <optional>
#include <ostream>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <torch/torch.h>
#include <torch/version.h>
#include <nlohmann/json.hpp>

#include "checkpoint_support.hpp"
#include "torchguard/checkpoint.hpp"
#include "torchguard/checkpoint/format.hpp"

namespace fs = std::filesystem;
namespace cp = torchguard::detail;
using torchguard::RawTensor;
using torchguard::RawTensorMap;
using torchguard::SafetensorsError;
using torchguard::SafetensorsFile;
using torchguard::SafetensorsMetadata;
using torchguard::SafetensorsView;
using torchguard::TensorMap;
using torchguard::detail::NamedTensor;
using torchguard::testing::Contains;
using torchguard::testing::interop_python;
using torchguard::testing::names_in;
using torchguard::testing::python_side;
using torchguard::testing::Run;
using torchguard::testing::TempDir;

namespace {

constexpr const char* tensor_rs = "safetensors/src/tensor.rs";
constexpr const char* test_simple = "bindings/python/tests/test_simple.py";
constexpr const char* test_pt = "bindings/python/tests/test_pt_comparison.py";
constexpr const char* test_pread = "bindings/python/tests/test_pread_backend.py";
constexpr const char* header_rules = "safetensors_header.hpp's rules, judged by the real package";

// The reference's Dtype enum in its declaration order, with bitsize(), and the name LibTorch
// gives its ScalarType for it (c10::toString), where LibTorch has one.
struct FormatDtype {
  const char* name;
  int bits;
  const char* torch_name;
};
constexpr FormatDtype format_dtypes[] = {
    {"BOOL", 8, "Bool"},
    {"F4", 4, "Float4_e2m1fn_x2"},
    {"F6_E2M3", 6, nullptr},
    {"F6_E3M2", 6, nullptr},
    {"U8", 8, "Byte"},
    {"I8", 8, "Char"},
    {"F8_E5M2", 8, "Float8_e5m2"},
    {"F8_E4M3", 8, "Float8_e4m3fn"},
    {"F8_E8M0", 8, "Float8_e8m0fnu"},
    {"F8_E4M3FNUZ", 8, "Float8_e4m3fnuz"},
    {"F8_E5M2FNUZ", 8, "Float8_e5m2fnuz"},
    {"I16", 16, "Short"},
    {"U16", 16, "UInt16"},
    {"F16", 16, "Half"},
    {"BF16", 16, "BFloat16"},
    {"I32", 32, "Int"},
    {"U32", 32, "UInt32"},
    {"F32", 32, "Float"},
    {"C64", 64, "ComplexFloat"},
    {"F64", 64, "Double"},
    {"I64", 64, "Long"},
    {"U64", 64, "UInt64"},
};

// ---- bytes ---------------------------------------------------------------------------------

std::string le64(std::uint64_t n) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<char>(n >> (8 * i));
  return bytes;
}
std::string zeros(std::size_t n) { return std::string(n, '\0'); }
// A file of `header` (its length computed) and `data`.
std::string file_of(const std::string& header, const std::string& data = {}) {
  return le64(header.size()) + header + data;
}
// The byte arrays of tensor.rs's tests.
std::string from_u8(std::initializer_list<int> values) {
  std::string bytes;
  for (const int value : values) bytes += static_cast<char>(value);
  return bytes;
}
std::string f32_bytes(std::initializer_list<float> values) {
  std::string bytes(values.size() * 4, '\0');
  std::memcpy(bytes.data(), values.begin(), bytes.size());
  return bytes;
}
// Shown in failures: printable ASCII as is, other bytes as \xNN.
std::string escaped(const std::string& bytes) {
  std::ostringstream out;
  for (const char c : bytes) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte >= 0x20 && byte < 0x7f && byte != '\\') {
      out << c;
    } else {
      out << "\\x" << std::hex << std::setw(2) << std::setfill('0') << static_cast<int>(byte);
    }
  }
  return out.str();
}
std::string bytes_of(const torch::Tensor& tensor) {
  const auto host = tensor.contiguous().cpu();
  return std::string(static_cast<const char*>(host.data_ptr()), host.nbytes());
}

// ---- cases ---------------------------------------------------------------------------------

// A tensor as a header lists it.
struct Entry {
  std::string name;
  std::string dtype;
  std::vector<std::uint64_t> shape;
  bool operator==(const Entry& other) const {
    return std::tie(name, dtype, shape) == std::tie(other.name, other.dtype, other.shape);
  }
};
std::ostream& operator<<(std::ostream& out, const Entry& entry) {
  out << entry.name << ':' << entry.dtype << '[';
  for (std::size_t i = 0; i < entry.shape.size(); ++i) out << (i ? "," : "") << entry.shape[i];
  return out << ']';
}

// One file and the reference's verdict on it.
struct Case {
  std::string name;    // the reference's test (and which of its files)
  std::string source;  // where the test lives in huggingface/safetensors
  std::string bytes;
  std::uint64_t file_size = 0;  // over bytes.size(): the file goes on as a hole (sparse)
  bool reference_accepts = false;
  std::vector<Entry> tensors;                   // by name, when accepted
  std::optional<SafetensorsMetadata> metadata;  // nullopt: no __metadata__
  std::string reference_error;                  // part of the real package's message
  std::string torchguard_error;                 // part of torchguard's message, naming the rule
  std::string difference;                       // why torchguard refuses what the reference accepts
  bool canonical = false;  // written by a writer: the reference's writer writes these bytes too
  bool torchguard_accepts() const { return reference_accepts && difference.empty(); }
};

Case accepted(std::string name, std::string source, std::string bytes, std::vector<Entry> tensors,
              std::optional<SafetensorsMetadata> metadata = std::nullopt) {
  Case c;
  c.name = std::move(name);
  c.source = std::move(source);
  c.bytes = std::move(bytes);
  c.reference_accepts = true;
  c.tensors = std::move(tensors);
  c.metadata = std::move(metadata);
  return c;
}
Case refused(std::string name, std::string source, std::string bytes, std::string reference_error,
             std::string torchguard_error) {
  Case c;
  c.name = std::move(name);
  c.source = std::move(source);
  c.bytes = std::move(bytes);
  c.reference_error = std::move(reference_error);
  c.torchguard_error = std::move(torchguard_error);
  return c;
}
// The reference accepts, torchguard refuses on purpose.
Case differs(Case c, std::string torchguard_error, std::string why) {
  c.torchguard_error = std::move(torchguard_error);
  c.difference = std::move(why);
  return c;
}

// Tensors to write, and what the file lists.
struct WriterCase {
  std::string name;
  std::string source;
  std::vector<NamedTensor> tensors;
  RawTensorMap raw;
  SafetensorsMetadata metadata;
  std::string expected;  // the reference's bytes, where its test pins them
  std::vector<Entry> entries;
};

std::string written(const std::vector<NamedTensor>& tensors, const RawTensorMap& raw = {},
                    const SafetensorsMetadata& metadata = {}) {
  struct Out {
    std::string bytes;
    void write(const void* data, std::size_t size) {
      bytes.append(static_cast<const char*>(data), size);
    }
  } out;
  torchguard::detail::write_safetensors(out, tensors, metadata, raw);
  return out.bytes;
}
std::string written(const WriterCase& w) { return written(w.tensors, w.raw, w.metadata); }

// What a writer case's file is, as a parse case: accepted, in the writers' layout.
Case parse_case(const WriterCase& w) {
  Case c = accepted(w.name, w.source, written(w), w.entries,
                    w.metadata.empty() ? std::nullopt : std::optional(w.metadata));
  c.canonical = true;
  return c;
}

// A writer case; the reference's bytes may be left empty where its test does not pin them.
WriterCase writer(std::string name, const char* source, std::vector<NamedTensor> tensors,
                  std::string expected, std::vector<Entry> entries,
                  SafetensorsMetadata metadata = {}, RawTensorMap raw = {}) {
  return {std::move(name),     source,
          std::move(tensors),  std::move(raw),
          std::move(metadata), std::move(expected),
          std::move(entries)};
}

torch::Tensor f32(std::initializer_list<float> values, std::vector<std::int64_t> shape) {
  return torch::tensor(std::vector<float>(values)).reshape(shape);
}

// tensor.rs: the reference's writer, byte for byte.
std::vector<WriterCase> tensor_rs_writer_cases() {
  std::vector<WriterCase> cases;
  // clang-format off
  cases.push_back(writer("test_serialization", tensor_rs,
      {{"attn.0", f32({0, 1, 2, 3, 4, 5}, {1, 2, 3})}},
      from_u8({64, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 46, 48, 34, 58, 123, 34, 100,
               116, 121, 112, 101, 34, 58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34,
               58, 91, 49, 44, 50, 44, 51, 93, 44, 34, 100, 97, 116, 97, 95, 111, 102, 102, 115,
               101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 0, 0, 0, 0, 0, 0, 128, 63,
               0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64}),
      {{"attn.0", "F32", {1, 2, 3}}}));
  // F4: two elements to the byte, through RawTensorMap (LibTorch before 2.8 has no F4 tensor).
  cases.push_back(writer("test_serialization_fp4", tensor_rs, {},
      from_u8({64, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 46, 48, 34, 58, 123, 34, 100,
               116, 121, 112, 101, 34, 58, 34, 70, 52, 34, 44, 34, 115, 104, 97, 112, 101, 34, 58,
               91, 49, 44, 50, 93, 44, 34, 100, 97, 116, 97, 95, 111, 102, 102, 115, 101, 116,
               115, 34, 58, 91, 48, 44, 49, 93, 125, 125, 32, 32, 32, 32, 0}),
      {{"attn.0", "F4", {1, 2}}}, {}, {{"attn.0", RawTensor{"F4", {1, 2}, zeros(1)}}}));
  cases.push_back(writer("test_empty", tensor_rs, {},
      from_u8({8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32}), {}));
  cases.push_back(writer("test_empty (with metadata)", tensor_rs, {},
      from_u8({40, 0, 0, 0, 0, 0, 0, 0, 123, 34, 95, 95, 109, 101, 116, 97, 100, 97, 116, 97, 95,
               95, 34, 58, 123, 34, 102, 114, 97, 109, 101, 119, 111, 114, 107, 34, 58, 34, 112,
               116, 34, 125, 125, 32, 32, 32, 32, 32}),
      {}, {{"framework", "pt"}}));
  cases.push_back(writer("test_serialization_forced_alignement", tensor_rs,
      {{"attn0", f32({0, 1, 2, 3, 4, 5}, {1, 1, 2, 3})}},
      from_u8({72, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 48, 34, 58, 123, 34, 100, 116,
               121, 112, 101, 34, 58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34, 58,
               91, 49, 44, 49, 44, 50, 44, 51, 93, 44, 34, 100, 97, 116, 97, 95, 111, 102, 102,
               115, 101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 32, 32, 32, 32, 32,
               32, 32, 0, 0, 0, 0, 0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0,
               160, 64}),
      {{"attn0", "F32", {1, 1, 2, 3}}}));
  // clang-format on
  {  // gpt2_like: GPT-2's names and ranks, every size divided (768 -> 8): cheap, same layout.
    std::vector<std::pair<std::string, std::vector<std::int64_t>>> shapes = {{"wte", {50, 8}},
                                                                             {"wpe", {16, 8}}};
    for (int i = 0; i < 2; ++i) {
      const std::string h = "h." + std::to_string(i);
      shapes.insert(shapes.end(), {{h + ".ln_1.weight", {8}},
                                   {h + ".ln_1.bias", {8}},
                                   {h + ".attn.bias", {1, 1, 16, 16}},
                                   {h + ".attn.c_attn.weight", {8, 24}},
                                   {h + ".attn.c_attn.bias", {24}},
                                   {h + ".attn.c_proj.weight", {8, 8}},
                                   {h + ".attn.c_proj.bias", {8}},
                                   {h + ".ln_2.weight", {8}},
                                   {h + ".ln_2.bias", {8}},
                                   {h + ".mlp.c_fc.weight", {8, 32}},
                                   {h + ".mlp.c_fc.bias", {32}},
                                   {h + ".mlp.c_proj.weight", {32, 8}},
                                   {h + ".mlp.c_proj.bias", {8}}});
    }
    shapes.insert(shapes.end(), {{"ln_f.weight", {8}}, {"ln_f.bias", {8}}});
    WriterCase gpt2 = writer("gpt2_like (2 heads, small sizes)", tensor_rs, {}, {}, {});
    for (const auto& [name, shape] : shapes) {
      gpt2.tensors.push_back({name, torch::zeros(shape)});
      gpt2.entries.push_back({name, "F32", {shape.begin(), shape.end()}});
    }
    std::sort(gpt2.entries.begin(), gpt2.entries.end(),
              [](const Entry& a, const Entry& b) { return a.name < b.name; });
    cases.push_back(std::move(gpt2));
  }
  return cases;
}

// tensor.rs's proptest test_roundtrip (and test_indexing), as 20 seeded cases: 1 to 7 tensors
// named t.N, of the dtypes its arbitrary_dtype() draws, 1 to 7 dimensions of 1 to 7, those that
// are not whole bytes left out; the data counts bytes (x as u8) across the file.
std::vector<WriterCase> random_round_trip_cases() {
  const std::vector<std::string> dtypes = {
      "BOOL", "F4",  "F6_E3M2", "F6_E2M3", "F8_E5M2", "F8_E4M3", "U8",  "I8",  "I16", "U16",
      "I32",  "U32", "I64",     "U64",     "F16",     "BF16",    "F32", "F64", "C64"};
  std::mt19937_64 random(20240613);
  std::vector<WriterCase> cases;
  while (cases.size() < 20) {
    WriterCase w = writer("test_roundtrip (seeded case " + std::to_string(cases.size()) + ")",
                          tensor_rs, {}, {}, {});
    const auto count = 1 + random() % 7;
    std::size_t counter = 0;
    for (std::uint64_t i = 0; i < count; ++i) {
      const std::string dtype = dtypes[random() % dtypes.size()];
      std::vector<std::uint64_t> shape(1 + random() % 7);
      std::uint64_t elements = 1;
      for (auto& dim : shape) elements *= dim = 1 + random() % 7;
      const auto bits = std::find_if(std::begin(format_dtypes), std::end(format_dtypes),
                                     [&](const FormatDtype& d) { return d.name == dtype; })
                            ->bits *
                        elements;
      if (bits % 8 != 0) continue;  // the reference's filter: misaligned slices
      RawTensor raw{dtype, shape, std::string(bits / 8, '\0')};
      for (char& byte : raw.bytes) byte = static_cast<char>(counter++);
      const std::string name = "t." + std::to_string(w.entries.size());
      w.entries.push_back({name, dtype, shape});
      w.raw.emplace(name, std::move(raw));
    }
    if (!w.entries.empty()) cases.push_back(std::move(w));
  }
  return cases;
}

// The Python binding's tests, whose files the package's writer makes (byte for byte where the
// test pins them).
std::vector<WriterCase> python_writer_cases() {
  std::vector<WriterCase> cases;
  const std::string i32_2x2 = R"({"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}})";
  auto i32 = torch::zeros({2, 2}, torch::kInt32);
  cases.push_back(writer("test_serialization (I32 zeros)", test_pt, {{"test", i32.clone()}},
                         le64('@') + i32_2x2 + "    " + zeros(16), {{"test", "I32", {2, 2}}}));
  i32[1][1] = 1;
  cases.push_back(writer("test_serialization (I32, [1, 1] = 1)", test_pt, {{"test", i32}},
                         le64('@') + i32_2x2 + "    " + zeros(12) + from_u8({1, 0, 0, 0}),
                         {{"test", "I32", {2, 2}}}));
  auto bf16 = torch::ones({2, 2}, torch::kBFloat16);
  bf16[0][0] = 2.25;
  cases.push_back(writer("test_serialization (BF16)", test_pt, {{"test", bf16}},
                         le64('@') +
                             R"({"test":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}})" +
                             "    " + from_u8({0x10, '@', 0x80, '?', 0x80, '?', 0x80, '?'}),
                         {{"test", "BF16", {2, 2}}}));
  const std::string c64_2x2 = R"({"test":{"dtype":"C64","shape":[2,2],"data_offsets":[0,32]}})";
  auto c64 = torch::zeros({2, 2}, torch::kComplexFloat);
  cases.push_back(writer("test_complex (zeros)", test_pt, {{"test", c64.clone()}},
                         le64('@') + c64_2x2 + "    " + zeros(32), {{"test", "C64", {2, 2}}}));
  c64[1][1] = c10::complex<float>(-1.0f, 1.0f);
  cases.push_back(writer("test_complex (-1 + 1j)", test_pt, {{"test", c64}},
                         le64('@') + c64_2x2 + "    " + zeros(24) + f32_bytes({-1.0f, 1.0f}),
                         {{"test", "C64", {2, 2}}}));
  cases.push_back(writer("test_in_memory", test_pt, {{"test", torch::zeros({2, 2})}},
                         le64('@') +
                             R"({"test":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})" +
                             "    " + zeros(16),
                         {{"test", "F32", {2, 2}}}));
  cases.push_back(writer("test_serialization_forces_alignment", test_simple,
                         {{"test2", torch::zeros({2, 2}, torch::kFloat16)},
                          {"test1", torch::zeros({2, 2}, torch::kInt32)}},
                         le64(0x80) +
                             R"({"test1":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]},)"
                             R"("test2":{"dtype":"F16","shape":[2,2],"data_offsets":[16,24]}})" +
                             "      " + zeros(24),
                         {{"test1", "I32", {2, 2}}, {"test2", "F16", {2, 2}}}));
  cases.push_back(writer("test_serialization_metadata", test_simple,
                         {{"test1", torch::zeros({2, 2}, torch::kInt32)}},
                         le64('`') +
                             R"({"__metadata__":{"framework":"pt"},)"
                             R"("test1":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}})" +
                             " " + zeros(16),
                         {{"test1", "I32", {2, 2}}}, {{"framework", "pt"}}));
  torch::manual_seed(0);
  cases.push_back(
      writer("test_torch_example", test_simple,
             {{"a", torch::randn({2, 2})}, {"b", torch::randint(0, 128, {2, 3}, torch::kUInt8)}},
             {}, {{"a", "F32", {2, 2}}, {"b", "U8", {2, 3}}}));
  cases.push_back(writer("test_numpy_bool (as a torch tensor)", test_simple,
                         {{"a", torch::tensor(false)}}, {}, {{"a", "BOOL", {}}}));
  auto flags = torch::zeros({2, 2}, torch::kBool);
  flags[0][0] = true;
  cases.push_back(writer("test_odd_dtype", test_pt,
                         {{"test", torch::randn({2, 2}).to(torch::kBFloat16)},
                          {"test2", torch::randn({2, 2}).to(torch::kFloat16)},
                          {"test3", flags},
                          {"test4", torch::zeros({2, 2}, torch::kComplexFloat)}},
                         {},
                         {{"test", "BF16", {2, 2}},
                          {"test2", "F16", {2, 2}},
                          {"test3", "BOOL", {2, 2}},
                          {"test4", "C64", {2, 2}}}));
  cases.push_back(writer("test_zero_sized", test_pt, {{"test", torch::zeros({2, 0})}}, {},
                         {{"test", "F32", {2, 0}}}));
  cases.push_back(writer("test_multiple_zero_sized", test_pt,
                         {{"test", torch::zeros({2, 0})}, {"test2", torch::zeros({2, 0})}}, {},
                         {{"test", "F32", {2, 0}}, {"test2", "F32", {2, 0}}}));
  const auto shared = torch::zeros({10, 10});
  cases.push_back(writer("test_disjoint_tensors_shared_storage", test_pt,
                         {{"test", shared.slice(0, 1)}, {"test2", shared.slice(0, 0, 1)}}, {},
                         {{"test", "F32", {9, 10}}, {"test2", "F32", {1, 10}}}));
  const auto arange = torch::arange(6, torch::kFloat32).reshape({1, 2, 3});
  cases.push_back(writer("test_deserialization_metadata (none)", test_pt, {{"test", arange}}, {},
                         {{"test", "F32", {1, 2, 3}}}));
  cases.push_back(writer("test_deserialization_metadata (Something: more)", test_pt,
                         {{"test", arange}}, {}, {{"test", "F32", {1, 2, 3}}},
                         {{"Something", "more"}}));
  return cases;
}

// test_pread_backend.py's SOURCE_TENSORS with metadata {"foo": "bar"}; its F8_E4M3 tensor (torch
// 2.1 and later) as raw bytes, so that every LibTorch writes the same file.
WriterCase pread_tiny_file() {
  return writer("test_pread_backend setUp (tiny.safetensors)", test_pread,
                {{"fp32_2d", torch::arange(12, torch::kFloat32).reshape({3, 4})},
                 {"bf16_2d", torch::arange(8, torch::kBFloat16).reshape({2, 4})},
                 {"fp16_3d", torch::arange(24, torch::kFloat16).reshape({2, 3, 4})},
                 {"scalar_fp32", torch::tensor(7.5f)},
                 {"empty_2d", torch::empty({0, 5}, torch::kFloat16)},
                 {"i64_1d", torch::arange(5, torch::kInt64)}},
                {},
                {{"bf16_2d", "BF16", {2, 4}},
                 {"empty_2d", "F16", {0, 5}},
                 {"fp16_3d", "F16", {2, 3, 4}},
                 {"fp32_2d", "F32", {3, 4}},
                 {"fp8_e4m3fn", "F8_E4M3", {8}},
                 {"i64_1d", "I64", {5}},
                 {"scalar_fp32", "F32", {}}},
                {{"foo", "bar"}}, {{"fp8_e4m3fn", RawTensor{"F8_E4M3", {8}, zeros(8)}}});
}

std::vector<WriterCase> all_writer_cases() {
  std::vector<WriterCase> cases = tensor_rs_writer_cases();
  for (auto& w : python_writer_cases()) cases.push_back(std::move(w));
  cases.push_back(pread_tiny_file());
  for (auto& w : random_round_trip_cases()) cases.push_back(std::move(w));
  return cases;
}

// tensor.rs's hand-written files.
std::vector<Case> tensor_rs_cases() {
  const std::string i32_2x2 = R"({"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}})";
  std::vector<Case> cases;
  cases.push_back(
      accepted("test_empty_shapes_allowed", tensor_rs,
               le64('8') + R"({"test":{"dtype":"I32","shape":[],"data_offsets":[0,4]}})" + zeros(4),
               {{"test", "I32", {}}}));
  cases.push_back(accepted("test_deserialization (also test_simple.py's)", tensor_rs,
                           le64('<') + i32_2x2 + zeros(16), {{"test", "I32", {2, 2}}}));
  {  // serde_json's HashMetadata: ten tensors over the same 16 bytes.
    std::string header = "{";
    for (int i = 0; i < 10; ++i) {
      header +=
          fmt::format(R"({}"weight_{}":{{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})",
                      i ? "," : "", i);
    }
    cases.push_back(refused("test_json_attack", tensor_rs, file_of(header + "}", zeros(16)),
                            "invalid offset for tensor",
                            "tensor 'weight_1': data_offsets [0, 16] overlap 'weight_0'"));
  }
  cases.push_back(refused("test_metadata_incomplete_buffer (extra bytes)", tensor_rs,
                          le64('<') + i32_2x2 + zeros(16) + "extra_bogus_data_for_polyglot_file",
                          "incomplete metadata, file not fully covered", "bytes left over"));
  cases.push_back(refused("test_metadata_incomplete_buffer (2 bytes missing)", tensor_rs,
                          le64('<') + i32_2x2 + zeros(14),
                          "incomplete metadata, file not fully covered",
                          "cover 16 bytes of data, the file holds 14 (truncated?)"));
  cases.push_back(refused("test_header_too_large", tensor_rs,
                          from_u8({'<', 0, 0, 0, 0, 0xff, 0xff, 0xff}) + i32_2x2 + zeros(16),
                          "header too large", "over the format's limit of 100,000,000 bytes"));
  cases.push_back(refused("test_header_too_small", tensor_rs, "", "header too small",
                          "fewer than the 8 of its header length"));
  cases.push_back(refused("test_invalid_header_length", tensor_rs, le64('<'),
                          "invalid header length", "runs past the end of the file"));
  cases.push_back(refused("test_invalid_header_non_utf8", tensor_rs, le64(1) + "\xff",
                          "invalid UTF-8 in header", "byte 0xff is not UTF-8"));
  cases.push_back(refused("test_invalid_header_not_json", tensor_rs, le64(1) + "{",
                          "invalid JSON in header", "expected a string, at its end"));
  cases.push_back(accepted("test_whitespace_padded_header", tensor_rs, le64(6) + "{}\r \t\n", {}));
  cases.push_back(
      accepted("test_whitespace_leading_padded_header", tensor_rs, le64(6) + "\t\n{}\r ", {}));
  cases.push_back(
      accepted("test_zero_sized_tensor", tensor_rs,
               le64('<') + R"({"test":{"dtype":"I32","shape":[2,0],"data_offsets":[0, 0]}})",
               {{"test", "I32", {2, 0}}}));
  cases.push_back(
      refused("test_invalid_info", tensor_rs,
              le64('<') + R"({"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0, 4]}})",
              "invalid shape, data type, or offset for tensor",
              "span 4 bytes; I32 with shape [2, 2] needs 16"));
  cases.push_back(refused(
      "test_validation_overflow (shape)", tensor_rs,
      le64('O') +
          R"({"test":{"dtype":"I32","shape":[2,18446744073709551614],"data_offsets":[0,16]}})" +
          zeros(16),
      "overflow computing buffer size", "overflows 64 bits"));
  cases.push_back(refused(
      "test_validation_overflow (elements times bits)", tensor_rs,
      le64('N') +
          R"({"test":{"dtype":"I32","shape":[2,9223372036854775807],"data_offsets":[0,16]}})" +
          zeros(16),
      "overflow computing buffer size", "overflows 64 bits"));
  // test_serialization_fp4_misaligned / _invalid refuse a TensorView (see the writer's refusals);
  // the same tensors as a file's header.
  cases.push_back(
      refused("test_serialization_fp4_misaligned (as a header)", tensor_rs,
              file_of(R"({"t":{"dtype":"F4","shape":[1,3],"data_offsets":[0,2]}})", zeros(2)),
              "does not end up at a byte boundary", "not a whole number of bytes"));
  cases.push_back(
      refused("test_serialization_fp4_invalid (as a header)", tensor_rs,
              file_of(R"({"t":{"dtype":"F4","shape":[1,2],"data_offsets":[0,2]}})", zeros(2)),
              "invalid shape, data type, or offset for tensor",
              "span 2 bytes; F4 with shape [1, 2] needs 1"));
  return cases;
}

// The Python binding's hand-written and damaged files.
std::vector<Case> python_cases() {
  std::vector<Case> cases;
  cases.push_back(accepted("test_deserialization_metadata", test_simple,
                           le64('f') +
                               R"({"__metadata__":{"framework":"pt"},)"
                               R"("test1":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}})" +
                               "       " + zeros(16),
                           {{"test1", "I32", {2, 2}}}, SafetensorsMetadata{{"framework", "pt"}}));
  {  // The tiny file, cut after half its header.
    const std::string tiny = written(pread_tiny_file());
    std::uint64_t length = 0;
    std::memcpy(&length, tiny.data(), 8);
    cases.push_back(refused("test_truncated_header_is_rejected", test_pread,
                            tiny.substr(0, 8 + length / 2), "invalid header length",
                            "runs past the end of the file"));
  }
  cases.push_back(
      refused("test_data_offset_overflow_is_rejected", test_pread,
              file_of(R"({"liar":{"dtype":"F32","shape":[1024,1024],"data_offsets":[0,4194304]}})",
                      zeros(1)),
              "incomplete metadata, file not fully covered",
              "cover 4194304 bytes of data, the file holds 1 (truncated?)"));
  return cases;
}

// attacks/safetensors_abuse_attempt_*.py: json.dumps(...) headers, as Python writes them.
std::string abuse_entry(std::size_t i, const char* shape, std::uint64_t size) {
  return fmt::format(R"("weight_{}": {{"dtype": "F32", "shape": [{}], "data_offsets": [0, {}]}})",
                     i, shape, size);
}
std::string abuse_source(int attempt) {
  return fmt::format("attacks/safetensors_abuse_attempt_{}.py", attempt);
}
// `count` tensors over the same bytes, then as many zero bytes as the header has (the script
// reuses its n).
Case abuse(std::string name, int attempt, std::size_t count, const char* shape,
           std::uint64_t size) {
  std::string header = "{";
  for (std::size_t i = 0; i < count; ++i) header += (i ? ", " : "") + abuse_entry(i, shape, size);
  header += "}";
  return refused(std::move(name), abuse_source(attempt), file_of(header, zeros(header.size())),
                 "invalid offset for tensor",
                 fmt::format("tensor 'weight_1': data_offsets [0, {}] overlap 'weight_0'", size));
}

std::vector<Case> attack_cases() {
  std::vector<Case> cases;
  {  // save_file({"weight": zeros(2, 2)}), then a header length of 1000 written over its own.
    std::string bytes = written({{"weight", torch::zeros({2, 2})}});
    bytes.replace(0, 8, le64(1000));
    cases.push_back(refused("safetensors_abuse_attempt_1", abuse_source(1), std::move(bytes),
                            "invalid header length", "runs past the end of the file"));
  }
  {  // 10,000,000 entries: a header of 778,888,890 bytes. The file starts as the script's does
     // and has its size; the rest is a hole, which the length's limit keeps anyone from reading.
    const std::size_t count = 10'000'000;
    std::string start = "{";
    for (std::size_t i = 0; i < 1000; ++i) start += (i ? ", " : "") + abuse_entry(i, "2, 2", 16);
    // Entry i is entry 0 with i's digits for 0's one; ", " between them, braces around.
    const std::uint64_t entry_0 = abuse_entry(0, "2, 2", 16).size();
    std::uint64_t length = 2 + 2 * (count - 1);
    for (std::uint64_t low = 0, high = 10, digits = 1; low < count; low = high, high *= 10) {
      length += (std::min<std::uint64_t>(high, count) - low) * (entry_0 - 1 + digits++);
    }
    Case c = refused("safetensors_abuse_attempt_2", abuse_source(2), le64(length) + start,
                     "header too large",
                     "its header length 778888890 is over the format's limit of 100,000,000");
    c.file_size = 8 + 2 * length;
    cases.push_back(std::move(c));
  }
  cases.push_back(abuse("safetensors_abuse_attempt_2 (100,000 entries)", 2, 100'000, "2, 2", 16));
  cases.push_back(abuse("safetensors_abuse_attempt_3", 3, 100'000, "200, 200", 160'000));
  return cases;
}

// Each rule of safetensors_header.hpp's list, on its edge: the verdicts are the real package's
// (0.8.0), which the [interop] test below re-checks.
std::vector<Case> header_rule_cases() {
  const std::string f32 = R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::string eight = zeros(8);
  // A file of one tensor "t" (the fields as JSON text) and `data` zero bytes.
  const auto t = [](const std::string& dtype, const std::string& shape, const std::string& offsets,
                    std::size_t data) {
    return file_of(fmt::format(R"({{"t":{{"dtype":"{}","shape":{},"data_offsets":{}}}}})", dtype,
                               shape, offsets),
                   zeros(data));
  };
  const auto with_field = [&](const std::string& value) {
    return file_of(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":)" + value + "}}",
                   eight);
  };
  const std::string nested_127 = std::string(125, '[') + std::string(125, ']');  // with 2 objects
  const std::string nested_128 = std::string(126, '[') + std::string(126, ']');
  const std::vector<Entry> t_f32 = {{"t", "F32", {2}}};
  const char* rules = header_rules;
  // clang-format off
  return {
    differs(accepted("a tensor name given twice", rules,
                     file_of("{\"t\":" + f32 + ",\"t\":" + f32 + "}", eight), t_f32),
            "its header names 't' twice",
            "the reference keeps the last; a reader that keeps the first would read another "
            "tensor"),
    differs(accepted("a __metadata__ key given twice", rules,
                     file_of(R"({"__metadata__":{"a":"1","a":"2"}})"), {},
                     SafetensorsMetadata{{"a", "2"}}),
            "__metadata__ names 'a' twice",
            "the reference keeps the last; a reader that keeps the first would read other "
            "metadata"),
    refused("__metadata__ given twice", rules,
            file_of(R"({"__metadata__":{"a":"1"},"__metadata__":{"b":"2"}})"),
            "duplicate field `__metadata__`", "__metadata__ is given twice"),
    accepted("__metadata__ null", rules, file_of(R"({"__metadata__":null})"), {}),
    refused("a __metadata__ value that is not a string", rules,
            file_of(R"({"__metadata__":{"n":1}})"), "expected a string",
            "__metadata__ 'n' is not a string"),
    refused("a tensor called __metadata__", rules,
            file_of("{\"__metadata__\":" + f32 + "}", eight), "expected a string",
            "__metadata__ 'shape' is not a string"),
    refused("a header that is a list", rules, file_of("[]"), "expected struct HashMetadata",
            "the header is not a JSON object"),
    refused("a tensor entry that is a number", rules, file_of(R"({"t":1})"),
            "expected struct TensorInfo", "its entry is not an object"),
    accepted("a field the format does not define (skipped)", rules,
             with_field(R"([{"y":null,"z":-1.5e3}])"), t_f32),
    accepted("containers nested 127 deep", rules, with_field(nested_127), t_f32),
    refused("containers nested 128 deep", rules, with_field(nested_128),
            "recursion limit exceeded", "nested over 127 deep"),
    accepted("an entry as serde's positional list", rules,
             file_of(R"({"t":["F32",[2],[0,8]]})", eight), t_f32),
    refused("a positional entry of 4 fields", rules,
            file_of(R"({"t":["F32",[2],[0,8],1]})", eight), "expected 3 elements in sequence",
            "a list of more than 3 fields"),
    refused("a field given twice", rules,
            file_of(R"({"t":{"dtype":"F32","shape":[2],"shape":[2],"data_offsets":[0,8]}})",
                    eight),
            "duplicate field `shape`", "its field 'shape' is given twice"),
    refused("no data_offsets", rules, file_of(R"({"t":{"dtype":"F32","shape":[2]}})", eight),
            "missing field `data_offsets`", "it has no data_offsets"),
    refused("three data_offsets", rules, t("F32", "[2]", "[0,8,8]", 8),
            "expected 2 elements in sequence", "holds 3 numbers, not 2"),
    refused("a dtype the format lacks", rules, t("F99", "[2]", "[0,8]", 8),
            "unknown variant `F99`", "dtype 'F99' is not one of the format's"),
    refused("a dtype in lower case", rules, t("f32", "[2]", "[0,8]", 8),
            "unknown variant `f32`", "dtype 'f32' is not one of the format's"),
    refused("a negative dimension", rules, t("F32", "[-2]", "[0,8]", 8), "expected usize",
            "a dimension is negative"),
    refused("a dimension with a fraction", rules, t("F32", "[2.0]", "[0,8]", 8),
            "expected usize", "a dimension is not an integer"),
    refused("a dimension with an exponent", rules, t("F32", "[2e0]", "[0,8]", 8),
            "expected usize", "a dimension is not an integer"),
    refused("a dimension of 2^64", rules, t("F32", "[18446744073709551616]", "[0,8]", 8),
            "expected usize", "a dimension does not fit in 64 bits"),
    refused("a number with a leading zero", rules, t("F32", "[02]", "[0,8]", 8),
            "invalid number", "a number has a leading zero"),
    refused("a trailing comma", rules, file_of("{\"t\":" + f32 + ",}", eight), "trailing comma",
            "expected a string"),
    refused("offsets that end before they begin", rules, t("F32", "[0]", "[8,0]", 8),
            "invalid offset for tensor `t`", "data_offsets [8, 0] end before they begin"),
    refused("a hole between tensors", rules,
            file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                    R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})", zeros(20)),
            "invalid offset for tensor `b`", "tensor 'b': data_offsets [12, 20] leave a hole"),
    refused("a NUL byte after the JSON", rules, file_of(std::string("{}\0", 3)),
            "trailing characters", "a NUL byte after the JSON object"),
    refused("a vertical tab after the JSON (not JSON whitespace)", rules, file_of("{}\v"),
            "trailing characters", "byte 0x0b after the JSON object"),
    refused("a byte order mark", rules, file_of("\xef\xbb\xbf{}"), "expected value",
            "the header is not a JSON object"),
    refused("a control character inside a name", rules, file_of("{\"a\tb\":" + f32 + "}", eight),
            "control character", "control characters must be escaped"),
    accepted("escapes in a name", rules, file_of(R"({"a\u0062\n":)" + f32 + "}", eight),
             {{"ab\n", "F32", {2}}}),
    accepted("a surrogate pair in a name", rules,
             file_of(R"({"\ud83d\ude00":)" + f32 + "}", eight), {{"\xf0\x9f\x98\x80", "F32", {2}}}),
    refused("a lone surrogate in a name", rules, file_of(R"({"\ud800":)" + f32 + "}", eight),
            "hex escape", "a \\u escape is a lone leading surrogate"),
    accepted("F6_E2M3: 4 elements in 3 bytes", rules, t("F6_E2M3", "[4]", "[0,3]", 3),
             {{"t", "F6_E2M3", {4}}}),
    refused("F6_E3M2: 3 elements, not whole bytes", rules, t("F6_E3M2", "[3]", "[0,3]", 3),
            "does not end up at a byte boundary", "shape [3] of F6_E3M2 is not a whole number"),
    accepted("F4 with an odd last dimension", rules, t("F4", "[2,3]", "[0,3]", 3),
             {{"t", "F4", {2, 3}}}),
    refused("F4 0-d: one element, half a byte", rules, t("F4", "[]", "[0,0]", 0),
            "does not end up at a byte boundary", "shape [] of F4 is not a whole number"),
  };
  // clang-format on
}

std::vector<Case> all_parse_cases() {
  std::vector<Case> cases;
  for (auto* part : {&tensor_rs_cases, &python_cases, &attack_cases, &header_rule_cases}) {
    for (auto& c : (*part)()) cases.push_back(std::move(c));
  }
  for (const auto& w : all_writer_cases()) cases.push_back(parse_case(w));
  return cases;
}

}  // namespace
