// CheckpointGuard against its peers, in one run, on one state (a 200 MB model and its SGD
// momentum buffers, 400 MB in all):
//   save: CheckpointGuard (crash-safe: fsync, manifest, rename) vs torch::save (no fsync)
//         vs a raw write + fsync of the same number of bytes (the disk's bound)
//   load: CheckpointGuard (verifies every checksum) vs torch::load
//   stall: how long step() blocks the training loop with the background writer vs a sync save
// Medians of several rounds; ratios are computed from figures measured in this run.
//   bench_checkpoint [directory]   (default: a new directory under /tmp)
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <torchguard/checkpoint_guard.hpp>

namespace fs = std::filesystem;

namespace {

constexpr int rounds = 5;

double seconds_of(const std::function<void()>& fn) {
  const auto start = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double median_seconds(const std::function<void()>& setup, const std::function<void()>& fn) {
  std::vector<double> samples;
  for (int i = 0; i < rounds; ++i) {
    setup();
    samples.push_back(seconds_of(fn));
  }
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

std::uint64_t directory_bytes(const fs::path& dir) {
  std::uint64_t total = 0;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file()) total += entry.file_size();
  }
  return total;
}

void raw_write_fsync(const fs::path& path, const std::string& bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error("cannot create " + path.string());
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n <= 0) throw std::runtime_error("write failed");
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) throw std::runtime_error("fsync failed");
}

}  // namespace

int main(int argc, char** argv) {
  std::string base_text = argc > 1 ? argv[1] : "/tmp/torchguard-bench-XXXXXX";
  if (argc <= 1 && ::mkdtemp(base_text.data()) == nullptr) return 1;
  const fs::path base = base_text;
  fs::create_directories(base);
  torchguard::set_default_logger(std::make_shared<spdlog::logger>("quiet"));

  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(4096, 4096), torch::nn::Linear(4096, 4096),
                              torch::nn::Linear(4096, 4096));
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  {  // one step, so that the momentum buffers exist
    optimizer.zero_grad();
    model->forward(torch::randn({8, 4096})).sum().backward();
    optimizer.step();
  }
  std::int64_t parameter_bytes = 0;
  for (const auto& p : model->parameters()) parameter_bytes += p.numel() * p.element_size();

  // CheckpointGuard, synchronous.
  const fs::path guard_dir = base / "guard";
  torchguard::CheckpointOptions options;
  options.directory = guard_dir;
  options.keep_last = 1;
  options.save_on_exit = torchguard::SaveOnExit::never;
  torchguard::CheckpointGuard guard(model, optimizer, options);
  const double guard_save = median_seconds([] {}, [&] { guard.save(); });
  const std::uint64_t checkpoint_bytes = directory_bytes(guard.list().back().path);

  // torch::save of the same state (the model and the optimizer, two files, no fsync).
  const fs::path torch_model = base / "model.pt";
  const fs::path torch_optimizer = base / "optimizer.pt";
  const double torch_save = median_seconds([] {},
                                           [&] {
                                             torch::save(model, torch_model.string());
                                             torch::save(optimizer, torch_optimizer.string());
                                           });

  // A raw write + fsync of as many bytes as the checkpoint holds: what the disk allows.
  const std::string bytes(checkpoint_bytes, '\x5a');
  const fs::path raw_path = base / "raw.bin";
  const double raw_write = median_seconds([] {}, [&] { raw_write_fsync(raw_path, bytes); });

  // Loads (the files are in the page cache for both).
  const double torch_load = median_seconds([] {},
                                           [&] {
                                             torch::load(model, torch_model.string());
                                             torch::load(optimizer, torch_optimizer.string());
                                           });
  const double guard_load = median_seconds(
      [] {}, [&] { torchguard::CheckpointGuard restore(model, optimizer, options); });

  // The training loop's stall: step() with a save due, background vs synchronous. Each round
  // waits for the background write first, so that every save has its own full write to hide.
  torchguard::CheckpointOptions background_options = options;
  background_options.directory = base / "background";
  background_options.background = true;
  background_options.every_n_steps = 1;
  torchguard::CheckpointGuard background(model, optimizer, background_options);
  const double background_stall =
      median_seconds([&] { background.wait(); }, [&] { background.step(); });
  background.wait();

  const double mib = static_cast<double>(checkpoint_bytes) / (1024.0 * 1024.0);
  std::printf("state: model %.0f MiB, checkpoint %.0f MiB (model + SGD momentum); median of %d\n",
              static_cast<double>(parameter_bytes) / (1024.0 * 1024.0), mib, rounds);
  std::printf("save  CheckpointGuard (fsync, manifest, rename): %.3f s  %.0f MiB/s\n", guard_save,
              mib / guard_save);
  std::printf("save  torch::save (no fsync):                      %.3f s  %.0f MiB/s\n", torch_save,
              mib / torch_save);
  std::printf("save  raw write + fsync of the same bytes:         %.3f s  %.0f MiB/s\n", raw_write,
              mib / raw_write);
  std::printf("load  CheckpointGuard (checksums verified):        %.3f s\n", guard_load);
  std::printf("load  torch::load:                                 %.3f s\n", torch_load);
  std::printf("stall background step() vs synchronous save:       %.3f s vs %.3f s\n",
              background_stall, guard_save);
  std::printf("ratio save bandwidth CheckpointGuard / raw write+fsync: %.2f (target >= 0.80)\n",
              raw_write / guard_save);
  std::printf("ratio save time CheckpointGuard / torch::save:          %.2f\n",
              guard_save / torch_save);
  std::printf("ratio load time CheckpointGuard / torch::load:          %.2f\n",
              guard_load / torch_load);
  std::printf("ratio background stall / synchronous save:              %.2f (target <= 0.10)\n",
              background_stall / guard_save);
  if (argc <= 1) fs::remove_all(base);
  return 0;
}
