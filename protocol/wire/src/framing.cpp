#include "cardbridge/protocol/framing.hpp"

#include <algorithm>

namespace cardbridge::protocol {

std::string to_string(FrameError e) {
  switch (e) {
    case FrameError::kTooLarge: return "frame length above the limit";
    case FrameError::kEmpty: return "empty frame";
  }
  return "unknown frame error";
}

bool FrameDecoder::feed(std::span<const uint8_t> bytes) {
  if (error_) return false;
  buf_.insert(buf_.end(), bytes.begin(), bytes.end());
  return scan();
}

bool FrameDecoder::scan() {
  while (buf_.size() - pos_ >= kFrameHeaderSize) {
    const uint8_t* h = buf_.data() + pos_;
    std::size_t len = (std::size_t{h[0]} << 24) | (std::size_t{h[1]} << 16) |
                      (std::size_t{h[2]} << 8) | std::size_t{h[3]};
    if (len > max_) {
      error_ = FrameError::kTooLarge;
      return false;
    }
    if (len == 0) {
      error_ = FrameError::kEmpty;
      return false;
    }
    if (buf_.size() - pos_ - kFrameHeaderSize < len) break;
    auto begin = buf_.begin() + static_cast<std::ptrdiff_t>(pos_ + kFrameHeaderSize);
    ready_.emplace_back(begin, begin + static_cast<std::ptrdiff_t>(len));
    pos_ += kFrameHeaderSize + len;
  }
  // Compact: drop consumed bytes once they dominate the buffer.
  if (pos_ == buf_.size()) {
    buf_.clear();
    pos_ = 0;
  } else if (pos_ > 4096 && pos_ * 2 > buf_.size()) {
    buf_.erase(buf_.begin(), buf_.begin() + static_cast<std::ptrdiff_t>(pos_));
    pos_ = 0;
  }
  return true;
}

std::optional<std::vector<uint8_t>> FrameDecoder::next() {
  if (ready_pos_ == ready_.size()) {
    ready_.clear();
    ready_pos_ = 0;
    return std::nullopt;
  }
  return std::move(ready_[ready_pos_++]);
}

std::vector<uint8_t> frame(std::span<const uint8_t> payload) {
  std::vector<uint8_t> out;
  out.reserve(kFrameHeaderSize + payload.size());
  auto n = static_cast<uint32_t>(payload.size());
  out.push_back(static_cast<uint8_t>(n >> 24));
  out.push_back(static_cast<uint8_t>(n >> 16));
  out.push_back(static_cast<uint8_t>(n >> 8));
  out.push_back(static_cast<uint8_t>(n));
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

}  // namespace cardbridge::protocol
