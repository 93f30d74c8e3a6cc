// ResumableSampler: a torch::data sampler whose place in the epoch is a tensor a checkpoint
// saves, so a resumed run goes on at the next batch of the epoch it was in, without reading (or
// training on) the batches before it again.
//
//   torchguard::ResumableSampler sampler(dataset.size().value(), {/*seed=*/1});
//   auto loader = torch::data::make_data_loader(std::move(dataset), sampler,
//                                               torch::data::DataLoaderOptions(64).workers(2));
//   checkpoint_options.samplers["train"] = sampler;  // saved, restored; the guard's epoch is its
//   torchguard::CheckpointGuard checkpoint(model, optimizer, checkpoint_options);
//   for (auto epoch = sampler.epoch(); epoch < epochs; ++epoch) {
//     for (auto& batch : torchguard::resume(*loader, sampler)) {
//       ... one training step ...
//       if (checkpoint.step().stop) return;   // the batch counts as trained in this checkpoint
//     }
//     ... end of the epoch: evaluate, scheduler.step() ...
//   }
//
// The order of epoch e is a function of (seed, e) alone: a Fisher-Yates shuffle driven by
// std::mt19937_64 seeded with std::seed_seq{seed, e}, both specified to the bit by the standard,
// so it is the same with every standard library, and it never draws from LibTorch's global RNG
// (LibTorch's RandomSampler draws a torch::randperm from it at every reset, which moves the RNG
// that dropout and the rest of training use).
//
// What counts is what the loop has received, not what the loader has asked for: with workers,
// a LibTorch loader asks its sampler for max_jobs batches (2 * workers by default) ahead of the
// loop, so a sampler's own index is ahead of training. next() queues the size of each batch it
// hands out; torchguard::resume() pops one when the loop body receives a batch (the iterator's
// dereference) and adds it to the epoch's count, and when the loader ends, moves the state to
// the next epoch at 0. So:
//  - a checkpoint taken in the body after the step (CheckpointGuard::step()) counts the batch
//    as trained, and a resumed run goes on at the next one;
//  - a body that leaves before training the batch it received (a stop checked at its top, an
//    exception with SaveOnExit::always) saves that batch as trained: check the stop after the
//    step, and save on success only (SaveOnExit::on_success);
//  - a checkpoint taken in the body of an epoch's last batch resumes in that epoch, with no
//    batch left: the loop ends at once and the end-of-epoch work (evaluation, a scheduler step)
//    still runs;
//  - the loader must deliver batches in the order it asked for them: enforce_ordering true (the
//    default; resume() refuses a loader with workers without it).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <iterator>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "torchguard/core/error.hpp"
#include "torchguard/core/logging.hpp"

namespace torchguard {

struct ResumableSamplerOptions {
  std::uint64_t seed = 0;                            // epoch e's order depends on (seed, e) only
  bool shuffle = true;                               // false: 0, 1, 2, ... in every epoch
  std::shared_ptr<spdlog::logger> logger = nullptr;  // says where a resumed epoch goes on
};

template <class Loader>
class ResumedBatches;

// A Sampler<> for LibTorch's data loaders (make_data_loader(dataset, sampler, options)). Copies
// share one state: the copy the loader holds and the one the program keeps agree. Not
// thread-safe: the loader calls it on the thread that iterates it, which is the loop's.
class ResumableSampler : public torch::data::samplers::Sampler<> {
 public:
  using Options = ResumableSamplerOptions;

  // What state() holds, by index.
  enum Field : std::int64_t { kEpoch, kConsumed, kSize, kSeed, kShuffle, kFields };

  explicit ResumableSampler(std::size_t size, Options options = {})
      : s_(std::make_shared<Shared>(size, std::move(options))) {}

  // Starts the epoch state() names, at the sample it names: a fresh epoch at 0, an interrupted
  // one where the loop stopped (the samples before are neither shuffled out again nor read). The
  // loader's begin() calls it. Throws OptionsError when state() is not this sampler's (another
  // dataset size, seed or shuffle: a checkpoint of another run) or when `new_size` differs from
  // the size (it is fixed: the order and the position depend on it).
  void reset(c10::optional<std::size_t> new_size = c10::nullopt) override {
    Shared& s = *s_;
    if (new_size && *new_size != s.size) {
      throw OptionsError(fmt::format(
          "ResumableSampler: reset to {} samples: the size is fixed at construction ({})",
          *new_size, s.size));
    }
    s.check_state();
    if (s.handed_batches > 0 && s.received_batches == 0 && !s.untracked_warned) {
      s.untracked_warned = true;
      s.logger()->warn(
          "ResumableSampler: the loop received none of the batches handed out since the last "
          "reset: iterate with torchguard::resume(loader, sampler), or the position and the "
          "epoch are not tracked (every epoch repeats epoch {})",
          s.at(kEpoch));
    }
    const std::int64_t epoch = s.at(kEpoch);
    const auto consumed = static_cast<std::size_t>(s.at(kConsumed));
    s.cursor = consumed;
    s.handed_out.clear();
    s.handed_batches = 0;
    s.received_batches = 0;
    s.order = s.epoch_order(epoch);
    ++s.resets;
    if (consumed == s.order.size() && consumed > 0) {
      s.logger()->info(
          "ResumableSampler: epoch {} has no batch left (all {} samples trained): it ends at once",
          epoch, s.order.size());
    } else if (consumed > 0) {
      s.logger()->info(
          "ResumableSampler: epoch {} goes on at sample {} of {} (the {} before are not read "
          "again)",
          epoch, consumed, s.order.size(), consumed);
    }
  }

  // The next `batch_size` indices of the epoch (fewer at its end), nothing once it is exhausted.
  c10::optional<std::vector<std::size_t>> next(std::size_t batch_size) override {
    Shared& s = *s_;
    if (batch_size == 0) throw OptionsError("ResumableSampler: next() with a batch size of 0");
    if (s.resets == 0) reset();  // used without a loader
    if (s.cursor >= s.order.size()) return c10::nullopt;
    const std::size_t count = std::min(batch_size, s.order.size() - s.cursor);
    std::vector<std::size_t> indices(
        s.order.begin() + static_cast<std::ptrdiff_t>(s.cursor),
        s.order.begin() + static_cast<std::ptrdiff_t>(s.cursor + count));
    s.cursor += count;
    s.handed_out.push_back(count);
    ++s.handed_batches;
    return indices;
  }

  // LibTorch's archive interface (torch::save(sampler, ...)): the state() tensor.
  void save(torch::serialize::OutputArchive& archive) const override {
    archive.write(archive_key, s_->state.clone());
  }
  void load(torch::serialize::InputArchive& archive) override {
    torch::Tensor stored;
    archive.read(archive_key, stored);
    if (!stored.defined() || stored.dim() != 1 || stored.numel() != kFields) {
      throw OptionsError(fmt::format(
          "ResumableSampler: the archive's state has shape {}, a ResumableSampler's is [{}]",
          stored.defined() ? c10::str(stored.sizes()) : std::string("(undefined)"),
          static_cast<std::int64_t>(kFields)));
    }
    const torch::Tensor previous = s_->state.clone();
    s_->state.copy_(stored);
    try {
      s_->check_state();
    } catch (...) {
      s_->state.copy_(previous);
      throw;
    }
  }

  // The position for CheckpointOptions::samplers (a Stateful): {"epoch", "consumed", "size",
  // "seed", "shuffle"}. The guard saves it in the manifest and restores it before the loop.
  nlohmann::json checkpoint_state() const {
    s_->check_state();
    return {{"epoch", s_->at(kEpoch)},
            {"consumed", s_->at(kConsumed)},
            {"size", s_->at(kSize)},
            {"seed", static_cast<std::uint64_t>(s_->at(kSeed))},
            {"shuffle", s_->at(kShuffle) != 0},
            {"skip", s_->skipped}};
  }
  // Why `state` is not a position of this sampler ("" when it is).
  std::string check_checkpoint_state(const nlohmann::json& state) const {
    auto field = [&](const char* name) -> const nlohmann::json* {
      const auto it = state.is_object() ? state.find(name) : state.end();
      return it == state.end() ? nullptr : &*it;
    };
    const auto *epoch = field("epoch"), *consumed = field("consumed"), *size = field("size"),
               *seed = field("seed"), *shuffle = field("shuffle");
    if (!epoch || !consumed || !size || !seed || !shuffle || !epoch->is_number_integer() ||
        !consumed->is_number_integer() || !size->is_number_integer() ||
        !seed->is_number_integer() ||
        (!seed->is_number_unsigned() && seed->get<std::int64_t>() < 0) || !shuffle->is_boolean()) {
      return fmt::format("the saved state {} is not a ResumableSampler's", state.dump());
    }
    const auto stored_seed = seed->get<std::uint64_t>();
    if (size->get<std::int64_t>() != static_cast<std::int64_t>(s_->size) ||
        stored_seed != s_->options.seed || shuffle->get<bool>() != s_->options.shuffle) {
      return fmt::format(
          "the saved state is of a sampler over {} samples (seed {}, {}), this one is over {} "
          "samples (seed {}, {}): going on from it would skip or repeat samples; use the same "
          "dataset and seed, or another checkpoint directory",
          size->get<std::int64_t>(), stored_seed, shuffle->get<bool>() ? "shuffled" : "in order",
          s_->size, s_->options.seed, s_->options.shuffle ? "shuffled" : "in order");
    }
    std::size_t skipped = 0;
    if (const auto* skip = field("skip")) {  // states from before the skip list have none
      if (!skip->is_array() ||
          !std::all_of(skip->begin(), skip->end(), [&](const nlohmann::json& index) {
            return index.is_number_unsigned() && index.get<std::uint64_t>() < s_->size;
          })) {
        return fmt::format("the saved skip list {} is not a list of sample indices below {}",
                           skip->dump(), s_->size);
      }
      skipped = skip->size();
    }
    if (epoch->get<std::int64_t>() < 0 || consumed->get<std::int64_t>() < 0 ||
        consumed->get<std::int64_t>() > static_cast<std::int64_t>(s_->size - skipped)) {
      return fmt::format("the saved state says epoch {}, {} samples done, of {}: not a position",
                         epoch->get<std::int64_t>(), consumed->get<std::int64_t>(),
                         s_->size - skipped);
    }
    return {};
  }
  // Puts the position back (the next begin() goes on there). Throws OptionsError for a state
  // that is not this sampler's.
  void load_checkpoint_state(const nlohmann::json& state) {
    if (const std::string problem = check_checkpoint_state(state); !problem.empty()) {
      throw OptionsError(fmt::format("ResumableSampler: {}", problem));
    }
    s_->at(kEpoch) = state.at("epoch").get<std::int64_t>();
    s_->at(kConsumed) = state.at("consumed").get<std::int64_t>();
    s_->skipped = state.value("skip", std::vector<std::size_t>());
    std::sort(s_->skipped.begin(), s_->skipped.end());
    s_->skipped.erase(std::unique(s_->skipped.begin(), s_->skipped.end()), s_->skipped.end());
    if (s_->resets > 0) s_->order = s_->epoch_order(s_->at(kEpoch));
  }

  // Leaves the samples `indices` (dataset indices) out of the rest of this epoch and of every
  // later one: a batch that made a step go wrong (CheckpointGuard's recovery). The order is the
  // same with them taken out; a checkpoint keeps the list. Returns how many were not left out
  // already. Throws OptionsError for an index past the dataset.
  std::size_t skip(const std::vector<std::size_t>& indices) {
    Shared& s = *s_;
    s.check_state();
    std::vector<std::size_t> added;
    for (const std::size_t index : indices) {
      if (index >= s.size) {
        throw OptionsError(
            fmt::format("ResumableSampler: skip({}) of a dataset of {} samples", index, s.size));
      }
      if (!std::binary_search(s.skipped.begin(), s.skipped.end(), index)) added.push_back(index);
    }
    std::sort(added.begin(), added.end());
    added.erase(std::unique(added.begin(), added.end()), added.end());
    if (added.empty()) return 0;
    // Those already trained in this epoch no longer count in its position.
    const auto order = s.epoch_order(s.at(kEpoch));
    const auto consumed = static_cast<std::size_t>(s.at(kConsumed));
    std::int64_t trained = 0;
    for (std::size_t i = 0; i < consumed; ++i) {
      trained += std::binary_search(added.begin(), added.end(), order[i]) ? 1 : 0;
    }
    s.at(kConsumed) -= trained;
    std::vector<std::size_t> all;
    std::merge(s.skipped.begin(), s.skipped.end(), added.begin(), added.end(),
               std::back_inserter(all));
    s.skipped = std::move(all);
    if (s.resets > 0) s.order = s.epoch_order(s.at(kEpoch));
    return added.size();
  }
  // The dataset indices of the batch the loop received last through torchguard::resume(): what
  // CheckpointGuard::check_step() is given, so that a step that goes wrong skips its batch.
  const std::vector<std::size_t>& last_batch() const noexcept { return s_->last_batch; }
  // The samples left out (sorted dataset indices).
  const std::vector<std::size_t>& skipped() const noexcept { return s_->skipped; }
  // The samples of an epoch: the dataset's size less the skipped ones.
  std::size_t epoch_size() const noexcept { return s_->size - s_->skipped.size(); }

  // For a loop that assembles its own batches (a torchguard::Prefetcher, several processes each
  // taking a share) instead of iterating a LibTorch loader with torchguard::resume():
  //   the epoch's indices not trained yet, in order (all of them in a fresh epoch);
  std::vector<std::size_t> remaining() const {
    Shared& s = *s_;
    s.check_state();
    const auto order = s.epoch_order(s.at(kEpoch));
    return std::vector<std::size_t>(order.begin() + static_cast<std::ptrdiff_t>(s.at(kConsumed)),
                                    order.end());
  }

  //   the loop trained `count` more of them (call it before the step's checkpoint);
  void consume(std::size_t count) {
    Shared& s = *s_;
    s.check_state();
    const std::size_t length = s.size - s.skipped.size();
    const std::size_t left = length - static_cast<std::size_t>(s.at(kConsumed));
    if (count > left) {
      throw OptionsError(
          fmt::format("ResumableSampler: consume({}) with {} of {} samples of epoch {} left", count,
                      left, length, s.at(kEpoch)));
    }
    s.at(kConsumed) += static_cast<std::int64_t>(count);
  }

  //   the loop is done with the epoch (a last partial batch left out, too): the next one begins.
  void next_epoch() { finish_epoch(); }

  // The position as an int64 tensor of kFields values {epoch, consumed, size, seed, shuffle},
  // updated in place as the loop receives batches (CheckpointOptions::tensors restores it in
  // place, as earlier versions did; CheckpointOptions::samplers is the way now). Do not resize
  // it.
  torch::Tensor state() const noexcept { return s_->state; }

  // The epoch the loop is in, or starts at its next begin() (0-based; it advances when the
  // loader ends an epoch inside torchguard::resume()).
  std::int64_t epoch() const {
    s_->check_state();
    return s_->at(kEpoch);
  }
  // The samples of that epoch the loop has received (trained), where its next begin() goes on.
  std::size_t position() const {
    s_->check_state();
    return static_cast<std::size_t>(s_->at(kConsumed));
  }
  // True when the next begin() goes on inside an epoch (a resumed run).
  bool mid_epoch() const { return position() > 0; }
  std::size_t size() const noexcept { return s_->size; }
  const Options& options() const noexcept { return s_->options; }

  // Epoch `epoch`'s order of the indices 0 .. size-1 with `seed`: Fisher-Yates over
  // std::mt19937_64 seeded with std::seed_seq{seed, epoch}, unbiased bounded draws.
  static std::vector<std::size_t> permutation(std::size_t size, std::uint64_t seed,
                                              std::int64_t epoch) {
    std::vector<std::size_t> order(size);
    std::iota(order.begin(), order.end(), std::size_t{0});
    const auto e = static_cast<std::uint64_t>(epoch);
    std::seed_seq sequence{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32),
                           static_cast<std::uint32_t>(e), static_cast<std::uint32_t>(e >> 32)};
    std::mt19937_64 engine(sequence);
    for (std::size_t i = size; i > 1; --i) {
      const auto j = static_cast<std::size_t>(below(engine, i));
      std::swap(order[i - 1], order[j]);
    }
    return order;
  }

 private:
  template <class Loader>
  friend class ResumedBatches;

  static constexpr const char* archive_key = "torchguard_resumable_sampler";

  // A uniform draw from [0, bound): rejection of the 2^64 mod bound lowest values.
  static std::uint64_t below(std::mt19937_64& engine, std::uint64_t bound) {
    const std::uint64_t threshold = (std::uint64_t{0} - bound) % bound;
    for (;;) {
      const std::uint64_t draw = engine();
      if (draw >= threshold) return draw % bound;
    }
  }

  struct Shared {
    Shared(std::size_t n, Options o)
        : size(n), options(std::move(o)), state(torch::zeros({kFields}, torch::kInt64)) {
      at(kSize) = static_cast<std::int64_t>(size);
      at(kSeed) = static_cast<std::int64_t>(options.seed);  // the bits, read back as unsigned
      at(kShuffle) = options.shuffle ? 1 : 0;
    }

    // The options' logger, or the default one at the time of the line (a session's, when open).
    std::shared_ptr<spdlog::logger> logger() const { return detail::or_default(options.logger); }

    std::int64_t& at(Field field) const { return state.data_ptr<std::int64_t>()[field]; }

    // Epoch `epoch`'s order without the skipped samples.
    std::vector<std::size_t> epoch_order(std::int64_t epoch) const {
      std::vector<std::size_t> order;
      if (options.shuffle) {
        order = permutation(size, options.seed, epoch);
      } else {
        order.resize(size);
        std::iota(order.begin(), order.end(), std::size_t{0});
      }
      if (!skipped.empty()) {
        order.erase(std::remove_if(order.begin(), order.end(),
                                   [&](std::size_t index) {
                                     return std::binary_search(skipped.begin(), skipped.end(),
                                                               index);
                                   }),
                    order.end());
      }
      return order;
    }

    // Throws OptionsError when the state (restored from a checkpoint) is not this sampler's.
    void check_state() const {
      if (!state.defined() || state.scalar_type() != torch::kInt64 || state.numel() != kFields ||
          !state.is_contiguous() || !state.device().is_cpu()) {
        throw OptionsError(
            "ResumableSampler: its state() tensor was replaced or resized; it must stay the "
            "CPU int64 tensor of 5 values it was built with");
      }
      const auto stored_seed = static_cast<std::uint64_t>(at(kSeed));
      const bool stored_shuffle = at(kShuffle) != 0;
      if (at(kSize) != static_cast<std::int64_t>(size) || stored_seed != options.seed ||
          stored_shuffle != options.shuffle) {
        throw OptionsError(fmt::format(
            "ResumableSampler: the restored state is of a sampler over {} samples (seed {}, {}), "
            "this one is over {} samples (seed {}, {}): going on from it would skip or repeat "
            "samples; use the same dataset and seed, or another checkpoint directory",
            at(kSize), stored_seed, stored_shuffle ? "shuffled" : "in order", size, options.seed,
            options.shuffle ? "shuffled" : "in order"));
      }
      if (at(kEpoch) < 0 || at(kConsumed) < 0 ||
          at(kConsumed) > static_cast<std::int64_t>(size - skipped.size())) {
        throw OptionsError(fmt::format(
            "ResumableSampler: the restored state says epoch {}, {} samples done, of {}: not a "
            "position",
            at(kEpoch), at(kConsumed), size));
      }
    }

    const std::size_t size;
    const Options options;
    torch::Tensor state;                  // {epoch, consumed, size, seed, shuffle}
    std::vector<std::size_t> skipped;     // left out of every epoch (sorted)
    std::vector<std::size_t> order;       // this epoch's, without the skipped
    std::size_t cursor = 0;               // the next sample handed out (ahead of the loop)
    std::deque<std::size_t> handed_out;   // sizes of batches handed out, not yet received
    std::vector<std::size_t> last_batch;  // the indices of the batch received last
    std::uint64_t resets = 0;
    std::uint64_t handed_batches = 0;  // since the last reset
    std::uint64_t received_batches = 0;
    bool untracked_warned = false;
  };

  // torchguard::resume(): the loop has received a batch of the oldest size handed out.
  void receive(std::size_t delivered) {
    Shared& s = *s_;
    if (s.handed_out.empty()) {
      throw OptionsError(
          "torchguard::resume: the loader delivered a batch this sampler did not hand out: "
          "build the loader with this ResumableSampler (or a copy of it)");
    }
    const std::size_t count = s.handed_out.front();
    if (delivered != 0 && delivered != count) {
      throw OptionsError(fmt::format(
          "torchguard::resume: the loader delivered a batch of {} samples where the sampler's "
          "oldest was {}: the loader does not deliver batches in the order it asked for them",
          delivered, count));
    }
    s.handed_out.pop_front();
    ++s.received_batches;
    const auto begin = s.order.begin() + s.at(kConsumed);
    s.last_batch.assign(begin, begin + static_cast<std::ptrdiff_t>(count));
    s.at(kConsumed) += static_cast<std::int64_t>(count);
  }

  // torchguard::resume(): the loader ended the epoch; the next begin() starts the next one.
  void finish_epoch() {
    Shared& s = *s_;
    s.at(kEpoch) += 1;
    s.at(kConsumed) = 0;
    s.handed_out.clear();
    s.received_batches = s.handed_batches;  // tracked
  }

  std::uint64_t resets() const noexcept { return s_->resets; }

  std::shared_ptr<Shared> s_;
};

namespace detail {

// The number of examples in a batch when its type says so (a std::vector of examples), else 0.
template <class Batch>
std::size_t examples_in(const Batch&) {
  return 0;
}
template <class T, class A>
std::size_t examples_in(const std::vector<T, A>& batch) {
  return batch.size();
}

}  // namespace detail

// The batches of a LibTorch data loader built with a ResumableSampler, counted as the loop
// receives them (see torchguard::resume()). An input range; its iterators point into it.
template <class Loader>
class ResumedBatches {
  using Inner = decltype(std::declval<Loader&>().begin());

 public:
  using Batch = typename Inner::value_type;

  class iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using value_type = Batch;
    using difference_type = std::ptrdiff_t;
    using pointer = Batch*;
    using reference = Batch&;

    // The batch, counted as received the first time it is read.
    Batch& operator*() {
      Batch& batch = *inner_;
      if (!received_) {
        owner_->sampler_.receive(detail::examples_in(batch));
        received_ = true;
      }
      return batch;
    }
    Batch* operator->() { return &**this; }
    iterator& operator++() {
      ++inner_;
      received_ = false;
      return *this;
    }
    // Comparing with end() reads ahead; when the loader has ended, the epoch is finished.
    bool operator==(const iterator& other) const {
      const bool equal = inner_ == other.inner_;
      if (equal && end_ != other.end_) owner_->finish();
      return equal;
    }
    bool operator!=(const iterator& other) const { return !(*this == other); }

   private:
    friend class ResumedBatches;
    iterator(ResumedBatches* owner, Inner inner, bool end)
        : owner_(owner), inner_(std::move(inner)), end_(end) {}

    ResumedBatches* owner_;
    Inner inner_;
    bool end_;
    bool received_ = false;
  };

  ResumedBatches(Loader& loader, ResumableSampler sampler)
      : loader_(loader), sampler_(std::move(sampler)) {
    const auto& options = loader_.options();
    if (options.workers > 0 && !options.enforce_ordering) {
      throw OptionsError(
          "torchguard::resume: the loader's enforce_ordering is false: its batches may arrive "
          "out of order, and the position could not be told; leave it true (the default)");
    }
  }

  // Begins the loader's epoch (which resets the sampler: the epoch goes on where state() says).
  iterator begin() {
    const auto resets = sampler_.resets();
    auto inner = loader_.begin();
    if (sampler_.resets() == resets) {
      throw OptionsError(
          "torchguard::resume: the loader did not reset this sampler: build it with "
          "make_data_loader(dataset, sampler, options) from this ResumableSampler or a copy");
    }
    finished_ = false;
    return iterator(this, std::move(inner), false);
  }
  iterator end() { return iterator(this, loader_.end(), true); }

 private:
  void finish() {
    if (finished_) return;
    finished_ = true;
    sampler_.finish_epoch();
  }

  Loader& loader_;
  ResumableSampler sampler_;
  bool finished_ = false;
};

// Iterates `loader` (built with `sampler` or a copy of it) for one epoch, from where the sampler's
// state says, counting each batch as the loop body receives it:
//
//   for (auto& batch : torchguard::resume(*loader, sampler)) { ... }
//
// The loader must deliver batches in the order it asked for them (enforce_ordering, the default).
template <class Loader>
ResumedBatches<Loader> resume(Loader& loader, const ResumableSampler& sampler) {
  return ResumedBatches<Loader>(loader, sampler);
}
template <class Loader, class Deleter>
ResumedBatches<Loader> resume(const std::unique_ptr<Loader, Deleter>& loader,
                              const ResumableSampler& sampler) {
  return ResumedBatches<Loader>(*loader, sampler);
}

}  // namespace torchguard
