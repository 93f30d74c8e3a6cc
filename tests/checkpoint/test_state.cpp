// checkpoint/state.hpp: what a checkpoint captures of a run (a copy when staged) and how each
// optimizer goes back.
#include "torchguard/checkpoint.hpp"

#include <unistd.h>

#include <string>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "checkpoint_support.hpp"
#include "torchguard/checkpoint/staging.hpp"
#include "torchguard/checkpoint/state.hpp"

namespace cp = torchguard::detail;
using torchguard::CheckpointGuard;
using torchguard::CheckpointOptions;
using torchguard::SaveOnExit;
using torchguard::testing::CapturedLogger;
using torchguard::testing::Contains;
using torchguard::testing::make_checkpoints;
using torchguard::testing::Net;
using torchguard::testing::Run;
using torchguard::testing::same_parameters;
using torchguard::testing::TempDir;

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

TEST_CASE("an optimizer that is not built in is saved through its own serialize()",
          "[checkpoint]") {
  TempDir dir;
  CapturedLogger captured;
  torch::manual_seed(1);
  torch::nn::Linear model(4, 1);
  torch::optim::LBFGS optimizer(model->parameters(), torch::optim::LBFGSOptions(0.5));
  const torch::Tensor x = torch::randn({16, 4});
  const torch::Tensor y = x.sum(1, true);
  auto closure = [&] {
    optimizer.zero_grad();
    torch::Tensor loss = torch::mse_loss(model(x), y);
    loss.backward();
    return loss;
  };
  optimizer.step(closure);
  // LibTorch 1.13 cannot serialize LBFGS at all (torch::save throws too); later versions can.
  bool libtorch_can = true;
  try {
    torch::save(optimizer, (dir.path / "peer.pt").string());
  } catch (const std::exception&) {
    libtorch_can = false;
  }
  CheckpointOptions options;
  options.directory = dir.path / "checkpoints";
  options.logger = captured.logger;
  options.save_on_exit = SaveOnExit::never;
  CheckpointGuard guard(model, optimizer, options);
  if (!libtorch_can) {
    CHECK_THROWS_WITH(guard.save(), Contains("cannot save the checkpoint of step 0"));
    CHECK(guard.list().empty());
    return;
  }
  guard.save();
  const auto manifest = nlohmann::json::parse(
      torchguard::testing::read_text(guard.list().back().path / "manifest.json"));
  CHECK(manifest["optimizers"]["optimizer"]["kind"] == "archive");
  torch::nn::Linear model2(4, 1);
  torch::optim::LBFGS optimizer2(model2->parameters(), torch::optim::LBFGSOptions(0.5));
  CheckpointGuard restored(model2, optimizer2, options);
  CHECK(same_parameters(*model, *model2));
  CHECK(optimizer2.state().size() == optimizer.state().size());
}

TEST_CASE("a checkpoint of another optimizer kind is a clear error", "[checkpoint]") {
  CapturedLogger captured;
  // An Adam checkpoint does not load into an SGD program: a clear error.
  TempDir adam_dir;
  Run run(1);
  make_checkpoints(adam_dir.path, 1, run);
  Net net;
  torch::optim::SGD sgd(net->parameters(), 0.1);
  CheckpointOptions sgd_options;
  sgd_options.directory = adam_dir.path;
  sgd_options.logger = captured.logger;
  CHECK_THROWS_WITH(CheckpointGuard(net, sgd, sgd_options),
                    Contains("the optimizer is sgd, the checkpoint's is adam"));
}
