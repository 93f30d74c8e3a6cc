// Data-parallel training over ProcessGroupGuard (Gloo): samples per second of the Fashion-MNIST
// CNN with 1 process against 2 processes on this machine, the global batch the same (64).
// Each configuration gets the machine's cores: 1 process x 2 intra-op threads, 2 processes x 1.
//
//   bench_distributed [--steps N] [--repeats R]
// The program starts itself as the ranks (with torchrun's variables) and prints the medians.
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
  return 0;
}
