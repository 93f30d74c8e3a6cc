// checkpoint/recovery.hpp and CheckpointGuard::check_step: a bad step goes back to the newest
// checkpoint and its batch is skipped from then on; the bounds end the run; the skip list
// outlives a restart. The demos' end-to-end cases are in tests/recovery.sh.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "support.hpp"
#include "torchguard/checkpoint.hpp"
#include "torchguard/data.hpp"

namespace fs = std::filesystem;
using torchguard::CheckpointGuard;
using torchguard::CheckpointOptions;
using torchguard::RecoveryError;
using torchguard::ResumableSampler;
using torchguard::testing::CapturedLogger;
using torchguard::testing::Contains;
using torchguard::testing::TempDir;

namespace {

constexpr std::size_t kSamples = 96;
constexpr std::size_t kBatch = 8;

// A small regression run: a linear model with dropout (so the RNG matters), Adam, a shuffled
// sampler over 96 samples, a checkpoint every 5 steps. `poison(step, batch)` says how a step's
// loss is spoiled: "" (not), "nan", "spike".
struct RecoveringRun {
  torch::Tensor x, y;
  torch::nn::Sequential model{nullptr};
  std::shared_ptr<torch::optim::Adam> optimizer;
  ResumableSampler sampler{kSamples, {/*seed=*/3}};
  CheckpointOptions options;

  explicit RecoveringRun(const fs::path& dir, std::shared_ptr<spdlog::logger> logger) {
    torch::manual_seed(5);
    x = torch::randn({static_cast<std::int64_t>(kSamples), 4});
    y = x.sum(1, true).tanh();
    model = torch::nn::Sequential(torch::nn::Linear(4, 16), torch::nn::ReLU(),
                                  torch::nn::Dropout(0.2), torch::nn::Linear(16, 1));
    optimizer =
        std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(0.01));
    options.directory = dir;
    options.logger = std::move(logger);
    options.samplers = {{"train", sampler}};
    options.every_n_steps = 5;
    options.keep_last = 10;
    options.recovery.enabled = true;
    options.recovery.spike_warmup = 8;
    options.recovery.spike_factor = 20;  // batches of 8 vary: 1000x is the spike
  }

  // Trains up to `steps` with `guard`; returns the verdicts of the steps that recovered.
  template <class Poison>
  std::vector<torchguard::StepVerdict> train(CheckpointGuard& guard, std::int64_t steps,
                                             Poison&& poison) {
    std::vector<torchguard::StepVerdict> recovered;
    while (guard.current_step() < steps) {
      const auto left = sampler.remaining();
      const auto count = std::min(kBatch, left.size());
      const std::vector<std::size_t> batch(left.begin(), left.begin() + count);
      const auto index = torch::tensor(std::vector<std::int64_t>(batch.begin(), batch.end()));
      optimizer->zero_grad();
      auto loss =
          torch::mse_loss(model->forward(x.index_select(0, index)), y.index_select(0, index));
      const std::string kind = poison(guard.current_step() + 1, batch);
      if (kind == "nan") loss = loss * std::numeric_limits<double>::quiet_NaN();
      if (kind == "spike") loss = loss * 1000.0;
      loss.backward();
      const auto verdict = guard.check_step(loss, batch);
      if (verdict.recovered) {
        recovered.push_back(verdict);
        continue;  // the sampler went back too: take the batches from where it is now
      }
      optimizer->step();
      if (count == left.size()) {
        sampler.next_epoch();
      } else {
        sampler.consume(count);
      }
      guard.step();
    }
    return recovered;
  }
};

const auto clean = [](std::int64_t, const std::vector<std::size_t>&) { return std::string(); };

// The step's batch holds `sample`: that step is bad, whichever step it is.
auto poisoned_sample(std::size_t sample, std::string kind = "nan") {
  return [sample, kind](std::int64_t, const std::vector<std::size_t>& batch) {
    return std::find(batch.begin(), batch.end(), sample) != batch.end() ? kind : std::string();
  };
}

std::vector<torch::Tensor> parameters_of(const RecoveringRun& run) {
  return torchguard::testing::host_copies(run.model->parameters());
}

// The sample that step `step` of a run without skips draws first (epoch 0).
std::size_t first_sample_of_step(std::int64_t step) {
  return ResumableSampler::permutation(kSamples, 3, 0)[static_cast<std::size_t>(step - 1) * kBatch];
}

}  // namespace

TEST_CASE(
    "StepMonitor: a NaN or infinite loss, a gradient that is not finite, a spike after the "
    "warm-up",
    "[recovery]") {
  torchguard::RecoveryOptions options;
  options.spike_warmup = 4;
  options.spike_window = 8;
  options.spike_factor = 4.0;
  torchguard::detail::StepMonitor monitor(options);
  auto parameter = torch::zeros({3}, torch::requires_grad());
  parameter.mutable_grad() = torch::ones({3});
  double value = 0;
  CHECK(monitor.judge(torch::tensor(0.5), {parameter}, value).empty());
  CHECK(value == 0.5);
  CHECK_THAT(monitor.judge(torch::tensor(std::nan("")), {parameter}, value), Contains("nan"));
  CHECK_THAT(monitor.judge(torch::tensor(INFINITY), {parameter}, value), Contains("inf"));
  parameter.mutable_grad()[1] = INFINITY;
  CHECK_THAT(monitor.judge(torch::tensor(0.5), {parameter}, value),
             Contains("gradient is not finite"));
  parameter.mutable_grad()[1] = std::nan("");
  CHECK_THAT(monitor.judge(torch::tensor(0.5), {parameter}, value),
             Contains("gradient is not finite"));
  parameter.mutable_grad()[1] = 3.0e38F;  // large, finite: its 2-norm overflows, yet no fault
  CHECK(monitor.judge(torch::tensor(0.5), {parameter}, value).empty());

  // Spikes: judged only once the warm-up's steps are in the window.
  for (int i = 0; i < 3; ++i) monitor.accept(1.0);
  CHECK(monitor.judge(torch::tensor(100.0), {parameter}, value).empty());
  monitor.accept(1.0);
  CHECK_THAT(monitor.judge(torch::tensor(100.0), {parameter}, value),
             Contains("is 100.0x the median of the last 4 (1)"));
  CHECK(monitor.judge(torch::tensor(3.9), {parameter}, value).empty());

  // Each check off: not judged.
  options.non_finite_loss = false;
  options.loss_spikes = false;
  options.non_finite_gradients = false;
  parameter.mutable_grad()[1] = std::nan("");
  CHECK(monitor.judge(torch::tensor(std::nan("")), {parameter}, value).empty());
  CHECK(monitor.judge(torch::tensor(100.0), {parameter}, value).empty());
}

TEST_CASE("recovery off: check_step() judges nothing and a fresh start saves nothing",
          "[recovery]") {
  TempDir dir;
  CapturedLogger log;
  RecoveringRun run(dir.path, log.logger);
  run.options.recovery.enabled = false;
  CheckpointGuard guard(run.model, run.optimizer, run.options);
  CHECK(guard.list().empty());
  run.optimizer->zero_grad();
  auto loss = run.model->forward(run.x).sum() * std::nan("");
  loss.backward();
  CHECK_FALSE(guard.check_step(loss, {1, 2}).recovered);
}

TEST_CASE(
    "a poisoned batch: the run goes back, skips it, and ends equal to a clean run that "
    "skipped it from the start",
    "[recovery]") {
  for (const std::string kind : {"nan", "spike"}) {
    CAPTURE(kind);
    TempDir poisoned_dir, clean_dir;
    CapturedLogger log;
    // The batch of step 9 (a checkpoint at 5) is bad.
    const std::size_t bad = first_sample_of_step(9);
    RecoveringRun poisoned(poisoned_dir.path, log.logger);
    std::vector<torchguard::StepVerdict> verdicts;
    std::vector<std::size_t> skipped;
    {
      CheckpointGuard guard(poisoned.model, poisoned.optimizer, poisoned.options);
      REQUIRE(guard.list().size() == 1);  // step 0, saved because recovery is on
      verdicts = poisoned.train(guard, 30, poisoned_sample(bad, kind));
      skipped = guard.skipped_samples();
    }
    INFO(log.sink->dump());
    REQUIRE(verdicts.size() == 1);
    CHECK(verdicts[0].bad_step == 9);
    CHECK(verdicts[0].restored_step == 5);
    CHECK(verdicts[0].recoveries == 1);
    CHECK_THAT(verdicts[0].reason, Contains(kind == "nan" ? "the loss is nan" : "x the median"));
    REQUIRE(verdicts[0].skipped.size() == kBatch);
    CHECK(std::count(verdicts[0].skipped.begin(), verdicts[0].skipped.end(), bad) == 1);
    CHECK(skipped == verdicts[0].skipped);
    CHECK(poisoned.sampler.skipped() == skipped);
    CHECK(log.sink->contains(spdlog::level::warn, "step 9 went wrong"));
    CHECK(log.sink->contains(spdlog::level::warn, "back to step 5"));
    const auto metrics = verdicts[0].metrics();
    CHECK(metrics[0].first == "recovery/count");

    RecoveringRun clean_run(clean_dir.path, log.logger);
    clean_run.sampler.skip(skipped);
    {
      CheckpointGuard guard(clean_run.model, clean_run.optimizer, clean_run.options);
      CHECK(clean_run.train(guard, 30, clean).empty());
    }
    CHECK(torchguard::testing::bitwise_equal(parameters_of(poisoned), parameters_of(clean_run)));
  }
}

TEST_CASE("a resumed run keeps the skip list and counts the earlier recoveries", "[recovery]") {
  TempDir dir;
  CapturedLogger log;
  const std::size_t bad = first_sample_of_step(8);
  std::vector<std::size_t> skipped;
  {
    RecoveringRun run(dir.path, log.logger);
    CheckpointGuard guard(run.model, run.optimizer, run.options);
    REQUIRE(run.train(guard, 9, poisoned_sample(bad)).size() == 1);
    skipped = guard.skipped_samples();
  }
  // A new process: the checkpoint saved at the recovery (step 5, with the skip list) or a later
  // one is restored; the bad batch never comes again.
  RecoveringRun resumed(dir.path, log.logger);
  resumed.options.recovery.max_recoveries = 1;
  CheckpointGuard guard(resumed.model, resumed.optimizer, resumed.options);
  REQUIRE(guard.resumed());
  CHECK(guard.skipped_samples() == skipped);
  CHECK(resumed.sampler.skipped() == skipped);
  CHECK(resumed.train(guard, 40, poisoned_sample(bad)).empty());
  // The bound counts the recovery of the earlier run: one more is one too many.
  std::size_t second = 0;
  while (std::count(skipped.begin(), skipped.end(), second)) ++second;
  INFO(log.sink->dump());
  CHECK_THROWS_WITH(resumed.train(guard, 80, poisoned_sample(second)),
                    Contains("after 1 recoveries within 1000 steps (at most 1 allowed)"));
}

TEST_CASE(
    "the bounds: the same step going wrong after a rollback, and too many recoveries, end "
    "the run, and nothing committed changes",
    "[recovery]") {
  auto committed = [](const fs::path& dir) {
    std::set<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir)) {
      if (entry.path().filename().string().rfind("ckpt-", 0) == 0) {
        names.insert(entry.path().filename().string() + ":" +
                     torchguard::testing::read_text(entry.path() / "manifest.json"));
      }
    }
    return names;
  };
  SECTION("step 12 is bad whatever it draws") {
    TempDir dir;
    CapturedLogger log;
    RecoveringRun run(dir.path, log.logger);
    run.options.save_on_exit = torchguard::SaveOnExit::always;
    std::set<std::string> before;
    {
      CheckpointGuard guard(run.model, run.optimizer, run.options);
      auto poison = [](std::int64_t step, const std::vector<std::size_t>&) {
        return step == 12 ? "nan" : "";
      };
      REQUIRE(run.train(guard, 11, poison).empty());
      guard.wait();
      before = committed(dir.path);
      try {
        run.train(guard, 20, poison);
        FAIL("no RecoveryError");
      } catch (const RecoveryError& e) {
        const std::string message = e.what();
        CHECK_THAT(message, Contains("step 12 went wrong (the loss is nan) again after the run "
                                     "went back to step 10"));
        CHECK_THAT(message, Contains("the fault is not in the batch"));
        CHECK_THAT(message, Contains("step 12 (the loss is nan) -> back to step 10, skipped"));
      }
      CHECK_THROWS_AS(guard.save(), RecoveryError);
    }  // the exit save (always) is not made: the parts hold a bad step
    INFO(log.sink->dump());
    CHECK(log.sink->contains(spdlog::level::warn, "not saved at exit"));
    // The checkpoint of the recovery (step 10 again, with the skip list) is the only new one.
    const auto after = committed(dir.path);
    CHECK(after.size() == before.size() + 1);
    CHECK(std::includes(after.begin(), after.end(), before.begin(), before.end()));
  }
  SECTION("three recoveries in the window, a fourth is one too many") {
    TempDir dir;
    CapturedLogger log;
    RecoveringRun run(dir.path, log.logger);
    run.options.recovery.max_recoveries = 3;
    run.options.recovery.recovery_window = 100;
    CheckpointGuard guard(run.model, run.optimizer, run.options);
    // The first samples of steps 3, 6, 9 and 12 are bad, wherever they come: four recoveries
    // (at steps 3, 5, 7 and 9, as the skipped batches move the others forward).
    std::set<std::size_t> bad;
    for (int step = 3; step <= 12; step += 3) bad.insert(first_sample_of_step(step));
    auto poison = [&](std::int64_t, const std::vector<std::size_t>& batch) {
      return std::any_of(batch.begin(), batch.end(), [&](auto i) { return bad.count(i) > 0; })
                 ? "nan"
                 : "";
    };
    CHECK_THROWS_WITH(run.train(guard, 40, poison),
                      Contains("after 3 recoveries within 100 steps (at most 3 allowed)"));
    CHECK(guard.skipped_samples().size() == 3 * kBatch);
  }
}

TEST_CASE(
    "recovery: a damaged newest checkpoint is quarantined and an older one is used, and the "
    "learning rate is scaled for a while",
    "[recovery]") {
  TempDir dir;
  CapturedLogger log;
  RecoveringRun run(dir.path, log.logger);
  run.options.recovery.lr_scale = 0.5;
  run.options.recovery.lr_scale_steps = 4;
  CheckpointGuard guard(run.model, run.optimizer, run.options);
  REQUIRE(run.train(guard, 11, clean).empty());
  guard.wait();
  // Step 10's checkpoint loses a byte of its model file.
  const auto newest = guard.list().back().path;
  {
    const auto file = newest / "model.safetensors";
    std::string bytes = torchguard::testing::read_text(file);
    bytes[bytes.size() - 1] ^= 0x55;
    std::ofstream(file, std::ios::binary | std::ios::trunc) << bytes;
  }
  const std::size_t bad = first_sample_of_step(12);
  auto lr = [&] { return run.optimizer->param_groups()[0].options().get_lr(); };
  std::vector<double> rates;
  auto poison = [&](std::int64_t step, const std::vector<std::size_t>& batch) {
    rates.push_back(lr());
    (void)step;
    return std::find(batch.begin(), batch.end(), bad) != batch.end() ? "nan" : "";
  };
  const auto verdicts = run.train(guard, 16, poison);
  INFO(log.sink->dump());
  REQUIRE(verdicts.size() == 1);
  CHECK(verdicts[0].restored_step == 5);
  CHECK(log.sink->contains(spdlog::level::warn, "quarantine"));
  CHECK(fs::exists(dir.path / "quarantine" / newest.filename()));
  CHECK(log.sink->contains(spdlog::level::warn, "learning rates x0.5 until step 9"));
  // Steps 6 to 9 after the recovery at half the rate, then back.
  CHECK(lr() == Approx(0.01));
  CHECK(std::count(rates.begin(), rates.end(), 0.005) == 4);
  CHECK(log.sink->contains(spdlog::level::info, "learning rates back to normal"));
}

TEST_CASE("recovery decided together: another process's bad step rolls this one back too",
          "[recovery]") {
  TempDir dir;
  CapturedLogger log;
  RecoveringRun run(dir.path, log.logger);
  std::vector<bool> asked;
  run.options.recovery.agree = [&](bool flag) {
    asked.push_back(flag);
    // First the fresh start's save (decided together), then one question a step: the other
    // process's step 7 went wrong.
    return asked.size() == 1 ? flag : asked.size() == 8;
  };
  CheckpointGuard guard(run.model, run.optimizer, run.options);
  const auto verdicts = run.train(guard, 10, clean);
  REQUIRE(verdicts.size() == 1);
  CHECK(verdicts[0].bad_step == 7);
  CHECK(verdicts[0].restored_step == 5);
  CHECK(verdicts[0].reason == "another process's step went wrong");
  REQUIRE(asked.size() > 9);
  CHECK(asked[0]);  // this process started fresh: the first checkpoint is saved on every one
  CHECK(std::none_of(asked.begin() + 1, asked.end(), [](bool bad) { return bad; }));
  // Asked once more after going back, before the recovery's save: every process has chosen its
  // checkpoint before the writer commits a newer one.
  CHECK(asked.size() == 1 + 7 + 1 + 5);  // fresh, steps 1-7, the recovery, steps 6-10
}

TEST_CASE(
    "ResumableSampler::skip: the order without the skipped samples, the position kept, "
    "the list in the checkpoint state",
    "[recovery][sampler]") {
  ResumableSampler sampler(20, {/*seed=*/9});
  const auto order = ResumableSampler::permutation(20, 9, 0);
  sampler.consume(6);
  // One already trained in this epoch (order[2]) and two not yet (order[10], order[15]).
  CHECK(sampler.skip({order[2], order[10], order[15]}) == 3);
  CHECK(sampler.skip({order[10]}) == 0);
  CHECK(sampler.epoch_size() == 17);
  CHECK(sampler.position() == 5);
  std::vector<std::size_t> expected;
  for (std::size_t i = 6; i < 20; ++i) {
    if (i != 10 && i != 15) expected.push_back(order[i]);
  }
  CHECK(sampler.remaining() == expected);
  const auto state = sampler.checkpoint_state();
  CHECK(state.at("skip").size() == 3);
  CHECK_THROWS_AS(sampler.skip({20}), torchguard::OptionsError);

  ResumableSampler restored(20, {/*seed=*/9});
  CHECK(restored.check_checkpoint_state(state).empty());
  restored.load_checkpoint_state(state);
  CHECK(restored.remaining() == expected);
  CHECK(restored.skipped() == sampler.skipped());
  auto bad = state;
  bad["skip"] = {1, 25};
  CHECK_THAT(restored.check_checkpoint_state(bad),
             Contains("not a list of sample indices below 20"));
  // The next epoch leaves them out too.
  sampler.next_epoch();
  const auto next = sampler.remaining();
  CHECK(next.size() == 17);
  for (const auto index : sampler.skipped()) {
    CHECK(std::find(next.begin(), next.end(), index) == next.end());
  }
}
