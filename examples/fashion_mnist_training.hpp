// What both Fashion-MNIST training demos share: their settings (options, and the checkpoint's
// record of them), the dataset loaded concurrently, the batch order, the training step, the
// epoch loop with its bookkeeping, and the evaluation through BatchedInference.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <future>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torchguard/torchguard.hpp>

#include "fashion_mnist.hpp"
#include "fashion_mnist_model.hpp"

namespace fashion_mnist {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// ---------------------------------------------------------------------------------------------
// Settings

// The command line both demos take. Each demo sets its defaults before add_options().
struct Settings {
  int epochs = 1;
  std::int64_t batch_size = 64;  // per process: the global batch is batch_size * world_size
  double learning_rate = 1e-3;
  std::string run_dir;
  std::string data_dir = kDefaultDir;
  std::uint64_t seed = 1;
  std::int64_t max_steps = 0;  // 0: no limit
  int threads = 1;             // intra-op threads (per process)
  std::int64_t checkpoint_every = 500;
  std::int64_t log_every = 50;
  int world_size = 1;  // not an option: the distributed demo's process count
};

inline void add_options(CLI::App& app, Settings& settings) {
  app.add_option("--epochs", settings.epochs, "epochs to train")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--batch-size", settings.batch_size, "samples per step (and process)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--lr", settings.learning_rate, "Adam's learning rate")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--run-dir", settings.run_dir, "logs, metrics and checkpoints go here")
      ->capture_default_str();
  app.add_option("--data-dir", settings.data_dir, "the Fashion-MNIST .gz files")
      ->capture_default_str();
  app.add_option("--seed", settings.seed, "seeds the model, dropout and the batch order")
      ->capture_default_str();
  app.add_option("--max-steps", settings.max_steps,
                 "stop after this many steps in all (0: no limit)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--threads", settings.threads,
                 "intra-op threads (per process; a resumed run must use the same number)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--checkpoint-every", settings.checkpoint_every,
                 "save every N steps (0: only at the end and on Ctrl-C)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--log-every", settings.log_every, "write a metrics row every N steps")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
}

// A setting the checkpoint records: `exact` ones decide the arithmetic of the steps to come (a
// resume with another value cannot end equal to the run it continues), the others may change.
struct RecordedSetting {
  const char* key;
  const char* option;
  bool exact;
};
inline constexpr RecordedSetting kRecordedSettings[] = {
    {"batch_size", "--batch-size", true}, {"seed", "--seed", true},
    {"threads", "--threads", true},       {"world_size", "the world size (WORLD_SIZE)", true},
    {"learning_rate", "--lr", false},     {"epochs", "--epochs", false},
    {"max_steps", "--max-steps", false}};

inline nlohmann::json settings_json(const Settings& settings) {
  return {{"batch_size", settings.batch_size},
          {"seed", settings.seed},
          {"threads", settings.threads},
          {"world_size", settings.world_size},
          {"learning_rate", settings.learning_rate},
          {"epochs", settings.epochs},
          {"max_steps", settings.max_steps}};
}

// Compares this run's settings with those of the checkpoint it resumed from: a change to an
// exact one throws (nothing is written: the demos save at exit on success only), any other
// change is logged and this run's value is used. Then records this run's settings in the
// checkpoint's metadata and gives the optimizer this run's learning rate.
inline void reconcile_settings(torchguard::CheckpointGuard& checkpoint,
                               torch::optim::Adam& optimizer, const Settings& settings,
                               spdlog::logger& log) {
  const nlohmann::json current = settings_json(settings);
  auto& metadata = checkpoint.metadata();
  const auto saved = metadata.find("settings");
  if (checkpoint.resumed() && saved != metadata.end() && saved->is_object()) {
    for (const auto& setting : kRecordedSettings) {
      const auto old_value = saved->find(setting.key);
      if (old_value == saved->end() || *old_value == current[setting.key]) continue;
      if (setting.exact) {
        throw torchguard::OptionsError(fmt::format(
            "{} is {} in this run but was {} in the run that wrote {}: resuming with another "
            "value would not continue that run exactly; resume with {}, or use a new --run-dir",
            setting.option, current[setting.key].dump(), old_value->dump(),
            checkpoint.resumed_from()->string(), old_value->dump()));
      }
      log.warn("{} changed from {} to {} since the checkpoint; this run uses {}", setting.option,
               old_value->dump(), current[setting.key].dump(), current[setting.key].dump());
    }
  }
  metadata["settings"] = current;
  for (auto& group : optimizer.param_groups()) {
    static_cast<torch::optim::AdamOptions&>(group.options()).lr(settings.learning_rate);
  }
}

// ---------------------------------------------------------------------------------------------
// Data

struct Dataset {
  Split train;
  Split test;
};

// The four files, decompressed and parsed concurrently; `stop` cancels the loading.
inline Dataset load_dataset(const std::string& dir, torchguard::CancellationToken stop = {}) {
  check_data_dir(dir);
  struct File {
    std::string split, kind;
  };
  const std::vector<File> files{
      {"train", "images"}, {"train", "labels"}, {"t10k", "images"}, {"t10k", "labels"}};
  torchguard::GatherOptions options;
  options.max_in_flight = files.size();
  options.cancellation = std::move(stop);
  // An error names the file: "... (input 'train-images-idx3-ubyte.gz'; item 0 of 4)".
  options.item_name = [&](std::size_t i) {
    return std::filesystem::path(file_path(dir, files[i].split, files[i].kind)).filename().string();
  };
  auto tensors = torchguard::values(torchguard::gather(
      files,
      [&dir](const File& file) {
        const auto path = file_path(dir, file.split, file.kind);
        return file.kind == "images" ? read_images(path) : read_labels(path);
      },
      options));
  return {make_split(tensors[0], tensors[1], "training set in " + dir),
          make_split(tensors[2], tensors[3], "test set in " + dir)};
}

// The epoch's sample order: a function of the seed and the epoch only, so a resumed run sees the
// batches the interrupted one would have.
inline std::vector<std::int64_t> epoch_order(std::int64_t samples, std::uint64_t seed,
                                             std::int64_t epoch) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(samples));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 random(seed * 1000003u + static_cast<std::uint64_t>(epoch));
  std::shuffle(order.begin(), order.end(), random);
  return order;
}

// ---------------------------------------------------------------------------------------------
// Evaluation

struct Evaluation {
  double loss = 0;
  double accuracy = 0;
};

// One request per test image through BatchedInference; the futures are gathered in order.
// `stop` cancels the requests not answered yet (their futures then throw).
inline Evaluation evaluate(Net& model, const Split& test, std::int64_t count, torch::Device device,
                           torchguard::CancellationToken stop = {}) {
  model->eval();
  torchguard::BatchedInferenceOptions options;
  options.max_batch = 500;
  options.max_delay = std::chrono::milliseconds(2);
  options.device = device;
  options.cancellation = std::move(stop);
  std::vector<torch::Tensor> logits;
  {
    torchguard::BatchedInference server(
        [&model](const torch::Tensor& batch) { return model->forward(batch); }, options);
    std::vector<std::future<torch::Tensor>> futures;
    futures.reserve(static_cast<std::size_t>(count));
    for (std::int64_t i = 0; i < count; ++i) futures.push_back(server.submit(test.images[i]));
    logits = torchguard::gather(std::move(futures));
  }
  model->train();
  const auto all = torch::stack(logits).to(torch::kCPU);
  const auto labels = test.labels.slice(0, 0, count);
  Evaluation result;
  result.loss = torch::nn::functional::cross_entropy(all, labels).item<double>();
  result.accuracy = all.argmax(1).eq(labels).to(torch::kDouble).mean().item<double>();
  return result;
}

// ---------------------------------------------------------------------------------------------
// The epoch loop

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

// Which steps make up the run: epochs of `steps_per_epoch`, cut at --max-steps.
struct Schedule {
  std::int64_t samples = 0;
  std::int64_t global_batch = 0;  // samples per step over all processes
  std::int64_t steps_per_epoch = 0;
  std::int64_t total_steps = 0;

  // `whole_batches`: drop an epoch's last, partial global batch (every process must get a share).
  Schedule(std::int64_t samples_, const Settings& settings, bool whole_batches)
      : samples(samples_), global_batch(settings.batch_size * settings.world_size) {
    steps_per_epoch =
        whole_batches ? samples / global_batch : (samples + global_batch - 1) / global_batch;
    total_steps = steps_per_epoch * settings.epochs;
    if (settings.max_steps > 0) total_steps = std::min(total_steps, settings.max_steps);
  }
};

// What the loop trains, and with what.
struct Trainer {
  // `whole_batches`: see Schedule.
  Trainer(Net& model_, torch::optim::Optimizer& optimizer_,
          torchguard::CheckpointGuard& checkpoint_, torchguard::TrainingSession& session_,
          const Dataset& data_, const Settings& settings_, bool whole_batches,
          torch::Device device_)
      : model(model_),
        optimizer(optimizer_),
        checkpoint(checkpoint_),
        session(session_),
        data(data_),
        settings(settings_),
        schedule(data_.train.images.size(0), settings_, whole_batches),
        device(device_) {}

  Net& model;
  torch::optim::Optimizer& optimizer;
  torchguard::CheckpointGuard& checkpoint;
  torchguard::TrainingSession& session;
  const Dataset& data;
  const Settings& settings;
  Schedule schedule;
  torch::Device device;
  int rank = 0;
  bool writes_metrics = true;               // the metrics rows (one process of a group writes)
  torchguard::CancellationToken load_stop;  // stops the batch loading (the stop signal)
};

// The demos' hooks into the loop (each optional).
struct EpochHooks {
  std::function<void(std::int64_t epoch, std::int64_t steps)> begin_epoch;
  std::function<void()> sync_gradients;          // between backward() and the optimizer step
  std::function<void()> before_checkpoint_step;  // e.g. agree on a stop across processes
  std::function<void(std::int64_t steps_done, const EpochFigures&, double loss)> after_step;
  // After the epoch's last step, or after a stop (`stopped`) within it.
  std::function<void(std::int64_t epoch, const EpochFigures&, double seconds, bool stopped)>
      end_epoch;
};

// Trains from the checkpoint's step to the schedule's end. Returns false when stopped (the
// checkpoint of the stop is saved).
inline bool train_epochs(Trainer& run, const EpochHooks& hooks) {
  auto& checkpoint = run.checkpoint;
  const auto& schedule = run.schedule;
  const std::int64_t batch_size = run.settings.batch_size;
  while (checkpoint.current_step() < schedule.total_steps) {
    const std::int64_t epoch = checkpoint.current_step() / schedule.steps_per_epoch;
    const std::int64_t first_batch = checkpoint.current_step() % schedule.steps_per_epoch;
    const std::int64_t last_batch =
        std::min(schedule.steps_per_epoch, schedule.total_steps - epoch * schedule.steps_per_epoch);
    checkpoint.set_epoch(epoch);
    if (hooks.begin_epoch) hooks.begin_epoch(epoch, last_batch - first_batch);
    const auto epoch_start = Clock::now();

    // This process's share of each step's global batch, assembled on two workers, four ahead.
    const auto order = torch::tensor(epoch_order(schedule.samples, run.settings.seed, epoch));
    torchguard::PrefetchOptions prefetch;
    prefetch.depth = 4;
    prefetch.workers = 2;
    prefetch.cancellation = run.load_stop;
    if (run.device.is_cuda()) prefetch.device = run.device;
    torchguard::Prefetcher<torch::data::Example<>> batches(
        static_cast<std::size_t>(last_batch - first_batch),
        [&](std::size_t i) {
          const std::int64_t begin =
              (first_batch + static_cast<std::int64_t>(i)) * schedule.global_batch +
              run.rank * batch_size;
          const auto indices =
              order.slice(0, begin, std::min(begin + batch_size, schedule.samples));
          return torch::data::Example<>(run.data.train.images.index_select(0, indices),
                                        run.data.train.labels.index_select(0, indices));
        },
        prefetch);

    EpochFigures figures = EpochFigures::restore(checkpoint.metadata(), epoch);
    std::int64_t done = 0;
    bool stopped = false;
    auto window_start = Clock::now();
    std::int64_t window_samples = 0;
    for (auto& batch : batches) {
      run.optimizer.zero_grad();
      const auto logits = run.model->forward(batch.data);
      auto loss = torch::nn::functional::cross_entropy(logits, batch.target);
      loss.backward();
      if (hooks.sync_gradients) hooks.sync_gradients();
      run.optimizer.step();
      const double loss_value = loss.item<double>();
      figures.add(loss_value, batch.target.size(0),
                  logits.argmax(1).eq(batch.target).sum().item<std::int64_t>());
      window_samples += batch.target.size(0) * run.settings.world_size;
      ++done;

      // A metrics row every log_every steps, written before the checkpoint of its step: a row
      // past the step a later run restores is cut from metrics.jsonl by that run.
      const std::int64_t step = checkpoint.current_step() + 1;
      if (step % run.settings.log_every == 0 || step == schedule.total_steps) {
        const double rate = static_cast<double>(window_samples) / seconds_since(window_start);
        const double loss_mean = figures.take_window_loss();
        if (run.writes_metrics) {
          run.session.log_metrics(
              step,
              {{"loss", loss_mean}, {"lr", run.settings.learning_rate}, {"samples_per_s", rate}});
        }
        window_start = Clock::now();
        window_samples = 0;
      }
      checkpoint.metadata()[EpochFigures::kKey] =
          figures.to_json(epoch, figures.earlier_seconds + seconds_since(epoch_start));
      if (hooks.before_checkpoint_step) hooks.before_checkpoint_step();
      const auto result = checkpoint.step({{"loss", loss_value}});
      if (hooks.after_step) hooks.after_step(done, figures, loss_value);
      if (result.stop) {
        stopped = true;
        break;
      }
    }
    // The stop signal can end the batches before the checkpoint saw it: save that step.
    if (!stopped && done < last_batch - first_batch) {
      if (!run.load_stop.cancelled()) throw std::logic_error("the batches ended early");
      checkpoint.save();
      stopped = true;
    }
    if (hooks.end_epoch) {
      hooks.end_epoch(epoch, figures, figures.earlier_seconds + seconds_since(epoch_start),
                      stopped);
    }
    if (stopped) return false;
  }
  return true;
}

// The demos' options for their CheckpointGuard. A save at exit only after success: a failed run
// (or one refused for its settings) leaves the checkpoints as they were, and the next run
// resumes from the last step saved.
inline torchguard::CheckpointOptions checkpoint_options(const std::filesystem::path& directory,
                                                        const Settings& settings,
                                                        torch::Device device,
                                                        std::shared_ptr<spdlog::logger> log) {
  torchguard::CheckpointOptions options;
  options.directory = directory;
  options.every_n_steps = settings.checkpoint_every;
  options.keep_last = 3;
  options.load_device = device;
  options.logger = std::move(log);
  options.save_on_exit = torchguard::SaveOnExit::on_success;
  return options;
}

// main()'s end: runs `train`; a stop signal that interrupted loading or evaluation exits 130
// like a stop within training, other errors exit 1 with the message (torchguard::exit_status).
template <class Train>
int exit_status(Train&& train) {
  return torchguard::exit_status([&] {
    try {
      return train();
    } catch (const torchguard::Cancelled&) {
      std::printf("interrupted; run the same command to resume from the last checkpoint\n");
      return torchguard::interrupted_exit_status;
    }
  });
}

}  // namespace fashion_mnist
