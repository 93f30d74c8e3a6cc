// CheckpointGuard: restore the newest valid checkpoint on entry, save on exit, crash-safe.
//
//   torchguard::CheckpointGuard guard(model, optimizer, "checkpoints");   // restores, if any
//   for (...; ...; ) {
//     ... forward, backward ...
//     guard.before_optimizer_step();   // optional: lets a background save's copy overlap training
//     optimizer.step();
//     if (guard.step({{"loss", loss}}).stop) break;   // saves every N steps, or on a stop request
//   }
//   // leaving the scope saves (policy: always / on success / never)
//
// A program of several models and optimizers (a GAN) names them, and one commit holds them all:
//
//   torchguard::CheckpointOptions options;
//   options.directory = "checkpoints";
//   options.models = {{"generator", generator}, {"discriminator", discriminator}};
//   options.optimizers = {{"generator", g_adam}, {"discriminator", d_adam}};
//   options.samplers = {{"train", sampler}};      // the guard's epoch is the sampler's
//   options.settings.values = {{"--batch-size", 64}, {"--lr", 2e-4}};  // kept, compared on resume
//   options.settings.exact = {"--batch-size"};    // a change to it refuses the resume
//   options.total_steps = 1000;                   // a finished run, run again, writes nothing
//   torchguard::CheckpointGuard guard(options);
//
// Layout: <directory>/ckpt-<seq>-step-<step>/{model.safetensors, optimizer.safetensors,
// extra.safetensors, manifest.json} (format.hpp). The parts: options.hpp (what users name),
// format.hpp and manifest.hpp (the files), safetensors.hpp and state_dict.hpp (the format, and
// exchange with PyTorch), commit.hpp (the crash-safe commit), incremental.hpp (what a commit
// links instead of writing), retention.hpp (what stays),
// restore.hpp (verify, quarantine, choose), format_v1.hpp (the first format, read only),
// state.hpp (what is saved and loaded), staging.hpp (the host copy, overlapped with training),
// writer.hpp (the background thread), recovery.hpp (a bad step goes back: check_step()).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "torchguard/checkpoint/commit.hpp"
#include "torchguard/checkpoint/format.hpp"
#include "torchguard/checkpoint/options.hpp"
#include "torchguard/checkpoint/recovery.hpp"
#include "torchguard/checkpoint/restore.hpp"
#include "torchguard/checkpoint/retention.hpp"
#include "torchguard/checkpoint/state.hpp"
#include "torchguard/checkpoint/writer.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/core/guard.hpp"
#include "torchguard/core/logging.hpp"
#include "torchguard/core/metrics.hpp"
#include "torchguard/core/outcome.hpp"
#include "torchguard/detail/directory_lock.hpp"
#include "torchguard/detail/files.hpp"

namespace torchguard {
namespace detail {

// The parts a guard saves: the options' maps, the constructors' model and optimizer (named
// "model" and "optimizer"), and the earlier spellings (options.modules, options.scheduler).
// Throws OptionsError for a name given twice.
inline Parts collect_parts(ModuleRef model, OptimizerRef optimizer,
                           const CheckpointOptions& options) {
  Parts parts{options.models, options.optimizers, options.schedulers, options.samplers,
              options.tensors};
  auto add = [](auto& map, const std::string& name, auto part, const char* what) {
    if (!map.emplace(name, std::move(part)).second) {
      throw OptionsError(fmt::format(
          "CheckpointGuard: two {} are named '{}' (the constructor's, options.modules and "
          "options.scheduler count as named too)",
          what, name));
    }
  };
  if (model) add(parts.models, "model", std::move(model), "models");
  if (optimizer) add(parts.optimizers, "optimizer", std::move(optimizer), "optimizers");
  for (const auto& [name, module] : options.modules) add(parts.models, name, module, "models");
  if (options.scheduler) add(parts.schedulers, "scheduler", options.scheduler, "schedulers");
  return parts;
}

// A CheckpointGuard's work: the restore at entry, the saves, the background writer and the
// exit save. On the heap: the writer thread points into it.
class CheckpointGuardState {
 public:
  static constexpr const char* close_error_prefix = "CheckpointGuard";

  // Takes the directory's lock, restores (or starts fresh) as options.restore says, then starts
  // the background writer.
  CheckpointGuardState(ModuleRef model, OptimizerRef optimizer,
                       CheckpointOptions checkpoint_options)
      : options(std::move(checkpoint_options)),
        logger(or_default(options.logger)),
        training(collect_parts(std::move(model), std::move(optimizer), options), options),
        total_steps(options.total_steps) {
    validate_checkpoint_options(options);
    writer = !options.is_writer || options.is_writer();
    const auto& directory = options.directory;
    std::error_code error;
    const bool created = std::filesystem::create_directories(directory, error);
    if (error && !std::filesystem::is_directory(directory)) {
      throw CheckpointError(fmt::format("CheckpointGuard: cannot create the directory '{}': {}",
                                        directory.string(), error.message()));
    }
    if (created && writer) {  // the new directory's own entry must survive a crash too
      fsync_directory(std::filesystem::absolute(directory).parent_path());
    }
    if (writer) {
      // A second run on this directory fails here, at once.
      lock.emplace(directory, "CheckpointGuard: the checkpoint directory");
      if (!lock->held()) {
        logger->warn(
            "CheckpointGuard: cannot create '{}' (a read-only directory?): another run "
            "on this directory is not excluded",
            lock->path().string());
      }
      sequence = remove_leftover_temporaries(directory, *logger);
    }
    restore_newest(options, writer, *logger,
                   [&](const VerifiedCheckpoint& checkpoint) { load(checkpoint); });
    if (options.background && writer) {
      background =
          std::make_unique<BackgroundWriter>([this](Snapshot& snapshot) { commit(snapshot); });
    }
    bool fresh = !resumed_from;
    // In a process group every process decides together, and the writer saves only once every
    // process has looked for its checkpoint (else one could find this save and resume from it).
    if (options.recovery.enabled && options.recovery.agree) fresh = options.recovery.agree(fresh);
    if (options.recovery.enabled && fresh) {
      // A bad step needs a checkpoint to go back to, even the first step.
      logger->info("CheckpointGuard: recovery is on: saving step {}, the first point to go back to",
                   step);
      save(Metrics{});
    }
  }

  // See CheckpointGuard::step.
  StepResult advance(const Metrics& step_metrics) {
    ++step;
    saved_this_step = false;
    complete_marked = false;  // more was trained: complete again only when said or reached
    if (lr_factor != 1.0 && step >= lr_until) end_lr_scale();
    set_metrics(step_metrics);
    settle();  // a dropped background save is replaced now
    StepResult result;
    result.stop = stop_requested();
    const bool due = resave || (options.every_n_steps > 0 && step % options.every_n_steps == 0) ||
                     (total_steps > 0 && step == total_steps);
    // A stop saves once, at the first step that sees it: a loop that goes on does not save at
    // every step after it.
    if (due || (result.stop && !stop_logged)) {
      save(Metrics{});
      result.saved = true;
    }
    if (result.stop && !stop_logged) {
      stop_logged = true;
      logger->warn("CheckpointGuard: stop requested; checkpoint saved at step {}", step);
    }
    return result;
  }

  // See CheckpointGuard::save.
  void save(const Metrics& save_metrics) {
    if (poisoned) {
      throw RecoveryError(fmt::format(
          "CheckpointGuard: not saved: the parts hold step {}, which went wrong and could not be "
          "recovered (the committed checkpoints stay as they are)",
          step + 1));
    }
    set_metrics(save_metrics);
    saved_this_step = true;  // set on every process alike: the exit decision must not diverge
    const auto& after_save = options.after_save;
    try {
      if (writer) commit_or_queue();
      if (after_save && background) wait();  // the others see it done
    } catch (...) {
      // The other processes are waiting at the fence: reach it before reporting the error.
      if (after_save) after_save();
      throw;
    }
    if (after_save) after_save();
  }

  // See CheckpointGuard::before_optimizer_step.
  void before_optimizer_step() {
    settle();
    if (background && !overlap_refused) overlap = true;
  }

  // See CheckpointGuard::check_step.
  StepVerdict check_step(const torch::Tensor& loss, const std::vector<std::size_t>& batch) {
    const RecoveryOptions& policy = options.recovery;
    if (!policy.enabled) return {};
    if (poisoned) {
      throw RecoveryError(
          "CheckpointGuard: check_step() after a step that could not be recovered: the run ended");
    }
    double loss_value = 0;
    std::string reason = monitor.judge(loss, trained_parameters(), loss_value);
    bool bad = !reason.empty();
    if (policy.agree) {  // every process decides alike: one's bad step is everyone's
      const bool anyone = policy.agree(bad);
      if (anyone && !bad) reason = "another process's step went wrong";
      bad = anyone;
    }
    if (!bad) {
      monitor.accept(loss_value);
      return {};
    }
    return recover(reason, batch);
  }

  // See CheckpointGuard::wait.
  void wait() {
    if (!background) return;
    try {
      settle();
      background->wait();
    } catch (...) {
      last_commit_failed = true;
      throw;
    }
  }

  // See CheckpointGuard::close.
  void close(Outcome outcome) {
    if (closed) return;
    closed = true;
    const SaveOnExit policy = options.save_on_exit;
    const bool save_now = policy == SaveOnExit::always ||
                          (policy == SaveOnExit::on_success && outcome == Outcome::success);
    std::exception_ptr error;
    try {
      wait();  // a background write in flight, and its error
    } catch (...) {
      error = std::current_exception();
    }
    if (poisoned) {
      logger->warn(
          "CheckpointGuard: not saved at exit: the parts hold a step that went wrong (the "
          "committed checkpoints stay as they are)");
      if (error) std::rethrow_exception(error);
      return;
    }
    try {
      if (save_now && !saved_this_step && unchanged_since_restore()) {
        logger->info("CheckpointGuard: step {} is as it was restored from '{}'{}: not saved again",
                     step, resumed_from->string(), complete() ? " (the run is complete)" : "");
      } else if (save_now && !saved_this_step) {
        save(Metrics{});
      } else if (resave && writer) {  // a dropped background save, replaced
        commit_or_queue();
      } else if (save_now && (error || last_commit_failed) && writer) {
        // The last save point's write failed: write the final state once more. No fence: the
        // other processes consider this step saved.
        commit_or_queue();
      } else if (save_now) {
        logger->info("CheckpointGuard: step {} is already saved", step);
      }
      wait();
    } catch (...) {
      if (!error) error = std::current_exception();
    }
    if (error) std::rethrow_exception(error);
  }

  // request_stop(), options.stop_requested, or options.stop_token.
  bool stop_requested() const {
    return stop_flag.load() || (options.stop_requested && options.stop_requested()) ||
           options.stop_token.cancelled();
  }

  // See CheckpointGuard::epoch and complete.
  std::int64_t current_epoch() const { return sampler_epoch().value_or(epoch); }
  bool complete() const noexcept {
    return complete_marked || (total_steps > 0 && step >= total_steps);
  }

  // The epoch of the first sampler that has one.
  std::optional<std::int64_t> sampler_epoch() const {
    for (const auto& [name, sampler] : training.parts().samplers) {
      if (auto sampler_at = sampler.epoch()) return sampler_at;
    }
    return std::nullopt;
  }

  CheckpointOptions options;
  std::shared_ptr<spdlog::logger> logger;
  TrainingState training;
  bool writer = true;  // this process writes (options.is_writer)
  std::int64_t step = 0;
  std::int64_t epoch = 0;
  std::uint64_t sequence = 0;
  std::int64_t total_steps = 0;
  bool complete_marked = false;  // mark_complete(), or the restored checkpoint was complete
  nlohmann::json metrics = nlohmann::json::object();
  nlohmann::json resumed_metrics = nlohmann::json::object();
  nlohmann::json metadata = nlohmann::json::object();
  std::optional<std::filesystem::path> resumed_from;
  std::int64_t restored_step = -1;
  std::int64_t restored_epoch = -1;
  nlohmann::json restored_metadata;
  std::vector<std::int64_t> restored_versions;  // of every saved tensor, just after the restore
  bool saved_this_step = false;     // set by save(), cleared by step(): the exit save may skip
  bool last_commit_failed = false;  // the newest save point's write did not commit
  bool overlap = false;          // the loop calls before_optimizer_step(): copies may be deferred
  bool overlap_refused = false;  // a deferred copy was found torn: never again in this run
  bool resave = false;           // a background save was dropped: save the state at hand
  std::int64_t staged_step = 0;  // the step of the last background snapshot
  std::atomic<bool> stop_flag{false};
  bool stop_logged = false;
  bool closed = false;
  std::optional<DirectoryLock> lock;  // held by the writing process
  HostStaging staging;                // reused by background snapshots
  // The run that heals itself (options.recovery, recovery.hpp).
  StepMonitor monitor{options.recovery};
  std::vector<RecoveryRecord> recoveries;    // this run's, and those of the runs it resumed
  std::vector<std::size_t> skipped_samples;  // every sample a recovery left out (sorted)
  double lr_factor = 1.0;                    // every learning rate is scaled by this ...
  std::int64_t lr_until = 0;                 // ... until this step
  bool poisoned = false;  // a step went wrong and could not be recovered: nothing is saved
  std::vector<torch::Tensor> trained;            // trained_parameters(), found once
  std::unique_ptr<BackgroundWriter> background;  // last: stopped before the rest goes

 private:
  // The settings the checkpoint recorded (format 3; format 2's demos kept them in
  // metadata["settings"]) against this run's: a change to an exact one throws before anything
  // loads, another is a warning.
  void reconcile_settings(const VerifiedCheckpoint& checkpoint) const {
    const auto& manifest = checkpoint.manifest;
    const auto& current = options.settings;
    nlohmann::json saved = manifest.value("settings", nlohmann::json::object());
    if (saved.empty() && manifest.contains("metadata") && manifest["metadata"].is_object()) {
      saved = manifest["metadata"].value("settings", nlohmann::json::object());
    }
    if (!saved.is_object()) return;
    for (const auto& [name, value] : current.values.items()) {
      const auto old_value = saved.find(name);
      if (old_value == saved.end() || *old_value == value) continue;
      if (current.exact.count(name)) {
        throw OptionsError(fmt::format(
            "CheckpointGuard: {} is {} in this run but was {} in the run that wrote '{}': "
            "resuming with another value would not continue that run exactly; resume with {}, "
            "or start a new run (another directory, or restore = \"none\")",
            name, value.dump(), old_value->dump(), checkpoint.path.string(), old_value->dump()));
      }
      logger->warn(
          "CheckpointGuard: {} changed from {} to {} since '{}' (the restored parts hold what "
          "the old value made them: the program applies the new one)",
          name, old_value->dump(), value.dump(), checkpoint.path.filename().string());
    }
  }

  void load(const VerifiedCheckpoint& checkpoint) {
    reconcile_settings(checkpoint);
    training.load(checkpoint, *logger);
    const auto& manifest = checkpoint.manifest;
    step = manifest.at("step").get<std::int64_t>();
    epoch = manifest.at("epoch").get<std::int64_t>();
    resumed_metrics = manifest.value("metrics", nlohmann::json::object());
    metrics = nlohmann::json::object();  // a new checkpoint must not carry the old metrics
    metadata = manifest.value("metadata", nlohmann::json::object());
    sequence = std::max(sequence, manifest.at("sequence").get<std::uint64_t>());
    resumed_from = checkpoint.path;
    restored_step = step;
    restored_epoch = epoch;
    restored_metadata = metadata;
    restored_versions = training.versions();
    read_recovery_state(/*rollback=*/false);
    const bool was_complete = manifest.value("complete", false);
    complete_marked = was_complete && total_steps <= step;
    std::string end;
    if (was_complete && complete_marked) {
      end = ": the run is complete (a larger total of steps or epochs goes on)";
    } else if (was_complete) {
      end = fmt::format(": the run was complete there, and goes on to step {}", total_steps);
    }
    logger->info("CheckpointGuard: resumed from step {} (epoch {}) of '{}'{}", step,
                 current_epoch(), checkpoint.path.string(), end);
  }

  // What the optimizers train (the models' parameters when there is no optimizer): the tensors
  // whose gradients check_step() judges and drops.
  const std::vector<torch::Tensor>& trained_parameters() {
    if (!trained.empty()) return trained;
    for (const auto& [name, optimizer] : training.parts().optimizers) {
      for (const auto& group : optimizer->param_groups()) {
        trained.insert(trained.end(), group.params().begin(), group.params().end());
      }
    }
    if (trained.empty()) {
      for (const auto& [name, model] : training.parts().models) {
        for (const auto& parameter : model->parameters()) trained.push_back(parameter);
      }
    }
    return trained;
  }

  // A bad step: back to the newest committed checkpoint that verifies, its batch skipped from
  // now on, and that state saved at once (so a kill and a resume skip it too).
  StepVerdict recover(const std::string& reason, const std::vector<std::size_t>& batch) {
    const RecoveryOptions& policy = options.recovery;
    const std::int64_t bad_step = step + 1;
    for (auto& parameter : trained) parameter.mutable_grad() = torch::Tensor();
    wait();  // the newest save is committed (or failed) before the choice
    auto fail = [&](const std::string& why) {
      poisoned = true;
      const auto message = fmt::format(
          "CheckpointGuard: step {} went wrong ({}) {}: the run ends here, nothing more is saved "
          "and the committed checkpoints stay. Recoveries so far:{}{}",
          bad_step, reason, why, recoveries.empty() ? " none" : "", recovery_history(recoveries));
      logger->error("{}", message);
      return RecoveryError(message);
    };
    if (!recoveries.empty() && recoveries.back().bad_step == bad_step) {
      throw fail(fmt::format(
          "again after the run went back to step {} and skipped {}: the fault is not in the batch",
          recoveries.back().restored_step, sample_list(recoveries.back().skipped)));
    }
    const auto recent = std::count_if(recoveries.begin(), recoveries.end(), [&](const auto& r) {
      return r.bad_step > bad_step - policy.recovery_window;
    });
    if (recent >= policy.max_recoveries) {
      throw fail(fmt::format("after {} recoveries within {} steps (at most {} allowed)", recent,
                             policy.recovery_window, policy.max_recoveries));
    }
    // The newest checkpoint that verifies; a damaged one is quarantined, as on a restore.
    const auto candidates = committed_paths(options.directory);
    std::optional<VerifiedCheckpoint> target;
    for (auto it = candidates.rbegin(); it != candidates.rend() && !target; ++it) {
      VerifiedCheckpoint checkpoint;
      const std::string problem = verify_checkpoint(*it, checkpoint);
      if (problem.empty()) {
        target = std::move(checkpoint);
      } else {
        quarantine_checkpoint(options.directory, *it, problem, writer, *logger);
      }
    }
    if (!target)
      throw fail(fmt::format("and '{}' holds no checkpoint to go back to that verifies",
                             options.directory.string()));

    training.load(*target, *logger);
    const auto& manifest = target->manifest;
    step = manifest.at("step").get<std::int64_t>();
    epoch = manifest.at("epoch").get<std::int64_t>();
    metrics = nlohmann::json::object();
    metadata = manifest.value("metadata", nlohmann::json::object());
    resumed_from = target->path;
    read_recovery_state(/*rollback=*/true);

    // The batch, and every sample skipped before, out of the sampler's epochs.
    std::vector<std::size_t> added(batch);
    std::sort(added.begin(), added.end());
    added.erase(std::unique(added.begin(), added.end()), added.end());
    std::vector<std::size_t> all;
    std::set_union(skipped_samples.begin(), skipped_samples.end(), added.begin(), added.end(),
                   std::back_inserter(all));
    skipped_samples = std::move(all);
    bool skipping = false;
    for (const auto& [name, sampler] : training.parts().samplers) {
      if (sampler.can_skip()) {
        sampler.skip(skipped_samples);
        skipping = true;
      }
    }
    if (!skipping && !added.empty()) {
      logger->warn(
          "CheckpointGuard: no sampler in options.samplers can skip samples: the same batch may "
          "come again");
    }
    if (policy.lr_scale != 1.0 && policy.lr_scale_steps > 0) {
      scale_lr(policy.lr_scale);
      lr_factor *= policy.lr_scale;
      lr_until = step + policy.lr_scale_steps;
    }
    recoveries.push_back({bad_step, step, reason, added});
    write_recovery_state();
    logger->warn(
        "CheckpointGuard: step {} went wrong ({}): back to step {} ('{}'); skipping its batch "
        "from now on: {}{}; recovery {} ({} of at most {} within {} steps)",
        bad_step, reason, step, target->path.filename().string(), sample_list(added),
        lr_factor != 1.0 ? fmt::format("; learning rates x{} until step {}", lr_factor, lr_until)
                         : std::string(),
        recoveries.size(), recent + 1, policy.max_recoveries, policy.recovery_window);
    // Every process has chosen and loaded its checkpoint before the writer commits a newer one.
    if (policy.agree) policy.agree(false);
    save(Metrics{});

    StepVerdict verdict;
    verdict.recovered = true;
    verdict.reason = reason;
    verdict.bad_step = bad_step;
    verdict.restored_step = step;
    verdict.skipped = std::move(added);
    verdict.recoveries = static_cast<int>(recoveries.size());
    return verdict;
  }

  void scale_lr(double factor) {
    for (const auto& [name, optimizer] : training.parts().optimizers) {
      for (auto& group : optimizer->param_groups()) {
        group.options().set_lr(group.options().get_lr() * factor);
      }
    }
  }
  void end_lr_scale() {
    scale_lr(1.0 / lr_factor);
    logger->info(
        "CheckpointGuard: step {}: learning rates back to normal (were x{} since a "
        "recovery)",
        step, lr_factor);
    lr_factor = 1.0;
    lr_until = 0;
    write_recovery_state();
  }

  // The checkpoints keep the recoveries and the learning rates' scale in their metadata
  // ("torchguard/recovery"): a resumed run counts the earlier recoveries against the bounds,
  // skips what they skipped and ends a scale it was under.
  static constexpr const char* recovery_key = "torchguard/recovery";
  void read_recovery_state(bool rollback) {
    const auto saved = metadata.find(recovery_key);
    lr_factor = 1.0;
    lr_until = 0;
    if (saved == metadata.end() || !saved->is_object()) return;
    lr_factor = saved->value("lr_factor", 1.0);
    lr_until = saved->value("lr_until", std::int64_t{0});
    if (rollback) return;  // this run's own records are newer than the checkpoint's
    recoveries = recovery_records(saved->value("recoveries", nlohmann::json::array()));
    for (const auto& record : recoveries) {
      skipped_samples.insert(skipped_samples.end(), record.skipped.begin(), record.skipped.end());
    }
    std::sort(skipped_samples.begin(), skipped_samples.end());
    skipped_samples.erase(std::unique(skipped_samples.begin(), skipped_samples.end()),
                          skipped_samples.end());
  }
  void write_recovery_state() {
    nlohmann::json records = nlohmann::json::array();
    for (const auto& record : recoveries) records.push_back(to_json(record));
    metadata[recovery_key] = {
        {"recoveries", records}, {"lr_factor", lr_factor}, {"lr_until", lr_until}};
  }

  void set_metrics(const Metrics& given) {
    if (given.empty()) return;
    metrics = nlohmann::json::object();
    for (const auto& [name, value] : given) {
      metrics[name] = std::isfinite(value) ? nlohmann::json(value) : nlohmann::json(nullptr);
    }
  }

  // Commits a snapshot, then applies retention (a failure to delete old checkpoints is logged,
  // not a save failure). Runs on the caller's or the writer thread.
  void commit(Snapshot& snapshot) const {
    const auto started = std::chrono::steady_clock::now();
    std::uint64_t bytes = 0;
    try {
      bytes = write_checkpoint(options.directory, snapshot);
    } catch (const CheckpointNotDurableError& e) {
      logger->error("{}", e.what());  // no retention: the older checkpoints stay
      throw;
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    std::uint64_t linked = 0;  // unchanged since an earlier checkpoint (incremental.hpp)
    for (const auto& link : snapshot.links) linked += link.size;
    logger->info("CheckpointGuard: saved step {} to '{}' ({:.1f} MiB in {:.2f} s{}){}",
                 snapshot.step,
                 (options.directory / checkpoint_name(snapshot.sequence, snapshot.step)).string(),
                 static_cast<double>(bytes) / (1024.0 * 1024.0), seconds,
                 linked ? fmt::format("; {:.1f} MiB unchanged, linked",
                                      static_cast<double>(linked) / (1024.0 * 1024.0))
                        : std::string(),
                 snapshot.complete ? ": the run is complete" : "");
    try {
      apply_retention(options, resumed_from, *logger);
    } catch (const std::exception& e) {
      logger->warn("CheckpointGuard: retention after step {} failed: {}", snapshot.step,
                   error_message(e));
    }
  }

  // `deferred`: a background snapshot's copies that may run later (staging.hpp).
  std::unique_ptr<Snapshot> take_snapshot(bool in_background, DeferredCopies* deferred = nullptr) {
    auto snapshot = std::make_unique<Snapshot>();
    snapshot->sequence = ++sequence;
    snapshot->step = step;
    snapshot->epoch = current_epoch();
    snapshot->complete = complete();
    snapshot->total_steps = total_steps;
    snapshot->metrics = metrics;
    snapshot->metadata = metadata;
    snapshot->settings = options.settings.values;
    snapshot->stop_requested = [this] { return stop_requested(); };
    auto copies = training.capture(*snapshot, in_background ? &staging : nullptr,
                                   deferred != nullptr && overlap);
    if (deferred) *deferred = std::move(copies);
    return snapshot;
  }

  // True when nothing changed since the restore: the same step, epoch and metadata, and no saved
  // tensor changed in place (each in-place change bumps a tensor's version). A finished run
  // started again writes no copy of its last step; a loop that trains without step() still
  // saves. Processes that meet at a fence (after_save) must decide alike: they go by the step
  // and the restored checkpoint's completeness alone.
  bool unchanged_since_restore() const {
    if (!resumed_from || step != restored_step) return false;
    if (options.after_save) return complete();
    return writer && epoch == restored_epoch && metadata == restored_metadata &&
           training.versions() == restored_versions;
  }

  void commit_or_queue() {
    if (!background) {
      auto snapshot = take_snapshot(false);
      last_commit_failed = true;
      commit(*snapshot);
      last_commit_failed = false;
      return;
    }
    wait();  // at most one write in flight: the previous one ends before the next is copied
    DeferredCopies deferred;
    auto snapshot = take_snapshot(true, &deferred);
    staged_step = snapshot->step;
    background->submit(std::move(snapshot), std::move(deferred));
    last_commit_failed = false;  // until the writer reports otherwise
    resave = false;
  }

  // Decides a background snapshot whose copies were deferred, once they are done: written when
  // none of their sources changed since capture, dropped when one did (the optimizer stepped
  // before before_optimizer_step(): the copy may be torn). The state is then saved again at the
  // next step() or close(), and copies are made in step() for the rest of the run.
  void settle() {
    if (!background) return;
    const bool kept =
        background->settle([](const DeferredCopies& copies) { return copies.unchanged(); });
    if (kept) return;
    overlap = false;
    overlap_refused = true;
    resave = true;
    saved_this_step = false;
    logger->warn(
        "CheckpointGuard: the parameters changed while the background save of step {} was "
        "copying them (optimizer.step() before guard.before_optimizer_step()?): that save is "
        "dropped, the state is saved again at the next step() or close(), and background saves "
        "copy in step() from now on",
        staged_step);
  }
};

}  // namespace detail

class CheckpointGuard {
 public:
  using Options = CheckpointOptions;

  // Models, optimizers, schedulers and the options' other parts are shared (std::shared_ptr,
  // module holders: they live as long as the guard) or borrowed (references: they must outlive
  // it).
  //
  // The seed's form: restore from `directory` now, save there at exit.
  CheckpointGuard(ModuleRef model, OptimizerRef optimizer, std::filesystem::path directory)
      : CheckpointGuard(std::move(model), std::move(optimizer), options_for(std::move(directory))) {
  }

  // The model and optimizer are the parts named "model" and "optimizer".
  CheckpointGuard(ModuleRef model, OptimizerRef optimizer, CheckpointOptions options)
      : s_(std::in_place, std::move(model), std::move(optimizer), std::move(options)) {}

  // Without an optimizer: a model (and the options' parts) alone.
  CheckpointGuard(ModuleRef model, CheckpointOptions options)
      : CheckpointGuard(std::move(model), nullptr, std::move(options)) {}

  // Every part named in the options (models, optimizers, schedulers, samplers, tensors).
  explicit CheckpointGuard(CheckpointOptions options)
      : CheckpointGuard(nullptr, nullptr, std::move(options)) {}

  // The destructor (and a move assignment, for the guard's own work) saves according to the exit
  // policy and waits for a background write. Never throws: errors are logged (call close() to
  // have them thrown). A moved-from guard does nothing.
  CheckpointGuard(CheckpointGuard&&) noexcept = default;
  CheckpointGuard& operator=(CheckpointGuard&&) noexcept = default;

  // Advances the step with this step's metrics; saves every `every_n_steps` steps, at the step
  // that reaches total_steps, and at once when a stop was requested (the result then says to
  // stop; only the first such step saves).
  StepResult step(const Metrics& metrics = {}) { return s_->advance(metrics); }

  // Commits a checkpoint of the current state now (queued, when background). Rethrows the error
  // of an earlier background write.
  void save(const Metrics& metrics = {}) { s_->save(metrics); }

  // The point where the parameters are about to change: call it just before optimizer.step().
  // With `background`, it waits until a save's copy of the parameters and the optimizer's state
  // is done: that copy then runs while the forward and backward after step() run, and this is
  // the only wait of the training loop. A loop that never calls it (or steps the optimizer
  // before it) is still saved whole: the copy is made in step(), or a copy that the optimizer
  // overtook is dropped and the state saved again, with a warning. Cheap when nothing is due.
  void before_optimizer_step() { s_->before_optimizer_step(); }

  // With options.recovery.enabled, judges the step just computed (call it after backward(),
  // before optimizer.step()): a loss or gradient that is not finite, or a loss spike, puts every
  // part back to the newest committed checkpoint, leaves `batch` (the step's sample indices: the
  // whole step's, over every process) out of the sampler from then on, saves that state, and
  // returns recovered = true: the loop then does not step the optimizer and starts its epoch
  // over where the sampler now is. A good step returns recovered = false (and costs one
  // synchronization). Throws RecoveryError past the policy's bounds. Without recovery enabled it
  // does nothing. Under ProcessGroupGuard::configure_checkpoints every process decides alike.
  StepVerdict check_step(const torch::Tensor& loss, const std::vector<std::size_t>& batch = {}) {
    return s_->check_step(loss, batch);
  }
  // Every sample a recovery left out (sorted; restored from the checkpoint on resume).
  const std::vector<std::size_t>& skipped_samples() const noexcept { return s_->skipped_samples; }

  // Waits for a background write in flight; rethrows its error.
  void wait() { s_->wait(); }

  // Ends the guard's work: saves according to the exit policy, waits for the writer, and throws
  // what went wrong. Idempotent.
  void close(Outcome outcome) { s_.close(outcome); }

  std::int64_t current_step() const noexcept { return s_->step; }
  void set_step(std::int64_t step) noexcept { s_->step = step; }
  // The run's epoch: a sampler's (options.samplers), when one has an epoch; else the value given
  // to set_epoch() (restored from the checkpoint).
  std::int64_t epoch() const { return s_->current_epoch(); }
  // Throws OptionsError when a sampler keeps the epoch: there is one epoch, not two.
  void set_epoch(std::int64_t epoch) {
    if (s_->sampler_epoch()) {
      throw OptionsError(
          "CheckpointGuard: set_epoch() with a sampler in options.samplers: the epoch is the "
          "sampler's");
    }
    s_->epoch = epoch;
  }

  // The run's planned steps in all (options.total_steps; 0: not said). A total above the step
  // of a restored complete run makes it go on.
  std::int64_t total_steps() const noexcept { return s_->total_steps; }
  void set_total_steps(std::int64_t total) {
    if (total < 0) throw OptionsError("CheckpointGuard: total steps must not be negative");
    s_->total_steps = total;
    if (total > s_->step) s_->complete_marked = false;
  }
  // Says the run's planned work is done: the next checkpoint (the exit save) is marked complete.
  void mark_complete() noexcept { s_->complete_marked = true; }
  // True when the run's planned work is done: mark_complete() since the last step(), the step
  // at total_steps, or a restored checkpoint marked complete (with no larger total given). A
  // program that sees it on entry has nothing to train; leaving then writes nothing.
  bool complete() const noexcept { return s_->complete(); }
  // The run's settings as given (options.settings.values).
  const nlohmann::json& settings() const noexcept { return s_->options.settings.values; }

  // The metrics given last to step() or save().
  const nlohmann::json& metrics() const noexcept { return s_->metrics; }
  // The metrics of the checkpoint training resumed from (empty after a fresh start).
  const nlohmann::json& resumed_metrics() const noexcept { return s_->resumed_metrics; }
  // User metadata, saved in every manifest and restored on entry.
  nlohmann::json& metadata() noexcept { return s_->metadata; }

  bool resumed() const noexcept { return s_->resumed_from.has_value(); }
  const std::optional<std::filesystem::path>& resumed_from() const noexcept {
    return s_->resumed_from;
  }
  const std::filesystem::path& directory() const noexcept { return s_->options.directory; }

  // request_stop(), options.stop_requested, or options.stop_token.
  bool stop_requested() const { return s_->stop_requested(); }
  void request_stop() noexcept { s_->stop_flag.store(true); }

  // The committed checkpoints, oldest first (read from their manifests, not re-verified).
  std::vector<CheckpointInfo> list() const { return detail::list_committed(directory()); }

 private:
  static CheckpointOptions options_for(std::filesystem::path directory) {
    CheckpointOptions options;
    options.directory = std::move(directory);
    return options;
  }

  detail::GuardState<detail::CheckpointGuardState> s_;
};

}  // namespace torchguard
