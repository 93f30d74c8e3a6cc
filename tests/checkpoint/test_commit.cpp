// checkpoint/commit.hpp: the commit protocol and the directory's names.
#include "torchguard/checkpoint/commit.hpp"

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "checkpoint_support.hpp"
#include "torchguard/checkpoint/restore.hpp"

namespace fs = std::filesystem;
namespace cp = torchguard::detail;
using torchguard::CheckpointError;
using torchguard::testing::CapturedLogger;
using torchguard::testing::commit;
using torchguard::testing::Contains;
using torchguard::testing::names_in;
using torchguard::testing::small_snapshot;
using torchguard::testing::TempDir;

TEST_CASE("checkpoint names parse back to their sequence number", "[checkpoint][parts][commit]") {
  CHECK(cp::parse_sequence(cp::checkpoint_name(42, 1200)) == 42u);
  CHECK(cp::checkpoint_name(42, 1200) == "ckpt-000042-step-1200");
  CHECK_FALSE(cp::parse_sequence("ckpt--step-1"));
  CHECK_FALSE(cp::parse_sequence("ckpt-12-stop-1"));
  CHECK_FALSE(cp::parse_sequence("ckpt-1234567890123456789-step-1"));  // 19 digits
  CHECK_FALSE(cp::parse_sequence(".tmp-ckpt-000001-step-1-99"));
}

TEST_CASE("a commit leaves one directory whose manifest describes every file",
          "[checkpoint][parts][commit]") {
  TempDir dir;
  const fs::path path = commit(dir.path, 3, 7);
  CHECK(names_in(dir.path) == std::vector<std::string>{"ckpt-000003-step-7"});
  CHECK(names_in(path) == std::vector<std::string>{"extra.safetensors", "manifest.json",
                                                   "model.safetensors", "optimizer.pt"});
  const auto manifest =
      nlohmann::json::parse(torchguard::testing::read_text(path / "manifest.json"));
  CHECK(manifest["format_version"] == cp::checkpoint_format_version);
  CHECK(manifest["sequence"] == 3);
  CHECK(manifest["step"] == 7);
  CHECK(manifest["epoch"] == 1);
  CHECK(manifest["metrics"]["loss"] == 0.25);
  CHECK(manifest["optimizers"]["optimizer"]["kind"] == "archive");
  CHECK(manifest["models"]["model"]["file"] == "model.safetensors");
  CHECK(manifest["complete"] == false);
  REQUIRE(manifest["files"].size() == 3);
  for (const auto& file : manifest["files"]) {
    const fs::path written = path / file["name"].get<std::string>();
    const std::string bytes = torchguard::testing::read_text(written);
    CHECK(file["size"] == bytes.size());
    CHECK(file["xxh3_64"] == cp::hex64(cp::checksum_of(bytes)));
  }
  CHECK(torchguard::testing::read_text(path / "optimizer.pt") == "state bytes");
  const auto listed = cp::list_committed(dir.path);
  REQUIRE(listed.size() == 1);
  CHECK(listed[0].step == 7);
  CHECK(listed[0].sequence == 3);
}

TEST_CASE("a failed commit removes its temporary and leaves what was there",
          "[checkpoint][parts][commit]") {
  TempDir dir;
  const fs::path taken = dir.path / cp::checkpoint_name(3, 7);
  fs::create_directories(taken);
  std::ofstream(taken / "keep.txt") << "not ours";
  auto snapshot = small_snapshot(3, 7);
  CHECK_THROWS_AS(cp::write_checkpoint(dir.path, snapshot), CheckpointError);
  CHECK_THROWS_WITH(cp::write_checkpoint(dir.path, snapshot),
                    Contains("cannot save the checkpoint of step 7") && Contains("cannot rename") &&
                        Contains("intact"));
  CHECK(names_in(dir.path) == std::vector<std::string>{"ckpt-000003-step-7"});
  CHECK(names_in(taken) == std::vector<std::string>{"keep.txt"});
}

TEST_CASE("leftovers are removed and sequence numbers are never reused",
          "[checkpoint][parts][commit]") {
  TempDir dir;
  commit(dir.path, 4, 40);
  fs::create_directories(dir.path / ".tmp-ckpt-000005-step-50-123");
  fs::create_directories(dir.path / ".trash-ckpt-000001-step-10");
  fs::create_directories(dir.path / "quarantine" / "ckpt-000009-step-90");
  CapturedLogger captured;
  CHECK(cp::remove_leftover_temporaries(dir.path, *captured.logger) == 9u);
  CHECK(names_in(dir.path) == std::vector<std::string>{"ckpt-000004-step-40", "quarantine"});
}
