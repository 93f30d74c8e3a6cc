// CheckpointGuard against its peers, in one run, on one state (a 200 MB model and its SGD
// momentum buffers, 400 MB in all):
//   save: CheckpointGuard (crash-safe: fsync, manifest, rename) vs torch::save (no fsync)
//         vs a raw write + fsync of the same number of bytes into a new file, the previous one
//         deleted, as checkpoint rotation does (the disk's bound)
//   load: CheckpointGuard (verifies every checksum) vs torch::load
//   stall: how long step() blocks the training loop with the background writer vs a sync save
//   state_dict: save_state_dict / load_state_dict of the model (a safetensors file) vs Python's
//         safetensors.torch.save_file (+ fsync) / load_file copied into a model's tensors
//         (what model.load_state_dict(load_file(...)) does) of the same file, where a Python
//         with safetensors is found ($TORCHGUARD_PYTHON, or scripts/setup.sh --torch2's venv)
// Medians of several rounds; ratios are computed from figures measured in this run.
//   bench_checkpoint [directory]   (default: a new directory under /tmp)
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <torchguard/checkpoint_guard.hpp>
#include <torchguard/safetensors.hpp>

namespace fs = std::filesystem;

namespace {

constexpr int rounds = 7;

double seconds_of(const std::function<void()>& fn) {
  const auto start = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double median(std::vector<double> samples) {
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

// Medians of interleaved rounds: each round times every contender once, each starting with no
// dirty pages left by another (sync() first, untimed), so that none pays for another's writes.
std::vector<double> interleaved_medians(const std::vector<std::function<void()>>& contenders) {
  std::vector<std::vector<double>> samples(contenders.size());
  for (int round = 0; round < rounds; ++round) {
    for (std::size_t i = 0; i < contenders.size(); ++i) {
      ::sync();
      samples[i].push_back(seconds_of(contenders[i]));
    }
  }
  std::vector<double> medians;
  for (auto& s : samples) medians.push_back(median(s));
  return medians;
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

// A Python that imports safetensors.torch, or "".
std::string find_python() {
  std::vector<std::string> candidates;
  if (const char* python = std::getenv("TORCHGUARD_PYTHON")) candidates.push_back(python);
  const char* venv = std::getenv("TORCHGUARD_TORCH2_VENV");
  candidates.push_back(std::string(venv ? venv : "/opt/torchguard-venv") + "/bin/python");
  for (const auto& python : candidates) {
    if (fs::exists(python) &&
        std::system((python + " -c 'import safetensors.torch' 2>/dev/null").c_str()) == 0) {
      return python;
    }
  }
  return {};
}

// Python's save_file (+ fsync, as save_state_dict does) and load_file of `path` copied into
// tensors of a model (as load_state_dict copies into the module): medians, in seconds.
std::pair<double, double> python_safetensors(const std::string& python, const fs::path& path) {
  const std::string script =
      "import os, statistics, sys, time, torch\n"
      "from safetensors.torch import load_file, save_file\n"
      "path, out = sys.argv[1], sys.argv[1] + '.py'\n"
      "state = load_file(path)\n"
      "model = {k: torch.empty_like(v) for k, v in state.items()}\n"
      "saves, loads = [], []\n"
      "for _ in range(" +
      std::to_string(rounds) +
      "):\n"
      "    os.sync(); t = time.perf_counter(); save_file(state, out)\n"
      "    fd = os.open(out, os.O_RDONLY); os.fsync(fd); os.close(fd)\n"
      "    saves.append(time.perf_counter() - t)\n"
      "    t = time.perf_counter()\n"
      "    for k, v in load_file(path).items(): model[k].copy_(v)\n"
      "    loads.append(time.perf_counter() - t)\n"
      "os.remove(out)\n"
      "print(statistics.median(saves), statistics.median(loads))\n";
  const std::string command = python + " -c \"" + script + "\" '" + path.string() + "'";
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(::popen(command.c_str(), "r"), ::pclose);
  double save = 0, load = 0;
  if (!pipe || std::fscanf(pipe.get(), "%lf %lf", &save, &load) != 2) return {0, 0};
  return {save, load};
}

}  // namespace

int main(int argc, char** argv) {
  std::string base_text = argc > 1 ? argv[1] : "/tmp/torchguard-bench-XXXXXX";
  if (argc <= 1 && ::mkdtemp(base_text.data()) == nullptr) return 1;
  const fs::path base = base_text;
  fs::create_directories(base);
  if (!std::getenv("BENCH_VERBOSE"))
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

  const fs::path guard_dir = base / "guard";
  torchguard::CheckpointOptions options;
  options.directory = guard_dir;
  options.keep_last = 1;
  options.save_on_exit = torchguard::SaveOnExit::never;
  torchguard::CheckpointGuard guard(model, optimizer, options);
  guard.save();
  const std::uint64_t checkpoint_bytes = directory_bytes(guard.list().back().path);
  const fs::path torch_model = base / "model.pt";
  const fs::path torch_optimizer = base / "optimizer.pt";
  const std::string bytes(checkpoint_bytes, '\x5a');
  int raw_round = 0;

  // Saves: CheckpointGuard (synchronous); torch::save of the same state (the model and the
  // optimizer, two files, no fsync); a raw write + fsync of as many bytes: what the disk allows.
  const auto saves = interleaved_medians({
      [&] { guard.save(); },
      [&] {
        torch::save(model, torch_model.string());
        torch::save(optimizer, torch_optimizer.string());
      },
      [&] {
        // Like a checkpoint rotation: a new file each time, the previous one deleted after.
        const fs::path path = base / ("raw-" + std::to_string(++raw_round) + ".bin");
        raw_write_fsync(path, bytes);
        fs::remove(base / ("raw-" + std::to_string(raw_round - 1) + ".bin"));
      },
  });
  const double guard_save = saves[0], torch_save = saves[1], raw_write = saves[2];

  // Loads (the files are in the page cache for both).
  // The restoring guard does not write (the saving one holds the directory's lock).
  torchguard::CheckpointOptions load_options = options;
  load_options.is_writer = [] { return false; };
  const auto loads = interleaved_medians({
      [&] { torchguard::CheckpointGuard restore(model, optimizer, load_options); },
      [&] {
        torch::load(model, torch_model.string());
        torch::load(optimizer, torch_optimizer.string());
      },
  });
  const double guard_load = loads[0], torch_load = loads[1];

  // The training loop's stall: step() with a save due, background vs synchronous. Each round
  // waits for the previous background write first, so that every save has a full write to hide.
  torchguard::CheckpointOptions background_options = options;
  background_options.directory = base / "background";
  background_options.background = true;
  background_options.every_n_steps = 1;
  torchguard::CheckpointGuard background(model, optimizer, background_options);
  background.step();  // the first background save also allocates its staging buffer
  std::vector<double> stalls;
  for (int round = 0; round < rounds; ++round) {
    background.wait();
    ::sync();
    stalls.push_back(seconds_of([&] { background.step(); }));
  }
  background.wait();
  const double background_stall = median(stalls);

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

  // state_dict exchange: the model alone, as a safetensors file.
  const fs::path state_file = base / "model.safetensors";
  const auto state_dict = interleaved_medians({
      [&] { torchguard::save_state_dict(*model, state_file); },
      [&] { torchguard::load_state_dict(*model, state_file); },
  });
  std::printf("state_dict save_state_dict (crash-safe):          %.3f s  %.0f MiB/s\n",
              state_dict[0],
              static_cast<double>(parameter_bytes) / (1024.0 * 1024.0) / state_dict[0]);
  std::printf("state_dict load_state_dict (checked, copied in):  %.3f s\n", state_dict[1]);
  const std::string python = find_python();
  const auto [python_save, python_load] =
      python.empty() ? std::pair<double, double>{0, 0} : python_safetensors(python, state_file);
  if (python_save > 0) {
    std::printf("state_dict Python save_file + fsync / load_file + copy_: %.3f s / %.3f s\n",
                python_save, python_load);
    std::printf("ratio save time save_state_dict / Python save_file:  %.2f\n",
                state_dict[0] / python_save);
    std::printf("ratio load time load_state_dict / Python load_file:  %.2f\n",
                state_dict[1] / python_load);
  } else {
    std::printf("state_dict Python: no Python with safetensors (scripts/setup.sh --torch2)\n");
  }
  if (argc <= 1) fs::remove_all(base);
  return 0;
}
