// The parts of CheckpointGuard, each on its own: the file format, the commit protocol, retention,
// verification and quarantine, the captured state, the background writer.
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "support.hpp"
#include "torchguard/checkpoint.hpp"
#include "torchguard/checkpoint/commit.hpp"
#include "torchguard/checkpoint/format.hpp"
#include "torchguard/checkpoint/guard.hpp"
#include "torchguard/checkpoint/restore.hpp"
#include "torchguard/checkpoint/retention.hpp"
#include "torchguard/checkpoint/state.hpp"
#include "torchguard/checkpoint/writer.hpp"
#include "torchguard/data/resumable_sampler.hpp"

namespace fs = std::filesystem;
namespace cp = torchguard::detail;
using torchguard::CheckpointError;
using torchguard::CheckpointInfo;
using torchguard::CheckpointOptions;
using torchguard::testing::CapturedLogger;
using torchguard::testing::Contains;
using torchguard::testing::interop_python;
using torchguard::testing::TempDir;

namespace {

cp::Snapshot small_snapshot(std::uint64_t sequence, std::int64_t step) {
  cp::Snapshot snapshot;
  snapshot.sequence = sequence;
  snapshot.step = step;
  snapshot.epoch = 1;
  snapshot.metrics = {{"loss", 0.25}};
  snapshot.parts["models"]["model"] = {{"file", cp::model_file}};
  snapshot.parts["optimizers"]["optimizer"] = {
      {"kind", "archive"}, {"file", "optimizer.pt"}, {"param_groups", nlohmann::json::array()}};
  snapshot.files.push_back(
      {cp::model_file,
       {{"w", torch::arange(10, torch::kFloat32)}, {"b", torch::tensor({true, false, true})}},
       {{"format", "pt"}}});
  snapshot.files.push_back(
      {cp::extra_file, {{cp::cpu_rng_key, torch::zeros({4}, torch::kUInt8)}}, {}});
  snapshot.archives.push_back({"optimizer.pt", nullptr, "state bytes"});
  return snapshot;
}

fs::path commit(const fs::path& dir, std::uint64_t sequence, std::int64_t step) {
  auto snapshot = small_snapshot(sequence, step);
  cp::write_checkpoint(dir, snapshot);
  return dir / cp::checkpoint_name(sequence, step);
}

std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) {
    names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

// ---- format: safetensors ----------------------------------------------------------------

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

TEST_CASE("save_state_dict / load_state_dict: Python's names, crash-safe, checked as Python does",
          "[checkpoint][parts][format]") {
  TempDir dir;
  torch::nn::Sequential saved(torch::nn::Linear(4, 3), torch::nn::BatchNorm1d(3));
  const fs::path path = dir.path / "model.safetensors";
  torchguard::save_state_dict(*saved, path, {{"note", "test"}});
  const torchguard::SafetensorsFile file(path);
  CHECK(file.metadata() == torchguard::SafetensorsMetadata{{"format", "pt"}, {"note", "test"}});
  CHECK(file.names() == std::vector<std::string>{"0.bias", "0.weight", "1.bias",
                                                 "1.num_batches_tracked", "1.running_mean",
                                                 "1.running_var", "1.weight"});

  torch::nn::Sequential same(torch::nn::Linear(4, 3), torch::nn::BatchNorm1d(3));
  const auto result = torchguard::load_state_dict(*same, path);
  CHECK(result.missing_keys.empty());
  CHECK(torch::equal(same[0]->as<torch::nn::Linear>()->weight,
                     saved[0]->as<torch::nn::Linear>()->weight));

  // Everything wrong, in one error; nothing loaded.
  torch::nn::Sequential other(torch::nn::Linear(5, 3), torch::nn::Linear(3, 3));
  const auto before = other[0]->as<torch::nn::Linear>()->bias.clone();
  try {
    torchguard::load_state_dict(*other, path);
    FAIL("no error");
  } catch (const torchguard::StateDictError& e) {
    CHECK(e.missing_keys().empty());
    CHECK(e.unexpected_keys() ==
          std::vector<std::string>{"1.num_batches_tracked", "1.running_mean", "1.running_var"});
    CHECK(e.mismatches() ==
          std::vector<std::string>{
              fmt::format("0.weight: shape [3, 4] in '{}', [3, 5] in the module", path.string()),
              fmt::format("1.weight: shape [3] in '{}', [3, 3] in the module", path.string())});
    CHECK_THAT(std::string(e.what()), Contains("unexpected keys: '1.num_batches_tracked'"));
  }
  CHECK(torch::equal(other[0]->as<torch::nn::Linear>()->bias, before));

  // Non-strict: loads what matches, returns the rest; a dtype differs only on request.
  torch::nn::Sequential smaller(torch::nn::Linear(4, 3));
  const auto partial =
      torchguard::load_state_dict(*smaller, path, torchguard::LoadStateDictOptions{false, false});
  CHECK(partial.unexpected_keys.size() == 5);
  CHECK(torch::equal(smaller[0]->as<torch::nn::Linear>()->bias,
                     saved[0]->as<torch::nn::Linear>()->bias));
  torch::nn::Sequential doubles(torch::nn::Linear(4, 3));
  doubles->to(torch::kFloat64);
  CHECK_THROWS_WITH(
      torchguard::load_state_dict(*doubles, path, torchguard::LoadStateDictOptions{false, false}),
      Contains("0.weight: dtype Float in") && Contains("Double in the module"));
  torchguard::load_state_dict(*doubles, path, torchguard::LoadStateDictOptions{false, true});
  CHECK(torch::allclose(doubles[0]->as<torch::nn::Linear>()->weight.to(torch::kFloat32),
                        saved[0]->as<torch::nn::Linear>()->weight));
  CHECK_THROWS_AS(torchguard::load_state_dict(*same, dir.path / "missing.safetensors"),
                  torchguard::FileError);
}

// ---- interop: the real safetensors package ------------------------------------------------
// tests/safetensors_interop.py runs with the Python of scripts/setup.sh --torch2's venv (or
// $TORCHGUARD_PYTHON); without one that imports safetensors, these tests skip.

namespace {

// Runs tests/safetensors_interop.py; true when it succeeds.
bool python_side(const std::string& python, const std::string& command, const fs::path& target) {
  const std::string line = fmt::format("{} {}/safetensors_interop.py {} '{}'", python,
                                       TORCHGUARD_TESTS_DIR, command, target.string());
  return std::system(line.c_str()) == 0;
}

struct SmallNetImpl : torch::nn::Module {  // Small in tests/safetensors_interop.py
  SmallNetImpl()
      : conv(register_module("conv",
                             torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 4, 3).padding(1)))),
        bn(register_module("bn", torch::nn::BatchNorm2d(4))),
        fc(register_module("fc", torch::nn::Linear(4 * 5 * 5, 3))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return fc->forward(torch::relu(bn->forward(conv->forward(x))).flatten(1));
  }
  torch::nn::Conv2d conv;
  torch::nn::BatchNorm2d bn;
  torch::nn::Linear fc;
};
TORCH_MODULE(SmallNet);

}  // namespace

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

TEST_CASE("interop: a module trained in Python gives the same outputs in C++, and back",
          "[checkpoint][parts][interop]") {
  const std::string python = interop_python("safetensors.torch");
  if (python.empty()) return;  // skipped
  TempDir dir;
  REQUIRE(python_side(python, "train", dir.path));
  SmallNet from_python;
  torchguard::load_state_dict(*from_python, dir.path / "python_model.safetensors");
  from_python->eval();
  const auto io = torchguard::load_safetensors(dir.path / "python_io.safetensors");
  {
    torch::NoGradGuard no_grad;
    const auto outputs = from_python->forward(io.at("inputs"));
    CHECK(torch::allclose(outputs, io.at("outputs"), 1e-5, 1e-6));
  }
  CHECK(from_python->bn->num_batches_tracked.item<std::int64_t>() == 5);

  torch::manual_seed(1);
  SmallNet model;
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  for (int step = 0; step < 5; ++step) {
    const auto x = torch::randn({8, 2, 5, 5});
    const auto loss = (model->forward(x) - x.mean({1, 2, 3}).unsqueeze(1)).pow(2).mean();
    sgd.zero_grad();
    loss.backward();
    sgd.step();
  }
  model->eval();
  const auto inputs = torch::randn({6, 2, 5, 5});
  torch::Tensor outputs;
  {
    torch::NoGradGuard no_grad;
    outputs = model->forward(inputs);
  }
  torchguard::save_state_dict(*model, dir.path / "cpp_model.safetensors");
  torchguard::save_safetensors(dir.path / "cpp_io.safetensors",
                               {{"inputs", inputs}, {"outputs", outputs}});
  CHECK(python_side(python, "check-trained", dir.path));
}

// ---- commit ------------------------------------------------------------------------------

TEST_CASE("checkpoint names parse back to their sequence number", "[checkpoint][parts][commit]") {
  CHECK(cp::parse_sequence(cp::checkpoint_name(42, 1200)) == 42u);
  CHECK(cp::checkpoint_name(42, 1200) == "ckpt-000042-step-1200");
  CHECK_FALSE(cp::parse_sequence("ckpt--step-1"));
  CHECK_FALSE(cp::parse_sequence("ckpt-12-stop-1"));
  CHECK_FALSE(cp::parse_sequence("ckpt-1234567890123456789-step-1"));  // 19 digits
  CHECK_FALSE(cp::parse_sequence(".tmp-ckpt-000001-step-1-99"));
}

TEST_CASE("a commit leaves one directory whose manifest describes every file",
          "[checkpoint][parts][commit]") {
  TempDir dir;
  const fs::path path = commit(dir.path, 3, 7);
  CHECK(names_in(dir.path) == std::vector<std::string>{"ckpt-000003-step-7"});
  CHECK(names_in(path) == std::vector<std::string>{"extra.safetensors", "manifest.json",
                                                   "model.safetensors", "optimizer.pt"});
  const auto manifest =
      nlohmann::json::parse(torchguard::testing::read_text(path / "manifest.json"));
  CHECK(manifest["format_version"] == cp::checkpoint_format_version);
  CHECK(manifest["sequence"] == 3);
  CHECK(manifest["step"] == 7);
  CHECK(manifest["epoch"] == 1);
  CHECK(manifest["metrics"]["loss"] == 0.25);
  CHECK(manifest["optimizers"]["optimizer"]["kind"] == "archive");
  CHECK(manifest["models"]["model"]["file"] == "model.safetensors");
  CHECK(manifest["complete"] == false);
  REQUIRE(manifest["files"].size() == 3);
  for (const auto& file : manifest["files"]) {
    const fs::path written = path / file["name"].get<std::string>();
    const std::string bytes = torchguard::testing::read_text(written);
    CHECK(file["size"] == bytes.size());
    CHECK(file["xxh3_64"] == cp::hex64(cp::checksum_of(bytes)));
  }
  CHECK(torchguard::testing::read_text(path / "optimizer.pt") == "state bytes");
  const auto listed = cp::list_committed(dir.path);
  REQUIRE(listed.size() == 1);
  CHECK(listed[0].step == 7);
  CHECK(listed[0].sequence == 3);
}

TEST_CASE("a failed commit removes its temporary and leaves what was there",
          "[checkpoint][parts][commit]") {
  TempDir dir;
  const fs::path taken = dir.path / cp::checkpoint_name(3, 7);
  fs::create_directories(taken);
  std::ofstream(taken / "keep.txt") << "not ours";
  auto snapshot = small_snapshot(3, 7);
  CHECK_THROWS_AS(cp::write_checkpoint(dir.path, snapshot), CheckpointError);
  CHECK_THROWS_WITH(cp::write_checkpoint(dir.path, snapshot),
                    Contains("cannot save the checkpoint of step 7") && Contains("cannot rename") &&
                        Contains("intact"));
  CHECK(names_in(dir.path) == std::vector<std::string>{"ckpt-000003-step-7"});
  CHECK(names_in(taken) == std::vector<std::string>{"keep.txt"});
}

TEST_CASE("leftovers are removed and sequence numbers are never reused",
          "[checkpoint][parts][commit]") {
  TempDir dir;
  commit(dir.path, 4, 40);
  fs::create_directories(dir.path / ".tmp-ckpt-000005-step-50-123");
  fs::create_directories(dir.path / ".trash-ckpt-000001-step-10");
  fs::create_directories(dir.path / "quarantine" / "ckpt-000009-step-90");
  CapturedLogger captured;
  CHECK(cp::remove_leftover_temporaries(dir.path, *captured.logger) == 9u);
  CHECK(names_in(dir.path) == std::vector<std::string>{"ckpt-000004-step-40", "quarantine"});
}

// ---- retention ---------------------------------------------------------------------------

TEST_CASE("retention keeps the newest, the best by a finite metric, and the resumed one",
          "[checkpoint][parts][retention]") {
  std::vector<CheckpointInfo> all;
  for (int i = 1; i <= 6; ++i) {
    all.push_back({fs::path("c") / std::to_string(i), static_cast<std::uint64_t>(i), i, 0,
                   nlohmann::json::object()});
  }
  all[0].metrics["acc"] = 0.5;
  all[1].metrics["acc"] = nullptr;  // a NaN, as stored
  all[2].metrics["acc"] = 0.9;
  all[3].metrics["loss"] = 0.1;  // another metric
  CheckpointOptions options;
  options.keep_last = 2;
  auto kept = [&](std::optional<fs::path> resumed) {
    std::vector<std::string> names;
    for (const auto& path : cp::select_retained(all, options, resumed)) {
      names.push_back(path.filename().string());
    }
    return names;
  };
  CHECK(kept(std::nullopt) == std::vector<std::string>{"5", "6"});
  options.keep_best = 1;
  options.best_metric = "acc";
  options.best_mode = torchguard::MetricMode::max;
  CHECK(kept(std::nullopt) == std::vector<std::string>{"3", "5", "6"});
  options.best_mode = torchguard::MetricMode::min;
  CHECK(kept(fs::path("c") / "2") == std::vector<std::string>{"1", "2", "5", "6"});
}

TEST_CASE("retention deletes what it does not keep and leaves no trash",
          "[checkpoint][parts][retention]") {
  TempDir dir;
  for (int i = 1; i <= 4; ++i) commit(dir.path, i, i * 10);
  CheckpointOptions options;
  options.directory = dir.path;
  options.keep_last = 2;
  CapturedLogger captured;
  cp::apply_retention(options, dir.path / cp::checkpoint_name(1, 10), *captured.logger);
  CHECK(names_in(dir.path) == std::vector<std::string>{"ckpt-000001-step-10", "ckpt-000003-step-30",
                                                       "ckpt-000004-step-40"});
}

// ---- restore -----------------------------------------------------------------------------

TEST_CASE("verification names what is wrong before anything loads",
          "[checkpoint][parts][restore]") {
  TempDir dir;
  const fs::path path = commit(dir.path, 1, 1);
  cp::VerifiedCheckpoint checkpoint;
  CHECK(cp::verify_checkpoint(path, checkpoint).empty());
  CHECK(checkpoint.files.size() == 3);
  CHECK(checkpoint.bytes("optimizer.pt") == "state bytes");

  SECTION("truncated") {
    fs::resize_file(path / "model.safetensors", 100);
    CHECK_THAT(cp::verify_checkpoint(path, checkpoint),
               Contains("model.safetensors has 100 bytes") && Contains("truncated"));
  }
  SECTION("a file name that leads out of the checkpoint") {
    std::ofstream(dir.path / "outside.bin") << "not the checkpoint's";
    for (const std::string name : {"../outside.bin", "/etc/hostname", "sub/x", "..", ""}) {
      auto manifest =
          nlohmann::ordered_json::parse(torchguard::testing::read_text(path / "manifest.json"));
      manifest["files"][0]["name"] = name;  // and a checksum that agrees: only the name is wrong
      manifest[cp::manifest_checksum_key] = cp::manifest_checksum(manifest);
      std::ofstream(path / "manifest.json") << manifest.dump(2);
      CHECK_THAT(cp::verify_checkpoint(path, checkpoint),
                 Contains(fmt::format("its manifest lists '{}', which is not a file name", name)));
    }
  }
  SECTION("a flipped byte") {
    std::fstream io(path / "optimizer.pt", std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(2);
    io.put('X');
    io.close();
    CHECK_THAT(cp::verify_checkpoint(path, checkpoint),
               Contains("optimizer.pt fails its checksum"));
  }
  SECTION("a missing file") {
    fs::remove(path / "optimizer.pt");
    CHECK(cp::verify_checkpoint(path, checkpoint) == "optimizer.pt is missing");
  }
  SECTION("a manifest changed after it was written") {
    auto manifest =
        nlohmann::ordered_json::parse(torchguard::testing::read_text(path / "manifest.json"));
    manifest["step"] = 2;
    std::ofstream(path / "manifest.json") << manifest.dump(2);
    CHECK(cp::verify_checkpoint(path, checkpoint) == "its manifest fails its own checksum");
  }
  SECTION("no manifest") {
    fs::remove(path / "manifest.json");
    CHECK_THAT(cp::verify_checkpoint(path, checkpoint), Contains("it has no manifest"));
  }
  SECTION("a malformed manifest") {
    std::ofstream(path / "manifest.json") << R"({"format_version": 1})";
    CHECK_THAT(cp::verify_checkpoint(path, checkpoint), Contains("manifest lacks its sequence"));
    std::ofstream(path / "manifest.json") << std::string("{\"format_version\": 1}\0{}", 23);
    CHECK_THAT(cp::verify_checkpoint(path, checkpoint), Contains("manifest holds a NUL byte"));
  }
  SECTION("a newer format, intact: stop and say so") {
    auto manifest =
        nlohmann::ordered_json::parse(torchguard::testing::read_text(path / "manifest.json"));
    manifest["format_version"] = 99;
    manifest[cp::manifest_checksum_key] = cp::manifest_checksum(manifest);
    std::ofstream(path / "manifest.json") << manifest.dump(2);
    CHECK_THROWS_WITH(cp::verify_checkpoint(path, checkpoint),
                      Contains("format version 99") && Contains("upgrade torchguard"));
  }
  SECTION("a version that a flipped bit made newer: damage, checked before the version") {
    std::string text = torchguard::testing::read_text(path / "manifest.json");
    const auto at = text.find(fmt::format("\"format_version\": {}", cp::checkpoint_format_version));
    REQUIRE(at != std::string::npos);
    text[at + 18] = '9';
    std::ofstream(path / "manifest.json") << text;
    CHECK(cp::verify_checkpoint(path, checkpoint) == "its manifest fails its own checksum");
    auto unsigned_manifest = nlohmann::ordered_json::parse(text);
    unsigned_manifest.erase(cp::manifest_checksum_key);
    std::ofstream(path / "manifest.json") << unsigned_manifest.dump(2);
    CHECK(cp::verify_checkpoint(path, checkpoint) == "its manifest has no checksum of its own");
  }
}

// Run by the read-error test below in a child under tests/io_faults.c.
TEST_CASE("restore child: restore from a disk that fails a read", "[.restore_eio_child]") {
  const char* dir = std::getenv("TORCHGUARD_TEST_DIR");
  if (!dir) return;
  CheckpointOptions options;
  options.directory = dir;
  CapturedLogger captured;
  fs::path loaded;
  REQUIRE(cp::restore_newest(options, true, *captured.logger,
                             [&](const cp::VerifiedCheckpoint& c) { loaded = c.path; }));
  std::cout << "loaded " << loaded.filename().string() << std::endl;
}

TEST_CASE("a read error while restoring (EIO) is damage: the checkpoint before it loads",
          "[checkpoint][parts][restore][faults]") {
  TempDir dir;
  commit(dir.path, 1, 10);
  const fs::path newer = commit(dir.path, 2, 20);
  const auto child = torchguard::testing::run_with_faults(
      "[.restore_eio_child]", "pread:ckpt-000002-step-20/model.safetensors:EIO",
      {"TORCHGUARD_TEST_DIR=" + dir.path.string()});
  INFO(child.output);
  REQUIRE(child.exit_status == 0);
  CHECK_THAT(child.output, Contains("io_faults: pread(") && Contains("loaded ckpt-000001-step-10"));
  CHECK_THAT(torchguard::testing::read_text(dir.path / "quarantine" / newer.filename() /
                                            "QUARANTINE_REASON.txt"),
             Contains("model.safetensors cannot be read") && Contains("Input/output error"));
}

TEST_CASE("restore falls back past a damaged checkpoint and quarantines it with the reason",
          "[checkpoint][parts][restore]") {
  TempDir dir;
  const fs::path older = commit(dir.path, 1, 10);
  const fs::path newer = commit(dir.path, 2, 20);
  fs::resize_file(newer / "model.safetensors", 10);
  CheckpointOptions options;
  options.directory = dir.path;
  CapturedLogger captured;
  fs::path loaded;
  CHECK(cp::restore_newest(options, true, *captured.logger,
                           [&](const cp::VerifiedCheckpoint& c) { loaded = c.path; }));
  CHECK(loaded == older);
  const fs::path aside = dir.path / "quarantine" / newer.filename();
  CHECK(fs::exists(aside / "model.safetensors"));
  CHECK_THAT(torchguard::testing::read_text(aside / "QUARANTINE_REASON.txt"),
             Contains("model.safetensors has 10 bytes"));

  // The only one left, damaged: refused, since the quarantine counts too.
  fs::remove(older / "manifest.json");
  CHECK_THROWS_WITH(
      cp::restore_newest(options, true, *captured.logger, [](const cp::VerifiedCheckpoint&) {}),
      Contains("no valid checkpoint") && Contains("2 damaged"));
  CHECK(fs::exists(dir.path / "quarantine" / older.filename()));
}

TEST_CASE(
    "a checkpoint of format 1 (tensors.bin, state.pt) restores, and the next save writes format 3",
    "[checkpoint][parts][restore]") {
  TempDir dir;
  torch::manual_seed(3);
  torch::nn::Linear saved(3, 2);
  const fs::path path = dir.path / "ckpt-000001-step-5";
  fs::create_directories(path);
  // tensors.bin as torchguard 0.1 wrote it: magic, header length, JSON, data aligned to 64.
  nlohmann::json header = nlohmann::json::array();
  std::string data;
  auto add = [&](const std::string& name, const torch::Tensor& t) {
    header.push_back({{"name", name},
                      {"dtype", "float32"},
                      {"shape", t.sizes().vec()},
                      {"offset", data.size()},
                      {"bytes", t.nbytes()}});
    data.append(static_cast<const char*>(t.data_ptr()), t.nbytes());
    data.resize(cp::align_up(data.size()), '\0');
  };
  add("model/weight", saved->weight.detach());
  add("model/bias", saved->bias.detach());
  add("optimizer/0/momentum_buffer", torch::full({2, 3}, 0.25));
  const std::string text = header.dump();
  const std::uint64_t length = text.size();
  std::string tensors_bin = "TGTENSR1";
  tensors_bin.append(reinterpret_cast<const char*>(&length), sizeof length);
  tensors_bin += text;
  tensors_bin.resize(cp::align_up(tensors_bin.size()), '\0');
  tensors_bin += data;
  auto archive = cp::new_archive();
  torch::serialize::OutputArchive group(archive->compilation_unit());
  torch::optim::SGDOptions(0.5).momentum(0.9).serialize(group);
  archive->write("optimizer_group/0", group);
  const std::string state_pt = cp::serialize_to_memory(*archive);
  nlohmann::json files = nlohmann::json::array();
  for (const auto& [name, bytes] :
       {std::pair<std::string, std::string>{"tensors.bin", tensors_bin}, {"state.pt", state_pt}}) {
    std::ofstream(path / name, std::ios::binary) << bytes;
    files.push_back(
        {{"name", name}, {"size", bytes.size()}, {"xxh3_64", cp::hex64(cp::checksum_of(bytes))}});
  }
  std::ofstream(path / "manifest.json") << nlohmann::json{
      {"format_version", 1}, {"sequence", 1}, {"step", 5},
      {"epoch", 2},          {"metrics", {}}, {"metadata", nlohmann::json::object()},
      {"optimizer", "sgd"},  {"files", files}}.dump();

  torch::nn::Linear model(3, 2);
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  CapturedLogger captured;
  CheckpointOptions options;
  options.directory = dir.path;
  options.logger = captured.logger;
  {
    torchguard::CheckpointGuard guard(model, sgd, options);
    REQUIRE(guard.resumed());
    CHECK(guard.current_step() == 5);
    CHECK(torch::equal(model->weight, saved->weight));
    CHECK(static_cast<torch::optim::SGDOptions&>(sgd.param_groups()[0].options()).lr() == 0.5);
    auto& state = static_cast<torch::optim::SGDParamState&>(*sgd.state().begin()->second);
    CHECK(torch::equal(state.momentum_buffer(), torch::full({2, 3}, 0.25)));
    guard.save();  // nothing trained: only asked for (the exit save would skip it)
  }
  const auto newest = cp::committed_paths(dir.path).back();
  CHECK(newest.filename() == "ckpt-000002-step-5");  // saved again, in the current format
  CHECK(names_in(newest) == std::vector<std::string>{"extra.safetensors", "manifest.json",
                                                     "model.safetensors", "optimizer.safetensors"});
  const auto manifest =
      nlohmann::json::parse(torchguard::testing::read_text(newest / "manifest.json"));
  CHECK(manifest["format_version"] == cp::checkpoint_format_version);
  const auto& saved_group = manifest["optimizers"]["optimizer"]["param_groups"][0];
  CHECK(saved_group["lr"] == 0.5);
  CHECK(saved_group["momentum"] == 0.9);
  CHECK(saved_group["params"] == nlohmann::json::array({0, 1}));
  CHECK(manifest["optimizers"]["optimizer"]["parameters"] ==
        nlohmann::json::array({"model/weight", "model/bias"}));
  const torchguard::SafetensorsFile optimizer(newest / "optimizer.safetensors");
  CHECK(torch::equal(*optimizer.tensor("state.0.momentum_buffer"), torch::full({2, 3}, 0.25)));
  torch::nn::Linear loaded(3, 2);
  torchguard::load_state_dict(*loaded, newest / "model.safetensors");
  CHECK(torch::equal(loaded->weight, saved->weight));
}

TEST_CASE("a checkpoint of format 2 restores into the named parts it had",
          "[checkpoint][parts][restore]") {
  // Format 2 as torchguard 0.2 wrote it: the model, Adam, options.modules["ema"] and the
  // scheduler's count in extra.safetensors, a sampler's state as options.tensors["sampler"].
  TempDir dir;
  torch::manual_seed(4);
  torch::nn::Linear saved(3, 2), ema(3, 2);
  const fs::path path = dir.path / "ckpt-000001-step-7";
  fs::create_directories(path);
  nlohmann::ordered_json files = nlohmann::ordered_json::array();
  auto write = [&](const std::string& name, const torchguard::TensorMap& tensors) {
    torchguard::save_safetensors(path / name, tensors, {{"format", "pt"}});
    const std::string bytes = torchguard::testing::read_text(path / name);
    files.push_back(
        {{"name", name}, {"size", bytes.size()}, {"xxh3_64", cp::hex64(cp::checksum_of(bytes))}});
  };
  write("model.safetensors", {{"weight", saved->weight}, {"bias", saved->bias}});
  write("optimizer.safetensors", {{"state.0.step", torch::tensor(std::int64_t{7})},
                                  {"state.0.exp_avg", torch::full({2, 3}, 0.5)},
                                  {"state.0.exp_avg_sq", torch::full({2, 3}, 0.25)},
                                  {"state.1.step", torch::tensor(std::int64_t{7})},
                                  {"state.1.exp_avg", torch::full({2}, 0.5)},
                                  {"state.1.exp_avg_sq", torch::full({2}, 0.25)}});
  write("extra.safetensors", {{"modules.ema.weight", ema->weight},
                              {"modules.ema.bias", ema->bias},
                              {"scheduler.step_count", torch::tensor(std::int64_t{7})},
                              {"tensors.sampler", torch::tensor({1, 30, 100, 5, 1}, torch::kInt64)},
                              {"rng.cpu", at::detail::getDefaultCPUGenerator().get_state()}});
  nlohmann::ordered_json manifest;
  manifest["format_version"] = 2;
  manifest["sequence"] = 1;
  manifest["step"] = 7;
  manifest["epoch"] = 1;
  manifest["metrics"] = {{"loss", 0.5}};
  manifest["metadata"] = {{"settings", {{"--seed", 5}}}};
  manifest["optimizer"] = "adam";
  manifest["optimizer_groups"] = {{{"lr", 0.25},
                                   {"betas", {0.8, 0.9}},
                                   {"eps", 1e-8},
                                   {"weight_decay", 0.0},
                                   {"amsgrad", false}}};
  manifest["libtorch_version"] = "1.13.0";
  manifest["created_unix_s"] = 0;
  manifest["files"] = files;
  std::ofstream(path / "manifest.json") << cp::manifest_text(manifest);

  torch::nn::Linear model(3, 2), average(3, 2);
  torch::optim::Adam adam(model->parameters());
  torch::optim::StepLR schedule(adam, 3, 0.5);
  torchguard::ResumableSampler sampler(100, {/*seed=*/5});
  CapturedLogger captured;
  CheckpointOptions options;
  options.directory = dir.path;
  options.logger = captured.logger;
  options.modules["ema"] = average;  // format 2's spelling; models["ema"] reads the same
  options.scheduler = &schedule;
  options.samplers["sampler"] = sampler;
  options.settings.values = {{"--seed", 6}};
  options.settings.exact = {"--seed"};
  options.save_on_exit = torchguard::SaveOnExit::never;
  // The settings the demo kept in the metadata are compared too.
  CHECK_THROWS_WITH(torchguard::CheckpointGuard(model, adam, options),
                    Contains("--seed is 6 in this run but was 5"));
  options.settings.values = {{"--seed", 5}};
  torchguard::CheckpointGuard guard(model, adam, options);
  CHECK(guard.current_step() == 7);
  CHECK(torch::equal(model->weight, saved->weight));
  CHECK(torch::equal(average->weight, ema->weight));
  CHECK(static_cast<torch::optim::AdamOptions&>(adam.param_groups()[0].options()).lr() == 0.25);
  CHECK(std::get<0>(
            static_cast<torch::optim::AdamOptions&>(adam.param_groups()[0].options()).betas()) ==
        0.8);
  CHECK(adam.state().size() == 2);
  CHECK(torchguard::detail::SchedulerStepAccess::step_count(schedule) == 7);
  CHECK(sampler.epoch() == 1);
  CHECK(sampler.position() == 30);
  CHECK(guard.epoch() == 1);  // the sampler's
}

TEST_CASE("a process that does not write never moves a damaged checkpoint",
          "[checkpoint][parts][restore]") {
  TempDir dir;
  const fs::path path = commit(dir.path, 1, 10);
  CapturedLogger captured;
  cp::quarantine_checkpoint(dir.path, path, "damaged", false, *captured.logger);
  CHECK(fs::exists(path));
  CHECK_FALSE(fs::exists(dir.path / "quarantine"));
}

// ---- state -------------------------------------------------------------------------------

TEST_CASE("a staged capture is a copy: training may change the model while it is written",
          "[checkpoint][parts][state]") {
  torch::nn::Linear model(4, 2);
  CheckpointOptions options;
  cp::Parts parts;
  parts.models["model"] = model;
  const cp::TrainingState state(parts, options);
  cp::HostStaging staging;
  cp::Snapshot staged, live;
  state.capture(staged, &staging);
  state.capture(live, nullptr);
  const auto before = model->weight.clone();
  {
    torch::NoGradGuard no_grad;
    model->weight.add_(1.0);
  }
  REQUIRE(std::string(staged.files[0].name) == cp::model_file);
  REQUIRE(staged.files[0].tensors[0].name == "weight");
  CHECK(torch::equal(staged.files[0].tensors[0].tensor, before));
  // written from the live memory
  CHECK(torch::equal(live.files[0].tensors[0].tensor, model->weight));
}

// ---- writer ------------------------------------------------------------------------------

TEST_CASE("the writer writes in order and a failed write surfaces at the next wait, once",
          "[checkpoint][parts][writer]") {
  std::vector<std::int64_t> written;
  cp::BackgroundWriter writer([&](cp::Snapshot& snapshot) {
    if (snapshot.step == 2) throw CheckpointError("disk on fire");
    written.push_back(snapshot.step);
  });
  for (std::int64_t step = 1; step <= 3; ++step) {
    auto snapshot = std::make_unique<cp::Snapshot>();
    snapshot->step = step;
    if (step == 3) CHECK_THROWS_WITH(writer.wait(), Contains("disk on fire"));
    writer.submit(std::move(snapshot));
    if (step == 1) writer.wait();
  }
  writer.wait();
  CHECK(written == std::vector<std::int64_t>{1, 3});
  writer.stop();
  writer.stop();
}

// ---- sampler -----------------------------------------------------------------------------
// ResumableSampler (torchguard/data/) lives here: its state is a checkpoint's extra tensor.

namespace {

using torchguard::ResumableSampler;

// A dataset of its own indices: a batch lists the samples the loader read, and every read is
// recorded (the workers' copies share the record).
struct IndexDataset : torch::data::datasets::Dataset<IndexDataset, std::size_t> {
  struct Reads {
    std::mutex mutex;
    std::vector<std::size_t> indices;
  };
  explicit IndexDataset(std::size_t n) : count(n) {}
  std::size_t get(std::size_t index) override {
    std::lock_guard<std::mutex> lock(reads->mutex);
    reads->indices.push_back(index);
    return index;
  }
  c10::optional<std::size_t> size() const override { return count; }
  std::vector<std::size_t> read() const {
    std::lock_guard<std::mutex> lock(reads->mutex);
    return reads->indices;
  }
  std::size_t count;
  std::shared_ptr<Reads> reads = std::make_shared<Reads>();
};

auto index_loader(const IndexDataset& dataset, const ResumableSampler& sampler,
                  std::size_t batch_size, std::size_t workers) {
  return torch::data::make_data_loader(dataset, sampler,
                                       torch::data::DataLoaderOptions(batch_size).workers(workers));
}

// One epoch of the loop from where the sampler is, leaving it (as an interrupted run does) after
// `limit` batches; `body` runs on each batch. Returns the samples in the order received.
template <class Loader>
std::vector<std::size_t> run_epoch(Loader& loader, const ResumableSampler& sampler,
                                   std::size_t limit = SIZE_MAX,
                                   const std::function<void()>& body = {}) {
  std::vector<std::size_t> received;
  std::size_t batches = 0;
  for (auto& batch : torchguard::resume(*loader, sampler)) {
    received.insert(received.end(), batch.begin(), batch.end());
    if (body) body();
    if (++batches == limit) break;
  }
  return received;
}

std::vector<std::size_t> tail(const std::vector<std::size_t>& all, std::size_t from) {
  return {all.begin() + static_cast<std::ptrdiff_t>(from), all.end()};
}

}  // namespace

TEST_CASE("a ResumableSampler's order is a function of the seed and the epoch alone", "[sampler]") {
  const auto order = ResumableSampler::permutation(1000, 7, 0);
  CHECK(order == ResumableSampler::permutation(1000, 7, 0));
  CHECK(order != ResumableSampler::permutation(1000, 7, 1));
  CHECK(order != ResumableSampler::permutation(1000, 8, 0));
  auto sorted = order;
  std::sort(sorted.begin(), sorted.end());
  std::vector<std::size_t> all(1000);
  std::iota(all.begin(), all.end(), std::size_t{0});
  CHECK(sorted == all);  // every index once
  // The same numbers with every standard library: std::seed_seq and std::mt19937_64 are
  // specified to the bit, the bounded draw is written out.
  CHECK(ResumableSampler::permutation(10, 0, 0) ==
        std::vector<std::size_t>{8, 2, 3, 5, 1, 6, 9, 7, 0, 4});
  CHECK(ResumableSampler::permutation(10, 42, 3) ==
        std::vector<std::size_t>{5, 1, 6, 2, 4, 3, 8, 7, 0, 9});

  CapturedLogger captured;  // used without a loader: it says that nothing is tracked
  ResumableSampler sampler(1000, {7, true, captured.logger});
  sampler.reset();
  std::vector<std::size_t> handed;
  while (auto batch = sampler.next(64)) handed.insert(handed.end(), batch->begin(), batch->end());
  CHECK(handed == order);
  // LibTorch's global RNG (dropout's) is never drawn from.
  torch::manual_seed(3);
  const auto expected = torch::randint(1 << 20, {4});
  torch::manual_seed(3);
  sampler.reset();
  sampler.next(64);
  CHECK(torch::equal(torch::randint(1 << 20, {4}), expected));
  CHECK(captured.sink->contains(spdlog::level::warn, "iterate with torchguard::resume"));

  ResumableSampler in_order(5, {0, /*shuffle=*/false});
  in_order.reset();
  CHECK(*in_order.next(3) == std::vector<std::size_t>{0, 1, 2});
  CHECK(*in_order.next(3) == std::vector<std::size_t>{3, 4});
  CHECK_FALSE(in_order.next(3).has_value());
}

TEST_CASE("copies of a ResumableSampler share one state", "[sampler]") {
  ResumableSampler kept(20, {1});
  ResumableSampler copy = kept;  // as make_data_loader takes it
  CHECK(kept.state().data_ptr() == copy.state().data_ptr());
  copy.reset();
  const auto first = *copy.next(5);
  const auto second = *kept.next(5);  // goes on where the copy was
  const auto order = ResumableSampler::permutation(20, 1, 0);
  CHECK(first == std::vector<std::size_t>(order.begin(), order.begin() + 5));
  CHECK(second == std::vector<std::size_t>(order.begin() + 5, order.begin() + 10));
  copy.state()[ResumableSampler::kEpoch] = 4;
  CHECK(kept.epoch() == 4);
}

TEST_CASE("a loader with workers goes on after the last batch the loop received, not fetched",
          "[sampler]") {
  CapturedLogger captured;
  torchguard::ResumableSamplerOptions options;
  options.seed = 5;
  options.logger = captured.logger;
  const auto epoch0 = ResumableSampler::permutation(103, 5, 0);
  const auto epoch1 = ResumableSampler::permutation(103, 5, 1);
  const std::size_t workers = GENERATE(0, 2);
  INFO("workers " << workers);

  // Interrupted after 4 batches: the loader has asked for more (2 * workers ahead).
  ResumableSampler first(103, options);
  torch::Tensor saved;
  {
    IndexDataset dataset(103);
    auto loader = index_loader(dataset, first, 10, workers);
    std::size_t batches = 0;
    const auto received = run_epoch(loader, first, 4, [&] {
      if (++batches < 4 || workers == 0) return;
      // The workers read ahead of the loop: samples fetched, never trained on.
      for (int i = 0; i < 5000 && dataset.read().size() <= 40; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      CHECK(dataset.read().size() > 40);
      CHECK(first.position() == 40);
    });
    CHECK(received == std::vector<std::size_t>(epoch0.begin(), epoch0.begin() + 40));
    saved = first.state().clone();
  }
  CHECK(first.epoch() == 0);
  CHECK(first.position() == 40);

  // A new process: a fresh sampler, the state restored into it, a new loader.
  ResumableSampler second(103, options);
  second.state().copy_(saved);
  CHECK(second.mid_epoch());
  IndexDataset dataset(103);
  auto loader = index_loader(dataset, second, 10, workers);
  CHECK(run_epoch(loader, second) == tail(epoch0, 40));  // the remaining batches, exactly
  const auto read = dataset.read();
  for (std::size_t i = 0; i < 40; ++i) {  // the samples before the position are not read
    CHECK(std::find(read.begin(), read.end(), epoch0[i]) == read.end());
  }
  CHECK(captured.sink->contains(spdlog::level::info, "epoch 0 goes on at sample 40 of 103"));
  CHECK(second.epoch() == 1);
  CHECK(second.position() == 0);
  CHECK(run_epoch(loader, second) == epoch1);
  CHECK(second.epoch() == 2);
}

TEST_CASE("a state saved in the body of an epoch's last batch resumes with an empty remainder",
          "[sampler]") {
  CapturedLogger captured;
  ResumableSampler first(30, {9, true, captured.logger});
  torch::Tensor saved;
  IndexDataset dataset(30);
  {
    auto loader = index_loader(dataset, first, 10, 2);
    run_epoch(loader, first, 3, [&] { saved = first.state().clone(); });
  }
  CHECK_FALSE(captured.sink->contains(spdlog::level::warn, ""));  // tracked: no warning
  ResumableSampler second(30, {9, true, captured.logger});
  second.state().copy_(saved);
  CHECK(second.epoch() == 0);  // the end-of-epoch work (evaluation, scheduler) still to run
  CHECK(second.position() == 30);
  auto loader = index_loader(dataset, second, 10, 2);
  CHECK(run_epoch(loader, second).empty());
  CHECK(captured.sink->contains(spdlog::level::info, "epoch 0 has no batch left"));
  CHECK(second.epoch() == 1);
  CHECK(run_epoch(loader, second) == ResumableSampler::permutation(30, 9, 1));
}

TEST_CASE("CheckpointGuard saves the sampler's position and restores it before the loop",
          "[sampler][checkpoint]") {
  TempDir dir;
  CapturedLogger captured;
  torch::nn::Linear model(1, 1);
  const auto order = ResumableSampler::permutation(95, 3, 0);
  auto options_for = [&](const ResumableSampler& sampler) {
    CheckpointOptions options;
    options.directory = dir.path / "checkpoints";
    options.every_n_steps = 3;
    options.save_on_exit = torchguard::SaveOnExit::never;  // as a kill -9 would leave it
    options.tensors["sampler"] = sampler.state();
    options.logger = captured.logger;
    return options;
  };
  {
    ResumableSampler sampler(95, {3, true, captured.logger});
    torchguard::CheckpointGuard guard(model, options_for(sampler));
    IndexDataset dataset(95);
    auto loader = index_loader(dataset, sampler, 10, 2);
    // Five steps; the checkpoint of step 3, taken in the body, counts that batch as done.
    run_epoch(loader, sampler, 5, [&] { guard.step(); });
    CHECK(sampler.position() == 50);
  }
  ResumableSampler sampler(95, {3, true, captured.logger});
  torchguard::CheckpointGuard guard(model, options_for(sampler));
  REQUIRE(guard.resumed());
  CHECK(guard.current_step() == 3);
  CHECK(sampler.epoch() == 0);
  CHECK(sampler.position() == 30);  // restored in place, before any loader begins
  IndexDataset dataset(95);
  auto loader = index_loader(dataset, sampler, 10, 2);
  CHECK(run_epoch(loader, sampler) == tail(order, 30));
}

TEST_CASE("a ResumableSampler refuses a state or a loader that is not its own", "[sampler]") {
  CapturedLogger captured;
  ResumableSampler other(100, {1, true, captured.logger});
  other.state()[ResumableSampler::kConsumed] = 40;
  SECTION("another size or seed") {
    ResumableSampler smaller(50, {1});
    smaller.state().copy_(other.state());
    CHECK_THROWS_AS(smaller.epoch(), torchguard::OptionsError);
    CHECK_THROWS_WITH(smaller.epoch(), Contains("over 100 samples (seed 1, shuffled), this one is "
                                                "over 50 samples (seed 1, shuffled)"));
    CHECK_THROWS_AS(smaller.reset(), torchguard::OptionsError);
    ResumableSampler reseeded(100, {2});
    reseeded.state().copy_(other.state());
    CHECK_THROWS_WITH(reseeded.position(), Contains("seed 1"));
    ResumableSampler in_order(100, {1, false});
    in_order.state().copy_(other.state());
    CHECK_THROWS_WITH(in_order.position(), Contains("in order"));
  }
  SECTION("through LibTorch's archive") {
    torch::serialize::OutputArchive out;
    other.save(out);
    std::ostringstream bytes;
    out.save_to(bytes);
    ResumableSampler same(100, {1});
    torch::serialize::InputArchive in;
    std::istringstream read_back(bytes.str());
    in.load_from(read_back);
    same.load(in);
    CHECK(same.position() == 40);
    ResumableSampler smaller(50, {1});
    CHECK_THROWS_AS(smaller.load(in), torchguard::OptionsError);
    CHECK(smaller.position() == 0);  // left as it was
  }
  SECTION("a loader built with another sampler, or one that reorders") {
    IndexDataset dataset(100);
    auto loader = index_loader(dataset, other, 10, 2);
    ResumableSampler mine(100, {1});
    CHECK_THROWS_WITH(run_epoch(loader, mine), Contains("did not reset this sampler"));
    auto unordered = torch::data::make_data_loader(
        dataset, mine, torch::data::DataLoaderOptions(10).workers(2).enforce_ordering(false));
    CHECK_THROWS_WITH(torchguard::resume(*unordered, mine), Contains("enforce_ordering"));
  }
}
