// CheckpointGuard beside PyTorch's distributed checkpoint (DCP: torch.distributed.checkpoint's
// async_save and save, from the torch2 venv's torch), in one run, on the same state: L
// Linear(4096, 4096) layers and SGD(lr 1e-3, momentum 0.9) after one step (the momentum buffers
// exist); 3 layers: 384 MiB, 12 layers: 1.5 GiB. For each size:
//   loop: the same training loop (forward, backward, SGD step; the same intra-op thread count)
//         saving every N steps, N such that synchronous CheckpointGuard saves would cost about
//         20% (as bench_checkpoint chooses it), the same N on both sides, against each side's own
//         loop without checkpoints: CheckpointGuard synchronous and background, overlapped (the
//         fence before the optimizer's step); dcp.save, dcp.async_save as documented, and
//         async_save with its copy on a thread too (waited for before the optimizer's step):
//         the loop's throughput, the time it is blocked per save (CheckpointGuard: in step() and
//         the fence; DCP: taking the state_dict, the calls, the waits), in interleaved rounds
//         (the sides take turns at going first; a fraction of the loop without checkpoints is
//         the median of each round's), the Python side a child process
//         (bench/checkpoint_dcp.py) driven over pipes, both with the same OpenMP spin policy
//   bytes: a checkpoint directory's size
//   memory: the peak extra resident memory of saves, in a fresh process each
// Both sides keep only the newest checkpoint. Ratios are computed from figures of this run. Where
// no Python with torch.distributed.checkpoint is found ($TORCHGUARD_PYTHON, or the venv of
// scripts/setup.sh --torch2), the DCP side is skipped, said in one line.
//   bench_checkpoint_dcp [--layers 3,12] [--rounds 3] [directory]   (works in a new directory
//                                                                     under it, default /tmp)
//   bench_checkpoint_dcp --memory <layers> <synchronous|overlapped> <directory>   (one figure)
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <torch/torch.h>
#include <torchguard/checkpoint.hpp>

#include "bench_support.hpp"

#ifndef TORCHGUARD_BENCH_DIR  // where checkpoint_dcp.py is: bench/CMakeLists.txt says
#define TORCHGUARD_BENCH_DIR (std::filesystem::path(__FILE__).parent_path().string())
#endif

namespace fs = std::filesystem;

namespace {

using namespace torchguard_bench;

int rounds = 3;  // --rounds
constexpr double mib = 1024.0 * 1024.0;

// The state both sides save: what checkpoint_dcp.py's State builds.
struct State {
  explicit State(int layers) {
    torch::manual_seed(0);
    for (int i = 0; i < layers; ++i) model->push_back(torch::nn::Linear(4096, 4096));
    optimizer = std::make_shared<torch::optim::SGD>(model->parameters(),
                                                    torch::optim::SGDOptions(1e-3).momentum(0.9));
    batch = torch::randn({8, 4096});
    step();  // the momentum buffers exist
    for (const auto& p : model->parameters()) bytes += 2 * p.numel() * p.element_size();
  }
  // One training step; `fence` runs before the optimizer steps.
  void step(const std::function<void()>& fence = {}) {
    optimizer->zero_grad();
    torch::mse_loss(model->forward(batch), batch).backward();
    if (fence) fence();
    optimizer->step();
  }

  torch::nn::Sequential model;
  std::shared_ptr<torch::optim::SGD> optimizer;
  torch::Tensor batch;
  std::int64_t bytes = 0;  // the parameters and their momentum buffers
};

torchguard::CheckpointOptions guard_options(const fs::path& directory, bool background,
                                            std::int64_t every) {
  torchguard::CheckpointOptions options;
  options.directory = directory;
  options.keep_last = 1;
  options.save_on_exit = torchguard::SaveOnExit::never;
  options.background = background;
  options.every_n_steps = every;
  options.restore =
      "none";  // a guard on a directory another one saved into starts fresh all the same
  return options;
}

// The peak extra resident memory of 3 saves in 9 training steps (after steps 1, 4 and 7, written
// during the next step and waited for at its end, as checkpoint_dcp.py's memory does), over the
// process's memory once the state exists and over a training step's own peak: "memory <state
// bytes> <extra bytes>".
int memory_figure(int layers, const std::string& mode, const fs::path& directory) {
  State state(layers);
  const double base = status_bytes("VmRSS:");
  reset_peak();
  state.step();  // training's own transient peak is not the checkpoints' doing
  const double training_peak = status_bytes("VmHWM:") - base;
  reset_peak();
  {
    torchguard::CheckpointGuard guard(state.model, state.optimizer,
                                      guard_options(directory, mode == "overlapped", 3));
    guard.set_step(2);  // step() saves after steps 1, 4, 7 (the guard's steps 3, 6, 9)
    for (int i = 0; i < 9; ++i) {
      state.step([&] { guard.before_optimizer_step(); });
      guard.step();
      if (i % 3 == 1) guard.wait();
    }
    guard.wait();
  }
  const double extra = status_bytes("VmHWM:") - base - training_peak;
  std::printf("memory %lld %.0f\n", static_cast<long long>(state.bytes), extra);
  return 0;
}

// A memory child's figure, as a multiple of the state; nullopt when it failed.
std::optional<double> memory_multiple(const std::string& command) {
  const auto [output, ok] = command_output(command);
  std::istringstream reply(output.substr(std::min(output.size(), output.rfind("memory "))));
  std::string word;
  double state_bytes = 0, extra = 0;
  if (!ok || !(reply >> word >> state_bytes >> extra) || word != "memory" || state_bytes <= 0)
    return std::nullopt;
  return extra / state_bytes;
}

std::string quoted(const std::string& text) { return "'" + text + "'"; }

// A Python whose torch has DCP's async_save, get_state_dict and DefaultStager; or "" and, in
// `why`, what the candidates said.
std::string find_dcp_python(std::string& why) {
  std::vector<std::string> candidates;
  if (const char* python = std::getenv("TORCHGUARD_PYTHON")) candidates.push_back(python);
  const char* venv = std::getenv("TORCHGUARD_TORCH2_VENV");
  candidates.push_back(std::string(venv ? venv : "/opt/torchguard-venv") + "/bin/python");
  const std::string probe =
      " -c 'from torch.distributed.checkpoint import async_save, save; "
      "from torch.distributed.checkpoint.state_dict import get_state_dict; "
      "from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions' 2>&1";
  for (const auto& python : candidates) {
    if (!fs::exists(python)) {
      why += (why.empty() ? "" : "; ") + python + " does not exist";
      continue;
    }
    const auto [output, ok] = command_output(quoted(python) + probe);
    if (ok) return python;
    std::string last = output;
    while (!last.empty() && last.back() == '\n') last.pop_back();
    last = last.substr(last.rfind('\n') + 1);
    why += (why.empty() ? "" : "; ") + python + ": " + last;
  }
  return {};
}

// The contenders, in the order of the table.
enum Contender {
  guard_none,
  guard_synchronous,
  guard_overlapped,
  dcp_none,
  dcp_save,
  dcp_async,
  dcp_staged,
  contenders
};
constexpr std::array<const char*, contenders> contender_names = {
    "CheckpointGuard  no checkpoints",
    "CheckpointGuard  synchronous saves",
    "CheckpointGuard  background, overlapped",
    "DCP  no checkpoints",
    "DCP  dcp.save",
    "DCP  dcp.async_save (defaults)",
    "DCP  async_save, copy on a thread too",
};
// checkpoint_dcp.py's names for its contenders.
const std::map<std::string, Contender> python_names = {{"none", dcp_none},
                                                       {"save", dcp_save},
                                                       {"async_save", dcp_async},
                                                       {"async_staged", dcp_staged}};

const char* python_name(Contender contender) {
  for (const auto& [name, c] : python_names) {
    if (c == contender) return name.c_str();
  }
  return "";
}

struct Figures {
  std::array<std::vector<double>, contenders> seconds, blocked;  // a sample per round
  // Of the DCP side's blocked time: waiting for the previous save, and at the fence.
  std::array<std::vector<double>, contenders> waited, fenced;
  std::array<std::optional<double>, contenders> memory;  // a multiple of the state
  std::array<double, contenders> bytes{};                // a checkpoint's size
  bool dcp = false;                                      // the DCP side answered
};

// One round of a CheckpointGuard contender: 2N steps, saves at N/2 and 3N/2 (the guards' step
// counters start at N/2), so that the last write ends inside the round.
void guard_round(State& state, torchguard::CheckpointGuard* guard, bool overlapped,
                 std::int64_t every, Figures& figures, Contender contender) {
  ::sync();  // untimed: no dirty pages left by another contender
  double blocked = 0;
  auto timed = [&](const std::function<void()>& fn) { blocked += seconds_of(fn); };
  const double seconds = seconds_of([&] {
    for (std::int64_t i = 0; i < 2 * every; ++i) {
      if (overlapped) {
        state.step([&] { timed([&] { guard->before_optimizer_step(); }); });
      } else {
        state.step();
      }
      if (guard) timed([&] { guard->step(); });
    }
  });
  if (guard) guard->wait();  // untimed: the last write ended inside the round anyway
  figures.seconds[contender].push_back(seconds);
  figures.blocked[contender].push_back(blocked / 2);
}

// "none S B W F save S B W F ..." into the figures; false when the answer is not that.
bool read_python_round(const std::string& answer, Figures& figures) {
  std::istringstream reply(answer);
  std::string name;
  double seconds = 0, blocked = 0, waited = 0, fenced = 0;
  std::size_t read = 0;
  while (reply >> name >> seconds >> blocked >> waited >> fenced) {
    const auto found = python_names.find(name);
    if (found == python_names.end()) return false;
    figures.seconds[found->second].push_back(seconds);
    figures.blocked[found->second].push_back(blocked);
    figures.waited[found->second].push_back(waited);
    figures.fenced[found->second].push_back(fenced);
    ++read;
  }
  return read == python_names.size();
}

// Every figure of one state size; false when the DCP side was there but failed.
bool run_size(int layers, const fs::path& base, const std::string& python) {
  const fs::path dir = base / ("layers-" + std::to_string(layers));
  fs::create_directories(dir);
  const int threads = at::get_num_threads();
  Figures figures;
  bool dcp_failed = false;
  std::string dcp_configuration, python_torch;
  double guard_save = 0, step_time = 0;
  std::int64_t every = 1, state_bytes = 0;
  {
    State state(layers);
    state_bytes = state.bytes;
    // The synchronous save's time decides N; its guard then runs the synchronous loop.
    torchguard::CheckpointGuard synchronous(state.model, state.optimizer,
                                            guard_options(dir / "guard-synchronous", false, 0));
    synchronous.save();  // the first one: directories, files, page cache
    figures.bytes[guard_synchronous] = figures.bytes[guard_overlapped] =
        static_cast<double>(directory_bytes(synchronous.list().back().path));
    std::vector<double> saves, steps;
    for (int i = 0; i < 3; ++i) {
      ::sync();
      saves.push_back(seconds_of([&] { synchronous.save(); }));
    }
    for (int i = 0; i < 7; ++i) steps.push_back(seconds_of([&] { state.step(); }));
    guard_save = median(saves);
    step_time = median(steps);
    every = std::max<std::int64_t>(1, std::lround(4 * guard_save / step_time));
    synchronous.close(torchguard::Outcome::success);

    std::unique_ptr<PythonChild> peer;  // checkpoint_dcp.py serve
    if (!python.empty()) {
      peer = std::make_unique<PythonChild>(
          python, std::vector<std::string>{fs::path(TORCHGUARD_BENCH_DIR) / "checkpoint_dcp.py",
                                           "serve", std::to_string(layers), std::to_string(threads),
                                           std::to_string(every), (dir / "dcp").string()});
      // "ready <torch version> <state bytes> <checkpoint bytes> <configuration>"
      std::istringstream ready(peer->answer());
      std::string word;
      std::int64_t python_state = 0;
      double python_checkpoint = 0;
      if (ready >> word >> python_torch >> python_state >> python_checkpoint && word == "ready" &&
          python_state == state_bytes) {
        std::getline(ready >> std::ws, dcp_configuration);
        for (auto c : {dcp_save, dcp_async, dcp_staged}) figures.bytes[c] = python_checkpoint;
        figures.dcp = true;
      } else {
        std::printf("dcp  the Python side did not start (its state: %lld bytes, ours %lld)\n",
                    static_cast<long long>(python_state), static_cast<long long>(state_bytes));
        dcp_failed = true;
        peer.reset();
      }
    }

    std::array<std::unique_ptr<torchguard::CheckpointGuard>, 2> guards;
    for (const bool background : {false, true}) {
      const auto directory = dir / (background ? "guard-overlapped" : "guard-synchronous");
      auto& guard = guards[background ? 1 : 0];
      guard = std::make_unique<torchguard::CheckpointGuard>(
          state.model, state.optimizer, guard_options(directory, background, every));
      guard->save();  // the first one, untimed (the background writer's staging buffer)
      guard->wait();
      guard->set_step(every / 2);
    }
    auto guard_rounds = [&] {
      guard_round(state, nullptr, false, every, figures, guard_none);
      guard_round(state, guards[0].get(), false, every, figures, guard_synchronous);
      guard_round(state, guards[1].get(), true, every, figures, guard_overlapped);
    };
    auto python_round = [&](int round) {
      if (peer && !read_python_round(peer->request("round"), figures)) {
        std::printf("dcp  the Python side failed in round %d\n", round + 1);
        for (int c = dcp_none; c < contenders; ++c) figures.seconds[c].clear();
        figures.dcp = false;
        dcp_failed = true;
        peer.reset();
      }
    };
    // The sides take turns at going first: neither always follows the other's writes.
    for (int round = 0; round < rounds; ++round) {
      if (round % 2 == 0) {
        guard_rounds();
        python_round(round);
      } else {
        python_round(round);
        guard_rounds();
      }
    }
  }  // the state and the Python side are gone: the memory children have the machine to themselves

  const std::string self = fs::read_symlink("/proc/self/exe").string();
  for (const auto& [contender, mode] :
       {std::pair{guard_synchronous, "synchronous"}, std::pair{guard_overlapped, "overlapped"}}) {
    figures.memory[contender] =
        memory_multiple(quoted(self) + " --memory " + std::to_string(layers) + " " + mode + " " +
                        quoted((dir / ("memory-" + std::string(mode))).string()));
  }
  if (figures.dcp) {
    for (const auto& [name, contender] : python_names) {
      if (contender == dcp_none) continue;
      figures.memory[contender] = memory_multiple(
          quoted(python) + " " + quoted(fs::path(TORCHGUARD_BENCH_DIR) / "checkpoint_dcp.py") +
          " memory " + std::to_string(layers) + " " + std::to_string(threads) + " " + name + " " +
          quoted((dir / ("memory-" + name)).string()));
    }
  }
  fs::remove_all(dir);

  std::printf("\n%d layers: state %.0f MiB (the model and its SGD momentum)\n", layers,
              static_cast<double>(state_bytes) / mib);
  const char* both = figures.dcp ? " on both sides" : "";
  const char* spin = std::getenv("GOMP_SPINCOUNT");
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  std::printf(
      "setup  LibTorch %s; %d intra-op threads on %u hardware threads%s; OpenMP GOMP_SPINCOUNT=%s "
      "OMP_WAIT_POLICY=%s\n",
      TORCH_VERSION, threads, std::thread::hardware_concurrency(), both, spin ? spin : "(unset)",
      policy ? policy : "(unset)");
  if (figures.dcp) {
    std::printf("setup  DCP: torch %s (%s)\n", python_torch.c_str(), python.c_str());
    if (python_torch.rfind(
            std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + ".",
            0) != 0) {
      std::printf(
          "setup  note: another LibTorch than Python's torch: step times differ (the "
          "torch2 configuration runs the same on both sides); each loop is compared with its "
          "own\n");
    }
    std::printf("setup  DCP: %s\n", dcp_configuration.c_str());
  }
  std::printf(
      "setup  a step %.3f s (C++); a synchronous CheckpointGuard save %.3f s; a save every %lld "
      "steps%s; %lld steps a round, median of %d interleaved rounds\n",
      step_time, guard_save, static_cast<long long>(every), both, static_cast<long long>(2 * every),
      rounds);
  std::printf("loop  %-40s %8s %8s %10s %9s %12s\n", "contender", "steps/s", "of none", "blocked s",
              "MiB/save", "peak extra");
  std::array<double, contenders> throughput{}, fraction{}, blocked{};
  for (int c = 0; c < contenders; ++c) {
    if (figures.seconds[c].empty()) continue;
    // The fraction of the own side's loop without checkpoints: the median of each round's, whose
    // two loops ran minutes apart at most, whatever else the machine did meanwhile.
    const auto& none = figures.seconds[c >= dcp_none ? dcp_none : guard_none];
    std::vector<double> fractions;
    for (std::size_t r = 0; r < figures.seconds[c].size() && r < none.size(); ++r)
      fractions.push_back(none[r] / figures.seconds[c][r]);
    throughput[c] = static_cast<double>(2 * every) / median(figures.seconds[c]);
    fraction[c] = median(fractions);
    blocked[c] = median(figures.blocked[c]);
    std::printf("loop  %-40s %8.3f %8.3f", contender_names[c], throughput[c], fraction[c]);
    if (c == guard_none || c == dcp_none) {
      std::printf("\n");
      continue;
    }
    std::printf(" %10.4f %9.0f", blocked[c], figures.bytes[c] / mib);
    if (figures.memory[c]) {
      std::printf(" %10.2fx\n", *figures.memory[c]);
    } else {
      std::printf(" %11s\n", "failed");
    }
  }
  std::printf(
      "loop  (of none: the loop's throughput as a fraction of its own side's loop without "
      "checkpoints; blocked s: seconds the loop was blocked per save; peak extra: resident "
      "memory, a multiple of the state)\n");
  if (!figures.dcp) return !dcp_failed;
  std::printf(
      "loop  DCP's blocked seconds per save: waiting for the previous save + in the calls + "
      "at the fence:");
  for (const auto c : {dcp_save, dcp_async, dcp_staged}) {
    std::vector<double> calls;  // each round's rest
    for (std::size_t r = 0; r < figures.blocked[c].size(); ++r)
      calls.push_back(figures.blocked[c][r] - figures.waited[c][r] - figures.fenced[c][r]);
    std::printf("%s %s %.4f + %.4f + %.4f", c == dcp_save ? "" : ";", python_name(c),
                median(figures.waited[c]), median(calls), median(figures.fenced[c]));
  }
  std::printf("\n");
  auto ratio = [&](const char* what, double ours, double theirs) {
    std::printf("ratio %2d layers  %-70s %.3f\n", layers, what, theirs > 0 ? ours / theirs : 0.0);
  };
  ratio("blocked per save, CheckpointGuard overlapped / async_save:", blocked[guard_overlapped],
        blocked[dcp_async]);
  ratio("blocked per save, CheckpointGuard overlapped / async_save, copy on a thread:",
        blocked[guard_overlapped], blocked[dcp_staged]);
  ratio("blocked per save, CheckpointGuard synchronous / dcp.save:", blocked[guard_synchronous],
        blocked[dcp_save]);
  std::printf(
      "ratio %2d layers  loop throughput, of its own loop without checkpoints: CheckpointGuard "
      "overlapped %.3f, async_save %.3f, async_save with the copy on a thread %.3f, dcp.save "
      "%.3f; CheckpointGuard synchronous %.3f\n",
      layers, fraction[guard_overlapped], fraction[dcp_async], fraction[dcp_staged],
      fraction[dcp_save], fraction[guard_synchronous]);
  ratio("loop throughput fraction, CheckpointGuard overlapped / async_save:",
        fraction[guard_overlapped], fraction[dcp_async]);
  ratio("loop throughput fraction, overlapped / async_save, copy on a thread:",
        fraction[guard_overlapped], fraction[dcp_staged]);
  ratio("loop throughput fraction, CheckpointGuard synchronous / dcp.save:",
        fraction[guard_synchronous], fraction[dcp_save]);
  ratio("bytes written per save, CheckpointGuard / DCP:", figures.bytes[guard_overlapped],
        figures.bytes[dcp_async]);
  auto memory_of = [&](Contender c) { return figures.memory[c].value_or(0); };
  std::printf(
      "ratio %2d layers  peak extra memory per save, a multiple of the state: CheckpointGuard "
      "overlapped %.2f, synchronous %.2f; async_save %.2f, async_save with the copy on a thread "
      "%.2f, dcp.save %.2f\n",
      layers, memory_of(guard_overlapped), memory_of(guard_synchronous), memory_of(dcp_async),
      memory_of(dcp_staged), memory_of(dcp_save));
  std::fflush(stdout);
  return !dcp_failed;
}

}  // namespace

int main(int argc, char** argv) {
  // LibTorch's OpenMP (libgomp) keeps its idle threads spinning between parallel regions, unless
  // it manages more threads than there are CPUs: then it spins 1000 times at most (throttled).
  // DCP's staging thread runs parallel regions of its own, which throttles the Python process
  // for good; on a busy machine that alone made its loop 15-50% faster than the same loop here.
  // Both sides run throttled (GOMP_SPINCOUNT=1000, inherited by the children; read when libgomp
  // loads, hence the exec), unless the caller chose a policy.
  if (!std::getenv("GOMP_SPINCOUNT") && !std::getenv("OMP_WAIT_POLICY")) {
    ::setenv("GOMP_SPINCOUNT", "1000", 1);
    ::execv("/proc/self/exe", argv);  // on failure, go on as started
  }
  if (argc == 5 && std::string(argv[1]) == "--memory") {
    torchguard::set_default_logger(std::make_shared<spdlog::logger>("quiet"));
    return memory_figure(std::stoi(argv[2]), argv[3], argv[4]);
  }
  std::vector<int> sizes = {3, 12};
  std::string parent = "/tmp";
  for (int i = 1; i < argc; ++i) {
    const std::string argument = argv[i];
    if (argument == "--layers" && i + 1 < argc) {
      sizes.clear();
      std::stringstream list(argv[++i]);
      for (std::string item; std::getline(list, item, ',');) {
        const int layers = std::atoi(item.c_str());
        if (layers < 1) {
          std::fprintf(stderr, "bench_checkpoint_dcp: --layers takes counts >= 1: '%s'\n", argv[i]);
          return 2;
        }
        sizes.push_back(layers);
      }
    } else if (argument == "--rounds" && i + 1 < argc) {
      rounds = std::max(1, std::atoi(argv[++i]));
    } else if (argument.rfind("--", 0) != 0) {
      parent = argument;
    } else {
      std::fprintf(stderr,
                   "usage: bench_checkpoint_dcp [--layers 3,12] [--rounds 3] [directory]\n");
      return 2;
    }
  }
  ::signal(SIGPIPE, SIG_IGN);  // a Python that dies is an answer missing, not our death
  if (!std::getenv("BENCH_VERBOSE"))
    torchguard::set_default_logger(std::make_shared<spdlog::logger>("quiet"));
  std::string base_text = (fs::path(parent) / "bench-checkpoint-dcp-XXXXXX").string();
  if (::mkdtemp(base_text.data()) == nullptr) {
    std::fprintf(stderr, "bench_checkpoint_dcp: cannot create a directory in '%s'\n",
                 parent.c_str());
    return 1;
  }
  const fs::path base = base_text;

  std::string why;
  const std::string python = find_dcp_python(why);
  if (python.empty()) {
    std::printf(
        "dcp  skipped: no Python with torch.distributed.checkpoint's async_save (%s); "
        "scripts/setup.sh --torch2 makes one, $TORCHGUARD_PYTHON names another. The "
        "CheckpointGuard figures alone follow.\n",
        why.c_str());
  }
  bool ok = true;
  for (const int layers : sizes) ok = run_size(layers, base, python) && ok;
  fs::remove_all(base);
  return ok ? 0 : 1;
}
