// checkpoint/restore.hpp: verification before anything loads, and the fall back past damage into
// quarantine.
#include "torchguard/checkpoint/restore.hpp"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "checkpoint_support.hpp"
#include "torchguard/checkpoint/guard.hpp"

namespace fs = std::filesystem;
namespace cp = torchguard::detail;
using torchguard::CheckpointOptions;
using torchguard::testing::CapturedLogger;
using torchguard::testing::commit;
using torchguard::testing::Contains;
using torchguard::testing::Run;
using torchguard::testing::TempDir;

TEST_CASE("verification names what is wrong before anything loads",
          "[checkpoint][parts][restore]") {
  TempDir dir;
  const fs::path path = commit(dir.path, 1, 1);
  cp::VerifiedCheckpoint checkpoint;
  CHECK(cp::verify_checkpoint(path, checkpoint).empty());
  CHECK(checkpoint.files.size() == 3);
  CHECK(checkpoint.bytes("optimizer.pt") == "state bytes");

  SECTION("truncated") {
    fs::resize_file(path / "model.safetensors", 100);
    CHECK_THAT(cp::verify_checkpoint(path, checkpoint),
               Contains("model.safetensors has 100 bytes") && Contains("truncated"));
  }
  SECTION("a file name that leads out of the checkpoint") {
    std::ofstream(dir.path / "outside.bin") << "not the checkpoint's";
    for (const std::string name : {"../outside.bin", "/etc/hostname", "sub/x", "..", ""}) {
      auto manifest =
          nlohmann::ordered_json::parse(torchguard::testing::read_text(path / "manifest.json"));
      manifest["files"][0]["name"] = name;  // and a checksum that agrees: only the name is wrong
      manifest[cp::manifest_checksum_key] = cp::manifest_checksum(manifest);
      std::ofstream(path / "manifest.json") << manifest.dump(2);
      CHECK_THAT(cp::verify_checkpoint(path, checkpoint),
                 Contains(fmt::format("its manifest lists '{}', which is not a file name", name)));
    }
  }
  SECTION("a flipped byte") {
    std::fstream io(path / "optimizer.pt", std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(2);
    io.put('X');
    io.close();
    CHECK_THAT(cp::verify_checkpoint(path, checkpoint),
               Contains("optimizer.pt fails its checksum"));
  }
  SECTION("a missing file") {
    fs::remove(path / "optimizer.pt");
    CHECK(cp::verify_checkpoint(path, checkpoint) == "optimizer.pt is missing");
  }
  SECTION("a manifest changed after it was written") {
    auto manifest =
        nlohmann::ordered_json::parse(torchguard::testing::read_text(path / "manifest.json"));
    manifest["step"] = 2;
    std::ofstream(path / "manifest.json") << manifest.dump(2);
    CHECK(cp::verify_checkpoint(path, checkpoint) == "its manifest fails its own checksum");
  }
  SECTION("no manifest") {
    fs::remove(path / "manifest.json");
    CHECK_THAT(cp::verify_checkpoint(path, checkpoint), Contains("it has no manifest"));
  }
  SECTION("a malformed manifest") {
    std::ofstream(path / "manifest.json") << R"({"format_version": 1})";
    CHECK_THAT(cp::verify_checkpoint(path, checkpoint), Contains("manifest lacks its sequence"));
    std::ofstream(path / "manifest.json") << std::string("{\"format_version\": 1}\0{}", 23);
    CHECK_THAT(cp::verify_checkpoint(path, checkpoint), Contains("manifest holds a NUL byte"));
  }
  SECTION("a newer format, intact: stop and say so") {
    auto manifest =
        nlohmann::ordered_json::parse(torchguard::testing::read_text(path / "manifest.json"));
    manifest["format_version"] = 99;
    manifest[cp::manifest_checksum_key] = cp::manifest_checksum(manifest);
    std::ofstream(path / "manifest.json") << manifest.dump(2);
    CHECK_THROWS_WITH(cp::verify_checkpoint(path, checkpoint),
                      Contains("format version 99") && Contains("upgrade torchguard"));
  }
  SECTION("a version that a flipped bit made newer: damage, checked before the version") {
    std::string text = torchguard::testing::read_text(path / "manifest.json");
    const auto at = text.find(fmt::format("\"format_version\": {}", cp::checkpoint_format_version));
    REQUIRE(at != std::string::npos);
    text[at + 18] = '9';
    std::ofstream(path / "manifest.json") << text;
    CHECK(cp::verify_checkpoint(path, checkpoint) == "its manifest fails its own checksum");
    auto unsigned_manifest = nlohmann::ordered_json::parse(text);
    unsigned_manifest.erase(cp::manifest_checksum_key);
    std::ofstream(path / "manifest.json") << unsigned_manifest.dump(2);
    CHECK(cp::verify_checkpoint(path, checkpoint) == "its manifest has no checksum of its own");
  }
}

// Run by the read-error test below in a child under tests/io_faults.c.
TEST_CASE("restore child: restore from a disk that fails a read", "[.restore_eio_child]") {
  const char* dir = std::getenv("TORCHGUARD_TEST_DIR");
  if (!dir) return;
  CheckpointOptions options;
  options.directory = dir;
  CapturedLogger captured;
  fs::path loaded;
  REQUIRE(cp::restore_newest(options, true, *captured.logger,
                             [&](const cp::VerifiedCheckpoint& c) { loaded = c.path; }));
  std::cout << "loaded " << loaded.filename().string() << std::endl;
}

TEST_CASE("a read error while restoring (EIO) is damage: the checkpoint before it loads",
          "[checkpoint][parts][restore][faults]") {
  TempDir dir;
  commit(dir.path, 1, 10);
  const fs::path newer = commit(dir.path, 2, 20);
  const auto child = torchguard::testing::run_with_faults(
      "[.restore_eio_child]", "pread:ckpt-000002-step-20/model.safetensors:EIO",
      {"TORCHGUARD_TEST_DIR=" + dir.path.string()});
  INFO(child.output);
  REQUIRE(child.exit_status == 0);
  CHECK_THAT(child.output, Contains("io_faults: pread(") && Contains("loaded ckpt-000001-step-10"));
  CHECK_THAT(torchguard::testing::read_text(dir.path / "quarantine" / newer.filename() /
                                            "QUARANTINE_REASON.txt"),
             Contains("model.safetensors cannot be read") && Contains("Input/output error"));
}

TEST_CASE("restore falls back past a damaged checkpoint and quarantines it with the reason",
          "[checkpoint][parts][restore]") {
  TempDir dir;
  const fs::path older = commit(dir.path, 1, 10);
  const fs::path newer = commit(dir.path, 2, 20);
  fs::resize_file(newer / "model.safetensors", 10);
  CheckpointOptions options;
  options.directory = dir.path;
  CapturedLogger captured;
  fs::path loaded;
  CHECK(cp::restore_newest(options, true, *captured.logger,
                           [&](const cp::VerifiedCheckpoint& c) { loaded = c.path; }));
  CHECK(loaded == older);
  const fs::path aside = dir.path / "quarantine" / newer.filename();
  CHECK(fs::exists(aside / "model.safetensors"));
  CHECK_THAT(torchguard::testing::read_text(aside / "QUARANTINE_REASON.txt"),
             Contains("model.safetensors has 10 bytes"));

  // The only one left, damaged: refused, since the quarantine counts too.
  fs::remove(older / "manifest.json");
  CHECK_THROWS_WITH(
      cp::restore_newest(options, true, *captured.logger, [](const cp::VerifiedCheckpoint&) {}),
      Contains("no valid checkpoint") && Contains("2 damaged"));
  CHECK(fs::exists(dir.path / "quarantine" / older.filename()));
}

TEST_CASE("a process that does not write never moves a damaged checkpoint",
          "[checkpoint][parts][restore]") {
  TempDir dir;
  const fs::path path = commit(dir.path, 1, 10);
  CapturedLogger captured;
  cp::quarantine_checkpoint(dir.path, path, "damaged", false, *captured.logger);
  CHECK(fs::exists(path));
  CHECK_FALSE(fs::exists(dir.path / "quarantine"));
}
