// FakeDesk: the desk end of the link for ShimCore unit tests. DeskEnd sends; FakeDesk also
// reads what the shim sent (RecordingEffects::desk, in order, through its own cursor) and
// answers the requests: by hand, one by one and in any order (expect(), reply()), or all
// at once with a small card model (serve()).
//
// The card model: Connect succeeds on a known reader with a card (any reader for DIRECT),
// with desk handles 1, 2, 3... (small numbers, easy to tell from the shim's hCards), T1,
// and the reader's state as the desk's SCardStatus reports it (event counter << 16 | 0x34,
// or 0x02 without a card); Reconnect answers the handle's reader likewise; Transmit,
// Control and GetAttrib return the configured responses; everything else succeeds.
// |handler| may answer a request first (nullopt: the model answers).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include <gtest/gtest.h>

#include "kit/desk_end.hpp"
#include "kit/pcsc_values.hpp"

namespace cardbridge::shim::kit {

inline const Bytes kAtr = {0x3B, 0x80, 0x80, 0x01, 0x01};  // the vicc ATR [traced]
inline const Bytes kAtr2 = {0x3B, 0x8F, 0x80, 0x01, 0x80, 0x4F, 0x0C};

// Desk-side reader descriptions (SCARD_STATE_* as the desk's GetStatusChange reports them).
inline pr::ReaderInfo card_in(std::string name, uint32_t counter = 1, Bytes atr = kAtr) {
  return pr::ReaderInfo{std::move(name), pcsc::kStatePresent, counter, std::move(atr)};
}
inline pr::ReaderInfo empty_reader(std::string name, uint32_t counter = 0) {
  return pr::ReaderInfo{std::move(name), pcsc::kStateEmpty, counter, {}};
}

// Desk answers. |protocol|: what the desk's driver reported (for a Transmit, the receive PCI).
inline pr::Reply ok_reply(Bytes data = {}, uint32_t protocol = pcsc::kT0) {
  pr::Reply r;
  r.data = std::move(data);
  r.protocol = protocol;
  return r;
}
inline pr::Reply rv_reply(uint32_t rv) {
  pr::Reply r;
  r.rv = rv;
  return r;
}

class FakeDesk : public DeskEnd {
 public:
  struct Req {
    uint32_t id = 0;
    pr::Request q;
  };

  using DeskEnd::DeskEnd;

  // ---- sessions ----
  // Transport up: the shim says hello first (role server, not a reply). Returns that hello.
  pr::Hello connect_transport() {
    transport_up();
    auto h = expect_hello();
    EXPECT_EQ(h.role, pr::Role::kServer);
    EXPECT_FALSE(h.reply) << "the shim's first hello is not a reply";
    return h;
  }
  // Transport up and the hello exchange (the desk answers the shim's hello).
  void connect(uint64_t caps) {
    capabilities = caps;
    connect_transport();
    hello(/*reply=*/true);
    EXPECT_TRUE(core_->desk_up()) << "the session did not start";
    EXPECT_TRUE(idle()) << "the shim answered a hello reply";
  }
  // Hellos of another instance, major version or role (the identity fields otherwise).
  void hello_as(uint64_t inst, bool reply, uint32_t major = pr::kVersionMajor, pr::Role role = pr::Role::kDesk) {
    auto h = make_hello(reply);
    h.instance = inst;
    h.version_major = major;
    h.role = role;
    send_hello(h);
  }
  // Pushes |r| as the desk's readers (the model answers from it).
  void push(std::vector<pr::ReaderInfo> r) {
    readers = r;
    snapshot(std::move(r));
  }

  // ---- what the shim sent ----
  bool idle() const { return read_ == fx_->desk.size(); }
  std::size_t unread() const { return fx_->desk.size() - read_; }
  // Messages taken so far (an index into RecordingEffects::desk).
  std::size_t read_position() const { return read_; }
  std::optional<pr::Message> next() {
    if (idle()) return std::nullopt;
    return fx_->desk[read_++];
  }
  // The next message, which must be a Hello.
  pr::Hello expect_hello() {
    auto m = next();
    if (!m) {
      ADD_FAILURE() << "the shim sent the desk nothing (expected a Hello)";
      return {};
    }
    EXPECT_EQ(m->id, 0u);
    if (auto* h = std::get_if<pr::Hello>(&m->body)) return *h;
    ADD_FAILURE() << "expected a Hello, got " << pr::describe(*m);
    return {};
  }
  // The next message, which must be a Request.
  Req request() {
    auto m = next();
    if (!m) {
      ADD_FAILURE() << "the shim sent the desk nothing (expected a request)";
      return {};
    }
    auto* q = std::get_if<pr::Request>(&m->body);
    if (!q) {
      ADD_FAILURE() << "expected a request, got " << pr::describe(*m);
      return {m->id, {}};
    }
    EXPECT_NE(m->id, 0u) << "request ids are never 0";
    Req r{m->id, *q};
    log.push_back(r);
    return r;
  }
  // The next message, which must be a request |op|.
  Req expect(pr::Op op) {
    auto r = request();
    EXPECT_EQ(r.q.op, op) << "the desk got " << pr::op_name(r.q.op) << " instead of " << pr::op_name(op);
    return r;
  }
  // The next request, skipping other messages (kept in |others|).
  std::optional<Req> next_request() {
    while (!idle()) {
      if (std::holds_alternative<pr::Request>(fx_->desk[read_].body)) return request();
      others.push_back(fx_->desk[read_++]);
    }
    return std::nullopt;
  }
  std::size_t queued_requests() const {
    std::size_t n = 0;
    for (std::size_t i = read_; i < fx_->desk.size(); ++i) n += std::holds_alternative<pr::Request>(fx_->desk[i].body);
    return n;
  }

  // ---- answering ----
  // Answers every unread request (|handler| first, then the model), including the ones
  // the answers release, until the shim sends nothing more. Returns how many.
  int serve() {
    int n = 0;
    while (auto r = next_request()) {
      std::optional<pr::Reply> rep;
      if (handler) rep = handler(*r);
      reply(r->id, rep ? *rep : answer(*r));
      ++n;
    }
    return n;
  }
  // Answers the next request, which must be |op|, with |r|; returns it.
  Req answer_next(pr::Op op, pr::Reply r = {}) {
    auto q = expect(op);
    reply(q.id, std::move(r));
    return q;
  }

  // The card model's answer to |r|.
  pr::Reply answer(const Req& r) {
    pr::Reply rep;
    const auto& q = r.q;
    switch (q.op) {
      case pr::Op::kConnect: {
        const pr::ReaderInfo* ri = find(q.reader);
        if (!ri) {
          rep.rv = pcsc::kEUnknownReader;
          break;
        }
        if (q.share_mode != pcsc::kShareDirect && !(ri->state & pcsc::kStatePresent)) {
          rep.rv = pcsc::kENoSmartcard;
          break;
        }
        rep.handle = pr::DeskHandle{next_handle++};
        handle_reader_[rep.handle.value] = q.reader;
        rep.protocol = (q.protocols & card_protocol) ? card_protocol : 0;
        rep.state = status_state(*ri);
        rep.atr = ri->atr;
        rep.card_protocol = rep.protocol;
        break;
      }
      case pr::Op::kReconnect: {
        rep.protocol = card_protocol;
        rep.card_protocol = card_protocol;
        if (const pr::ReaderInfo* ri = find(handle_reader_[q.handle.value])) rep.state = status_state(*ri);
        break;
      }
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

  std::vector<pr::ReaderInfo> readers;  // the last push()
  std::function<std::optional<pr::Reply>(const Req&)> handler;
  uint32_t next_handle = 1;
  uint32_t card_protocol = pcsc::kT1;
  Bytes transmit_response = {0x90, 0x00};
  Bytes control_response = {0x01, 0x02, 0x03};
  Bytes attr_response = kAtr;
  std::vector<Req> log;               // every request taken, in order
  std::vector<pr::Message> others;    // messages next_request() skipped

 private:
  // SCardStatus's dwState at the desk: event counter << 16 | pcscd's reader state.
  static uint32_t status_state(const pr::ReaderInfo& ri) {
    const bool present = (ri.state & pcsc::kStatePresent) != 0;
    return (ri.event_count << 16) | (present ? pcsc::kReaderCardReady : pcsc::kReaderAbsent);
  }

  std::size_t read_ = 0;
  std::map<uint32_t, std::string> handle_reader_;
};

}  // namespace cardbridge::shim::kit
