// checkpoint/staging.hpp: overlapped staging, a background save's copy of the state taken at the
// fence before the optimizer's step, never torn.
#include "torchguard/checkpoint.hpp"

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "checkpoint_support.hpp"

namespace fs = std::filesystem;
using torchguard::CheckpointGuard;
using torchguard::CheckpointOptions;
using torchguard::Outcome;
using torchguard::SaveOnExit;
using torchguard::testing::CapturedLogger;
using torchguard::testing::Run;
using torchguard::testing::same_parameters;
using torchguard::testing::TempDir;

namespace {

// The model's parameters and buffers now, copied, by state_dict name.
torchguard::TensorMap state_now(const torch::nn::Module& module) {
  torchguard::TensorMap state;
  for (const auto& item : module.named_parameters()) state[item.key()] = item.value().clone();
  for (const auto& item : module.named_buffers()) state[item.key()] = item.value().clone();
  return state;
}

// The committed checkpoints' steps, each checked against the state recorded at that step.
std::vector<std::int64_t> checked_steps(const fs::path& dir,
                                        std::map<std::int64_t, torchguard::TensorMap>& recorded) {
  std::vector<std::int64_t> steps;
  for (const auto& info : torchguard::detail::list_committed(dir)) {
    steps.push_back(info.step);
    const auto saved = torchguard::load_safetensors(info.path / "model.safetensors");
    const auto& expected = recorded.at(info.step);
    REQUIRE(saved.size() == expected.size());
    for (const auto& [name, tensor] : expected) {
      INFO("step " << info.step << ", " << name);
      CHECK(torch::equal(saved.at(name), tensor));
    }
  }
  return steps;
}

// A run with background saves every `every` steps, and the state recorded at each step.
struct OverlappedRun {
  explicit OverlappedRun(std::int64_t every) {
    options.background = true;
    options.every_n_steps = every;
    options.keep_last = 100;
  }
  // One training step with the fence before the optimizer's step, then step(); the state after
  // it is recorded under its step.
  void step(CheckpointGuard& guard) {
    run.train_step([&] { guard.before_optimizer_step(); });
    guard.step();
    record(guard.current_step());
  }
  void record(std::int64_t step) { recorded[step] = state_now(*run.model); }
  std::vector<std::int64_t> checked_steps() { return ::checked_steps(dir.path, recorded); }

  TempDir dir;
  CapturedLogger captured;
  Run run{1};
  CheckpointOptions options = run.options(dir.path, captured.logger);
  std::map<std::int64_t, torchguard::TensorMap> recorded;
};

}  // namespace

TEST_CASE("overlapped staging: a fenced loop's background saves hold exactly their step",
          "[checkpoint][background]") {
  OverlappedRun overlapped(2);
  auto& run = overlapped.run;
  {
    CheckpointGuard guard(run.model, *run.optimizer, overlapped.options);
    // The copy of step 2k runs while step 2k+1's forward and backward run; the fence waits.
    for (int i = 0; i < 6; ++i) overlapped.step(guard);
  }  // step 6's copy is settled and written by close()
  CHECK(overlapped.checked_steps() == std::vector<std::int64_t>{2, 4, 6});
  CHECK(overlapped.captured.sink->count(spdlog::level::warn) == 0);
  // The optimizer's state and the rest resume as a synchronous save would have them.
  Run resumed(2);
  {
    auto restore = resumed.options(overlapped.dir.path, overlapped.captured.logger);
    restore.save_on_exit = SaveOnExit::never;
    CheckpointGuard guard(resumed.model, *resumed.optimizer, restore);
    CHECK(guard.current_step() == 6);
  }
  CHECK(same_parameters(*run.model, *resumed.model));
  torch::manual_seed(7);  // the same batch for both: the optimizer's state decides the step
  run.train_step();
  torch::manual_seed(7);
  resumed.train_step();
  CHECK(same_parameters(*run.model, *resumed.model));
}

TEST_CASE("overlapped staging: an optimizer step before the fence drops the copy, never tears it",
          "[checkpoint][background]") {
  OverlappedRun overlapped(2);
  auto& run = overlapped.run;
  {
    CheckpointGuard guard(run.model, *run.optimizer, overlapped.options);
    for (int i = 0; i < 2; ++i) overlapped.step(guard);  // fenced: step 2's copy is deferred
    for (int i = 0; i < 3; ++i) {  // the fence comes after the optimizer's step
      run.train_step();
      guard.before_optimizer_step();
      guard.step();
      overlapped.record(guard.current_step());
    }
  }
  // Step 2's copy may have read parameters the optimizer was changing: dropped, and step 3
  // saved in its place; from then on the copies are made in step().
  CHECK(overlapped.checked_steps() == std::vector<std::int64_t>{3, 4, 5});
  auto& sink = *overlapped.captured.sink;
  CHECK(sink.count(spdlog::level::warn, "background save of step 2") == 1);
  CHECK(sink.contains(spdlog::level::warn, "dropped"));
}

TEST_CASE("overlapped staging: parameters changed in place before the fence are not saved torn",
          "[checkpoint][background]") {
  OverlappedRun overlapped(1);
  auto& run = overlapped.run;
  overlapped.options.save_on_exit = SaveOnExit::never;
  CheckpointGuard guard(run.model, *run.optimizer, overlapped.options);
  guard.before_optimizer_step();  // the loop marks the point: copies are deferred from now on
  guard.step();
  overlapped.record(1);
  {
    torch::NoGradGuard no_grad;
    run.model->parameters()[0].add_(1.0);  // not the optimizer, but an in-place change all the same
  }
  guard.close(Outcome::success);  // step 1's copy is dropped; the state at hand is saved
  overlapped.record(1);
  CHECK(overlapped.checked_steps() == std::vector<std::int64_t>{1});
  CHECK(overlapped.captured.sink->contains(spdlog::level::warn, "dropped"));
}
