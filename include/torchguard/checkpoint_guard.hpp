// CheckpointGuard: restore the newest valid checkpoint on entry, save on exit, crash-safe.
//
//   torchguard::CheckpointGuard guard(model, optimizer, "checkpoints");   // restores, if any
//   for (...; ...; ) {
//     ... one training step ...
//     if (guard.step({{"loss", loss}}).stop) break;   // saves every N steps, or on a stop request
//   }
//   // leaving the scope saves (policy: always / on success / never)
//
// Layout: <directory>/ckpt-<seq>-step-<step>/{tensors.bin, state.pt, manifest.json}. tensors.bin
// holds the model's, the built-in optimizers' and the extras' tensors raw (written from tensor
// memory at the disk's speed); state.pt the optimizer groups' settings (and the state of an
// optimizer that is not built in) in LibTorch's archive format. A commit writes everything under a
// temporary name beside the target, fsyncs it, writes the manifest (size and XXH3 checksum of every
// file, step, epoch, metrics, LibTorch version, format version) last, fsyncs it, renames, and
// fsyncs the directory. A crash at any moment leaves either the previous checkpoint or the new one,
// never a mix.
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <torch/version.h>
#include <nlohmann/json.hpp>

#include "torchguard/detail/files.hpp"
#include "torchguard/detail/logging.hpp"
#include "torchguard/detail/optimizer_state.hpp"
#include "torchguard/detail/outcome.hpp"
#include "torchguard/detail/tensor_file.hpp"

namespace torchguard {

// A checkpoint could not be saved or restored; the message names the file and the reason.
class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class SaveOnExit { always, on_success, never };
enum class MetricMode { min, max };

// A module by reference: a torch::nn::Linear (holder), a std::shared_ptr<Net>, or a Net&.
class ModuleRef {
 public:
  template <class T>
  ModuleRef(const torch::nn::ModuleHolder<T>& holder) : module_(holder.ptr()) {}
  template <class T, class = std::enable_if_t<std::is_base_of_v<torch::nn::Module, T>>>
  ModuleRef(std::shared_ptr<T> module) : module_(std::move(module)) {}
  template <class T, class = std::enable_if_t<std::is_base_of_v<torch::nn::Module, T>>>
  ModuleRef(T& module) : module_(std::shared_ptr<torch::nn::Module>(), &module) {}  // not owned
  torch::nn::Module& operator*() const { return *module_; }
  torch::nn::Module* operator->() const { return module_.get(); }

 private:
  std::shared_ptr<torch::nn::Module> module_;
};

struct CheckpointOptions {
  std::filesystem::path directory;  // where checkpoints live (created when missing)
  int keep_last = 3;                // the newest N checkpoints are kept (at least 1)
  int keep_best = 0;                // and the best K by `best_metric`
  std::string best_metric;          // a metric name passed to step()/save()
  MetricMode best_mode = MetricMode::min;
  SaveOnExit save_on_exit = SaveOnExit::always;
  std::int64_t every_n_steps = 0;  // step() saves every N steps (0: only on exit / stop / save())
  bool background = false;         // copy on the caller's thread, write on another
  std::optional<torch::Device> load_device;  // move the model (and extra modules) here, then load
  bool allow_fresh_start = false;    // checkpoints exist but none is valid: start fresh, not fail
  std::function<bool()> is_writer;   // false on processes that must not write (rank != 0)
  std::function<void()> after_save;  // runs on every process after each save point (barrier)
  std::function<bool()> stop_requested;            // e.g. [&] { return session.stop_requested(); }
  torch::optim::LRScheduler* scheduler = nullptr;  // its step count is saved and restored
  std::map<std::string, ModuleRef> modules;        // more modules, saved and restored by name
  std::map<std::string, torch::Tensor> tensors;    // more tensors, restored in place
  std::shared_ptr<spdlog::logger> logger;
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
};

namespace detail {

inline constexpr int checkpoint_format_version = 1;
inline constexpr const char* manifest_name = "manifest.json";
inline constexpr const char* tensors_name = "tensors.bin";
inline constexpr const char* state_name = "state.pt";

// LRScheduler keeps its step count protected; a derived class may name it.
struct SchedulerStepAccess : torch::optim::LRScheduler {
  static unsigned& step_count(torch::optim::LRScheduler& scheduler) {
    return scheduler.*(&SchedulerStepAccess::step_count_);
  }
};

// "ckpt-000042-step-1200" -> 42; nullopt for other names.
inline std::optional<std::uint64_t> parse_sequence(const std::string& name) {
  if (name.rfind("ckpt-", 0) != 0) return std::nullopt;
  std::size_t end = 5;
  while (end < name.size() && std::isdigit(static_cast<unsigned char>(name[end]))) ++end;
  if (end == 5 || end > 5 + 18 || name.compare(end, 6, "-step-") != 0) return std::nullopt;
  return std::stoull(name.substr(5, end - 5));  // at most 18 digits: cannot overflow
}

inline std::string checkpoint_name(std::uint64_t sequence, std::int64_t step) {
  return fmt::format("ckpt-{:06}-step-{}", sequence, step);
}

// Serializes an archive through `sink(data, size)`. Torch must never see our I/O errors (its
// stream writer would throw again from a destructor): the first one is kept and rethrown after.
template <class Sink>
void serialize_archive(torch::serialize::OutputArchive& archive, Sink&& sink) {
  std::exception_ptr error;
  archive.save_to([&](const void* data, std::size_t size) -> std::size_t {
    if (!error) {
      try {
        sink(data, size);
      } catch (...) {
        error = std::current_exception();
      }
    }
    return size;
  });
  if (error) std::rethrow_exception(error);
}

inline std::string serialize_to_memory(torch::serialize::OutputArchive& archive) {
  std::string bytes;
  serialize_archive(archive, [&](const void* data, std::size_t size) {
    bytes.append(static_cast<const char*>(data), size);
  });
  return bytes;
}

inline std::unique_ptr<torch::serialize::OutputArchive> new_archive() {
  return std::make_unique<torch::serialize::OutputArchive>(
      std::make_shared<torch::jit::CompilationUnit>());
}

// A module's parameters and buffers as named tensors under `prefix`.
inline void collect_module_tensors(const torch::nn::Module& module, const std::string& prefix,
                                   std::vector<NamedTensor>& out) {
  for (const auto& parameter : module.named_parameters()) {
    out.push_back({prefix + parameter.key(), parameter.value()});
  }
  for (const auto& buffer : module.named_buffers()) {
    out.push_back({prefix + buffer.key(), buffer.value()});
  }
}

// Copies the tensors under `prefix` into the module's parameters and buffers, which keep their
// device. Strict: a missing, extra or differently shaped tensor is an error that names it.
// Checks that the tensors under `prefix` match the module's parameters and buffers one for one
// (names, shapes, dtypes); throws naming the first that does not. Changes nothing.
inline void check_module_tensors(const torch::nn::Module& module, const std::string& prefix,
                                 const TensorFileView& tensors) {
  std::vector<NamedTensor> targets;
  collect_module_tensors(module, prefix, targets);
  for (const auto& target : targets) {
    const auto stored = tensors.get(target.name);
    if (!stored) throw std::runtime_error(fmt::format("it has no tensor '{}'", target.name));
    if (stored->sizes() != target.tensor.sizes() ||
        stored->scalar_type() != target.tensor.scalar_type()) {
      throw std::runtime_error(
          fmt::format("'{}' is {}{} in the checkpoint, {}{} here", target.name,
                      c10::toString(stored->scalar_type()), c10::str(stored->sizes()),
                      c10::toString(target.tensor.scalar_type()), c10::str(target.tensor.sizes())));
    }
  }
  const auto stored = tensors.names_with_prefix(prefix);
  if (stored.size() != targets.size()) {
    throw std::runtime_error(fmt::format("it has {} tensors under '{}', this module has {}",
                                         stored.size(), prefix, targets.size()));
  }
}

// Copies the tensors under `prefix` into the module's parameters and buffers, which keep their
// device. Call check_module_tensors() first.
inline void load_module_tensors(torch::nn::Module& module, const std::string& prefix,
                                const TensorFileView& tensors) {
  torch::NoGradGuard no_grad;
  std::vector<NamedTensor> targets;
  collect_module_tensors(module, prefix, targets);
  for (auto& target : targets) target.tensor.copy_(*tensors.get(target.name));
}

// Everything one commit writes, captured on the caller's thread.
struct Snapshot {
  std::uint64_t sequence = 0;
  std::int64_t step = 0;
  std::int64_t epoch = 0;
  nlohmann::json metrics = nlohmann::json::object();
  nlohmann::json metadata = nlohmann::json::object();
  std::string optimizer_kind;        // "adam", ...; "archive": in state.pt; "": none
  std::vector<NamedTensor> tensors;  // on the host: live CPU tensors, or staged copies
  std::unique_ptr<torch::serialize::OutputArchive> state;  // serialized at write time, or
  std::string state_bytes;                                 // already serialized
};

}  // namespace detail

class CheckpointGuard {
 public:
  // The seed's form: restore from `directory` now, save there at exit.
  CheckpointGuard(ModuleRef model, torch::optim::Optimizer& optimizer,
                  std::filesystem::path directory)
      : CheckpointGuard(model, &optimizer, options_for(std::move(directory))) {}

  CheckpointGuard(ModuleRef model, torch::optim::Optimizer& optimizer, CheckpointOptions options)
      : CheckpointGuard(model, &optimizer, std::move(options)) {}

  // Without an optimizer: a model (and the options' extras) alone.
  CheckpointGuard(ModuleRef model, CheckpointOptions options)
      : CheckpointGuard(model, nullptr, std::move(options)) {}

  CheckpointGuard(const CheckpointGuard&) = delete;
  CheckpointGuard& operator=(const CheckpointGuard&) = delete;

  // Saves according to the exit policy and waits for a background write. Never throws: errors
  // are logged (call close() to have them thrown).
  ~CheckpointGuard() {
    try {
      close(exit_detector_.outcome());
    } catch (...) {
      logger_->error("CheckpointGuard: {}", detail::describe_exception(std::current_exception()));
    }
    stop_writer_thread();
  }

  // Advances the step with this step's metrics; saves every `every_n_steps` steps, and at once
  // when a stop was requested (the result then says to stop).
  StepResult step(const Metrics& metrics = {}) {
    ++step_;
    saved_this_step_ = false;
    set_metrics(metrics);
    StepResult result;
    result.stop = stop_requested();
    const bool due = options_.every_n_steps > 0 && step_ % options_.every_n_steps == 0;
    if (due || result.stop) {
      save();
      result.saved = true;
    }
    if (result.stop && !stop_logged_) {
      stop_logged_ = true;
      logger_->warn("CheckpointGuard: stop requested; checkpoint saved at step {}", step_);
    }
    return result;
  }

  // Commits a checkpoint of the current state now (queued, when background). Rethrows the error
  // of an earlier background write.
  void save(const Metrics& metrics = {}) {
    set_metrics(metrics);
    saved_this_step_ = true;  // set on every process alike: the exit decision must not diverge
    try {
      if (writer_) commit_or_queue();
      if (options_.after_save && writer_thread_.joinable()) wait();  // the others see it done
    } catch (...) {
      // The other processes are waiting at the fence: reach it before reporting the error.
      if (options_.after_save) options_.after_save();
      throw;
    }
    if (options_.after_save) options_.after_save();
  }

  // Waits for a background write in flight; rethrows its error.
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    idle_.wait(lock, [&] { return !pending_ && !writing_; });
    rethrow_background_error(lock);
  }

  // Ends the guard's work: saves according to the exit policy, waits for the writer, and throws
  // what went wrong. Idempotent.
  void close(Outcome outcome) {
    if (closed_) return;
    closed_ = true;
    const bool save_now =
        options_.save_on_exit == SaveOnExit::always ||
        (options_.save_on_exit == SaveOnExit::on_success && outcome == Outcome::success);
    std::exception_ptr error;
    try {
      wait();  // a background write in flight, and its error
    } catch (...) {
      error = std::current_exception();
    }
    try {
      if (save_now && !saved_this_step_) {
        save();
      } else if (save_now && (error || last_commit_failed_) && writer_) {
        // The last save point's write failed: write the final state once more. No fence: the
        // other processes consider this step saved.
        commit_or_queue();
      } else if (save_now) {
        logger_->info("CheckpointGuard: step {} is already saved", step_);
      }
      wait();
    } catch (...) {
      if (!error) error = std::current_exception();
    }
    if (error) std::rethrow_exception(error);
  }

  std::int64_t current_step() const noexcept { return step_; }
  void set_step(std::int64_t step) noexcept { step_ = step; }
  std::int64_t epoch() const noexcept { return epoch_; }
  void set_epoch(std::int64_t epoch) noexcept { epoch_ = epoch; }
  // The metrics given last to step() or save().
  const nlohmann::json& metrics() const noexcept { return metrics_; }
  // The metrics of the checkpoint training resumed from (empty after a fresh start).
  const nlohmann::json& resumed_metrics() const noexcept { return resumed_metrics_; }
  // User metadata, saved in every manifest and restored on entry.
  nlohmann::json& metadata() noexcept { return metadata_; }

  bool resumed() const noexcept { return resumed_from_.has_value(); }
  const std::optional<std::filesystem::path>& resumed_from() const noexcept {
    return resumed_from_;
  }
  const std::filesystem::path& directory() const noexcept { return options_.directory; }

  bool stop_requested() const {
    return stop_flag_.load() || (options_.stop_requested && options_.stop_requested());
  }
  void request_stop() noexcept { stop_flag_.store(true); }

  // The committed checkpoints, oldest first (read from their manifests, not re-verified).
  std::vector<CheckpointInfo> list() const { return list_committed(options_.directory); }

 private:
  static CheckpointOptions options_for(std::filesystem::path directory) {
    CheckpointOptions options;
    options.directory = std::move(directory);
    return options;
  }

  CheckpointGuard(ModuleRef model, torch::optim::Optimizer* optimizer, CheckpointOptions options)
      : model_(std::move(model)),
        optimizer_(optimizer),
        options_(std::move(options)),
        logger_(detail::or_default(options_.logger)) {
    validate_options();
    writer_ = !options_.is_writer || options_.is_writer();
    std::error_code error;
    const bool created = std::filesystem::create_directories(options_.directory, error);
    if (error && !std::filesystem::is_directory(options_.directory)) {
      throw CheckpointError(fmt::format("CheckpointGuard: cannot create the directory '{}': {}",
                                        options_.directory.string(), error.message()));
    }
    if (created && writer_) {  // the new directory's own entry must survive a crash too
      detail::fsync_directory(std::filesystem::absolute(options_.directory).parent_path());
    }
    if (writer_) remove_leftover_temporaries();
    restore();
    if (options_.background && writer_) writer_thread_ = std::thread([this] { writer_loop(); });
  }

  void validate_options() const {
    auto invalid = [](const std::string& what) {
      throw std::invalid_argument("CheckpointGuard: " + what);
    };
    if (options_.directory.empty()) invalid("options.directory is empty");
    if (options_.keep_last < 1) invalid("keep_last must be at least 1");
    if (options_.keep_best < 0) invalid("keep_best must not be negative");
    if (options_.keep_best > 0 && options_.best_metric.empty()) {
      invalid("keep_best needs best_metric: the metric that decides which checkpoint is best");
    }
    if (options_.every_n_steps < 0) invalid("every_n_steps must not be negative");
    if (std::filesystem::exists(options_.directory) &&
        !std::filesystem::is_directory(options_.directory)) {
      invalid(fmt::format("'{}' is a file, not a checkpoint directory (a torch::save file?)",
                          options_.directory.string()));
    }
  }

  void set_metrics(const Metrics& metrics) {
    if (metrics.empty()) return;
    metrics_ = nlohmann::json::object();
    for (const auto& [name, value] : metrics) {
      metrics_[name] = std::isfinite(value) ? nlohmann::json(value) : nlohmann::json(nullptr);
    }
  }

  // ---- restore --------------------------------------------------------------------------

  void restore() {
    std::vector<std::filesystem::path> candidates = committed_paths(options_.directory);
    const auto quarantined = committed_paths(options_.directory / "quarantine");
    if (candidates.empty() && quarantined.empty()) {
      logger_->info("CheckpointGuard: no checkpoint in '{}': starting fresh",
                    options_.directory.string());
      return;
    }
    // Newest first; a damaged one is moved aside and the one before it is tried.
    for (auto it = candidates.rbegin(); it != candidates.rend(); ++it) {
      std::map<std::string, std::unique_ptr<detail::MappedFile>> contents;
      nlohmann::json manifest;
      const std::string problem = verify(*it, manifest, contents);
      if (!problem.empty()) {
        quarantine(*it, problem);
        continue;
      }
      load(*it, manifest, contents);
      return;
    }
    // Damaged checkpoints moved aside by an earlier run count too: a rerun must not quietly
    // start over what that run refused to start over.
    const std::string message = fmt::format(
        "CheckpointGuard: no valid checkpoint in '{}' ({} damaged, moved to '{}'); refusing to "
        "start fresh over them (set allow_fresh_start to do so)",
        options_.directory.string(), candidates.size() + quarantined.size(),
        (options_.directory / "quarantine").string());
    if (!options_.allow_fresh_start) throw CheckpointError(message);
    logger_->warn("{}: starting fresh because allow_fresh_start is set", message);
  }

  // An I/O error that says nothing about the checkpoint itself (EACCES, EIO, EMFILE, ...): the
  // restore stops with it instead of moving a checkpoint that may be fine aside.
  [[noreturn]] static void fail_restore(const std::filesystem::path& path,
                                        const std::exception& e) {
    throw CheckpointError(
        fmt::format("CheckpointGuard: cannot read checkpoint '{}': {}", path.string(), e.what()));
  }
  static bool is_missing(const detail::FileError& e) { return e.error_number() == ENOENT; }

  // Empty when the checkpoint is complete and intact; otherwise the reason it is damaged.
  static std::string verify(const std::filesystem::path& path, nlohmann::json& manifest,
                            std::map<std::string, std::unique_ptr<detail::MappedFile>>& contents) {
    try {
      manifest = nlohmann::json::parse(detail::read_whole_file(path / detail::manifest_name));
    } catch (const detail::FileError& e) {
      if (!is_missing(e)) fail_restore(path, e);
      return "it has no manifest (an interrupted save or deletion)";
    } catch (const std::exception& e) {
      return fmt::format("its manifest is unreadable ({})",
                         detail::first_part_of_message(e.what()));
    }
    try {
      if (manifest.at("format_version").get<int>() > detail::checkpoint_format_version) {
        throw CheckpointError(fmt::format(
            "CheckpointGuard: checkpoint '{}' has format version {}, newer than this build of "
            "torchguard reads ({}): upgrade torchguard",
            path.string(), manifest.at("format_version").get<int>(),
            detail::checkpoint_format_version));
      }
      for (const auto& file : manifest.at("files")) {
        const std::string name = file.at("name").get<std::string>();
        std::unique_ptr<detail::MappedFile> file_content;
        try {
          file_content = std::make_unique<detail::MappedFile>(path / name);
        } catch (const detail::FileError& e) {
          if (!is_missing(e)) fail_restore(path, e);
          return fmt::format("{} is missing", name);
        }
        const std::string_view bytes = file_content->bytes();
        const auto expected_size = file.at("size").get<std::uint64_t>();
        if (bytes.size() != expected_size) {
          return fmt::format("{} has {} bytes, its manifest says {} (truncated?)", name,
                             bytes.size(), expected_size);
        }
        const std::string checksum = detail::hex64(detail::checksum_of(bytes));
        if (checksum != file.at("xxh3_64").get<std::string>()) {
          return fmt::format("{} fails its checksum (xxh3 {} instead of {})", name, checksum,
                             file.at("xxh3_64").get<std::string>());
        }
        contents.emplace(name, std::move(file_content));
      }
      for (const char* required : {detail::tensors_name, detail::state_name}) {
        if (!contents.count(required)) return fmt::format("its manifest lists no {}", required);
      }
    } catch (const nlohmann::json::exception& e) {
      return fmt::format("its manifest is malformed ({})", e.what());
    }
    return {};
  }

  void quarantine(const std::filesystem::path& path, const std::string& reason) {
    logger_->warn("CheckpointGuard: checkpoint '{}' is damaged: {}; moving it aside", path.string(),
                  reason);
    if (!writer_) return;  // another process owns the directory; it will move it
    const std::filesystem::path aside_dir = options_.directory / "quarantine";
    std::error_code error;
    std::filesystem::create_directories(aside_dir, error);
    std::filesystem::path target = aside_dir / path.filename();
    for (int i = 1; std::filesystem::exists(target); ++i) {
      target = aside_dir / fmt::format("{}.{}", path.filename().string(), i);
    }
    std::filesystem::rename(path, target, error);
    if (error) {
      logger_->error("CheckpointGuard: cannot move '{}' aside: {}", path.string(), error.message());
      return;
    }
    std::FILE* note = std::fopen((target / "QUARANTINE_REASON.txt").c_str(), "w");
    if (note) {
      std::fprintf(note, "%s\n", reason.c_str());
      std::fclose(note);
    }
    logger_->warn("CheckpointGuard: moved to '{}'", target.string());
  }

  void load(const std::filesystem::path& path, const nlohmann::json& manifest,
            const std::map<std::string, std::unique_ptr<detail::MappedFile>>& contents) {
    try {
      if (options_.load_device) {
        model_->to(*options_.load_device);
        for (auto& [name, module] : options_.modules) module->to(*options_.load_device);
      }
      const detail::TensorFileView tensors(contents.at(detail::tensors_name)->bytes());
      const std::string_view state_bytes = contents.at(detail::state_name)->bytes();
      torch::serialize::InputArchive state;
      state.load_from(state_bytes.data(), state_bytes.size(), torch::Device(torch::kCPU));
      // Everything is checked before anything changes: a checkpoint that does not fit leaves
      // the model as it was.
      detail::check_module_tensors(*model_, "model/", tensors);
      for (auto& [name, module] : options_.modules) {
        detail::check_module_tensors(*module, "module/" + name + "/", tensors);
      }
      for (auto& [name, tensor] : options_.tensors) {
        const auto stored = tensors.get("tensor/" + name);
        if (!stored) throw CheckpointError(fmt::format("it holds no tensor '{}'", name));
        if (stored->sizes() != tensor.sizes()) {
          throw CheckpointError(fmt::format("tensor '{}' is {} in the checkpoint, {} here", name,
                                            c10::str(stored->sizes()), c10::str(tensor.sizes())));
        }
      }
      detail::load_module_tensors(*model_, "model/", tensors);
      for (auto& [name, module] : options_.modules) {
        detail::load_module_tensors(*module, "module/" + name + "/", tensors);
      }
      for (auto& [name, tensor] : options_.tensors) {
        torch::NoGradGuard no_grad;
        tensor.copy_(*tensors.get("tensor/" + name));
      }
      if (optimizer_) load_optimizer(manifest.value("optimizer", ""), tensors, state);
      load_generators(tensors);
      if (options_.scheduler) {
        if (const auto count = tensors.get("scheduler/step_count")) {
          detail::SchedulerStepAccess::step_count(*options_.scheduler) =
              static_cast<unsigned>(count->item<std::int64_t>());
        }
      }
    } catch (const std::exception& e) {
      // The files are intact (checksums match): the program's model does not match them.
      throw CheckpointError(fmt::format(
          "CheckpointGuard: checkpoint '{}' is intact but does not fit this program's model or "
          "optimizer: {}",
          path.string(), detail::first_part_of_message(e.what())));
    }
    step_ = manifest.at("step").get<std::int64_t>();
    epoch_ = manifest.at("epoch").get<std::int64_t>();
    resumed_metrics_ = manifest.value("metrics", nlohmann::json::object());
    metrics_ = nlohmann::json::object();  // a new checkpoint must not carry the old metrics
    metadata_ = manifest.value("metadata", nlohmann::json::object());
    sequence_ = std::max(sequence_, manifest.at("sequence").get<std::uint64_t>());
    resumed_from_ = path;
    logger_->info("CheckpointGuard: resumed from step {} (epoch {}) of '{}'", step_, epoch_,
                  path.string());
  }

  void load_optimizer(const std::string& kind, const detail::TensorFileView& tensors,
                      torch::serialize::InputArchive& state) {
    if (kind.empty()) throw CheckpointError("it holds no optimizer state");
    if (kind == "archive") {
      torch::serialize::InputArchive archive;
      state.read("optimizer", archive);
      optimizer_->load(archive);
    } else if (!detail::load_optimizer_state(*optimizer_, kind, tensors)) {
      throw CheckpointError("its optimizer state is of a built-in " + kind +
                            " optimizer, not this program's");
    }
    // LibTorch's own optimizer load keeps the state but drops each group's settings (lr, ...).
    auto& groups = optimizer_->param_groups();
    for (std::size_t i = 0; i < groups.size(); ++i) {
      torch::serialize::InputArchive group;
      if (!state.try_read(fmt::format("optimizer_group/{}", i), group)) {
        throw CheckpointError(
            fmt::format("it holds the settings of fewer than {} optimizer groups", groups.size()));
      }
      groups[i].options().serialize(group);
    }
  }

  // An RNG state from another LibTorch version may not fit this one's generator: resuming goes
  // on (with a warning), only not bitwise.
  void set_generator_state(at::Generator generator, const torch::Tensor& state,
                           const std::string& which) const {
    try {
      std::lock_guard<std::mutex> lock(generator.mutex());
      generator.set_state(state.clone());
    } catch (const std::exception& e) {
      logger_->warn("CheckpointGuard: cannot restore the {} RNG state ({}); resuming without it",
                    which, detail::first_part_of_message(e.what()));
    }
  }

  void load_generators(const detail::TensorFileView& tensors) const {
    if (const auto rng = tensors.get("rng/cpu")) {
      set_generator_state(at::detail::getDefaultCPUGenerator(), *rng, "CPU");
    }
    const auto cuda_devices = static_cast<int>(torch::cuda::device_count());
    for (int index = 0; index < cuda_devices; ++index) {
      const auto rng = tensors.get(fmt::format("rng/cuda/{}", index));
      if (!rng) continue;  // saved on a machine with fewer GPUs
      set_generator_state(at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, index)),
                          *rng, fmt::format("CUDA:{}", index));
    }
  }

  // ---- save -----------------------------------------------------------------------------

  detail::Snapshot take_snapshot(bool background) {
    detail::Snapshot snapshot;
    snapshot.sequence = ++sequence_;
    snapshot.step = step_;
    snapshot.epoch = epoch_;
    snapshot.metrics = metrics_;
    snapshot.metadata = metadata_;
    std::vector<detail::NamedTensor> live;
    detail::collect_module_tensors(*model_, "model/", live);
    for (const auto& [name, module] : options_.modules) {
      detail::collect_module_tensors(*module, "module/" + name + "/", live);
    }
    for (const auto& [name, tensor] : options_.tensors) live.push_back({"tensor/" + name, tensor});
    snapshot.state = detail::new_archive();
    if (optimizer_) {
      if (auto kind = detail::save_optimizer_state(*optimizer_, live)) {
        snapshot.optimizer_kind = *kind;
      } else {  // not a built-in optimizer: its own serialize(), slower but complete
        snapshot.optimizer_kind = "archive";
        torch::serialize::OutputArchive archive(snapshot.state->compilation_unit());
        optimizer_->save(archive);
        snapshot.state->write("optimizer", archive);
      }
      const auto& groups = optimizer_->param_groups();
      for (std::size_t i = 0; i < groups.size(); ++i) {
        torch::serialize::OutputArchive group(snapshot.state->compilation_unit());
        groups[i].options().serialize(group);
        snapshot.state->write(fmt::format("optimizer_group/{}", i), group);
      }
    }
    {
      auto generator = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(generator.mutex());
      live.push_back({"rng/cpu", generator.get_state()});
    }
    const auto cuda_devices = static_cast<int>(torch::cuda::device_count());
    for (int index = 0; index < cuda_devices; ++index) {
      auto generator = at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, index));
      std::lock_guard<std::mutex> lock(generator.mutex());
      live.push_back({fmt::format("rng/cuda/{}", index), generator.get_state()});
    }
    if (options_.scheduler) {
      const auto count = detail::SchedulerStepAccess::step_count(*options_.scheduler);
      live.push_back({"scheduler/step_count", torch::tensor(static_cast<std::int64_t>(count))});
    }
    if (background) {
      // Copied here, on the caller's thread, into a reused host buffer: training may go on
      // while the writer thread writes the copy. The small state archive is serialized now.
      snapshot.tensors = staging_.stage(live);
      snapshot.state_bytes = detail::serialize_to_memory(*snapshot.state);
      snapshot.state.reset();
    } else {
      // Written straight from the tensors' memory (a host copy only for device tensors).
      snapshot.tensors.reserve(live.size());
      for (auto& item : live) {
        snapshot.tensors.push_back({std::move(item.name), detail::host_tensor(item.tensor)});
      }
    }
    return snapshot;
  }

  void commit_or_queue() {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      rethrow_background_error(lock);
    }
    if (!writer_thread_.joinable()) {
      detail::Snapshot snapshot = take_snapshot(false);
      last_commit_failed_ = true;
      write_checkpoint(snapshot);
      last_commit_failed_ = false;
      return;
    }
    // At most one write in flight: wait for the previous one before copying the next.
    std::unique_lock<std::mutex> lock(mutex_);
    idle_.wait(lock, [&] { return !pending_ && !writing_; });
    rethrow_background_error(lock);
    lock.unlock();
    auto snapshot = std::make_unique<detail::Snapshot>(take_snapshot(true));
    lock.lock();
    pending_ = std::move(snapshot);
    last_commit_failed_ = false;  // until the writer reports otherwise
    wake_writer_.notify_one();
  }

  void rethrow_background_error(std::unique_lock<std::mutex>&) {
    if (background_error_) {
      last_commit_failed_ = true;
      std::exception_ptr error = std::exchange(background_error_, nullptr);
      std::rethrow_exception(error);
    }
  }

  void writer_loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_writer_.wait(lock, [&] { return pending_ || stopping_; });
      if (!pending_) return;  // stopping, nothing left
      std::unique_ptr<detail::Snapshot> snapshot = std::move(pending_);
      writing_ = true;
      lock.unlock();
      std::exception_ptr error;
      try {
        write_checkpoint(*snapshot);
      } catch (...) {
        error = std::current_exception();
      }
      snapshot.reset();
      lock.lock();
      writing_ = false;
      if (error && !background_error_) background_error_ = error;
      idle_.notify_all();
    }
  }

  void stop_writer_thread() noexcept {
    if (!writer_thread_.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_writer_.notify_all();
    writer_thread_.join();
  }

  // The commit protocol. Throws CheckpointError; on error the temporary is removed and every
  // committed checkpoint is as it was.
  void write_checkpoint(detail::Snapshot& snapshot) {
    const auto started = std::chrono::steady_clock::now();
    const std::string name = detail::checkpoint_name(snapshot.sequence, snapshot.step);
    const std::filesystem::path final_path = options_.directory / name;
    const std::filesystem::path temporary =
        options_.directory / fmt::format(".tmp-{}-{}", name, ::getpid());
    std::uint64_t total_bytes = 0;
    try {
      if (::mkdir(temporary.c_str(), 0755) != 0) {
        throw detail::FileError("cannot create", temporary, errno);
      }
      nlohmann::ordered_json files = nlohmann::ordered_json::array();
      auto write_file = [&](const char* file_name, auto&& write_content) {
        detail::DurableFile out(temporary / file_name);
        write_content(out);
        out.commit();
        total_bytes += out.size();
        files.push_back({{"name", file_name},
                         {"size", out.size()},
                         {"xxh3_64", detail::hex64(out.checksum())}});
      };
      write_file(detail::tensors_name, [&](detail::DurableFile& out) {
        detail::write_tensor_file(out, snapshot.tensors);
      });
      write_file(detail::state_name, [&](detail::DurableFile& out) {
        if (snapshot.state) {
          detail::serialize_archive(
              *snapshot.state, [&](const void* data, std::size_t size) { out.write(data, size); });
        } else {
          out.write(snapshot.state_bytes.data(), snapshot.state_bytes.size());
        }
      });
      nlohmann::ordered_json manifest;
      manifest["format_version"] = detail::checkpoint_format_version;
      manifest["sequence"] = snapshot.sequence;
      manifest["step"] = snapshot.step;
      manifest["epoch"] = snapshot.epoch;
      manifest["metrics"] = snapshot.metrics;
      manifest["metadata"] = snapshot.metadata;
      manifest["optimizer"] = snapshot.optimizer_kind;
      manifest["libtorch_version"] = TORCH_VERSION;
      manifest["created_unix_s"] = static_cast<std::int64_t>(std::time(nullptr));
      manifest["files"] = files;
      const std::string text = manifest.dump(2) + "\n";
      detail::DurableFile manifest_file(temporary / detail::manifest_name);
      manifest_file.write(text.data(), text.size());
      manifest_file.commit();
      detail::fsync_directory(temporary);
      if (::rename(temporary.c_str(), final_path.c_str()) != 0) {
        throw detail::FileError("cannot rename the temporary checkpoint to", final_path, errno);
      }
      detail::fsync_directory(options_.directory);
    } catch (const std::exception& e) {
      std::error_code ignored;
      std::filesystem::remove_all(temporary, ignored);
      throw CheckpointError(fmt::format(
          "CheckpointGuard: cannot save the checkpoint of step {} in '{}': {} (the previous "
          "checkpoints are intact)",
          snapshot.step, options_.directory.string(), detail::first_part_of_message(e.what())));
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    logger_->info("CheckpointGuard: saved step {} to '{}' ({:.1f} MiB in {:.2f} s)", snapshot.step,
                  final_path.string(), static_cast<double>(total_bytes) / (1024.0 * 1024.0),
                  seconds);
    try {
      apply_retention();  // the commit is done: a failure to delete old ones is not a save failure
    } catch (const std::exception& e) {
      logger_->warn("CheckpointGuard: retention after step {} failed: {}", snapshot.step, e.what());
    }
  }

  // ---- directory ------------------------------------------------------------------------

  // Committed checkpoint directories, oldest first by sequence number.
  static std::vector<std::filesystem::path> committed_paths(const std::filesystem::path& dir) {
    std::vector<std::pair<std::uint64_t, std::filesystem::path>> found;
    std::error_code error;
    std::filesystem::directory_iterator entries(dir, error);
    if (error && error != std::errc::no_such_file_or_directory) {
      throw CheckpointError(
          fmt::format("CheckpointGuard: cannot list '{}': {}", dir.string(), error.message()));
    }
    for (const auto& entry : entries) {
      if (!entry.is_directory()) continue;
      if (auto sequence = detail::parse_sequence(entry.path().filename().string())) {
        found.emplace_back(*sequence, entry.path());
      }
    }
    std::sort(found.begin(), found.end());
    std::vector<std::filesystem::path> paths;
    for (auto& item : found) paths.push_back(std::move(item.second));
    return paths;
  }

  static std::vector<CheckpointInfo> list_committed(const std::filesystem::path& dir) {
    std::vector<CheckpointInfo> result;
    for (const auto& path : committed_paths(dir)) {
      try {
        const auto manifest =
            nlohmann::json::parse(detail::read_whole_file(path / detail::manifest_name));
        result.push_back({path, manifest.at("sequence").get<std::uint64_t>(),
                          manifest.at("step").get<std::int64_t>(),
                          manifest.at("epoch").get<std::int64_t>(),
                          manifest.value("metrics", nlohmann::json::object())});
      } catch (const std::exception&) {
        // no readable manifest: not a committed checkpoint (a later restore moves it aside)
      }
    }
    return result;
  }

  void remove_leftover_temporaries() {
    std::error_code error;
    std::uint64_t highest = 0;
    for (const auto& entry : std::filesystem::directory_iterator(options_.directory, error)) {
      const std::string name = entry.path().filename().string();
      if (name.rfind(".tmp-ckpt-", 0) == 0 || name.rfind(".trash-ckpt-", 0) == 0) {
        logger_->info("CheckpointGuard: removing '{}', left by an interrupted save",
                      entry.path().string());
        std::error_code ignored;
        std::filesystem::remove_all(entry.path(), ignored);
        continue;
      }
      if (auto sequence = detail::parse_sequence(name)) highest = std::max(highest, *sequence);
    }
    // Sequence numbers are never reused, not even those of checkpoints moved aside.
    for (const auto& entry :
         std::filesystem::directory_iterator(options_.directory / "quarantine", error)) {
      if (auto sequence = detail::parse_sequence(entry.path().filename().string())) {
        highest = std::max(highest, *sequence);
      }
    }
    sequence_ = highest;
  }

  // Keeps the newest keep_last, the best keep_best, and the one training resumed from.
  void apply_retention() {
    std::vector<CheckpointInfo> all = list_committed(options_.directory);
    std::set<std::filesystem::path> keep;
    for (std::size_t i = 0; i < all.size(); ++i) {
      if (i + static_cast<std::size_t>(options_.keep_last) >= all.size()) keep.insert(all[i].path);
    }
    if (options_.keep_best > 0) {
      std::vector<std::pair<double, std::filesystem::path>> scored;
      for (const auto& info : all) {
        const auto it = info.metrics.find(options_.best_metric);
        if (it == info.metrics.end() || !it->is_number()) continue;  // NaN is stored as null
        const double value = it->get<double>();
        if (!std::isfinite(value)) continue;
        scored.emplace_back(options_.best_mode == MetricMode::min ? value : -value, info.path);
      }
      std::sort(scored.begin(), scored.end());
      for (std::size_t i = 0; i < scored.size() && i < static_cast<std::size_t>(options_.keep_best);
           ++i) {
        keep.insert(scored[i].second);
      }
    }
    if (resumed_from_) keep.insert(*resumed_from_);
    for (const auto& info : all) {
      if (keep.count(info.path)) continue;
      // Renamed first: a deletion cut short leaves a .trash- directory (removed at the next
      // start-up), never a half-deleted checkpoint that still looks committed.
      const auto trash = info.path.parent_path() / (".trash-" + info.path.filename().string());
      std::error_code error;
      std::filesystem::rename(info.path, trash, error);
      if (!error) std::filesystem::remove_all(trash, error);
      if (error) {
        logger_->warn("CheckpointGuard: cannot remove old checkpoint '{}': {}", info.path.string(),
                      error.message());
      }
    }
  }

  ModuleRef model_;
  torch::optim::Optimizer* optimizer_;
  CheckpointOptions options_;
  std::shared_ptr<spdlog::logger> logger_;
  detail::UncaughtExceptionDetector exit_detector_;
  bool writer_ = true;
  std::int64_t step_ = 0;
  std::int64_t epoch_ = 0;
  std::uint64_t sequence_ = 0;
  nlohmann::json metrics_ = nlohmann::json::object();
  nlohmann::json resumed_metrics_ = nlohmann::json::object();
  nlohmann::json metadata_ = nlohmann::json::object();
  std::optional<std::filesystem::path> resumed_from_;
  bool saved_this_step_ = false;
  bool last_commit_failed_ = false;  // the newest save point's write did not commit  // set by
                                     // save(), cleared by step(): the exit save may skip
  std::atomic<bool> stop_flag_{false};
  bool stop_logged_ = false;
  bool closed_ = false;

  // Background writer: one snapshot pending at most, one being written.
  std::mutex mutex_;
  std::condition_variable wake_writer_;
  std::condition_variable idle_;
  std::unique_ptr<detail::Snapshot> pending_;
  bool writing_ = false;
  bool stopping_ = false;
  std::exception_ptr background_error_;
  detail::HostStaging staging_;  // reused by background snapshots (one in flight at most)
  std::thread writer_thread_;
};

}  // namespace torchguard
