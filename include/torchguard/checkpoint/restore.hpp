// Finding the checkpoint to resume from: the newest one whose files all match their manifest
// (sizes, XXH3 checksums, all checked before anything loads). A damaged one is moved to
// quarantine/ with a QUARANTINE_REASON.txt and the one before it is tried; an I/O error that says
// nothing about the checkpoint (EACCES, EIO, ...) stops the restore instead.
#pragma once

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
#include "torchguard/checkpoint/options.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/detail/files.hpp"

namespace torchguard {
namespace detail {

// A checkpoint whose files matched their manifest, mapped for loading.
struct VerifiedCheckpoint {
  std::filesystem::path path;
  nlohmann::json manifest;
  std::map<std::string, std::unique_ptr<MappedFile>> files;  // by name
  std::string_view bytes(const std::string& name) const { return files.at(name)->bytes(); }
};

// A name with no directory part ("model.safetensors"; not "../x", "/etc/x", "a/b", "." or "").
inline bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

[[noreturn]] inline void fail_restore(const std::filesystem::path& path, const std::exception& e) {
  throw CheckpointError(fmt::format("CheckpointGuard: cannot read checkpoint '{}': {}",
                                    path.string(), error_message(e)));
}

// Empty when the checkpoint at `path` is complete and intact (then `out` holds it); otherwise
// the reason it is damaged. Throws CheckpointError for an I/O error other than a missing file,
// and for a format newer than this build reads.
inline std::string verify_checkpoint(const std::filesystem::path& path, VerifiedCheckpoint& out) {
  out.path = path;
  out.files.clear();
  nlohmann::ordered_json as_written;
  try {
    as_written = nlohmann::ordered_json::parse(read_whole_file(path / manifest_name));
    out.manifest = as_written;
  } catch (const FileError& e) {
    if (e.error_number() != ENOENT) fail_restore(path, e);
    return "it has no manifest (an interrupted save or deletion)";
  } catch (const std::exception& e) {
    return fmt::format("its manifest is unreadable ({})", error_message(e));
  }
  try {
    const int version = out.manifest.at("format_version").get<int>();
    if (version > checkpoint_format_version) {
      throw CheckpointError(fmt::format(
          "CheckpointGuard: checkpoint '{}' has format version {}, newer than this build of "
          "torchguard reads ({}): upgrade torchguard",
          path.string(), version, checkpoint_format_version));
    }
    if (version >= 2) {
      const auto recorded = as_written.find(manifest_checksum_key);
      if (recorded == as_written.end()) return "its manifest has no checksum of its own";
      if (!recorded->is_string() || *recorded != manifest_checksum(as_written)) {
        return "its manifest fails its own checksum";
      }
    }
    for (const auto& file : out.manifest.at("files")) {
      const std::string name = file.at("name").get<std::string>();
      // A manifest never makes the reader open anything outside its checkpoint directory.
      if (!is_plain_file_name(name)) {
        return fmt::format("its manifest lists '{}', which is not a file name in the checkpoint",
                           name);
      }
      std::unique_ptr<MappedFile> content;
      try {
        content = std::make_unique<MappedFile>(path / name);
      } catch (const FileError& e) {
        if (e.error_number() != ENOENT) fail_restore(path, e);
        return fmt::format("{} is missing", name);
      }
      const std::string_view bytes = content->bytes();
      const auto expected_size = file.at("size").get<std::uint64_t>();
      if (bytes.size() != expected_size) {
        return fmt::format("{} has {} bytes, its manifest says {} (truncated?)", name, bytes.size(),
                           expected_size);
      }
      const std::string checksum = hex64(checksum_of(bytes));
      const std::string expected = file.at("xxh3_64").get<std::string>();
      if (checksum != expected) {
        return fmt::format("{} fails its checksum (xxh3 {} instead of {})", name, checksum,
                           expected);
      }
      out.files.emplace(name, std::move(content));
    }
    const bool archive = out.manifest.value("optimizer", "") == "archive";
    const std::vector<const char*> required =
        version < 2 ? std::vector<const char*>{format1_tensors_name, state_name}
        : archive   ? std::vector<const char*>{model_file, extra_file, state_name}
                    : std::vector<const char*>{model_file, extra_file};
    for (const char* name : required) {
      if (!out.files.count(name)) return fmt::format("its manifest lists no {}", name);
    }
  } catch (const nlohmann::json::exception& e) {
    return fmt::format("its manifest is malformed ({})", e.what());
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

// Calls `load(const VerifiedCheckpoint&)` with the newest intact checkpoint of
// options.directory, quarantining damaged ones on the way. Returns false for a fresh start;
// throws CheckpointError when checkpoints exist (or were quarantined) but none is valid, unless
// allow_fresh_start.
template <class Load>
bool restore_newest(const CheckpointOptions& options, bool writer, spdlog::logger& logger,
                    Load&& load) {
  const auto candidates = committed_paths(options.directory);
  const auto quarantined = committed_paths(options.directory / "quarantine");
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
      "start fresh over them (set allow_fresh_start to do so)",
      options.directory.string(), candidates.size() + quarantined.size(),
      (options.directory / "quarantine").string());
  if (!options.allow_fresh_start) throw CheckpointError(message);
  logger.warn("{}: starting fresh because allow_fresh_start is set", message);
  return false;
}

}  // namespace detail
}  // namespace torchguard
