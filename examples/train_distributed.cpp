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
#include <vector>

#include <torch/torch.h>
#include <CLI/CLI.hpp>
#include <torchguard/torchguard.hpp>

#include "fashion_mnist_common.hpp"

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
  options.lock_directories = group.is_main();  // one job, several processes: rank 0 holds it
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

  const int status = session.run([&] {
    const auto device = group.device();
    model->to(device);
    group.broadcast_parameters(*model);  // one starting point, whatever each rank's seed did
    // Each rank loads the files itself; a stop signal cancels the loading.
    const auto data = fashion_mnist::load_dataset(config.data_dir, session.stop_token());
    const fashion_mnist::Schedule schedule(data.train.images.size(0), config,
                                           /*whole_batches=*/true);
    // Every rank keeps the same sampler (the same seed and steps); rank 0's is saved.
    torchguard::ResumableSampler sampler(static_cast<std::size_t>(schedule.samples), {config.seed});
    if (!config.skip_samples.empty()) sampler.skip(config.skip_samples);
    const fashion_mnist::Poison poison(config, schedule, group.rank());
    auto options =
        fashion_mnist::checkpoint_options(fs::path(config.run_dir) / "checkpoints", config,
                                          schedule, sampler, device, session.logger());
    options.stop_requested = [stop] { return *stop; };
    group.configure_checkpoints(options);  // rank 0 writes; a barrier after each save; one
                                           // decision on every rank for a recovery
    auto& checkpoint = stack.emplace<torchguard::CheckpointGuard>(model, optimizer, options);
    group.check_same(checkpoint.current_step(), "the restored step");
    fashion_mnist::use_learning_rate(*optimizer, config.learning_rate);
    if (group.is_main()) session.resume_metrics(checkpoint.current_step());
    session.set_step(checkpoint.current_step());
    if (checkpoint.resumed() && group.is_main()) {
      std::printf("resumed from step %lld on %d ranks\n",
                  static_cast<long long>(checkpoint.current_step()), group.world_size());
      std::fflush(stdout);
    }
    if (checkpoint.complete()) {
      if (group.is_main()) {
        std::printf("the run is complete at step %lld: nothing to train; parameters %s\n",
                    static_cast<long long>(checkpoint.current_step()),
                    fashion_mnist::parameter_fingerprint(model).c_str());
      }
      return 0;
    }

    // The epochs: each rank trains its share of every global batch; the gradients are averaged
    // before each optimizer step, and the ranks agree at each step on whether to stop. An epoch's
    // last, partial global batch is left out (every rank must get a share).
    const auto start = fashion_mnist::Clock::now();
    const std::int64_t first_step = checkpoint.current_step();
    bool stopped = false;
    torchguard::StepVerdict verdict;  // of the last step judged (--recovery)
    while (!stopped && checkpoint.current_step() < schedule.total_steps) {
      const std::int64_t epoch = sampler.epoch();
      const std::vector<std::size_t> left = sampler.remaining();
      const auto left_steps = static_cast<std::int64_t>(left.size()) / schedule.global_batch;
      const std::int64_t steps =
          std::min(left_steps, schedule.total_steps - checkpoint.current_step());
      // No stop token for the batch loading: a rank must not stop before the others agree.
      auto batches = fashion_mnist::epoch_batches(
          data, std::vector<std::int64_t>(left.begin(), left.end()), schedule, config.batch_size,
          group.rank(), steps, {}, device);
      fashion_mnist::EpochFigures figures =
          fashion_mnist::EpochFigures::restore(checkpoint.metadata(), epoch);
      const auto epoch_start = fashion_mnist::Clock::now();
      std::int64_t done = 0;
      for (auto& batch : batches) {
        // The whole global batch: a recovery skips it on every rank.
        const auto indices = fashion_mnist::global_batch_indices(left, done, schedule.global_batch);
        const auto step = fashion_mnist::train_step(
            model, *optimizer, batch,
            [&](const torch::Tensor& loss) {
              group.allreduce_gradients(*model);
              verdict = checkpoint.check_step(loss, indices);  // the ranks decide together
              return !verdict.recovered;
            },
            poison.at(checkpoint.current_step() + 1, indices));
        if (!step.applied) break;  // every rank went back: start the epoch over
        figures.add(step.loss, step.samples, step.correct);
        ++done;
        if (done == left_steps) {
          sampler.next_epoch();
        } else {
          sampler.consume(static_cast<std::size_t>(schedule.global_batch));
        }
        const std::int64_t global_step = checkpoint.current_step() + 1;
        if (group.is_main() &&
            (global_step % config.log_every == 0 || global_step == schedule.total_steps)) {
          session.log_metrics(global_step,
                              {{"loss", figures.take_window_loss()}, {"lr", config.learning_rate}});
        }
        checkpoint.metadata()[fashion_mnist::EpochFigures::kKey] = figures.to_json(
            epoch, figures.earlier_seconds + fashion_mnist::seconds_since(epoch_start));
        *stop = group.any(session.stop_requested());  // the same decision on every rank
        if (checkpoint.step({{"loss", step.loss}}).stop) {
          stopped = true;
          break;
        }
      }
      if (verdict.recovered) {
        if (group.is_main()) {
          session.resume_metrics(verdict.restored_step);
          session.log_metrics(verdict.restored_step, verdict.metrics());
        }
        session.set_step(verdict.restored_step);
        verdict = {};
        continue;
      }
      if (stopped || !group.is_main()) continue;
      session.log_metrics(
          checkpoint.current_step(),
          {{"epoch", epoch + 1},
           {"train_loss", figures.train_loss()},
           {"train_accuracy", figures.train_accuracy()},
           {"epoch_s", figures.earlier_seconds + fashion_mnist::seconds_since(epoch_start)}});
    }
    const double seconds = fashion_mnist::seconds_since(start);
    checkpoint.close(torchguard::Outcome::success);
    session.set_step(checkpoint.current_step());
    if (stopped) {
      if (group.is_main()) {
        std::printf(
            "interrupted at step %lld on %d ranks: checkpoint saved; run the same "
            "command to resume\n",
            static_cast<long long>(checkpoint.current_step()), group.world_size());
      }
      return torchguard::interrupted_exit_status;
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
          static_cast<long long>(schedule.global_batch),
          static_cast<double>((checkpoint.current_step() - first_step) * schedule.global_batch) /
              std::max(seconds, 1e-9),
          accuracy.c_str(), fashion_mnist::parameter_fingerprint(model).c_str());
    }
    group.barrier();  // rank 0 evaluates while the others wait, then all leave together
    return 0;
  });
  stack.close();  // the last save, the session's files, the group: what fails here fails the run
  return status;
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
