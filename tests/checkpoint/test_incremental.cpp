// checkpoint/incremental.hpp: what an incremental commit writes and what it links, and what a
// restore, verification, quarantine and retention make of shared files; SIGKILL at every step of
// an incremental commit and of the retention after it; a full disk while linking.
#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "checkpoint_support.hpp"
#include "support.hpp"
#include "torchguard/checkpoint.hpp"
#include "torchguard/checkpoint/commit.hpp"
#include "torchguard/checkpoint/incremental.hpp"
#include "torchguard/checkpoint/restore.hpp"

namespace fs = std::filesystem;
using torchguard::CheckpointError;
using torchguard::CheckpointGuard;
using torchguard::CheckpointOptions;
using torchguard::NoValidCheckpointError;
using torchguard::SaveOnExit;
using torchguard::testing::CapturedLogger;
using torchguard::testing::Contains;
using torchguard::testing::read_text;
using torchguard::testing::same_parameters;
using torchguard::testing::TempDir;

namespace incremental_test {

namespace cp = torchguard::detail;
constexpr const char* shared_name = "shared.model.safetensors";

// A model 90% frozen: a backbone (two Linear(512, 512): 2 MiB) that does not train, a BatchNorm
// and a head that do (a tenth of the parameters).
struct FrozenNetImpl : torch::nn::Module {
  FrozenNetImpl()
      : fc1(register_module("fc1", torch::nn::Linear(512, 512))),
        fc2(register_module("fc2", torch::nn::Linear(512, 512))),
        norm(register_module("norm", torch::nn::BatchNorm1d(512))),
        head(register_module("head", torch::nn::Linear(512, 100))) {}
  torch::Tensor forward(const torch::Tensor& x) { return head(norm(fc2(torch::relu(fc1(x))))); }
  std::vector<torch::Tensor> backbone() const {
    auto parameters = fc1->parameters();
    for (const auto& parameter : fc2->parameters()) parameters.push_back(parameter);
    return parameters;
  }
  torch::nn::Linear fc1, fc2;
  torch::nn::BatchNorm1d norm;
  torch::nn::Linear head;
};
TORCH_MODULE(FrozenNet);

// The model under SGD with momentum on what trains: SGD steps parameters through .data(), which
// bumps no version counter. `frozen` false: every parameter trains.
struct Frozen {
  explicit Frozen(std::uint64_t seed, bool frozen = true) {
    torch::manual_seed(seed);
    model = FrozenNet();
    for (auto& parameter : model->backbone()) parameter.requires_grad_(!frozen);
    std::vector<torch::Tensor> trained;
    for (auto& parameter : model->parameters()) {
      if (parameter.requires_grad()) trained.push_back(parameter);
    }
    optimizer =
        std::make_shared<torch::optim::SGD>(trained, torch::optim::SGDOptions(0.01).momentum(0.9));
  }
  void train_step() {
    model->train();
    const auto x = torch::randn({16, 512});
    optimizer->zero_grad();
    torch::mse_loss(model->forward(x), x.narrow(1, 0, 100)).backward();
    optimizer->step();
  }
  // Step `step`'s state without training: the head and the BatchNorm's statistics set from it.
  void fill(std::int64_t step) {
    torch::NoGradGuard no_grad;
    for (auto& parameter : model->head->parameters()) {
      parameter.fill_(static_cast<double>(step) / 8);
    }
    model->norm->running_mean.fill_(static_cast<double>(step));
  }
  FrozenNet model{nullptr};
  std::shared_ptr<torch::optim::SGD> optimizer;
};

CheckpointOptions options_for(const fs::path& dir,
                              std::shared_ptr<spdlog::logger> logger = nullptr) {
  CheckpointOptions options;
  options.directory = dir;
  options.logger = logger ? std::move(logger) : std::make_shared<spdlog::logger>("quiet");
  options.every_n_steps = 1;
  options.keep_last = 10;
  options.save_on_exit = SaveOnExit::never;
  return options;
}

nlohmann::json manifest_of(const fs::path& checkpoint) {
  return nlohmann::json::parse(read_text(checkpoint / "manifest.json"));
}

// The manifest's entry of file `name` (null when it lists none).
nlohmann::json entry_of(const nlohmann::json& manifest, const std::string& name) {
  for (const auto& file : manifest.at("files")) {
    if (file.at("name") == name) return file;
  }
  return nullptr;
}

// The bytes a commit wrote: its files but the linked ones.
std::uint64_t written_bytes(const nlohmann::json& manifest) {
  std::uint64_t bytes = 0;
  for (const auto& file : manifest.at("files")) {
    if (!file.contains("linked_from")) bytes += file.at("size").get<std::uint64_t>();
  }
  return bytes;
}

struct stat stat_of(const fs::path& path) {
  struct stat info {};
  REQUIRE(::stat(path.c_str(), &info) == 0);
  return info;
}

// Empty when the checkpoint verifies, else why not.
std::string problem_of(const fs::path& checkpoint) {
  cp::VerifiedCheckpoint verified;
  return cp::verify_checkpoint(checkpoint, verified);
}

// What a guard with `options` restores into `state`: whether it resumed, at which step.
std::pair<bool, std::int64_t> restore_into(Frozen& state, CheckpointOptions options) {
  CheckpointGuard guard(state.model, state.optimizer, std::move(options));
  return {guard.resumed(), guard.current_step()};
}

// Copies of a model's parameters and buffers (state_dict order).
std::vector<torch::Tensor> state_of(const torch::nn::Module& model) {
  std::vector<torch::Tensor> tensors;
  for (const auto& item : cp::module_state(model)) tensors.push_back(item.tensor.clone());
  return tensors;
}

TEST_CASE("incremental: a model 90% frozen writes the changed tenth, and restores bitwise",
          "[checkpoint][incremental]") {
  for (const bool background : {false, true}) {
    CAPTURE(background);
    TempDir dir;
    CapturedLogger captured;
    Frozen run(1);
    auto options = options_for(dir.path, captured.logger);
    options.background = background;
    {
      CheckpointGuard guard(run.model, run.optimizer, options);
      for (int i = 0; i < 3; ++i) {
        run.train_step();
        guard.step();
      }
    }
    const auto paths = cp::committed_paths(dir.path);
    REQUIRE(paths.size() == 3);
    for (std::size_t i = 0; i < paths.size(); ++i) {
      CAPTURE(i);
      const auto manifest = manifest_of(paths[i]);
      CHECK(manifest["format_version"] == 4);
      CHECK(manifest["models"]["model"]["shared_file"] == shared_name);
      // Every file it names is listed with its size and checksum, the shared one too.
      const auto entry = entry_of(manifest, shared_name);
      REQUIRE(entry.is_object());
      const std::string bytes = read_text(paths[i] / shared_name);
      CHECK(entry["size"] == bytes.size());
      CHECK(entry["xxh3_64"] == cp::hex64(cp::checksum_of(bytes)));
      const auto own = entry_of(manifest, "model.safetensors")["size"].get<std::uint64_t>();
      CHECK(own < bytes.size() / 9);  // the head and the BatchNorm: a tenth of the model
      if (i == 0) {
        CHECK_FALSE(entry.contains("linked_from"));
        continue;
      }
      // Later commits link the first one's file: the same inode, and nothing of it written.
      CHECK(entry["linked_from"] == paths[i - 1].filename().string());
      CHECK(stat_of(paths[i] / shared_name).st_ino == stat_of(paths[0] / shared_name).st_ino);
      CHECK(written_bytes(manifest) < (bytes.size() + own) / 4);
    }
    CHECK(stat_of(paths[0] / shared_name).st_nlink == 3);
    CHECK(captured.sink->count(spdlog::level::info, "MiB unchanged, linked") == 2);

    // A new program restores it bitwise, the optimizer's momentum included: one more step on
    // both sides ends equal.
    Frozen restored(2);
    CHECK(restore_into(restored, options_for(dir.path)) == std::make_pair(true, std::int64_t{3}));
    CHECK(same_parameters(*restored.model, *run.model));
    torch::manual_seed(5);
    run.train_step();
    torch::manual_seed(5);
    restored.train_step();
    CHECK(same_parameters(*restored.model, *run.model));
  }
}

TEST_CASE("incremental: with nothing frozen a save writes what a full save writes",
          "[checkpoint][incremental]") {
  std::map<bool, std::vector<nlohmann::json>> files;  // by incremental: each commit's files
  for (const bool incremental : {false, true}) {
    TempDir dir;
    Frozen run(1, /*frozen=*/false);
    auto options = options_for(dir.path);
    options.incremental = incremental;
    {
      CheckpointGuard guard(run.model, run.optimizer, options);
      for (int i = 0; i < 3; ++i) {
        run.train_step();
        guard.step();
      }
    }
    for (const auto& path : cp::committed_paths(dir.path)) {
      const auto manifest = manifest_of(path);
      CHECK_FALSE(manifest["models"]["model"].contains("shared_file"));
      nlohmann::json listed = nlohmann::json::array();
      for (const auto& file : manifest["files"]) {
        listed.push_back({file["name"], file["size"]});
      }
      files[incremental].push_back(listed);
    }
    Frozen restored(2, /*frozen=*/false);
    CHECK(restore_into(restored, options_for(dir.path)).second == 3);
    CHECK(same_parameters(*restored.model, *run.model));
  }
  CHECK(files[true].size() == 3);
  CHECK(files[true] == files[false]);
}

TEST_CASE(
    "incremental: BatchNorm statistics changed in place, with no version bumped, are written "
    "again",
    "[checkpoint][incremental]") {
  TempDir dir;
  torch::manual_seed(1);
  // A frozen layer (1 MiB) and a BatchNorm whose statistics (1.1 MiB) are a shared file's worth.
  torch::nn::Sequential model(
      torch::nn::Linear(512, 512),
      torch::nn::BatchNorm1d(torch::nn::BatchNormOptions(150000).affine(false)));
  for (auto& parameter : model->parameters()) parameter.requires_grad_(false);
  auto norm = model[1]->as<torch::nn::BatchNorm1d>();
  model->eval();
  auto options = options_for(dir.path);
  {
    CheckpointGuard guard(model, options);
    guard.step();  // 1: the frozen layer in the shared file, the statistics (no past) in its own
    guard.step();  // 2: the statistics unchanged, and outweighing what changed: a larger one
    guard.step();  // 3: linked
    norm->train();
    norm->forward(torch::randn({8, 150000}));  // in place, no version counter bumped
    REQUIRE_FALSE(torch::equal(norm->running_mean, torch::zeros({150000})));
    guard.step();  // 4: the statistics changed: written again
  }
  const auto paths = cp::committed_paths(dir.path);
  REQUIRE(paths.size() == 4);
  const auto sizes = [&](std::size_t i) {
    const auto manifest = manifest_of(paths[i]);
    return std::make_pair(entry_of(manifest, "model.safetensors")["size"].get<std::uint64_t>(),
                          entry_of(manifest, shared_name)["size"].get<std::uint64_t>());
  };
  CHECK(sizes(0).first > sizes(0).second);      // the statistics in its own file
  CHECK(sizes(1).first < sizes(1).second / 8);  // both in the shared one
  CHECK(entry_of(manifest_of(paths[2]), shared_name).contains("linked_from"));
  CHECK_FALSE(entry_of(manifest_of(paths[3]), shared_name).contains("linked_from"));
  CHECK(sizes(3) == sizes(0));

  // Each checkpoint restores the statistics it was saved with.
  for (const auto& [index, expected] :
       {std::pair{2, torch::zeros({150000})}, std::pair{3, norm->running_mean.clone()}}) {
    torch::nn::Sequential other(
        torch::nn::Linear(512, 512),
        torch::nn::BatchNorm1d(torch::nn::BatchNormOptions(150000).affine(false)));
    other[1]->as<torch::nn::BatchNorm1d>()->running_mean.fill_(7);
    auto restore = options_for(dir.path);
    restore.restore = paths[static_cast<std::size_t>(index)].filename().string();
    CheckpointGuard guard(other, restore);
    CHECK(torch::equal(other[1]->as<torch::nn::BatchNorm1d>()->running_mean, expected));
    CHECK(torch::equal(other[0]->as<torch::nn::Linear>()->weight,
                       model[0]->as<torch::nn::Linear>()->weight));
  }
}

TEST_CASE(
    "incremental: a frozen parameter that SGD still steps (its gradient kept) is written again",
    "[checkpoint][incremental]") {
  TempDir dir;
  torch::manual_seed(1);
  torch::nn::Linear layer(512, 512);
  torch::optim::SGD optimizer(layer->parameters(), torch::optim::SGDOptions(0.1).weight_decay(0.1));
  layer->forward(torch::randn({4, 512})).sum().backward();
  for (auto& parameter : layer->parameters()) parameter.requires_grad_(false);  // gradient kept
  auto options = options_for(dir.path);
  {
    CheckpointGuard guard(layer, optimizer, options);
    guard.step();  // 1: the "frozen" weight in the shared file
    const auto before = layer->weight.clone();
    optimizer.step();  // through .data(): the weight changes, its version counter does not
    REQUIRE_FALSE(torch::equal(layer->weight, before));
    guard.step();  // 2
  }
  const auto paths = cp::committed_paths(dir.path);
  REQUIRE(paths.size() == 2);
  CHECK_FALSE(entry_of(manifest_of(paths[1]), shared_name).contains("linked_from"));
  torch::nn::Linear other(512, 512);
  torch::optim::SGD other_optimizer(other->parameters(), 0.1);
  CheckpointGuard guard(other, other_optimizer, options_for(dir.path));
  CHECK(guard.current_step() == 2);
  CHECK(torch::equal(other->weight, layer->weight));
}

TEST_CASE("incremental: parameters frozen during a run go to a shared file, linked from then on",
          "[checkpoint][incremental]") {
  TempDir dir;
  Frozen run(1, /*frozen=*/false);
  {
    CheckpointGuard guard(run.model, run.optimizer, options_for(dir.path));
    run.train_step();
    guard.step();  // 1: nothing frozen, nothing shared
    for (auto& parameter : run.model->backbone()) {
      parameter.requires_grad_(false);
      parameter.mutable_grad() = torch::Tensor();  // SGD steps no parameter without a gradient
    }
    run.train_step();
    guard.step();  // 2: the backbone, frozen with no past, in a new shared file
    run.train_step();
    guard.step();  // 3: linked
  }
  const auto paths = cp::committed_paths(dir.path);
  REQUIRE(paths.size() == 3);
  CHECK(entry_of(manifest_of(paths[0]), shared_name).is_null());
  CHECK_FALSE(entry_of(manifest_of(paths[1]), shared_name).contains("linked_from"));
  CHECK(entry_of(manifest_of(paths[2]), shared_name).contains("linked_from"));
  Frozen restored(2, /*frozen=*/false);  // the optimizer of every parameter, as the run's
  CHECK(restore_into(restored, options_for(dir.path)).second == 3);
  CHECK(same_parameters(*restored.model, *run.model));
}

TEST_CASE(
    "incremental: a damaged shared file quarantines every checkpoint that names it, and the "
    "restore falls back to an intact one",
    "[checkpoint][incremental][corruption]") {
  for (const std::string damage : {"flipped byte", "truncated"}) {
    CAPTURE(damage);
    TempDir dir;
    Frozen run(1);
    std::vector<torch::Tensor> first;  // the state of the first checkpoint
    {
      auto options = options_for(dir.path);
      options.incremental = false;  // whole files: shares nothing
      CheckpointGuard guard(run.model, run.optimizer, options);
      run.train_step();
      guard.step();
      first = torchguard::testing::host_copies(run.model->parameters());
    }
    {
      CheckpointGuard guard(run.model, run.optimizer, options_for(dir.path));
      for (int i = 0; i < 3; ++i) {
        run.train_step();
        guard.step();  // 2 writes the shared file, 3 and 4 link it
      }
    }
    const auto newest = cp::committed_paths(dir.path).back();
    {
      const auto path = newest / shared_name;
      if (damage == "truncated") {
        fs::resize_file(path, fs::file_size(path) / 2);
      } else {
        std::fstream io(path, std::ios::in | std::ios::out | std::ios::binary);
        io.seekg(100000);
        const char byte = static_cast<char>(io.get());
        io.seekp(100000);
        io.put(static_cast<char>(~byte));
      }
    }
    CapturedLogger captured;
    Frozen restored(2);
    CHECK(restore_into(restored, options_for(dir.path, captured.logger)) ==
          std::make_pair(true, std::int64_t{1}));
    CHECK(torchguard::testing::bitwise_equal(restored.model->parameters(), first));
    INFO(captured.sink->dump());
    CHECK(captured.sink->count(spdlog::level::warn, "is damaged: shared.model.safetensors") == 3);
    const auto aside = cp::committed_paths(dir.path / "quarantine");
    REQUIRE(aside.size() == 3);
    for (const auto& path : aside) {
      CHECK_THAT(read_text(path / "QUARANTINE_REASON.txt"),
                 Contains(shared_name) &&
                     Contains(damage == "truncated" ? "truncated?" : "fails its checksum"));
    }
  }

  // No checkpoint without it: no resume, and a fresh start only when allowed, said in the log.
  TempDir dir;
  Frozen run(1);
  {
    CheckpointGuard guard(run.model, run.optimizer, options_for(dir.path));
    for (int i = 0; i < 2; ++i) {
      run.train_step();
      guard.step();
    }
  }
  fs::resize_file(dir.path / "ckpt-000002-step-2" / shared_name, 1000);
  Frozen restored(2);
  CHECK_THROWS_AS(restore_into(restored, options_for(dir.path)), NoValidCheckpointError);
  CapturedLogger captured;
  auto options = options_for(dir.path, captured.logger);
  options.allow_fresh_start = true;
  CHECK(restore_into(restored, options) == std::make_pair(false, std::int64_t{0}));
  CHECK(captured.sink->contains(spdlog::level::warn,
                                "no valid checkpoint in '" + dir.path.string() + "' (2 damaged"));
  CHECK(captured.sink->contains(spdlog::level::warn, "starting fresh because allow_fresh_start"));
}

TEST_CASE("incremental: retention removes names only, and the checkpoints kept still verify",
          "[checkpoint][incremental][retention]") {
  TempDir dir;
  Frozen run(1);
  auto options = options_for(dir.path);
  options.keep_last = 2;
  {
    CheckpointGuard guard(run.model, run.optimizer, options);
    for (int i = 0; i < 4; ++i) {
      run.train_step();
      guard.step();  // 1 writes the shared file; 2, 3 and 4 link it; 1 and 2 go
    }
  }
  auto paths = cp::committed_paths(dir.path);
  REQUIRE(paths.size() == 2);
  CHECK(paths[0].filename() == "ckpt-000003-step-3");
  CHECK(entry_of(manifest_of(paths[0]), shared_name)["linked_from"] == "ckpt-000002-step-2");
  CHECK(stat_of(paths[1] / shared_name).st_nlink == 2);
  for (const auto& path : paths) CHECK(problem_of(path).empty());
  // The file's first name went with the checkpoint that wrote it; a checkpoint removed by hand
  // takes only its own too.
  fs::remove_all(paths[0]);
  CHECK(stat_of(paths[1] / shared_name).st_nlink == 1);
  CHECK(problem_of(paths[1]).empty());
  Frozen restored(2);
  CHECK(restore_into(restored, options_for(dir.path)).second == 4);
  CHECK(same_parameters(*restored.model, *run.model));
}

TEST_CASE("incremental: a run without it reads an incremental directory, and the other way round",
          "[checkpoint][incremental]") {
  TempDir dir;
  std::vector<torch::Tensor> saved;  // the newest checkpoint's state, as its run left it
  // A run that resumes (bitwise) and saves twice.
  auto save_two = [&](bool incremental, std::uint64_t seed) {
    auto options = options_for(dir.path);
    options.incremental = incremental;
    Frozen run(seed);
    CheckpointGuard guard(run.model, run.optimizer, options);
    if (!saved.empty()) CHECK(torchguard::testing::bitwise_equal(state_of(*run.model), saved));
    for (int i = 0; i < 2; ++i) {
      run.train_step();
      guard.step();
    }
    saved = state_of(*run.model);
  };
  save_two(true, 1);   // 1 writes the shared file, 2 links it
  save_two(false, 2);  // 3, 4: whole files, none shared
  save_two(true, 3);   // 5 writes one afresh (the first after a restore), 6 links it
  const auto paths = cp::committed_paths(dir.path);
  REQUIRE(paths.size() == 6);
  const std::vector<std::string> expected = {"written", "linked",  "none",
                                             "none",    "written", "linked"};
  for (std::size_t i = 0; i < paths.size(); ++i) {
    CAPTURE(i);
    const auto entry = entry_of(manifest_of(paths[i]), shared_name);
    const std::string found = entry.is_null()                 ? "none"
                              : entry.contains("linked_from") ? "linked"
                                                              : "written";
    CHECK(found == expected[i]);
  }
  Frozen restored(4);
  auto options = options_for(dir.path);
  options.incremental = false;
  CHECK(restore_into(restored, options).second == 6);
  CHECK(torchguard::testing::bitwise_equal(state_of(*restored.model), saved));
}

// Run by the fault tests below in a child under tests/io_faults.c: saves steps 1 to 4 of a
// 90%-frozen model (filled from the step: Frozen::fill) in $TORCHGUARD_TEST_DIR, keeping the last
// two, and prints how each save ended.
TEST_CASE("incremental child: save steps 1 to 4", "[.incremental_child]") {
  const char* dir = std::getenv("TORCHGUARD_TEST_DIR");
  if (!dir) return;
  Frozen state(1);
  auto options = options_for(dir);
  options.keep_last = 2;
  CheckpointGuard guard(state.model, state.optimizer, options);
  for (std::int64_t step = 1; step <= 4; ++step) {
    state.fill(step);
    try {
      guard.set_step(step);
      guard.save();
      std::cout << "step " << step << ": saved" << std::endl;
    } catch (const CheckpointError& e) {
      std::cout << "step " << step << ": " << e.what() << std::endl;
    }
  }
}

// The checks after a child was stopped: the directory restores to one of `steps`, bitwise, with
// nothing quarantined, no temporary left, every checkpoint verifying. Returns the step.
std::int64_t check_restores(const fs::path& dir, const std::vector<std::int64_t>& steps) {
  Frozen restored(2);
  const auto [resumed, step] = restore_into(restored, options_for(dir));
  CHECK(resumed);
  CHECK(std::find(steps.begin(), steps.end(), step) != steps.end());
  Frozen expected(1);
  expected.fill(step);
  CHECK(same_parameters(*restored.model, *expected.model));
  CHECK_FALSE(fs::exists(dir / "quarantine"));
  for (const auto& name : torchguard::testing::names_in(dir)) {
    CHECK((name == ".lock" || cp::parse_sequence(name).has_value()));
  }
  for (const auto& path : cp::committed_paths(dir)) CHECK(problem_of(path).empty());
  return step;
}

TEST_CASE(
    "incremental: SIGKILL at every step of a commit that links and of the retention after it "
    "leaves the old checkpoint or the new one",
    "[checkpoint][incremental][faults]") {
  // Commit 3 links commit 2's shared file; retention then removes commit 1 (keep_last 2).
  struct Point {
    std::string call, part;
    int first;            // the first matching call to kill at
    int most;             // at most this many, one run each, until the rule no longer fires
    std::int64_t newest;  // the newest checkpoint left
  };
  const std::vector<Point> points = {
      {"write", "step-3", 0, 1, 2},   // the commit's first write: its temporary holds nothing whole
      {"fsync", "step-3", 0, 12, 2},  // each file's, the temporary directory's
      {"link", "step-3", 0, 4, 2},    // the shared file, linked
      {"rename", "step-3", 0, 1, 2},  // the commit
      {"fsync", "/checkpoints$", 2, 1, 3},  // the directory's after it (commits 1 and 2 had theirs)
      {"rename", ".trash-ckpt-000001", 0, 1, 3},     // retention: the oldest renamed to .trash-
      {"unlinkat", ".trash-ckpt-000001", 0, 12, 3},  // its names, one at a time
      {"remove", ".trash-ckpt-000001", 0, 2, 3},     // the directory itself
  };
  std::map<std::string, int> kills;
  for (const auto& point : points) {
    for (int skip = point.first; skip < point.first + point.most; ++skip) {
      const std::string rule = fmt::format("{}:{}:KILL:{}:1", point.call, point.part, skip);
      CAPTURE(rule);
      TempDir dir;
      const auto checkpoints = dir.path / "checkpoints";
      const auto child = torchguard::testing::run_with_faults(
          "[.incremental_child]", rule, {"TORCHGUARD_TEST_DIR=" + checkpoints.string()});
      INFO(child.output);
      if (child.exit_status == 0) {  // the rule fires no more: the run ended whole
        CHECK_THAT(child.output, !Contains("io_faults:") && Contains("step 4: saved"));
        break;
      }
      REQUIRE(child.signal == SIGKILL);
      CHECK_THAT(child.output, Contains("-> SIGKILL") && Contains("step 2: saved"));
      ++kills[point.call + " " + point.part];
      CHECK(check_restores(checkpoints, {point.newest}) == point.newest);
    }
  }
  INFO("kills: " << nlohmann::json(kills).dump());
  // Each point was reached (the directory's own removal may be an unlinkat too).
  for (const auto& point : points) {
    if (point.call != "remove") CHECK(kills[point.call + " " + point.part] > 0);
  }
  // Each written file's (the model's own, the optimizer's, extra, the manifest), the temporary's.
  CHECK(kills["fsync step-3"] >= 5);
  CHECK(kills["unlinkat .trash-ckpt-000001"] >= 5);  // the model's two files, and three more
}

TEST_CASE(
    "incremental: a full disk while linking fails the save clearly, the checkpoints before stay, "
    "and the next save writes whole",
    "[checkpoint][incremental][faults]") {
  TempDir dir;
  const auto child =
      torchguard::testing::run_with_faults("[.incremental_child]", "link:step-3:ENOSPC:0:1",
                                           {"TORCHGUARD_TEST_DIR=" + dir.path.string()});
  INFO(child.output);
  REQUIRE(child.exit_status == 0);
  CHECK_THAT(
      child.output,
      Contains("step 2: saved") &&
          Contains("step 3: CheckpointGuard: cannot save the checkpoint of step 3") &&
          Contains("cannot link '" + (dir.path / "ckpt-000002-step-2" / shared_name).string()) &&
          Contains("No space left on device (the previous checkpoints are intact)") &&
          Contains("step 4: saved"));
  const auto paths = cp::committed_paths(dir.path);
  REQUIRE(paths.size() == 2);
  CHECK(paths[0].filename() == "ckpt-000002-step-2");
  CHECK(paths[1].filename() == "ckpt-000004-step-4");
  CHECK_FALSE(entry_of(manifest_of(paths[1]), shared_name).contains("linked_from"));
  CHECK(check_restores(dir.path, {4}) == 4);
  // The checkpoint before the failure restores as it was.
  Frozen restored(2);
  auto options = options_for(dir.path);
  options.restore = "2";
  CHECK(restore_into(restored, options).second == 2);
  Frozen expected(1);
  expected.fill(2);
  CHECK(same_parameters(*restored.model, *expected.model));
}

TEST_CASE("incremental: where a file may have no more links, the shared file is copied",
          "[checkpoint][incremental][faults]") {
  TempDir dir;
  const auto child =
      torchguard::testing::run_with_faults("[.incremental_child]", "link:step-3:EMLINK:0:1",
                                           {"TORCHGUARD_TEST_DIR=" + dir.path.string()});
  INFO(child.output);
  REQUIRE(child.exit_status == 0);
  CHECK_THAT(child.output, Contains("io_faults: link(") && Contains("step 3: saved") &&
                               Contains("step 4: saved"));
  const auto paths = cp::committed_paths(dir.path);
  REQUIRE(paths.size() == 2);
  CHECK_FALSE(entry_of(manifest_of(paths[0]), shared_name).contains("linked_from"));  // a copy
  CHECK(entry_of(manifest_of(paths[1]), shared_name)["linked_from"] == "ckpt-000003-step-3");
  CHECK(stat_of(paths[1] / shared_name).st_nlink == 2);
  CHECK(check_restores(dir.path, {4}) == 4);
}

TEST_CASE(
    "interop: Python opens every incremental checkpoint as a whole state, and each of its files "
    "is safetensors",
    "[checkpoint][python][interop]") {
  const std::string python = torchguard::testing::libtorch_python("torchguard, safetensors");
  if (python.empty()) return;  // skipped
  TempDir dir;
  fs::create_directory(dir.path / "references");
  Frozen run(1);
  {
    auto options = options_for(dir.path / "checkpoints");
    CheckpointGuard guard(run.model, run.optimizer, options);
    for (int i = 0; i < 3; ++i) {
      run.train_step();
      guard.step();
      // The whole state at that step, in one file, as the reference.
      torchguard::TensorMap state;
      for (const auto& item : cp::module_state(*run.model)) state[item.name] = item.tensor;
      const auto name = cp::committed_paths(dir.path / "checkpoints").back().filename().string();
      torchguard::save_safetensors(dir.path / "references" / (name + ".safetensors"), state);
    }
  }
  const auto [output, passed] = torchguard::testing::command_output(
      fmt::format("{} {}/incremental_interop.py '{}' '{}' 2>&1", python, TORCHGUARD_TESTS_DIR,
                  (dir.path / "checkpoints").string(), (dir.path / "references").string()));
  INFO(output);
  CHECK(passed);
  CHECK_THAT(output, Contains("ckpt-000001-step-1: 11 tensors, 4 of them in " +
                              std::string(shared_name) + " (written)") &&
                         Contains("ckpt-000003-step-3: 11 tensors, 4 of them in " +
                                  std::string(shared_name) + " (linked from ckpt-000002-step-2)"));
}

}  // namespace incremental_test
