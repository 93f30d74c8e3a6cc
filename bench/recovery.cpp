// The cost of a run that heals itself: the demo's training step (examples/: the Fashion-MNIST
// CNN, batch 64, Adam) with CheckpointGuard::check_step judging every step (the loss and every
// gradient: one _foreach_norm, one synchronization), against the same step with the recovery off
// (check_step returns at once). Both sides run inside the same kind of guard, with no save in
// the measured steps.
//
//   bench_recovery [--steps N] [--blocks B] [--threads T]     (defaults: 20, 15, 1)
// Blocks of N steps alternate (judged, not judged, ...); each side's median block time is
// printed with the ratio, and check_step's own median time per step. The data are random, of the
// dataset's shape (the arithmetic's cost does not depend on the pixel values).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include <spdlog/sinks/null_sink.h>
#include <torch/torch.h>
#include <torchguard/checkpoint.hpp>

#include "fashion_mnist_model.hpp"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

struct Side {
  fashion_mnist::Net model;
  std::shared_ptr<torch::optim::Adam> optimizer;
  std::unique_ptr<torchguard::CheckpointGuard> guard;
  std::vector<double> block_seconds;
  std::vector<double> check_seconds;  // check_step alone, per step

  Side(bool judged, const fs::path& dir) {
    torch::manual_seed(1);
    optimizer =
        std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(1e-3));
    torchguard::CheckpointOptions options;
    options.directory = dir;
    options.logger =
        std::make_shared<spdlog::logger>("bench", std::make_shared<spdlog::sinks::null_sink_mt>());
    options.save_on_exit = torchguard::SaveOnExit::never;
    options.recovery.enabled = judged;  // judged: saves step 0 here, before anything is measured
    guard = std::make_unique<torchguard::CheckpointGuard>(model, optimizer, options);
  }

  void block(const torch::Tensor& images, const torch::Tensor& labels, int steps) {
    const std::vector<std::size_t> batch(64);
    const auto start = Clock::now();
    for (int i = 0; i < steps; ++i) {
      optimizer->zero_grad();
      const auto offset = (i % 8) * 64;
      auto loss =
          torch::nn::functional::cross_entropy(model->forward(images.slice(0, offset, offset + 64)),
                                               labels.slice(0, offset, offset + 64));
      loss.backward();
      const auto checked = Clock::now();
      if (guard->check_step(loss, batch).recovered) std::abort();
      check_seconds.push_back(std::chrono::duration<double>(Clock::now() - checked).count());
      optimizer->step();
      guard->step();
      (void)loss.item<double>();  // the demo reads the loss every step
    }
    block_seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
};

}  // namespace

int main(int argc, char** argv) {
  // As bench_training_loop: OpenBLAS's own pool sized to one thread on both sides.
  if (!std::getenv("OPENBLAS_NUM_THREADS")) {
    ::setenv("OPENBLAS_NUM_THREADS", "1", 1);
    ::execv("/proc/self/exe", argv);
  }
  int steps = 20, blocks = 15, threads = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--steps")) steps = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--blocks")) blocks = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--threads")) threads = std::atoi(argv[i + 1]);
  }
  at::set_num_threads(threads);
  torch::manual_seed(0);
  const auto images = torch::randn({512, 1, 28, 28});
  const auto labels = torch::randint(0, 10, {512}, torch::kInt64);
  const fs::path root =
      fs::temp_directory_path() / ("torchguard-bench-recovery-" + std::to_string(::getpid()));
  {
    Side judged(true, root / "judged");
    Side plain(false, root / "plain");
    judged.block(images, labels, 5);  // warm-up, not measured
    plain.block(images, labels, 5);
    judged.block_seconds.clear();
    judged.check_seconds.clear();
    plain.block_seconds.clear();
    plain.check_seconds.clear();
    for (int b = 0; b < blocks; ++b) {
      judged.block(images, labels, steps);
      plain.block(images, labels, steps);
    }
    const double with = median(judged.block_seconds) / steps;
    const double without = median(plain.block_seconds) / steps;
    std::printf(
        "step with recovery's checks: %.3f ms (check_step %.1f us); without: %.3f ms "
        "(check_step %.2f us); median of %d blocks of %d steps, batch 64, %d intra-op "
        "threads, %lld parameters\n",
        with * 1e3, median(judged.check_seconds) * 1e6, without * 1e3,
        median(plain.check_seconds) * 1e6, blocks, steps, threads, static_cast<long long>([&] {
          std::int64_t n = 0;
          for (const auto& p : judged.model->parameters()) n += p.numel();
          return n;
        }()));
    std::printf("ratio throughput with the checks / without: %.4f (target >= 0.99)\n",
                without / with);
  }
  fs::remove_all(root);
  return 0;
}
