// What users of CheckpointGuard name: its options, its error, what step() returns and what
// list() describes.
#pragma once

#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <utility>

#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "torchguard/core/cancellation.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/core/stateful.hpp"

namespace torchguard {

// A checkpoint could not be saved or restored; the message names the file and the reason.
class CheckpointError : public Error {
 public:
  using Error::Error;
};

// Checkpoints exist but none can be restored (each damaged, or the one asked for is not there):
// the message says how to start fresh or pick another (CheckpointOptions::restore); a program
// adds the name of its own flag for it.
class NoValidCheckpointError : public CheckpointError {
 public:
  using CheckpointError::CheckpointError;
};

enum class SaveOnExit { always, on_success, never };
enum class MetricMode { min, max };

// What a guard works on: shared, or borrowed. From a std::shared_ptr (or a module holder such as
// torch::nn::Linear, which is one) the guard shares ownership, so the object lives as long as the
// guard does: the form that cannot dangle. From a reference or a pointer the guard only borrows:
// the object must outlive the guard's close() or destruction (in a ScopeStack: the stack).
template <class T>
class Ref {
 public:
  Ref() = default;
  Ref(std::nullptr_t) {}
  template <class U, class = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  Ref(std::shared_ptr<U> object) : object_(std::move(object)) {}
  template <class U, class = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  Ref(U& object) : object_(std::shared_ptr<T>(), &object) {}  // borrowed
  template <class U, class = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  Ref(U* object) : object_(std::shared_ptr<T>(), object) {}  // borrowed

  T* get() const noexcept { return object_.get(); }
  T& operator*() const { return *object_; }
  T* operator->() const noexcept { return object_.get(); }
  explicit operator bool() const noexcept { return object_.get() != nullptr; }
  // True when the guard shares ownership (a shared_ptr or holder), false when it borrows.
  bool shared() const noexcept { return object_.use_count() > 0; }

 protected:
  std::shared_ptr<T> object_;
};

// A module: a torch::nn::Linear (holder), a std::shared_ptr<Net> (both shared), or a Net&
// (borrowed).
class ModuleRef : public Ref<torch::nn::Module> {
 public:
  using Ref::Ref;
  template <class T>
  ModuleRef(const torch::nn::ModuleHolder<T>& holder) : Ref(holder.ptr()) {}
};

// An optimizer: a std::shared_ptr<torch::optim::SGD> (shared) or an SGD& (borrowed).
using OptimizerRef = Ref<torch::optim::Optimizer>;
// An LR scheduler: a std::shared_ptr (shared) or a pointer (borrowed).
using SchedulerRef = Ref<torch::optim::LRScheduler>;

// A run's settings as the program gives them (CheckpointOptions::settings): recorded in every
// checkpoint and compared on resume.
struct RunSettings {
  nlohmann::json values = nlohmann::json::object();  // name -> value, e.g. {"batch_size", 64}
  // The names whose change breaks an exact resume (batch size, seed, thread count): a resume
  // with another value is refused, naming the old and the new. A change to any other is a
  // warning; the restored parts hold what the old value made them (an optimizer's learning
  // rate): the program applies the new value after the restore.
  std::set<std::string> exact;
};

// The policy of a run that heals itself (checkpoint/recovery.hpp): which steps are bad, and how
// often a run may go back before it stops.
struct RecoveryOptions {
  bool enabled = false;                 // CheckpointGuard::check_step() judges steps only when on
  bool non_finite_loss = true;          // a NaN or infinite loss is bad
  bool non_finite_gradients = true;     // a NaN or infinite gradient is bad (one fused reduction)
  bool loss_spikes = true;              // a loss far above its recent values is bad:
  std::size_t spike_window = 64;        //   the last N good steps' losses,
  std::size_t spike_warmup = 32;        //   judged once this many good steps are there,
  double spike_factor = 4.0;            //   a loss above this many times their median
  int max_recoveries = 3;               // more recoveries than this ...
  std::int64_t recovery_window = 1000;  // ... within this many steps end the run (RecoveryError)
  double lr_scale = 1.0;                // after a recovery, every learning rate times this ...
  std::int64_t lr_scale_steps = 0;      // ... for this many steps (0: not changed)
  // True on every process when some process passes true: a rank's bad step (true: bad) is
  // everyone's, and so is a fresh start's first save (true: no checkpoint found), which the
  // writer makes only once every process has looked for one. ProcessGroupGuard::
  // configure_checkpoints() sets it.
  std::function<bool(bool)> agree;
};

struct CheckpointOptions {
  std::filesystem::path directory;  // where checkpoints live (created when missing)

  // The parts, each under a name, saved together in one commit and restored all or nothing. The
  // constructors' model and optimizer are the parts named "model" and "optimizer". Files:
  // model.safetensors for the model named "model", model.<name>.safetensors for the others;
  // optimizer(.<name>).safetensors likewise (format.hpp).
  std::map<std::string, ModuleRef> models;
  std::map<std::string, OptimizerRef> optimizers;
  std::map<std::string, SchedulerRef> schedulers;  // each one's step count
  // Samplers (a ResumableSampler, by copy: copies share its state) or any Stateful: their state
  // is saved as JSON and restored before the loop begins. With one, the guard's epoch() is its
  // epoch: one value, not two.
  std::map<std::string, Stateful> samplers;
  std::map<std::string, torch::Tensor> tensors;  // more tensors, restored in place

  RunSettings settings;      // recorded; compared on resume (see RunSettings)
  RecoveryOptions recovery;  // a bad step goes back to the last checkpoint (recovery.hpp)
  // The steps the run will take in all (0: not said). The checkpoint of that step is marked
  // complete: the same command again restores it, logs that the run is complete and writes
  // nothing; a larger total goes on. mark_complete() says so for a run that counts otherwise.
  std::int64_t total_steps = 0;
  // Which checkpoint to restore: "" or "latest" (the newest intact one, falling back past
  // damaged ones), "none" (start fresh; the existing checkpoints are kept until retention
  // replaces them), a step ("1200") or a checkpoint's name ("ckpt-000004-step-1200"): that one,
  // or an error.
  std::string restore;

  int keep_last = 3;        // the newest N checkpoints are kept (at least 1)
  int keep_best = 0;        // and the best K by `best_metric`
  std::string best_metric;  // a metric name passed to step()/save()
  MetricMode best_mode = MetricMode::min;
  SaveOnExit save_on_exit = SaveOnExit::always;
  std::int64_t every_n_steps = 0;  // step() saves every N steps (0: only on exit / stop / save())
  bool background = false;         // copy on the caller's thread, write on another
  // A model's frozen parameters and buffers that did not change since the last commit are not
  // written again: the new checkpoint hard-links the last one's shared file of them
  // (checkpoint/incremental.hpp). Off: every file is written whole; no two checkpoints share bytes.
  bool incremental = true;
  std::optional<torch::Device> load_device;  // move the models here, then load
  bool allow_fresh_start = false;    // checkpoints exist but none is valid: start fresh, not fail
  std::function<bool()> is_writer;   // false on processes that must not write (rank != 0)
  std::function<void()> after_save;  // runs on every process after each save point (barrier)
  std::function<bool()> stop_requested;  // e.g. [&] { return session.stop_requested(); }
  CancellationToken stop_token;          // e.g. session.stop_token()
  std::shared_ptr<spdlog::logger> logger;

  // Earlier spellings, still read: `scheduler` is schedulers["scheduler"], `modules` are models.
  SchedulerRef scheduler;
  std::map<std::string, ModuleRef> modules;
};

// What step() did: saved a checkpoint, and whether the loop should stop.
struct StepResult {
  bool saved = false;
  bool stop = false;
};

// A committed checkpoint as its manifest describes it.
struct CheckpointInfo {
  std::filesystem::path path;
  std::uint64_t sequence = 0;
  std::int64_t step = 0;
  std::int64_t epoch = 0;
  nlohmann::json metrics;
  bool complete = false;  // the run's planned work was done at this step
};

namespace detail {

// Throws OptionsError naming the first option that cannot work.
inline void validate_checkpoint_options(const CheckpointOptions& options) {
  auto invalid = [](const std::string& what) {
    throw OptionsError(fmt::format("CheckpointGuard: {}", what));
  };
  if (options.directory.empty()) invalid("options.directory is empty");
  if (options.keep_last < 1) invalid("keep_last must be at least 1");
  if (options.keep_best < 0) invalid("keep_best must not be negative");
  if (options.keep_best > 0 && options.best_metric.empty()) {
    invalid("keep_best needs best_metric: the metric that decides which checkpoint is best");
  }
  if (options.every_n_steps < 0) invalid("every_n_steps must not be negative");
  if (options.total_steps < 0) invalid("total_steps must not be negative");
  auto check_names = [&](const char* what, const auto& parts) {
    for (const auto& [name, part] : parts) {
      const bool plain =
          !name.empty() && name.size() <= 64 && std::all_of(name.begin(), name.end(), [](char c) {
            return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-';
          });
      if (!plain) {
        invalid(fmt::format("{} name '{}' is not 1 to 64 letters, digits, '_' or '-'", what, name));
      }
      if (!part) invalid(fmt::format("{} '{}' is null", what, name));
    }
  };
  check_names("a model", options.models);
  check_names("an optimizer", options.optimizers);
  check_names("a scheduler", options.schedulers);
  check_names("a sampler", options.samplers);
  check_names("a module", options.modules);
  for (const auto& name : options.settings.exact) {
    if (!options.settings.values.contains(name)) {
      invalid(fmt::format("settings.exact names '{}', which settings.values does not hold", name));
    }
  }
  if (!options.settings.values.is_object()) invalid("settings.values is not a JSON object");
  if (std::filesystem::exists(options.directory) &&
      !std::filesystem::is_directory(options.directory)) {
    invalid(fmt::format("'{}' is a file, not a checkpoint directory (a torch::save file?)",
                        options.directory.string()));
  }
}

}  // namespace detail
}  // namespace torchguard
