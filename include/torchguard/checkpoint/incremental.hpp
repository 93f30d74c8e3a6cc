// Incremental checkpoints (CheckpointOptions::incremental): a model's tensors whose bytes did not
// change since the last commit are not written again. A model keeps its tensors in up to two
// files: its own file (model.safetensors) and a shared file (shared.model.safetensors) of tensors
// that stay as they are. While every tensor of the last commit's shared file is unchanged, the
// next commit hard-links that file instead of writing it: each checkpoint stays a complete
// directory of plain files, verified on its own (its manifest lists the shared file with its size
// and XXH3), the commit stays one rename, and retention or quarantine removes a checkpoint's
// names only (the bytes live while any checkpoint names them).
//
// "Unchanged" is told by the bytes: an XXH3 of every frozen parameter (requires_grad false) and
// every buffer, taken at each capture and compared with the last commit's. Version counters would
// be cheaper but miss writes: LibTorch's SGD steps parameters through `.data()` (no counter
// bumped; a "frozen" parameter that kept its gradient is stepped too), and BatchNorm updates its
// running statistics without bumping theirs. Trained parameters (requires_grad true) and the
// optimizers' state change at every step: they are written at every commit, never hashed.
//
// Which tensors share the file: at a run's first commit (and the first after a restore), the
// frozen parameters; later, the frozen parameters and buffers unchanged since the last commit.
// The last shared file is linked while all its tensors are unchanged; it is written again, with
// what is unchanged now, when one of them changed or when unchanged tensors outside it outweigh
// the changed ones. A model whose shared tensors hold less than shared_file_min_bytes keeps one
// file (one file per model is what most tools open).
//
// Only the last commit is linked from: a capture takes its record (IncrementalHistory::take) and
// the commit leaves its own once it is in place. A commit that fails or is dropped leaves none:
// the next one writes every file.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "torchguard/checkpoint/format.hpp"
#include "torchguard/checkpoint/safetensors.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/detail/files.hpp"

namespace torchguard {
namespace detail {

// Below this, a model's unchanged tensors stay in its own file: a shared file would save under a
// millisecond per commit.
inline constexpr std::uint64_t shared_file_min_bytes = std::uint64_t{1} << 20;

// A file of an earlier checkpoint that a commit links instead of writing.
struct LinkedFile {
  std::string name;              // its name, in both checkpoints
  std::filesystem::path source;  // the earlier checkpoint's file
  std::uint64_t size = 0;        // what that checkpoint's manifest recorded of it
  std::string xxh3_64;
};

// A tensor as a checkpoint stores it: dtype, shape, and an XXH3 of the XXH3s of its bytes' 4 MiB
// chunks (chunks hash side by side; the digest is never stored).
struct TensorDigest {
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  std::vector<std::int64_t> sizes;
  std::uint64_t xxh3 = 0;
  bool operator==(const TensorDigest& other) const {
    return dtype == other.dtype && sizes == other.sizes && xxh3 == other.xxh3;
  }
};

// The digests of `tensors`: a save hashes every frozen parameter, so the chunks of those on the
// CPU are spread over LibTorch's intra-op threads; the others are copied to the host one at a time.
inline std::vector<TensorDigest> digests_of(const std::vector<NamedTensor>& tensors) {
  constexpr std::size_t chunk = std::size_t{4} << 20;
  struct Chunk {
    const char* data;
    std::size_t size;
  };
  std::vector<torch::Tensor> host(tensors.size());  // the CPU ones (a view, unless not contiguous)
  std::vector<Chunk> chunks;
  std::vector<std::size_t> first(tensors.size() + 1, 0);  // each tensor's first chunk
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    first[i] = chunks.size();
    if (!tensors[i].tensor.is_cpu()) continue;
    host[i] = host_tensor(tensors[i].name, tensors[i].tensor);
    const auto* data = static_cast<const char*>(host[i].data_ptr());
    const std::size_t size = host[i].nbytes();
    for (std::size_t offset = 0; offset == 0 || offset < size; offset += chunk) {
      chunks.push_back({data + offset, std::min(chunk, size - offset)});
    }
  }
  first[tensors.size()] = chunks.size();
  std::vector<std::uint64_t> hashes(chunks.size());
  at::parallel_for(
      0, static_cast<std::int64_t>(chunks.size()), 1, [&](std::int64_t begin, std::int64_t end) {
        for (auto c = static_cast<std::size_t>(begin); c < static_cast<std::size_t>(end); ++c) {
          hashes[c] = checksum_of({chunks[c].data, chunks[c].size});
        }
      });
  auto digest = [](const torch::Tensor& bytes, const std::uint64_t* hashes, std::size_t count) {
    return TensorDigest{
        bytes.scalar_type(), bytes.sizes().vec(),
        checksum_of({reinterpret_cast<const char*>(hashes), count * sizeof(std::uint64_t)})};
  };
  std::vector<TensorDigest> digests;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    if (host[i].defined()) {
      digests.push_back(digest(host[i], hashes.data() + first[i], first[i + 1] - first[i]));
      continue;
    }
    const torch::Tensor bytes = host_tensor(tensors[i].name, tensors[i].tensor);
    const auto* data = static_cast<const char*>(bytes.data_ptr());
    std::vector<std::uint64_t> own;
    for (std::size_t offset = 0; offset == 0 || offset < bytes.nbytes(); offset += chunk) {
      own.push_back(checksum_of({data + offset, std::min(chunk, bytes.nbytes() - offset)}));
    }
    digests.push_back(digest(bytes, own.data(), own.size()));
  }
  return digests;
}

// A model's files as a commit holds them.
struct PartRecord {
  std::map<std::string, TensorDigest> digests;  // of its frozen parameters and buffers
  std::set<std::string> shared;                 // the names in its shared file (none: empty)
  LinkedFile shared_file;                       // that file, in the commit
};

// A model's files in the next commit.
struct PartPlan {
  std::vector<NamedTensor> own;     // its own file's tensors
  std::vector<NamedTensor> shared;  // a shared file to write (empty: none, or `link`)
  std::optional<LinkedFile> link;   // the last commit's shared file, linked
  PartRecord record;                // the model as this commit holds it (the shared file's place
                                    // is known once committed: IncrementalHistory::committed)
};

// Splits a model's tensors (state_dict order, kept in each file) between its files. `frozen`:
// its parameters that do not require a gradient; `buffers`: its buffers; `last`: the model as
// the last commit holds it (null: no commit to link from).
inline PartPlan plan_part(const std::vector<NamedTensor>& tensors,
                          const std::set<std::string>& frozen, const std::set<std::string>& buffers,
                          const PartRecord* last) {
  PartPlan plan;
  const std::size_t count = tensors.size();
  std::vector<bool> hashed(count, false), unchanged(count, false);
  std::vector<NamedTensor> candidates;
  for (std::size_t i = 0; i < count; ++i) {
    hashed[i] = frozen.count(tensors[i].name) || buffers.count(tensors[i].name);
    if (hashed[i]) candidates.push_back(tensors[i]);
  }
  std::vector<TensorDigest> digests = digests_of(candidates);
  for (std::size_t i = 0, next = 0; i < count; ++i) {
    if (!hashed[i]) continue;
    const std::string& name = tensors[i].name;
    TensorDigest& digest = digests[next++];
    if (last) {
      const auto before = last->digests.find(name);
      unchanged[i] = before != last->digests.end() && before->second == digest;
    }
    plan.record.digests.emplace(name, std::move(digest));
  }
  auto bytes = [&](std::size_t i) {
    return static_cast<std::uint64_t>(tensors[i].tensor.nbytes());
  };

  if (last && !last->shared.empty()) {
    std::size_t found = 0;
    bool all_unchanged = true;
    std::uint64_t unchanged_outside = 0, changed_outside = 0;
    for (std::size_t i = 0; i < count; ++i) {
      if (last->shared.count(tensors[i].name)) {
        ++found;
        all_unchanged = all_unchanged && unchanged[i];
      } else {
        (unchanged[i] ? unchanged_outside : changed_outside) += bytes(i);
      }
    }
    // Linked, unless more is unchanged outside it than changed: then a larger one is written.
    if (all_unchanged && found == last->shared.size() &&
        unchanged_outside < std::max(shared_file_min_bytes, changed_outside)) {
      plan.link = last->shared_file;
      plan.record.shared = last->shared;
      for (const auto& item : tensors) {
        if (!last->shared.count(item.name)) plan.own.push_back(item);
      }
      return plan;
    }
  }
  // A new shared file: what did not change since the last commit, and the frozen parameters that
  // have no past (the first commit; frozen since the last one).
  std::vector<bool> shares(count, false);
  std::uint64_t shared_bytes = 0;
  for (std::size_t i = 0; i < count; ++i) {
    const std::string& name = tensors[i].name;
    const bool new_frozen = frozen.count(name) && (!last || !last->digests.count(name));
    shares[i] = hashed[i] && (unchanged[i] || new_frozen);
    if (shares[i]) shared_bytes += bytes(i);
  }
  const bool worth_it = shared_bytes >= shared_file_min_bytes;
  for (std::size_t i = 0; i < count; ++i) {
    if (worth_it && shares[i]) {
      plan.shared.push_back(tensors[i]);
      plan.record.shared.insert(tensors[i].name);
    } else {
      plan.own.push_back(tensors[i]);
    }
  }
  return plan;
}

// The last commit's models, by their own file's name: what the next commit may link. Taken by a
// capture (on the training thread), left by the commit (on the writer thread for a background
// save; the next capture waits for it).
class IncrementalHistory {
 public:
  // The last commit's records, forgotten here until a commit leaves new ones.
  std::map<std::string, PartRecord> take() {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::exchange(parts_, {});
  }

  // A commit is in place at `checkpoint`, its manifest listing `files`; `parts` are its models.
  void committed(const std::filesystem::path& checkpoint, const nlohmann::ordered_json& files,
                 std::map<std::string, PartRecord> parts) {
    for (auto& [file, record] : parts) {
      if (record.shared.empty()) continue;
      const std::string name = shared_file_of(file);
      const auto entry = std::find_if(files.begin(), files.end(), [&](const auto& listed) {
        return listed.at("name").template get<std::string>() == name;
      });
      if (entry == files.end()) {  // cannot happen: the commit wrote or linked it
        record.shared.clear();
        continue;
      }
      record.shared_file = {name, checkpoint / name,
                            entry->at("size").template get<std::uint64_t>(),
                            entry->at("xxh3_64").template get<std::string>()};
    }
    std::lock_guard<std::mutex> lock(mutex_);
    parts_ = std::move(parts);
  }

  void forget() {
    std::lock_guard<std::mutex> lock(mutex_);
    parts_.clear();
  }

 private:
  std::mutex mutex_;
  std::map<std::string, PartRecord> parts_;
};

// Puts `link` into `directory` (a commit under way) as a hard link: its bytes are neither read nor
// written. Where the file system gives no hard link (EPERM: it has none; EMLINK: the file has as
// many as it may; EXDEV, ENOTSUP), a copy instead, checked against the checksum its checkpoint
// recorded; any other error (ENOSPC, EIO, ENOENT, ...) fails the commit. Returns the manifest's
// entry for it ("linked_from": the checkpoint whose file it is); `written` grows by the bytes a
// copy wrote. Throws FileError.
inline nlohmann::ordered_json place_linked_file(const LinkedFile& link,
                                                const std::filesystem::path& directory,
                                                const std::function<bool()>& stop,
                                                std::uint64_t& written) {
  const std::filesystem::path target = directory / link.name;
  nlohmann::ordered_json entry = {
      {"name", link.name}, {"size", link.size}, {"xxh3_64", link.xxh3_64}};
  auto not_as_recorded = [&](const std::string& found) {
    return FileError("cannot link", link.source,
                     fmt::format("it is not the file its checkpoint recorded ({}; recorded: {} "
                                 "bytes, xxh3 {})",
                                 found, link.size, link.xxh3_64),
                     EIO);
  };
  if (::link(link.source.c_str(), target.c_str()) == 0) {
    // A file cut short since is caught here, cheaply; other damage, by the restore's checksums.
    std::error_code error;
    const auto size = std::filesystem::file_size(target, error);
    if (error) throw FileError("cannot stat", target, error.value());
    if (size != link.size) throw not_as_recorded(fmt::format("{} bytes", size));
    entry["linked_from"] = link.source.parent_path().filename().string();
    return entry;
  }
  const int error = errno;
  if (error != EPERM && error != EMLINK && error != EXDEV && error != ENOTSUP) {
    throw FileError(fmt::format("cannot link '{}' as", link.source.string()), target, error);
  }
  const InputFile in(link.source);
  DurableFile out(target, stop);
  constexpr std::size_t chunk = std::size_t{8} << 20;
  const std::unique_ptr<char[]> buffer(new char[chunk]);
  for (std::uint64_t at = 0; at < in.size(); at += chunk) {
    const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(chunk, in.size() - at));
    in.read(at, buffer.get(), n);
    out.write(buffer.get(), n);
  }
  if (out.size() != link.size || hex64(out.checksum()) != link.xxh3_64) {
    throw not_as_recorded(fmt::format("{} bytes, xxh3 {}", out.size(), hex64(out.checksum())));
  }
  out.commit();
  written += out.size();
  return entry;
}

}  // namespace detail
}  // namespace torchguard
