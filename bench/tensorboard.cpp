// What a training step pays to put its metrics in TensorBoard: log_metrics() with three scalars,
// against the same call writing metrics.jsonl only, and TensorBoardWriter alone against the tool a
// PyTorch user has, torch.utils.tensorboard's SummaryWriter (three add_scalar calls per step, run
// by the venv of scripts/setup.sh --torch2 when it is there; its writes are queued for a thread
// and flushed every 120 s, ours reach the file before each call returns).
//
//   bench_tensorboard [--steps N] [--rounds R]    (defaults: 20000, 5)
// Rounds alternate between the variants; medians of ns per step are printed with the ratios.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include <torchguard/session.hpp>

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

torchguard::Metrics step_metrics(long step) {
  return {{"loss", 1.0 / static_cast<double>(step + 1)}, {"accuracy", 0.5}, {"lr", 0.001}};
}

// ns per step of log_metrics on a session with these files.
double session_round(const fs::path& dir, bool jsonl, bool board, long steps) {
  fs::remove_all(dir);
  torchguard::TrainingSessionOptions options;
  options.logger = std::make_shared<spdlog::logger>("quiet");  // no sinks
  if (jsonl) options.metrics_file = dir / "metrics.jsonl";
  if (board) options.tensorboard_dir = dir;
  torchguard::TrainingSession session("bench", options);
  const auto start = Clock::now();
  for (long step = 0; step < steps; ++step) session.log_metrics(step, step_metrics(step));
  return std::chrono::duration<double, std::nano>(Clock::now() - start).count() /
         static_cast<double>(steps);
}

double writer_round(const fs::path& dir, long steps) {
  fs::remove_all(dir);
  torchguard::TensorBoardWriter board(dir);
  const auto start = Clock::now();
  for (long step = 0; step < steps; ++step) board.add_scalars(step, step_metrics(step));
  board.flush();
  return std::chrono::duration<double, std::nano>(Clock::now() - start).count() /
         static_cast<double>(steps);
}

// SummaryWriter's ns per step, or a negative number when there is no Python with torch and
// tensorboard.
double summary_writer_round(const fs::path& dir, long steps) {
  const char* venv = std::getenv("TORCHGUARD_TORCH2_VENV");
  const std::string python = std::string(venv ? venv : "/opt/torchguard-venv") + "/bin/python";
  if (!fs::exists(python)) return -1;
  fs::remove_all(dir);
  const std::string script =
      "import sys, time\n"
      "from torch.utils.tensorboard import SummaryWriter\n"
      "w = SummaryWriter(sys.argv[1]); n = int(sys.argv[2])\n"
      "start = time.perf_counter()\n"
      "for i in range(n):\n"
      "    w.add_scalar('loss', 1.0 / (i + 1), i); w.add_scalar('accuracy', 0.5, i)\n"
      "    w.add_scalar('lr', 0.001, i)\n"
      "w.flush()\n"
      "print((time.perf_counter() - start) / n * 1e9)\n";
  const std::string command = python + " -c \"" + script + "\" '" + dir.string() + "' " +
                              std::to_string(steps) + " 2>/dev/null";
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) return -1;
  double ns = -1;
  if (std::fscanf(pipe, "%lf", &ns) != 1) ns = -1;
  ::pclose(pipe);
  return ns;
}

}  // namespace

int main(int argc, char** argv) {
  long steps = 20000;
  int rounds = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--steps") == 0) steps = std::atol(argv[i + 1]);
    if (std::strcmp(argv[i], "--rounds") == 0) rounds = std::atoi(argv[i + 1]);
  }
  const fs::path dir =
      fs::temp_directory_path() / ("bench-tensorboard-" + std::to_string(getpid()));
  std::vector<double> none, jsonl, both, writer, peer;
  for (int round = 0; round < rounds; ++round) {
    none.push_back(session_round(dir, false, false, steps));
    jsonl.push_back(session_round(dir, true, false, steps));
    both.push_back(session_round(dir, true, true, steps));
    writer.push_back(writer_round(dir, steps));
    if (const double ns = summary_writer_round(dir, steps); ns > 0) peer.push_back(ns);
  }
  fs::remove_all(dir);
  std::printf("log_metrics, 3 scalars, %ld steps, median of %d rounds (ns per step):\n", steps,
              rounds);
  std::printf("  no files                          %8.0f\n", median(none));
  std::printf("  metrics.jsonl                     %8.0f\n", median(jsonl));
  std::printf("  metrics.jsonl + TensorBoard       %8.0f  (%.2fx metrics.jsonl alone)\n",
              median(both), median(both) / median(jsonl));
  std::printf("TensorBoardWriter::add_scalars      %8.0f\n", median(writer));
  if (peer.empty()) {
    std::printf(
        "SummaryWriter: no Python with torch and tensorboard (scripts/setup.sh --torch2)\n");
  } else {
    std::printf("SummaryWriter, 3 add_scalar calls   %8.0f  (%.0fx TensorBoardWriter's time)\n",
                median(peer), median(peer) / median(writer));
  }
}
