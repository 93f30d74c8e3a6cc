// fashion_mnist.hpp: loads Fashion-MNIST from its gzip-compressed IDX files.
//
// Every failure throws DataError with the file's path and what is wrong with it, because a
// training demo that dies with "bad_alloc" or trains on garbage is worse than no demo.
// Header-only; needs zlib (link -lz) and LibTorch.
#pragma once

#include <torch/types.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

namespace fashion_mnist {

inline constexpr const char* kDefaultDir = "/usr/share/datasets/fashion-mnist";
inline constexpr std::int64_t kNumClasses = 10;
// Per-pixel statistics of the training images scaled to [0, 1].
inline constexpr double kMean = 0.2860;
inline constexpr double kStd = 0.3530;
// Guards the allocation against a corrupt header: the real train set is 47 MB.
inline constexpr std::uint64_t kMaxPayloadBytes = std::uint64_t{1} << 31;

inline constexpr std::uint32_t kImagesMagic = 0x00000803;  // unsigned bytes, 3 dimensions
inline constexpr std::uint32_t kLabelsMagic = 0x00000801;  // unsigned bytes, 1 dimension

class DataError : public std::runtime_error {
 public:
  DataError(const std::string& path, const std::string& problem)
      : std::runtime_error(path + ": " + problem), path_(path) {}
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

namespace idx {

struct GzCloser {
  void operator()(gzFile_s* file) const { gzclose(file); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

inline std::string hex32(std::uint32_t value) {
  char text[16];
  std::snprintf(text, sizeof text, "0x%08x", static_cast<unsigned>(value));
  return text;
}

inline GzFile open_gz(const std::string& path) {
  errno = 0;
  GzFile file(gzopen(path.c_str(), "rb"));
  if (!file) {
    const int error = errno;
    throw DataError(path, std::string("cannot open: ") +
                              (error != 0 ? std::strerror(error) : "out of memory in zlib"));
  }
  // The default 8 KiB buffer makes reading the 47 MB train set needlessly slow.
  gzbuffer(file.get(), 1 << 20);
  return file;
}

// zlib prefixes its messages with the path, which DataError already carries.
inline std::string zlib_message(gzFile file, const std::string& path) {
  int code = Z_OK;
  std::string message = gzerror(file, &code);
  if (message.rfind(path + ": ", 0) == 0) message.erase(0, path.size() + 2);
  if (code == Z_DATA_ERROR) return "corrupt gzip stream (" + message + ")";
  if (code == Z_BUF_ERROR) return "truncated gzip stream (" + message + ")";
  if (code == Z_ERRNO) return "cannot read: " + message;
  return message.empty() ? "zlib error " + std::to_string(code) : message;
}

// Reads up to `size` bytes; returns how many it got (fewer only at end of data).
inline std::uint64_t read_some(gzFile file, const std::string& path, void* data,
                               std::uint64_t size) {
  auto* bytes = static_cast<unsigned char*>(data);
  std::uint64_t total = 0;
  while (total < size) {
    // gzread takes an unsigned count: read in chunks well below its limit.
    const auto chunk = static_cast<unsigned>(std::min<std::uint64_t>(size - total, 1u << 30));
    const int got = gzread(file, bytes + total, chunk);
    int code = Z_OK;
    gzerror(file, &code);
    // A truncated stream returns the bytes it could inflate and sets Z_BUF_ERROR.
    if (got < 0 || (code != Z_OK && code != Z_STREAM_END)) {
      throw DataError(path, zlib_message(file, path));
    }
    if (got == 0) break;
    total += static_cast<std::uint64_t>(got);
  }
  return total;
}

inline std::uint32_t big_endian32(const unsigned char* bytes) {
  return (std::uint32_t{bytes[0]} << 24) | (std::uint32_t{bytes[1]} << 16) |
         (std::uint32_t{bytes[2]} << 8) | std::uint32_t{bytes[3]};
}

// Reads the IDX header (magic and `dims.size()` dimensions) and checks the magic number.
inline void read_header(gzFile file, const std::string& path, std::uint32_t expected_magic,
                        const char* kind, std::vector<std::uint32_t>& dims) {
  std::array<unsigned char, 16> header{};
  const std::uint64_t header_size = 4 * (1 + dims.size());
  const std::uint64_t got = read_some(file, path, header.data(), header_size);
  // gzopen reads a plain file as is; this demo wants the files exactly as distributed.
  if (gzdirect(file)) {
    if (got == 0) throw DataError(path, "file is empty");
    throw DataError(path, "not a gzip file (expected the gzip-compressed IDX file)");
  }
  if (got < 4) {
    throw DataError(path, "truncated: expected a " + std::to_string(header_size) +
                              "-byte IDX header, found " + std::to_string(got) + " bytes");
  }
  const std::uint32_t magic = big_endian32(header.data());
  if (magic != expected_magic) {
    std::string problem = "bad magic number " + hex32(magic) + ", expected " +
                          hex32(expected_magic) + " (" + kind + ")";
    const std::uint32_t other = expected_magic == kImagesMagic ? kLabelsMagic : kImagesMagic;
    if (magic == other) problem += "; this looks like the other file of the pair";
    throw DataError(path, problem);
  }
  if (got < header_size) {
    throw DataError(path, "truncated: expected a " + std::to_string(header_size) +
                              "-byte IDX header, found " + std::to_string(got) + " bytes");
  }
  for (std::size_t i = 0; i < dims.size(); ++i) dims[i] = big_endian32(&header[4 * (i + 1)]);
}

// Fails if anything follows the payload: a header that undercounts is as corrupt as one
// that overcounts.
inline void expect_end(gzFile file, const std::string& path, std::uint64_t payload_bytes,
                       const char* what) {
  std::vector<unsigned char> scratch(1 << 16);
  std::uint64_t extra = 0;
  while (extra < kMaxPayloadBytes) {
    const std::uint64_t got = read_some(file, path, scratch.data(), scratch.size());
    if (got == 0) break;
    extra += got;
  }
  if (extra > 0) {
    throw DataError(path, std::to_string(extra) + " unexpected trailing bytes after the " +
                              std::to_string(payload_bytes) + " bytes of " + what +
                              " the header declares");
  }
}

inline void read_payload(gzFile file, const std::string& path, void* data,
                         std::uint64_t payload_bytes, const char* what) {
  const std::uint64_t got = read_some(file, path, data, payload_bytes);
  if (got < payload_bytes) {
    throw DataError(path, "truncated: expected " + std::to_string(payload_bytes) + " bytes of " +
                              what + ", found " + std::to_string(got));
  }
  expect_end(file, path, payload_bytes, what);
}

}  // namespace idx

// Images as uint8 [N, rows, cols] (Fashion-MNIST: [N, 28, 28]).
inline torch::Tensor read_images(const std::string& path) {
  idx::GzFile file = idx::open_gz(path);
  std::vector<std::uint32_t> dims(3);
  idx::read_header(file.get(), path, kImagesMagic, "IDX image file", dims);
  const std::uint64_t count = dims[0], rows = dims[1], cols = dims[2];
  if (count == 0 || rows == 0 || cols == 0) {
    throw DataError(path, "header declares " + std::to_string(count) + " images of " +
                              std::to_string(rows) + "x" + std::to_string(cols) +
                              " pixels: no data");
  }
  // rows * cols < 2^64 since each is < 2^32; dividing avoids overflowing the product with N.
  const std::uint64_t image_bytes = rows * cols;
  if (image_bytes > kMaxPayloadBytes || count > kMaxPayloadBytes / image_bytes) {
    throw DataError(path, "header declares " + std::to_string(count) + " images of " +
                              std::to_string(rows) + "x" + std::to_string(cols) +
                              " pixels: more than the " + std::to_string(kMaxPayloadBytes) +
                              "-byte limit, the header is corrupt");
  }
  torch::Tensor images =
      torch::empty({static_cast<std::int64_t>(count), static_cast<std::int64_t>(rows),
                    static_cast<std::int64_t>(cols)},
                   torch::kUInt8);
  idx::read_payload(file.get(), path, images.data_ptr<std::uint8_t>(), count * image_bytes,
                    "pixel data");
  return images;
}

// Labels as int64 [N], each in 0..9.
inline torch::Tensor read_labels(const std::string& path) {
  idx::GzFile file = idx::open_gz(path);
  std::vector<std::uint32_t> dims(1);
  idx::read_header(file.get(), path, kLabelsMagic, "IDX label file", dims);
  const std::uint64_t count = dims[0];
  if (count == 0) throw DataError(path, "header declares 0 labels: no data");
  if (count > kMaxPayloadBytes) {
    throw DataError(path, "header declares " + std::to_string(count) +
                              " labels: more than the limit, the header is corrupt");
  }
  torch::Tensor labels = torch::empty({static_cast<std::int64_t>(count)}, torch::kUInt8);
  const std::uint8_t* data = labels.data_ptr<std::uint8_t>();
  idx::read_payload(file.get(), path, labels.data_ptr<std::uint8_t>(), count, "label data");
  const std::uint8_t* bad =
      std::find_if(data, data + count, [](std::uint8_t label) { return label >= kNumClasses; });
  if (bad != data + count) {
    const auto bad_count =
        std::count_if(bad, data + count, [](std::uint8_t label) { return label >= kNumClasses; });
    throw DataError(path, "label " + std::to_string(*bad) + " at index " +
                              std::to_string(bad - data) + " is outside 0.." +
                              std::to_string(kNumClasses - 1) + " (" + std::to_string(bad_count) +
                              " such labels)");
  }
  return labels.to(torch::kInt64);
}

// What a model trains on: float images [N, 1, rows, cols], normalized, and int64 labels [N].
struct Split {
  torch::Tensor images;
  torch::Tensor labels;
};

// `what` names the source in errors, e.g. both file paths.
inline Split make_split(torch::Tensor images_u8, torch::Tensor labels, const std::string& what) {
  if (images_u8.scalar_type() != torch::kUInt8 || images_u8.dim() != 3) {
    throw DataError(what, "images must be uint8 [N, rows, cols], got " +
                              std::string(images_u8.toString()) + " of " +
                              std::to_string(images_u8.dim()) + " dimensions");
  }
  if (labels.scalar_type() != torch::kInt64 || labels.dim() != 1) {
    throw DataError(what, "labels must be int64 [N], got " + std::string(labels.toString()) +
                              " of " + std::to_string(labels.dim()) + " dimensions");
  }
  if (images_u8.size(0) != labels.size(0)) {
    throw DataError(what, std::to_string(images_u8.size(0)) + " images but " +
                              std::to_string(labels.size(0)) + " labels");
  }
  Split split;
  split.images = images_u8.unsqueeze(1).to(torch::kFloat32).div_(255.0).sub_(kMean).div_(kStd);
  split.labels = std::move(labels);
  return split;
}

// file_path(dir, "train" | "t10k", "images" | "labels").
inline std::string file_path(const std::string& dir, const std::string& split,
                             const std::string& kind) {
  if (split != "train" && split != "t10k") {
    throw std::invalid_argument(
        "fashion_mnist::file_path: split must be \"train\" or \"t10k\", got \"" + split + "\"");
  }
  if (kind != "images" && kind != "labels") {
    throw std::invalid_argument(
        "fashion_mnist::file_path: kind must be \"images\" or \"labels\", got \"" + kind + "\"");
  }
  std::string path = dir.empty() ? "." : dir;
  if (path.back() != '/') path += '/';
  return path + split + (kind == "images" ? "-images-idx3-ubyte.gz" : "-labels-idx1-ubyte.gz");
}

// Reads and checks both files of a split ("train" or "t10k").
inline Split load_split(const std::string& dir, const std::string& split) {
  const std::string images_path = file_path(dir, split, "images");
  const std::string labels_path = file_path(dir, split, "labels");
  return make_split(read_images(images_path), read_labels(labels_path),
                    images_path + " and " + labels_path);
}

// Throws DataError listing the missing files, so a missing download fails before training.
inline void check_data_dir(const std::string& dir) {
  std::vector<std::string> missing;
  for (const char* split : {"train", "t10k"}) {
    for (const char* kind : {"images", "labels"}) {
      const std::string path = file_path(dir, split, kind);
      std::error_code error;
      if (!std::filesystem::is_regular_file(path, error)) {
        missing.push_back(std::filesystem::path(path).filename().string());
      }
    }
  }
  if (missing.empty()) return;
  std::string problem;
  std::error_code error;
  if (!std::filesystem::is_directory(dir.empty() ? "." : dir, error)) {
    problem = "Fashion-MNIST directory does not exist";
  } else {
    problem = "Fashion-MNIST files missing:";
    for (const std::string& name : missing) problem += " " + name;
  }
  std::string normalized = dir;
  while (normalized.size() > 1 && normalized.back() == '/') normalized.pop_back();
  if (normalized == kDefaultDir) {
    problem += " (install them with `apt-get install dataset-fashion-mnist`)";
  } else {
    problem += " (expected the four .gz files as distributed by Zalando Research)";
  }
  throw DataError(dir, problem);
}

}  // namespace fashion_mnist
