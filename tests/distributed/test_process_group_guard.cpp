// distributed/process_group_guard.hpp (with its options.hpp and rendezvous.hpp): ranks started
// as torchrun starts them, training data-parallel, failing clearly and resuming together.
#include "torchguard/distributed.hpp"

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>
#include <torch/version.h>

#include "support.hpp"
#include "torchguard/checkpoint.hpp"

namespace fs = std::filesystem;
using torchguard::DistributedError;
using torchguard::ProcessGroupGuard;
using torchguard::ProcessGroupOptions;
using torchguard::testing::bitwise_equal;
using torchguard::testing::Contains;
using torchguard::testing::host_copies;
using torchguard::testing::read_text;
using torchguard::testing::spawn_test_child;
using torchguard::testing::TempDir;
using namespace std::chrono_literals;

namespace {

// A TCP port nobody listens on right now (the kernel's pick).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
  socklen_t length = sizeof address;
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0);
  ::close(fd);
  return ntohs(address.sin_port);
}

// A TCP server that lets clients connect and never answers them, as torchrun's agent of torch
// 2.1 or later does to the store client of LibTorch before 2.1: the kernel completes the
// connections, and nobody reads them. Never closed: LibTorch 1.13's client ends the process when
// its connection is reset (std::terminate in its own thread).
class SilentServer {
 public:
  SilentServer() {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd_ >= 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
    REQUIRE(::listen(fd_, 16) == 0);
    socklen_t length = sizeof address;
    REQUIRE(::getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &length) == 0);
    port_ = ntohs(address.sin_port);
  }
  SilentServer(const SilentServer&) = delete;
  SilentServer& operator=(const SilentServer&) = delete;
  int port() const { return port_; }

 private:
  int fd_ = -1;
  int port_ = 0;
};

// Sets environment variables for a scope, restoring the previous values.
class ScopedEnv {
 public:
  ScopedEnv(std::vector<std::pair<std::string, const char*>> values) {
    for (auto& [name, value] : values) {
      const char* old = std::getenv(name.c_str());
      saved_.emplace_back(name, old ? std::optional<std::string>(old) : std::nullopt);
      if (value) {
        ::setenv(name.c_str(), value, 1);
      } else {
        ::unsetenv(name.c_str());
      }
    }
  }
  ~ScopedEnv() {
    for (auto& [name, value] : saved_) {
      if (value) {
        ::setenv(name.c_str(), value->c_str(), 1);
      } else {
        ::unsetenv(name.c_str());
      }
    }
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

std::shared_ptr<spdlog::logger> quiet() { return std::make_shared<spdlog::logger>("quiet"); }

// The model and data every scenario trains: the same on every rank but for the data shard.
constexpr int kRowsPerRank = 8;
constexpr int kSteps = 12;

torch::nn::Sequential make_model(std::uint64_t seed) {
  torch::manual_seed(seed);
  return torch::nn::Sequential(torch::nn::Linear(6, 16), torch::nn::Tanh(),
                               torch::nn::Linear(16, 1));
}

// The global batch of a step: world_size * kRowsPerRank rows, a function of the step only.
std::pair<torch::Tensor, torch::Tensor> global_batch(std::int64_t step, int world_size) {
  auto generator = at::detail::createCPUGenerator(static_cast<std::uint64_t>(1000 + step));
  const auto x = torch::randn({world_size * kRowsPerRank, 6}, generator);
  const auto y = x.sum(1, true).sin();
  return {x, y};
}

struct Children {
  std::vector<pid_t> pids;
  // Waits for every child; returns their exit statuses (or 128 + signal).
  std::vector<int> wait_all() {
    std::vector<int> statuses;
    for (auto pid : pids) {
      int status = 0;
      REQUIRE(::waitpid(pid, &status, 0) == pid);
      statuses.push_back(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    }
    pids.clear();
    return statuses;
  }
  ~Children() {
    for (auto pid : pids) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
};

// Starts `world_size` ranks of the hidden child test with torchrun's variables.
Children start_ranks(int world_size, const std::string& scenario, const fs::path& dir, int port,
                     std::vector<std::string> extra = {}) {
  Children children;
  for (int rank = 0; rank < world_size; ++rank) {
    std::vector<std::string> env = {
        "RANK=" + std::to_string(rank),        "WORLD_SIZE=" + std::to_string(world_size),
        "LOCAL_RANK=" + std::to_string(rank),  "MASTER_ADDR=127.0.0.1",
        "MASTER_PORT=" + std::to_string(port), "TORCHGUARD_DIST_SCENARIO=" + scenario,
        "TORCHGUARD_DIST_DIR=" + dir.string(), "OMP_NUM_THREADS=1"};
    env.insert(env.end(), extra.begin(), extra.end());
    children.pids.push_back(spawn_test_child(
        "[.distributed_child]", env, (dir / ("rank-" + std::to_string(rank) + ".log")).string()));
  }
  return children;
}

std::string logs_of(const fs::path& dir, int world_size) {
  std::string text;
  for (int rank = 0; rank < world_size; ++rank) {
    text += "--- rank " + std::to_string(rank) + "\n" +
            read_text(dir / ("rank-" + std::to_string(rank) + ".log"));
  }
  return text;
}

// Trains kSteps (or up to TORCHGUARD_DIST_STEPS) data-parallel steps, checkpointing when asked.
void child_train(ProcessGroupGuard& group, const fs::path& dir, bool checkpoint) {
  // Ranks start from different weights on purpose: broadcast_parameters makes them rank 0's.
  auto model = make_model(100 + static_cast<std::uint64_t>(group.rank()));
  group.broadcast_parameters(*model);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  std::optional<torchguard::CheckpointGuard> guard;
  std::int64_t step = 0;
  const char* steps_text = std::getenv("TORCHGUARD_DIST_STEPS");
  const std::int64_t steps = steps_text ? std::atoll(steps_text) : kSteps;
  if (checkpoint) {
    torchguard::CheckpointOptions options;
    options.directory = dir / "checkpoints";
    options.every_n_steps = 1;
    options.keep_last = 2;
    options.logger = quiet();
    group.configure_checkpoints(options);
    guard.emplace(model, optimizer, options);
    step = guard->current_step();
    group.check_same(step, "the restored step");
    std::ofstream(dir / ("restored-" + std::to_string(group.rank()) + ".txt"), std::ios::app)
        << step << "\n";
  }
  for (; step < steps; ++step) {
    auto [x, y] = global_batch(step, group.world_size());
    const auto shard = x.slice(0, group.rank() * kRowsPerRank, (group.rank() + 1) * kRowsPerRank);
    const auto target = y.slice(0, group.rank() * kRowsPerRank, (group.rank() + 1) * kRowsPerRank);
    optimizer.zero_grad();
    torch::mse_loss(model->forward(shard), target).backward();
    group.allreduce_gradients(*model);
    optimizer.step();
    if (guard) {
      guard->step();
      std::this_thread::sleep_for(5ms);  // room for the test to kill us mid-run
    }
  }
  if (guard) guard->close(torchguard::Outcome::success);
  torch::save(host_copies(model->parameters()),
              (dir / ("params-" + std::to_string(group.rank()) + ".pt")).string());
}

std::vector<torch::Tensor> load_parameters(const fs::path& path) {
  std::vector<torch::Tensor> values;
  torch::load(values, path.string());
  return values;
}

}  // namespace

// Run in child processes by the tests below, one per rank.
TEST_CASE("distributed child: one rank of a scenario", "[.distributed_child]") {
  const char* scenario_text = std::getenv("TORCHGUARD_DIST_SCENARIO");
  if (!scenario_text) return;
  const std::string scenario = scenario_text;
  const fs::path dir = std::getenv("TORCHGUARD_DIST_DIR");
  const int rank = std::atoi(std::getenv("RANK"));
  ProcessGroupOptions options;
  options.timeout = 20s;
  options.logger = quiet();
  if (const char* file_store = std::getenv("TORCHGUARD_DIST_FILE_STORE")) {
    options.file_store = file_store;
  }
  try {
    ProcessGroupGuard group(options);
    if (scenario == "train") child_train(group, dir, false);
    if (scenario == "checkpoint") child_train(group, dir, true);
    if (scenario == "die") {
      group.barrier();
      if (rank == 1) ::_exit(7);  // a rank dies without a word
      auto model = make_model(1);
      torch::mse_loss(model->forward(torch::ones({2, 6})), torch::zeros({2, 1})).backward();
      const auto start = std::chrono::steady_clock::now();
      try {
        for (int i = 0; i < 1000; ++i) group.allreduce_gradients(*model);
        std::ofstream(dir / "error-0.txt") << "no error";
      } catch (const DistributedError& e) {
        const auto seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        std::ofstream(dir / "error-0.txt") << e.what() << "\nseconds " << seconds << "\n";
      }
    }
  } catch (const std::exception& e) {
    std::ofstream(dir / ("error-" + std::to_string(rank) + ".txt")) << e.what() << "\n";
    std::cout << "rank " << rank << ": " << e.what() << std::endl;
    ::_exit(3);
  }
}

TEST_CASE(
    "data-parallel training keeps the ranks identical and matches one process on the "
    "whole batch",
    "[distributed]") {
  for (int world_size : {2, 3}) {
    TempDir dir;
    auto children = start_ranks(world_size, "train", dir.path, free_port());
    const auto statuses = children.wait_all();
    INFO(logs_of(dir.path, world_size));
    for (int status : statuses) REQUIRE(status == 0);

    // One process, the concatenated batch, the same steps.
    auto model = make_model(100);  // rank 0's initial weights
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    for (std::int64_t step = 0; step < kSteps; ++step) {
      auto [x, y] = global_batch(step, world_size);
      optimizer.zero_grad();
      torch::mse_loss(model->forward(x), y).backward();
      optimizer.step();
    }
    const auto reference = host_copies(model->parameters());
    const auto rank0 = load_parameters(dir.path / "params-0.pt");
    for (int rank = 1; rank < world_size; ++rank) {
      CHECK(bitwise_equal(rank0,
                          load_parameters(dir.path / ("params-" + std::to_string(rank) + ".pt"))));
    }
    REQUIRE(rank0.size() == reference.size());
    for (std::size_t i = 0; i < reference.size(); ++i) {
      CHECK(torch::allclose(rank0[i], reference[i], 1e-5, 1e-6));
    }
  }
}

TEST_CASE("ranks meet through a FileStore instead of TCP", "[distributed]") {
  TempDir dir;
  auto children = start_ranks(2, "train", dir.path, free_port(),
                              {"TORCHGUARD_DIST_FILE_STORE=" + (dir.path / "store").string()});
  const auto statuses = children.wait_all();
  INFO(logs_of(dir.path, 2));
  REQUIRE(statuses == std::vector<int>{0, 0});
  CHECK(bitwise_equal(load_parameters(dir.path / "params-0.pt"),
                      load_parameters(dir.path / "params-1.pt")));
}

TEST_CASE("a rank that dies makes the others fail clearly within the timeout, not hang",
          "[distributed]") {
  TempDir dir;
  auto children = start_ranks(2, "die", dir.path, free_port());
  const auto statuses = children.wait_all();
  INFO(logs_of(dir.path, 2));
  CHECK(statuses[1] == 7);
  CHECK(statuses[0] == 0);
  const auto report = read_text(dir.path / "error-0.txt");
  CHECK_THAT(report, Contains("allreduce_gradients failed on rank 0 of 2"));
  const auto at = report.find("seconds ");
  REQUIRE(at != std::string::npos);
  CHECK(std::stod(report.substr(at + 8)) < 20.0);  // the collective's timeout
}

TEST_CASE(
    "every rank killed mid-run resumes from the same checkpoint and ends as an "
    "uninterrupted run",
    "[distributed][checkpoint]") {
  TempDir straight;
  {
    auto children =
        start_ranks(2, "checkpoint", straight.path, free_port(), {"TORCHGUARD_DIST_STEPS=60"});
    const auto statuses = children.wait_all();
    INFO(logs_of(straight.path, 2));
    REQUIRE(statuses == std::vector<int>{0, 0});
  }
  TempDir dir;
  {
    auto children =
        start_ranks(2, "checkpoint", dir.path, free_port(), {"TORCHGUARD_DIST_STEPS=60"});
    // Kill every rank once a few checkpoints are committed.
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    auto committed = [&] {
      std::error_code ignored;
      int count = 0;
      for (const auto& entry : fs::directory_iterator(dir.path / "checkpoints", ignored)) {
        count += entry.path().filename().string().rfind("ckpt-", 0) == 0;
      }
      return count;
    };
    while (committed() < 2 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(20ms);
    }
    std::this_thread::sleep_for(40ms);
    for (auto pid : children.pids) ::kill(pid, SIGKILL);
    const auto statuses = children.wait_all();
    INFO(logs_of(dir.path, 2));
    REQUIRE(statuses == std::vector<int>{128 + SIGKILL, 128 + SIGKILL});
  }
  auto children = start_ranks(2, "checkpoint", dir.path, free_port(), {"TORCHGUARD_DIST_STEPS=60"});
  const auto statuses = children.wait_all();
  INFO(logs_of(dir.path, 2));
  REQUIRE(statuses == std::vector<int>{0, 0});
  // Both ranks restored the same step, past the start, on the second run.
  const auto restored0 = read_text(dir.path / "restored-0.txt");
  const auto restored1 = read_text(dir.path / "restored-1.txt");
  CHECK(restored0 == restored1);
  const auto second_line = restored0.substr(restored0.find('\n') + 1);
  CHECK(std::stoll(second_line) > 0);
  const auto resumed = load_parameters(dir.path / "params-0.pt");
  CHECK(bitwise_equal(resumed, load_parameters(dir.path / "params-1.pt")));
  CHECK(bitwise_equal(resumed, load_parameters(straight.path / "params-0.pt")));
}

TEST_CASE("ProcessGroupGuard names a missing or invalid variable", "[distributed]") {
  ProcessGroupOptions options;
  options.logger = quiet();
  {
    ScopedEnv env({{"WORLD_SIZE", nullptr}, {"RANK", nullptr}});
    CHECK_THROWS_WITH(ProcessGroupGuard(options), Contains("WORLD_SIZE is not set"));
  }
  {
    ScopedEnv env({{"WORLD_SIZE", "2"}, {"RANK", nullptr}});
    CHECK_THROWS_WITH(ProcessGroupGuard(options), Contains("RANK is not set"));
  }
  {
    ScopedEnv env({{"WORLD_SIZE", "2"}, {"RANK", "one"}});
    CHECK_THROWS_WITH(ProcessGroupGuard(options), Contains("RANK='one' is not an integer"));
  }
  {
    ScopedEnv env({{"WORLD_SIZE", "2"}, {"RANK", "2"}});
    CHECK_THROWS_WITH(ProcessGroupGuard(options),
                      Contains("RANK 2 is out of range for WORLD_SIZE 2"));
  }
  {
    ScopedEnv env({{"WORLD_SIZE", "0"}, {"RANK", "0"}});
    CHECK_THROWS_WITH(ProcessGroupGuard(options), Contains("WORLD_SIZE must be at least 1"));
  }
  {
    ScopedEnv env({{"WORLD_SIZE", "2"}, {"RANK", "1"}, {"MASTER_ADDR", nullptr}});
    CHECK_THROWS_WITH(ProcessGroupGuard(options), Contains("MASTER_ADDR is not set"));
  }
  {
    ScopedEnv env({{"WORLD_SIZE", "2"},
                   {"RANK", "1"},
                   {"MASTER_ADDR", "127.0.0.1"},
                   {"MASTER_PORT", "70000"}});
    CHECK_THROWS_WITH(ProcessGroupGuard(options), Contains("MASTER_PORT 70000 is not a TCP port"));
  }
}

TEST_CASE("an unreachable master is an error within the timeout", "[distributed]") {
  ProcessGroupOptions options;
  options.logger = quiet();
  options.rank = 1;
  options.world_size = 2;
  options.master_addr = "127.0.0.1";
  options.master_port = free_port();  // nobody serves it
  options.timeout = 2s;
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(ProcessGroupGuard(options),
                    Contains("rank 1 could not reach the master at 127.0.0.1:"));
  CHECK(std::chrono::steady_clock::now() - start < 30s);
}

TEST_CASE("a store that never answers is an error within the timeout that names the likely cause",
          "[distributed]") {
  static SilentServer server;
  // As under torchrun, whose agent serves the store: every rank, rank 0 too, is a client.
  ScopedEnv env({{"TORCHELASTIC_USE_AGENT_STORE", "True"}, {"TORCHELASTIC_RESTART_COUNT", "0"}});
  ProcessGroupOptions options;
  options.logger = quiet();
  options.world_size = 2;
  options.master_addr = "127.0.0.1";
  options.master_port = server.port();
  options.timeout = 2s;
  for (const int rank : {0, 1}) {
    options.rank = rank;
    const auto start = std::chrono::steady_clock::now();
    std::string message;
    try {
      ProcessGroupGuard group(options);
    } catch (const DistributedError& e) {
      message = e.what();
    }
    const auto elapsed = std::chrono::steady_clock::now() - start;
    INFO(message);
    CHECK(elapsed < 2s + 2s + 2s);  // the timeout, the grace (here the timeout again), a margin
    CHECK_THAT(message, Contains("rank " + std::to_string(rank)) &&
                            Contains("127.0.0.1:" + std::to_string(server.port())) &&
                            Contains("within 2.00 s"));
#if TORCH_VERSION_MAJOR < 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 1)
    // LibTorch 1.13's client connects and then waits for its first answer without an end.
    CHECK_THAT(message, Contains("had no answer from the store") &&
                            Contains("claiming its rank (its first request to the store)") &&
                            Contains("a torchrun from torch 2.1 or later") &&
                            Contains("scripts/launch.sh") &&
                            Contains("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"));
#endif
  }
}

TEST_CASE("ranks that disagree on WORLD_SIZE fail at the rendezvous", "[distributed]") {
  TempDir dir;
  const int port = free_port();
  Children children;
  for (int rank = 0; rank < 2; ++rank) {
    children.pids.push_back(spawn_test_child(
        "[.distributed_child]",
        {"RANK=" + std::to_string(rank), std::string("WORLD_SIZE=") + (rank == 0 ? "2" : "3"),
         "MASTER_ADDR=127.0.0.1", "MASTER_PORT=" + std::to_string(port),
         "TORCHGUARD_DIST_SCENARIO=rendezvous", "TORCHGUARD_DIST_DIR=" + dir.path.string()},
        (dir.path / ("rank-" + std::to_string(rank) + ".log")).string()));
  }
  const auto statuses = children.wait_all();
  INFO(logs_of(dir.path, 2));
  CHECK(statuses == std::vector<int>{3, 3});
  CHECK_THAT(read_text(dir.path / "error-0.txt"),
             Contains("WORLD_SIZE differs between ranks: rank 1 has 3, rank 0 has 2"));
  CHECK_THAT(read_text(dir.path / "error-1.txt"),
             Contains("WORLD_SIZE differs between ranks: rank 0 has 2, rank 1 has 3"));
}

TEST_CASE("a group of one: collectives are identities, and teardown is clean", "[distributed]") {
  ProcessGroupOptions options;
  options.logger = quiet();
  options.rank = 0;
  options.world_size = 1;
  options.master_port = free_port();
  ProcessGroupGuard group(options);
  CHECK(group.rank() == 0);
  CHECK(group.world_size() == 1);
  CHECK(group.is_main());
  CHECK(group.device() == torch::Device(torch::kCPU));
  CHECK(std::string(group.backend_name()) == "gloo");
  group.barrier();
  std::vector<torch::Tensor> tensors{torch::full({3}, 2.0)};
  group.allreduce(tensors);
  CHECK(tensors[0].sum().item<double>() == 6.0);
  auto model = make_model(5);
  const auto before = host_copies(model->parameters());
  group.broadcast_parameters(*model);
  CHECK(bitwise_equal(before, host_copies(model->parameters())));
  group.check_same(42, "a value");
  CHECK_THROWS_WITH(group.broadcast_parameters(*model, 1), Contains("root 1 is not a rank"));
  group.close();
  CHECK_THROWS_WITH(group.barrier(), Contains("closed"));
}

TEST_CASE("a moved group keeps its checkpoint fence, and a destroyed one refuses it",
          "[distributed][contract]") {
  static_assert(torchguard::is_guard_v<ProcessGroupGuard>);
  ProcessGroupOptions options;
  options.logger = quiet();
  options.rank = 0;
  options.world_size = 1;
  options.master_port = free_port();
  torchguard::CheckpointOptions checkpoint_options;
  std::function<void()> fence;
  {
    ProcessGroupGuard first(options);
    first.configure_checkpoints(checkpoint_options);
    ProcessGroupGuard moved(std::move(first));
    CHECK(checkpoint_options.is_writer());
    checkpoint_options.after_save();            // the barrier of the group where it lives now
    first.close(torchguard::Outcome::success);  // a moved-from guard has nothing to close
    moved.close(torchguard::Outcome::failure);
    CHECK_THROWS_WITH(checkpoint_options.after_save(), Contains("closed"));
    fence = checkpoint_options.after_save;
  }
  CHECK_THROWS_WITH(fence(), Contains("the group is gone"));
}
