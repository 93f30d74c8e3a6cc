// The training demo: a small CNN on Fashion-MNIST with every guard in one ScopeStack.
//
//   TrainingSession   the run's log (console and train.log), metrics.jsonl, SIGINT/SIGTERM
//   CheckpointGuard   restore on start, save every N steps, at exit and on a stop request
//   GpuMemoryGuard    per-epoch memory accounting (a no-op that says so on the CPU)
//   gather            the four dataset files decompressed and parsed concurrently
//   Prefetcher        batches assembled ahead of the training step
//   BatchedInference  the test-set evaluation, one request per image, merged into batches
//
// Ctrl-C (or SIGTERM) saves a checkpoint and exits with status 130; the same command resumes
// from it ("resumed from step X") and ends with the same parameters as a run that was never
// interrupted (bitwise on the CPU with a fixed thread count).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <torch/torch.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torchguard/torchguard.hpp>

#include "fashion_mnist.hpp"
#include "fashion_mnist_model.hpp"
#include "run_report.hpp"

namespace fs = std::filesystem;
using fashion_mnist::Net;
using Clock = std::chrono::steady_clock;

namespace {

struct Config {
  int epochs = 3;
  std::int64_t batch_size = 64;
  double learning_rate = 1e-3;
  std::string run_dir = "fashion-mnist-run";
  std::string checkpoint_dir;  // default: <run_dir>/checkpoints
  std::string data_dir = fashion_mnist::kDefaultDir;
  std::string device = "auto";
  std::uint64_t seed = 1;
  std::int64_t max_steps = 0;  // 0: no limit
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::int64_t checkpoint_every = 500;
  std::int64_t log_every = 50;
  std::int64_t eval_samples = 0;  // 0: the whole test set
  bool plots = true;
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

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// One epoch's running train figures. Each checkpoint's metadata carries them, so an epoch
// resumed midway goes on from where it stopped: the same train loss and accuracy, and the same
// metrics rows, as a run never stopped. JSON keeps the doubles exact.
struct EpochFigures {
  static constexpr const char* kKey = "epoch_figures";
  double loss_sum = 0;  // the loss times the samples of each batch
  std::int64_t correct = 0;
  std::int64_t seen = 0;
  double window_loss = 0;  // since the last metrics row
  std::int64_t window_steps = 0;
  double earlier_seconds = 0;  // spent on this epoch by earlier runs

  void add(double loss, std::int64_t samples, std::int64_t right) {
    loss_sum += loss * static_cast<double>(samples);
    correct += right;
    seen += samples;
    window_loss += loss;
    ++window_steps;
  }
  // The mean loss since the last row; starts the next window.
  double take_window_loss() {
    const double mean = window_steps ? window_loss / static_cast<double>(window_steps) : 0.0;
    window_loss = 0;
    window_steps = 0;
    return mean;
  }
  double train_loss() const { return seen ? loss_sum / static_cast<double>(seen) : 0.0; }
  double train_accuracy() const {
    return seen ? static_cast<double>(correct) / static_cast<double>(seen) : 0.0;
  }

  nlohmann::json to_json(std::int64_t epoch, double seconds) const {
    return {{"epoch", epoch},    {"loss_sum", loss_sum},       {"correct", correct},
            {"seen", seen},      {"window_loss", window_loss}, {"window_steps", window_steps},
            {"seconds", seconds}};
  }
  // The figures saved for `epoch`, or a fresh start: no checkpoint, one without them, or one
  // taken in an earlier epoch (the last step of an epoch saves that epoch's figures).
  static EpochFigures restore(const nlohmann::json& metadata, std::int64_t epoch) {
    EpochFigures figures;
    const auto saved = metadata.find(kKey);
    if (saved == metadata.end() || !saved->is_object() ||
        saved->value("epoch", std::int64_t{-1}) != epoch) {
      return figures;
    }
    figures.loss_sum = saved->value("loss_sum", 0.0);
    figures.correct = saved->value("correct", std::int64_t{0});
    figures.seen = saved->value("seen", std::int64_t{0});
    figures.window_loss = saved->value("window_loss", 0.0);
    figures.window_steps = saved->value("window_steps", std::int64_t{0});
    figures.earlier_seconds = saved->value("seconds", 0.0);
    return figures;
  }
};

int train(const Config& config) {
  at::set_num_threads(config.threads);  // fixed: results depend on it
  const auto device = fashion_mnist::pick_device(config.device);
  fs::create_directories(config.run_dir);
  const fs::path run_dir = config.run_dir;
  const fs::path checkpoint_dir =
      config.checkpoint_dir.empty() ? run_dir / "checkpoints" : fs::path(config.checkpoint_dir);

  torchguard::ScopeStack stack;
  torchguard::TrainingSessionOptions session_options;
  session_options.log_file = run_dir / "train.log";
  session_options.metrics_file = run_dir / "metrics.jsonl";
  session_options.handle_signals = true;
  auto& session = stack.emplace<torchguard::TrainingSession>("fashion-mnist", session_options);
  auto log = session.logger();

  return session.run([&] {
    log->info("device {}, {} intra-op threads, seed {}, batch {}, learning rate {}", device.str(),
              at::get_num_threads(), config.seed, config.batch_size, config.learning_rate);
    const auto load_start = Clock::now();
    const auto [train_set, test_set] = fashion_mnist::load_dataset(config.data_dir);
    log->info("loaded {} training and {} test images from {} in {:.2f} s", train_set.images.size(0),
              test_set.images.size(0), config.data_dir,
              std::chrono::duration<double>(Clock::now() - load_start).count());

    torch::manual_seed(config.seed);
    Net model;
    model->to(device);
    torch::optim::Adam optimizer(model->parameters(),
                                 torch::optim::AdamOptions(config.learning_rate));

    torchguard::CheckpointOptions checkpoint_options;
    checkpoint_options.directory = checkpoint_dir;
    checkpoint_options.every_n_steps = config.checkpoint_every;
    checkpoint_options.keep_last = 3;
    checkpoint_options.load_device = device;
    checkpoint_options.logger = log;
    checkpoint_options.stop_requested = [&session] { return session.stop_requested(); };
    auto& checkpoint =
        stack.emplace<torchguard::CheckpointGuard>(model, optimizer, checkpoint_options);
    if (checkpoint.resumed()) {
      std::printf("resumed from step %lld (%s)\n",
                  static_cast<long long>(checkpoint.current_step()),
                  checkpoint.resumed_from()->filename().c_str());
      std::fflush(stdout);
    }

    const std::int64_t samples = train_set.images.size(0);
    const std::int64_t steps_per_epoch = (samples + config.batch_size - 1) / config.batch_size;
    std::int64_t total_steps = steps_per_epoch * config.epochs;
    if (config.max_steps > 0) total_steps = std::min(total_steps, config.max_steps);

    // Rows past the restored step are redone by this run: the tables drop them first.
    run_report::CsvWriter step_csv((run_dir / run_report::kStepsCsv).string(),
                                   run_report::StepRow::columns(), checkpoint.current_step());
    run_report::CsvWriter epoch_csv((run_dir / run_report::kEpochsCsv).string(),
                                    run_report::EpochRow::columns(), checkpoint.current_step());
    bool stopped = false;
    const auto run_start = Clock::now();
    std::int64_t samples_this_run = 0;

    while (checkpoint.current_step() < total_steps && !stopped) {
      const std::int64_t epoch = checkpoint.current_step() / steps_per_epoch;
      const std::int64_t first_batch = checkpoint.current_step() % steps_per_epoch;
      const std::int64_t last_batch =
          std::min(steps_per_epoch, total_steps - epoch * steps_per_epoch);
      checkpoint.set_epoch(epoch);
      torchguard::GpuMemoryOptions memory_options;
      memory_options.label = "epoch " + std::to_string(epoch + 1);
      memory_options.logger = log;
      torchguard::GpuMemoryGuard memory(memory_options);
      const auto epoch_start = Clock::now();
      reset_peak_rss();

      // Batches are assembled on two workers, four ahead of the step.
      const auto order = torch::tensor(fashion_mnist::epoch_order(samples, config.seed, epoch));
      torchguard::PrefetchOptions prefetch;
      prefetch.depth = 4;
      prefetch.workers = 2;
      if (device.is_cuda()) prefetch.device = device;
      run_report::Progress progress(
          "epoch " + std::to_string(epoch + 1) + "/" + std::to_string(config.epochs),
          last_batch - first_batch);
      torchguard::Prefetcher<torch::data::Example<>> batches(
          static_cast<std::size_t>(last_batch - first_batch),
          [&](std::size_t i) {
            const std::int64_t begin =
                (first_batch + static_cast<std::int64_t>(i)) * config.batch_size;
            const auto indices =
                order.slice(0, begin, std::min(begin + config.batch_size, samples));
            return torch::data::Example<>(train_set.images.index_select(0, indices),
                                          train_set.labels.index_select(0, indices));
          },
          prefetch);

      // The epoch's running figures travel in each checkpoint's metadata, so an epoch resumed
      // midway reports the same train loss, accuracy and metrics rows as one never stopped.
      EpochFigures figures = EpochFigures::restore(checkpoint.metadata(), epoch);
      const std::int64_t seen_before = figures.seen;
      for (auto& batch : batches) {
        optimizer.zero_grad();
        const auto logits = model->forward(batch.data);
        auto loss = torch::nn::functional::cross_entropy(logits, batch.target);
        loss.backward();
        optimizer.step();
        const double loss_value = loss.item<double>();
        figures.add(loss_value, batch.target.size(0),
                    logits.argmax(1).eq(batch.target).sum().item<std::int64_t>());
        samples_this_run += batch.target.size(0);

        // A metrics row every log_every steps, written before the checkpoint of its step: a
        // row past the step a later run restores is cut from metrics.csv by that run.
        const std::int64_t step = checkpoint.current_step() + 1;
        if (step % config.log_every == 0 || step == total_steps) {
          run_report::StepRow row;
          row.step = step;
          row.epoch = epoch + 1;
          row.loss = figures.take_window_loss();
          row.lr = config.learning_rate;
          row.samples_per_s = progress.samples_per_second();
          step_csv.write_row(row.values());
          session.log_metrics(step, {{"loss", row.loss}, {"samples_per_s", row.samples_per_s}});
        }
        checkpoint.metadata()[EpochFigures::kKey] =
            figures.to_json(epoch, figures.earlier_seconds + seconds_since(epoch_start));
        const auto result = checkpoint.step({{"loss", loss_value}});
        progress.update(step - epoch * steps_per_epoch - first_batch, figures.seen - seen_before,
                        loss_value);
        if (result.stop) {
          stopped = true;
          break;
        }
      }
      progress.finish();
      if (stopped) break;
      // The end of an epoch, or of a --max-steps run inside one: evaluate.
      const auto evaluation = fashion_mnist::evaluate(
          model, test_set,
          config.eval_samples > 0 ? std::min(config.eval_samples, test_set.images.size(0))
                                  : test_set.images.size(0),
          device);
      memory.close(torchguard::Outcome::success);
      run_report::EpochRow row;
      row.epoch = epoch + 1;
      row.step = checkpoint.current_step();
      row.train_loss = figures.train_loss();
      row.train_accuracy = figures.train_accuracy();
      row.test_loss = evaluation.loss;
      row.test_accuracy = evaluation.accuracy;
      row.seconds = figures.earlier_seconds + seconds_since(epoch_start);
      // GPU: the allocator's peak inside the epoch; CPU: the process's peak resident memory.
      row.memory_peak_mib =
          memory.stats().available
              ? static_cast<double>(memory.stats().peak_allocated_bytes) / (1024.0 * 1024.0)
              : peak_rss_mib();
      epoch_csv.write_row(row.values());
      session.log_metrics(row.step, {{"epoch", static_cast<double>(row.epoch)},
                                     {"train_accuracy", row.train_accuracy},
                                     {"test_loss", row.test_loss},
                                     {"test_accuracy", row.test_accuracy}});
      log->info(
          "epoch {}: train loss {:.4f}, train accuracy {:.4f}, test loss {:.4f}, test "
          "accuracy {:.4f} ({:.1f} s)",
          row.epoch, row.train_loss, row.train_accuracy, row.test_loss, row.test_accuracy,
          row.seconds);
    }

    if (stopped) {
      checkpoint.close(torchguard::Outcome::success);  // saved at the stop; say where
      std::printf(
          "interrupted at step %lld: checkpoint saved in %s; run the same command to "
          "resume\n",
          static_cast<long long>(checkpoint.current_step()), checkpoint_dir.c_str());
      return 130;
    }
    checkpoint.close(torchguard::Outcome::success);
    const auto seconds = std::chrono::duration<double>(Clock::now() - run_start).count();
    const auto epochs = run_report::read_epochs((run_dir / run_report::kEpochsCsv).string());
    std::printf("\n%s\n", run_report::summary_table(epochs).c_str());
    if (config.plots) {
      if (run_report::gnuplot_available()) {
        std::vector<std::string> notes;
        try {
          for (const auto& png : run_report::plot(run_dir.string(), {}, &notes)) {
            std::printf("plot: %s\n", png.c_str());
          }
        } catch (const std::exception& e) {
          log->warn("plots not drawn: {}", e.what());
        }
        for (const auto& note : notes) log->info("plots: {}", note);
      } else {
        log->info("plots not drawn: gnuplot is not installed (apt-get install gnuplot-nox)");
      }
    }
    const auto fingerprint = fashion_mnist::parameter_fingerprint(model);
    std::printf("finished at step %lld; this run: %s, %.0f samples/s; parameters %s\n",
                static_cast<long long>(checkpoint.current_step()),
                run_report::format_duration(seconds).c_str(),
                static_cast<double>(samples_this_run) / std::max(seconds, 1e-9),
                fingerprint.c_str());
    std::ofstream(run_dir / "parameters.xxh3") << fingerprint << "\n";
    return 0;
  });
}

}  // namespace

int main(int argc, char** argv) {
  Config config;
  CLI::App app{
      "Train a small CNN on Fashion-MNIST with torchguard's guards. Ctrl-C saves a "
      "checkpoint; the same command resumes from it."};
  app.add_option("--epochs", config.epochs, "epochs to train")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--batch-size", config.batch_size, "samples per step")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--lr", config.learning_rate, "Adam's learning rate")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--run-dir", config.run_dir, "log, metrics, plots (and checkpoints) go here")
      ->capture_default_str();
  app.add_option("--checkpoint-dir", config.checkpoint_dir,
                 "checkpoints (default: <run-dir>/checkpoints)");
  app.add_option("--data-dir", config.data_dir, "the Fashion-MNIST .gz files")
      ->capture_default_str();
  app.add_option("--device", config.device, "auto, cpu, cuda or cuda:N")->capture_default_str();
  app.add_option("--seed", config.seed, "seeds the model, dropout and the batch order")
      ->capture_default_str();
  app.add_option("--max-steps", config.max_steps, "stop after this many steps in all (0: no limit)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--threads", config.threads,
                 "intra-op threads (a resumed run must use the same number)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--checkpoint-every", config.checkpoint_every,
                 "save every N steps (0: only at exit and on Ctrl-C)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--log-every", config.log_every, "write a metrics row every N steps")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--eval-samples", config.eval_samples,
                 "evaluate on the first N test images (0: all 10,000)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_flag("!--no-plots", config.plots, "do not draw plots");
  CLI11_PARSE(app, argc, argv);
  try {
    return train(config);
  } catch (const std::exception& e) {
    // TrainingSession has logged the error with its type; say it once more, last, for the user.
    std::fprintf(stderr, "error: %s\n",
                 torchguard::detail::first_part_of_message(e.what()).c_str());
    return 1;
  }
}
