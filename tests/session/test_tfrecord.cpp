// session/tfrecord.hpp: CRC-32C, the TFRecord frame and the protobuf encoding of an event.
#include "torchguard/session.hpp"

#include <cstdint>
#include <string>

#include "support.hpp"
#include "torchguard/session/tfrecord.hpp"

TEST_CASE("CRC-32C, the TFRecord frame and the protobuf encoding match their specifications",
          "[tensorboard]") {
  using namespace torchguard::detail;
  // RFC 3720 B.4 and the common check value.
  CHECK(crc32c("123456789") == 0xe3069283U);
  CHECK(crc32c(std::string(32, '\0')) == 0x8a9136aaU);
  CHECK(crc32c(std::string(32, '\xff')) == 0x62a8ab43U);
  std::string ascending(32, '\0');
  for (int i = 0; i < 32; ++i) ascending[i] = static_cast<char>(i);
  CHECK(crc32c(ascending) == 0x46dd794eU);
  CHECK(crc32c("") == 0U);
  const std::uint32_t crc = crc32c("abc");
  CHECK(masked_crc32c("abc") ==
        static_cast<std::uint32_t>(((crc >> 15) | (crc << 17)) + 0xa282ead8U));

  const std::string record = tfrecord("event");
  REQUIRE(record.size() == 8 + 4 + 5 + 4);
  CHECK(record.substr(0, 8) == std::string("\x05\0\0\0\0\0\0\0", 8));  // little-endian length
  auto u32_at = [&](std::size_t at) {
    std::uint32_t value = 0;
    for (int i = 3; i >= 0; --i) value = (value << 8) | static_cast<unsigned char>(record[at + i]);
    return value;
  };
  CHECK(u32_at(8) == masked_crc32c(record.substr(0, 8)));
  CHECK(record.substr(12, 5) == "event");
  CHECK(u32_at(17) == masked_crc32c("event"));

  // The protobuf encoding guide's examples, and a negative int64 (ten bytes).
  CHECK(ProtoMessage().varint(1, 150).str() == "\x08\x96\x01");
  CHECK(ProtoMessage().bytes(2, "testing").str() == "\x12\x07testing");
  CHECK(ProtoMessage().message(3, ProtoMessage().varint(1, 150)).str() == "\x1a\x03\x08\x96\x01");
  CHECK(ProtoMessage().varint(2, static_cast<std::uint64_t>(std::int64_t{-1})).str() ==
        std::string("\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 11));
  CHECK(ProtoMessage().float32(2, 1.0F).str() == std::string("\x15\x00\x00\x80\x3f", 5));
  CHECK(ProtoMessage().float64(1, 1.0).str() ==
        std::string("\x09\x00\x00\x00\x00\x00\x00\xf0\x3f", 9));
}
