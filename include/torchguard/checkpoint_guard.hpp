// CheckpointGuard: restore the newest valid checkpoint on entry, save on exit, crash-safe.
//
//   torchguard::CheckpointGuard guard(model, optimizer, "checkpoints");   // restores, if any
//   for (...; ...; ) {
//     ... one training step ...
//     if (guard.step({{"loss", loss}}).stop) break;   // saves every N steps, or on a stop request
//   }
//   // leaving the scope saves (policy: always / on success / never)
//
// Layout: <directory>/ckpt-<seq>-step-<step>/{model.pt, optimizer.pt, state.pt, manifest.json}.
// model.pt and optimizer.pt are what torch::save(model) / torch::save(optimizer) write, so
// torch::load reads them too. A commit writes everything under a temporary name beside the
// target, fsyncs it, writes the manifest (size and XXH3 checksum of every file, step, epoch,
// metrics, LibTorch version, format version) last, fsyncs it, renames, and fsyncs the directory.
// A crash at any moment leaves either the previous checkpoint or the new one, never a mix.
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
#include "torchguard/detail/outcome.hpp"

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
  std::optional<torch::Device> load_device;  // where restored tensors go; default: the model's
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
  if (end == 5 || name.compare(end, 6, "-step-") != 0) return std::nullopt;
  return std::stoull(name.substr(5, end - 5));
}

inline std::string checkpoint_name(std::uint64_t sequence, std::int64_t step) {
  return fmt::format("ckpt-{:06}-step-{}", sequence, step);
}

// Copies a module's parameters and buffers to host memory, in the layout Module::save writes,
// so that the copy can be serialized on another thread while training goes on.
inline void snapshot_module(const torch::nn::Module& module, torch::serialize::OutputArchive& out) {
  for (const auto& parameter : module.named_parameters(/*recurse=*/false)) {
    out.write(parameter.key(), parameter.value().detach().to(torch::kCPU, false, true), false);
  }
  for (const auto& buffer : module.named_buffers(/*recurse=*/false)) {
    out.write(buffer.key(), buffer.value().detach().to(torch::kCPU, false, true), true);
  }
  for (const auto& child : module.named_children()) {
    if (!child.value()->is_serializable()) continue;
    torch::serialize::OutputArchive child_archive(out.compilation_unit());
    snapshot_module(*child.value(), child_archive);
    out.write(child.key(), child_archive);
  }
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

// One file of a checkpoint, ready to write: an archive to serialize, or bytes already serialized.
struct PendingFile {
  std::string name;
  std::unique_ptr<torch::serialize::OutputArchive> archive;
  std::string bytes;
};

// Everything one commit writes, captured on the caller's thread.
struct Snapshot {
  std::uint64_t sequence = 0;
  std::int64_t step = 0;
  std::int64_t epoch = 0;
  nlohmann::json metrics = nlohmann::json::object();
  nlohmann::json metadata = nlohmann::json::object();
  std::vector<PendingFile> files;
};

inline std::unique_ptr<torch::serialize::OutputArchive> new_archive() {
  return std::make_unique<torch::serialize::OutputArchive>(
      std::make_shared<torch::jit::CompilationUnit>());
}

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
    if (writer_) commit_or_queue();
    if (options_.after_save) {
      if (writer_thread_.joinable()) wait();  // the others must see the commit done
      options_.after_save();
    }
    saved_this_step_ = true;
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
      if (save_now && saved_this_step_) {
        logger_->info("CheckpointGuard: step {} is already saved", step_);
      } else if (save_now) {
        save();
      }
    } catch (...) {
      error = std::current_exception();
    }
    try {
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
  // The metrics given last (restored ones after a resume).
  const nlohmann::json& metrics() const noexcept { return metrics_; }
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
    std::filesystem::create_directories(options_.directory, error);
    if (error && !std::filesystem::is_directory(options_.directory)) {
      throw CheckpointError(fmt::format("CheckpointGuard: cannot create the directory '{}': {}",
                                        options_.directory.string(), error.message()));
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
    if (candidates.empty()) {
      logger_->info("CheckpointGuard: no checkpoint in '{}': starting fresh",
                    options_.directory.string());
      return;
    }
    // Newest first; a damaged one is moved aside and the one before it is tried.
    for (auto it = candidates.rbegin(); it != candidates.rend(); ++it) {
      std::map<std::string, std::string> contents;
      nlohmann::json manifest;
      const std::string problem = verify(*it, manifest, contents);
      if (!problem.empty()) {
        quarantine(*it, problem);
        continue;
      }
      load(*it, manifest, contents);
      return;
    }
    const std::string message = fmt::format(
        "CheckpointGuard: none of the {} checkpoints in '{}' is valid (each was moved to '{}'); "
        "refusing to start fresh over them (set allow_fresh_start to do so)",
        candidates.size(), options_.directory.string(),
        (options_.directory / "quarantine").string());
    if (!options_.allow_fresh_start) throw CheckpointError(message);
    logger_->warn("{}: starting fresh because allow_fresh_start is set", message);
  }

  // Empty when the checkpoint is complete and intact; otherwise the reason it is not.
  static std::string verify(const std::filesystem::path& path, nlohmann::json& manifest,
                            std::map<std::string, std::string>& contents) {
    try {
      manifest = nlohmann::json::parse(detail::read_whole_file(path / detail::manifest_name));
    } catch (const std::exception& e) {
      return fmt::format("its manifest is unreadable ({})",
                         detail::first_part_of_message(e.what()));
    }
    try {
      if (manifest.at("format_version").get<int>() > detail::checkpoint_format_version) {
        return fmt::format("its format version {} is newer than this build reads ({})",
                           manifest.at("format_version").get<int>(),
                           detail::checkpoint_format_version);
      }
      for (const auto& file : manifest.at("files")) {
        const std::string name = file.at("name").get<std::string>();
        std::string bytes;
        try {
          bytes = detail::read_whole_file(path / name);
        } catch (const std::exception& e) {
          return fmt::format("{} is unreadable ({})", name, e.what());
        }
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
        contents.emplace(name, std::move(bytes));
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

  torch::Device load_device() const {
    if (options_.load_device) return *options_.load_device;
    for (const auto& parameter : model_->parameters()) return parameter.device();
    return torch::kCPU;
  }

  void load(const std::filesystem::path& path, const nlohmann::json& manifest,
            const std::map<std::string, std::string>& contents) {
    const torch::Device device = load_device();
    auto archive_of = [&](const std::string& name) {
      const std::string& bytes = contents.at(name);
      torch::serialize::InputArchive archive;
      archive.load_from(bytes.data(), bytes.size(), device);
      return archive;
    };
    try {
      {
        auto archive = archive_of("model.pt");
        model_->load(archive);
      }
      if (optimizer_) {
        if (!contents.count("optimizer.pt")) {
          throw CheckpointError("it holds no optimizer state, but an optimizer was given");
        }
        auto archive = archive_of("optimizer.pt");
        optimizer_->load(archive);
      }
      auto state = archive_of("state.pt");
      load_state(state);
    } catch (const std::exception& e) {
      // The files are intact (checksums match): the program's model does not match them.
      throw CheckpointError(fmt::format(
          "CheckpointGuard: checkpoint '{}' is intact but does not fit this program's model or "
          "optimizer: {}",
          path.string(), detail::first_part_of_message(e.what())));
    }
    step_ = manifest.at("step").get<std::int64_t>();
    epoch_ = manifest.at("epoch").get<std::int64_t>();
    metrics_ = manifest.value("metrics", nlohmann::json::object());
    metadata_ = manifest.value("metadata", nlohmann::json::object());
    sequence_ = std::max(sequence_, manifest.at("sequence").get<std::uint64_t>());
    resumed_from_ = path;
    logger_->info("CheckpointGuard: resumed from step {} (epoch {}) of '{}'", step_, epoch_,
                  path.string());
  }

  void load_state(torch::serialize::InputArchive& state) {
    auto read = [&](const std::string& key) -> std::optional<torch::Tensor> {
      torch::Tensor value;  // undefined: the archive's tensor is taken as it is
      if (!state.try_read(key, value)) return std::nullopt;
      return value;
    };
    if (optimizer_) {
      auto& groups = optimizer_->param_groups();
      for (std::size_t i = 0; i < groups.size(); ++i) {
        torch::serialize::InputArchive group;
        if (!state.try_read(fmt::format("optimizer_group/{}", i), group)) {
          throw CheckpointError(fmt::format(
              "it holds the settings of fewer than {} optimizer groups", groups.size()));
        }
        groups[i].options().serialize(group);
      }
    }
    if (options_.scheduler) {
      if (auto count = read("scheduler_step_count")) {
        detail::SchedulerStepAccess::step_count(*options_.scheduler) =
            static_cast<unsigned>(count->item<std::int64_t>());
      }
    }
    if (auto rng = read("rng/cpu")) {
      auto generator = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(generator.mutex());
      generator.set_state(rng->cpu());
    }
    const auto cuda_devices = static_cast<int>(torch::cuda::device_count());
    for (int index = 0; index < cuda_devices; ++index) {
      auto rng = read(fmt::format("rng/cuda/{}", index));
      if (!rng) continue;  // saved on a machine with fewer GPUs
      auto generator = at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, index));
      std::lock_guard<std::mutex> lock(generator.mutex());
      generator.set_state(rng->cpu());
    }
    for (auto& [name, module] : options_.modules) {
      torch::serialize::InputArchive child;
      if (!state.try_read("module/" + name, child)) {
        throw CheckpointError(fmt::format("it holds no module '{}'", name));
      }
      module->load(child);
    }
    for (auto& [name, tensor] : options_.tensors) {
      auto stored = read("tensor/" + name);
      if (!stored) throw CheckpointError(fmt::format("it holds no tensor '{}'", name));
      torch::NoGradGuard no_grad;
      tensor.copy_(*stored);
    }
  }

  // ---- save -----------------------------------------------------------------------------

  detail::Snapshot take_snapshot(bool copy_to_host) {
    detail::Snapshot snapshot;
    snapshot.sequence = ++sequence_;
    snapshot.step = step_;
    snapshot.epoch = epoch_;
    snapshot.metrics = metrics_;
    snapshot.metadata = metadata_;
    // Synchronous saves serialize the live tensors directly; background ones first copy them to
    // host memory here, on the caller's thread, so training may go on while they are written.
    detail::PendingFile model{"model.pt", detail::new_archive(), {}};
    if (copy_to_host) {
      detail::snapshot_module(*model_, *model.archive);
    } else {
      model_->save(*model.archive);
    }
    snapshot.files.push_back(std::move(model));
    if (optimizer_) {
      detail::PendingFile optimizer{"optimizer.pt", detail::new_archive(), {}};
      optimizer_->save(*optimizer.archive);
      if (copy_to_host) {
        // Optimizer state is updated in place by the next step: serialize it now.
        optimizer.bytes = detail::serialize_to_memory(*optimizer.archive);
        optimizer.archive.reset();
      }
      snapshot.files.push_back(std::move(optimizer));
    }
    snapshot.files.push_back({"state.pt", state_archive(copy_to_host), {}});
    return snapshot;
  }

  std::unique_ptr<torch::serialize::OutputArchive> state_archive(bool copy_to_host) {
    auto archive = detail::new_archive();
    auto copy = [&](const torch::Tensor& tensor) {
      return copy_to_host ? tensor.detach().to(torch::kCPU, false, true) : tensor.detach();
    };
    if (optimizer_) {
      // LibTorch's optimizer load keeps the state but drops each group's settings (lr, ...).
      const auto& groups = optimizer_->param_groups();
      for (std::size_t i = 0; i < groups.size(); ++i) {
        torch::serialize::OutputArchive group(archive->compilation_unit());
        groups[i].options().serialize(group);
        archive->write(fmt::format("optimizer_group/{}", i), group);
      }
    }
    if (options_.scheduler) {
      const auto count = detail::SchedulerStepAccess::step_count(*options_.scheduler);
      archive->write("scheduler_step_count", torch::tensor(static_cast<std::int64_t>(count)));
    }
    {
      auto generator = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(generator.mutex());
      archive->write("rng/cpu", generator.get_state());
    }
    const auto cuda_devices = static_cast<int>(torch::cuda::device_count());
    for (int index = 0; index < cuda_devices; ++index) {
      auto generator = at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, index));
      std::lock_guard<std::mutex> lock(generator.mutex());
      archive->write(fmt::format("rng/cuda/{}", index), generator.get_state());
    }
    for (const auto& [name, module] : options_.modules) {
      torch::serialize::OutputArchive child(archive->compilation_unit());
      if (copy_to_host) {
        detail::snapshot_module(*module, child);
      } else {
        module->save(child);
      }
      archive->write("module/" + name, child);
    }
    for (const auto& [name, tensor] : options_.tensors)
      archive->write("tensor/" + name, copy(tensor));
    return archive;
  }

  void commit_or_queue() {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      rethrow_background_error(lock);
    }
    if (!writer_thread_.joinable()) {
      detail::Snapshot snapshot = take_snapshot(false);
      write_checkpoint(snapshot);
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
    wake_writer_.notify_one();
  }

  void rethrow_background_error(std::unique_lock<std::mutex>&) {
    if (background_error_) {
      saved_this_step_ = false;  // that save did not happen: the exit must not skip its own
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
      for (auto& file : snapshot.files) {
        detail::DurableFile out(temporary / file.name);
        if (file.archive) {
          detail::serialize_archive(
              *file.archive, [&](const void* data, std::size_t size) { out.write(data, size); });
        } else {
          out.write(file.bytes.data(), file.bytes.size());
        }
        out.commit();
        total_bytes += out.size();
        files.push_back({{"name", file.name},
                         {"size", out.size()},
                         {"xxh3_64", detail::hex64(out.checksum())}});
      }
      nlohmann::ordered_json manifest;
      manifest["format_version"] = detail::checkpoint_format_version;
      manifest["sequence"] = snapshot.sequence;
      manifest["step"] = snapshot.step;
      manifest["epoch"] = snapshot.epoch;
      manifest["metrics"] = snapshot.metrics;
      manifest["metadata"] = snapshot.metadata;
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
    apply_retention();
  }

  // ---- directory ------------------------------------------------------------------------

  // Committed checkpoint directories, oldest first by sequence number.
  static std::vector<std::filesystem::path> committed_paths(const std::filesystem::path& dir) {
    std::vector<std::pair<std::uint64_t, std::filesystem::path>> found;
    std::error_code error;
    for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
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
      if (name.rfind(".tmp-ckpt-", 0) == 0) {
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
      std::error_code error;
      std::filesystem::remove_all(info.path, error);
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
  nlohmann::json metadata_ = nlohmann::json::object();
  std::optional<std::filesystem::path> resumed_from_;
  bool saved_this_step_ = false;  // set by save(), cleared by step(): the exit save may skip
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
  std::thread writer_thread_;
};

}  // namespace torchguard
