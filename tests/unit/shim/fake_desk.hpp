// The desk end of the cardbridge.v1 link, for ShimCore tests: the hello exchange, reader
// snapshots, and answers to the requests the shim forwards (by default a small in-memory
// card model; a test can hold requests and answer them by hand, in any order).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/messages.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/scard.hpp"
#include "fake_effects.hpp"

namespace cardbridge::shim::testkit {

namespace pr = cardbridge::protocol;

inline const Bytes kAtr = {0x3B, 0x80, 0x80, 0x01, 0x01};  // the vicc ATR of §3.1 [traced]

inline pr::ReaderInfo reader_empty(std::string name, uint32_t counter = 0) {
  return pr::ReaderInfo{std::move(name), scard::kStateEmpty, counter, {}};
}
inline pr::ReaderInfo reader_card(std::string name, uint32_t counter = 1, Bytes atr = kAtr) {
  return pr::ReaderInfo{std::move(name), scard::kStatePresent, counter, std::move(atr)};
}

class FakeDesk {
 public:
  struct Req {
    uint32_t id = 0;
    pr::Request q;
  };

  FakeDesk(ShimCore& core, FakeEffects& fx, Clock::time_point& now) : core_(&core), fx_(&fx), now_(&now) {}

  uint64_t instance = 0xD35C0001;
  uint64_t capabilities = pr::caps::kReaderPush;
  std::string name = "desk-under-test";

  // Transport up, the shim's hello, the desk's answer (reply=true).
  void up() {
    core_->desk_connected(*now_);
    auto h = expect_hello();
    if (h) {
      EXPECT_EQ(h->role, pr::Role::kServer);
      EXPECT_FALSE(h->reply);
    }
    hello(instance, true);
  }
  void hello(uint64_t inst, bool reply, uint32_t major = pr::kVersionMajor, pr::Role role = pr::Role::kDesk) {
    pr::Hello h;
    h.version_major = major;
    h.version_minor = pr::kVersionMinor;
    h.capabilities = capabilities;
    h.role = role;
    h.software = "fake-desk 1";
    h.peer_name = name;
    h.instance = inst;
    h.reply = reply;
    send(pr::Message{0, h});
  }
  // Pops the next message sent to the desk, which must be a Hello.
  std::optional<pr::Hello> expect_hello() {
    if (fx_->desk.empty()) {
      ADD_FAILURE() << "no message to the desk (expected a Hello)";
      return std::nullopt;
    }
    auto m = fx_->desk.front();
    fx_->desk.pop_front();
    auto* h = std::get_if<pr::Hello>(&m.body);
    if (!h) {
      ADD_FAILURE() << "expected a Hello, got " << pr::describe(m);
      return std::nullopt;
    }
    EXPECT_EQ(m.id, 0u);
    return *h;
  }
  void push(std::vector<pr::ReaderInfo> r) {
    readers = std::move(r);
    pr::ReaderSnapshot s;
    s.sequence = ++sequence_;
    s.readers = readers;
    send(pr::Message{0, s});
  }
  void send(const pr::Message& m) {
    auto payload = pr::encode(m);
    core_->desk_bytes(pr::frame(payload), *now_);
  }
  void reply(uint32_t id, const pr::Reply& r) { send(pr::Message{id, r}); }

  // The next Request the shim sent (other messages are skipped into |others|).
  std::optional<Req> next_request() {
    while (!fx_->desk.empty()) {
      auto m = fx_->desk.front();
      fx_->desk.pop_front();
      if (auto* q = std::get_if<pr::Request>(&m.body)) {
        Req r{m.id, *q};
        log.push_back(r);
        return r;
      }
      others.push_back(m);
    }
    return std::nullopt;
  }
  Req expect_request(pr::Op op) {
    auto r = next_request();
    if (!r) {
      ADD_FAILURE() << "no request to the desk (expected " << pr::op_name(op) << ")";
      return {};
    }
    EXPECT_EQ(r->q.op, op) << "got " << pr::op_name(r->q.op) << " instead of " << pr::op_name(op);
    EXPECT_NE(r->id, 0u);
    return *r;
  }
  // Requests not yet taken.
  std::size_t queued_requests() const {
    std::size_t n = 0;
    for (const auto& m : fx_->desk) if (std::holds_alternative<pr::Request>(m.body)) ++n;
    return n;
  }
  // Answers every queued request (|handler| first, then the default model). Returns how many.
  int serve() {
    int n = 0;
    while (auto r = next_request()) {
      std::optional<pr::Reply> rep;
      if (handler) rep = handler(*r);
      if (!rep) rep = answer(*r);
      reply(r->id, *rep);
      ++n;
    }
    return n;
  }

  // The default card model.
  pr::Reply answer(const Req& r) {
    pr::Reply rep;
    const auto& q = r.q;
    auto state_of = [&](const pr::ReaderInfo& ri) {
      const bool present = (ri.state & scard::kStatePresent) != 0;
      return (ri.event_count << 16) | (present ? 0x34u : 0x02u);
    };
    switch (q.op) {
      case pr::Op::kConnect: {
        const pr::ReaderInfo* ri = find(q.reader);
        if (!ri) {
          rep.rv = scard::kEUnknownReader;
          break;
        }
        if (q.share_mode != scard::kShareDirect && !(ri->state & scard::kStatePresent)) {
          rep.rv = scard::kENoSmartcard;
          break;
        }
        rep.handle = pr::DeskHandle{next_handle++};
        rep.protocol = (q.protocols & card_protocol) ? card_protocol : 0;
        rep.state = state_of(*ri);
        rep.atr = ri->atr;
        rep.card_protocol = rep.protocol;
        break;
      }
      case pr::Op::kReconnect:
        rep.protocol = card_protocol;
        if (!readers.empty()) rep.state = state_of(readers.front());
        rep.card_protocol = card_protocol;
        break;
      case pr::Op::kTransmit:
        rep.data = transmit_response;
        rep.length = static_cast<uint32_t>(rep.data.size());
        rep.protocol = q.protocols;
        break;
      case pr::Op::kControl:
        rep.data = control_response;
        rep.length = static_cast<uint32_t>(rep.data.size());
        break;
      case pr::Op::kGetAttrib:
        rep.data = attr_response;
        rep.length = static_cast<uint32_t>(rep.data.size());
        break;
      default:
        break;  // establish, release, disconnect, begin, end, set attrib, ping: success
    }
    return rep;
  }

  const pr::ReaderInfo* find(const std::string& reader) const {
    for (const auto& ri : readers)
      if (ri.name == reader) return &ri;
    return nullptr;
  }

  std::vector<pr::ReaderInfo> readers;  // the last snapshot pushed
  std::function<std::optional<pr::Reply>(const Req&)> handler;
  uint32_t next_handle = 1;  // desk handles are small numbers: easy to tell from hCards
  uint32_t card_protocol = scard::kProtocolT1;
  Bytes transmit_response = {0x90, 0x00};
  Bytes control_response = {0x01, 0x02, 0x03};
  Bytes attr_response = kAtr;
  std::vector<Req> log;               // every request taken
  std::vector<pr::Message> others;    // non-request messages skipped by next_request()

 private:
  ShimCore* core_;
  FakeEffects* fx_;
  Clock::time_point* now_;
  uint64_t sequence_ = 0;
};

}  // namespace cardbridge::shim::testkit
