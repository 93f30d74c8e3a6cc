// The Fashion-MNIST model, data-parallel over torch.distributed (c10d): each rank trains on its
// share of every global batch, gradients are averaged over the ranks, rank 0 writes the
// checkpoints and every rank waits for the commit. Start it with torchrun's variables:
//
//   scripts/launch.sh 2 build/default/examples/train_distributed --epochs 1
//   torchrun --nproc-per-node=2 --no-python build/default/examples/train_distributed --epochs 1
//
// Ctrl-C reaches every rank; they agree on the step to stop at, save, and exit 130. The same
// command resumes on every rank from the same step; a resume with another world size (or
// --batch-size, --seed, --threads) is refused.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

#include <torch/torch.h>
#include <CLI/CLI.hpp>
#include <torchguard/torchguard.hpp>

#include "fashion_mnist_training.hpp"

namespace fs = std::filesystem;

namespace {

struct Config : fashion_mnist::Settings {
  int timeout_s = 120;
  bool evaluate = true;
};

torchguard::TrainingSession& open_session(torchguard::ScopeStack& stack,
                                          const torchguard::ProcessGroupGuard& group,
                                          const Config& config) {
  const fs::path run_dir = config.run_dir;
  torchguard::TrainingSessionOptions options;
  options.log_file = run_dir / ("train-rank-" + std::to_string(group.rank()) + ".log");
  if (group.is_main()) {
    options.metrics_file = run_dir / "metrics.jsonl";
    options.tensorboard_dir = run_dir;
  }
  options.handle_signals = true;
  auto& session = stack.emplace<torchguard::TrainingSession>(
      "fashion-mnist rank " + std::to_string(group.rank()), options);
  if (!group.is_main()) session.logger()->set_level(spdlog::level::warn);  // rank 0 speaks
  return session;
}

int train(Config config) {
  at::set_num_threads(config.threads);
  fs::create_directories(config.run_dir);
  // Shared with the CheckpointGuard (a module holder and a shared_ptr): it keeps them alive.
  torch::manual_seed(config.seed);
  fashion_mnist::Net model;
  auto optimizer = std::make_shared<torch::optim::Adam>(
      model->parameters(), torch::optim::AdamOptions(config.learning_rate));
  // Ranks see a signal at different steps: they agree, each step, on whether to stop.
  auto stop = std::make_shared<bool>(false);

  torchguard::ScopeStack stack;
  torchguard::ProcessGroupOptions group_options;
  group_options.timeout = std::chrono::seconds(config.timeout_s);
  auto& group = stack.emplace<torchguard::ProcessGroupGuard>(group_options);
  config.world_size = group.world_size();
  auto& session = open_session(stack, group, config);

  return session.run([&] {
    const auto device = group.device();
    model->to(device);
    group.broadcast_parameters(*model);  // one starting point, whatever each rank's seed did
    auto options = fashion_mnist::checkpoint_options(fs::path(config.run_dir) / "checkpoints",
                                                     config, device, session.logger());
    options.stop_requested = [stop] { return *stop; };
    group.configure_checkpoints(options);  // rank 0 writes; a barrier after each save
    auto& checkpoint = stack.emplace<torchguard::CheckpointGuard>(model, optimizer, options);
    group.check_same(checkpoint.current_step(), "the restored step");
    fashion_mnist::reconcile_settings(checkpoint, *optimizer, config, *session.logger());
    if (group.is_main()) session.resume_metrics(checkpoint.current_step());
    if (checkpoint.resumed() && group.is_main()) {
      std::printf("resumed from step %lld on %d ranks\n",
                  static_cast<long long>(checkpoint.current_step()), group.world_size());
      std::fflush(stdout);
    }

    // Each rank loads the files itself; a stop signal cancels the loading.
    const auto data = fashion_mnist::load_dataset(config.data_dir, session.stop_token());
    // No stop token for the batch loading: a rank must not stop before the others agree.
    fashion_mnist::Trainer run(model, *optimizer, checkpoint, session, data, config,
                               /*whole_batches=*/true, device);
    run.rank = group.rank();
    run.writes_metrics = group.is_main();
    fashion_mnist::EpochHooks hooks;
    hooks.sync_gradients = [&] { group.allreduce_gradients(*model); };
    hooks.before_checkpoint_step = [&] { *stop = group.any(session.stop_requested()); };
    hooks.end_epoch = [&](std::int64_t epoch, const fashion_mnist::EpochFigures& figures,
                          double seconds, bool stopped) {
      if (stopped || !group.is_main()) return;
      session.log_metrics(checkpoint.current_step(), {{"epoch", epoch + 1},
                                                      {"train_loss", figures.train_loss()},
                                                      {"train_accuracy", figures.train_accuracy()},
                                                      {"epoch_s", seconds}});
    };
    const auto start = fashion_mnist::Clock::now();
    const std::int64_t first_step = checkpoint.current_step();
    const bool finished = fashion_mnist::train_epochs(run, hooks);
    const double seconds = fashion_mnist::seconds_since(start);
    checkpoint.close(torchguard::Outcome::success);
    if (!finished) {
      if (group.is_main()) {
        std::printf(
            "interrupted at step %lld on %d ranks: checkpoint saved; run the same "
            "command to resume\n",
            static_cast<long long>(checkpoint.current_step()), group.world_size());
      }
      return 130;
    }
    // Data parallelism keeps one model: the ranks must end with the same parameters.
    group.check_same(static_cast<std::int64_t>(examples::parameter_hash(*model) >> 1),
                     "the final parameters");
    if (group.is_main()) {
      std::string accuracy = "not evaluated";
      if (config.evaluate) {
        const auto evaluation = fashion_mnist::evaluate(model, data.test, data.test.images.size(0),
                                                        device, session.stop_token());
        accuracy = fmt::format("{:.4f}", evaluation.accuracy);
      }
      std::printf(
          "%d ranks: %lld steps of %lld samples, %.0f samples/s; test accuracy %s; "
          "parameters %s on every rank\n",
          group.world_size(), static_cast<long long>(checkpoint.current_step()),
          static_cast<long long>(run.schedule.global_batch),
          static_cast<double>((checkpoint.current_step() - first_step) *
                              run.schedule.global_batch) /
              std::max(seconds, 1e-9),
          accuracy.c_str(), fashion_mnist::parameter_fingerprint(model).c_str());
    }
    group.barrier();  // rank 0 evaluates while the others wait, then all leave together
    return 0;
  });
}

}  // namespace

int main(int argc, char** argv) {
  Config config;
  config.batch_size = 32;  // per rank: the global batch is batch_size * world size
  config.run_dir = "fashion-mnist-distributed";
  config.checkpoint_every = 200;
  config.log_every = 100;
  CLI::App app{
      "Train the Fashion-MNIST CNN data-parallel on torch.distributed (start it with "
      "scripts/launch.sh N or torchrun)."};
  fashion_mnist::add_options(app, config);
  app.add_option("--timeout", config.timeout_s, "seconds to wait for the other ranks")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_flag("--evaluate,!--no-evaluate", config.evaluate,
               "measure the test accuracy at the end (rank 0; the others wait)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  return fashion_mnist::exit_status([&] { return train(config); });
}
