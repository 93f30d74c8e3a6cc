// The commit protocol and the directory's names. A commit writes every file under a temporary
// name beside the target (hashed with XXH3 while written, fsynced; an unchanged file of the last
// commit is hard-linked instead, incremental.hpp), writes the manifest (size and checksum of
// every file, step, epoch, metrics, LibTorch version, format version) last, fsyncs it, renames
// the temporary to ckpt-<seq>-step-<step>, and fsyncs the directory. The files are described in
// format.hpp, the manifest in manifest.hpp. A crash at any moment leaves either the previous
// checkpoint or the new one, never a mix.
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <ctime>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <torch/version.h>
#include <nlohmann/json.hpp>

#include "torchguard/checkpoint/format.hpp"
#include "torchguard/checkpoint/incremental.hpp"
#include "torchguard/checkpoint/manifest.hpp"
#include "torchguard/checkpoint/options.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/detail/files.hpp"

namespace torchguard {
namespace detail {

// An optimizer that is not built in: its own serialize(), as an archive file.
struct ArchiveFile {
  std::string name;
  std::unique_ptr<torch::serialize::OutputArchive> archive;  // serialized at write time, or
  std::string bytes;                                         // already (a background save)
};

// Everything one commit writes, captured on the caller's thread.
struct Snapshot {
  std::uint64_t sequence = 0;
  std::int64_t step = 0;
  std::int64_t epoch = 0;
  bool complete = false;
  std::int64_t total_steps = 0;
  nlohmann::json metrics = nlohmann::json::object();
  nlohmann::json metadata = nlohmann::json::object();
  nlohmann::json settings = nlohmann::json::object();
  // What the manifest says of the parts: "models", "optimizers", "schedulers", "samplers".
  nlohmann::ordered_json parts = nlohmann::ordered_json::object();
  std::vector<TensorFile> files;  // on the host: live CPU tensors, or staged copies
  std::vector<ArchiveFile> archives;
  std::function<bool()> stop_requested;  // a write interrupted once it says so is abandoned
  std::vector<LinkedFile> links;  // files of an earlier checkpoint, hard-linked (incremental.hpp)
  // Called once the commit is renamed into place, with its path and the manifest's "files".
  std::function<void(const std::filesystem::path&, const nlohmann::ordered_json&)> committed;
};

// A commit whose rename was done but whose directory fsync failed: the checkpoint is in place
// (the next run resumes from it) but may not survive a power loss.
class CheckpointNotDurableError : public CheckpointError {
 public:
  CheckpointNotDurableError(const std::string& message, std::uint64_t bytes)
      : CheckpointError(message), bytes_(bytes) {}
  std::uint64_t bytes() const noexcept { return bytes_; }

 private:
  std::uint64_t bytes_;
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

// Produces the files of a commit other than the manifest: `each(file_name, write)` calls
// write(out) with its own `out` (anything with write(data, size)). Each runs once per snapshot.
template <class Each>
void write_checkpoint_files(Snapshot& snapshot, Each&& each) {
  for (const auto& file : snapshot.files) {
    each(file.name, [&](auto& out) { write_safetensors(out, file.tensors, file.metadata); });
  }
  for (auto& archive : snapshot.archives) {
    each(archive.name, [&](auto& out) {
      if (archive.archive) {
        serialize_archive(*archive.archive,
                          [&](const void* data, std::size_t size) { out.write(data, size); });
      } else {
        out.write(archive.bytes.data(), archive.bytes.size());
      }
    });
  }
}

// Commits `snapshot` into `directory` and returns the bytes written. Throws CheckpointError; on
// error the temporary is removed and every committed checkpoint is as it was. A directory fsync
// that fails after the rename throws CheckpointNotDurableError: the checkpoint is committed.
inline std::uint64_t write_checkpoint(const std::filesystem::path& directory, Snapshot& snapshot) {
  const std::string name = checkpoint_name(snapshot.sequence, snapshot.step);
  const std::filesystem::path final_path = directory / name;
  const std::filesystem::path temporary = directory / fmt::format(".tmp-{}-{}", name, ::getpid());
  std::uint64_t total_bytes = 0;
  try {
    if (::mkdir(temporary.c_str(), 0755) != 0) throw FileError("cannot create", temporary, errno);
    nlohmann::ordered_json files = nlohmann::ordered_json::array();
    auto write_file = [&](const std::string& file_name, auto&& write_content) {
      DurableFile out(temporary / file_name, snapshot.stop_requested);
      write_content(out);
      out.commit();
      total_bytes += out.size();
      files.push_back(
          {{"name", file_name}, {"size", out.size()}, {"xxh3_64", hex64(out.checksum())}});
    };
    write_checkpoint_files(snapshot, write_file);
    for (const auto& link : snapshot.links) {
      files.push_back(place_linked_file(link, temporary, snapshot.stop_requested, total_bytes));
    }
    nlohmann::ordered_json manifest;
    manifest["format_version"] = checkpoint_format_version;
    manifest["sequence"] = snapshot.sequence;
    manifest["step"] = snapshot.step;
    manifest["epoch"] = snapshot.epoch;
    manifest["complete"] = snapshot.complete;
    manifest["total_steps"] = snapshot.total_steps;
    manifest["metrics"] = snapshot.metrics;
    manifest["metadata"] = snapshot.metadata;
    manifest["settings"] = snapshot.settings;
    for (const char* kind : {"models", "optimizers", "schedulers", "samplers"}) {
      manifest[kind] = snapshot.parts.value(kind, nlohmann::ordered_json::object());
    }
    manifest["libtorch_version"] = TORCH_VERSION;
    manifest["created_unix_s"] = static_cast<std::int64_t>(std::time(nullptr));
    manifest["files"] = files;
    const std::string text = manifest_text(manifest);
    DurableFile manifest_file(temporary / manifest_name, snapshot.stop_requested);
    manifest_file.write(text.data(), text.size());
    manifest_file.commit();
    fsync_directory(temporary);
    if (::rename(temporary.c_str(), final_path.c_str()) != 0) {
      throw FileError("cannot rename the temporary checkpoint to", final_path, errno);
    }
    if (snapshot.committed) snapshot.committed(final_path, files);  // must not throw
  } catch (const std::exception& e) {
    std::error_code ignored;
    std::filesystem::remove_all(temporary, ignored);
    throw CheckpointError(fmt::format(
        "CheckpointGuard: cannot save the checkpoint of step {} in '{}': {} (the previous "
        "checkpoints are intact)",
        snapshot.step, directory.string(), error_message(e)));
  }
  try {
    fsync_directory(directory);
  } catch (const std::exception& e) {
    throw CheckpointNotDurableError(
        fmt::format("CheckpointGuard: the checkpoint of step {} is committed as '{}', but {}: it "
                    "may not survive a power loss (older checkpoints are kept)",
                    snapshot.step, final_path.string(), error_message(e)),
        total_bytes);
  }
  return total_bytes;
}

// Committed checkpoint directories, oldest first by sequence number.
inline std::vector<std::filesystem::path> committed_paths(const std::filesystem::path& dir) {
  std::vector<std::pair<std::uint64_t, std::filesystem::path>> found;
  std::error_code error;
  std::filesystem::directory_iterator entries(dir, error);
  if (error && error != std::errc::no_such_file_or_directory) {
    throw CheckpointError(
        fmt::format("CheckpointGuard: cannot list '{}': {}", dir.string(), error.message()));
  }
  for (const auto& entry : entries) {
    if (!entry.is_directory()) continue;
    if (auto sequence = parse_sequence(entry.path().filename().string())) {
      found.emplace_back(*sequence, entry.path());
    }
  }
  std::sort(found.begin(), found.end());
  std::vector<std::filesystem::path> paths;
  for (auto& item : found) paths.push_back(std::move(item.second));
  return paths;
}

// The committed checkpoints with a readable manifest, oldest first (not re-verified).
inline std::vector<CheckpointInfo> list_committed(const std::filesystem::path& dir) {
  std::vector<CheckpointInfo> result;
  for (const auto& path : committed_paths(dir)) {
    try {
      const auto manifest = nlohmann::json::parse(read_whole_file(path / manifest_name));
      result.push_back(
          {path, manifest.at("sequence").get<std::uint64_t>(),
           manifest.at("step").get<std::int64_t>(), manifest.at("epoch").get<std::int64_t>(),
           manifest.value("metrics", nlohmann::json::object()), manifest.value("complete", false)});
    } catch (const std::exception&) {
      // no readable manifest: not a committed checkpoint (a later restore moves it aside)
    }
  }
  return result;
}

// Removes what interrupted saves and deletions left (.tmp-ckpt-*, .trash-ckpt-*) and returns
// the highest sequence number in use, quarantined checkpoints included: numbers are never reused.
inline std::uint64_t remove_leftover_temporaries(const std::filesystem::path& dir,
                                                 spdlog::logger& logger) {
  std::error_code error;
  std::uint64_t highest = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(".tmp-ckpt-", 0) == 0 || name.rfind(".trash-ckpt-", 0) == 0) {
      logger.info("CheckpointGuard: removing '{}', left by an interrupted save",
                  entry.path().string());
      std::error_code ignored;
      std::filesystem::remove_all(entry.path(), ignored);
      continue;
    }
    if (auto sequence = parse_sequence(name)) highest = std::max(highest, *sequence);
  }
  for (const auto& entry : std::filesystem::directory_iterator(dir / "quarantine", error)) {
    if (auto sequence = parse_sequence(entry.path().filename().string())) {
      highest = std::max(highest, *sequence);
    }
  }
  return highest;
}

}  // namespace detail
}  // namespace torchguard
