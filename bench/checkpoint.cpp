// CheckpointGuard against its peers, in one run, on one state (a 200 MB model and its SGD
// momentum buffers, 400 MB in all):
//   save: CheckpointGuard (crash-safe: fsync, manifest, rename) vs torch::save (no fsync)
//         vs a raw write + fsync of the same number of bytes into a new file, the previous one
//         deleted, as checkpoint rotation does (the disk's bound)
//   load: CheckpointGuard (verifies every checksum) vs torch::load
//   stall: how long step() blocks the training loop with the background writer vs a sync save
//   loop: a training loop (forward, backward, SGD step) that checkpoints every N steps, N such
//         that synchronous saves cost about 20%, against the same loop without checkpoints:
//         background saves copied in step() or overlapped with training (the fence before the
//         optimizer's step), the time the loop is blocked per save, and the CPU each save costs
//         (copy, hashing and write measured apart)
//   memory: the peak extra resident memory of a save, a restore and background saves, in a
//         child process each, for two state sizes
//   state_dict: save_state_dict / load_state_dict of the model (a safetensors file) vs Python's
//         safetensors.torch.save_file (+ fsync) / load_file copied into a model's tensors
//         (what model.load_state_dict(load_file(...)) does) of the same file, where a Python
//         with safetensors is found ($TORCHGUARD_PYTHON, or scripts/setup.sh --torch2's venv)
// Medians of several rounds; ratios are computed from figures measured in this run.
//   bench_checkpoint [directory]   (default: a new directory under /tmp)
//   bench_checkpoint --memory <layers> <directory>   (the memory figure alone, in this process)
#include <fcntl.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>
#include <torchguard/checkpoint.hpp>
#include <torchguard/detail/files.hpp>

#include "bench_support.hpp"

namespace fs = std::filesystem;

namespace {

using namespace torchguard_bench;

constexpr int rounds = 7;

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

std::string_view bytes_view(const std::vector<char>& buffer, const std::string& like) {
  return {buffer.data(), like.size()};
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

using Model = torch::nn::Sequential;

Model make_model(int layers) {
  torch::manual_seed(0);
  Model model;
  for (int i = 0; i < layers; ++i) model->push_back(torch::nn::Linear(4096, 4096));
  return model;
}

// One training step of the benchmark's loop; `fence` runs before the optimizer steps.
void train_step(Model& model, torch::optim::Optimizer& optimizer, const torch::Tensor& batch,
                const std::function<void()>& fence = {}) {
  optimizer.zero_grad();
  torch::mse_loss(model->forward(batch), batch).backward();
  if (fence) fence();
  optimizer.step();
}

// The peak extra resident memory of a synchronous save and overlapped background saves, over the
// process's memory once the state exists and over a training step's own peak, and of a restore
// (the files read and checked before anything is changed); printed as multiples of the state.
int memory_figure(int layers, const fs::path& directory) {
  auto model = make_model(layers);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(1e-3).momentum(0.9));
  const auto batch = torch::randn({8, 4096});
  train_step(model, optimizer, batch);  // the momentum buffers exist
  torchguard::CheckpointOptions options;
  options.directory = directory;
  options.keep_last = 1;
  options.save_on_exit = torchguard::SaveOnExit::never;
  std::int64_t state_bytes = 0;
  for (const auto& p : model->parameters()) state_bytes += 2 * p.numel() * p.element_size();
  // Training's own transient peak (gradients, temporaries) is not the checkpoints' doing.
  const double base = status_bytes("VmRSS:");
  reset_peak();
  train_step(model, optimizer, batch);
  const double training_peak = status_bytes("VmHWM:") - base;
  reset_peak();
  {
    torchguard::CheckpointGuard guard(model, optimizer, options);
    guard.save();
  }
  {
    torchguard::CheckpointOptions background = options;
    background.restore = "none";
    background.background = true;
    background.every_n_steps = 1;
    torchguard::CheckpointGuard guard(model, optimizer, background);
    for (int i = 0; i < 3; ++i) {
      train_step(model, optimizer, batch, [&] { guard.before_optimizer_step(); });
      guard.step();
    }
  }
  const double saves = status_bytes("VmHWM:") - base - training_peak;
  reset_peak();
  {
    torchguard::CheckpointOptions restore = options;
    restore.is_writer = [] { return false; };
    torchguard::CheckpointGuard guard(model, optimizer, restore);
  }
  const double restore = status_bytes("VmHWM:") - base;
  const double mib = 1024.0 * 1024.0;
  const auto state = static_cast<double>(state_bytes);
  std::printf(
      "memory  state %4.0f MiB: peak extra resident %4.0f MiB = %.2fx the state (a save and "
      "overlapped background saves; target <= 1.10), a restore %4.0f MiB = %.2fx\n",
      state / mib, saves / mib, saves / state, restore / mib, restore / state);
  return 0;
}

struct LoopFigures {
  double seconds = 0;  // the loop's wall time (median)
  double blocked = 0;  // in the guard's step() and fence, per save (median)
  double cpu = 0;      // the process's CPU time (median)
};

// The training loop, checkpointing every N steps (N: synchronous saves cost about 20%), against
// the same loop without checkpoints; `guard_save` is a synchronous save's time. The overlapped
// background save runs with the writer as it was (hash, then write, of each whole tensor through
// the page cache), then with each of WriteTuning's choices alone, then with the defaults; and
// the floor: the same loop while another thread only copies the state out (the staging copy, no
// hashing, no file), which any background save must do.
void training_loop_figures(Model& model, torch::optim::Optimizer& optimizer,
                           const torchguard::CheckpointOptions& options, const fs::path& base,
                           double guard_save, const std::string& bytes) {
  using torchguard::detail::WriteTuning;
  const double mib = static_cast<double>(bytes.size()) / (1024.0 * 1024.0);
  const auto batch = torch::randn({8, 4096});
  std::vector<double> step_times;
  for (int i = 0; i < 7; ++i) {
    step_times.push_back(seconds_of([&] { train_step(model, optimizer, batch); }));
  }
  const double step_time = median(step_times);
  const int every = std::max(1, static_cast<int>(std::lround(4 * guard_save / step_time)));
  const int loop_rounds = 5;
  // Contenders. A round is 2N steps with a save at N/2 and 3N/2, so that the last write ends
  // inside the round.
  enum Mode { none, synchronous, in_step, overlapped, floor, floor_hashed, floor_fused, disk };
  struct Contender {
    std::string name;
    Mode mode;
    WriteTuning tuning;
  };
  WriteTuning before;  // the writer before these choices
  before.chunk = 0;
  before.direct = false;
  auto with = [&](auto change) {
    WriteTuning tuning = before;
    change(tuning);
    return tuning;
  };
  // Paced: the write spread over half the time between two saves.
  const double pace = static_cast<double>(bytes.size()) / (every * step_time / 2);
  const std::vector<Contender> contenders = {
      {"no checkpoints", none, {}},
      {"synchronous saves", synchronous, {}},
      {"background, copy in step()", in_step, {}},
      {"overlapped, writer as before", overlapped, before},
      {"  + hash and write 1 MiB chunks", overlapped,
       with([](WriteTuning& t) { t.chunk = 1 << 20; })},
      {"  + drop-behind (sync_file_range)", overlapped,
       with([](WriteTuning& t) { t.drop_behind = true; })},
      {"  + O_DIRECT, hashed while copied", overlapped,
       with([](WriteTuning& t) { t.direct = true; })},
      {"  + writer thread at nice 19", overlapped,
       with([](WriteTuning& t) { t.writer_nice = 19; })},
      {"  + paced over half the interval", overlapped,
       with([&](WriteTuning& t) { t.pace_bytes_per_s = pace; })},
      {"overlapped, the defaults", overlapped, {}},
      {"  the defaults, paced", overlapped,
       [&] {
         WriteTuning tuning;
         tuning.pace_bytes_per_s = pace;
         return tuning;
       }()},
      {"floor: the staging copy alone", floor, {}},
      {"floor: the copy, then XXH3 of it", floor_hashed, {}},
      {"floor: the copy, XXH3 of each 256 KiB as copied", floor_fused, {}},
      {"floor: O_DIRECT write of the bytes alone", disk, {}},
  };
  const std::size_t count = contenders.size();
  std::vector<std::unique_ptr<torchguard::CheckpointGuard>> loop_guards;
  for (std::size_t c = 0; c < count; ++c) {
    const Mode mode = contenders[c].mode;
    if (mode == none || mode == floor || mode == floor_hashed || mode == floor_fused ||
        mode == disk) {
      loop_guards.emplace_back();
      continue;
    }
    torchguard::CheckpointOptions loop_options = options;
    loop_options.directory = base / ("loop-" + std::to_string(c));
    loop_options.every_n_steps = every;
    loop_options.background = mode != synchronous;
    loop_guards.push_back(
        std::make_unique<torchguard::CheckpointGuard>(model, optimizer, loop_options));
    loop_guards.back()->set_step(every / 2);
  }
  // The floor's copy: the parameters and momentum buffers into one reused buffer, on a thread.
  std::vector<torch::Tensor> state;
  for (const auto& p : model->parameters()) state.push_back(p);
  for (const auto& item : optimizer.state()) {
    const auto& momentum =
        static_cast<const torch::optim::SGDParamState&>(*item.second).momentum_buffer();
    if (momentum.defined()) state.push_back(momentum);
  }
  std::vector<char> floor_buffer(bytes.size() + 1024 * 1024, 1);
  volatile std::uint64_t floor_digest = 0;
  auto copy_out = [&] {
    std::size_t at = 0;
    for (const auto& t : state) {
      std::memcpy(floor_buffer.data() + at, t.data_ptr(), t.nbytes());
      at += t.nbytes();
    }
  };
  auto copy_then_hash = [&] {
    copy_out();
    floor_digest = floor_digest + torchguard::detail::checksum_of(bytes_view(floor_buffer, bytes));
  };
  auto copy_fused = [&] {
    torchguard::detail::Hasher hasher;
    constexpr std::size_t piece = std::size_t{256} << 10;
    std::size_t at = 0;
    for (const auto& t : state) {
      const char* from = static_cast<const char*>(t.data_ptr());
      for (std::size_t done = 0; done < t.nbytes(); done += piece) {
        const std::size_t n = std::min(piece, t.nbytes() - done);
        std::memcpy(floor_buffer.data() + at + done, from + done, n);
        hasher.update(floor_buffer.data() + at + done, n);
      }
      at += t.nbytes();
    }
    floor_digest = floor_digest + hasher.digest();
  };
  // The disk's floor: the same bytes written from an aligned buffer with O_DIRECT, fsynced, the
  // previous file deleted; no copy, no hashing, no page cache.
  constexpr std::size_t direct_chunk = std::size_t{4} << 20;
  std::unique_ptr<char, decltype(&std::free)> direct_buffer(
      static_cast<char*>(std::aligned_alloc(4096, direct_chunk)), &std::free);
  std::memset(direct_buffer.get(), 0x5a, direct_chunk);
  int disk_round = 0;
  auto write_direct = [&] {
    const fs::path path = base / ("direct-" + std::to_string(++disk_round) + ".bin");
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_DIRECT, 0644);
    if (fd < 0) throw std::runtime_error("cannot create " + path.string() + " with O_DIRECT");
    for (std::size_t done = 0; done < bytes.size(); done += direct_chunk) {
      if (::write(fd, direct_buffer.get(), direct_chunk) != static_cast<ssize_t>(direct_chunk))
        throw std::runtime_error("O_DIRECT write failed");
    }
    if (::fsync(fd) != 0 || ::close(fd) != 0) throw std::runtime_error("fsync failed");
    fs::remove(base / ("direct-" + std::to_string(disk_round - 1) + ".bin"));
  };
  std::vector<std::vector<double>> loop_seconds(count), loop_blocked(count), loop_cpu(count);
  for (int round = 0; round < loop_rounds; ++round) {
    for (std::size_t c = 0; c < count; ++c) {
      const Mode mode = contenders[c].mode;
      auto* guard = loop_guards[c].get();
      torchguard::detail::write_tuning() = contenders[c].tuning;
      ::sync();
      double blocked = 0;
      auto timed = [&](const std::function<void()>& fn) { blocked += seconds_of(fn); };
      std::thread copier;
      const double cpu_before = cpu_seconds();
      const double seconds = seconds_of([&] {
        for (int i = 0; i < 2 * every; ++i) {
          if (mode == overlapped) {
            train_step(model, optimizer, batch,
                       [&] { timed([&] { guard->before_optimizer_step(); }); });
          } else {
            train_step(model, optimizer, batch);
          }
          if (guard) timed([&] { guard->step(); });
          if (mode >= floor && (i + 1 + every / 2) % every == 0) {
            if (copier.joinable()) copier.join();
            copier = mode == floor          ? std::thread(copy_out)
                     : mode == floor_hashed ? std::thread(copy_then_hash)
                     : mode == floor_fused  ? std::thread(copy_fused)
                                            : std::thread(write_direct);
          }
        }
      });
      if (guard) guard->wait();  // untimed: the last write ended inside the round anyway
      if (copier.joinable()) copier.join();
      loop_cpu[c].push_back(cpu_seconds() - cpu_before);
      loop_seconds[c].push_back(seconds);
      loop_blocked[c].push_back(blocked / 2);
    }
  }
  loop_guards.clear();
  torchguard::detail::write_tuning() = {};
  std::vector<LoopFigures> loops;
  for (std::size_t c = 0; c < count; ++c) {
    loops.push_back({median(loop_seconds[c]), median(loop_blocked[c]), median(loop_cpu[c])});
  }
  // The writer's work per save, measured apart: the copy (memcpy into a reused buffer), the
  // hashing (XXH3) and the write (its CPU time; the fsync's wait is not CPU).
  std::vector<char> staging_copy(bytes.size(), 1);
  const double copy_cpu =
      median({seconds_of([&] { std::memcpy(staging_copy.data(), bytes.data(), bytes.size()); }),
              seconds_of([&] { std::memcpy(staging_copy.data(), bytes.data(), bytes.size()); }),
              seconds_of([&] { std::memcpy(staging_copy.data(), bytes.data(), bytes.size()); })});
  volatile std::uint64_t digest = 0;
  auto hash = [&] { digest = digest + torchguard::detail::checksum_of(bytes); };
  const double hash_cpu = median({seconds_of(hash), seconds_of(hash), seconds_of(hash)});
  std::vector<double> write_cpus;
  for (int i = 0; i < 3; ++i) {
    const double before = cpu_seconds();
    raw_write_fsync(base / "cpu.bin", bytes);
    write_cpus.push_back(cpu_seconds() - before);
    fs::remove(base / "cpu.bin");
  }
  const double write_cpu = median(write_cpus);
  std::printf(
      "loop  step %.3f s with %d intra-op threads on %u hardware threads; a save every %d steps "
      "(a synchronous save = %.2f steps); %d steps per round, median of %d rounds\n",
      step_time, at::get_num_threads(), std::thread::hardware_concurrency(), every,
      guard_save / step_time, 2 * every, loop_rounds);
  for (std::size_t c = 0; c < count; ++c) {
    const auto& loop = loops[c];
    std::printf("loop  %-36s %6.2f steps/s  %.3f of none", contenders[c].name.c_str(),
                2 * every / loop.seconds, loops[0].seconds / loop.seconds);
    if (c != 0) {
      std::printf("  blocked %.3f s per save  CPU %+.2f s per save", loop.blocked,
                  (loop.cpu - loops[0].cpu) / 2);
    }
    std::printf("\n");
  }
  std::printf(
      "loop  the writer's work per save, measured apart: copy %.3f s, hashing %.3f s, "
      "write %.3f s of CPU (%.0f MiB); pacing at %.0f MiB/s\n",
      copy_cpu, hash_cpu, write_cpu, mib, pace / (1024.0 * 1024.0));
  auto find = [&](const char* name) {
    for (std::size_t c = 0; c < count; ++c) {
      if (contenders[c].name == name) return loops[c];
    }
    throw std::logic_error(std::string("bench_checkpoint: no contender named ") + name);
  };
  const auto& defaults = find("overlapped, the defaults");
  std::printf("ratio overlapped stall / synchronous save:              %.3f (target <= 0.05)\n",
              defaults.blocked / guard_save);
  std::printf("ratio loop throughput synchronous saves / none:         %.3f\n",
              loops[0].seconds / find("synchronous saves").seconds);
  std::printf("ratio loop throughput background, copy in step() / none: %.3f\n",
              loops[0].seconds / find("background, copy in step()").seconds);
  std::printf("ratio loop throughput overlapped, as before / none:     %.3f\n",
              loops[0].seconds / find("overlapped, writer as before").seconds);
  std::printf("ratio loop throughput overlapped / none:                %.3f (target >= 0.97)\n",
              loops[0].seconds / defaults.seconds);
  std::printf("ratio loop throughput the floor (copy alone) / none:    %.3f\n",
              loops[0].seconds / find("floor: the staging copy alone").seconds);
  std::printf("ratio loop throughput the floor, copy then XXH3 / none: %.3f\n",
              loops[0].seconds / find("floor: the copy, then XXH3 of it").seconds);
  std::printf("ratio loop throughput the floor, XXH3 as copied / none: %.3f\n",
              loops[0].seconds / find("floor: the copy, XXH3 of each 256 KiB as copied").seconds);
  std::printf("ratio loop throughput the disk's floor (O_DIRECT) / none: %.3f\n",
              loops[0].seconds / find("floor: O_DIRECT write of the bytes alone").seconds);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "--memory") {
    torchguard::set_default_logger(std::make_shared<spdlog::logger>("quiet"));
    return memory_figure(std::stoi(argv[2]), argv[3]);
  }
  const bool loop_only = argc > 1 && std::string(argv[1]) == "--loop";
  if (loop_only) --argc, ++argv;
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
  if (loop_only) {  // the loop's figures alone: a synchronous save timed here
    std::vector<double> sync_saves;
    for (int i = 0; i < 3; ++i) {
      ::sync();
      sync_saves.push_back(seconds_of([&] { guard.save(); }));
    }
    training_loop_figures(model, optimizer, options, base, median(sync_saves), bytes);
    if (argc <= 1) fs::remove_all(base);
    return 0;
  }

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
  std::fflush(stdout);

  training_loop_figures(model, optimizer, options, base, guard_save, bytes);

  // Peak memory, in a fresh process per state size (one 4096x4096 layer: 128 MiB with momentum).
  for (int layers : {1, 3}) {
    const fs::path memory_dir = base / ("memory-" + std::to_string(layers));
    const std::string command = fs::read_symlink("/proc/self/exe").string() + " --memory " +
                                std::to_string(layers) + " '" + memory_dir.string() + "'";
    if (std::system(command.c_str()) != 0)
      std::printf("memory  the child for %d layers failed\n", layers);
  }

  // state_dict exchange: the model alone, as a safetensors file.
  const fs::path state_file = base / "model.safetensors";
  // Saves, then loads of the file in the page cache, as Python's are (a save writes large files
  // with O_DIRECT: a file loaded right after its save would be read from the disk).
  const double state_dict_save =
      interleaved_medians({[&] { torchguard::save_state_dict(*model, state_file); }})[0];
  const double state_dict_load =
      interleaved_medians({[&] { torchguard::load_state_dict(*model, state_file); }})[0];
  const std::vector<double> state_dict = {state_dict_save, state_dict_load};
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
