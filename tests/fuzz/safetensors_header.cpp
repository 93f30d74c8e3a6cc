// libFuzzer harness of the safetensors header (checkpoint/safetensors_header.hpp): the input is a
// whole file. The reader must accept it or throw SafetensorsError (any other exception escapes:
// a crash). An accepted file must hold every tensor's bytes inside it (each range is read, so
// ASan reports an offset past the input), and must survive the writer: the header it writes for
// the same tensors and metadata is accepted and describes them, offsets included, and writing
// that again gives the same bytes. Built and run by scripts/fuzz.sh.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "torchguard/checkpoint/safetensors_header.hpp"

namespace {

namespace detail = torchguard::detail;
using torchguard::SafetensorsError;

// An invariant does not hold: says which, then aborts (libFuzzer saves the input).
[[noreturn]] void broken(const char* what, int line, const std::string& details = {}) {
  std::fprintf(stderr, "\nsafetensors_header fuzz: line %d: %s%s%s\n", line, what,
               details.empty() ? "" : ": ", details.c_str());
  std::abort();
}
#define FUZZ_CHECK(condition) ((condition) ? void(0) : broken(#condition, __LINE__))

// The reader's two steps, as a loader runs them on a file held in memory. Throws
// SafetensorsError.
detail::SafetensorsHeader read_file(std::string_view file, const std::string& source) {
  const std::uint64_t length =
      detail::safetensors_header_length(file.substr(0, 8), file.size(), source);
  return detail::parse_safetensors_header(file.substr(8, length), file.size(), source);
}

// Reads every byte of [begin, end) of the data section; ASan reports a byte outside `file`.
std::uint64_t touch(std::string_view file, const detail::SafetensorsHeader& header,
                    const detail::SafetensorsEntry& entry) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(file.data()) + header.data_offset;
  std::uint64_t sum = 0;
  for (std::uint64_t i = entry.begin; i < entry.end; ++i) sum += bytes[i];
  return sum;
}

// What the format promises of an accepted file: the tensors, sorted by offset, cover the data
// exactly, each with the span its shape and dtype need.
void check_accepted(std::string_view file, const detail::SafetensorsHeader& header) {
  FUZZ_CHECK(header.data_offset >= 8 && header.data_offset <= file.size());
  FUZZ_CHECK(header.data_offset + header.data_size == file.size());
  std::uint64_t position = 0;
  volatile std::uint64_t sink = 0;
  for (const auto& entry : header.entries) {
    sink = sink + touch(file, header, entry);
    FUZZ_CHECK(entry.begin == position && entry.begin <= entry.end);
    FUZZ_CHECK(entry.dtype >= 0 &&
               static_cast<std::size_t>(entry.dtype) < detail::safetensors_dtype_table.size());
    FUZZ_CHECK(entry.name != "__metadata__");
    bool misaligned = false;
    const auto span = detail::safetensors_span(entry.shape, entry.dtype, misaligned);
    FUZZ_CHECK(span && !misaligned && *span == entry.end - entry.begin);
    position = entry.end;
  }
  FUZZ_CHECK(position == header.data_size);
}

// The writer's input for `header`'s tensors, their bytes in `file`.
std::vector<detail::SafetensorsOutput> outputs_of(std::string_view file,
                                                  const detail::SafetensorsHeader& header) {
  std::vector<detail::SafetensorsOutput> outputs;
  for (const auto& entry : header.entries) {
    outputs.push_back({entry.name, entry.dtype, entry.shape,
                       file.data() + header.data_offset + entry.begin, entry.end - entry.begin});
  }
  return outputs;
}

// The writer's file: its header bytes, then the tensors' bytes in the order it chose.
std::string write_file(std::vector<detail::SafetensorsOutput>& outputs,
                       const torchguard::SafetensorsMetadata& metadata) {
  std::string file;
  try {
    file = detail::safetensors_header_bytes(outputs, metadata);
  } catch (const SafetensorsError& e) {
    broken("the writer refuses the tensors of a file the reader accepted", __LINE__, e.what());
  }
  FUZZ_CHECK(file.size() >= 8 && (file.size() - 8) % 8 == 0);  // padded to 8 bytes
  for (const auto& output : outputs) {
    file.append(static_cast<const char*>(output.data), output.size);
  }
  return file;
}

void check_round_trip(std::string_view file, const detail::SafetensorsHeader& header) {
  std::map<std::string, const detail::SafetensorsEntry*> originals;
  for (const auto& entry : header.entries) originals[entry.name] = &entry;

  auto outputs = outputs_of(file, header);
  const std::string written = write_file(outputs, header.metadata);
  detail::SafetensorsHeader reread;
  try {
    reread = read_file(written, "written");
  } catch (const SafetensorsError& e) {
    broken("the reader refuses what the writer wrote", __LINE__, e.what());
  }
  check_accepted(written, reread);
  FUZZ_CHECK(reread.metadata == header.metadata);
  FUZZ_CHECK(reread.entries.size() == outputs.size());
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    // The writer's order (`outputs` as it sorted them) with the offsets it gave.
    const auto& output = outputs[i];
    const auto& entry = reread.entries[i];
    FUZZ_CHECK(entry.name == output.name && entry.dtype == output.dtype &&
               entry.shape == output.shape);
    FUZZ_CHECK(entry.begin == offset && entry.end == offset + output.size);
    offset = entry.end;
    // ... and the tensor the original file holds under that name, bytes included.
    const auto original = originals.find(entry.name);
    FUZZ_CHECK(original != originals.end());
    FUZZ_CHECK(original->second->dtype == entry.dtype && original->second->shape == entry.shape);
    FUZZ_CHECK(original->second->end - original->second->begin == entry.end - entry.begin);
    FUZZ_CHECK(std::memcmp(written.data() + reread.data_offset + entry.begin,
                           file.data() + header.data_offset + original->second->begin,
                           entry.end - entry.begin) == 0);
  }
  // The writer's form is canonical: writing what it wrote gives the same bytes.
  auto outputs_again = outputs_of(written, reread);
  FUZZ_CHECK(write_file(outputs_again, reread.metadata) == written);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view file(reinterpret_cast<const char*>(data), size);
  detail::SafetensorsHeader header;
  try {
    header = read_file(file, "input");
  } catch (const SafetensorsError&) {
    return 0;  // refused: the only way the reader may fail
  }
  check_accepted(file, header);
  check_round_trip(file, header);
  return 0;
}
