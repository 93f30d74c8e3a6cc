// quickstart: Python's context managers for training, done with torchguard.
//
// A ScopeStack (contextlib.ExitStack) holds a TrainingSession (the `training_session` context
// manager) and a cleanup. The first run succeeds; the second diverges, and the failure path
// shows what Python's `with` gives: the error logged with its type, every cleanup run, the
// exception still reaching the caller. Ctrl-C stops a run between steps instead of killing it.
#include <torch/torch.h>
#include <torchguard/torchguard.hpp>

#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace {

// Fits y = 3x + 1 with a linear model; `diverge_at` >= 0 poisons the loss at that step.
double train(torchguard::TrainingSession& session, int steps, int diverge_at) {
  torch::nn::Linear model(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  const torch::Tensor x = torch::linspace(-1, 1, 256).unsqueeze(1);
  const torch::Tensor y = 3 * x + 1 + 0.05 * torch::randn_like(x);
  double last_loss = 0;
  for (int step = 1; step <= steps && !session.stop_requested(); ++step) {
    optimizer.zero_grad();
    torch::Tensor loss = torch::mse_loss(model(x), y);
    if (step == diverge_at) loss = loss * std::nan("");
    last_loss = loss.item<double>();
    if (!std::isfinite(last_loss)) {
      throw std::domain_error("loss is " + std::to_string(last_loss) + " at step " +
                              std::to_string(step));
    }
    loss.backward();
    optimizer.step();
    if (step % 25 == 0) session.log_metrics(step, {{"loss", last_loss}});
  }
  return last_loss;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  torchguard::TrainingSessionOptions options;
  options.metrics_file = "quickstart-metrics.jsonl";  // one JSON object per log_metrics()
  options.handle_signals = true;                      // Ctrl-C: stop between steps, cleanly

  // Success: entries run newest first when `stack` leaves the scope.
  {
    torchguard::ScopeStack stack;
    auto& session = stack.emplace<torchguard::TrainingSession>("experiment_001", options);
    stack.callback([&] { session.logger()->info("data source released"); });
    const double loss = session.run([&] { return train(session, 100, -1); });
    std::printf("experiment_001 finished with loss %.4f\n", loss);
  }

  // Failure: the loss turns NaN. The session logs the error's type and message, the failure-only
  // cleanup runs, and the exception reaches us unchanged.
  try {
    torchguard::ScopeStack stack;
    auto& session = stack.emplace<torchguard::TrainingSession>("experiment_002", options);
    stack.callback([&] { session.logger()->info("data source released"); });
    stack.on_failure([&] { session.logger()->warn("rolling back: the last good weights stay"); });
    session.run([&] { return train(session, 100, 60); });
  } catch (const std::domain_error& e) {
    std::printf("experiment_002 failed as expected: %s\n", e.what());
    return 0;
  }
  std::printf("experiment_002 should have failed\n");
  return 1;
}
