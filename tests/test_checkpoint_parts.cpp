// The parts of CheckpointGuard, each on its own: the file format, the commit protocol, retention,
// verification and quarantine, the captured state, the background writer.
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "support.hpp"
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
using torchguard::testing::TempDir;

namespace {

cp::Snapshot small_snapshot(std::uint64_t sequence, std::int64_t step) {
  cp::Snapshot snapshot;
  snapshot.sequence = sequence;
  snapshot.step = step;
  snapshot.epoch = 1;
  snapshot.metrics = {{"loss", 0.25}};
  snapshot.optimizer_kind = "sgd";
  snapshot.tensors = {{"model/w", torch::arange(10, torch::kFloat32)},
                      {"model/b", torch::tensor({true, false, true})}};
  snapshot.state_bytes = "state bytes";
  return snapshot;
}

fs::path commit(const fs::path& dir, std::uint64_t sequence, std::int64_t step) {
  auto snapshot = small_snapshot(sequence, step);
  cp::write_checkpoint(dir, snapshot);
  return dir / cp::checkpoint_name(sequence, step);
}

void write_tensors(const fs::path& path, const std::vector<cp::NamedTensor>& tensors) {
  cp::DurableFile out(path);
  cp::write_tensor_file(out, tensors);
  out.commit();
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

// ---- format ------------------------------------------------------------------------------

TEST_CASE("a tensor file reads back every dtype, shape and name it was written with",
          "[checkpoint][parts][format]") {
  TempDir dir;
  const std::vector<cp::NamedTensor> written = {
      {"a/float", torch::randn({3, 5})}, {"a/double", torch::randn({7}, torch::kFloat64)},
      {"b/long", torch::arange(13)},     {"b/bool", torch::tensor({true, false, true})},
      {"c/empty", torch::zeros({0, 4})}, {"c/scalar", torch::tensor(42)}};
  write_tensors(dir.path / "t.bin", written);
  const cp::MappedFile file(dir.path / "t.bin");
  const cp::TensorFileView view(file.bytes());
  for (const auto& item : written) {
    const auto read = view.get(item.name);
    REQUIRE(read);
    CHECK(read->scalar_type() == item.tensor.scalar_type());
    CHECK(torch::equal(*read, item.tensor));
  }
  CHECK_FALSE(view.get("a/missing"));
  CHECK(view.names_with_prefix("b/") == std::vector<std::string>{"b/bool", "b/long"});
}

TEST_CASE("an unsupported dtype is refused before anything is written",
          "[checkpoint][parts][format]") {
  CHECK_THROWS_AS(cp::dtype_name(torch::kQInt8), torchguard::OptionsError);
}

TEST_CASE("a damaged tensor file header is rejected, never read past its end",
          "[checkpoint][parts][format]") {
  auto file_with = [](const std::string& header) {
    std::string bytes(cp::tensor_file_magic, 8);
    const std::uint64_t size = header.size();
    bytes.append(reinterpret_cast<const char*>(&size), sizeof size);
    bytes += header;
    bytes.resize(cp::align_up(bytes.size()) + 64, '\0');
    return bytes;
  };
  const std::string good =
      file_with(R"([{"name":"t","dtype":"float32","shape":[4],"offset":0,"bytes":16}])");
  CHECK(cp::TensorFileView(good).get("t")->numel() == 4);
  for (const std::string header :
       {R"([{"name":"t","dtype":"float32","shape":[3,6148914691236517206],"offset":0,"bytes":8}])",
        R"([{"name":"t","dtype":"float32","shape":[-4],"offset":0,"bytes":16}])",
        R"([{"name":"t","dtype":"float32","shape":[4],"offset":18446744073709551600,"bytes":16}])",
        R"([{"name":"t","dtype":"float32","shape":[64],"offset":0,"bytes":256}])",
        R"([{"name":"t","dtype":"float99","shape":[4],"offset":0,"bytes":16}])"}) {
    CHECK_THROWS(cp::TensorFileView(file_with(header)));
  }
  CHECK_THROWS_WITH(cp::TensorFileView(std::string("not a tensor file")), Contains("bad magic"));
}

TEST_CASE("module tensors are checked one for one before any is loaded",
          "[checkpoint][parts][format]") {
  TempDir dir;
  torch::nn::Linear saved(4, 3);
  std::vector<cp::NamedTensor> tensors;
  cp::collect_module_tensors(*saved, "model/", tensors);
  write_tensors(dir.path / "t.bin", tensors);
  const cp::MappedFile file(dir.path / "t.bin");
  const cp::TensorFileView view(file.bytes());
  torch::nn::Linear same(4, 3), wider(4, 5), no_bias(torch::nn::LinearOptions(4, 3).bias(false));
  cp::check_module_tensors(*same, "model/", view);
  cp::load_module_tensors(*same, "model/", view);
  CHECK(torch::equal(same->weight, saved->weight));
  CHECK_THROWS_WITH(cp::check_module_tensors(*wider, "model/", view),
                    Contains("'model/weight' is Float[3, 4] in the checkpoint"));
  CHECK_THROWS_WITH(cp::check_module_tensors(*no_bias, "model/", view),
                    Contains("2 tensors under 'model/', this module has 1"));
  CHECK_THROWS_WITH(cp::check_module_tensors(*same, "other/", view),
                    Contains("no tensor 'other/weight'"));
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
  CHECK(names_in(path) == std::vector<std::string>{"manifest.json", "state.pt", "tensors.bin"});
  const auto manifest =
      nlohmann::json::parse(torchguard::testing::read_text(path / "manifest.json"));
  CHECK(manifest["format_version"] == cp::checkpoint_format_version);
  CHECK(manifest["sequence"] == 3);
  CHECK(manifest["step"] == 7);
  CHECK(manifest["epoch"] == 1);
  CHECK(manifest["metrics"]["loss"] == 0.25);
  CHECK(manifest["optimizer"] == "sgd");
  REQUIRE(manifest["files"].size() == 2);
  for (const auto& file : manifest["files"]) {
    const fs::path written = path / file["name"].get<std::string>();
    const std::string bytes = torchguard::testing::read_text(written);
    CHECK(file["size"] == bytes.size());
    CHECK(file["xxh3_64"] == cp::hex64(cp::checksum_of(bytes)));
  }
  CHECK(torchguard::testing::read_text(path / "state.pt") == "state bytes");
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
  CHECK(checkpoint.files.size() == 2);
  CHECK(checkpoint.bytes(cp::state_name) == "state bytes");

  SECTION("truncated") {
    fs::resize_file(path / "tensors.bin", 100);
    CHECK_THAT(cp::verify_checkpoint(path, checkpoint),
               Contains("tensors.bin has 100 bytes") && Contains("truncated"));
  }
  SECTION("a flipped byte") {
    std::fstream io(path / "state.pt", std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(2);
    io.put('X');
    io.close();
    CHECK_THAT(cp::verify_checkpoint(path, checkpoint), Contains("state.pt fails its checksum"));
  }
  SECTION("a missing file") {
    fs::remove(path / "state.pt");
    CHECK(cp::verify_checkpoint(path, checkpoint) == "state.pt is missing");
  }
  SECTION("no manifest") {
    fs::remove(path / "manifest.json");
    CHECK_THAT(cp::verify_checkpoint(path, checkpoint), Contains("it has no manifest"));
  }
  SECTION("a malformed manifest") {
    std::ofstream(path / "manifest.json") << R"({"format_version": 1})";
    CHECK_THAT(cp::verify_checkpoint(path, checkpoint), Contains("manifest is malformed"));
  }
  SECTION("a newer format") {
    std::ofstream(path / "manifest.json") << R"({"format_version": 99, "files": []})";
    CHECK_THROWS_WITH(cp::verify_checkpoint(path, checkpoint),
                      Contains("format version 99") && Contains("upgrade torchguard"));
  }
}

TEST_CASE("restore falls back past a damaged checkpoint and quarantines it with the reason",
          "[checkpoint][parts][restore]") {
  TempDir dir;
  const fs::path older = commit(dir.path, 1, 10);
  const fs::path newer = commit(dir.path, 2, 20);
  fs::resize_file(newer / "tensors.bin", 10);
  CheckpointOptions options;
  options.directory = dir.path;
  CapturedLogger captured;
  fs::path loaded;
  CHECK(cp::restore_newest(options, true, *captured.logger,
                           [&](const cp::VerifiedCheckpoint& c) { loaded = c.path; }));
  CHECK(loaded == older);
  const fs::path aside = dir.path / "quarantine" / newer.filename();
  CHECK(fs::exists(aside / "tensors.bin"));
  CHECK_THAT(torchguard::testing::read_text(aside / "QUARANTINE_REASON.txt"),
             Contains("tensors.bin has 10 bytes"));

  // The only one left, damaged: refused, since the quarantine counts too.
  fs::remove(older / "manifest.json");
  CHECK_THROWS_WITH(
      cp::restore_newest(options, true, *captured.logger, [](const cp::VerifiedCheckpoint&) {}),
      Contains("no valid checkpoint") && Contains("2 damaged"));
  CHECK(fs::exists(dir.path / "quarantine" / older.filename()));
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
  const cp::TrainingState state(model, nullptr, options);
  cp::HostStaging staging;
  cp::Snapshot staged, live;
  state.capture(staged, &staging);
  state.capture(live, nullptr);
  CHECK(staged.state == nullptr);
  CHECK_FALSE(staged.state_bytes.empty());
  CHECK(live.state != nullptr);
  const auto before = model->weight.clone();
  {
    torch::NoGradGuard no_grad;
    model->weight.add_(1.0);
  }
  REQUIRE(staged.tensors[0].name == "model/weight");
  CHECK(torch::equal(staged.tensors[0].tensor, before));
  CHECK(torch::equal(live.tensors[0].tensor, model->weight));  // written from the live memory
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
