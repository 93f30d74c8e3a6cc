// A checkpoint's manifest.json, read and checked without LibTorch: its own checksum first (a
// damaged manifest could otherwise change a step, a version or a file's checksum and still
// parse), then its version, then the fields a restore relies on. What it finds is a verdict:
// intact, damaged (the restore moves the checkpoint aside and tries the one before), or newer
// than this build reads (the restore stops: nothing is wrong with the file).
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <nlohmann/json.hpp>

#include "torchguard/detail/files.hpp"

namespace torchguard {
namespace detail {

// Written, and the newest read. Format 4 added a part's shared file (format.hpp): a reader of
// format 3 would load such a part without its unchanged tensors, so it must refuse it.
inline constexpr int checkpoint_format_version = 4;
inline constexpr const char* manifest_name = "manifest.json";

// The manifest's own checksum: its last key, on a line of its own,
//   ...,\n  "manifest_xxh3_64": "<16 hex digits>"\n}\n
// is the XXH3-64 of the text before that line followed by "\n}": the JSON without the key, as
// its writer wrote it (JSON with a two-space indent, as nlohmann's dump(2) and Python's
// json.dumps(indent=2) both write). It is checked on the bytes, whatever wrote them, with
// nothing re-serialized (formats 2 and 3 alike).
inline constexpr const char* manifest_checksum_key = "manifest_xxh3_64";
inline constexpr std::string_view checksum_line_start = ",\n  \"manifest_xxh3_64\": \"";

// The checksum of a manifest without its key, as manifest_text() writes it.
inline std::string manifest_checksum(nlohmann::ordered_json manifest) {
  manifest.erase(manifest_checksum_key);
  return hex64(checksum_of(manifest.dump(2)));
}

// The text of a manifest (without the checksum key) with its checksum.
inline std::string manifest_text(const nlohmann::ordered_json& manifest) {
  const std::string body = manifest.dump(2);  // "{\n  ...\n}"
  return fmt::format("{}{}{}\"\n}}\n", body.substr(0, body.size() - 2), checksum_line_start,
                     hex64(checksum_of(body)));
}

// Checks the checksum line of `text`: "" when it matches, else why not; nullopt when the text
// has no checksum line (format 1).
inline std::optional<std::string> check_text_checksum(std::string_view text) {
  const auto at = text.rfind(checksum_line_start);
  if (at == std::string_view::npos) return std::nullopt;
  std::string_view rest = text.substr(at + checksum_line_start.size());
  const std::string_view hex = rest.substr(0, 16);
  rest.remove_prefix(hex.size());
  const bool hex_digits = hex.size() == 16 && std::all_of(hex.begin(), hex.end(), [](char c) {
                            return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
                          });
  if (!hex_digits || (rest != "\"\n}" && rest != "\"\n}\n")) {
    return std::string("its manifest's checksum line is malformed, or not its last");
  }
  std::string body(text.substr(0, at));
  body += "\n}";
  if (hex64(checksum_of(body)) != hex) return std::string("its manifest fails its own checksum");
  return std::string();
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

inline constexpr int max_manifest_depth = 64;

// The deepest nesting of JSON containers in `text` (brackets in strings not counted).
inline int json_depth(std::string_view text) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      deepest = std::max(deepest, ++depth);
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return deepest;
}

// check_manifest's work once the text parsed; sets `check`'s verdict.
// `verified`: the text's checksum line was found and matched.
inline void check_fields(ManifestCheck& check, const nlohmann::ordered_json& as_written,
                         bool verified) {
  auto damaged = [&](std::string reason) {
    check.verdict = ManifestCheck::Verdict::damaged;
    check.reason = std::move(reason);
  };
  // Integrity first (check_manifest checked the text's checksum line): a flipped bit in
  // format_version must read as damage, not as a newer format.
  const auto recorded = as_written.find(manifest_checksum_key);
  const auto version = as_written.find("format_version");
  if (version == as_written.end() || !version->is_number_integer() ||
      version->get<std::int64_t>() < 1 || version->get<std::int64_t>() > 1'000'000) {
    return damaged("its manifest has no valid format_version");
  }
  check.version = static_cast<int>(version->get<std::int64_t>());
  if (recorded == as_written.end() && check.version != 1) {  // only format 1 had none
    return damaged("its manifest has no checksum of its own");
  }
  if (recorded != as_written.end() && !verified) {
    return damaged("its manifest's checksum is not on the last line of its own");
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
  // What a restore reads besides, of the type it reads: present or not (older formats).
  auto optional_of = [&](const char* name, auto is_type) {
    const auto it = manifest.find(name);
    return it == manifest.end() || is_type(*it);
  };
  const auto object = [](const nlohmann::json& j) { return j.is_object() || j.is_null(); };
  if (!optional_of("metrics", object) || !optional_of("metadata", object) ||
      !optional_of("complete", [](const nlohmann::json& j) { return j.is_boolean(); }) ||
      !optional_of("optimizer", [](const nlohmann::json& j) { return j.is_string(); }) ||
      !optional_of("optimizer_groups",
                   [](const nlohmann::json& j) {
                     return j.is_array() &&
                            std::all_of(j.begin(), j.end(),
                                        [](const nlohmann::json& g) { return g.is_object(); });
                   }) ||
      !optional_of("settings", object)) {
    return damaged("its manifest holds a field of the wrong type");
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
  if (check.version >= 3) {
    auto lists = [&](const nlohmann::json& name) {
      return name.is_string() && std::any_of(check.files.begin(), check.files.end(),
                                             [&](const ManifestFile& f) { return f.name == name; });
    };
    // A part's file, and its shared file when it has one (format 4), each one the manifest lists.
    auto listed = [&](const nlohmann::json& part) {
      const auto file = part.find("file");
      const auto shared = part.find("shared_file");
      return file != part.end() && lists(*file) &&
             (shared == part.end() || (lists(*shared) && *shared != *file));
    };
    auto parts_of = [&](const char* kind) -> const nlohmann::json* {
      const auto it = manifest.find(kind);
      return it != manifest.end() && it->is_object() ? &*it : nullptr;
    };
    const auto* models = parts_of("models");
    const auto* optimizers = parts_of("optimizers");
    const auto* schedulers = parts_of("schedulers");
    const auto* samplers = parts_of("samplers");
    const auto* settings = parts_of("settings");
    if (!models || !optimizers || !schedulers || !samplers || !settings) {
      return damaged("its manifest lacks its models, optimizers, schedulers, samplers or settings");
    }
    for (const auto& [name, model] : models->items()) {
      if (!model.is_object() || !listed(model)) {
        return damaged(fmt::format("its manifest's model '{}' names no file it lists", name));
      }
    }
    for (const auto& [name, optimizer] : optimizers->items()) {
      const auto kind = optimizer.find("kind");
      const auto groups = optimizer.find("param_groups");
      if (!optimizer.is_object() || !listed(optimizer) || kind == optimizer.end() ||
          !kind->is_string() || groups == optimizer.end() || !groups->is_array() ||
          !std::all_of(groups->begin(), groups->end(),
                       [](const nlohmann::json& group) { return group.is_object(); })) {
        return damaged(fmt::format(
            "its manifest's optimizer '{}' lacks its kind, file or param_groups", name));
      }
    }
    for (const auto& [name, scheduler] : schedulers->items()) {
      const auto count = scheduler.find("step_count");
      if (!scheduler.is_object() || count == scheduler.end() || !count->is_number_unsigned()) {
        return damaged(fmt::format("its manifest's scheduler '{}' has no step_count", name));
      }
    }
    const auto complete = manifest.find("complete");
    if (complete == manifest.end() || !complete->is_boolean() || !unsigned_field("total_steps")) {
      return damaged("its manifest lacks complete or total_steps");
    }
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
  // A manifest is shallow; nlohmann copies and prints JSON recursively, so depth is refused
  // before it parses.
  if (json_depth(text) > max_manifest_depth) {
    return damaged(fmt::format("its manifest nests deeper than {} levels", max_manifest_depth));
  }
  const auto checksum_problem = check_text_checksum(text);
  if (checksum_problem && !checksum_problem->empty()) return damaged(*checksum_problem);
  nlohmann::ordered_json as_written;
  try {
    as_written = nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    return damaged(fmt::format("its manifest is unreadable ({})", e.what()));
  }
  if (!as_written.is_object()) return damaged("its manifest is not a JSON object");
  try {
    check_fields(check, as_written, checksum_problem.has_value());
  } catch (const std::exception& e) {  // a value of an unexpected type, caught by nlohmann
    return damaged(fmt::format("its manifest is malformed ({})", e.what()));
  }
  return check;
}

}  // namespace detail
}  // namespace torchguard
