// core_kit: the desk end of the cardbridge.v1 link, and a Rig tying a ShimCore to
// FakeEffects, a FakeDesk and simulated clients.
//
// FakeDesk reads what the shim sent (FakeEffects::desk, in order) and feeds frames back
// through ShimCore::desk_frame (payload without the 4-byte header, as ShimService does
// after its FrameDecoder).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/log.hpp"
#include "core/shim_core.hpp"
#include "core_kit_client.hpp"
#include "core_kit_effects.hpp"

namespace core_kit {

using Clock = shim::Clock;
using namespace std::chrono_literals;

inline const std::string kReaderA = "Virtual PCD 00 00";
inline const std::string kReaderB = "Virtual PCD 00 01";
inline const std::string kReaderC = "Gemalto PC Twin Reader 00 00";
inline const std::vector<uint8_t> kAtr = {0x3B, 0x80, 0x80, 0x01, 0x01};
inline const std::vector<uint8_t> kAtr2 = {0x3B, 0x8F, 0x80, 0x01, 0x80, 0x4F, 0x0C};

// Desk-side reader descriptions (SCARD_STATE_* bits as the desk's GetStatusChange reports).
inline pr::ReaderInfo card_in(const std::string& name, uint32_t counter, std::vector<uint8_t> atr = kAtr) {
  return pr::ReaderInfo{name, sc::kStatePresent, counter, std::move(atr)};
}
inline pr::ReaderInfo empty_reader(const std::string& name, uint32_t counter = 0) {
  return pr::ReaderInfo{name, sc::kStateEmpty, counter, {}};
}

class FakeDesk {
 public:
  FakeDesk(shim::ShimCore& core, FakeEffects& fx, Clock::time_point& now) : core_(&core), fx_(&fx), now_(&now) {}

  // Transport up; the shim says hello first. Returns that hello.
  pr::Hello transport_up() {
    core_->desk_connected(*now_);
    auto m = next();
    EXPECT_TRUE(m && std::holds_alternative<pr::Hello>(m->body)) << "the shim did not say hello first";
    if (!m || !std::holds_alternative<pr::Hello>(m->body)) return {};
    return std::get<pr::Hello>(m->body);
  }
  void hello(uint64_t caps, uint64_t instance, bool reply = false, uint32_t major = pr::kVersionMajor,
             pr::Role role = pr::Role::kDesk) {
    pr::Hello h;
    h.version_major = major;
    h.version_minor = pr::kVersionMinor;
    h.capabilities = caps;
    h.role = role;
    h.software = "fake-desk 1.0";
    h.peer_name = "desk-under-test";
    h.instance = instance;
    h.reply = reply;
    send(pr::Message{0, h});
  }
  // Transport up + hello exchange; the shim's hello reply is consumed.
  void connect(uint64_t caps = pr::caps::kAll, uint64_t instance = 0xD35C0001) {
    transport_up();
    hello(caps, instance);
    auto m = next();
    EXPECT_TRUE(m && std::holds_alternative<pr::Hello>(m->body) && std::get<pr::Hello>(m->body).reply)
        << "the shim did not answer the desk's hello";
    EXPECT_TRUE(core_->desk_up());
  }
  void snapshot(std::vector<pr::ReaderInfo> readers) { send(pr::Message{0, pr::ReaderSnapshot{++sequence_, std::move(readers)}}); }
  void send(const pr::Message& m) {
    auto payload = pr::encode(m);
    core_->desk_bytes(pr::frame(payload), *now_);
  }
  void reply(uint32_t id, pr::Reply r) { send(pr::Message{id, std::move(r)}); }
  void payload(const std::vector<uint8_t>& bytes) { core_->desk_bytes(pr::frame(bytes), *now_); }

  // ---- what the shim sent ----
  bool idle() const { return read_ == fx_->desk.size(); }
  std::size_t unread() const { return fx_->desk.size() - read_; }
  std::optional<pr::Message> next() {
    if (idle()) return std::nullopt;
    return fx_->desk[read_++];
  }
  // The next message, which must be a Request: {id, request}.
  std::pair<uint32_t, pr::Request> request() {
    auto m = next();
    if (!m) {
      ADD_FAILURE() << "the shim sent the desk nothing";
      return {0, {}};
    }
    if (!std::holds_alternative<pr::Request>(m->body)) {
      ADD_FAILURE() << "expected a Request, got " << pr::describe(*m);
      return {m->id, {}};
    }
    return {m->id, std::get<pr::Request>(m->body)};
  }
  // Expects a request with |op|; returns its id.
  uint32_t expect(pr::Op op, pr::Request* out = nullptr) {
    auto [id, q] = request();
    EXPECT_EQ(static_cast<int>(q.op), static_cast<int>(op)) << "desk request is " << pr::op_name(q.op);
    if (out) *out = q;
    return id;
  }

 private:
  shim::ShimCore* core_;
  FakeEffects* fx_;
  Clock::time_point* now_;
  std::size_t read_ = 0;
  uint64_t sequence_ = 0;
};

inline shim::ShimConfig kit_config(bool optimized = false) {
  shim::ShimConfig c;
  c.server_name = "unit-shim";
  c.capabilities = pr::caps::kAll;
  c.random_seed = 0x5EED;
  if (optimized) c.optimizations = shim::Optimizations::all();
  return c;
}

// The whole bench: one ShimCore, its effects, a desk and clients (ids 1, 2, ...).
class Rig {
 public:
  explicit Rig(shim::ShimConfig config = kit_config()) : core(fx, quiet(std::move(config))), desk(core, fx, now) {}
  Rig(const Rig&) = delete;
  Rig& operator=(const Rig&) = delete;

  // The test's clock: every event the core sees carries it.
  Clock::time_point now = Clock::time_point(1000h);
  FakeEffects fx;
  shim::ShimCore core;
  FakeDesk desk;

  // A connection that has only been opened.
  PcscClient raw_client() {
    PcscClient c(core, fx, next_id_++, &now);
    c.open();
    return c;
  }
  // SCardEstablishContext done (CMD_VERSION 4.<minor>, ESTABLISH).
  PcscClient client(int32_t minor = 4) {
    PcscClient c(core, fx, next_id_++, &now);
    c.start(minor);
    return c;
  }
  // Desk up (capabilities |caps|), reader A with a card (counter 1), reader B empty.
  void standard_desk(uint64_t caps = pr::caps::kAll) {
    desk.connect(caps);
    desk.snapshot({card_in(kReaderA, 1), empty_reader(kReaderB)});
  }
  // A full SCardConnect: the request reaches the desk, which answers |desk_handle|.
  // Returns the hCard the client got (0 on failure).
  uint32_t connect(PcscClient& c, const std::string& reader = kReaderA, uint32_t share = sc::kShareShared,
                   uint32_t desk_handle = 0, uint32_t protocol = sc::kProtocolT1, uint32_t counter = 1,
                   uint32_t reader_state = sc::kReaderPresent | sc::kReaderPowered | sc::kReaderNegotiable,
                   pr::Request* request_out = nullptr) {
    c.send_connect(reader, share);
    pr::Request q;
    const uint32_t id = desk.expect(pr::Op::kConnect, &q);
    EXPECT_EQ(q.reader, reader);
    if (request_out) *request_out = q;
    pr::Reply r;
    r.rv = 0;
    r.handle = pr::DeskHandle{desk_handle != 0 ? desk_handle : next_desk_handle_++};
    r.protocol = protocol;
    r.state = (counter << 16) | reader_state;
    r.card_protocol = protocol;
    desk.reply(id, r);
    auto rep = c.read<wire::ConnectStruct>();
    EXPECT_EQ(rep.rv, 0u);
    const auto card = static_cast<uint32_t>(rep.card);
    c.remember(card, reader);
    return card;
  }
  // Answers the next desk request (which must be |op|) with |r|.
  void answer(pr::Op op, pr::Reply r = {}) { desk.reply(desk.expect(op), std::move(r)); }

 private:
  static shim::ShimConfig quiet(shim::ShimConfig c) {
    static const bool once = [] {
      cardbridge::log::init(spdlog::level::off, "shim_core_unit_tests");
      return true;
    }();
    (void)once;
    return c;
  }
  shim::ClientId next_id_ = 1;
  uint32_t next_desk_handle_ = 0x00D00001;
};

}  // namespace core_kit
