// Encoding and decoding of cardbridge.v1 messages. decode() validates everything that
// comes from the peer: it never throws and never aborts on bad input.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "cardbridge/protocol/messages.hpp"
#include "cardbridge/support/result.hpp"

namespace cardbridge::protocol {

struct DecodeError {
  std::string what;
};

// Serialises |m| (no frame header).
std::vector<uint8_t> encode(const Message& m);
// Serialises |m| with the frame header, ready to write.
std::vector<uint8_t> encode_frame(const Message& m);
Result<Message, DecodeError> decode(std::span<const uint8_t> payload);

// Limits enforced by decode().
inline constexpr std::size_t kMaxReaders = 64;
inline constexpr std::size_t kMaxReaderNameBytes = 127;
inline constexpr std::size_t kMaxAtrBytes = 33;
inline constexpr std::size_t kMaxDataBytes = 65548;
inline constexpr std::size_t kMaxPrefetched = 64;
inline constexpr std::size_t kMaxAfter = 64;  // Request.after ids
inline constexpr std::size_t kMaxTextBytes = 256;
// The card image (capability card-image) and transmit preludes.
inline constexpr std::size_t kMaxPrelude = 8;
inline constexpr std::size_t kMaxShortApduBytes = 261;      // CLA INS P1 P2 Lc 255 Le
inline constexpr std::size_t kMaxShortResponseBytes = 258;  // 256 data bytes + SW
inline constexpr std::size_t kMaxImageSelects = 256;
inline constexpr std::size_t kMaxImageFiles = 64;
inline constexpr std::size_t kMaxImageKeyBytes = 40;
inline constexpr std::size_t kMaxImageFileBytes = 32 * 1024;
inline constexpr std::size_t kMaxImageBytes = 256 * 1024;

// One-line summary for logs (no APDU contents).
std::string describe(const Message& m);

}  // namespace cardbridge::protocol
