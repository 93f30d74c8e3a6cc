// Incremental checkpoints (CheckpointOptions::incremental) against full ones, in one run, on the
// same models: a fine-tuning model with 90% of its parameters frozen (a frozen stack of
// Linear(2048, 2048) and a trained head of two more: 320 MiB, under SGD without momentum, so
// that the optimizer holds no state of its own), and the same model with nothing frozen.
// Each round trains each model one step (not timed), then times a synchronous save of each
// model's state into two directories, one incremental and one not, and of the unfrozen model
// into a third one, not incremental: the noise of the measure (sync() before each, untimed: no
// save pays for another's writes; the order reverses from round to round). Prints the
// medians of the bytes each save wrote (its files but the linked ones, and its manifest) and of
// its time, their ratios, and what bounds an incremental save: a full save of the trained layers
// alone (a model of those two layers: the same files, a tenth of the bytes), and hashing the
// frozen parameters (incremental.hpp), the work it adds to that.
//   bench_checkpoint_incremental [directory]   (default: a new directory under /tmp)
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>
#include <nlohmann/json.hpp>
#include <torchguard/checkpoint.hpp>
#include <torchguard/checkpoint/incremental.hpp>

namespace fs = std::filesystem;

namespace {

constexpr int rounds = 11;
constexpr int layers = 20;  // of Linear(2048, 2048): 16 MiB each
constexpr int trained_layers = 2;

double median(std::vector<double> samples) {
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

// A model of `count` layers; the last `trained` train, the others are frozen.
struct Run {
  Run(int count, int trained) {
    torch::manual_seed(0);
    for (int i = 0; i < count; ++i) model->push_back(torch::nn::Linear(2048, 2048));
    std::vector<torch::Tensor> parameters;
    for (int i = 0; i < count; ++i) {
      for (auto& parameter : model[static_cast<std::size_t>(i)]->parameters()) {
        parameter.requires_grad_(i >= count - trained);
        if (parameter.requires_grad()) parameters.push_back(parameter);
      }
    }
    optimizer = std::make_unique<torch::optim::SGD>(parameters, torch::optim::SGDOptions(1e-4));
  }
  void train_step() {
    const auto batch = torch::randn({8, 2048});
    optimizer->zero_grad();
    torch::mse_loss(model->forward(batch), batch).backward();
    optimizer->step();
  }
  torch::nn::Sequential model;
  std::unique_ptr<torch::optim::SGD> optimizer;
};

// A guard saving `run` into `directory` on demand, and the figures of its saves.
struct Saver {
  Saver(Run& run, const fs::path& directory, bool incremental) {
    torchguard::CheckpointOptions options;
    options.directory = directory;
    options.incremental = incremental;
    options.keep_last = 2;
    options.save_on_exit = torchguard::SaveOnExit::never;
    guard = std::make_unique<torchguard::CheckpointGuard>(run.model, *run.optimizer, options);
  }
  void save() {
    ::sync();
    const auto start = std::chrono::steady_clock::now();
    guard->save();
    seconds.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    const fs::path newest = guard->list().back().path;
    std::ifstream in(newest / "manifest.json");
    std::stringstream text;
    text << in.rdbuf();
    double written = static_cast<double>(text.str().size());
    const auto manifest = nlohmann::json::parse(text.str());
    for (const auto& file : manifest.at("files")) {
      if (!file.contains("linked_from")) written += file.at("size").get<double>();
    }
    bytes.push_back(written);
  }
  std::unique_ptr<torchguard::CheckpointGuard> guard;
  std::vector<double> seconds, bytes;
};

double mib(double bytes) { return bytes / (1024.0 * 1024.0); }

}  // namespace

int main(int argc, char** argv) {
  std::string base_text = argc > 1 ? argv[1] : "/tmp/torchguard-bench-incremental-XXXXXX";
  if (argc <= 1 && ::mkdtemp(base_text.data()) == nullptr) return 1;
  const fs::path base = base_text;
  fs::create_directories(base);
  if (!std::getenv("BENCH_VERBOSE")) {
    torchguard::set_default_logger(std::make_shared<spdlog::logger>("quiet"));
  }

  Run frozen(layers, trained_layers), trained(layers, layers), head(trained_layers, trained_layers);
  Saver frozen_full(frozen, base / "frozen-full", false);
  Saver frozen_incremental(frozen, base / "frozen-incremental", true);
  Saver trained_full(trained, base / "trained-full", false);
  Saver trained_incremental(trained, base / "trained-incremental", true);
  Saver trained_again(trained, base / "trained-full-again", false);  // the measure's noise
  Saver head_full(head, base / "head-full", false);
  std::vector<Saver*> frozen_savers = {&frozen_full, &frozen_incremental, &head_full};
  std::vector<Saver*> trained_savers = {&trained_full, &trained_incremental, &trained_again};
  // A first save each, not counted: the first commit writes every file.
  for (auto* saver : {&frozen_full, &frozen_incremental, &trained_full, &trained_incremental,
                      &trained_again, &head_full}) {
    saver->save();
    saver->seconds.clear();
    saver->bytes.clear();
  }
  for (int round = 0; round < rounds; ++round) {
    head.train_step();
    for (auto* savers : {&frozen_savers, &trained_savers}) {
      (savers == &frozen_savers ? frozen : trained).train_step();
      if (round % 2) std::reverse(savers->begin(), savers->end());
      for (auto* saver : *savers) saver->save();
      if (round % 2) std::reverse(savers->begin(), savers->end());
    }
  }

  std::vector<double> hashing;
  std::vector<torchguard::detail::NamedTensor> frozen_parameters;
  for (const auto& item : frozen.model->named_parameters()) {
    if (!item.value().requires_grad()) frozen_parameters.push_back({item.key(), item.value()});
  }
  for (int round = 0; round < rounds; ++round) {
    const auto start = std::chrono::steady_clock::now();
    torchguard::detail::digests_of(frozen_parameters);
    hashing.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }

  std::int64_t state = 0, frozen_bytes = 0;
  for (const auto& parameter : frozen.model->parameters()) {
    state += parameter.nbytes();
    if (!parameter.requires_grad()) frozen_bytes += parameter.nbytes();
  }
  std::printf(
      "bench_checkpoint_incremental: %d layers Linear(2048, 2048), %.0f MiB of parameters; "
      "%d trained, %.0f%% frozen; SGD without momentum; %d rounds, medians; "
      "%u hardware threads\n",
      layers, mib(static_cast<double>(state)), trained_layers,
      100.0 * static_cast<double>(frozen_bytes) / static_cast<double>(state), rounds,
      std::thread::hardware_concurrency());
  auto report = [](const char* what, Saver& saver) {
    std::printf("  %-34s %8.1f MiB written per save, %7.3f s per save\n", what,
                mib(median(saver.bytes)), median(saver.seconds));
  };
  report("90% frozen, full:", frozen_full);
  report("90% frozen, incremental:", frozen_incremental);
  report("nothing frozen, full:", trained_full);
  report("nothing frozen, incremental:", trained_incremental);
  report("the 2 trained layers alone, full:", head_full);
  std::printf("  hashing the frozen parameters (%d threads): %.3f s per save\n",
              at::get_num_threads(), median(hashing));
  std::printf("ratio bytes incremental / full: %.3f\n",
              median(frozen_incremental.bytes) / median(frozen_full.bytes));
  std::printf("ratio save time full / incremental: %.2f\n",
              median(frozen_full.seconds) / median(frozen_incremental.seconds));
  std::printf("ratio incremental / the trained layers alone saved in full, time: %.2f\n",
              median(frozen_incremental.seconds) / median(head_full.seconds));
  std::printf("ratio nothing frozen incremental / full bytes: %.3f\n",
              median(trained_incremental.bytes) / median(trained_full.bytes));
  std::printf("ratio nothing frozen incremental / full time: %.2f\n",
              median(trained_incremental.seconds) / median(trained_full.seconds));
  std::printf("ratio nothing frozen full, a second directory / full time: %.2f (the noise)\n",
              median(trained_again.seconds) / median(trained_full.seconds));
  std::error_code ignored;
  if (argc <= 1) fs::remove_all(base, ignored);
  return 0;
}
