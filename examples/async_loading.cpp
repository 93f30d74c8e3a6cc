// Load three files concurrently, then run inference on them concurrently, then print: Python's
//   tensors = await asyncio.gather(*(load(p) for p in paths))
//   outputs = await asyncio.gather(*(infer(t) for t in tensors))
// with futures, a bound on concurrency, per-item timeouts and errors that name their input.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <future>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "torchguard/async.hpp"

namespace fs = std::filesystem;

torch::Tensor load(const std::string& path) {
  if (!fs::exists(path)) throw std::runtime_error("no such file: " + path);
  torch::Tensor tensor;
  torch::load(tensor, path);
  return tensor;
}

int run() {
  // Three input files, so the example runs anywhere.
  const auto dir = fs::temp_directory_path() / "torchguard-async-loading";
  fs::create_directories(dir);
  std::vector<std::string> paths;
  for (int i = 0; i < 3; ++i) {
    paths.push_back((dir / ("input-" + std::to_string(i) + ".pt")).string());
    torch::save(torch::randn({4, 16}) + i, paths.back());
  }
  torch::manual_seed(0);
  torch::nn::Linear model(16, 3);
  model->eval();

  // Load concurrently: at most 2 files at once, 5 s each at most.
  torchguard::GatherOptions options;
  options.max_in_flight = 2;
  options.item_timeout = std::chrono::seconds(5);
  auto tensors = torchguard::values(torchguard::gather(paths, load, options));

  // Infer concurrently: here with plain std::async futures, gathered in order.
  std::vector<std::future<torch::Tensor>> outputs;
  for (auto& tensor : tensors) {
    outputs.push_back(std::async(std::launch::async, [&model, tensor] {
      c10::InferenceMode inference;
      return model->forward(tensor).argmax(1);
    }));
  }
  const auto predictions = torchguard::gather(std::move(outputs));
  for (std::size_t i = 0; i < predictions.size(); ++i) {
    std::string classes;
    for (std::int64_t row = 0; row < predictions[i].size(0); ++row) {
      classes += (row ? " " : "") + std::to_string(predictions[i][row].item<std::int64_t>());
    }
    std::printf("%s -> classes %s\n", fs::path(paths[i]).filename().c_str(), classes.c_str());
  }

  // A missing file: the error leads with the load's own message, then names the file (its index
  // as a detail); with gather_settled the others still load.
  paths.push_back((dir / "missing.pt").string());
  try {
    torchguard::gather(paths, load, options);
  } catch (const torchguard::TaskError& error) {
    std::printf("gather failed as expected: %s\n", error.what());
  }
  for (auto& result : torchguard::gather_settled(paths, load, options)) {
    // cancelled(): the item's task threw Cancelled itself, not the file's fault (none here);
    // a cancel of options.cancellation throws Cancelled from gather_settled instead.
    std::printf("  item %zu: %s\n", result.index,
                result.ok() ? "loaded" : (result.cancelled() ? "cancelled" : "failed"));
  }
  fs::remove_all(dir);
  return 0;
}

// Errors end the program with "error: <message>" and status 1, never an abort.
int main() { return torchguard::exit_status(run); }
