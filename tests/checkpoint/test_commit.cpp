// checkpoint/commit.hpp: the commit protocol and the directory's names.
#include "torchguard/checkpoint/commit.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <utility>
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

namespace {

// Bytes that differ from one position to the next, `size` of them.
std::string pattern_bytes(std::size_t size) {
  std::string bytes(size, '\0');
  for (std::size_t i = 0; i < size; ++i) bytes[i] = static_cast<char>((i * 131 + i / 4099) & 0xff);
  return bytes;
}

// Writes `bytes` through a DurableFile as a safetensors writer does (a small header first, then
// large pieces) and commits; returns the file's checksum and whether it went O_DIRECT.
std::pair<std::uint64_t, bool> write_durably(const fs::path& path, const std::string& bytes) {
  cp::DurableFile out(path);
  out.write(bytes.data(), 100);
  for (std::size_t at = 100; at < bytes.size(); at += std::size_t{3} << 20) {
    out.write(bytes.data() + at, std::min(std::size_t{3} << 20, bytes.size() - at));
  }
  const bool direct = out.direct();
  out.commit();
  CHECK(out.size() == bytes.size());
  return {out.checksum(), direct};
}

// Whether the file system under `dir` takes O_DIRECT (tmpfs did not, before Linux 6.6).
bool takes_direct(const fs::path& dir) {
  const fs::path probe = dir / "probe";
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_DIRECT, 0644);
  if (fd >= 0) ::close(fd);
  fs::remove(probe);
  return fd >= 0;
}

}  // namespace

TEST_CASE("a durable file holds exactly the bytes given and their checksum, however it writes",
          "[checkpoint][parts][commit]") {
  TempDir dir;
  const std::string large = pattern_bytes((std::size_t{10} << 20) + 4321);  // a partial last block
  const std::string small = pattern_bytes(5000);
  const std::uint64_t expected_large = cp::checksum_of(large);
  const cp::WriteTuning defaults;
  struct Way {
    const char* name;
    cp::WriteTuning tuning;
  };
  std::vector<Way> ways = {{"the defaults", defaults}};
  auto way = [&](const char* name, auto change) {
    cp::WriteTuning tuning = defaults;
    change(tuning);
    ways.push_back({name, tuning});
  };
  way("buffered", [](cp::WriteTuning& t) { t.direct = false; });
  way("buffered, hashed whole", [](cp::WriteTuning& t) { t.direct = false, t.chunk = 0; });
  way("drop-behind", [](cp::WriteTuning& t) { t.direct = false, t.drop_behind = true; });
  way("paced", [](cp::WriteTuning& t) { t.pace_bytes_per_s = 1e9; });
  for (const auto& [name, tuning] : ways) {
    INFO(name);
    cp::write_tuning() = tuning;
    const auto [checksum, direct] = write_durably(dir.path / (std::string(name) + ".large"), large);
    CHECK(checksum == expected_large);
    CHECK(torchguard::testing::read_text(dir.path / (std::string(name) + ".large")) == large);
    CHECK(direct == (tuning.direct && takes_direct(dir.path)));
    // A small file is never O_DIRECT: a manifest is not padded to a block and cut back.
    CHECK(write_durably(dir.path / (std::string(name) + ".small"), small) ==
          std::pair{cp::checksum_of(small), false});
    CHECK(torchguard::testing::read_text(dir.path / (std::string(name) + ".small")) == small);
  }
  cp::write_tuning() = defaults;
}

TEST_CASE("[.durable_einval_child]", "[.durable_einval_child]") {
  const fs::path dir = std::getenv("TORCHGUARD_TEST_DIR");
  const std::string large = pattern_bytes((std::size_t{10} << 20) + 4321);
  const auto [checksum, direct] = write_durably(dir / "large.bin", large);
  std::cout << "checksum " << (checksum == cp::checksum_of(large) ? "right" : "wrong")
            << (direct ? ", direct" : "") << std::endl;
}

TEST_CASE("an O_DIRECT write refused with EINVAL goes on buffered, and the file is whole",
          "[checkpoint][faults]") {
  TempDir dir;
  if (!takes_direct(dir.path)) {
    std::cout << "SKIPPED: the temporary directory's file system has no O_DIRECT" << std::endl;
    return;
  }
  const auto child =
      torchguard::testing::run_with_faults("[.durable_einval_child]", "write:large.bin:EINVAL:1:1",
                                           {"TORCHGUARD_TEST_DIR=" + dir.path.string()});
  INFO(child.output);
  REQUIRE(child.exit_status == 0);
  CHECK_THAT(child.output, Contains("io_faults: write(") && Contains("checksum right, direct"));
  CHECK(torchguard::testing::read_text(dir.path / "large.bin") ==
        pattern_bytes((std::size_t{10} << 20) + 4321));
}
