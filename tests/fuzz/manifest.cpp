// libFuzzer harness of the manifest check (checkpoint/manifest.hpp): the input is a manifest.json.
// check_manifest must not throw, whatever the text; its verdict must be consistent; and an
// intact manifest must hold what the restore then relies on without checking again: files named
// inside the checkpoint directory, the fields it reads with at()/get()/value() of the types they
// ask for (restore.hpp, state.hpp, guard.hpp). A random manifest rarely has the right checksum
// (an XXH3 cannot be guessed), so each input that parses is also checked once more with its
// checksum made right: that reaches the checks behind it. Built and run by scripts/fuzz.sh.
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

// The reason check_manifest gives for a wrong checksum, read from it once (see
// LLVMFuzzerInitialize), so that the harness follows the header's wording.
std::string checksum_failure;

detail::ManifestCheck check(std::string_view text) {
  try {
    return detail::check_manifest(text);
  } catch (const std::exception& e) {
    broken("check_manifest threw", __LINE__, e.what());
  } catch (...) {
    broken("check_manifest threw something that is not a std::exception", __LINE__);
  }
}

// The restore's reads of an intact manifest, as it makes them (they must not throw).
void read_as_the_restore_does(const nlohmann::json& manifest) {
  try {
    // restore.hpp, verify_checkpoint; state.hpp, load
    const bool archive = manifest.value("optimizer", "") == "archive";
    static_cast<void>(archive);
    static_cast<void>(manifest.at("format_version").get<int>());
    // guard.hpp, load
    static_cast<void>(manifest.at("step").get<std::int64_t>());
    static_cast<void>(manifest.at("epoch").get<std::int64_t>());
    static_cast<void>(manifest.value("metrics", nlohmann::json::object()));
    static_cast<void>(manifest.value("metadata", nlohmann::json::object()));
    static_cast<void>(manifest.at("sequence").get<std::uint64_t>());
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
  // Only format 1 had no checksum of its own; one that is there matches.
  const auto as_written = nlohmann::ordered_json::parse(text);
  const auto recorded = as_written.find(detail::manifest_checksum_key);
  FUZZ_CHECK(recorded != as_written.end() || result.version == 1);
  FUZZ_CHECK(recorded == as_written.end() ||
             *recorded == detail::manifest_checksum(as_written));
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

// `text` with its checksum key set to the checksum of the rest, written as the commit writes a
// manifest; nullopt when the text is not a JSON object.
std::optional<std::string> resealed(std::string_view text) {
  if (text.find('\0') != std::string_view::npos) return std::nullopt;  // refused before parsing
  auto manifest = nlohmann::ordered_json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!manifest.is_object()) return std::nullopt;
  manifest[detail::manifest_checksum_key] = detail::manifest_checksum(manifest);
  return manifest.dump(2) + "\n";
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const auto wrong = check(R"({"format_version": 2, "manifest_xxh3_64": "0"})");
  FUZZ_CHECK(wrong.verdict == Verdict::damaged);
  checksum_failure = wrong.reason;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  check_verdict(text, check(text));
  if (const auto sealed = resealed(text)) {
    const auto result = check(*sealed);
    check_verdict(*sealed, result);
    FUZZ_CHECK(result.verdict != Verdict::damaged || result.reason != checksum_failure);
  }
  return 0;
}
