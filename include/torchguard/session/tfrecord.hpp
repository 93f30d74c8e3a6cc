// The few pieces of TensorBoard's file format that torchguard writes, without protobuf or
// TensorFlow: CRC32C (Castagnoli), the TFRecord frame, and a protobuf wire-format encoder for the
// handful of fields an event needs.
//
// A TFRecord: uint64 length (little-endian), uint32 masked CRC32C of those 8 bytes, the data,
// uint32 masked CRC32C of the data; mask(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace torchguard {
namespace detail {

// The table of the reflected CRC-32C polynomial 0x82f63b78, built at compile time.
inline constexpr std::array<std::uint32_t, 256> kCrc32cTable = [] {
  std::array<std::uint32_t, 256> table{};
  for (std::uint32_t byte = 0; byte < 256; ++byte) {
    std::uint32_t crc = byte;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ ((crc & 1U) ? 0x82f63b78U : 0U);
    table[byte] = crc;
  }
  return table;
}();

// CRC-32C of `bytes` (iSCSI, RFC 3720): crc32c("123456789") == 0xe3069283.
inline std::uint32_t crc32c(std::string_view bytes) noexcept {
  std::uint32_t crc = 0xffffffffU;
  for (const unsigned char byte : bytes) crc = kCrc32cTable[(crc ^ byte) & 0xffU] ^ (crc >> 8);
  return crc ^ 0xffffffffU;
}

inline std::uint32_t masked_crc32c(std::string_view bytes) noexcept {
  const std::uint32_t crc = crc32c(bytes);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8U;
}

template <class T>
void append_little_endian(std::string& out, T value) {
  for (std::size_t i = 0; i < sizeof(T); ++i) {
    out.push_back(static_cast<char>((value >> (8 * i)) & 0xffU));
  }
}

// `data` framed as one TFRecord.
inline std::string tfrecord(std::string_view data) {
  std::string record;
  record.reserve(data.size() + 16);
  append_little_endian<std::uint64_t>(record, data.size());
  append_little_endian<std::uint32_t>(record, masked_crc32c(record));
  record.append(data);
  append_little_endian<std::uint32_t>(record, masked_crc32c(data));
  return record;
}

// A protobuf message in wire format, field by field (proto3: the caller skips default values).
class ProtoMessage {
 public:
  ProtoMessage& varint(int field, std::uint64_t value) {
    key(field, 0);
    append_varint(value);
    return *this;
  }
  ProtoMessage& float64(int field, double value) {  // `double`: wire type 1
    key(field, 1);
    append_little_endian<std::uint64_t>(bytes_, bits_of<std::uint64_t>(value));
    return *this;
  }
  ProtoMessage& float32(int field, float value) {  // `float`: wire type 5
    key(field, 5);
    append_little_endian<std::uint32_t>(bytes_, bits_of<std::uint32_t>(value));
    return *this;
  }
  ProtoMessage& bytes(int field, std::string_view value) {  // string, bytes: wire type 2
    key(field, 2);
    append_varint(value.size());
    bytes_.append(value);
    return *this;
  }
  ProtoMessage& message(int field, const ProtoMessage& value) { return bytes(field, value.bytes_); }

  const std::string& str() const noexcept { return bytes_; }

 private:
  template <class Bits, class T>
  static Bits bits_of(T value) noexcept {
    static_assert(sizeof(Bits) == sizeof(T));
    Bits bits;
    std::memcpy(&bits, &value, sizeof bits);
    return bits;
  }
  void key(int field, int wire_type) {
    append_varint((static_cast<std::uint64_t>(field) << 3) | static_cast<std::uint64_t>(wire_type));
  }
  void append_varint(std::uint64_t value) {
    while (value >= 0x80U) {
      bytes_.push_back(static_cast<char>((value & 0x7fU) | 0x80U));
      value >>= 7;
    }
    bytes_.push_back(static_cast<char>(value));
  }

  std::string bytes_;
};

}  // namespace detail
}  // namespace torchguard
