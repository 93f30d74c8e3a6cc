// Data-parallel training over ProcessGroupGuard (Gloo): samples per second of the Fashion-MNIST
// CNN with 1 process against 2 processes on this machine, the global batch the same (64).
// Each configuration gets the machine's cores: 1 process x 2 intra-op threads, 2 processes x 1.
//
// Then the cost of an elastic restart under PyTorch's torchrun (--max_restarts=1, the torch2 venv
// of scripts/setup.sh, or $TORCHGUARD_TORCHRUN): two ranks train with a CheckpointGuard, rank 1
// dies by SIGKILL between two checkpoints, torchrun starts both again and they resume. Measured:
// seconds from the death to the first step trained again, against the seconds from the launch to
// the first step of the same job (a fresh start), and the steps lost.
//
//   bench_distributed [--steps N] [--repeats R]
// The program starts itself as the ranks (with torchrun's variables) and prints the medians.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>
#include <torch/version.h>
#include <torchguard/checkpoint.hpp>
#include <torchguard/distributed.hpp>

#include "fashion_mnist_model.hpp"

namespace {

using Clock = std::chrono::steady_clock;

// One rank: synthetic images (the dataset's shape), warm up, then time `steps` steps.
int run_rank(std::int64_t batch, int steps, const std::string& report) {
  torchguard::ProcessGroupOptions options;
  options.logger = std::make_shared<spdlog::logger>("quiet");
  torchguard::ProcessGroupGuard group(options);
  torch::manual_seed(0);
  fashion_mnist::Net model;
  group.broadcast_parameters(*model);
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-3));
  const auto images = torch::randn({batch, 1, 28, 28});
  const auto labels = torch::randint(0, 10, {batch});
  auto step = [&] {
    optimizer.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(images), labels).backward();
    group.allreduce_gradients(*model);
    optimizer.step();
  };
  for (int i = 0; i < 5; ++i) step();
  group.barrier();
  const auto start = Clock::now();
  for (int i = 0; i < steps; ++i) step();
  group.barrier();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (group.is_main()) {
    std::ofstream(report) << static_cast<double>(batch * group.world_size() * steps) / seconds;
  }
  return 0;
}

std::int64_t now_ns() {  // CLOCK_MONOTONIC: one clock for every process of this machine
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

// The restart job's settings: steps in all, a checkpoint every kEvery, rank 1 dies at kKillAt.
constexpr std::int64_t kRestartSteps = 100;
constexpr std::int64_t kEvery = 20;
constexpr std::int64_t kKillAt = 50;

// One rank of the restart job (started by torchrun). Rank 0 records "<attempt> <event> <step>
// <ns>" lines in <dir>/events; rank 1 of the first attempt kills itself at step kKillAt.
int run_restart_rank(const std::filesystem::path& dir) {
  const char* restart = std::getenv("TORCHELASTIC_RESTART_COUNT");
  const int attempt = restart ? std::atoi(restart) : 0;
  const int rank = std::atoi(std::getenv("RANK"));
  std::ofstream events;
  if (rank == 0) events.open(dir / "events", std::ios::app);
  const auto record = [&](const char* event, std::int64_t step) {
    if (rank == 0) events << attempt << ' ' << event << ' ' << step << ' ' << now_ns() << std::endl;
  };
  at::set_num_threads(1);
  const auto quiet = std::make_shared<spdlog::logger>("quiet");
  torchguard::ProcessGroupOptions group_options;
  group_options.logger = quiet;
  group_options.timeout = std::chrono::seconds(30);
  torchguard::ProcessGroupGuard group(group_options);
  torch::manual_seed(0);
  fashion_mnist::Net model;
  group.broadcast_parameters(*model);
  auto optimizer =
      std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(1e-3));
  torchguard::CheckpointOptions options;
  options.directory = dir / "checkpoints";
  options.every_n_steps = kEvery;
  options.logger = quiet;
  group.configure_checkpoints(options);
  torchguard::CheckpointGuard checkpoint(model, optimizer, options);
  record("resumed", checkpoint.current_step());
  const auto images = torch::randn({32, 1, 28, 28});
  const auto labels = torch::randint(0, 10, {32});
  while (checkpoint.current_step() < kRestartSteps) {
    if (attempt == 0 && rank == 1 && checkpoint.current_step() == kKillAt) {
      std::ofstream(dir / "death") << now_ns() << std::endl;
      ::raise(SIGKILL);
    }
    optimizer->zero_grad();
    torch::nn::functional::cross_entropy(model->forward(images), labels).backward();
    group.allreduce_gradients(*model);
    optimizer->step();
    checkpoint.step();
    record("step", checkpoint.current_step());
  }
  checkpoint.close(torchguard::Outcome::success);
  return 0;
}

struct RestartFigures {
  double fresh_s = 0;     // launch -> first step of the first attempt
  double restart_s = 0;   // rank 1's death -> first step of the second attempt
  std::int64_t lost = 0;  // steps trained before the death and trained again
};

// Runs the restart job once under torchrun; false with a message when it could not.
bool run_restart_job(const std::string& torchrun, RestartFigures& figures) {
  const std::string exe = std::filesystem::read_symlink("/proc/self/exe").string();
  const auto dir = std::filesystem::temp_directory_path() /
                   ("torchguard-bench-restart-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::vector<std::string> env_strings;
  for (char** e = ::environ; *e; ++e) env_strings.emplace_back(*e);
  env_strings.push_back("BENCH_RESTART_DIR=" + dir.string());
#if TORCH_VERSION_MAJOR < 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 1)
  // LibTorch before 2.1 cannot talk to the agent's store: the ranks serve their own.
  env_strings.push_back("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1");
#endif
  std::vector<char*> envp;
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::vector<std::string> args = {torchrun,           "--standalone", "--nproc_per_node=2",
                                   "--max_restarts=1", "--no_python",  exe};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  const std::string log = (dir / "torchrun.log").string();
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  const auto launched = now_ns();
  pid_t pid = 0;
  const int spawned =
      ::posix_spawn(&pid, torchrun.c_str(), &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  int status = 0;
  if (spawned != 0 || ::waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) ||
      WEXITSTATUS(status) != 0) {
    std::fprintf(stderr, "the restart job failed (status %d); its output is in %s\n", status,
                 log.c_str());
    return false;
  }
  std::int64_t death = 0;
  std::ifstream(dir / "death") >> death;
  std::int64_t first[2] = {0, 0}, resumed_from = -1;
  std::ifstream events(dir / "events");
  int attempt = 0;
  std::string event;
  std::int64_t step = 0, ns = 0;
  while (events >> attempt >> event >> step >> ns) {
    if (attempt > 1) continue;
    if (event == "step" && first[attempt] == 0) first[attempt] = ns;
    if (event == "resumed" && attempt == 1) resumed_from = step;
  }
  if (death == 0 || first[0] == 0 || first[1] == 0 || resumed_from < 0) {
    std::fprintf(stderr, "the restart job left no record of its restart in %s\n", dir.c_str());
    return false;
  }
  figures.fresh_s = static_cast<double>(first[0] - launched) * 1e-9;
  figures.restart_s = static_cast<double>(first[1] - death) * 1e-9;
  figures.lost = kKillAt - resumed_from;
  std::filesystem::remove_all(dir);
  return true;
}

// torchrun: $TORCHGUARD_TORCHRUN, else the torch2 venv's; empty when neither is there.
std::string find_torchrun() {
  const char* const candidates[] = {std::getenv("TORCHGUARD_TORCHRUN"),
                                    "/opt/torchguard-venv/bin/torchrun"};
  for (const char* candidate : candidates) {
    if (candidate && *candidate && ::access(candidate, X_OK) == 0) return candidate;
  }
  return {};
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const auto n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// Starts `processes` ranks of this program; returns rank 0's samples per second.
double run_job(int processes, int threads, int steps, int port) {
  const std::string exe = std::filesystem::read_symlink("/proc/self/exe").string();
  const std::string report = (std::filesystem::temp_directory_path() /
                              ("torchguard-bench-distributed-" + std::to_string(::getpid())))
                                 .string();
  std::vector<pid_t> pids;
  for (int rank = 0; rank < processes; ++rank) {
    std::vector<std::string> env_strings;
    for (char** e = ::environ; *e; ++e) env_strings.emplace_back(*e);
    env_strings.push_back("RANK=" + std::to_string(rank));
    env_strings.push_back("WORLD_SIZE=" + std::to_string(processes));
    env_strings.push_back("MASTER_ADDR=127.0.0.1");
    env_strings.push_back("MASTER_PORT=" + std::to_string(port));
    env_strings.push_back("OMP_NUM_THREADS=" + std::to_string(threads));
    env_strings.push_back("BENCH_REPORT=" + report);
    env_strings.push_back("BENCH_BATCH=" + std::to_string(64 / processes));
    env_strings.push_back("BENCH_STEPS=" + std::to_string(steps));
    std::vector<char*> envp;
    for (auto& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);
    std::string arg0 = exe;
    char* argv[] = {arg0.data(), nullptr};
    pid_t pid = 0;
    if (::posix_spawn(&pid, exe.c_str(), nullptr, nullptr, argv, envp.data()) != 0) {
      std::perror("posix_spawn");
      std::exit(1);
    }
    pids.push_back(pid);
  }
  for (auto pid : pids) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      std::fprintf(stderr, "a rank failed (status %d)\n", status);
      std::exit(1);
    }
  }
  double samples_per_second = 0;
  std::ifstream(report) >> samples_per_second;
  std::filesystem::remove(report);
  return samples_per_second;
}

}  // namespace

int main(int argc, char** argv) {
  if (const char* dir = std::getenv("BENCH_RESTART_DIR")) return run_restart_rank(dir);
  if (const char* report = std::getenv("BENCH_REPORT")) {
    at::set_num_threads(std::atoi(std::getenv("OMP_NUM_THREADS")));
    return run_rank(std::atoll(std::getenv("BENCH_BATCH")), std::atoi(std::getenv("BENCH_STEPS")),
                    report);
  }
  int steps = 60;
  int repeats = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--steps" && i + 1 < argc) {
      steps = std::atoi(argv[++i]);
    } else if (arg == "--repeats" && i + 1 < argc) {
      repeats = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--steps N] [--repeats R]\n", argv[0]);
      return 2;
    }
  }
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::printf("Fashion-MNIST CNN, global batch 64, %d timed steps, medians of %d runs, %d cores\n",
              steps, repeats, cores);
  std::vector<double> one, two;
  int port = 20000 + static_cast<int>(::getpid() % 20000);
  for (int r = 0; r < repeats; ++r) {
    one.push_back(run_job(1, cores, steps, port++));
    two.push_back(run_job(2, std::max(1, cores / 2), steps, port++));
  }
  std::printf("  1 process  x %d threads: %8.0f samples/s\n", cores, median(one));
  std::printf("  2 processes x %d thread%s: %7.0f samples/s\n", std::max(1, cores / 2),
              cores / 2 > 1 ? "s" : "", median(two));
  std::printf("  2 processes / 1 process: %.2fx\n", median(two) / median(one));

  const auto torchrun = find_torchrun();
  if (torchrun.empty()) {
    std::printf("restart cost: skipped (no torchrun: scripts/setup.sh --torch2 installs one)\n");
    return 0;
  }
  std::printf(
      "elastic restart under %s --max_restarts=1: 2 ranks, %lld steps, a checkpoint every %lld, "
      "rank 1 killed at step %lld; medians of %d runs\n",
      torchrun.c_str(), static_cast<long long>(kRestartSteps), static_cast<long long>(kEvery),
      static_cast<long long>(kKillAt), repeats);
  std::vector<double> fresh, restart, lost;
  for (int r = 0; r < repeats; ++r) {
    RestartFigures figures;
    if (!run_restart_job(torchrun, figures)) return 1;
    fresh.push_back(figures.fresh_s);
    restart.push_back(figures.restart_s);
    lost.push_back(static_cast<double>(figures.lost));
  }
  std::printf("  fresh start, launch to first step:   %6.2f s\n", median(fresh));
  std::printf("  restart, death to first step again:  %6.2f s\n", median(restart));
  std::printf("  ratio restart / fresh start: %.2f\n", median(restart) / median(fresh));
  std::printf("  steps lost (trained again): %.0f of a checkpoint interval of %lld\n", median(lost),
              static_cast<long long>(kEvery));
  return 0;
}
