// Finding the checkpoint to resume from: the newest one whose files all match their manifest
// (its own checksum, then the files' sizes and XXH3 checksums, all checked before anything
// loads). A damaged one (a read error included) is moved to quarantine/ with a
// QUARANTINE_REASON.txt and the one before it is tried; an I/O error that says nothing about the
// checkpoint (EACCES, ...) stops the restore instead.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "torchguard/checkpoint/commit.hpp"
#include "torchguard/checkpoint/format.hpp"
#include "torchguard/checkpoint/format_v1.hpp"
#include "torchguard/checkpoint/manifest.hpp"
#include "torchguard/checkpoint/options.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/detail/files.hpp"

namespace torchguard {
namespace detail {

// A checkpoint whose files matched their manifest, read into memory for loading.
struct VerifiedCheckpoint {
  std::filesystem::path path;
  nlohmann::json manifest;
  std::map<std::string, std::unique_ptr<FileBytes>> files;  // by name
  std::string_view bytes(const std::string& name) const { return files.at(name)->bytes(); }
};

// An I/O error while reading a checkpoint's file: a failing disk or a file cut short reads as
// damage (the checkpoint before it is tried); one that says nothing about the checkpoint
// (EACCES, EMFILE, ENOMEM, ...) stops the restore.
inline bool is_damage(int error_number) {
  return error_number == EIO || error_number == ENOENT || error_number == ENXIO ||
         error_number == EBADMSG || error_number == ESTALE || error_number == EISDIR;
}

[[noreturn]] inline void fail_restore(const std::filesystem::path& path, const std::exception& e) {
  throw CheckpointError(fmt::format("CheckpointGuard: cannot read checkpoint '{}': {}",
                                    path.string(), error_message(e)));
}

// Empty when the checkpoint at `path` is complete and intact (then `out` holds it); otherwise
// the reason it is damaged. The manifest's own checksum is checked before anything it says is
// believed. Throws CheckpointError for an I/O error that is not damage (is_damage), and for an
// intact manifest of a format newer than this build reads.
inline std::string verify_checkpoint(const std::filesystem::path& path, VerifiedCheckpoint& out) {
  out.path = path;
  out.files.clear();
  std::string text;
  try {
    text = read_whole_file(path / manifest_name);
  } catch (const FileError& e) {
    if (e.error_number() == ENOENT) return "it has no manifest (an interrupted save or deletion)";
    if (!is_damage(e.error_number())) fail_restore(path, e);
    return fmt::format("its manifest cannot be read ({})", error_message(e));
  }
  const ManifestCheck check = check_manifest(text);
  if (check.verdict == ManifestCheck::Verdict::damaged) return check.reason;
  if (check.verdict == ManifestCheck::Verdict::newer) {
    throw CheckpointError(fmt::format(
        "CheckpointGuard: checkpoint '{}' has format version {}, newer than this build of "
        "torchguard reads ({}): upgrade torchguard",
        path.string(), check.version, checkpoint_format_version));
  }
  out.manifest = check.manifest;
  for (const auto& file : check.files) {
    std::unique_ptr<FileBytes> content;
    try {
      content = std::make_unique<FileBytes>(path / file.name);
    } catch (const FileError& e) {
      if (e.error_number() == ENOENT) return fmt::format("{} is missing", file.name);
      if (!is_damage(e.error_number())) fail_restore(path, e);
      return fmt::format("{} cannot be read ({})", file.name, error_message(e));
    }
    if (content->bytes().size() != file.size) {
      return fmt::format("{} has {} bytes, its manifest says {} (truncated?)", file.name,
                         content->bytes().size(), file.size);
    }
    const std::string checksum = hex64(content->checksum());
    if (checksum != file.xxh3_64) {
      return fmt::format("{} fails its checksum (xxh3 {} instead of {})", file.name, checksum,
                         file.xxh3_64);
    }
    out.files.emplace(file.name, std::move(content));
  }
  // Format 3's parts each name a file the manifest lists (check_manifest).
  const bool archive = out.manifest.value("optimizer", "") == "archive";
  const std::vector<const char*> required =
      check.version >= 3  ? std::vector<const char*>{extra_file}
      : check.version < 2 ? std::vector<const char*>{format1_tensors_name, state_name}
      : archive           ? std::vector<const char*>{model_file, extra_file, state_name}
                          : std::vector<const char*>{model_file, extra_file};
  for (const char* name : required) {
    if (!out.files.count(name)) return fmt::format("its manifest lists no {}", name);
  }
  return {};
}

// Moves a damaged checkpoint to <directory>/quarantine/ (never deletes it), with the reason in
// QUARANTINE_REASON.txt. A process that does not write only logs: the writing one moves it.
inline void quarantine_checkpoint(const std::filesystem::path& directory,
                                  const std::filesystem::path& path, const std::string& reason,
                                  bool writer, spdlog::logger& logger) {
  logger.warn("CheckpointGuard: checkpoint '{}' is damaged: {}; moving it aside", path.string(),
              reason);
  if (!writer) return;
  const std::filesystem::path aside_dir = directory / "quarantine";
  std::error_code error;
  std::filesystem::create_directories(aside_dir, error);
  std::filesystem::path target = aside_dir / path.filename();
  for (int i = 1; std::filesystem::exists(target); ++i) {
    target = aside_dir / fmt::format("{}.{}", path.filename().string(), i);
  }
  std::filesystem::rename(path, target, error);
  if (error) {
    logger.error("CheckpointGuard: cannot move '{}' aside: {}", path.string(), error.message());
    return;
  }
  if (std::FILE* note = std::fopen((target / "QUARANTINE_REASON.txt").c_str(), "w")) {
    std::fprintf(note, "%s\n", reason.c_str());
    std::fclose(note);
  }
  logger.warn("CheckpointGuard: moved to '{}'", target.string());
}

// The checkpoint of `paths` (oldest first) that `wanted` names: a checkpoint's directory name,
// or a step (the newest checkpoint of that step). Empty when none.
inline std::filesystem::path find_checkpoint(const std::vector<std::filesystem::path>& paths,
                                             const std::string& wanted) {
  for (auto it = paths.rbegin(); it != paths.rend(); ++it) {
    const std::string name = it->filename().string();
    if (name == wanted) return *it;
    const auto at = name.find("-step-");
    if (at != std::string::npos && name.substr(at + 6) == wanted) return *it;
  }
  return {};
}

// Calls `load(const VerifiedCheckpoint&)` with the checkpoint options.restore names: by default
// the newest intact one of options.directory, quarantining damaged ones on the way. Returns
// false for a fresh start. Throws NoValidCheckpointError when checkpoints exist (or were
// quarantined) but none is valid, unless allow_fresh_start, and when the one asked for is
// missing or damaged.
template <class Load>
bool restore_newest(const CheckpointOptions& options, bool writer, spdlog::logger& logger,
                    Load&& load) {
  const auto candidates = committed_paths(options.directory);
  const auto quarantined = committed_paths(options.directory / "quarantine");
  const std::string& wanted = options.restore;
  if (wanted == "none") {
    logger.info("CheckpointGuard: starting fresh (restore = \"none\"){}",
                candidates.empty()
                    ? std::string()
                    : fmt::format(": the {} checkpoints in '{}' stay until retention replaces "
                                  "them",
                                  candidates.size(), options.directory.string()));
    return false;
  }
  if (!wanted.empty() && wanted != "latest") {
    const auto path = find_checkpoint(candidates, wanted);
    if (path.empty()) {
      std::string there;
      for (const auto& candidate : candidates) {
        there += fmt::format("{}{}", there.empty() ? "" : ", ", candidate.filename().string());
      }
      throw NoValidCheckpointError(fmt::format(
          "CheckpointGuard: no checkpoint '{}' in '{}' (restore names a step or a checkpoint; "
          "there {})",
          wanted, options.directory.string(),
          there.empty() ? std::string("are none") : "are: " + there));
    }
    VerifiedCheckpoint checkpoint;
    const std::string problem = verify_checkpoint(path, checkpoint);
    if (!problem.empty()) {
      quarantine_checkpoint(options.directory, path, problem, writer, logger);
      throw NoValidCheckpointError(
          fmt::format("CheckpointGuard: checkpoint '{}', which restore names, is damaged: {}",
                      path.string(), problem));
    }
    if (path != candidates.back()) {
      logger.warn(
          "CheckpointGuard: restoring '{}' as asked, though {} newer checkpoints exist (they "
          "stay until retention replaces them)",
          path.filename().string(),
          candidates.end() - std::find(candidates.begin(), candidates.end(), path) - 1);
    }
    load(checkpoint);
    return true;
  }
  if (candidates.empty() && quarantined.empty()) {
    logger.info("CheckpointGuard: no checkpoint in '{}': starting fresh",
                options.directory.string());
    return false;
  }
  for (auto it = candidates.rbegin(); it != candidates.rend(); ++it) {
    VerifiedCheckpoint checkpoint;
    const std::string problem = verify_checkpoint(*it, checkpoint);
    if (!problem.empty()) {
      quarantine_checkpoint(options.directory, *it, problem, writer, logger);
      continue;
    }
    load(checkpoint);
    return true;
  }
  // Damaged checkpoints moved aside by an earlier run count too: a rerun must not quietly
  // start over what that run refused to start over.
  const std::string message = fmt::format(
      "CheckpointGuard: no valid checkpoint in '{}' ({} damaged, moved to '{}'); refusing to "
      "start fresh over them (restore = \"none\", or allow_fresh_start, does)",
      options.directory.string(), candidates.size() + quarantined.size(),
      (options.directory / "quarantine").string());
  if (!options.allow_fresh_start) throw NoValidCheckpointError(message);
  logger.warn("{}: starting fresh because allow_fresh_start is set", message);
  return false;
}

}  // namespace detail
}  // namespace torchguard
