// checkpoint: a training loop that resumes where it stopped.
//
// Run it, stop it with Ctrl-C (or let it finish), run it again: it resumes from the newest
// valid checkpoint, bitwise where it left off. Checkpoints go to ./checkpoints (or argv[1]):
// one every 50 steps, the last 3 and the best by loss kept, one more at exit.
#include <torch/torch.h>
#include <torchguard/torchguard.hpp>

#include <cstdio>
#include <string>

int run(int argc, char** argv) {
  const std::string directory = argc > 1 ? argv[1] : "checkpoints";
  const std::int64_t total_steps = 300;
  torch::manual_seed(0);

  torch::nn::Sequential model(torch::nn::Linear(16, 64), torch::nn::ReLU(),
                              torch::nn::Linear(64, 1));
  // Shared with the guard (a module holder and shared_ptrs): they live as long as it needs them.
  auto optimizer =
      std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(1e-2));
  auto scheduler = std::make_shared<torch::optim::StepLR>(*optimizer, /*step_size=*/100,
                                                          /*gamma=*/0.5);

  torchguard::TrainingSessionOptions session_options;
  session_options.handle_signals = true;  // Ctrl-C: save and stop at the next step
  torchguard::TrainingSession session("checkpoint-example", session_options);

  torchguard::CheckpointOptions options;
  options.directory = directory;
  options.every_n_steps = 50;
  options.keep_last = 3;
  options.keep_best = 1;
  options.best_metric = "loss";
  options.scheduler = scheduler;
  options.stop_requested = [&] { return session.stop_requested(); };
  torchguard::CheckpointGuard checkpoint(model, optimizer, options);  // restores, if any

  const torch::Tensor weights = torch::randn({16, 1});
  while (checkpoint.current_step() < total_steps) {
    const torch::Tensor x = torch::randn({64, 16});
    const torch::Tensor y = x.mm(weights);
    optimizer->zero_grad();
    torch::Tensor loss = torch::mse_loss(model->forward(x), y);
    loss.backward();
    optimizer->step();
    scheduler->step();
    const double value = loss.item<double>();
    if (checkpoint.current_step() % 50 == 49)
      session.log_metrics(checkpoint.current_step() + 1, {{"loss", value}});
    if (checkpoint.step({{"loss", value}}).stop) {
      std::printf("stopped at step %lld; run again to resume\n",
                  static_cast<long long>(checkpoint.current_step()));
      return 0;
    }
  }
  std::printf("finished %lld steps (resumed: %s)\n",
              static_cast<long long>(checkpoint.current_step()),
              checkpoint.resumed() ? "yes" : "no");
  return 0;
}

// Errors end the program with "error: <message>" and status 1, never an abort.
int main(int argc, char** argv) {
  return torchguard::exit_status([&] { return run(argc, argv); });
}
