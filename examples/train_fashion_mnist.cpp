// The training demo: a small CNN on Fashion-MNIST with every guard in one ScopeStack.
//
//   TrainingSession    the run's log (console and train.log), metrics.jsonl, TensorBoard event
//                      files (`tensorboard --logdir <run-dir>`), the stop signal, the run
//                      directory's lock
//   CheckpointGuard    restore on start (--restore picks another checkpoint), save every N steps,
//                      at the end and on a stop request; it records the settings and the end
//   ResumableSampler   the epoch's order and the place in it, saved in every checkpoint
//   --recovery         a step whose loss or gradients are not finite, or whose loss spikes,
//                      goes back to the last checkpoint and its batch is skipped from then on
//                      (--poison-steps injects such steps: docs/guides/recovery.md)
//   GpuMemoryGuard     per-epoch memory accounting (a no-op that says so on the CPU)
//   gather             the four dataset files decompressed and parsed concurrently
//   Prefetcher         batches assembled ahead of the training step
//   BatchedInference   the test-set evaluation, one request per image, merged into batches
//
// Ctrl-C (or SIGTERM) stops loading, training and evaluation alike, saves a checkpoint and exits
// with status 130; the same command resumes from it ("resumed from step X") and ends with the
// same parameters as a run that was never interrupted (bitwise on the CPU with a fixed thread
// count). A resume with another --batch-size, --seed or --threads is refused, another --lr,
// --epochs or --max-steps is used with a warning. Run again once finished, it says so and trains
// nothing; a larger --epochs or --max-steps goes on.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>
#include <CLI/CLI.hpp>
#include <torchguard/torchguard.hpp>

#include "fashion_mnist_common.hpp"
#include "run_report.hpp"

namespace fs = std::filesystem;
using fashion_mnist::Clock;
using fashion_mnist::EpochFigures;

namespace {

struct Config : fashion_mnist::Settings {
  std::string checkpoint_dir;  // default: <run_dir>/checkpoints
  std::string device = "auto";
  std::int64_t eval_samples = 0;  // 0: the whole test set
  bool plots = true;
  std::string init_from;  // a safetensors state_dict to start from (e.g. written by Python)
};

// The process's peak resident memory since the last reset_peak_rss() (Linux: VmHWM), in MiB:
// what "memory per epoch" means on the CPU.
double peak_rss_mib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;  // in kB
  }
  return 0.0;
}
void reset_peak_rss() { std::ofstream("/proc/self/clear_refs") << "5"; }

// The end of a finished run: the epochs table, the charts, the parameters' fingerprint.
void report_finished_run(fashion_mnist::Net& model, const Config& config, spdlog::logger& log,
                         std::int64_t step, std::int64_t samples, double seconds) {
  const fs::path run_dir = config.run_dir;
  std::printf("\n%s\n",
              run_report::summary_table(run_report::read_rows(run_dir / "metrics.jsonl")).c_str());
  if (config.plots) {
    std::string why;
    for (const auto& png : run_report::plot(run_dir, why)) std::printf("plot: %s\n", png.c_str());
    if (!why.empty()) log.info("plots not drawn: {}", why);
  }
  const auto fingerprint = fashion_mnist::parameter_fingerprint(model);
  std::printf("finished at step %lld; this run: %s, %.0f samples/s; parameters %s\n",
              static_cast<long long>(step), run_report::duration(seconds).c_str(),
              static_cast<double>(samples) / std::max(seconds, 1e-9), fingerprint.c_str());
  std::ofstream(run_dir / "parameters.xxh3") << fingerprint << "\n";
}

// Inside the session: the data, the checkpoint (restored), the epochs.
int train_in_session(torchguard::ScopeStack& stack, torchguard::TrainingSession& session,
                     fashion_mnist::Net& model, std::shared_ptr<torch::optim::Adam> optimizer,
                     const Config& config, torch::Device device) {
  auto log = session.logger();
  log->info("device {}, {} intra-op threads, seed {}, batch {}, learning rate {}", device.str(),
            at::get_num_threads(), config.seed, config.batch_size, config.learning_rate);
  if (!config.init_from.empty()) {  // a fresh start begins here; a resume overrides it
    torchguard::load_state_dict(*model, fs::path(config.init_from));
    log->info("initialized the model from {}", config.init_from);
  }
  const auto load_start = Clock::now();
  const auto data = fashion_mnist::load_dataset(config.data_dir, session.stop_token());
  log->info("loaded {} training and {} test images from {} in {:.2f} s", data.train.images.size(0),
            data.test.images.size(0), config.data_dir, fashion_mnist::seconds_since(load_start));
  const fashion_mnist::Schedule schedule(data.train.images.size(0), config,
                                         /*whole_batches=*/false);
  torchguard::ResumableSampler sampler(static_cast<std::size_t>(schedule.samples), {config.seed});
  if (!config.skip_samples.empty()) sampler.skip(config.skip_samples);  // a resume restores its own
  const fashion_mnist::Poison poison(config, schedule, /*rank=*/0);

  // Restores the newest valid checkpoint (or the one --restore names), refuses a resume with
  // other exact settings, and cuts metrics.jsonl and TensorBoard back to the restored step.
  const fs::path directory = config.checkpoint_dir.empty()
                                 ? fs::path(config.run_dir) / "checkpoints"
                                 : fs::path(config.checkpoint_dir);
  auto options =
      fashion_mnist::checkpoint_options(directory, config, schedule, sampler, device, log);
  options.stop_token = session.stop_token();
  options.after_save = [&session] { session.flush(); };  // metrics on disk as far as the save
  auto& checkpoint = stack.emplace<torchguard::CheckpointGuard>(model, optimizer, options);
  fashion_mnist::use_learning_rate(*optimizer, config.learning_rate);
  session.resume_metrics(checkpoint.current_step());
  session.set_step(checkpoint.current_step());
  if (checkpoint.resumed()) {
    std::printf("resumed from step %lld (%s)\n", static_cast<long long>(checkpoint.current_step()),
                checkpoint.resumed_from()->filename().c_str());
    std::fflush(stdout);
  }
  if (checkpoint.complete()) {
    std::printf(
        "the run is complete at step %lld: nothing to train (a larger --epochs or --max-steps "
        "goes on); parameters %s\n",
        static_cast<long long>(checkpoint.current_step()),
        fashion_mnist::parameter_fingerprint(model).c_str());
    return 0;
  }

  // The epochs: each goes on where the sampler says (a resumed one midway), up to the run's
  // last step, and ends with an evaluation and the epoch's row in metrics.jsonl.
  const auto start = Clock::now();
  const std::int64_t first_step = checkpoint.current_step();
  bool stopped = false;
  torchguard::StepVerdict verdict;  // of the last step judged (--recovery)
  while (!stopped && checkpoint.current_step() < schedule.total_steps) {
    const std::int64_t epoch = sampler.epoch();
    const std::vector<std::size_t> left = sampler.remaining();
    const auto left_steps = (static_cast<std::int64_t>(left.size()) + schedule.global_batch - 1) /
                            schedule.global_batch;
    const std::int64_t steps =
        std::min(left_steps, schedule.total_steps - checkpoint.current_step());
    torchguard::GpuMemoryOptions memory_options;
    memory_options.label = "epoch " + std::to_string(epoch + 1);
    torchguard::GpuMemoryGuard memory(memory_options);
    reset_peak_rss();
    run_report::Progress progress(
        "epoch " + std::to_string(epoch + 1) + "/" + std::to_string(config.epochs), steps);
    EpochFigures figures = EpochFigures::restore(checkpoint.metadata(), epoch);
    const std::int64_t seen_before = figures.seen;
    auto batches = fashion_mnist::epoch_batches(
        data, std::vector<std::int64_t>(left.begin(), left.end()), schedule, config.batch_size,
        /*rank=*/0, steps, session.stop_token(), device);

    const auto epoch_start = Clock::now();
    auto window_start = Clock::now();
    std::int64_t window_samples = 0;
    std::int64_t done = 0;
    for (auto& batch : batches) {
      const auto indices = fashion_mnist::global_batch_indices(left, done, schedule.global_batch);
      const auto step = fashion_mnist::train_step(
          model, *optimizer, batch,
          [&](const torch::Tensor& loss) {
            verdict = checkpoint.check_step(loss, indices);
            return !verdict.recovered;
          },
          poison.at(checkpoint.current_step() + 1, indices));
      if (!step.applied) break;  // every part and the sampler went back: start the epoch over
      figures.add(step.loss, step.samples, step.correct);
      window_samples += step.samples;
      ++done;
      // The sampler's place first: the checkpoint of this step records it. The epoch's last
      // batch moves it to the next epoch.
      if (done == left_steps) {
        sampler.next_epoch();
      } else {
        sampler.consume(static_cast<std::size_t>(step.samples));
      }
      // A metrics row every --log-every steps, written before the checkpoint of its step: a row
      // past the step a later run restores is cut from metrics.jsonl by that run.
      const std::int64_t global_step = checkpoint.current_step() + 1;
      if (global_step % config.log_every == 0 || global_step == schedule.total_steps) {
        const double rate = window_samples / fashion_mnist::seconds_since(window_start);
        session.log_metrics(global_step, {{"loss", figures.take_window_loss()},
                                          {"lr", config.learning_rate},
                                          {"samples_per_s", rate}});
        window_start = Clock::now();
        window_samples = 0;
      }
      checkpoint.metadata()[EpochFigures::kKey] = figures.to_json(
          epoch, figures.earlier_seconds + fashion_mnist::seconds_since(epoch_start));
      const auto result = checkpoint.step({{"loss", step.loss}});
      progress.update(done, figures.seen - seen_before, step.loss);
      if (result.stop) {
        stopped = true;
        break;
      }
    }
    if (verdict.recovered) {
      // metrics.jsonl and TensorBoard go back too, with a row that says what happened.
      progress.finish();
      session.resume_metrics(verdict.restored_step);
      session.log_metrics(verdict.restored_step, verdict.metrics());
      session.set_step(verdict.restored_step);
      verdict = {};
      continue;
    }
    // The stop signal can end the batches before the checkpoint saw it: save that step.
    if (!stopped && done < steps) {
      checkpoint.save();
      stopped = true;
    }
    progress.finish();
    if (stopped) break;

    // The end of an epoch, or of a --max-steps run inside one: evaluate.
    const std::int64_t test_size = data.test.images.size(0);
    const auto evaluation = fashion_mnist::evaluate(
        model, data.test,
        config.eval_samples > 0 ? std::min(config.eval_samples, test_size) : test_size, device,
        session.stop_token());
    memory.close(torchguard::Outcome::success);
    // GPU: the allocator's peak inside the epoch; CPU: the process's peak resident memory.
    const double memory_mib =
        memory.stats().available
            ? static_cast<double>(memory.stats().peak_allocated_bytes) / (1024.0 * 1024.0)
            : peak_rss_mib();
    session.log_metrics(
        checkpoint.current_step(),
        {{"epoch", epoch + 1},
         {"train_loss", figures.train_loss()},
         {"train_accuracy", figures.train_accuracy()},
         {"test_loss", evaluation.loss},
         {"test_accuracy", evaluation.accuracy},
         {"epoch_s", figures.earlier_seconds + fashion_mnist::seconds_since(epoch_start)},
         {"memory_peak_mib", memory_mib}});
  }
  checkpoint.close(torchguard::Outcome::success);  // the last save; rethrows a failed one
  session.set_step(checkpoint.current_step());
  if (stopped) {
    std::printf(
        "interrupted at step %lld: checkpoint saved in %s; run the same command to resume\n",
        static_cast<long long>(checkpoint.current_step()), checkpoint.directory().c_str());
    return torchguard::interrupted_exit_status;
  }
  report_finished_run(model, config, *log, checkpoint.current_step(),
                      (checkpoint.current_step() - first_step) * schedule.global_batch,
                      fashion_mnist::seconds_since(start));
  return 0;
}

int train(const Config& config) {
  at::set_num_threads(config.threads);  // fixed: results depend on it
  const auto device = fashion_mnist::pick_device(config.device);
  fs::create_directories(config.run_dir);

  // Shared with the CheckpointGuard (a module holder and a shared_ptr): it keeps them alive for
  // as long as it needs them, wherever the stack that holds it ends.
  torch::manual_seed(config.seed);
  fashion_mnist::Net model;
  model->to(device);
  auto optimizer = std::make_shared<torch::optim::Adam>(
      model->parameters(), torch::optim::AdamOptions(config.learning_rate));

  torchguard::ScopeStack stack;
  torchguard::TrainingSessionOptions session_options;
  session_options.log_file = fs::path(config.run_dir) / "train.log";
  session_options.metrics_file = fs::path(config.run_dir) / "metrics.jsonl";
  session_options.tensorboard_dir = config.run_dir;
  session_options.handle_signals = true;
  auto& session = stack.emplace<torchguard::TrainingSession>("fashion-mnist", session_options);
  const int status = session.run(
      [&] { return train_in_session(stack, session, model, optimizer, config, device); });
  stack.close();  // the session's files and the last save: what fails here fails the run
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  Config config;
  config.epochs = 3;
  config.run_dir = "fashion-mnist-run";
  config.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  CLI::App app{
      "Train a small CNN on Fashion-MNIST with torchguard's guards. Ctrl-C saves a "
      "checkpoint; the same command resumes from it."};
  fashion_mnist::add_options(app, config);
  app.add_option("--checkpoint-dir", config.checkpoint_dir,
                 "checkpoints (default: <run-dir>/checkpoints)");
  app.add_option("--device", config.device, "auto, cpu, cuda or cuda:N")->capture_default_str();
  app.add_option("--eval-samples", config.eval_samples,
                 "evaluate on the first N test images (0: all 10,000)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_flag("!--no-plots", config.plots, "do not draw plots");
  app.add_option("--init-from", config.init_from,
                 "start from these weights (a safetensors state_dict, e.g. from Python: "
                 "examples/fashion_mnist.py init); a checkpoint to resume from wins");
  CLI11_PARSE(app, argc, argv);
  return fashion_mnist::exit_status([&] { return train(config); });
}
