// libFuzzer harness of the manifest check (checkpoint/manifest.hpp): the input is a manifest.json.
// check_manifest must not throw, whatever the text; its verdict must be consistent; and an
// intact manifest must hold what the restore then relies on without checking again: the JSON it
// reads is the JSON the checksum covers, files are named inside the checkpoint directory, and the
// fields the restore reads outside its own error handling have the types it asks for
// (restore.hpp's verify_checkpoint, guard.hpp's reconcile_settings and load). A random manifest
// rarely has the right checksum (an XXH3 cannot be guessed), so each input that parses is checked
// once more as the writer (manifest_text) would write it: that reaches the checks behind the
// checksum. Built and run by scripts/fuzz.sh.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "torchguard/checkpoint/manifest.hpp"

namespace {

namespace detail = torchguard::detail;
using Verdict = detail::ManifestCheck::Verdict;

// An invariant does not hold: says which, then aborts (libFuzzer saves the input).
[[noreturn]] void broken(const char* what, int line, const std::string& details = {}) {
  std::fprintf(stderr, "\nmanifest fuzz: line %d: %s%s%s\n", line, what,
               details.empty() ? "" : ": ", details.c_str());
  std::abort();
}
#define FUZZ_CHECK(condition) ((condition) ? void(0) : broken(#condition, __LINE__))

detail::ManifestCheck check(std::string_view text) {
  try {
    return detail::check_manifest(text);
  } catch (const std::exception& e) {
    broken("check_manifest threw", __LINE__, e.what());
  } catch (...) {
    broken("check_manifest threw something that is not a std::exception", __LINE__);
  }
}

// How deep the text's arrays and objects nest (strings skipped).
std::size_t nesting(std::string_view text) {
  std::size_t depth = 0, deepest = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;
      if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

// The harness's own recursive work (dump, ==, copies) is skipped deeper than this: the writer
// is never given JSON this deep, and how deep the reader goes is check_manifest's business,
// tested on the input itself.
constexpr std::size_t max_nesting = 256;

// The restore's reads of an intact manifest outside its own try blocks, as it makes them: one
// that throws would escape CheckpointGuard's constructor as nlohmann's exception, not as a
// torchguard::Error, and without moving the checkpoint aside.
void read_as_the_restore_does(const nlohmann::json& manifest) {
  try {
    // restore.hpp, verify_checkpoint
    static_cast<void>(manifest.value("optimizer", "") == "archive");
    // guard.hpp, reconcile_settings
    static_cast<void>(manifest.value("settings", nlohmann::json::object()));
    if (manifest.contains("metadata") && manifest["metadata"].is_object()) {
      static_cast<void>(manifest["metadata"].value("settings", nlohmann::json::object()));
    }
    // guard.hpp, load
    static_cast<void>(manifest.at("step").get<std::int64_t>());
    static_cast<void>(manifest.at("epoch").get<std::int64_t>());
    static_cast<void>(manifest.value("metrics", nlohmann::json::object()));
    static_cast<void>(manifest.value("metadata", nlohmann::json::object()));
    static_cast<void>(manifest.at("sequence").get<std::uint64_t>());
    static_cast<void>(manifest.value("complete", false));
  } catch (const std::exception& e) {
    broken("the restore's reads of an intact manifest throw", __LINE__, e.what());
  }
}

void check_intact(std::string_view text, const detail::ManifestCheck& result) {
  const auto& manifest = result.manifest;
  FUZZ_CHECK(result.version >= 1 && result.version <= detail::checkpoint_format_version);
  FUZZ_CHECK(manifest.is_object());
  FUZZ_CHECK(manifest.at("format_version") == result.version);
  FUZZ_CHECK(manifest.at("sequence").is_number_unsigned());
  FUZZ_CHECK(manifest.at("step").is_number_integer());
  FUZZ_CHECK(manifest.at("epoch").is_number_integer());
  // Only format 1 had no checksum. One that is there covers all the JSON that is read: the text
  // before its line, closed, is the manifest without it.
  const auto key = manifest.find(detail::manifest_checksum_key);
  FUZZ_CHECK(key != manifest.end() || result.version == 1);
  if (key != manifest.end()) {
    const auto line = text.rfind(detail::checksum_line_start);
    FUZZ_CHECK(line != std::string_view::npos);
    FUZZ_CHECK(key->is_string() && key->get<std::string>().size() == 16);
    auto covered = nlohmann::json::parse(std::string(text.substr(0, line)) + "\n}", nullptr,
                                         /*allow_exceptions=*/false);
    FUZZ_CHECK(covered.is_object());
    if (nesting(text) <= max_nesting) {  // == and the copy recurse
      auto read = manifest;
      covered.erase(detail::manifest_checksum_key);
      read.erase(detail::manifest_checksum_key);
      FUZZ_CHECK(covered == read);
    }
  }
  // The files, as listed, each a name inside the checkpoint's directory.
  const auto& files = manifest.at("files");
  FUZZ_CHECK(files.is_array() && files.size() == result.files.size());
  const std::filesystem::path directory = "/checkpoint";
  for (std::size_t i = 0; i < result.files.size(); ++i) {
    const auto& file = result.files[i];
    FUZZ_CHECK(files[i].at("name") == file.name);
    FUZZ_CHECK(files[i].at("size").is_number_unsigned() && files[i].at("size") == file.size);
    FUZZ_CHECK(files[i].at("xxh3_64") == file.xxh3_64);
    FUZZ_CHECK(!file.name.empty() && file.name != "." && file.name != "..");
    FUZZ_CHECK(file.name.find('/') == std::string::npos);
    FUZZ_CHECK(file.name.find('\0') == std::string::npos);
    const std::filesystem::path opened = directory / file.name;  // as the restore opens it
    FUZZ_CHECK(opened.parent_path() == directory && opened.filename() == file.name);
  }
  read_as_the_restore_does(manifest);
}

void check_verdict(std::string_view text, const detail::ManifestCheck& result) {
  switch (result.verdict) {
    case Verdict::damaged:
      FUZZ_CHECK(!result.reason.empty());
      break;
    case Verdict::newer:
      FUZZ_CHECK(!result.reason.empty());
      FUZZ_CHECK(result.version > detail::checkpoint_format_version);
      FUZZ_CHECK(result.manifest.is_object());
      break;
    case Verdict::intact:
      check_intact(text, result);
      break;
    default:
      broken("a verdict that is not one of the three", __LINE__);
  }
}

// The JSON object of `text` without its checksum, as the writer writes a manifest; nullopt when
// the text is not a JSON object the writer could have been given.
std::optional<std::string> rewritten(std::string_view text) {
  if (text.find('\0') != std::string_view::npos) return std::nullopt;  // refused before parsing
  if (nesting(text) > max_nesting) return std::nullopt;                // dump() recurses
  auto manifest = nlohmann::ordered_json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!manifest.is_object()) return std::nullopt;
  manifest.erase(detail::manifest_checksum_key);
  // An empty object is never written (a manifest has its format_version at least), and
  // manifest_text() expects dump(2)'s "{\n...\n}", which "{}" is not.
  if (manifest.empty()) return std::nullopt;
  return detail::manifest_text(manifest);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  check_verdict(text, check(text));
  if (const auto written = rewritten(text)) {
    // What the writer writes, the reader reads back, checksum matched.
    FUZZ_CHECK(detail::check_text_checksum(*written) == std::string());
    const auto parsed = nlohmann::ordered_json::parse(*written, nullptr, false);
    FUZZ_CHECK(parsed.is_object() && parsed.contains(detail::manifest_checksum_key) &&
               parsed[detail::manifest_checksum_key].is_string());
    check_verdict(*written, check(*written));
  }
  return 0;
}
