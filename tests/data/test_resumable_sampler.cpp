// data/resumable_sampler.hpp: ResumableSampler's order, its state in a checkpoint, and a resumed
// epoch that goes on after the last batch the loop received.
#include "torchguard/data.hpp"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include "support.hpp"
#include "torchguard/checkpoint.hpp"

using torchguard::CheckpointGuard;
using torchguard::CheckpointOptions;
using torchguard::testing::CapturedLogger;
using torchguard::testing::Contains;
using torchguard::testing::TempDir;

namespace {

using torchguard::ResumableSampler;

// A dataset of its own indices: a batch lists the samples the loader read, and every read is
// recorded (the workers' copies share the record).
struct IndexDataset : torch::data::datasets::Dataset<IndexDataset, std::size_t> {
  struct Reads {
    std::mutex mutex;
    std::vector<std::size_t> indices;
  };
  explicit IndexDataset(std::size_t n) : count(n) {}
  std::size_t get(std::size_t index) override {
    std::lock_guard<std::mutex> lock(reads->mutex);
    reads->indices.push_back(index);
    return index;
  }
  c10::optional<std::size_t> size() const override { return count; }
  std::vector<std::size_t> read() const {
    std::lock_guard<std::mutex> lock(reads->mutex);
    return reads->indices;
  }
  std::size_t count;
  std::shared_ptr<Reads> reads = std::make_shared<Reads>();
};

auto index_loader(const IndexDataset& dataset, const ResumableSampler& sampler,
                  std::size_t batch_size, std::size_t workers) {
  return torch::data::make_data_loader(dataset, sampler,
                                       torch::data::DataLoaderOptions(batch_size).workers(workers));
}

// One epoch of the loop from where the sampler is, leaving it (as an interrupted run does) after
// `limit` batches; `body` runs on each batch. Returns the samples in the order received.
template <class Loader>
std::vector<std::size_t> run_epoch(Loader& loader, const ResumableSampler& sampler,
                                   std::size_t limit = SIZE_MAX,
                                   const std::function<void()>& body = {}) {
  std::vector<std::size_t> received;
  std::size_t batches = 0;
  for (auto& batch : torchguard::resume(*loader, sampler)) {
    received.insert(received.end(), batch.begin(), batch.end());
    CHECK(sampler.last_batch() == batch);  // what check_step() is given
    if (body) body();
    if (++batches == limit) break;
  }
  return received;
}

std::vector<std::size_t> tail(const std::vector<std::size_t>& all, std::size_t from) {
  return {all.begin() + static_cast<std::ptrdiff_t>(from), all.end()};
}

}  // namespace

TEST_CASE("a ResumableSampler's order is a function of the seed and the epoch alone", "[sampler]") {
  const auto order = ResumableSampler::permutation(1000, 7, 0);
  CHECK(order == ResumableSampler::permutation(1000, 7, 0));
  CHECK(order != ResumableSampler::permutation(1000, 7, 1));
  CHECK(order != ResumableSampler::permutation(1000, 8, 0));
  auto sorted = order;
  std::sort(sorted.begin(), sorted.end());
  std::vector<std::size_t> all(1000);
  std::iota(all.begin(), all.end(), std::size_t{0});
  CHECK(sorted == all);  // every index once
  // The same numbers with every standard library: std::seed_seq and std::mt19937_64 are
  // specified to the bit, the bounded draw is written out.
  CHECK(ResumableSampler::permutation(10, 0, 0) ==
        std::vector<std::size_t>{8, 2, 3, 5, 1, 6, 9, 7, 0, 4});
  CHECK(ResumableSampler::permutation(10, 42, 3) ==
        std::vector<std::size_t>{5, 1, 6, 2, 4, 3, 8, 7, 0, 9});

  CapturedLogger captured;  // used without a loader: it says that nothing is tracked
  ResumableSampler sampler(1000, {7, true, captured.logger});
  sampler.reset();
  std::vector<std::size_t> handed;
  while (auto batch = sampler.next(64)) handed.insert(handed.end(), batch->begin(), batch->end());
  CHECK(handed == order);
  // LibTorch's global RNG (dropout's) is never drawn from.
  torch::manual_seed(3);
  const auto expected = torch::randint(1 << 20, {4});
  torch::manual_seed(3);
  sampler.reset();
  sampler.next(64);
  CHECK(torch::equal(torch::randint(1 << 20, {4}), expected));
  CHECK(captured.sink->contains(spdlog::level::warn, "iterate with torchguard::resume"));

  ResumableSampler in_order(5, {0, /*shuffle=*/false});
  in_order.reset();
  CHECK(*in_order.next(3) == std::vector<std::size_t>{0, 1, 2});
  CHECK(*in_order.next(3) == std::vector<std::size_t>{3, 4});
  CHECK_FALSE(in_order.next(3).has_value());
}

TEST_CASE("copies of a ResumableSampler share one state", "[sampler]") {
  ResumableSampler kept(20, {1});
  ResumableSampler copy = kept;  // as make_data_loader takes it
  CHECK(kept.state().data_ptr() == copy.state().data_ptr());
  copy.reset();
  const auto first = *copy.next(5);
  const auto second = *kept.next(5);  // goes on where the copy was
  const auto order = ResumableSampler::permutation(20, 1, 0);
  CHECK(first == std::vector<std::size_t>(order.begin(), order.begin() + 5));
  CHECK(second == std::vector<std::size_t>(order.begin() + 5, order.begin() + 10));
  copy.state()[ResumableSampler::kEpoch] = 4;
  CHECK(kept.epoch() == 4);
}

TEST_CASE("a loader with workers goes on after the last batch the loop received, not fetched",
          "[sampler]") {
  CapturedLogger captured;
  torchguard::ResumableSamplerOptions options;
  options.seed = 5;
  options.logger = captured.logger;
  const auto epoch0 = ResumableSampler::permutation(103, 5, 0);
  const auto epoch1 = ResumableSampler::permutation(103, 5, 1);
  const std::size_t workers = GENERATE(0, 2);
  INFO("workers " << workers);

  // Interrupted after 4 batches: the loader has asked for more (2 * workers ahead).
  ResumableSampler first(103, options);
  torch::Tensor saved;
  {
    IndexDataset dataset(103);
    auto loader = index_loader(dataset, first, 10, workers);
    std::size_t batches = 0;
    const auto received = run_epoch(loader, first, 4, [&] {
      if (++batches < 4 || workers == 0) return;
      // The workers read ahead of the loop: samples fetched, never trained on.
      for (int i = 0; i < 5000 && dataset.read().size() <= 40; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      CHECK(dataset.read().size() > 40);
      CHECK(first.position() == 40);
    });
    CHECK(received == std::vector<std::size_t>(epoch0.begin(), epoch0.begin() + 40));
    saved = first.state().clone();
  }
  CHECK(first.epoch() == 0);
  CHECK(first.position() == 40);

  // A new process: a fresh sampler, the state restored into it, a new loader.
  ResumableSampler second(103, options);
  second.state().copy_(saved);
  CHECK(second.mid_epoch());
  IndexDataset dataset(103);
  auto loader = index_loader(dataset, second, 10, workers);
  CHECK(run_epoch(loader, second) == tail(epoch0, 40));  // the remaining batches, exactly
  const auto read = dataset.read();
  for (std::size_t i = 0; i < 40; ++i) {  // the samples before the position are not read
    CHECK(std::find(read.begin(), read.end(), epoch0[i]) == read.end());
  }
  CHECK(captured.sink->contains(spdlog::level::info, "epoch 0 goes on at sample 40 of 103"));
  CHECK(second.epoch() == 1);
  CHECK(second.position() == 0);
  CHECK(run_epoch(loader, second) == epoch1);
  CHECK(second.epoch() == 2);
}

TEST_CASE("a state saved in the body of an epoch's last batch resumes with an empty remainder",
          "[sampler]") {
  CapturedLogger captured;
  ResumableSampler first(30, {9, true, captured.logger});
  torch::Tensor saved;
  IndexDataset dataset(30);
  {
    auto loader = index_loader(dataset, first, 10, 2);
    run_epoch(loader, first, 3, [&] { saved = first.state().clone(); });
  }
  CHECK_FALSE(captured.sink->contains(spdlog::level::warn, ""));  // tracked: no warning
  ResumableSampler second(30, {9, true, captured.logger});
  second.state().copy_(saved);
  CHECK(second.epoch() == 0);  // the end-of-epoch work (evaluation, scheduler) still to run
  CHECK(second.position() == 30);
  auto loader = index_loader(dataset, second, 10, 2);
  CHECK(run_epoch(loader, second).empty());
  CHECK(captured.sink->contains(spdlog::level::info, "epoch 0 has no batch left"));
  CHECK(second.epoch() == 1);
  CHECK(run_epoch(loader, second) == ResumableSampler::permutation(30, 9, 1));
}

TEST_CASE("CheckpointGuard saves the sampler's position and restores it before the loop",
          "[sampler][checkpoint]") {
  TempDir dir;
  CapturedLogger captured;
  torch::nn::Linear model(1, 1);
  const auto order = ResumableSampler::permutation(95, 3, 0);
  auto options_for = [&](const ResumableSampler& sampler) {
    CheckpointOptions options;
    options.directory = dir.path / "checkpoints";
    options.every_n_steps = 3;
    options.save_on_exit = torchguard::SaveOnExit::never;  // as a kill -9 would leave it
    options.tensors["sampler"] = sampler.state();
    options.logger = captured.logger;
    return options;
  };
  {
    ResumableSampler sampler(95, {3, true, captured.logger});
    torchguard::CheckpointGuard guard(model, options_for(sampler));
    IndexDataset dataset(95);
    auto loader = index_loader(dataset, sampler, 10, 2);
    // Five steps; the checkpoint of step 3, taken in the body, counts that batch as done.
    run_epoch(loader, sampler, 5, [&] { guard.step(); });
    CHECK(sampler.position() == 50);
  }
  ResumableSampler sampler(95, {3, true, captured.logger});
  torchguard::CheckpointGuard guard(model, options_for(sampler));
  REQUIRE(guard.resumed());
  CHECK(guard.current_step() == 3);
  CHECK(sampler.epoch() == 0);
  CHECK(sampler.position() == 30);  // restored in place, before any loader begins
  IndexDataset dataset(95);
  auto loader = index_loader(dataset, sampler, 10, 2);
  CHECK(run_epoch(loader, sampler) == tail(order, 30));
}

TEST_CASE("a ResumableSampler refuses a state or a loader that is not its own", "[sampler]") {
  CapturedLogger captured;
  ResumableSampler other(100, {1, true, captured.logger});
  other.state()[ResumableSampler::kConsumed] = 40;
  SECTION("another size or seed") {
    ResumableSampler smaller(50, {1});
    smaller.state().copy_(other.state());
    CHECK_THROWS_AS(smaller.epoch(), torchguard::OptionsError);
    CHECK_THROWS_WITH(smaller.epoch(), Contains("over 100 samples (seed 1, shuffled), this one is "
                                                "over 50 samples (seed 1, shuffled)"));
    CHECK_THROWS_AS(smaller.reset(), torchguard::OptionsError);
    ResumableSampler reseeded(100, {2});
    reseeded.state().copy_(other.state());
    CHECK_THROWS_WITH(reseeded.position(), Contains("seed 1"));
    ResumableSampler in_order(100, {1, false});
    in_order.state().copy_(other.state());
    CHECK_THROWS_WITH(in_order.position(), Contains("in order"));
  }
  SECTION("through LibTorch's archive") {
    torch::serialize::OutputArchive out;
    other.save(out);
    std::ostringstream bytes;
    out.save_to(bytes);
    ResumableSampler same(100, {1});
    torch::serialize::InputArchive in;
    std::istringstream read_back(bytes.str());
    in.load_from(read_back);
    same.load(in);
    CHECK(same.position() == 40);
    ResumableSampler smaller(50, {1});
    CHECK_THROWS_AS(smaller.load(in), torchguard::OptionsError);
    CHECK(smaller.position() == 0);  // left as it was
  }
  SECTION("a loader built with another sampler, or one that reorders") {
    IndexDataset dataset(100);
    auto loader = index_loader(dataset, other, 10, 2);
    ResumableSampler mine(100, {1});
    CHECK_THROWS_WITH(run_epoch(loader, mine), Contains("did not reset this sampler"));
    auto unordered = torch::data::make_data_loader(
        dataset, mine, torch::data::DataLoaderOptions(10).workers(2).enforce_ordering(false));
    CHECK_THROWS_WITH(torchguard::resume(*unordered, mine), Contains("enforce_ordering"));
  }
}
