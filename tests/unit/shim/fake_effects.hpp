// Test kit for ShimCore: a recording ShimEffects and little-endian byte helpers.
//
// FakeEffects keeps, per client, every byte the core wrote (in order, concatenated as a
// socket would deliver them), the clients it closed, every frame it sent to the desk
// (checked for a correct 4-byte big-endian header, then decoded), and desk-link resets.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <gtest/gtest.h>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/framing.hpp"
#include "core/shim_core.hpp"

namespace cardbridge::shim::testkit {

static_assert(std::endian::native == std::endian::little,
              "the byte layouts below are written for little-endian hosts (x86-64, aarch64)");

using Bytes = std::vector<uint8_t>;

// Little-endian byte builder, so that requests are written out field by field as
// libpcsclite sends them, independently of the structs in wire.hpp.
class Le {
 public:
  Le& u32(uint32_t v) {
    for (int i = 0; i < 4; ++i) v_.push_back(static_cast<uint8_t>(v >> (8 * i)));
    return *this;
  }
  Le& i32(int32_t v) { return u32(static_cast<uint32_t>(v)); }
  Le& bytes(std::span<const uint8_t> b) {
    v_.insert(v_.end(), b.begin(), b.end());
    return *this;
  }
  Le& zeros(std::size_t n) {
    v_.insert(v_.end(), n, 0);
    return *this;
  }
  // A NUL-padded fixed-size char field.
  Le& text(std::string_view s, std::size_t field) {
    EXPECT_LE(s.size(), field);
    const std::size_t n = std::min(s.size(), field);
    v_.insert(v_.end(), s.begin(), s.begin() + static_cast<std::ptrdiff_t>(n));
    v_.insert(v_.end(), field - n, 0);
    return *this;
  }
  // |b| in a fixed field of |field| bytes, zero-padded.
  Le& padded(std::span<const uint8_t> b, std::size_t field) {
    EXPECT_LE(b.size(), field);
    const std::size_t n = std::min(b.size(), field);
    v_.insert(v_.end(), b.begin(), b.begin() + static_cast<std::ptrdiff_t>(n));
    v_.insert(v_.end(), field - n, 0);
    return *this;
  }
  const Bytes& get() const { return v_; }
  operator Bytes() const { return v_; }  // NOLINT(google-explicit-constructor)
  std::size_t size() const { return v_.size(); }

 private:
  Bytes v_;
};

inline uint32_t rd32(const Bytes& b, std::size_t off) {
  if (off + 4 > b.size()) {
    ADD_FAILURE() << "read of 4 bytes at offset " << off << " in a " << b.size() << "-byte buffer";
    return 0xDEADBEEF;
  }
  return static_cast<uint32_t>(b[off]) | (static_cast<uint32_t>(b[off + 1]) << 8) |
         (static_cast<uint32_t>(b[off + 2]) << 16) | (static_cast<uint32_t>(b[off + 3]) << 24);
}
inline int32_t rdi32(const Bytes& b, std::size_t off) { return static_cast<int32_t>(rd32(b, off)); }
inline Bytes slice(const Bytes& b, std::size_t off, std::size_t n) {
  if (off + n > b.size()) {
    ADD_FAILURE() << "slice of " << n << " bytes at " << off << " in a " << b.size() << "-byte buffer";
    return {};
  }
  return Bytes(b.begin() + static_cast<std::ptrdiff_t>(off), b.begin() + static_cast<std::ptrdiff_t>(off + n));
}
inline std::string hex(const Bytes& b) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s;
  for (uint8_t v : b) {
    s += kDigits[v >> 4];
    s += kDigits[v & 0xF];
  }
  return s;
}

class FakeEffects : public ShimEffects {
 public:
  void send_to_client(ClientId id, std::vector<uint8_t> bytes) override {
    auto& o = out_[id];
    o.insert(o.end(), bytes.begin(), bytes.end());
    ++writes_[id];
    log.push_back(Event{Event::kClientBytes, id, bytes.size()});
  }
  void close_client(ClientId id) override {
    closed.push_back(id);
    log.push_back(Event{Event::kClose, id, 0});
  }
  void send_to_desk(std::vector<uint8_t> frame) override {
    raw_frames.push_back(frame);
    if (frame.size() < protocol::kFrameHeaderSize) {
      ADD_FAILURE() << "frame shorter than its header";
      return;
    }
    const std::size_t len = (std::size_t{frame[0]} << 24) | (std::size_t{frame[1]} << 16) |
                            (std::size_t{frame[2]} << 8) | std::size_t{frame[3]};
    EXPECT_EQ(len, frame.size() - protocol::kFrameHeaderSize) << "frame header length";
    auto m = protocol::decode(std::span<const uint8_t>(frame).subspan(protocol::kFrameHeaderSize));
    if (!m) {
      ADD_FAILURE() << "the shim sent an undecodable frame: " << m.error().what;
      return;
    }
    desk.push_back(*m);
    log.push_back(Event{Event::kDesk, 0, frame.size()});
  }
  void reset_desk_link(const std::string& reason) override {
    resets.push_back(reason);
    log.push_back(Event{Event::kReset, 0, 0});
  }
  void audit(ClientId client, const std::string& event) override { audits.emplace_back(client, event); }

  // Everything written to |id| since the last take (and forgets it).
  Bytes take(ClientId id) {
    auto it = out_.find(id);
    if (it == out_.end()) return {};
    Bytes b = std::move(it->second);
    out_.erase(it);
    return b;
  }
  // Bytes written to |id| and not taken yet (without consuming them).
  std::size_t pending_bytes(ClientId id) const {
    auto it = out_.find(id);
    return it == out_.end() ? 0 : it->second.size();
  }
  bool was_closed(ClientId id) const { return std::find(closed.begin(), closed.end(), id) != closed.end(); }
  // Messages sent to the desk and not consumed by a FakeDesk yet.
  std::deque<protocol::Message> desk;
  std::vector<Bytes> raw_frames;
  std::vector<ClientId> closed;
  std::vector<std::string> resets;
  std::vector<std::pair<ClientId, std::string>> audits;

  // Order of all effects (to check e.g. that a reply left before a signal).
  struct Event {
    enum Kind { kClientBytes, kClose, kDesk, kReset } kind;
    ClientId client;
    std::size_t size;
  };
  std::vector<Event> log;

 private:
  std::map<ClientId, Bytes> out_;
  std::map<ClientId, int> writes_;
};

}  // namespace cardbridge::shim::testkit
