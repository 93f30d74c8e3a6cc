// The library's cost in the main job: the training demo's loop (examples/train_fashion_mnist.cpp,
// with the functions of examples/fashion_mnist_common.hpp it uses) with every guard the demo
// uses, against the same steps in bare LibTorch. Guarded: a ScopeStack holding the
// TrainingSession (log file, metrics.jsonl, TensorBoard events, stop signals, the directory's
// lock) and the CheckpointGuard (the demo's options: the sampler, the settings, a checkpoint
// every 500 steps, restore on start, a save at the end), a GpuMemoryGuard per epoch, the
// ResumableSampler's place, the Prefetcher, the metrics rows and the checkpoint's metadata. Bare:
// the same model, seed, batches (the same order, index_select on the training thread), optimizer
// steps and per-step loss and accuracy reads. Not measured on either side: loading the dataset,
// evaluation, and the demo's progress bar.
//
//   bench_training_loop [--steps N] [--rounds R] [--threads T]    (defaults: 150, 5, 1)
// Rounds alternate (guarded, bare, guarded, ...); each side's median samples/s is printed with the
// ratio. The dataset is read from /usr/share/datasets/fashion-mnist when it is there; otherwise
// random data of its shape (the throughput does not depend on the pixel values).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <unistd.h>

#include <spdlog/sinks/null_sink.h>
#include <torch/torch.h>
#include <torchguard/torchguard.hpp>

#include "fashion_mnist_common.hpp"

namespace fs = std::filesystem;
using fashion_mnist::Clock;

namespace {

fashion_mnist::Dataset load_or_synthesize() {
  try {
    auto data = fashion_mnist::load_dataset(fashion_mnist::kDefaultDir);
    std::printf("data: %s (%lld training images)\n", fashion_mnist::kDefaultDir,
                static_cast<long long>(data.train.images.size(0)));
    return data;
  } catch (const std::exception& e) {
    std::printf("data: synthetic, the dataset's shape (%s)\n", e.what());
    torch::manual_seed(0);
    auto split = [](std::int64_t n) {
      return fashion_mnist::make_split(torch::randint(0, 256, {n, 28, 28}, torch::kUInt8),
                                       torch::randint(0, 10, {n}, torch::kInt64), "synthetic");
    };
    return {split(60000), split(10000)};
  }
}

// The demo's run, from the guards' construction to the last checkpoint; returns samples/s of the
// training loop (its steps and the last save; not the guards' construction).
double guarded_round(const fashion_mnist::Dataset& data, const fashion_mnist::Settings& settings,
                     const fs::path& run_dir) {
  fs::remove_all(run_dir);
  fs::create_directories(run_dir);
  torch::manual_seed(settings.seed);
  fashion_mnist::Net model;
  auto optimizer = std::make_shared<torch::optim::Adam>(
      model->parameters(), torch::optim::AdamOptions(settings.learning_rate));

  torchguard::ScopeStack stack;
  torchguard::TrainingSessionOptions session_options;
  session_options.logger = std::make_shared<spdlog::logger>(
      "bench", std::make_shared<spdlog::sinks::null_sink_mt>());  // the log file still gets all
  session_options.log_file = run_dir / "train.log";
  session_options.metrics_file = run_dir / "metrics.jsonl";
  session_options.tensorboard_dir = run_dir;
  session_options.handle_signals = true;
  auto& session = stack.emplace<torchguard::TrainingSession>("bench", session_options);
  return session.run([&] {
    const fashion_mnist::Schedule schedule(data.train.images.size(0), settings, false);
    torchguard::ResumableSampler sampler(static_cast<std::size_t>(schedule.samples),
                                         {settings.seed});
    auto options = fashion_mnist::checkpoint_options(run_dir / "checkpoints", settings, schedule,
                                                     sampler, torch::kCPU, session.logger());
    options.stop_token = session.stop_token();
    options.after_save = [&session] { session.flush(); };
    auto& checkpoint = stack.emplace<torchguard::CheckpointGuard>(model, optimizer, options);
    session.resume_metrics(checkpoint.current_step());

    const auto start = Clock::now();
    torchguard::GpuMemoryOptions memory_options;  // per epoch, as the demo
    memory_options.label = "epoch 1";
    torchguard::GpuMemoryGuard memory(memory_options);
    const auto left = sampler.remaining();
    auto batches = fashion_mnist::epoch_batches(
        data, std::vector<std::int64_t>(left.begin(), left.end()), schedule, settings.batch_size, 0,
        schedule.total_steps, session.stop_token(), torch::kCPU);
    fashion_mnist::EpochFigures figures;
    for (auto& batch : batches) {
      const auto step = fashion_mnist::train_step(model, *optimizer, batch);
      figures.add(step.loss, step.samples, step.correct);
      sampler.consume(static_cast<std::size_t>(step.samples));
      const std::int64_t global_step = checkpoint.current_step() + 1;
      if (global_step % settings.log_every == 0 || global_step == schedule.total_steps) {
        session.log_metrics(global_step,
                            {{"loss", figures.take_window_loss()}, {"lr", settings.learning_rate}});
      }
      checkpoint.metadata()[fashion_mnist::EpochFigures::kKey] = figures.to_json(0, 0.0);
      if (checkpoint.step({{"loss", step.loss}}).stop) throw std::runtime_error("stopped");
    }
    memory.close(torchguard::Outcome::success);
    checkpoint.close(torchguard::Outcome::success);  // the last save, as the demo
    const double seconds = fashion_mnist::seconds_since(start);
    return static_cast<double>(settings.max_steps * settings.batch_size) / seconds;
  });
}

// The same steps without torchguard.
double bare_round(const fashion_mnist::Dataset& data, const fashion_mnist::Settings& settings) {
  torch::manual_seed(settings.seed);
  fashion_mnist::Net model;
  torch::optim::Adam optimizer(model->parameters(),
                               torch::optim::AdamOptions(settings.learning_rate));
  const std::int64_t samples = data.train.images.size(0);
  const std::int64_t batch_size = settings.batch_size;
  const std::int64_t steps = settings.max_steps;  // within the first epoch

  const auto start = Clock::now();
  const auto permutation = torchguard::ResumableSampler::permutation(
      static_cast<std::size_t>(samples), settings.seed, 0);
  const auto order =
      torch::tensor(std::vector<std::int64_t>(permutation.begin(), permutation.end()));
  fashion_mnist::EpochFigures figures;
  for (std::int64_t step = 0; step < steps; ++step) {
    const auto indices =
        order.slice(0, step * batch_size, std::min((step + 1) * batch_size, samples));
    const torch::data::Example<> batch(data.train.images.index_select(0, indices),
                                       data.train.labels.index_select(0, indices));
    const auto result = fashion_mnist::train_step(model, optimizer, batch);
    figures.add(result.loss, result.samples, result.correct);
  }
  const double seconds = fashion_mnist::seconds_since(start);
  if (figures.seen != steps * batch_size) std::abort();
  return static_cast<double>(steps * batch_size) / seconds;
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

}  // namespace

int main(int argc, char** argv) {
  // LibTorch's sgemm runs on OpenBLAS's own pool, which at::set_num_threads does not size and
  // whose idle threads spin on sched_yield (a whole core on this 2-core machine): one thread, the
  // same on both sides. OpenBLAS reads the variable when it loads, hence the restart.
  if (!std::getenv("OPENBLAS_NUM_THREADS")) {
    ::setenv("OPENBLAS_NUM_THREADS", "1", 1);
    ::execv("/proc/self/exe", argv);  // returns only if it failed: then measure as we are
  }
  fashion_mnist::Settings settings;  // the demo's: batch 64, Adam 1e-3, seed 1, every 500 steps
  settings.epochs = 1;
  settings.max_steps = 150;
  // One intra-op thread: with more, on a small shared machine, OpenMP's spinning threads make
  // either side's figure swing by several times (the demo's default is one per core).
  settings.threads = 1;
  int rounds = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--steps")) settings.max_steps = std::atoll(argv[i + 1]);
    if (!std::strcmp(argv[i], "--rounds")) rounds = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--threads")) settings.threads = std::atoi(argv[i + 1]);
  }
  // The periodic checkpoint at each round's last step (the demo: every 500 steps of ~940 an epoch).
  settings.checkpoint_every = settings.max_steps;
  at::set_num_threads(settings.threads);  // both sides
  const auto data = load_or_synthesize();
  const fs::path run_dir =
      fs::temp_directory_path() / ("torchguard-bench-training-loop-" + std::to_string(::getpid()));

  // A short warm-up of each side (allocator, thread pools, page cache), not measured.
  auto warm_up = settings;
  warm_up.max_steps = 20;
  guarded_round(data, warm_up, run_dir);
  bare_round(data, warm_up);

  std::vector<double> guarded, bare;
  for (int round = 0; round < rounds; ++round) {
    guarded.push_back(guarded_round(data, settings, run_dir));
    bare.push_back(bare_round(data, settings));
    std::printf("round %d: every guard %.0f samples/s, bare LibTorch %.0f samples/s\n", round + 1,
                guarded.back(), bare.back());
    std::fflush(stdout);
  }
  fs::remove_all(run_dir);

  const double with_guards = median(guarded);
  const double without = median(bare);
  std::printf(
      "every guard: %.0f samples/s (median of %d rounds of %lld steps, batch %lld, %d "
      "intra-op threads)\n",
      with_guards, rounds, static_cast<long long>(settings.max_steps),
      static_cast<long long>(settings.batch_size), settings.threads);
  std::printf("bare LibTorch: %.0f samples/s\n", without);
  std::printf("ratio throughput with every guard / bare LibTorch: %.2f (target >= 0.98)\n",
              with_guards / without);
  return 0;
}
