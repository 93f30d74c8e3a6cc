// The training demo: a small CNN on Fashion-MNIST with every guard in one ScopeStack.
//
//   TrainingSession   the run's log (console and train.log), metrics.jsonl, TensorBoard event
//                     files (`tensorboard --logdir <run-dir>`), the stop signal
//   CheckpointGuard   restore on start, save every N steps, at the end and on a stop request
//   GpuMemoryGuard    per-epoch memory accounting (a no-op that says so on the CPU)
//   gather            the four dataset files decompressed and parsed concurrently
//   Prefetcher        batches assembled ahead of the training step
//   BatchedInference  the test-set evaluation, one request per image, merged into batches
//
// Ctrl-C (or SIGTERM) stops loading, training and evaluation alike, saves a checkpoint and exits
// with status 130; the same command resumes from it ("resumed from step X") and ends with the
// same parameters as a run that was never interrupted (bitwise on the CPU with a fixed thread
// count). The checkpoint records the settings: a resume with another --batch-size, --seed or
// --threads is refused, another --lr, --epochs or --max-steps is used with a warning.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <thread>

#include <torch/torch.h>
#include <CLI/CLI.hpp>
#include <torchguard/torchguard.hpp>

#include "fashion_mnist_training.hpp"
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

// Restores the newest valid checkpoint, checks this run's settings against it, and cuts
// metrics.jsonl and TensorBoard back to the restored step (the steps after it are trained again).
torchguard::CheckpointGuard& open_checkpoint(torchguard::ScopeStack& stack,
                                             fashion_mnist::Net model,
                                             std::shared_ptr<torch::optim::Adam> optimizer,
                                             torchguard::TrainingSession& session,
                                             const Config& config, torch::Device device) {
  const fs::path directory = config.checkpoint_dir.empty()
                                 ? fs::path(config.run_dir) / "checkpoints"
                                 : fs::path(config.checkpoint_dir);
  auto options = fashion_mnist::checkpoint_options(directory, config, device, session.logger());
  options.stop_token = session.stop_token();
  options.after_save = [&session] { session.flush(); };  // metrics on disk as far as the save
  auto& checkpoint = stack.emplace<torchguard::CheckpointGuard>(model, optimizer, options);
  fashion_mnist::reconcile_settings(checkpoint, *optimizer, config, *session.logger());
  session.resume_metrics(checkpoint.current_step());
  if (checkpoint.resumed()) {
    std::printf("resumed from step %lld (%s)\n", static_cast<long long>(checkpoint.current_step()),
                checkpoint.resumed_from()->filename().c_str());
    std::fflush(stdout);
  }
  return checkpoint;
}

// Per epoch: a progress line and the memory accounting while it trains; at its end, the test
// set's figures, and the epoch's row in metrics.jsonl.
class EpochReporter {
 public:
  EpochReporter(fashion_mnist::Trainer& run, const Config& config) : run_(run), config_(config) {}

  fashion_mnist::EpochHooks hooks() {
    fashion_mnist::EpochHooks hooks;
    hooks.begin_epoch = [this](std::int64_t epoch, std::int64_t steps) { begin(epoch, steps); };
    hooks.after_step = [this](std::int64_t done, const EpochFigures& figures, double loss) {
      progress_->update(done, figures.seen - seen_before_, loss);
    };
    hooks.end_epoch = [this](std::int64_t epoch, const EpochFigures& figures, double seconds,
                             bool stopped) { end(epoch, figures, seconds, stopped); };
    return hooks;
  }

 private:
  void begin(std::int64_t epoch, std::int64_t steps) {
    torchguard::GpuMemoryOptions memory_options;
    memory_options.label = "epoch " + std::to_string(epoch + 1);
    memory_options.logger = run_.session.logger();
    memory_.emplace(memory_options);
    reset_peak_rss();
    progress_.emplace("epoch " + std::to_string(epoch + 1) + "/" + std::to_string(config_.epochs),
                      steps);
    seen_before_ = EpochFigures::restore(run_.checkpoint.metadata(), epoch).seen;
  }

  void end(std::int64_t epoch, const EpochFigures& figures, double seconds, bool stopped) {
    progress_->finish();
    if (stopped) return;
    // The end of an epoch, or of a --max-steps run inside one: evaluate.
    const std::int64_t test_size = run_.data.test.images.size(0);
    const auto evaluation = fashion_mnist::evaluate(
        run_.model, run_.data.test,
        config_.eval_samples > 0 ? std::min(config_.eval_samples, test_size) : test_size,
        run_.device, run_.session.stop_token());
    memory_->close(torchguard::Outcome::success);
    // GPU: the allocator's peak inside the epoch; CPU: the process's peak resident memory.
    const double memory_mib =
        memory_->stats().available
            ? static_cast<double>(memory_->stats().peak_allocated_bytes) / (1024.0 * 1024.0)
            : peak_rss_mib();
    run_.session.log_metrics(run_.checkpoint.current_step(),
                             {{"epoch", epoch + 1},
                              {"train_loss", figures.train_loss()},
                              {"train_accuracy", figures.train_accuracy()},
                              {"test_loss", evaluation.loss},
                              {"test_accuracy", evaluation.accuracy},
                              {"epoch_s", seconds},
                              {"memory_peak_mib", memory_mib}});
  }

  fashion_mnist::Trainer& run_;
  const Config& config_;
  std::optional<torchguard::GpuMemoryGuard> memory_;
  std::optional<run_report::Progress> progress_;
  std::int64_t seen_before_ = 0;
};

// The end of a finished run: the epochs table, the charts, the parameters' fingerprint.
void report_finished_run(fashion_mnist::Trainer& run, const Config& config, double seconds,
                         std::int64_t first_step) {
  const fs::path run_dir = config.run_dir;
  std::printf("\n%s\n",
              run_report::summary_table(run_report::read_rows(run_dir / "metrics.jsonl")).c_str());
  if (config.plots) {
    std::string why;
    for (const auto& png : run_report::plot(run_dir, why)) std::printf("plot: %s\n", png.c_str());
    if (!why.empty()) run.session.logger()->info("plots not drawn: {}", why);
  }
  const auto fingerprint = fashion_mnist::parameter_fingerprint(run.model);
  const auto samples = (run.checkpoint.current_step() - first_step) * run.schedule.global_batch;
  std::printf("finished at step %lld; this run: %s, %.0f samples/s; parameters %s\n",
              static_cast<long long>(run.checkpoint.current_step()),
              run_report::duration(seconds).c_str(),
              static_cast<double>(samples) / std::max(seconds, 1e-9), fingerprint.c_str());
  std::ofstream(run_dir / "parameters.xxh3") << fingerprint << "\n";
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
  auto log = session.logger();

  return session.run([&] {
    log->info("device {}, {} intra-op threads, seed {}, batch {}, learning rate {}", device.str(),
              at::get_num_threads(), config.seed, config.batch_size, config.learning_rate);
    if (!config.init_from.empty()) {  // a fresh start begins here; a resume overrides it
      torchguard::load_state_dict(*model, fs::path(config.init_from));
      log->info("initialized the model from {}", config.init_from);
    }
    auto& checkpoint = open_checkpoint(stack, model, optimizer, session, config, device);
    const auto load_start = Clock::now();
    const auto data = fashion_mnist::load_dataset(config.data_dir, session.stop_token());
    log->info("loaded {} training and {} test images from {} in {:.2f} s",
              data.train.images.size(0), data.test.images.size(0), config.data_dir,
              fashion_mnist::seconds_since(load_start));
    fashion_mnist::Trainer run(model, *optimizer, checkpoint, session, data, config,
                               /*whole_batches=*/false, device);
    run.load_stop = session.stop_token();
    EpochReporter reporter(run, config);
    const auto start = Clock::now();
    const std::int64_t first_step = checkpoint.current_step();
    const bool finished = fashion_mnist::train_epochs(run, reporter.hooks());
    checkpoint.close(torchguard::Outcome::success);  // the last save; rethrows a failed one
    if (!finished) {
      std::printf(
          "interrupted at step %lld: checkpoint saved in %s; run the same command to "
          "resume\n",
          static_cast<long long>(checkpoint.current_step()), checkpoint.directory().c_str());
      return 130;
    }
    report_finished_run(run, config, fashion_mnist::seconds_since(start), first_step);
    return 0;
  });
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
