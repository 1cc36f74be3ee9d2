// Length-prefixed framing: [u32 big-endian payload length][payload].
//
// FrameDecoder reassembles frames from chunks cut at arbitrary boundaries (a static RDP
// channel delivers 1600-byte pieces; sockets deliver whatever they deliver). A length
// above the limit is rejected before anything is allocated; after an error the decoder
// stays failed (the connection must be closed).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace cardbridge::protocol {

inline constexpr std::size_t kFrameHeaderSize = 4;
// Largest payload we accept: an extended APDU (65548 bytes) and its response, with room
// for prefetched answers and protobuf overhead.
inline constexpr std::size_t kDefaultMaxFrame = 512 * 1024;

enum class FrameError { kTooLarge, kEmpty };
std::string to_string(FrameError e);

class FrameDecoder {
 public:
  explicit FrameDecoder(std::size_t max_payload = kDefaultMaxFrame) : max_(max_payload) {}

  // Appends bytes. Returns false (and enters the failed state) if a header announces a
  // frame that is too large or empty; frames completed before the bad header stay available.
  bool feed(std::span<const uint8_t> bytes);
  // The next complete payload, if any.
  std::optional<std::vector<uint8_t>> next();

  bool failed() const { return error_.has_value(); }
  std::optional<FrameError> error() const { return error_; }
  // Bytes received but not yet returned as frames.
  std::size_t buffered() const { return buf_.size() - pos_; }

 private:
  bool scan();
  std::size_t max_;
  std::vector<uint8_t> buf_;
  std::size_t pos_ = 0;  // start of unconsumed data in buf_
  std::vector<std::vector<uint8_t>> ready_;
  std::size_t ready_pos_ = 0;
  std::optional<FrameError> error_;
};

// Prepends the 4-byte header.
std::vector<uint8_t> frame(std::span<const uint8_t> payload);

}  // namespace cardbridge::protocol
