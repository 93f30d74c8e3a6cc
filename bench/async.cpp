// Prefetcher against LibTorch's torch::data DataLoader, sequential loading and the bound; and
// BatchedInference against one-by-one model calls.
//
// Loading: N items whose load waits L (I/O latency: fixed 20 ms, or heavy-tailed with 10% of the
// items at 100 ms), consumed by a loop that computes C = 5 ms per item, with k loaders. The bound
// is N * max(mean L / k, C): k loads at once cannot go faster, nor can the compute. Printed: each
// peer's time, its fraction of the bound, and DataLoader time / Prefetcher time (medians); and the
// in-order floor, the least time any loader yielding in input order can take with k loaders.
//
// Inference: c closed-loop callers (1, 8, 64) each send requests one at a time to an MLP;
// throughput and p50/p99 latency of BatchedInference against each caller running the model itself.
//
//   bench_async [--items N] [--repeats R] [--requests M] [--skip-inference] [--skip-loading]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include "inference.hpp"
#include "torchguard/async.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using Milliseconds = std::chrono::duration<double, std::milli>;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const auto n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// Compute on the consumer's thread: a busy loop, as a training step keeps a core busy.
void compute_for(Milliseconds duration) {
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(duration);
  while (Clock::now() < until) {
  }
}

torch::Tensor load_item(std::size_t index, Milliseconds latency) {
  std::this_thread::sleep_for(latency);
  return torch::full({1, 28, 28}, static_cast<double>(index));
}

// The same items for every peer: one latency per item.
struct SlowDataset : torch::data::datasets::Dataset<SlowDataset> {
  explicit SlowDataset(const std::vector<Milliseconds>* latencies) : latencies(latencies) {}
  torch::data::Example<> get(std::size_t index) override {
    return {load_item(index, (*latencies)[index]), torch::tensor(static_cast<std::int64_t>(index))};
  }
  torch::optional<std::size_t> size() const override { return latencies->size(); }
  const std::vector<Milliseconds>* latencies;
};

const Milliseconds kCompute{5.0};

double run_sequential(const std::vector<Milliseconds>& latencies) {
  const auto start = Clock::now();
  for (std::size_t i = 0; i < latencies.size(); ++i) {
    auto item = load_item(i, latencies[i]);
    compute_for(kCompute);
  }
  return seconds_since(start);
}

// The least time any loader that yields in input order can take with k loaders: each loader
// starts the lowest item not yet started as soon as it is free (no window), and the consumer
// computes each item once it is loaded. A slow item among the first ones delays everything after
// it, so with the heavy tail this floor lies above the bound.
double in_order_floor(const std::vector<Milliseconds>& latencies, std::size_t loaders) {
  std::vector<double> free_at(loaders, 0.0);
  double consumer = 0.0;
  for (const auto latency : latencies) {
    auto loader = std::min_element(free_at.begin(), free_at.end());
    *loader += latency.count();
    consumer = std::max(consumer, *loader) + kCompute.count();
  }
  return consumer / 1e3;
}

double run_prefetcher(const std::vector<Milliseconds>& latencies, std::size_t loaders,
                      std::size_t depth, torchguard::Order order) {
  const auto start = Clock::now();
  torchguard::PrefetchOptions options;
  options.workers = loaders;
  options.depth = depth;
  options.order = order;
  torchguard::Prefetcher<torch::Tensor> items(
      latencies.size(), [&](std::size_t i) { return load_item(i, latencies[i]); }, options);
  std::size_t seen = 0;
  for (auto& item : items) {
    (void)item;
    compute_for(kCompute);
    ++seen;
  }
  if (seen != latencies.size()) std::abort();
  return seconds_since(start);
}

double run_data_loader(const std::vector<Milliseconds>& latencies, std::size_t loaders) {
  const auto start = Clock::now();
  auto loader = torch::data::make_data_loader<torch::data::samplers::SequentialSampler>(
      SlowDataset(&latencies), torch::data::DataLoaderOptions().batch_size(1).workers(loaders));
  std::size_t seen = 0;
  for (auto& batch : *loader) {
    seen += batch.size();
    compute_for(kCompute);
  }
  if (seen != latencies.size()) std::abort();
  return seconds_since(start);
}

void bench_loading(std::size_t items, int repeats) {
  std::printf("== loading: %zu items, compute %.0f ms per item, medians of %d runs ==\n", items,
              kCompute.count(), repeats);
  std::vector<Milliseconds> fixed(items, Milliseconds(20.0));
  std::vector<Milliseconds> heavy(items, Milliseconds(20.0));
  std::mt19937 random(7);
  std::bernoulli_distribution slow(0.10);
  for (auto& latency : heavy) {
    if (slow(random)) latency = Milliseconds(100.0);
  }
  struct Case {
    const char* name;
    const std::vector<Milliseconds>* latencies;
  };
  for (const Case& dataset : {Case{"fixed 20 ms", &fixed}, Case{"heavy tail", &heavy}}) {
    double mean_latency = 0;
    for (auto latency : *dataset.latencies) mean_latency += latency.count();
    mean_latency /= static_cast<double>(items);
    const double sequential = run_sequential(*dataset.latencies);
    for (std::size_t k : {std::size_t{4}, std::size_t{8}}) {
      const double bound = static_cast<double>(items) *
                           std::max(mean_latency / static_cast<double>(k), kCompute.count()) / 1e3;
      std::vector<double> ordered_2k, ordered_4k, completion_4k, loader;
      for (int r = 0; r < repeats; ++r) {
        ordered_2k.push_back(
            run_prefetcher(*dataset.latencies, k, 2 * k, torchguard::Order::input));
        ordered_4k.push_back(
            run_prefetcher(*dataset.latencies, k, 4 * k, torchguard::Order::input));
        completion_4k.push_back(
            run_prefetcher(*dataset.latencies, k, 4 * k, torchguard::Order::completion));
        loader.push_back(run_data_loader(*dataset.latencies, k));
      }
      auto row = [&](const char* peer, double time) {
        std::printf("  %-12s k=%zu  %-34s %7.3f s  %.3f of bound\n", dataset.name, k, peer, time,
                    bound / time);
      };
      std::printf("  %-12s k=%zu  bound N*max(mean L/k, C) = %.3f s (mean L %.1f ms)\n",
                  dataset.name, k, bound, mean_latency);
      row("sequential", sequential);
      row("torch::data DataLoader (workers k)", median(loader));
      row("Prefetcher ordered, depth 2k", median(ordered_2k));
      row("Prefetcher ordered, depth 4k", median(ordered_4k));
      row("Prefetcher completion, depth 4k", median(completion_4k));
      std::printf(
          "  %-12s k=%zu  DataLoader time / Prefetcher time: ordered 2k %.2fx, ordered 4k "
          "%.2fx, completion %.2fx\n",
          dataset.name, k, median(loader) / median(ordered_2k), median(loader) / median(ordered_4k),
          median(loader) / median(completion_4k));
      const double floor = in_order_floor(*dataset.latencies, k);
      std::printf(
          "  %-12s k=%zu  in-order floor (k loaders, no window) = %.3f s (%.3f of bound); "
          "Prefetcher ordered: 2k %.3f, 4k %.3f of the floor\n",
          dataset.name, k, floor, bound / floor, floor / median(ordered_2k),
          floor / median(ordered_4k));
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t items = 200;
  int repeats = 3;
  int requests = 2048;
  bool loading = true;
  bool inference = true;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--items" && i + 1 < argc) {
      items = std::strtoul(argv[++i], nullptr, 10);
    } else if (arg == "--repeats" && i + 1 < argc) {
      repeats = std::atoi(argv[++i]);
    } else if (arg == "--requests" && i + 1 < argc) {
      requests = std::atoi(argv[++i]);
    } else if (arg == "--skip-inference") {
      inference = false;
    } else if (arg == "--skip-loading") {
      loading = false;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--items N] [--repeats R] [--requests M] [--skip-inference] "
                   "[--skip-loading]\n",
                   argv[0]);
      return 2;
    }
  }
  if (items == 0 || repeats < 1 || requests < 1) {
    std::fprintf(stderr, "items, repeats and requests must be positive\n");
    return 2;
  }
  std::printf("intra-op threads %d, hardware threads %u\n", at::get_num_threads(),
              std::thread::hardware_concurrency());
  if (loading) bench_loading(items, repeats);
  if (inference) torchguard_bench::bench_inference(requests, torch::Device(torch::kCPU));
  return 0;
}
