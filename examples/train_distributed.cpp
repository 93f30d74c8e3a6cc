// The Fashion-MNIST model, data-parallel over torch.distributed (c10d): each rank trains on its
// share of every global batch, gradients are averaged over the ranks, rank 0 writes the
// checkpoints and every rank waits for the commit. Start it with torchrun's variables:
//
//   scripts/launch.sh 2 build/default/examples/train_distributed --epochs 1
//   torchrun --nproc-per-node=2 --no-python build/default/examples/train_distributed --epochs 1
//
// Ctrl-C reaches every rank; they agree on the step to stop at, save, and exit 130. The same
// command resumes on every rank from the same step.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>

#include <torch/torch.h>
#include <CLI/CLI.hpp>
#include <torchguard/torchguard.hpp>

#include "fashion_mnist.hpp"
#include "fashion_mnist_model.hpp"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

struct Config {
  int epochs = 1;
  std::int64_t batch_size = 32;  // per rank: the global batch is batch_size * world size
  double learning_rate = 1e-3;
  std::string run_dir = "fashion-mnist-distributed";
  std::string data_dir = fashion_mnist::kDefaultDir;
  std::uint64_t seed = 1;
  std::int64_t max_steps = 0;
  int threads = 1;  // per rank
  std::int64_t checkpoint_every = 200;
  int timeout_s = 120;
};

int train(const Config& config) {
  at::set_num_threads(config.threads);
  torchguard::ScopeStack stack;
  torchguard::ProcessGroupOptions group_options;
  group_options.timeout = std::chrono::seconds(config.timeout_s);
  auto& group = stack.emplace<torchguard::ProcessGroupGuard>(group_options);
  const fs::path run_dir = config.run_dir;
  fs::create_directories(run_dir);

  torchguard::TrainingSessionOptions session_options;
  session_options.log_file = run_dir / ("train-rank-" + std::to_string(group.rank()) + ".log");
  if (group.is_main()) session_options.metrics_file = run_dir / "metrics.jsonl";
  session_options.handle_signals = true;
  auto& session = stack.emplace<torchguard::TrainingSession>(
      "fashion-mnist rank " + std::to_string(group.rank()), session_options);
  auto log = session.logger();
  if (!group.is_main()) log->set_level(spdlog::level::warn);  // rank 0 speaks for the group

  return session.run([&] {
    const auto device = group.device();
    const auto [train_set, test_set] = fashion_mnist::load_dataset(config.data_dir);
    torch::manual_seed(config.seed);
    fashion_mnist::Net model;
    model->to(device);
    group.broadcast_parameters(*model);  // one starting point, whatever each rank's seed did
    torch::optim::Adam optimizer(model->parameters(),
                                 torch::optim::AdamOptions(config.learning_rate));

    // Ranks see a signal at different steps: they agree, each step, on whether to stop.
    bool stop = false;
    torchguard::CheckpointOptions checkpoint_options;
    checkpoint_options.directory = run_dir / "checkpoints";
    checkpoint_options.every_n_steps = config.checkpoint_every;
    checkpoint_options.load_device = device;
    checkpoint_options.logger = log;
    checkpoint_options.stop_requested = [&stop] { return stop; };
    group.configure_checkpoints(checkpoint_options);  // rank 0 writes; a barrier after each save
    auto& checkpoint =
        stack.emplace<torchguard::CheckpointGuard>(model, optimizer, checkpoint_options);
    group.check_same(checkpoint.current_step(), "the restored step");
    if (checkpoint.resumed() && group.is_main()) {
      std::printf("resumed from step %lld on %d ranks\n",
                  static_cast<long long>(checkpoint.current_step()), group.world_size());
      std::fflush(stdout);
    }

    const std::int64_t samples = train_set.images.size(0);
    const std::int64_t global_batch = config.batch_size * group.world_size();
    const std::int64_t steps_per_epoch = samples / global_batch;  // whole global batches only
    std::int64_t total_steps = steps_per_epoch * config.epochs;
    if (config.max_steps > 0) total_steps = std::min(total_steps, config.max_steps);
    const auto start = Clock::now();
    const std::int64_t first_step = checkpoint.current_step();
    double loss_value = 0;
    std::int64_t order_epoch = -1;
    torch::Tensor order;
    while (checkpoint.current_step() < total_steps && !stop) {
      const std::int64_t step = checkpoint.current_step();
      const std::int64_t epoch = step / steps_per_epoch;
      checkpoint.set_epoch(epoch);
      if (order_epoch != epoch) {
        order = torch::tensor(fashion_mnist::epoch_order(samples, config.seed, epoch));
        order_epoch = epoch;
      }
      // This rank's share of the step's global batch.
      const std::int64_t begin =
          (step % steps_per_epoch) * global_batch + group.rank() * config.batch_size;
      const auto indices = order.slice(0, begin, begin + config.batch_size);
      const auto images = train_set.images.index_select(0, indices).to(device);
      const auto labels = train_set.labels.index_select(0, indices).to(device);

      optimizer.zero_grad();
      auto loss = torch::nn::functional::cross_entropy(model->forward(images), labels);
      loss.backward();
      group.allreduce_gradients(*model);
      optimizer.step();
      loss_value = loss.item<double>();
      stop = group.any(session.stop_requested());
      checkpoint.step({{"loss", loss_value}});
      if (group.is_main() && checkpoint.current_step() % 100 == 0) {
        const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
        session.log_metrics(
            checkpoint.current_step(),
            {{"loss", loss_value},
             {"samples_per_s",
              static_cast<double>((checkpoint.current_step() - first_step) * global_batch) /
                  seconds}});
      }
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    const double samples_per_s =
        static_cast<double>((checkpoint.current_step() - first_step) * global_batch) /
        std::max(seconds, 1e-9);
    checkpoint.close(torchguard::Outcome::success);
    if (stop) {
      if (group.is_main()) {
        std::printf(
            "interrupted at step %lld on %d ranks: checkpoint saved; run the same "
            "command to resume\n",
            static_cast<long long>(checkpoint.current_step()), group.world_size());
      }
      return 130;
    }
    if (group.is_main()) {
      const auto evaluation =
          fashion_mnist::evaluate(model, test_set, test_set.images.size(0), device);
      std::printf(
          "%d ranks: %lld steps of %lld samples, %.0f samples/s; test accuracy %.4f; "
          "parameters %s\n",
          group.world_size(), static_cast<long long>(checkpoint.current_step()),
          static_cast<long long>(global_batch), samples_per_s, evaluation.accuracy,
          fashion_mnist::parameter_fingerprint(model).c_str());
    }
    group.barrier();  // rank 0 evaluates while the others wait, then all leave together
    return 0;
  });
}

}  // namespace

int main(int argc, char** argv) {
  Config config;
  CLI::App app{
      "Train the Fashion-MNIST CNN data-parallel on torch.distributed (start it with "
      "scripts/launch.sh N or torchrun)."};
  app.add_option("--epochs", config.epochs, "epochs to train")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--batch-size", config.batch_size, "samples per rank and step")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--lr", config.learning_rate, "Adam's learning rate")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--run-dir", config.run_dir, "logs and checkpoints (shared by the ranks)")
      ->capture_default_str();
  app.add_option("--data-dir", config.data_dir, "the Fashion-MNIST .gz files")
      ->capture_default_str();
  app.add_option("--seed", config.seed, "seeds the model and the batch order")
      ->capture_default_str();
  app.add_option("--max-steps", config.max_steps, "stop after this many steps (0: no limit)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--threads", config.threads, "intra-op threads per rank")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--checkpoint-every", config.checkpoint_every, "save every N steps")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--timeout", config.timeout_s, "seconds to wait for the other ranks")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    return train(config);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n",
                 torchguard::detail::first_part_of_message(e.what()).c_str());
    return 1;
  }
}
