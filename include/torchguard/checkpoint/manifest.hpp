// A checkpoint's manifest.json, read and checked without LibTorch: its own checksum first (a
// damaged manifest could otherwise change a step, a version or a file's checksum and still
// parse), then its version, then the fields a restore relies on. What it finds is a verdict:
// intact, damaged (the restore moves the checkpoint aside and tries the one before), or newer
// than this build reads (the restore stops: nothing is wrong with the file).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <nlohmann/json.hpp>

#include "torchguard/detail/files.hpp"

namespace torchguard {
namespace detail {

inline constexpr int checkpoint_format_version = 2;
inline constexpr const char* manifest_name = "manifest.json";

// The manifest's own checksum (format 2 on): XXH3 of its JSON without this key, as dump(2)
// writes it.
inline constexpr const char* manifest_checksum_key = "manifest_xxh3_64";
inline std::string manifest_checksum(nlohmann::ordered_json manifest) {
  manifest.erase(manifest_checksum_key);
  return hex64(checksum_of(manifest.dump(2)));
}

// A name with no directory part ("model.safetensors"; not "../x", "/etc/x", "a/b", "." or "").
inline bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

// A file a manifest lists.
struct ManifestFile {
  std::string name;
  std::uint64_t size = 0;
  std::string xxh3_64;  // 16 lowercase hex digits
};

struct ManifestCheck {
  enum class Verdict { intact, damaged, newer };
  Verdict verdict = Verdict::damaged;
  std::string reason;  // why it is damaged, or which version it is
  nlohmann::json manifest;
  int version = 0;
  std::vector<ManifestFile> files;
};

// check_manifest's work once the text parsed; sets `check`'s verdict.
inline void check_fields(ManifestCheck& check, const nlohmann::ordered_json& as_written) {
  auto damaged = [&](std::string reason) {
    check.verdict = ManifestCheck::Verdict::damaged;
    check.reason = std::move(reason);
  };
  // Integrity first: a flipped bit in format_version must read as damage, not as a newer format.
  const auto recorded = as_written.find(manifest_checksum_key);
  if (recorded != as_written.end() &&
      (!recorded->is_string() || *recorded != manifest_checksum(as_written))) {
    return damaged("its manifest fails its own checksum");
  }
  const auto version = as_written.find("format_version");
  if (version == as_written.end() || !version->is_number_integer() ||
      version->get<std::int64_t>() < 1 || version->get<std::int64_t>() > 1'000'000) {
    return damaged("its manifest has no valid format_version");
  }
  check.version = static_cast<int>(version->get<std::int64_t>());
  if (recorded == as_written.end() && check.version != 1) {  // only format 1 had none
    return damaged("its manifest has no checksum of its own");
  }
  check.manifest = as_written;
  if (check.version > checkpoint_format_version) {
    check.verdict = ManifestCheck::Verdict::newer;
    check.reason = fmt::format("format version {}", check.version);
    return;
  }
  const auto& manifest = check.manifest;
  auto unsigned_field = [&](const char* name) {
    const auto it = manifest.find(name);
    return it != manifest.end() && it->is_number_unsigned();
  };
  auto integer_field = [&](const char* name) {
    const auto it = manifest.find(name);
    return it != manifest.end() && it->is_number_integer();
  };
  if (!unsigned_field("sequence") || !integer_field("step") || !integer_field("epoch")) {
    return damaged("its manifest lacks its sequence, step or epoch");
  }
  const auto files = manifest.find("files");
  if (files == manifest.end() || !files->is_array()) return damaged("its manifest lists no files");
  for (const auto& file : *files) {
    const auto name = file.find("name");
    const auto size = file.find("size");
    const auto checksum = file.find("xxh3_64");
    if (!file.is_object() || name == file.end() || !name->is_string() || size == file.end() ||
        !size->is_number_unsigned() || checksum == file.end() || !checksum->is_string()) {
      return damaged("its manifest lists a file without its name, size and checksum");
    }
    // A manifest never makes the reader open anything outside its checkpoint directory.
    if (!is_plain_file_name(name->get<std::string>())) {
      return damaged(
          fmt::format("its manifest lists '{}', which is not a file name in the checkpoint",
                      name->get<std::string>()));
    }
    check.files.push_back(
        {name->get<std::string>(), size->get<std::uint64_t>(), checksum->get<std::string>()});
  }
  check.verdict = ManifestCheck::Verdict::intact;
}

// Checks a manifest's text: never throws for what the text holds.
inline ManifestCheck check_manifest(std::string_view text) {
  ManifestCheck check;
  auto damaged = [&](std::string reason) {
    check.verdict = ManifestCheck::Verdict::damaged;
    check.reason = std::move(reason);
    return check;
  };
  // nlohmann's reader stops at a NUL as if the text ended: what follows would go unread.
  if (text.find('\0') != std::string_view::npos) return damaged("its manifest holds a NUL byte");
  nlohmann::ordered_json as_written;
  try {
    as_written = nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    return damaged(fmt::format("its manifest is unreadable ({})", e.what()));
  }
  if (!as_written.is_object()) return damaged("its manifest is not a JSON object");
  try {
    check_fields(check, as_written);
  } catch (const std::exception& e) {  // a value of an unexpected type, caught by nlohmann
    return damaged(fmt::format("its manifest is malformed ({})", e.what()));
  }
  return check;
}

}  // namespace detail
}  // namespace torchguard
