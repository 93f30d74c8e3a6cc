// What both Fashion-MNIST training demos share, as plain functions: their settings (the command
// line, and the record a checkpoint keeps of it), the dataset loaded concurrently, the run's
// schedule, one step's batch, the epoch's running figures, the evaluation through
// BatchedInference, and the checkpoint's options. Each demo's training loop is its own:
// fashion_mnist_loop.hpp (one process) and train_distributed.cpp (several).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <future>
#include <limits>
#include <memory>
#include <set>
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
  std::string restore;                    // which checkpoint: latest (""), none, a step, a name
  int world_size = 1;                     // not an option: the distributed demo's process count
  bool recovery = false;                  // a bad step goes back to the last checkpoint
  std::vector<std::size_t> skip_samples;  // left out of every epoch from the start
  // Fault injection (to see the recovery work): the batches that these steps draw in a run
  // without skipped samples are bad wherever they come later; with poison_recurs, these steps
  // are bad whatever they draw.
  std::vector<std::int64_t> poison_steps;
  std::string poison_kind = "nan";  // nan: the images are NaN; spike: the loss is 1000x
  bool poison_recurs = false;
  int poison_rank = -1;  // the distributed demo: only this rank's share is bad (-1: every rank)
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
  app.add_option("--restore", settings.restore,
                 "the checkpoint to resume from: latest (the default), none (start fresh), a "
                 "step, or a checkpoint's name");
  app.add_flag("--recovery", settings.recovery,
               "a step whose loss or gradients are not finite, or whose loss spikes, goes back "
               "to the last checkpoint and its batch is skipped from then on");
  app.add_option("--skip-samples", settings.skip_samples,
                 "leave these training samples out of every epoch (e.g. those a recovery "
                 "skipped)")
      ->delimiter(',');
  auto* faults = "Fault injection";
  app.add_option("--poison-steps", settings.poison_steps,
                 "the batches these steps draw (in a run without skipped samples) are bad "
                 "wherever they come")
      ->delimiter(',')
      ->group(faults);
  app.add_option("--poison-kind", settings.poison_kind,
                 "nan: the batch's images are NaN; spike: its loss is scaled by 1000")
      ->check(CLI::IsMember({"nan", "spike"}))
      ->capture_default_str()
      ->group(faults);
  app.add_flag("--poison-recurs", settings.poison_recurs,
               "the poisoned steps are bad whatever they draw (a fault a rollback cannot fix)")
      ->group(faults);
  app.add_option("--poison-rank", settings.poison_rank,
                 "only this rank's share is bad (the distributed demo; default: every rank)")
      ->group(faults);
}

// The settings every checkpoint records, by the flag that sets them. Those that decide the
// arithmetic of the steps to come are exact: a resume with another value could not end equal to
// the run it continues, and is refused; the others may change, with a warning.
inline torchguard::RunSettings run_settings(const Settings& settings) {
  torchguard::RunSettings recorded;
  recorded.values = {{"--batch-size", settings.batch_size}, {"--seed", settings.seed},
                     {"--threads", settings.threads},       {"world size", settings.world_size},
                     {"--lr", settings.learning_rate},      {"--epochs", settings.epochs},
                     {"--max-steps", settings.max_steps}};
  recorded.exact = {"--batch-size", "--seed", "--threads", "world size"};
  return recorded;
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

// --poison-*: which steps are bad, as the fault injection says.
class Poison {
 public:
  Poison(const Settings& settings, const Schedule& schedule, int rank)
      : settings_(settings),
        active_(!settings.poison_steps.empty() &&
                (settings.poison_rank < 0 || settings.poison_rank == rank)) {
    // The samples each poisoned step draws in a run without skipped samples: the sampler's
    // order of that step's epoch.
    for (const auto step : settings.poison_steps) {
      if (step < 1) continue;
      const auto epoch = (step - 1) / schedule.steps_per_epoch;
      const auto begin = ((step - 1) % schedule.steps_per_epoch) * schedule.global_batch;
      const auto order = torchguard::ResumableSampler::permutation(
          static_cast<std::size_t>(schedule.samples), settings.seed, epoch);
      for (auto i = begin; i < std::min(begin + schedule.global_batch, schedule.samples); ++i) {
        samples_.insert(order[static_cast<std::size_t>(i)]);
      }
    }
  }
  // "" (a good step), "nan" or "spike": how step `step`, drawing the global batch `batch`, goes.
  std::string at(std::int64_t step, const std::vector<std::size_t>& batch) const {
    if (!active_) return {};
    const auto& steps = settings_.poison_steps;
    const bool bad =
        settings_.poison_recurs
            ? std::find(steps.begin(), steps.end(), step) != steps.end()
            : std::any_of(batch.begin(), batch.end(), [&](auto i) { return samples_.count(i); });
    return bad ? settings_.poison_kind : std::string();
  }

 private:
  const Settings& settings_;
  bool active_;
  std::set<std::size_t> samples_;
};

// The sample indices of global batch `i` of `order` (the sampler's remaining()).
inline std::vector<std::size_t> global_batch_indices(const std::vector<std::size_t>& order,
                                                     std::int64_t i, std::int64_t global_batch) {
  const auto begin = std::min(static_cast<std::size_t>(i * global_batch), order.size());
  const auto end = std::min(begin + static_cast<std::size_t>(global_batch), order.size());
  return std::vector<std::size_t>(order.begin() + static_cast<std::ptrdiff_t>(begin),
                                  order.begin() + static_cast<std::ptrdiff_t>(end));
}

// The batches of the rest of an epoch: `order` is what the sampler has left of it (its
// remaining()), and batch i is this process's share (`rank`) of the order's i-th global batch,
// assembled on two workers, four ahead of the loop.
inline torchguard::Prefetcher<torch::data::Example<>> epoch_batches(
    const Dataset& data, std::vector<std::int64_t> order, const Schedule& schedule,
    std::int64_t batch_size, int rank, std::int64_t count, torchguard::CancellationToken stop,
    torch::Device device) {
  torchguard::PrefetchOptions options;
  options.depth = 4;
  options.workers = 2;
  options.cancellation = std::move(stop);
  if (device.is_cuda()) options.device = device;
  const auto indices = torch::tensor(order);
  const auto size = static_cast<std::int64_t>(order.size());
  return torchguard::Prefetcher<torch::data::Example<>>(
      static_cast<std::size_t>(count),
      [&data, indices, size, batch = batch_size, global = schedule.global_batch,
       rank](std::size_t i) {
        const std::int64_t begin = static_cast<std::int64_t>(i) * global + rank * batch;
        const auto share = indices.slice(0, begin, std::min(begin + batch, size));
        return torch::data::Example<>(data.train.images.index_select(0, share),
                                      data.train.labels.index_select(0, share));
      },
      options);
}

// One training step on a batch: the loss and how many it got right. `check(loss)` runs after the
// backward pass, before the optimizer steps (the distributed demo averages the gradients there;
// with --recovery, CheckpointGuard::check_step judges the step): false leaves the step unapplied.
// `poison` is the fault injection's ("", "nan" or "spike").
struct StepFigures {
  double loss = 0;
  std::int64_t correct = 0;
  std::int64_t samples = 0;
  bool applied = true;
};
template <class Check>
StepFigures train_step(Net& model, torch::optim::Optimizer& optimizer,
                       const torch::data::Example<>& batch, Check&& check,
                       const std::string& poison = {}) {
  optimizer.zero_grad();
  const auto data =
      poison == "nan" ? batch.data * std::numeric_limits<float>::quiet_NaN() : batch.data;
  const auto logits = model->forward(data);
  auto loss = torch::nn::functional::cross_entropy(logits, batch.target);
  if (poison == "spike") loss = loss * 1000.0;
  loss.backward();
  if (!check(loss)) return {loss.item<double>(), 0, batch.target.size(0), false};
  optimizer.step();
  return {loss.item<double>(), logits.argmax(1).eq(batch.target).sum().item<std::int64_t>(),
          batch.target.size(0)};
}
inline StepFigures train_step(Net& model, torch::optim::Optimizer& optimizer,
                              const torch::data::Example<>& batch) {
  return train_step(model, optimizer, batch, [](const torch::Tensor&) { return true; });
}

// ---------------------------------------------------------------------------------------------
// Figures and evaluation

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
  // taken in an earlier epoch.
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
// Checkpoints and the end

// The demos' checkpoint options: the model and Adam (the constructor's), the sampler, the
// settings, the run's total of steps. A save at exit only after success: a failed run (or one
// refused for its settings) leaves the checkpoints as they were.
inline torchguard::CheckpointOptions checkpoint_options(const std::filesystem::path& directory,
                                                        const Settings& settings,
                                                        const Schedule& schedule,
                                                        const torchguard::ResumableSampler& sampler,
                                                        torch::Device device,
                                                        std::shared_ptr<spdlog::logger> log) {
  torchguard::CheckpointOptions options;
  options.directory = directory;
  options.samplers["train"] = sampler;
  options.settings = run_settings(settings);
  options.total_steps = schedule.total_steps;
  options.restore = settings.restore;
  options.every_n_steps = settings.checkpoint_every;
  options.keep_last = 3;
  options.load_device = device;
  options.logger = std::move(log);
  options.save_on_exit = torchguard::SaveOnExit::on_success;
  options.recovery.enabled = settings.recovery;
  return options;
}

// Adam's learning rate is a setting that may change on resume: the restored groups carry the
// old one, this run's --lr wins.
inline void use_learning_rate(torch::optim::Adam& optimizer, double learning_rate) {
  for (auto& group : optimizer.param_groups()) {
    static_cast<torch::optim::AdamOptions&>(group.options()).lr(learning_rate);
  }
}

// main()'s end: runs `train`; a stop signal that interrupted loading or evaluation exits 130
// like a stop within training; a directory whose checkpoints are all damaged names the flag that
// starts fresh; other errors exit 1 with the message (torchguard::exit_status).
template <class Train>
int exit_status(Train&& train) {
  return torchguard::exit_status([&] {
    try {
      return train();
    } catch (const torchguard::Cancelled&) {
      std::printf("interrupted; run the same command to resume from the last checkpoint\n");
      return torchguard::interrupted_exit_status;
    } catch (const torchguard::NoValidCheckpointError& e) {
      std::fprintf(stderr,
                   "error: %s\n(--restore none starts fresh; --restore <step> picks "
                   "another checkpoint)\n",
                   torchguard::error_message(e).c_str());
      return 1;
    }
  });
}

}  // namespace fashion_mnist
