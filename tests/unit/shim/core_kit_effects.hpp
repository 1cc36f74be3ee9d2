// core_kit: FakeEffects, the I/O layer as ShimCore sees it, recorded for assertions.
//
// Bytes for each client are appended to a per-client stream that the test (through
// core_kit_client.hpp) consumes in order, exactly as a libpcsclite socket would be read.
// Desk frames are checked (4-byte big-endian length = payload size), the header is
// stripped and the payload decoded with protocol::decode; undecodable frames fail the test.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/framing.hpp"
#include "core/shim_core.hpp"

namespace core_kit {

namespace pr = cardbridge::protocol;
namespace shim = cardbridge::shim;

class FakeEffects final : public shim::ShimEffects {
 public:
  struct Stream {
    std::vector<uint8_t> bytes;
    std::size_t consumed = 0;
    std::size_t available() const { return bytes.size() - consumed; }
  };

  // ---- ShimEffects ----
  void send_to_client(shim::ClientId id, std::vector<uint8_t> bytes) override {
    EXPECT_FALSE(closed_.contains(id)) << "bytes for client " << id << " after it was closed";
    EXPECT_FALSE(gone_.contains(id)) << "bytes for client " << id << " after it went away";
    EXPECT_FALSE(bytes.empty()) << "empty write to client " << id;
    auto& s = streams_[id];
    s.bytes.insert(s.bytes.end(), bytes.begin(), bytes.end());
    ++writes_[id];
  }
  void close_client(shim::ClientId id) override {
    EXPECT_TRUE(closed_.insert(id).second) << "client " << id << " closed twice";
    EXPECT_FALSE(gone_.contains(id)) << "client " << id << " closed after it went away";
  }
  void send_to_desk(std::vector<uint8_t> frame) override {
    raw_desk_frames.push_back(frame);
    if (frame.size() < pr::kFrameHeaderSize) {
      ADD_FAILURE() << "desk frame shorter than its header";
      return;
    }
    const uint32_t len = (uint32_t{frame[0]} << 24) | (uint32_t{frame[1]} << 16) | (uint32_t{frame[2]} << 8) | frame[3];
    EXPECT_EQ(len, frame.size() - pr::kFrameHeaderSize) << "frame header does not match the payload size";
    auto m = pr::decode(std::span<const uint8_t>(frame).subspan(pr::kFrameHeaderSize));
    if (!m) {
      ADD_FAILURE() << "undecodable desk frame: " << m.error().what;
      return;
    }
    desk.push_back(std::move(*m));
  }
  void reset_desk_link(const std::string& reason) override { resets.push_back(reason); }
  void audit(shim::ClientId client, const std::string& event) override { audits.emplace_back(client, event); }

  // The test's client went away (ShimCore::client_closed): nothing may reach it any more.
  void client_gone(shim::ClientId id) { gone_.insert(id); }

  // ---- inspection ----
  Stream& stream(shim::ClientId id) { return streams_[id]; }
  bool is_closed(shim::ClientId id) const { return closed_.contains(id); }
  std::size_t closed_count() const { return closed_.size(); }
  std::size_t writes(shim::ClientId id) const {
    auto it = writes_.find(id);
    return it == writes_.end() ? 0 : it->second;
  }

  std::vector<pr::Message> desk;                 // every frame sent to the desk, decoded
  std::vector<std::vector<uint8_t>> raw_desk_frames;
  std::vector<std::string> resets;               // reset_desk_link() reasons
  std::vector<std::pair<shim::ClientId, std::string>> audits;

 private:
  std::map<shim::ClientId, Stream> streams_;
  std::map<shim::ClientId, std::size_t> writes_;
  std::set<shim::ClientId> closed_;
  std::set<shim::ClientId> gone_;
};

}  // namespace core_kit
