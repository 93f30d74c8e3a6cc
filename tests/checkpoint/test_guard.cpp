// checkpoint/guard.hpp: CheckpointGuard restores the newest valid checkpoint on entry and saves
// on exit: resume, retention, damage, failures of the disk, a writer killed at any moment. A
// whole program's named parts, settings and end are in test_guard_parts.cpp.
#include "torchguard/checkpoint.hpp"

#include <poll.h>
#include <signal.h>
#include <sys/fsuid.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include "checkpoint_support.hpp"
#include "torchguard/core.hpp"
#include "torchguard/core/guard.hpp"
#include "torchguard/data.hpp"

namespace fs = std::filesystem;
using torchguard::CheckpointError;
using torchguard::CheckpointGuard;
using torchguard::CheckpointOptions;
using torchguard::Outcome;
using torchguard::SaveOnExit;
using torchguard::testing::CapturedLogger;
using torchguard::testing::checkpoint_dirs;
using torchguard::testing::commit;
using torchguard::testing::Contains;
using torchguard::testing::make_checkpoints;
using torchguard::testing::names_in;
using torchguard::testing::Net;
using torchguard::testing::quiet_options;
using torchguard::testing::Run;
using torchguard::testing::same_parameters;
using torchguard::testing::TempDir;
using torchguard::testing::with_file_size_limit;

static_assert(torchguard::is_guard_v<torchguard::CheckpointGuard>);

namespace {

// Restores into a new run from `dir` without saving at exit; returns the restored step.
std::int64_t restored_step(const fs::path& dir, CapturedLogger& captured) {
  Run run(999);
  auto options = run.options(dir, captured.logger);
  options.save_on_exit = SaveOnExit::never;
  CheckpointGuard guard(run.model, *run.optimizer, options);
  return guard.current_step();
}

}  // namespace

TEST_CASE("the seed's form starts fresh, saves at exit, and resumes", "[checkpoint]") {
  TempDir dir;
  CapturedLogger captured;
  torchguard::set_default_logger(captured.logger);
  Run first(1);
  {
    CheckpointGuard guard(first.model, *first.optimizer, dir.path / "checkpoint.pt");
    CHECK_FALSE(guard.resumed());
    CHECK(captured.sink->contains(spdlog::level::info, "starting fresh"));
    for (int i = 0; i < 4; ++i) first.train_step();
  }
  Run second(2);
  CHECK_FALSE(same_parameters(*first.model, *second.model));
  {
    CheckpointGuard guard(second.model, *second.optimizer, dir.path / "checkpoint.pt");
    CHECK(guard.resumed());
  }
  CHECK(same_parameters(*first.model, *second.model));
  CHECK(captured.sink->contains(spdlog::level::info, "resumed from step 0"));
  torchguard::set_default_logger(nullptr);
}

TEST_CASE("a checkpoint holds step, epoch, metrics, metadata, optimizer and scheduler",
          "[checkpoint]") {
  TempDir dir;
  CapturedLogger captured;
  Run first(1);
  {
    auto options = first.options(dir.path, captured.logger);
    CheckpointGuard guard(first.model, *first.optimizer, options);
    for (int i = 0; i < 5; ++i) {
      first.train_step();
      guard.step({{"loss", 0.5 + i}});
    }
    guard.set_epoch(2);
    guard.metadata()["dataset"] = "synthetic";
  }
  Run second(2);
  auto options = second.options(dir.path, captured.logger);
  options.save_on_exit = SaveOnExit::never;
  CheckpointGuard guard(second.model, *second.optimizer, options);
  CHECK(guard.current_step() == 5);
  CHECK(guard.epoch() == 2);
  CHECK(guard.resumed_metrics()["loss"] == 4.5);
  CHECK(guard.metrics().empty());  // the next checkpoint does not inherit them
  CHECK(guard.metadata()["dataset"] == "synthetic");
  // The learning rate decayed once (StepLR every 3 steps): the group settings came back.
  const auto& group_options =
      static_cast<torch::optim::AdamOptions&>(second.optimizer->param_groups()[0].options());
  CHECK(std::abs(group_options.lr() - 1e-2 * 0.5) < 1e-12);
  REQUIRE(second.optimizer->state().size() == first.optimizer->state().size());
  // Adam's moments and step count came back for every parameter.
  const auto first_parameters = first.model->parameters();
  const auto second_parameters = second.model->parameters();
  for (std::size_t i = 0; i < first_parameters.size(); ++i) {
    using Map = std::decay_t<decltype(first.optimizer->state())>;
    const auto& a = static_cast<torch::optim::AdamParamState&>(*first.optimizer->state().at(
        torchguard::detail::optimizer_state_key<Map>(first_parameters[i])));
    const auto& b = static_cast<torch::optim::AdamParamState&>(*second.optimizer->state().at(
        torchguard::detail::optimizer_state_key<Map>(second_parameters[i])));
    CHECK(a.step() == b.step());
    CHECK(torch::equal(a.exp_avg(), b.exp_avg()));
    CHECK(torch::equal(a.exp_avg_sq(), b.exp_avg_sq()));
  }
}

TEST_CASE("resume is exact: N steps straight equal N/2, a restart, and N/2 more",
          "[checkpoint][resume]") {
  torch::set_num_threads(1);
  constexpr int steps = 12;
  TempDir dir;
  CapturedLogger captured;

  torch::manual_seed(123);  // the data's and dropout's RNG starts the same in both runs
  Run straight(7);
  torch::manual_seed(123);
  for (int i = 0; i < steps; ++i) straight.train_step();

  {
    Run half(7);
    torch::manual_seed(123);
    CheckpointGuard guard(half.model, *half.optimizer, half.options(dir.path, captured.logger));
    for (int i = 0; i < steps / 2; ++i) {
      half.train_step();
      guard.step();
    }
  }                         // everything destroyed: saved at exit
  torch::manual_seed(555);  // the restart must not depend on the RNG state it finds
  Run resumed(8);
  {
    CheckpointGuard guard(resumed.model, *resumed.optimizer,
                          resumed.options(dir.path, captured.logger));
    REQUIRE(guard.current_step() == steps / 2);
    for (int i = 0; i < steps / 2; ++i) {
      resumed.train_step();
      guard.step();
    }
  }
  CHECK(same_parameters(*straight.model, *resumed.model));
  const auto lr = [](Run& run) {
    return static_cast<torch::optim::AdamOptions&>(run.optimizer->param_groups()[0].options()).lr();
  };
  CHECK(lr(straight) == lr(resumed));
}

TEST_CASE("step() saves every N steps and on a stop request", "[checkpoint]") {
  TempDir dir;
  CapturedLogger captured;
  Run run(1);
  auto options = run.options(dir.path, captured.logger);
  options.every_n_steps = 3;
  options.keep_last = 10;
  options.save_on_exit = SaveOnExit::never;
  bool external_stop = false;
  options.stop_requested = [&] { return external_stop; };
  {
    CheckpointGuard guard(run.model, *run.optimizer, options);
    std::vector<bool> saved;
    for (int i = 0; i < 7; ++i) saved.push_back(guard.step().saved);
    CHECK(saved == std::vector<bool>{false, false, true, false, false, true, false});
    CHECK(checkpoint_dirs(dir.path).size() == 2);
    external_stop = true;
    const auto result = guard.step();
    CHECK(result.saved);
    CHECK(result.stop);
    CHECK(guard.list().back().step == 8);
    CHECK(captured.sink->contains(spdlog::level::warn, "stop requested"));
    // A loop that goes on after the stop saves on its schedule, not at every step.
    CHECK(guard.step().saved);  // step 9: due
    const auto after = guard.step();
    CHECK(after.stop);
    CHECK_FALSE(after.saved);
    CHECK(checkpoint_dirs(dir.path).size() == 4);
  }

  CheckpointGuard flagged(run.model, *run.optimizer, options);
  external_stop = false;
  flagged.request_stop();
  CHECK(flagged.step().stop);
}

TEST_CASE("a cancelled stop_token stops the loop with a checkpoint", "[checkpoint]") {
  TempDir dir;
  CapturedLogger captured;
  Run run(1);
  torchguard::CancellationSource source;
  auto options = run.options(dir.path, captured.logger);
  options.save_on_exit = SaveOnExit::never;
  options.stop_token = source.token();
  CheckpointGuard guard(run.model, *run.optimizer, options);
  CHECK_FALSE(guard.step().stop);
  CHECK(guard.list().empty());
  source.cancel();
  const auto result = guard.step();
  CHECK(result.stop);
  CHECK(result.saved);
  CHECK(guard.list().back().step == 2);
}

TEST_CASE("a moved guard saves once, from its new owner", "[checkpoint]") {
  TempDir dir, other_dir;
  CapturedLogger captured;
  Run run(1);
  auto options = run.options(dir.path, captured.logger);
  options.background = true;
  options.keep_last = 10;
  {
    CheckpointGuard first(run.model, *run.optimizer, options);
    first.step();
    CheckpointGuard second(std::move(first));
    second.step();
    second.save();  // written by the writer thread the moved state owns
    CheckpointGuard third(run.model, *run.optimizer, run.options(other_dir.path, captured.logger));
    third = std::move(second);  // closes third's own work (an exit save), takes second's
    CHECK(third.current_step() == 2);
    third.step();
  }  // third saves step 3; the moved-from guards do nothing
  auto steps = [](const fs::path& path) {
    std::vector<std::int64_t> found;
    for (const auto& info : torchguard::detail::list_committed(path)) found.push_back(info.step);
    return found;
  };
  CHECK(steps(dir.path) == std::vector<std::int64_t>{2, 3});
  CHECK(steps(other_dir.path) == std::vector<std::int64_t>{0});
}

TEST_CASE("the exit policy: always, on success, never", "[checkpoint]") {
  CapturedLogger captured;
  for (auto policy : {SaveOnExit::always, SaveOnExit::on_success, SaveOnExit::never}) {
    for (bool fail : {false, true}) {
      TempDir dir;
      Run run(1);
      auto options = run.options(dir.path, captured.logger);
      options.save_on_exit = policy;
      try {
        CheckpointGuard guard(run.model, *run.optimizer, options);
        if (fail) throw std::runtime_error("training failed");
      } catch (const std::runtime_error&) {
      }
      const bool expected =
          policy == SaveOnExit::always || (policy == SaveOnExit::on_success && !fail);
      CHECK(checkpoint_dirs(dir.path).size() == (expected ? 1u : 0u));
    }
  }
}

TEST_CASE("the exit save is skipped when step() just saved the same step", "[checkpoint]") {
  TempDir dir;
  CapturedLogger captured;
  Run run(1);
  auto options = run.options(dir.path, captured.logger);
  options.every_n_steps = 2;
  options.keep_last = 10;
  {
    CheckpointGuard guard(run.model, *run.optimizer, options);
    guard.step();
    guard.step();  // saves step 2
  }
  CHECK(checkpoint_dirs(dir.path).size() == 1);
}

TEST_CASE("a finished run started again does not write another checkpoint of its step",
          "[checkpoint]") {
  TempDir dir;
  CapturedLogger captured;
  Run run(1);
  auto options = run.options(dir.path, captured.logger);
  options.keep_last = 10;
  options.every_n_steps = 2;
  {
    CheckpointGuard guard(run.model, *run.optimizer, options);
    for (int i = 0; i < 4; ++i) {
      run.train_step();
      guard.step();
    }
  }
  REQUIRE(checkpoint_dirs(dir.path).size() == 2);  // steps 2 and 4
  for (int rerun = 0; rerun < 2; ++rerun) {        // nothing left to do: no new checkpoint
    Run again(2);
    auto again_options = again.options(dir.path, captured.logger);
    again_options.keep_last = 10;
    CheckpointGuard guard(again.model, *again.optimizer, again_options);
    CHECK(guard.current_step() == 4);
    guard.close(Outcome::success);
  }
  CHECK(checkpoint_dirs(dir.path).size() == 2);
  CHECK(captured.sink->count(spdlog::level::info, "step 4 is as it was restored") == 2);

  SECTION("a loop that trains without step() still saves what it trained") {
    Run again(3);
    auto again_options = again.options(dir.path, captured.logger);
    again_options.keep_last = 10;
    {
      CheckpointGuard guard(again.model, *again.optimizer, again_options);
      again.train_step();  // no guard.step(): the step stays 4, the state does not
    }
    const auto dirs = checkpoint_dirs(dir.path);
    REQUIRE(dirs.size() == 3);
    CHECK(dirs.back().filename().string().find("-step-4") != std::string::npos);
    Run restored(4);
    auto restored_options = restored.options(dir.path, captured.logger);
    restored_options.save_on_exit = SaveOnExit::never;
    CheckpointGuard guard(restored.model, *restored.optimizer, restored_options);
    CHECK(same_parameters(*restored.model, *again.model));
  }
  SECTION("changed metadata is saved") {
    Run again(3);
    auto again_options = again.options(dir.path, captured.logger);
    again_options.keep_last = 10;
    {
      CheckpointGuard guard(again.model, *again.optimizer, again_options);
      guard.metadata()["note"] = "evaluated";
    }
    CHECK(checkpoint_dirs(dir.path).size() == 3);
  }
}

TEST_CASE("a guard shares ownership of a shared model, optimizer, scheduler and module",
          "[checkpoint]") {
  TempDir dir;
  CapturedLogger captured;
  torchguard::ScopeStack stack;
  std::weak_ptr<torch::optim::Optimizer> optimizer_alive;
  torch::Tensor trained;
  {
    // Built in an inner scope, as a training function would: only the guard keeps them.
    torch::manual_seed(5);
    Net model;
    auto optimizer =
        std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
    auto scheduler = std::make_shared<torch::optim::StepLR>(*optimizer, 2, 0.5);
    CheckpointOptions options;
    options.directory = dir.path;
    options.logger = captured.logger;
    options.scheduler = scheduler;
    options.modules.emplace("head", std::make_shared<torch::nn::LinearImpl>(2, 2));
    auto& guard = stack.emplace<CheckpointGuard>(model, optimizer, options);
    optimizer->zero_grad();
    model->forward(torch::randn({4, 8})).sum().backward();
    optimizer->step();
    scheduler->step();
    guard.step();
    trained = model->fc1->weight.detach().clone();
    optimizer_alive = optimizer;
  }
  CHECK_FALSE(optimizer_alive.expired());  // the guard holds it
  stack.close();                           // saves at exit, from the objects it kept alive
  CHECK(optimizer_alive.expired());
  REQUIRE(checkpoint_dirs(dir.path).size() == 1);
  Net restored;
  CheckpointOptions options;
  options.directory = dir.path;
  options.logger = captured.logger;
  options.save_on_exit = SaveOnExit::never;
  options.modules.emplace("head", torch::nn::Linear(2, 2));
  torch::optim::SGD optimizer(restored->parameters(), torch::optim::SGDOptions(0.1));
  CheckpointGuard guard(restored, optimizer, options);
  CHECK(torch::equal(restored->fc1->weight, trained));

  // Borrowed forms say so; shared forms keep a count.
  torch::optim::SGD& borrowed = optimizer;
  CHECK_FALSE(torchguard::OptimizerRef(borrowed).shared());
  CHECK(torchguard::ModuleRef(restored).shared());
  CHECK_FALSE(torchguard::SchedulerRef(nullptr));
}

TEST_CASE("retention keeps the last N and the best K, never a NaN, never the resumed one",
          "[checkpoint][retention]") {
  TempDir dir;
  CapturedLogger captured;
  Run run(1);
  {
    auto options = run.options(dir.path, captured.logger);
    options.keep_last = 2;
    options.keep_best = 1;
    options.best_metric = "val_loss";
    options.every_n_steps = 1;
    options.save_on_exit = SaveOnExit::never;
    CheckpointGuard guard(run.model, *run.optimizer, options);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (double loss : {0.9, 0.2, nan, 0.7, 0.8, 0.6}) guard.step({{"val_loss", loss}});
    std::vector<std::int64_t> steps;
    for (const auto& info : guard.list()) steps.push_back(info.step);
    // step 2 is the best (0.2; the NaN at step 3 never is), 5 and 6 the last two
    CHECK(steps == std::vector<std::int64_t>{2, 5, 6});
  }
  {
    auto options = run.options(dir.path, captured.logger);
    options.keep_last = 1;
    options.every_n_steps = 1;
    options.save_on_exit = SaveOnExit::never;
    CheckpointGuard guard(run.model, *run.optimizer, options);  // resumes from step 6
    guard.step();
    guard.step();
    std::vector<std::int64_t> steps;
    for (const auto& info : guard.list()) steps.push_back(info.step);
    CHECK(steps == std::vector<std::int64_t>{6, 8});  // 6: training resumed from it
  }
}

TEST_CASE("a truncated or corrupted file is detected and the previous checkpoint loads",
          "[checkpoint][corruption]") {
  for (const std::string file :
       {"model.safetensors", "optimizer.safetensors", "extra.safetensors", "manifest.json"}) {
    for (const bool truncate : {true, false}) {
      DYNAMIC_SECTION(file << (truncate ? " truncated" : " with a flipped byte")) {
        TempDir dir;
        Run run(1);
        make_checkpoints(dir.path, 2, run);
        const fs::path newest = checkpoint_dirs(dir.path).back();
        const fs::path target = newest / file;
        const auto size = fs::file_size(target);
        if (truncate) {
          fs::resize_file(target, size / 2);
        } else {
          std::fstream io(target, std::ios::in | std::ios::out | std::ios::binary);
          io.seekg(static_cast<std::streamoff>(size / 2));
          char byte = 0;
          io.get(byte);
          io.seekp(static_cast<std::streamoff>(size / 2));
          io.put(static_cast<char>(byte ^ 0x20));
        }
        CapturedLogger captured;
        CHECK(restored_step(dir.path, captured) == 1);
        CHECK(captured.sink->contains(spdlog::level::warn, "is damaged"));
        const fs::path aside = dir.path / "quarantine" / newest.filename();
        CHECK(fs::exists(aside / file));  // moved aside, never deleted
        CHECK_FALSE(fs::exists(newest));
        CHECK_FALSE(torchguard::testing::read_text(aside / "QUARANTINE_REASON.txt").empty());
      }
    }
  }
}

TEST_CASE("checkpoints that exist but none valid: a clear error, or a fresh start if allowed",
          "[checkpoint][corruption]") {
  TempDir dir;
  Run run(1);
  make_checkpoints(dir.path, 1, run);
  fs::resize_file(checkpoint_dirs(dir.path).back() / "model.safetensors", 10);
  CapturedLogger captured;
  Run fresh(2);
  auto options = fresh.options(dir.path, captured.logger);
  options.save_on_exit = SaveOnExit::never;
  CHECK_THROWS_WITH(
      CheckpointGuard(fresh.model, *fresh.optimizer, options),
      Contains("no valid checkpoint") && Contains("1 damaged") && Contains("allow_fresh_start"));
  CHECK(checkpoint_dirs(dir.path).empty());  // moved aside ...
  CHECK(fs::exists(dir.path / "quarantine"));
  // ... and a rerun still refuses to start over them,
  CHECK_THROWS_WITH(CheckpointGuard(fresh.model, *fresh.optimizer, options),
                    Contains("no valid checkpoint"));
  // unless told to, and then says so.
  options.allow_fresh_start = true;
  CheckpointGuard guard(fresh.model, *fresh.optimizer, options);
  CHECK_FALSE(guard.resumed());
  CHECK(captured.sink->contains(spdlog::level::warn, "starting fresh because allow_fresh_start"));
}

TEST_CASE("an unreadable file is an error, not damage: the checkpoint is not moved",
          "[checkpoint][corruption]") {
  if (::geteuid() == 0) ::setfsuid(65534);  // root reads everything: read as nobody
  struct RestoreFsuid {
    ~RestoreFsuid() {
      if (::geteuid() == 0) ::setfsuid(0);
    }
  } restore_fsuid;
  TempDir dir;
  fs::permissions(dir.path, fs::perms::all);
  Run run(1);
  make_checkpoints(dir.path, 1, run);
  const fs::path newest = checkpoint_dirs(dir.path).back();
  fs::permissions(newest / "model.safetensors", fs::perms::none);
  CapturedLogger captured;
  Run fresh(2);
  auto options = fresh.options(dir.path, captured.logger);
  options.save_on_exit = SaveOnExit::never;
  CHECK_THROWS_WITH(CheckpointGuard(fresh.model, *fresh.optimizer, options),
                    Contains("cannot read checkpoint") && Contains("Permission denied"));
  CHECK(fs::exists(newest));
  CHECK_FALSE(fs::exists(dir.path / "quarantine"));
}

TEST_CASE("a checkpoint of another model is a clear error and stays where it is", "[checkpoint]") {
  TempDir dir;
  Run run(1);
  make_checkpoints(dir.path, 1, run);
  CapturedLogger captured;
  torch::nn::Linear other(3, 3);
  torch::optim::SGD optimizer(other->parameters(), 0.1);
  CheckpointOptions options;
  options.directory = dir.path;
  options.logger = captured.logger;
  CHECK_THROWS_WITH(CheckpointGuard(other, optimizer, options),
                    Contains("is intact but does not fit this program's parts") &&
                        Contains("does not fit the module"));
  CHECK(checkpoint_dirs(dir.path).size() == 1);
}

TEST_CASE("leftover temporaries of an interrupted save are removed at start-up", "[checkpoint]") {
  TempDir dir;
  const fs::path leftover = dir.path / ".tmp-ckpt-000007-step-70-12345";
  fs::create_directories(leftover);
  std::ofstream(leftover / "model.pt") << "partial";
  CapturedLogger captured;
  Run run(1);
  auto options = run.options(dir.path, captured.logger);
  options.save_on_exit = SaveOnExit::never;
  CheckpointGuard guard(run.model, *run.optimizer, options);
  CHECK_FALSE(fs::exists(leftover));
  CHECK_FALSE(guard.resumed());
}

TEST_CASE("bad options are rejected with a message naming them", "[checkpoint]") {
  TempDir dir;
  Run run(1);
  CheckpointOptions options;
  options.directory = dir.path;
  options.keep_last = 0;
  CHECK_THROWS_WITH(CheckpointGuard(run.model, *run.optimizer, options), Contains("keep_last"));
  options.keep_last = 1;
  options.keep_best = 2;
  CHECK_THROWS_WITH(CheckpointGuard(run.model, *run.optimizer, options), Contains("best_metric"));
  std::ofstream(dir.path / "checkpoint.pt") << "a torch::save file";
  CHECK_THROWS_WITH(CheckpointGuard(run.model, *run.optimizer, dir.path / "checkpoint.pt"),
                    Contains("is a file, not a checkpoint directory"));
}

TEST_CASE("extra modules and tensors are saved and restored by name", "[checkpoint]") {
  TempDir dir;
  CapturedLogger captured;
  torch::manual_seed(1);
  torch::nn::Linear model(4, 4), ema(4, 4);
  torch::Tensor counts = torch::arange(5);
  {
    CheckpointOptions options;
    options.directory = dir.path;
    options.logger = captured.logger;
    options.modules.emplace("ema", ema);
    options.tensors.emplace("counts", counts);
    CheckpointGuard guard(model, options);
  }
  torch::manual_seed(2);
  torch::nn::Linear model2(4, 4), ema2(4, 4);
  torch::Tensor counts2 = torch::zeros({5}, torch::kLong);
  CheckpointOptions options;
  options.directory = dir.path;
  options.logger = captured.logger;
  options.save_on_exit = SaveOnExit::never;
  options.modules.emplace("ema", ema2);
  options.tensors.emplace("counts", counts2);
  CheckpointGuard guard(model2, options);
  CHECK(same_parameters(*ema, *ema2));
  CHECK(same_parameters(*model, *model2));
  CHECK(torch::equal(counts, counts2));  // restored in place: the caller's tensor changed
}

TEST_CASE("a non-writing process restores but never writes and after_save runs everywhere",
          "[checkpoint]") {
  TempDir dir;
  CapturedLogger captured;
  Run run(1);
  make_checkpoints(dir.path, 1, run);
  Run other(2);
  auto options = other.options(dir.path, captured.logger);
  options.is_writer = [] { return false; };
  int fences = 0;
  options.after_save = [&] { ++fences; };
  {
    CheckpointGuard guard(other.model, *other.optimizer, options);
    CHECK(guard.current_step() == 1);
    guard.save();
    CHECK(fences == 1);
    guard.step();
  }
  CHECK(fences == 2);  // the explicit save point and the exit's
  CHECK(checkpoint_dirs(dir.path).size() == 1);
}

TEST_CASE("a write failure (file size limit) leaves the previous checkpoint intact",
          "[checkpoint][failure]") {
  TempDir dir;
  CapturedLogger captured;
  Run run(1);
  make_checkpoints(dir.path, 1, run);
  {
    auto options = run.options(dir.path, captured.logger);
    options.save_on_exit = SaveOnExit::never;
    CheckpointGuard guard(run.model, *run.optimizer, options);
    run.train_step();
    guard.step();
    with_file_size_limit(1024, [&] {
      CHECK_THROWS_WITH(guard.save(), Contains("cannot save the checkpoint of step 2") &&
                                          Contains("File too large") &&
                                          Contains("previous checkpoints are intact"));
    });
  }
  CHECK(checkpoint_dirs(dir.path).size() == 1);
  for (const auto& entry : fs::directory_iterator(dir.path)) {
    CHECK(entry.path().filename().string().rfind(".tmp-", 0) != 0);  // no temporary left
  }
  CHECK(restored_step(dir.path, captured) == 1);
}

TEST_CASE("a full disk makes the save fail clearly and the checkpoint stays",
          "[checkpoint][failure]") {
  TempDir dir;
  const fs::path small = dir.path / "small-disk";
  fs::create_directories(small);
  // A 128 KiB file system (needs the privilege to mount: root in CI).
  if (::system(
          ("mount -t tmpfs -o size=128k tmpfs '" + small.string() + "' 2>/dev/null").c_str()) !=
      0) {
    std::cout << "SKIPPED: cannot mount a small tmpfs here (not privileged)" << std::endl;
    return;
  }
  struct Unmount {
    fs::path path;
    ~Unmount() {
      [[maybe_unused]] int ignored = ::system(("umount '" + path.string() + "'").c_str());
    }
  } unmount{small};
  CapturedLogger captured;
  torch::nn::Linear model(4, 4);
  torch::Tensor blob = torch::zeros({1024});
  CheckpointOptions options;
  options.directory = small / "checkpoints";
  options.logger = captured.logger;
  options.keep_last = 5;
  options.save_on_exit = SaveOnExit::never;
  options.tensors.emplace("blob", blob);
  {
    CheckpointGuard guard(model, options);
    guard.save();                // fits
    blob.resize_({256 * 1024});  // 1 MiB: does not
    CHECK_THROWS_WITH(guard.save(), Contains("No space left on device") && Contains("intact"));
  }
  torch::Tensor restored_blob = torch::ones({1024});
  options.tensors.clear();
  options.tensors.emplace("blob", restored_blob);
  CheckpointGuard guard(model, options);
  CHECK(guard.resumed());
  CHECK(torch::equal(restored_blob, torch::zeros({1024})));
}

TEST_CASE("a read-only directory makes the save fail clearly and the checkpoint stays",
          "[checkpoint][failure]") {
  TempDir dir;
  CapturedLogger captured;
  Run run(1);
  const fs::path checkpoints = dir.path / "checkpoints";
  make_checkpoints(checkpoints, 1, run);
  fs::permissions(dir.path, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                                fs::perms::others_read | fs::perms::others_exec);
  fs::permissions(checkpoints, fs::perms::owner_read | fs::perms::owner_exec |
                                   fs::perms::group_read | fs::perms::group_exec |
                                   fs::perms::others_read | fs::perms::others_exec);
  // root ignores permissions: check them as an ordinary user (this thread only).
  const bool as_root = ::geteuid() == 0;
  if (as_root) ::setfsuid(65534);
  {
    auto options = run.options(checkpoints, captured.logger);
    options.save_on_exit = SaveOnExit::never;
    CheckpointGuard guard(run.model, *run.optimizer, options);
    CHECK(guard.current_step() == 1);
    CHECK_THROWS_WITH(guard.save(), Contains("Permission denied") && Contains("intact"));
  }
  if (as_root) ::setfsuid(0);
  fs::permissions(checkpoints, fs::perms::owner_all, fs::perm_options::add);
  CHECK(restored_step(checkpoints, captured) == 1);
}

TEST_CASE("the background writer: at most one write in flight, errors surface later",
          "[checkpoint][background]") {
  TempDir dir;
  CapturedLogger captured;
  Run run(1);
  auto options = run.options(dir.path, captured.logger);
  options.background = true;
  options.every_n_steps = 1;
  options.keep_last = 100;
  {
    CheckpointGuard guard(run.model, *run.optimizer, options);
    for (int i = 0; i < 5; ++i) {
      run.train_step();
      guard.step({{"loss", static_cast<double>(i)}});
    }
    guard.wait();
    CHECK(guard.list().size() == 5);
    CHECK(guard.list().back().step == 5);
  }
  Run second(2);
  {
    auto restore = second.options(dir.path, captured.logger);
    restore.save_on_exit = SaveOnExit::never;
    CheckpointGuard guard(second.model, *second.optimizer, restore);
    CHECK(guard.current_step() == 5);
  }
  // The saved state is the one at save time, not what training did after it.
  CHECK(same_parameters(*run.model, *second.model));

  // A failed background write is reported by the next save, and by close().
  CheckpointGuard guard(run.model, *run.optimizer, options);
  with_file_size_limit(1024, [&] {
    guard.step();  // queued; the write fails on the writer thread
    CHECK_THROWS_WITH(guard.save(), Contains("File too large"));  // reported by the next save
    CHECK_THROWS_WITH(guard.close(Outcome::success), Contains("File too large"));  // and at exit
  });
  CHECK(guard.list().size() == 5);
}

namespace {

// Filled with the step it belongs to, so that a restored checkpoint tells whether it is whole.
struct Constant {
  Constant() : model(512, 512), optimizer(model->parameters(), 0.1) {}
  void fill(std::int64_t step) {
    torch::NoGradGuard no_grad;
    for (auto& parameter : model->parameters()) parameter.fill_(static_cast<float>(step));
  }
  bool all_equal(std::int64_t step) {
    for (auto& parameter : model->parameters()) {
      if (!torch::all(parameter == static_cast<float>(step)).item<bool>()) return false;
    }
    return true;
  }
  torch::nn::Linear model;
  torch::optim::SGD optimizer;
};

// Starts the hidden test `tag` in a child process with `variable`=`directory`, and waits (at
// most a minute) for the first `size` bytes it reports on its fd 3. Returns the child's pid and
// the read end of its report pipe.
std::pair<pid_t, int> start_reporting_child(const std::string& tag, const std::string& variable,
                                            const fs::path& directory, void* first,
                                            std::size_t size) {
  int report[2];
  REQUIRE(::pipe(report) == 0);
  const pid_t pid = torchguard::testing::spawn_test_child(
      tag, {variable + "=" + directory.string()}, "", report[1]);
  ::close(report[1]);
  struct pollfd ready {
    report[0], POLLIN, 0
  };
  REQUIRE(::poll(&ready, 1, 60000) == 1);
  REQUIRE(::read(report[0], first, size) == static_cast<ssize_t>(size));
  return {pid, report[0]};
}

}  // namespace

// Run by the lock test in a child process: hold the directory's lock until killed.
TEST_CASE("lock child: hold a checkpoint directory until killed", "[.lock_child]") {
  const char* dir = std::getenv("TORCHGUARD_LOCK_DIR");
  if (!dir) return;
  Constant state;
  CheckpointGuard guard(state.model, state.optimizer, quiet_options(dir));
  const char ready = 1;
  if (::write(3, &ready, 1) != 1) return;
  std::this_thread::sleep_for(std::chrono::seconds(120));  // killed long before
}

TEST_CASE("a second run on a checkpoint directory fails at once, naming the holder's pid",
          "[checkpoint][lock]") {
  TempDir dir;
  char ready = 0;
  const auto [pid, report] =
      start_reporting_child("[.lock_child]", "TORCHGUARD_LOCK_DIR", dir.path, &ready, 1);
  ::close(report);

  Constant state;
  CheckpointOptions options = quiet_options(dir.path);
  options.save_on_exit = SaveOnExit::never;
  const auto started = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(CheckpointGuard(state.model, state.optimizer, options),
                    Contains(dir.path.string()) && Contains("in use by another run") &&
                        Contains(fmt::format("pid {}", pid)));
  CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(10));  // no waiting
  // A process of the group that does not write takes no lock.
  CheckpointOptions reader = options;
  reader.is_writer = [] { return false; };
  { CheckpointGuard rank_one(state.model, state.optimizer, reader); }

  ::kill(pid, SIGKILL);  // the kernel releases a dead holder's lock: never stale
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CheckpointGuard after(state.model, state.optimizer, options);
  CHECK(after.current_step() == 0);
}

// Run by the crash test in a child process: resume, then save at every step until killed,
// reporting each committed step on fd 3.
TEST_CASE("crash child: save at every step until killed", "[.crash_child]") {
  const char* dir = std::getenv("TORCHGUARD_CRASH_DIR");
  if (!dir) return;
  Constant state;
  CheckpointOptions options = quiet_options(dir);
  options.every_n_steps = 1;
  options.keep_last = 2;
  CheckpointGuard guard(state.model, state.optimizer, options);
  for (int i = 0; i < 100000; ++i) {
    const std::int64_t next = guard.current_step() + 1;
    state.fill(next);
    guard.step();
    if (::write(3, &next, sizeof next) != sizeof next) return;
  }
}

TEST_CASE("a writer SIGKILLed at any moment leaves a complete checkpoint, never an older one",
          "[checkpoint][crash]") {
  TempDir dir;

  std::int64_t committed = 0;  // the newest step some child reported committed
  constexpr int kills = 24;
  for (int round = 0; round < kills; ++round) {
    // Wait for the first commit of this run (restore done, saving in a loop), then kill it at
    // a different moment each round: during serialization, fsync, rename or retention.
    std::int64_t step = 0;
    const auto [pid, report] = start_reporting_child("[.crash_child]", "TORCHGUARD_CRASH_DIR",
                                                     dir.path, &step, sizeof step);
    CHECK(step > committed);  // resumed at or after the last commit: never went backwards
    committed = step;
    std::this_thread::sleep_for(std::chrono::microseconds(500 + round * 1700 % 23000));
    ::kill(pid, SIGKILL);
    while (::read(report, &step, sizeof step) == sizeof step) committed = step;
    ::close(report);
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    REQUIRE(WIFSIGNALED(status));

    // A restart always finds a whole checkpoint, at or after the last reported commit.
    Constant restored;
    CheckpointOptions options = quiet_options(dir.path);
    options.save_on_exit = SaveOnExit::never;
    CheckpointGuard guard(restored.model, restored.optimizer, options);
    REQUIRE(guard.resumed());
    CHECK(guard.current_step() >= committed);
    CHECK(restored.all_equal(guard.current_step()));
    CHECK_FALSE(fs::exists(dir.path / "quarantine"));  // nothing was ever half-written
  }
}

namespace {

extern "C" void interrupt_handler(int) {}  // its only work: make a blocked call return (EINTR)

}  // namespace

// Run by the tests below in a child under tests/io_faults.c: saves steps 1 and 2 of a run in
// $TORCHGUARD_TEST_DIR (the faults hit step 2's save), and prints how each save ended. With
// $TORCHGUARD_STOP_AFTER_MS, another thread requests a stop after that long and interrupts the
// main thread with a signal, as Ctrl-C would a blocked write.
TEST_CASE("save child: save through a file system that fails", "[.save_faults_child]") {
  const char* dir = std::getenv("TORCHGUARD_TEST_DIR");
  if (!dir) return;
  Constant state;
  auto options = quiet_options(dir);
  torchguard::CancellationSource stop;
  options.stop_token = stop.token();
  options.save_on_exit = SaveOnExit::never;
  CheckpointGuard guard(state.model, state.optimizer, options);
  std::atomic<bool> done{false};
  std::thread stopper;
  if (const char* after = std::getenv("TORCHGUARD_STOP_AFTER_MS")) {
    struct sigaction action {};
    action.sa_handler = interrupt_handler;  // no SA_RESTART: the blocked write returns EINTR
    ::sigaction(SIGUSR1, &action, nullptr);
    stopper = std::thread([&, ms = std::atoi(after), main = ::pthread_self()] {
      std::this_thread::sleep_for(std::chrono::milliseconds(ms));
      stop.cancel();
      while (!done.load()) {  // until the main thread is out of whatever blocks it
        ::pthread_kill(main, SIGUSR1);
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    });
  }
  for (std::int64_t step = 1; step <= 2; ++step) {
    state.fill(step);
    try {
      guard.set_step(step);
      guard.save();
      std::cout << "step " << step << ": saved" << std::endl;
    } catch (const torchguard::CheckpointError& e) {
      std::cout << "step " << step << ": " << e.what() << std::endl;
    }
  }
  done.store(true);
  if (stopper.joinable()) stopper.join();
}

TEST_CASE("a write that returns 0 is a full disk, not a loop: the checkpoints stay",
          "[checkpoint][faults]") {
  TempDir dir;
  const auto child = torchguard::testing::run_with_faults(
      "[.save_faults_child]", "write:step-2-:0", {"TORCHGUARD_TEST_DIR=" + dir.path.string()});
  INFO(child.output);
  REQUIRE(child.exit_status == 0);
  CHECK_THAT(child.output, Contains("step 1: saved") &&
                               Contains("step 2: CheckpointGuard: cannot save the checkpoint of "
                                        "step 2") &&
                               Contains("No space left on device"));
  CHECK(checkpoint_dirs(dir.path).size() == 1);
  CHECK(names_in(dir.path) == std::vector<std::string>{".lock", "ckpt-000001-step-1"});
}

TEST_CASE(
    "a directory fsync that fails after the rename: committed, said to be maybe not "
    "durable, the older checkpoints kept",
    "[checkpoint][faults]") {
  TempDir dir;
  const auto child = torchguard::testing::run_with_faults(
      "[.save_faults_child]", "fsync:" + dir.path.string() + "$:EIO:1",
      {"TORCHGUARD_TEST_DIR=" + dir.path.string()});
  INFO(child.output);
  REQUIRE(child.exit_status == 0);
  CHECK_THAT(child.output,
             Contains("step 1: saved") &&
                 Contains("step 2: CheckpointGuard: the checkpoint of step 2 is committed as") &&
                 Contains("it may not survive a power loss (older checkpoints are kept)"));
  // The checkpoint is there, and the next run resumes from it.
  Constant state;
  CheckpointGuard guard(state.model, state.optimizer, quiet_options(dir.path));
  CHECK(guard.current_step() == 2);
  CHECK(state.all_equal(2));
}

TEST_CASE("a save stuck in a write that hangs is abandoned when a stop is requested",
          "[checkpoint][faults]") {
  TempDir dir;
  const auto started = std::chrono::steady_clock::now();
  const auto child = torchguard::testing::run_with_faults(
      "[.save_faults_child]", "write:step-2-:HANG:0:1",
      {"TORCHGUARD_TEST_DIR=" + dir.path.string(), "TORCHGUARD_STOP_AFTER_MS=300"});
  INFO(child.output);
  REQUIRE(child.exit_status == 0);
  CHECK_THAT(child.output, Contains("io_faults: write(") && Contains("hang until a signal") &&
                               Contains("step 2: CheckpointGuard: cannot save the checkpoint") &&
                               Contains("a stop was requested while the write was interrupted"));
  CHECK(checkpoint_dirs(dir.path).size() == 1);  // step 1's, whole
  CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(60));
}
