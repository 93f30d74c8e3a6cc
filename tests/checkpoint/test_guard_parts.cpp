// checkpoint/guard.hpp, a whole program's state: named models, optimizers, schedulers and
// samplers in one commit restored all or nothing, the run's settings, a run's end, choosing the
// checkpoint to restore, and a run that crosses between C++ and Python. The guard's own life
// (resume, retention, damage, the disk's failures, a writer killed) is in test_guard.cpp.
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

namespace {

// A GAN's parts: two models, each with its own Adam, a scheduler and a sampler.
struct Pair {
  explicit Pair(std::uint64_t seed) : sampler(100, {/*seed=*/1}) {
    torch::manual_seed(seed);
    generator =
        torch::nn::Sequential(torch::nn::Linear(4, 8), torch::nn::ReLU(), torch::nn::Linear(8, 4));
    discriminator = torch::nn::Sequential(torch::nn::Linear(4, 8), torch::nn::BatchNorm1d(8),
                                          torch::nn::Linear(8, 1));
    g_adam = std::make_shared<torch::optim::Adam>(generator->parameters(),
                                                  torch::optim::AdamOptions(1e-2));
    d_adam = std::make_shared<torch::optim::Adam>(discriminator->parameters(),
                                                  torch::optim::AdamOptions(2e-2));
    schedule = std::make_shared<torch::optim::StepLR>(*g_adam, 2, 0.5);
  }
  void train_step() {
    const auto noise = torch::randn({16, 4});
    g_adam->zero_grad();
    d_adam->zero_grad();
    const auto fake = generator->forward(noise);
    const auto loss = discriminator->forward(fake).mean() - discriminator->forward(noise).mean();
    loss.backward();
    g_adam->step();
    d_adam->step();
    schedule->step();
  }
  CheckpointOptions options(const fs::path& dir, std::shared_ptr<spdlog::logger> logger) {
    CheckpointOptions o;
    o.directory = dir;
    o.logger = std::move(logger);
    o.models = {{"generator", generator.ptr()}, {"discriminator", discriminator.ptr()}};
    o.optimizers = {{"generator", g_adam}, {"discriminator", d_adam}};
    o.schedulers = {{"generator", schedule}};
    o.samplers = {{"train", sampler}};
    return o;
  }
  torch::nn::Sequential generator{nullptr}, discriminator{nullptr};
  std::shared_ptr<torch::optim::Adam> g_adam, d_adam;
  std::shared_ptr<torch::optim::StepLR> schedule;
  torchguard::ResumableSampler sampler;
};

std::vector<torch::Tensor> host_copies_of(const torch::nn::Module& module) {
  return torchguard::testing::host_copies(module.parameters());
}

std::vector<torchguard::CheckpointInfo> cp_list(const fs::path& dir) {
  return torchguard::detail::list_committed(dir);
}

bool same_state(Pair& a, Pair& b) {
  return same_parameters(*a.generator, *b.generator) &&
         same_parameters(*a.discriminator, *b.discriminator);
}

}  // namespace

TEST_CASE("named models, optimizers, schedulers and samplers: one commit, restored together",
          "[checkpoint][parts]") {
  torch::set_num_threads(1);
  TempDir dir;
  CapturedLogger captured;
  torch::manual_seed(5);
  Pair straight(1);
  torch::manual_seed(5);
  for (int i = 0; i < 6; ++i) straight.train_step();

  torch::manual_seed(5);
  {
    Pair first(1);
    torch::manual_seed(5);
    CheckpointGuard guard(first.options(dir.path, captured.logger));
    for (int i = 0; i < 3; ++i) {
      first.train_step();
      guard.step();
    }
  }
  const auto saved = checkpoint_dirs(dir.path);
  REQUIRE(saved.size() == 1);
  CHECK(names_in(saved[0]) == std::vector<std::string>{"extra.safetensors", "manifest.json",
                                                       "model.discriminator.safetensors",
                                                       "model.generator.safetensors",
                                                       "optimizer.discriminator.safetensors",
                                                       "optimizer.generator.safetensors"});
  const auto manifest =
      nlohmann::json::parse(torchguard::testing::read_text(saved[0] / "manifest.json"));
  CHECK(manifest["schedulers"]["generator"]["step_count"] == 3);
  CHECK(manifest["samplers"]["train"]["size"] == 100);
  CHECK(manifest["optimizers"]["discriminator"]["param_groups"][0]["lr"] == 2e-2);
  CHECK(manifest["optimizers"]["discriminator"]["parameters"][2] == "discriminator/1.weight");

  torch::manual_seed(77);  // the restore puts back the RNG, whatever it finds
  Pair resumed(2);
  {
    CheckpointGuard guard(resumed.options(dir.path, captured.logger));
    REQUIRE(guard.current_step() == 3);
    for (int i = 0; i < 3; ++i) {
      resumed.train_step();
      guard.step();
    }
  }
  CHECK(same_state(straight, resumed));
  const auto lr = [](Pair& pair) {
    return static_cast<torch::optim::AdamOptions&>(pair.g_adam->param_groups()[0].options()).lr();
  };
  CHECK(lr(resumed) == lr(straight));
}

TEST_CASE("a restore is all or nothing: a part that does not fit leaves every part as it was",
          "[checkpoint][parts]") {
  TempDir dir;
  CapturedLogger captured;
  {
    Pair first(1);
    CheckpointGuard guard(first.options(dir.path, captured.logger));
    first.train_step();
    guard.step();
  }
  Pair other(2);
  const auto generator_before = host_copies_of(*other.generator);
  SECTION("an optimizer whose parameters have other shapes") {
    auto options = other.options(dir.path, captured.logger);
    torch::nn::Linear wider(4, 16);
    options.optimizers["discriminator"] = std::make_shared<torch::optim::Adam>(
        torch::nn::Sequential(torch::nn::Linear(4, 9), torch::nn::BatchNorm1d(9),
                              torch::nn::Linear(9, 1))
            ->parameters());
    CHECK_THROWS_WITH(CheckpointGuard(options),
                      Contains("optimizer 'discriminator'") && Contains("state.0.exp_avg is"));
  }
  SECTION("a registered part the checkpoint lacks") {
    auto options = other.options(dir.path, captured.logger);
    options.models["critic"] = torch::nn::Linear(2, 2);
    CHECK_THROWS_WITH(CheckpointGuard(options),
                      Contains("this program registers models 'critic', 'discriminator', "
                               "'generator'") &&
                          Contains("'critic' would go on without a restored state"));
  }
  CHECK(torchguard::testing::bitwise_equal(generator_before, host_copies_of(*other.generator)));
  CHECK(other.sampler.epoch() == 0);

  SECTION("a part the program does not register is left out, with a warning") {
    auto options = other.options(dir.path, captured.logger);
    options.models.erase("discriminator");
    options.optimizers.erase("discriminator");
    options.save_on_exit = SaveOnExit::never;
    CheckpointGuard guard(options);
    CHECK(guard.current_step() == 1);
    CHECK(captured.sink->contains(spdlog::level::warn,
                                  "holds model 'discriminator', which this program does not "
                                  "register (options.models): left out"));
  }
}

TEST_CASE("the run's settings: a change that breaks an exact resume is refused, another warned",
          "[checkpoint][settings]") {
  TempDir dir;
  CapturedLogger captured;
  Run run(1);
  auto options = run.options(dir.path, captured.logger);
  options.settings.values = {{"--batch-size", 64}, {"--lr", 1e-3}, {"--epochs", 2}};
  options.settings.exact = {"--batch-size"};
  {
    CheckpointGuard guard(run.model, *run.optimizer, options);
    run.train_step();
    guard.step();
  }
  Run again(2);
  const auto before = host_copies_of(*again.model);
  auto changed = again.options(dir.path, captured.logger);
  changed.settings = options.settings;
  changed.settings.values["--batch-size"] = 128;
  CHECK_THROWS_WITH(CheckpointGuard(again.model, *again.optimizer, changed),
                    Contains("--batch-size is 128 in this run but was 64 in the run that wrote") &&
                        Contains("resume with 64"));
  CHECK(torchguard::testing::bitwise_equal(before, host_copies_of(*again.model)));
  CHECK(checkpoint_dirs(dir.path).size() == 1);  // nothing written

  changed.settings.values["--batch-size"] = 64;
  changed.settings.values["--lr"] = 5e-4;
  changed.save_on_exit = SaveOnExit::never;
  CheckpointGuard guard(again.model, *again.optimizer, changed);
  CHECK(guard.current_step() == 1);
  CHECK(captured.sink->contains(spdlog::level::warn, "--lr changed from 0.001 to 0.0005"));
  CHECK(guard.settings()["--lr"] == 5e-4);
  CHECK_THROWS_AS(
      [] {
        CheckpointOptions bad;
        bad.directory = "unused";
        bad.settings.exact = {"--seed"};
        CheckpointGuard invalid(bad);
      }(),
      torchguard::OptionsError);
}

TEST_CASE("a run knows its end: run again it writes nothing, with more steps it goes on",
          "[checkpoint][complete]") {
  TempDir dir;
  CapturedLogger captured;
  auto train = [&](std::int64_t total) {
    Run run(1);
    auto options = run.options(dir.path, captured.logger);
    options.total_steps = total;
    options.keep_last = 10;
    CheckpointGuard guard(run.model, *run.optimizer, options);
    while (guard.current_step() < guard.total_steps()) {
      run.train_step();
      guard.step();
    }
    const bool complete = guard.complete();
    guard.close(Outcome::success);
    return complete;
  };
  CHECK(train(4));
  REQUIRE(checkpoint_dirs(dir.path).size() == 1);  // the step that reached the total saved
  CHECK(cp_list(dir.path).back().complete);
  CHECK(train(4));  // the same command again: complete, nothing written
  CHECK(checkpoint_dirs(dir.path).size() == 1);
  CHECK(captured.sink->contains(spdlog::level::info, "the run is complete"));
  CHECK(captured.sink->contains(spdlog::level::info, "step 4 is as it was restored from"));
  CHECK(train(6));  // a larger total goes on
  CHECK(cp_list(dir.path).back().step == 6);
  CHECK(captured.sink->contains(spdlog::level::info,
                                "the run was complete there, and goes on to step 6"));

  SECTION("mark_complete(), for a run that counts its own way") {
    Run run(1);
    auto options = run.options(dir.path, captured.logger);
    {
      CheckpointGuard guard(run.model, *run.optimizer, options);
      CHECK(guard.complete());  // restored complete, no larger total
      run.train_step();
      guard.step();
      CHECK_FALSE(guard.complete());  // trained more: complete again only when said
      guard.mark_complete();
    }
    CHECK(cp_list(dir.path).back().complete);
  }
}

TEST_CASE("with a sampler, the guard's epoch is the sampler's: one value",
          "[checkpoint][sampler]") {
  TempDir dir;
  CapturedLogger captured;
  Pair pair(1);
  CheckpointGuard guard(pair.options(dir.path, captured.logger));
  CHECK(guard.epoch() == 0);
  pair.sampler.load_checkpoint_state(
      {{"epoch", 3}, {"consumed", 10}, {"size", 100}, {"seed", 1}, {"shuffle", true}});
  CHECK(guard.epoch() == 3);
  CHECK_THROWS_WITH(guard.set_epoch(1), Contains("the epoch is the sampler's"));
}

TEST_CASE("choosing the checkpoint to restore: latest, none, a step or a name",
          "[checkpoint][restore]") {
  TempDir dir;
  CapturedLogger captured;
  {
    Run run(1);
    auto options = run.options(dir.path, captured.logger);
    options.every_n_steps = 1;
    options.keep_last = 10;
    options.save_on_exit = SaveOnExit::never;
    CheckpointGuard guard(run.model, *run.optimizer, options);
    for (int i = 0; i < 3; ++i) {
      run.train_step();
      guard.step();
    }
  }
  auto restored = [&](const std::string& restore) {
    Run run(9);
    auto options = run.options(dir.path, captured.logger);
    options.restore = restore;
    options.save_on_exit = SaveOnExit::never;
    CheckpointGuard guard(run.model, *run.optimizer, options);
    return guard.resumed() ? guard.current_step() : -1;
  };
  CHECK(restored("") == 3);
  CHECK(restored("latest") == 3);
  CHECK(restored("none") == -1);
  CHECK(restored("2") == 2);
  CHECK(captured.sink->contains(spdlog::level::warn, "though 1 newer checkpoints exist"));
  CHECK(restored("ckpt-000001-step-1") == 1);
  CHECK_THROWS_AS(restored("7"), torchguard::NoValidCheckpointError);
  CHECK_THROWS_WITH(restored("7"), Contains("no checkpoint '7'") &&
                                       Contains("there are: ckpt-000001-step-1, "
                                                "ckpt-000002-step-2, ckpt-000003-step-3"));
  fs::resize_file(dir.path / "ckpt-000002-step-2" / "model.safetensors", 10);
  CHECK_THROWS_WITH(restored("2"), Contains("which restore names, is damaged"));
  CHECK(fs::exists(dir.path / "quarantine" / "ckpt-000002-step-2"));
  CHECK(checkpoint_dirs(dir.path).size() == 2);  // the others stay
}

namespace {

std::shared_ptr<torch::optim::Optimizer> make_optimizer(const std::string& kind,
                                                        std::vector<torch::Tensor> parameters) {
  using namespace torch::optim;
  if (kind == "sgd") {
    return std::make_shared<SGD>(parameters, SGDOptions(0.05).momentum(0.9).nesterov(true));
  }
  if (kind == "adam") {
    return std::make_shared<Adam>(parameters, AdamOptions(0.01).betas({0.8, 0.99}));
  }
  if (kind == "adamw") {
    return std::make_shared<AdamW>(parameters, AdamWOptions(0.01).weight_decay(0.05));
  }
  if (kind == "rmsprop") {
    return std::make_shared<RMSprop>(parameters, RMSpropOptions(0.01).momentum(0.5).centered(true));
  }
  return std::make_shared<Adagrad>(parameters, AdagradOptions(0.05));
}

// tests/python_parts.py's run, in C++: resumes from `dir`'s newest checkpoint (whichever side
// wrote it), trains up to `steps`, saves.
void train_parts(const fs::path& dir, std::int64_t steps, const std::string& kind_a,
                 const std::string& kind_b) {
  torch::set_num_threads(1);
  const auto data = torchguard::load_safetensors(dir / "data.safetensors");
  const auto& x = data.at("x");
  const auto& y = data.at("y");
  torch::manual_seed(3);
  torch::nn::Sequential encoder(torch::nn::Linear(6, 16), torch::nn::ReLU(),
                                torch::nn::Dropout(0.3), torch::nn::Linear(16, 4));
  torch::nn::Sequential head(torch::nn::Linear(4, 8), torch::nn::Tanh(), torch::nn::Linear(8, 1));
  auto opt_a = make_optimizer(kind_a, encoder->parameters());
  auto opt_b = make_optimizer(kind_b, head->parameters());
  auto schedule = std::make_shared<torch::optim::StepLR>(*opt_a, 3, 0.5);
  torchguard::ResumableSampler sampler(static_cast<std::size_t>(y.size(0)), {/*seed=*/7});
  CheckpointOptions options = quiet_options(dir / "checkpoints");
  options.models = {{"encoder", encoder.ptr()}, {"head", head.ptr()}};
  options.optimizers = {{"encoder", opt_a}, {"head", opt_b}};
  options.schedulers = {{"encoder", schedule}};
  options.samplers = {{"train", sampler}};
  options.save_on_exit = SaveOnExit::never;
  CheckpointGuard guard(options);
  while (guard.current_step() < steps) {
    const auto left = sampler.remaining();
    const auto count = std::min<std::size_t>(16, left.size());
    const auto batch = torch::tensor(std::vector<std::int64_t>(left.begin(), left.begin() + count));
    opt_a->zero_grad();
    opt_b->zero_grad();
    auto loss = torch::mse_loss(head->forward(encoder->forward(x.index_select(0, batch))),
                                y.index_select(0, batch));
    loss.backward();
    opt_a->step();
    opt_b->step();
    schedule->step();
    if (count == left.size()) {
      sampler.next_epoch();
    } else {
      sampler.consume(count);
    }
    guard.step();
  }
  guard.save();
}

}  // namespace

TEST_CASE("interop: a run goes C++ -> Python -> C++ and Python -> C++ -> Python with every part",
          "[checkpoint][python][interop]") {
  const std::string python = torchguard::testing::libtorch_python("torchguard, safetensors");
  if (python.empty()) return;  // skipped
  const std::string script = fmt::format("{}/python_parts.py", TORCHGUARD_TESTS_DIR);
  auto run_python = [&](const std::string& arguments) {
    return torchguard::testing::command_output(
        fmt::format("{} {} {} 2>&1", python, script, arguments));
  };

  // Python's order is the sampler's, index for index.
  const auto [order, listed] = run_python("permutation 1000 12345 3");
  REQUIRE(listed);
  std::string expected;
  for (const auto index : torchguard::ResumableSampler::permutation(1000, 12345, 3)) {
    expected += std::to_string(index) + "\n";
  }
  CHECK(order == expected);

  // The two optimizers of each pair cross together: every kind, on both models.
  const std::vector<std::pair<std::string, std::string>> pairs = {
      {"sgd", "adam"}, {"rmsprop", "adagrad"}, {"adamw", "sgd"}};
  for (const auto& [kind_a, kind_b] : pairs) {
    CAPTURE(kind_a, kind_b);
    const std::string kinds = kind_a + " " + kind_b;
    TempDir cpp, python_run, crossed, crossed_back;
    torch::manual_seed(11);
    const auto x = torch::randn({256, 6});
    const auto y = x.sum(1, true).sin();
    for (const auto* dir : {&cpp, &python_run, &crossed, &crossed_back}) {
      torchguard::save_safetensors(dir->path / "data.safetensors", {{"x", x}, {"y", y}});
    }
    // C++ alone, and C++ -> Python -> C++ (each side 25 steps: the sampler mid-epoch, the
    // schedule's steps falling on both sides).
    train_parts(cpp.path, 75, kind_a, kind_b);
    train_parts(crossed.path, 25, kind_a, kind_b);
    REQUIRE(run_python(fmt::format("train '{}' 50 {}", crossed.path.string(), kinds)).second);
    train_parts(crossed.path, 75, kind_a, kind_b);
    // Python alone, and Python -> C++ -> Python.
    REQUIRE(run_python(fmt::format("train '{}' 75 {}", python_run.path.string(), kinds)).second);
    REQUIRE(run_python(fmt::format("train '{}' 25 {}", crossed_back.path.string(), kinds)).second);
    train_parts(crossed_back.path, 50, kind_a, kind_b);
    REQUIRE(run_python(fmt::format("train '{}' 75 {}", crossed_back.path.string(), kinds)).second);

    for (const auto& [alone, crossing] :
         {std::pair{&cpp, &crossed}, std::pair{&python_run, &crossed_back}}) {
      const auto [report, equal] =
          run_python(fmt::format("compare '{}' '{}'", (alone->path / "checkpoints").string(),
                                 (crossing->path / "checkpoints").string()));
      INFO(report);
#if TORCH_VERSION_MAJOR >= 2
      // PyTorch 2.x's Python Adam and AdamW update exp_avg, and centered RMSprop grad_avg, with
      // lerp_, LibTorch's C++ ones with mul_ and add_: the last bit may differ, and the
      // difference grows with the steps. Every other kind, and every part, is exact.
      const auto lerps = [](const std::string& kind) {
        return kind == "adam" || kind == "adamw" || kind == "rmsprop";
      };
      if (lerps(kind_a) || lerps(kind_b)) {
        const auto at = report.find("largest difference ");
        REQUIRE(at != std::string::npos);
        CHECK(std::stod(report.substr(at + 19)) < 1e-5);
        continue;
      }
#endif
      CHECK(equal);
    }
  }
}

TEST_CASE(
    "interop: Python's errors say what to do: a running job, damage, an optimizer or a dtype "
    "it cannot rebuild",
    "[checkpoint][python][interop]") {
  const std::string python = torchguard::testing::libtorch_python("torchguard, safetensors");
  if (python.empty()) return;  // skipped
  auto run_python = [&](const std::string& command, const fs::path& dir) {
    return torchguard::testing::command_output(fmt::format("{} {}/python_parts.py {} '{}' 2>&1",
                                                           python, TORCHGUARD_TESTS_DIR, command,
                                                           dir.string()))
        .first;
  };
  TempDir dir;
  {
    Run run(1);
    auto options = run.options(dir.path, std::make_shared<spdlog::logger>("quiet"));
    options.every_n_steps = 1;
    options.save_on_exit = SaveOnExit::never;
    CheckpointGuard guard(run.model, *run.optimizer, options);
    for (int i = 0; i < 2; ++i) {
      run.train_step();
      guard.step();
    }
    // A running C++ job holds the directory: Python's save is refused, naming it.
    CHECK_THAT(run_python("save", dir.path),
               Contains("DirectoryInUseError") &&
                   Contains("in use by another run (pid " + std::to_string(::getpid()) + ")"));
  }
  CHECK_THAT(run_python("describe", dir.path),
             Contains("step 2, models ['model'], optimizers ['optimizer']"));
  // A damaged newest checkpoint: the one before it, with the reason.
  const auto newest = dir.path / "ckpt-000002-step-2";
  {
    std::fstream io(newest / "model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(100);
    io.put('X');
  }
  CHECK_THAT(run_python("describe", dir.path),
             Contains("step 1,") && Contains("model.safetensors fails its checksum"));
  // What Python cannot rebuild: an optimizer LibTorch serialized itself, a dtype torch lacks.
  const auto older = dir.path / "ckpt-000001-step-1";
  auto manifest =
      nlohmann::ordered_json::parse(torchguard::testing::read_text(older / "manifest.json"));
  manifest.erase(torchguard::detail::manifest_checksum_key);
  auto rewrite = [&] {
    std::ofstream(older / "manifest.json", std::ios::trunc)
        << torchguard::detail::manifest_text(manifest);
  };
  manifest["optimizers"]["optimizer"]["kind"] = "archive";
  rewrite();
  CHECK_THAT(run_python("describe", dir.path),
             Contains("UnsupportedOptimizerError: optimizer 'optimizer' is a LibTorch optimizer "
                      "that torchguard does not know"));
  manifest["optimizers"]["optimizer"]["kind"] = "adam";
  torchguard::RawTensorMap raw;
  raw["tensors.odd"] = {"F6_E2M3", {4}, std::string(3, '\0')};
  torchguard::save_safetensors(older / "extra.safetensors", {}, {}, raw);
  const std::string extra = torchguard::testing::read_text(older / "extra.safetensors");
  for (auto& file : manifest["files"]) {
    if (file["name"] != "extra.safetensors") continue;
    file["size"] = extra.size();
    file["xxh3_64"] = torchguard::detail::hex64(torchguard::detail::checksum_of(extra));
  }
  rewrite();
  CHECK_THAT(run_python("describe", dir.path), Contains("CheckpointError: extra.safetensors:") &&
                                                   Contains("a dtype this PyTorch") &&
                                                   Contains("has no tensor for"));
}
