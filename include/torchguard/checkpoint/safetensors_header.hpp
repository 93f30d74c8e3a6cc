// The safetensors header, without LibTorch: the format's 22 dtypes, a reader that checks a header
// in one pass over its bytes (O(size), whatever it holds), and the writer's JSON. The reader
// refuses what the reference implementation (huggingface/safetensors: serde_json into its
// `Metadata`) refuses, by the same rules:
//   - the 8-byte length: at most 100,000,000, within the file;
//   - the header: UTF-8, one JSON object, JSON whitespace (and nothing else: no NUL) around it,
//     containers nested at most 127 deep;
//   - `__metadata__`: at most once, an object of strings (or null);
//   - each tensor: an object (or serde's positional array) with `dtype` (one of the 22 names),
//     `shape` (non-negative integers) and `data_offsets` (two), each field once; other fields
//     are skipped, as serde skips them;
//   - the data: tensors sorted by offset cover it exactly (no hole, no overlap, nothing after),
//     each span is its shape times its dtype's bits, a whole number of bytes, without overflow.
// Stricter than the reference, on purpose: a tensor name or a `__metadata__` key given twice
// (the reference keeps the last; readers that keep the first would see another file).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>

#include "torchguard/core/error.hpp"

namespace torchguard {

// A safetensors file breaks a rule of the format, or a tensor cannot be stored in one; the
// message names the file, the tensor and the rule.
class SafetensorsError : public Error {
 public:
  using Error::Error;
};

// A file's `__metadata__`: string keys, string values.
using SafetensorsMetadata = std::map<std::string, std::string>;

namespace detail {

inline constexpr std::uint64_t safetensors_max_header = 100'000'000;  // the reference's limit

// The format's dtypes, in the reference's declaration order: files sort tensors by it,
// descending. `bits` per element (F4 and F6 pack several elements into a byte).
struct SafetensorsDtypeInfo {
  const char* name;
  int bits;
};
inline constexpr std::array<SafetensorsDtypeInfo, 22> safetensors_dtype_table = {{
    {"BOOL", 8},        {"F4", 4},      {"F6_E2M3", 6}, {"F6_E3M2", 6}, {"U8", 8},
    {"I8", 8},          {"F8_E5M2", 8}, {"F8_E4M3", 8}, {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8},
    {"F8_E5M2FNUZ", 8}, {"I16", 16},    {"U16", 16},    {"F16", 16},    {"BF16", 16},
    {"I32", 32},        {"U32", 32},    {"F32", 32},    {"C64", 64},    {"F64", 64},
    {"I64", 64},        {"U64", 64},
}};

// The dtype's index in safetensors_dtype_table, or nullopt for a name the format lacks.
inline std::optional<int> safetensors_dtype_index(std::string_view name) {
  for (std::size_t i = 0; i < safetensors_dtype_table.size(); ++i) {
    if (name == safetensors_dtype_table[i].name) return static_cast<int>(i);
  }
  return std::nullopt;
}

// One tensor as a header describes it; offsets are into the data section.
struct SafetensorsEntry {
  std::string name;
  int dtype = 0;  // index into safetensors_dtype_table
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
};

// A checked header: the entries sorted by offset, the metadata, and where the data starts.
struct SafetensorsHeader {
  std::vector<SafetensorsEntry> entries;
  std::vector<std::size_t> by_name;  // indices of `entries`, sorted by name
  SafetensorsMetadata metadata;
  std::uint64_t data_offset = 0;  // 8 + the header's length
  std::uint64_t data_size = 0;
};

// Elements times bits, as bytes: nullopt on overflow; `misaligned` when not whole bytes.
inline std::optional<std::uint64_t> safetensors_span(const std::vector<std::uint64_t>& shape,
                                                     int dtype, bool& misaligned) {
  std::uint64_t elements = 1;
  for (const std::uint64_t dim : shape) {
    if (__builtin_mul_overflow(elements, dim, &elements)) return std::nullopt;
  }
  std::uint64_t bits = 0;
  if (__builtin_mul_overflow(
          elements,
          static_cast<std::uint64_t>(safetensors_dtype_table[static_cast<std::size_t>(dtype)].bits),
          &bits)) {
    return std::nullopt;
  }
  misaligned = bits % 8 != 0;
  return bits / 8;
}

// The position of the first byte that is not part of valid UTF-8 (no overlong form, no
// surrogate, nothing past U+10FFFF), or nullopt.
inline std::optional<std::size_t> first_invalid_utf8(std::string_view text) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t size = text.size();
  std::size_t i = 0;
  while (i < size) {
    const unsigned char c = bytes[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t length = 0;
    unsigned char low = 0x80, high = 0xbf;  // the second byte's range
    if (c >= 0xc2 && c <= 0xdf) {
      length = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      length = 3;
      if (c == 0xe0) low = 0xa0;
      if (c == 0xed) high = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      length = 4;
      if (c == 0xf0) low = 0x90;
      if (c == 0xf4) high = 0x8f;
    } else {
      return i;
    }
    if (i + length > size || bytes[i + 1] < low || bytes[i + 1] > high) return i;
    for (std::size_t k = 2; k < length; ++k) {
      if (bytes[i + k] < 0x80 || bytes[i + k] > 0xbf) return i;
    }
    i += length;
  }
  return std::nullopt;
}

// Reads a header's JSON in one pass. Each method consumes what it names or throws.
class SafetensorsHeaderReader {
 public:
  SafetensorsHeaderReader(std::string_view text, const std::string& source)
      : text_(text), source_(source) {}

  void read(SafetensorsHeader& header) {
    check_utf8();
    skip_whitespace();
    expect('{', "the header is not a JSON object");
    ++depth_;
    bool metadata_seen = false;
    read_members("expected ',' or '}' after a tensor", [&](std::string key, std::size_t key_at) {
      if (key == "__metadata__") {
        if (metadata_seen) fail_at(key_at, "__metadata__ is given twice");
        metadata_seen = true;
        read_metadata(header.metadata);
      } else {
        header.entries.push_back(read_entry(std::move(key)));
      }
    });
    skip_whitespace();
    if (position_ != text_.size()) {
      fail_at(position_, fmt::format("{} after the JSON object (only JSON whitespace may pad it)",
                                     describe_byte(position_)));
    }
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw SafetensorsError(fmt::format("'{}' is not a valid safetensors file: {}", source_, why));
  }
  [[noreturn]] void fail_at(std::size_t at, const std::string& why) const {
    fail(fmt::format("its header is not valid: {} (at byte {} of the header)", why, at));
  }
  std::string describe_byte(std::size_t at) const {
    const auto byte = static_cast<unsigned char>(text_[at]);
    if (byte == 0) return "a NUL byte";
    if (byte >= 0x21 && byte < 0x7f) return fmt::format("'{}'", static_cast<char>(byte));
    return fmt::format("byte 0x{:02x}", byte);
  }

  // The reference decodes the whole header as UTF-8 before it parses it.
  void check_utf8() const {
    if (const auto at = first_invalid_utf8(text_)) {
      fail_at(*at, fmt::format("byte 0x{:02x} is not UTF-8 here",
                               static_cast<unsigned char>(text_[*at])));
    }
  }

  bool at_end() const { return position_ >= text_.size(); }
  char peek() const { return at_end() ? '\0' : text_[position_]; }
  bool take(char c) {
    if (at_end() || text_[position_] != c) return false;
    ++position_;
    return true;
  }
  void expect(char c, const char* why) {
    if (!take(c)) fail_at(position_, at_end() ? fmt::format("{}, at its end", why) : why);
  }
  void skip_whitespace() {
    while (!at_end()) {
      const char c = text_[position_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') return;
      ++position_;
    }
  }

  // serde_json's limit: the 128th nested container is refused.
  void enter(std::size_t at) {
    if (++depth_ >= 128) fail_at(at, "containers nested over 127 deep");
  }
  void leave() { --depth_; }

  static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }
  unsigned read_hex4() {
    if (position_ + 4 > text_.size()) fail_at(position_, "a \\u escape is cut short");
    unsigned value = 0;
    for (int i = 0; i < 4; ++i) {
      const int digit = hex_digit(text_[position_++]);
      if (digit < 0) fail_at(position_ - 1, "a \\u escape has a character that is not hex");
      value = value * 16 + static_cast<unsigned>(digit);
    }
    return value;
  }
  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xc0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3f));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xe0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (code & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (code & 0x3f));
    }
  }

  // A JSON string, decoded (the bytes are known to be UTF-8).
  std::string read_string() {
    const std::size_t start = position_;
    expect('"', "expected a string");
    std::string out;
    for (;;) {
      if (at_end()) fail_at(start, "a string is not closed");
      const char c = text_[position_];
      if (c == '"') {
        ++position_;
        return out;
      }
      if (static_cast<unsigned char>(c) < 0x20) {
        fail_at(position_, fmt::format("{} inside a string (control characters must be escaped)",
                                       describe_byte(position_)));
      }
      if (c != '\\') {
        // Copy the run up to the next quote, escape or control character at once.
        std::size_t end = position_;
        while (end < text_.size() && text_[end] != '"' && text_[end] != '\\' &&
               static_cast<unsigned char>(text_[end]) >= 0x20) {
          ++end;
        }
        out.append(text_.data() + position_, end - position_);
        position_ = end;
        continue;
      }
      ++position_;
      if (at_end()) fail_at(position_, "an escape is cut short");
      const char escaped = text_[position_++];
      switch (escaped) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          unsigned code = read_hex4();
          if (code >= 0xdc00 && code <= 0xdfff) {
            fail_at(position_ - 6, "a \\u escape is a lone trailing surrogate");
          }
          if (code >= 0xd800 && code <= 0xdbff) {
            if (position_ + 2 > text_.size() || text_[position_] != '\\' ||
                text_[position_ + 1] != 'u') {
              fail_at(position_ - 6, "a \\u escape is a lone leading surrogate");
            }
            position_ += 2;
            const unsigned low = read_hex4();
            if (low < 0xdc00 || low > 0xdfff) {
              fail_at(position_ - 6, "a \\u escape is a lone leading surrogate");
            }
            code = 0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00);
          }
          append_utf8(out, code);
          break;
        }
        default:
          fail_at(position_ - 1, fmt::format("'\\{}' is not a JSON escape", escaped));
      }
    }
  }

  // A non-negative integer that fits 64 bits (serde's usize): no sign, fraction or exponent.
  std::uint64_t read_size(const char* what) {
    const std::size_t start = position_;
    if (peek() == '-') fail_at(start, fmt::format("{} is negative", what));
    if (peek() < '0' || peek() > '9') fail_at(start, fmt::format("{} is not an integer", what));
    std::uint64_t value = 0;
    bool overflow = false;
    if (take('0')) {
      if (peek() >= '0' && peek() <= '9') fail_at(start, "a number has a leading zero");
    } else {
      while (peek() >= '0' && peek() <= '9') {
        const auto digit = static_cast<std::uint64_t>(text_[position_++] - '0');
        overflow = overflow || __builtin_mul_overflow(value, std::uint64_t{10}, &value) ||
                   __builtin_add_overflow(value, digit, &value);
      }
    }
    if (peek() == '.' || peek() == 'e' || peek() == 'E') {
      fail_at(start, fmt::format("{} is not an integer", what));
    }
    if (overflow) fail_at(start, fmt::format("{} does not fit in 64 bits", what));
    return value;
  }

  std::vector<std::uint64_t> read_sizes(const char* what) {
    const std::size_t start = position_;
    if (!take('[')) fail_at(start, fmt::format("{} is not a list", what));
    enter(start);
    std::vector<std::uint64_t> sizes;
    sizes.reserve(4);
    skip_whitespace();
    if (!take(']')) {
      for (;;) {
        skip_whitespace();
        sizes.push_back(read_size(what));
        skip_whitespace();
        if (take(']')) break;
        expect(',', "expected ',' or ']' in a list");
      }
    }
    leave();
    return sizes;
  }

  // Any JSON value, checked and skipped: a field the format does not define.
  void skip_value() {
    const std::size_t start = position_;
    const char c = peek();
    if (c == '"') {
      read_string();
    } else if (c == '{' || c == '[') {
      ++position_;
      enter(start);
      const char close = c == '{' ? '}' : ']';
      skip_whitespace();
      if (!take(close)) {
        for (;;) {
          skip_whitespace();
          if (c == '{') {
            read_string();
            skip_whitespace();
            expect(':', "expected ':' after a key");
            skip_whitespace();
          }
          skip_value();
          skip_whitespace();
          if (take(close)) break;
          expect(',', "expected ',' between values");
        }
      }
      leave();
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      take('-');
      if (!take('0')) {
        if (peek() < '1' || peek() > '9') fail_at(start, "a number has no digits");
        while (peek() >= '0' && peek() <= '9') ++position_;
      }
      if (take('.')) {
        if (peek() < '0' || peek() > '9') fail_at(start, "a number's fraction has no digits");
        while (peek() >= '0' && peek() <= '9') ++position_;
      }
      if (take('e') || take('E')) {
        if (!take('+')) take('-');
        if (peek() < '0' || peek() > '9') fail_at(start, "a number's exponent has no digits");
        while (peek() >= '0' && peek() <= '9') ++position_;
      }
    } else if (text_.compare(position_, 4, "true") == 0 ||
               text_.compare(position_, 4, "null") == 0) {
      position_ += 4;
    } else if (text_.compare(position_, 5, "false") == 0) {
      position_ += 5;
    } else {
      fail_at(start, at_end() ? "a value is missing at the end" : "expected a JSON value");
    }
  }

  // Reads an object's members, from after its '{' to its '}': `member(key, key_at)` reads each
  // value (key_at: where its key starts). `missing_separator` says what a member is followed by
  // when neither ',' nor '}' comes.
  template <class Member>
  void read_members(const char* missing_separator, Member&& member) {
    skip_whitespace();
    if (take('}')) return;
    for (;;) {
      skip_whitespace();
      const std::size_t key_at = position_;
      std::string key = read_string();
      skip_whitespace();
      expect(':', "expected ':' after a key");
      skip_whitespace();
      member(std::move(key), key_at);
      skip_whitespace();
      if (take('}')) return;
      expect(',', missing_separator);
    }
  }

  void read_metadata(SafetensorsMetadata& metadata) {
    const std::size_t start = position_;
    if (text_.compare(position_, 4, "null") == 0) {  // serde's None
      position_ += 4;
      return;
    }
    expect('{', "__metadata__ is not an object");
    enter(start);
    read_members("expected ',' or '}' in __metadata__", [&](std::string key, std::size_t key_at) {
      if (peek() != '"') {
        fail_at(position_, fmt::format("__metadata__ '{}' is not a string (the format allows "
                                       "only strings)",
                                       key));
      }
      std::string value = read_string();
      if (!metadata.emplace(key, std::move(value)).second) {
        fail_at(key_at, fmt::format("__metadata__ names '{}' twice", key));
      }
    });
    leave();
  }

  SafetensorsEntry read_entry(std::string name) {
    SafetensorsEntry entry;
    entry.name = std::move(name);
    const std::size_t start = position_;
    auto bad = [&](std::size_t at, const std::string& why) {
      fail_at(at, fmt::format("tensor '{}': {}", entry.name, why));
    };
    auto read_dtype = [&] {
      const std::size_t at = position_;
      if (peek() != '"') bad(at, "its dtype is not a string");
      const std::string dtype = read_string();
      const auto index = safetensors_dtype_index(dtype);
      if (!index) bad(at, fmt::format("dtype '{}' is not one of the format's", dtype));
      entry.dtype = *index;
    };
    auto read_offsets = [&] {
      const std::size_t at = position_;
      const auto offsets = read_sizes("a data offset");
      if (offsets.size() != 2) {
        bad(at, fmt::format("data_offsets holds {} numbers, not 2", offsets.size()));
      }
      entry.begin = offsets[0];
      entry.end = offsets[1];
    };
    if (peek() == '[') {  // serde reads a struct from an array of its fields, in order
      ++position_;
      enter(start);
      int field = 0;
      skip_whitespace();
      while (!take(']')) {
        if (field > 0) {
          expect(',', "expected ',' or ']' in a tensor's entry");
          skip_whitespace();
        }
        if (field == 0) read_dtype();
        if (field == 1) entry.shape = read_sizes("a dimension");
        if (field == 2) read_offsets();
        if (field == 3) bad(position_, "its entry is a list of more than 3 fields");
        ++field;
        skip_whitespace();
      }
      if (field != 3) bad(start, "its entry is a list of fewer than 3 fields");
      leave();
      return entry;
    }
    if (peek() != '{') bad(start, "its entry is not an object");
    ++position_;
    enter(start);
    bool dtype_seen = false, shape_seen = false, offsets_seen = false;
    read_members("expected ',' or '}' in a tensor's entry",
                 [&](const std::string& field, std::size_t key_at) {
                   auto once = [&](bool& seen) {
                     if (seen) bad(key_at, fmt::format("its field '{}' is given twice", field));
                     seen = true;
                   };
                   if (field == "dtype") {
                     once(dtype_seen);
                     read_dtype();
                   } else if (field == "shape") {
                     once(shape_seen);
                     entry.shape = read_sizes("a dimension");
                   } else if (field == "data_offsets") {
                     once(offsets_seen);
                     read_offsets();
                   } else {
                     skip_value();
                   }
                 });
    leave();
    if (!dtype_seen) bad(start, "it has no dtype");
    if (!shape_seen) bad(start, "it has no shape");
    if (!offsets_seen) bad(start, "it has no data_offsets");
    return entry;
  }

  std::string_view text_;
  const std::string& source_;
  std::size_t position_ = 0;
  int depth_ = 0;
};

// Reads the length prefix of a file of `file_size` bytes whose first bytes are `prefix` (at
// least 8 of them, when the file has them). Throws SafetensorsError.
inline std::uint64_t safetensors_header_length(std::string_view prefix, std::uint64_t file_size,
                                               const std::string& source) {
  auto fail = [&](const std::string& why) {
    throw SafetensorsError(fmt::format("'{}' is not a valid safetensors file: {}", source, why));
  };
  if (file_size < 8 || prefix.size() < 8) {
    fail(fmt::format("it has {} bytes, fewer than the 8 of its header length", file_size));
  }
  std::uint64_t length = 0;
  for (int i = 0; i < 8; ++i) {
    length |=
        static_cast<std::uint64_t>(static_cast<unsigned char>(prefix[static_cast<std::size_t>(i)]))
        << (8 * i);
  }
  if (length > safetensors_max_header) {
    fail(fmt::format("its header length {} is over the format's limit of 100,000,000 bytes",
                     length));
  }
  if (length > file_size - 8) {
    fail(fmt::format("its header length {} runs past the end of the file ({} bytes): truncated?",
                     length, file_size));
  }
  return length;
}

// Checks the header `text` (the `length` bytes after the prefix) of a file of `file_size` bytes
// and returns it, entries sorted by offset. Throws SafetensorsError naming `source`, the tensor
// and the rule.
inline SafetensorsHeader parse_safetensors_header(std::string_view text, std::uint64_t file_size,
                                                  const std::string& source) {
  SafetensorsHeader header;
  SafetensorsHeaderReader(text, source).read(header);
  header.data_offset = 8 + text.size();
  header.data_size = file_size - header.data_offset;
  auto fail = [&](const std::string& why) {
    throw SafetensorsError(fmt::format("'{}' is not a valid safetensors file: {}", source, why));
  };
  auto& entries = header.entries;
  // The reference's order: sort by offsets (files are written in it: usually nothing to do),
  // then each must start where the previous ended.
  const auto by_offsets = [](const auto& a, const auto& b) {
    return std::make_pair(a.begin, a.end) < std::make_pair(b.begin, b.end);
  };
  if (!std::is_sorted(entries.begin(), entries.end(), by_offsets)) {
    std::stable_sort(entries.begin(), entries.end(), by_offsets);
  }
  // A name twice: refused (see the top of this file). The order by name serves lookups too.
  auto& by_name = header.by_name;
  by_name.resize(entries.size());
  for (std::size_t i = 0; i < by_name.size(); ++i) by_name[i] = i;
  std::sort(by_name.begin(), by_name.end(),
            [&](std::size_t a, std::size_t b) { return entries[a].name < entries[b].name; });
  for (std::size_t i = 1; i < by_name.size(); ++i) {
    if (entries[by_name[i]].name == entries[by_name[i - 1]].name) {
      fail(fmt::format("its header names '{}' twice", entries[by_name[i]].name));
    }
  }
  std::uint64_t position = 0;
  const std::string* previous = nullptr;
  for (const auto& entry : entries) {
    auto bad = [&](const std::string& why) {
      fail(fmt::format("tensor '{}': {}", entry.name, why));
    };
    if (entry.end < entry.begin) {
      bad(fmt::format("data_offsets [{}, {}] end before they begin", entry.begin, entry.end));
    }
    if (entry.begin != position) {
      const std::string after = previous ? fmt::format("'{}', which ends at", *previous)
                                         : std::string("the start of the data, at");
      bad(fmt::format("data_offsets [{}, {}] {} {} {}", entry.begin, entry.end,
                      entry.begin > position ? "leave a hole after" : "overlap", after, position));
    }
    bool misaligned = false;
    const auto span = safetensors_span(entry.shape, entry.dtype, misaligned);
    const char* dtype = safetensors_dtype_table[static_cast<std::size_t>(entry.dtype)].name;
    if (!span) {
      bad(fmt::format("shape [{}] of {} overflows 64 bits", fmt::join(entry.shape, ", "), dtype));
    }
    if (misaligned) {
      bad(fmt::format("shape [{}] of {} is not a whole number of bytes",
                      fmt::join(entry.shape, ", "), dtype));
    }
    if (entry.end - entry.begin != *span) {
      bad(fmt::format("data_offsets [{}, {}] span {} bytes; {} with shape [{}] needs {}",
                      entry.begin, entry.end, entry.end - entry.begin, dtype,
                      fmt::join(entry.shape, ", "), *span));
    }
    position = entry.end;
    previous = &entry.name;
  }
  if (position != header.data_size) {
    fail(fmt::format("its tensors cover {} bytes of data, the file holds {} ({})", position,
                     header.data_size,
                     position > header.data_size ? "truncated?" : "bytes left over"));
  }
  return header;
}

// A JSON string as serde_json writes it: `"`, `\` and control characters escaped, the rest as is.
inline void append_json_string(std::string& out, std::string_view text) {
  out += '"';
  for (const char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += fmt::format("\\u{:04x}", static_cast<unsigned>(c));
        } else {
          out += c;
        }
    }
  }
  out += '"';
}

// One tensor to write: its bytes are `size` bytes at `data` (host memory).
struct SafetensorsOutput {
  std::string name;
  int dtype = 0;  // index into safetensors_dtype_table
  std::vector<std::uint64_t> shape;
  const void* data = nullptr;
  std::uint64_t size = 0;
};

// Orders `tensors` as the reference does (dtype descending, then name) and returns the bytes
// before the data: the length and the JSON header padded with spaces to a multiple of 8. Throws
// SafetensorsError, before anything is written, for what the reader would refuse: a name twice,
// `__metadata__` as a name, bytes that are not UTF-8, a span that is not the shape's, a header
// over the format's limit.
inline std::string safetensors_header_bytes(std::vector<SafetensorsOutput>& tensors,
                                            const SafetensorsMetadata& metadata) {
  auto refuse = [](const std::string& why) {
    throw SafetensorsError(fmt::format("safetensors: cannot write the file: {}", why));
  };
  auto check_utf8 = [&](const std::string& text, const char* what) {
    if (first_invalid_utf8(text)) refuse(fmt::format("{} '{}' is not UTF-8", what, text));
  };
  std::sort(tensors.begin(), tensors.end(), [](const auto& a, const auto& b) {
    return a.dtype != b.dtype ? a.dtype > b.dtype : a.name < b.name;
  });
  {
    std::vector<const std::string*> names(tensors.size());
    for (std::size_t i = 0; i < tensors.size(); ++i) names[i] = &tensors[i].name;
    std::sort(names.begin(), names.end(),
              [](const std::string* a, const std::string* b) { return *a < *b; });
    for (std::size_t i = 1; i < names.size(); ++i) {
      if (*names[i] == *names[i - 1]) refuse(fmt::format("the name '{}' is used twice", *names[i]));
    }
  }
  std::string json = "{";
  if (!metadata.empty()) {
    json += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [key, value] : metadata) {
      check_utf8(key, "the metadata key");
      check_utf8(value, "the metadata value of");
      if (!first) json += ',';
      first = false;
      append_json_string(json, key);
      json += ':';
      append_json_string(json, value);
    }
    json += '}';
  }
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto& tensor = tensors[i];
    check_utf8(tensor.name, "the tensor name");
    if (tensor.name == "__metadata__") refuse("a tensor may not be called '__metadata__'");
    bool misaligned = false;
    const auto span = safetensors_span(tensor.shape, tensor.dtype, misaligned);
    if (!span || misaligned || *span != tensor.size) {
      refuse(fmt::format("tensor '{}': {} bytes do not hold shape [{}] of {}", tensor.name,
                         tensor.size, fmt::join(tensor.shape, ", "),
                         safetensors_dtype_table[static_cast<std::size_t>(tensor.dtype)].name));
    }
    if (json.size() > 1) json += ',';
    append_json_string(json, tensor.name);
    json += fmt::format(R"(:{{"dtype":"{}","shape":[{}],"data_offsets":[{},{}]}})",
                        safetensors_dtype_table[static_cast<std::size_t>(tensor.dtype)].name,
                        fmt::join(tensor.shape, ","), offset, offset + tensor.size);
    offset += tensor.size;
    if (json.size() > safetensors_max_header) break;  // refused below, without going on
  }
  json += '}';
  json.append((8 - json.size() % 8) % 8, ' ');
  if (json.size() > safetensors_max_header) {
    refuse(
        fmt::format("its header would be over {} bytes, the format's limit of 100,000,000 "
                    "(metadata too large?)",
                    json.size()));
  }
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) {
    bytes[static_cast<std::size_t>(i)] = static_cast<char>(json.size() >> (8 * i));
  }
  return bytes + json;
}

}  // namespace detail
}  // namespace torchguard
