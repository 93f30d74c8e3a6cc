// checkpoint/safetensors.hpp and checkpoint/safetensors_header.hpp: the format's own rules. Every
// dtype reads back as written; what cannot be stored is refused; broken and truncated files are
// rejected, never read out of bounds; read errors are FileErrors. huggingface/safetensors' own
// test cases are in test_safetensors_reference.cpp.
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

// Every dtype the format names here, empty and 0-d tensors included; the same values as
// tests/safetensors_interop.py's (arange, cast).
std::vector<cp::NamedTensor> every_dtype() {
  std::vector<cp::NamedTensor> tensors;
  const std::vector<std::pair<const char*, c10::ScalarType>> dtypes = {
      {"f32", torch::kFloat32}, {"f16", torch::kFloat16}, {"bf16", torch::kBFloat16},
      {"f64", torch::kFloat64}, {"i64", torch::kInt64},   {"i32", torch::kInt32},
      {"i16", torch::kInt16},   {"i8", torch::kInt8},     {"u8", torch::kUInt8}};
  for (const auto& [name, dtype] : dtypes) {
    tensors.push_back(
        {name, torch::arange(24, torch::kFloat64).div(2).reshape({2, 3, 4}).to(dtype)});
  }
  tensors.push_back({"bool", torch::arange(6).remainder(3).eq(0).reshape({3, 2})});
  tensors.push_back({"empty", torch::zeros({0, 4})});
  tensors.push_back({"scalar", torch::tensor(42, torch::kInt64)});
  return tensors;
}

std::string safetensors_bytes(const std::vector<cp::NamedTensor>& tensors,
                              const torchguard::SafetensorsMetadata& metadata = {}) {
  struct Out {
    std::string bytes;
    void write(const void* data, std::size_t size) {
      bytes.append(static_cast<const char*>(data), size);
    }
  } out;
  cp::write_safetensors(out, tensors, metadata);
  return out.bytes;
}

// A file of a hand-written header and `data_bytes` zero bytes of data.
std::string safetensors_with(const std::string& header, std::size_t data_bytes) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(header.size() >> (8 * i));
  return bytes + header + std::string(data_bytes, '\0');
}

}  // namespace

TEST_CASE("a safetensors file reads back every dtype, shape and name it was written with",
          "[checkpoint][parts][format]") {
  const auto written = every_dtype();
  const std::string bytes = safetensors_bytes(written, {{"format", "pt"}});
  const torchguard::SafetensorsView view(bytes);
  CHECK(view.metadata() == torchguard::SafetensorsMetadata{{"format", "pt"}});
  CHECK(view.size() == written.size());
  for (const auto& item : written) {
    const auto read = view.tensor(item.name);
    REQUIRE(read);
    CHECK(read->scalar_type() == item.tensor.scalar_type());
    CHECK(read->sizes() == item.tensor.sizes());
    CHECK(torch::equal(*read, item.tensor));
  }
  CHECK_FALSE(view.tensor("missing"));
  // The layout of the reference: a little-endian length, a header padded with spaces to 8 bytes,
  // the largest dtypes first.
  std::uint64_t length = 0;
  std::memcpy(&length, bytes.data(), 8);
  CHECK(length % 8 == 0);
  CHECK(bytes.compare(8, 32, R"({"__metadata__":{"format":"pt"},)") == 0);
  CHECK(bytes.find(R"("i64":{"dtype":"I64","shape":[2,3,4],"data_offsets":[0,192]})") !=
        std::string::npos);
}

TEST_CASE("safetensors: what cannot be stored is refused before anything is written",
          "[checkpoint][parts][format]") {
  CHECK_THROWS_AS(safetensors_bytes({{"q", torch::zeros({2}, torch::kComplexDouble)}}),
                  torchguard::SafetensorsError);
  CHECK_THROWS_WITH(safetensors_bytes({{"a", torch::zeros({2})}, {"a", torch::ones({2})}}),
                    Contains("'a' is used twice"));
  TempDir dir;
  std::ofstream(dir.path / "kept.safetensors") << "previous";
  CHECK_THROWS(torchguard::save_safetensors(dir.path / "kept.safetensors",
                                            {{"q", torch::zeros({2}, torch::kComplexDouble)}}));
  CHECK(torchguard::testing::read_text(dir.path / "kept.safetensors") == "previous");
  CHECK(names_in(dir.path) == std::vector<std::string>{"kept.safetensors"});
}

TEST_CASE("safetensors: a file that breaks a rule of the format is rejected by name",
          "[checkpoint][parts][format]") {
  const auto rejects = [](const std::string& bytes, const std::string& why) {
    CAPTURE(why);
    CHECK_THROWS_WITH(torchguard::SafetensorsView(bytes, "f"),
                      Contains("'f' is not a valid safetensors file") && Contains(why));
  };
  const std::string entry = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  CHECK(torchguard::SafetensorsView(safetensors_with("{" + entry + "}", 8)).size() == 1);
  rejects("1234", "fewer than the 8");
  rejects(safetensors_with("{" + entry + "}", 8).substr(0, 20), "runs past the end");
  rejects(safetensors_with("{" + entry + "}", 4), "cover 8 bytes of data, the file holds 4");
  rejects(safetensors_with("{" + entry + "}", 12), "bytes left over");
  // JSON whitespace may pad the header on either side, as the reference (since 0.8) allows.
  CHECK(torchguard::SafetensorsView(safetensors_with(" \n{" + entry + "} ", 8)).size() == 1);
  rejects(safetensors_with("{" + entry + std::string("}\0", 2), 8),
          "a NUL byte after the JSON object");
  rejects(safetensors_with("{" + entry + "," + entry + "}", 8), "names 't' twice");
  rejects(safetensors_with(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
          "tensor 't': data_offsets [0, 8] span 8 bytes; F32 with shape [3] needs 12");
  rejects(safetensors_with(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
          "tensor 't': data_offsets [4, 12] leave a hole");
  rejects(safetensors_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                           R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                           12),
          "tensor 'b': data_offsets [4, 12] overlap 'a'");
  rejects(safetensors_with(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8),
          "end before they begin");
  rejects(safetensors_with(R"({"t":{"dtype":"F99","shape":[2],"data_offsets":[0,8]}})", 8),
          "dtype 'F99' is not one of the format's");
  rejects(safetensors_with(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
          "a dimension is negative");
  rejects(safetensors_with(R"({"t":{"dtype":"F32","shape":[4611686018427387904,4],)"
                           R"("data_offsets":[0,8]}})",
                           8),
          "overflows 64 bits");
  rejects(safetensors_with(R"({"__metadata__":{"n":1}})", 0), "'n' is not a string");
  rejects(safetensors_with(R"({"t":{"dtype":"F32","shape":[2]})", 8), "its header is not valid");
  std::string huge = safetensors_with("{}", 0);
  huge[6] = 1;  // a header length of 2^48
  rejects(huge, "over the format's limit of 100,000,000 bytes");
}

TEST_CASE("safetensors: truncated and corrupted files are rejected, never read out of bounds",
          "[checkpoint][parts][format]") {
  // Run under AddressSanitizer in CI: a read past the bytes would be reported.
  const std::string good = safetensors_bytes(every_dtype(), {{"format", "pt"}});
  std::size_t rejected = 0;
  for (std::size_t size = 0; size < good.size(); ++size) {
    const std::string truncated = good.substr(0, size);  // its own allocation: ASan sees its end
    try {
      torchguard::SafetensorsView view(truncated);
    } catch (const torchguard::SafetensorsError&) {
      ++rejected;
    }
  }
  CHECK(rejected == good.size());  // every truncation
  std::mt19937 random(7);
  for (int i = 0; i < 3000; ++i) {
    std::string damaged = good;
    const std::size_t header_end = 8 + 160;  // mostly the header
    for (int flips = 0; flips < 3; ++flips) {
      damaged[random() % header_end] = static_cast<char>(random());
    }
    try {
      const torchguard::SafetensorsView view(damaged);
      for (const auto& name : view.names()) (void)view.tensor(name)->sum().item<double>();
    } catch (const torchguard::SafetensorsError&) {
    }
  }
}

// Run by the read-error test below in a child under tests/io_faults.c.
TEST_CASE("safetensors child: read a file from a disk that fails", "[.safetensors_eio_child]") {
  const char* path = std::getenv("TORCHGUARD_TEST_FILE");
  if (!path) return;
  try {
    const torchguard::SafetensorsFile file(path);
    (void)file.tensors();
    std::cout << "read without an error" << std::endl;
  } catch (const torchguard::FileError& e) {
    std::cout << "FileError: " << e.what() << std::endl;
  }
}

TEST_CASE("safetensors: a read error or a file cut short while read is a FileError, not SIGBUS",
          "[checkpoint][parts][format][faults]") {
  TempDir dir;
  const fs::path path = dir.path / "t.safetensors";
  torchguard::save_safetensors(path, {{"w", torch::arange(1000, torch::kFloat32)}});
  // Cut short after the header was read: the tensor's bytes are no longer there.
  const torchguard::SafetensorsFile file(path);
  fs::resize_file(path, 200);
  CHECK_THROWS_WITH(file.tensor("w"), Contains(path.string()) && Contains("truncated while read") &&
                                          Contains("before the 4"));
  // The disk fails the read.
  torchguard::save_safetensors(path, {{"w", torch::arange(1000, torch::kFloat32)}});
  const auto child =
      torchguard::testing::run_with_faults("[.safetensors_eio_child]", "pread:t.safetensors:EIO:1",
                                           {"TORCHGUARD_TEST_FILE=" + path.string()});
  INFO(child.output);
  REQUIRE(child.exit_status == 0);
  CHECK_THAT(child.output,
             Contains("io_faults: pread(") &&
                 Contains("FileError: cannot read '" + path.string() + "': Input/output error"));
}

TEST_CASE("interop: Python's safetensors reads what C++ writes, and the reverse, every dtype",
          "[checkpoint][parts][interop]") {
  const std::string python = interop_python("safetensors.torch");
  if (python.empty()) return;  // skipped
  TempDir dir;
  torchguard::TensorMap tensors;
  for (auto& item : every_dtype()) tensors.emplace(item.name, item.tensor);
  torchguard::save_safetensors(dir.path / "cpp.safetensors", tensors, {{"format", "pt"}});
  CHECK(python_side(python, "check-dtypes", dir.path / "cpp.safetensors"));

  REQUIRE(python_side(python, "write-dtypes", dir.path / "python.safetensors"));
  const auto loaded = torchguard::load_safetensors(dir.path / "python.safetensors");
  REQUIRE(loaded.size() == tensors.size());
  for (const auto& [name, tensor] : tensors) {
    CAPTURE(name);
    REQUIRE(loaded.count(name));
    CHECK(loaded.at(name).scalar_type() == tensor.scalar_type());
    CHECK(loaded.at(name).sizes() == tensor.sizes());
    CHECK(torch::equal(loaded.at(name), tensor));
  }
}
