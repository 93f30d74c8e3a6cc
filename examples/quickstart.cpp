// quickstart: Python's context managers for training, done with torchguard.
//
// A ScopeStack (contextlib.ExitStack) holds a TrainingSession (the `training_session` context
// manager), a CheckpointGuard (the `CheckpointManager`) and a cleanup. The first run succeeds
// and checkpoints; run the program again and it resumes. The second run diverges, and the
// failure path shows what Python's `with` gives: the error logged with its type, every cleanup
// run, nothing saved over the good checkpoint, the exception still reaching the caller.
// Ctrl-C stops a run between steps (and saves) instead of killing it.
#include <torch/torch.h>
#include <torchguard/torchguard.hpp>

#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace {

// Fits y = 3x + 1 for `steps` more steps; `diverge_at` >= 0 poisons the loss at that step.
double train(torch::nn::Linear& model, torch::optim::SGD& optimizer,
             torchguard::TrainingSession& session, torchguard::CheckpointGuard& checkpoint,
             int steps, int diverge_at) {
  const torch::Tensor x = torch::linspace(-1, 1, 256).unsqueeze(1);
  const torch::Tensor y = 3 * x + 1 + 0.05 * torch::randn_like(x);
  double last_loss = 0;
  for (int i = 1; i <= steps; ++i) {
    optimizer.zero_grad();
    torch::Tensor loss = torch::mse_loss(model(x), y);
    if (i == diverge_at) loss = loss * std::nan("");
    last_loss = loss.item<double>();
    if (!std::isfinite(last_loss)) {
      throw std::domain_error("loss is " + std::to_string(last_loss) + " at step " +
                              std::to_string(checkpoint.current_step() + 1));
    }
    loss.backward();
    optimizer.step();
    const auto result = checkpoint.step({{"loss", last_loss}});
    if (checkpoint.current_step() % 25 == 0) {
      session.log_metrics(checkpoint.current_step(), {{"loss", last_loss}});
    }
    if (result.stop) break;  // Ctrl-C: saved, stop here
  }
  return last_loss;
}

}  // namespace

int run() {
  torch::manual_seed(0);
  // Shared with the CheckpointGuards (a module holder and a shared_ptr): they cannot dangle.
  torch::nn::Linear model(1, 1);
  auto optimizer =
      std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));

  torchguard::TrainingSessionOptions session_options;
  session_options.metrics_file = "quickstart-metrics.jsonl";  // one JSON object per line
  session_options.handle_signals = true;                      // Ctrl-C: stop between steps, cleanly

  // Success: entries run newest first when `stack` leaves the scope; the checkpoint is saved.
  {
    torchguard::ScopeStack stack;
    auto& session = stack.emplace<torchguard::TrainingSession>("experiment_001", session_options);
    torchguard::CheckpointOptions checkpoint_options;
    checkpoint_options.directory = "quickstart-checkpoints";
    checkpoint_options.save_on_exit = torchguard::SaveOnExit::on_success;
    checkpoint_options.stop_token = session.stop_token();  // Ctrl-C: save, then stop
    auto& checkpoint =
        stack.emplace<torchguard::CheckpointGuard>(model, optimizer, checkpoint_options);
    stack.callback([&] { session.logger()->info("data source released"); });
    const double loss =
        session.run([&] { return train(model, *optimizer, session, checkpoint, 100, -1); });
    std::printf("experiment_001 reached step %lld with loss %.4f%s\n",
                static_cast<long long>(checkpoint.current_step()), loss,
                checkpoint.resumed() ? " (resumed)" : "");
  }

  // Failure: the loss turns NaN. The session logs the error's type and message, the failure-only
  // cleanup runs, the checkpoint is not overwritten, and the exception reaches us unchanged.
  try {
    torchguard::ScopeStack stack;
    auto& session = stack.emplace<torchguard::TrainingSession>("experiment_002", session_options);
    torchguard::CheckpointOptions checkpoint_options;
    checkpoint_options.directory = "quickstart-checkpoints";
    checkpoint_options.save_on_exit = torchguard::SaveOnExit::on_success;
    auto& checkpoint =
        stack.emplace<torchguard::CheckpointGuard>(model, optimizer, checkpoint_options);
    stack.callback([&] { session.logger()->info("data source released"); });
    stack.on_failure([&] { session.logger()->warn("not saving: the last good checkpoint stays"); });
    session.run([&] { return train(model, *optimizer, session, checkpoint, 100, 60); });
  } catch (const std::domain_error& e) {
    std::printf("experiment_002 failed as expected: %s\n", e.what());
    return 0;
  }
  std::printf("experiment_002 should have failed\n");
  return 1;
}

// Errors end the program with "error: <message>" and status 1, never an abort.
int main() { return torchguard::exit_status(run); }
