// Fuzz target: client::DeskCore, the desk's request handling, driven by what a server (or an
// attacker posing as one) sends and by whatever the desk's PC/SC answers.
//
// The input is a script (ByteReader: every input is a valid one). Actions: a well-formed
// request from the server (any op, any context, handles learned from replies or made up,
// any flags, reader names known or not, "after" lists naming earlier requests), raw bytes
// on the link, a server hello or error, the edge completing one of the pending PC/SC calls
// with a result of the fuzzer's choosing (success with fresh contexts and card handles, or
// any error code; response data ending in 90 00, 61 xx, 6C xx ...), a reader change (and the
// desk's PC/SC service failing), time passing (the card image: the desk reads a card it has
// learned about on its own lanes), the transport going down and up, shutdown. Requests may
// ask for the card image (kWantImage) and carry a prelude.
//
// Oracle (besides ASan/UBSan/LSan), the effects contract of desk_core.hpp and the desk's
// duty to its pcscd:
//  * every send() is whole frames that decode, none of them a Request (the desk answers);
//  * a reply answers a request of the current session that was not answered yet (while the
//    session is tracked: raw bytes that may have decoded into requests stop the tracking);
//  * execute() only on a lane with no call in flight that was not closed; lane_closed() once
//    per lane, with no call in flight;
//  * PC/SC calls use only contexts the edge established and did not release, and card
//    handles the edge connected and did not disconnect (or lose with their context);
//  * at the end (transport down, shutdown, every call answered): the core is idle, it holds
//    no handle, and every context the edge established has been released: nothing leaks at
//    the desk's pcscd (whose 200 contexts every PC/SC program at the desk shares).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "cardbridge/desk_core/desk_core.hpp"
#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/framing.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/log.hpp"
#include "fuzz_util.hpp"

namespace pr = cardbridge::protocol;
namespace cl = cardbridge::client;
using cardbridge::fuzz::ByteReader;

namespace {

constexpr std::size_t kMaxActions = 3000;
const char* const kReaders[] = {"Gemalto PC Twin Reader 00 00", "OMNIKEY CardMan 3121 01 00", "Nobody's Reader 02 00"};
constexpr uint32_t kErrors[] = {
    0x8010000B,  // SCARD_E_SHARING_VIOLATION
    0x80100069,  // SCARD_W_REMOVED_CARD
    0x8010000C,  // SCARD_E_NO_SMARTCARD
    0x80100003,  // SCARD_E_INVALID_HANDLE
    0x8010001D,  // SCARD_E_NO_SERVICE
    0x80100068,  // SCARD_W_RESET_CARD
    0x80100008,  // SCARD_E_INSUFFICIENT_BUFFER
    0x80100017,  // SCARD_E_READER_UNAVAILABLE
    0x80100009,  // SCARD_E_UNKNOWN_READER
    0x8010000A,  // SCARD_E_TIMEOUT
    0x80100016,  // SCARD_E_NOT_TRANSACTED
    0x80100001,  // SCARD_F_INTERNAL_ERROR
};

// Prelude commands (card image): SELECTs by path and by name, a READ BINARY, a write, junk.
const pr::Bytes kPrelude[] = {
    {0x00, 0xA4, 0x08, 0x04, 0x02, 0xD0, 0x03},
    {0x00, 0xA4, 0x04, 0x00, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x03, 0x10, 0x10},
    {0x00, 0xB0, 0x00, 0x00, 0x0C},
    {0x00, 0xD6, 0x00, 0x00, 0x01, 0x42},
    {0xFF},
};

[[noreturn]] void breach(const char* what) { cardbridge::fuzz::invariant_failed(what, __FILE__, __LINE__); }
#define DESK_CHECK(cond, what) \
  do {                         \
    if (!(cond)) breach(what); \
  } while (0)

class Harness : public cl::DeskEffects {
 public:
  explicit Harness(uint8_t flags) {
    cl::DeskConfig c;
    c.desk_name = "fuzz-desk";
    c.capabilities = pr::caps::kAll;
    c.random_seed = 7;
    c.max_contexts = 2 + flags % 8;  // small: the limit's refusals are reached
    c.server_policy.unix_uids = {0};  // the server runs as root here...
    peer_uid_ = (flags & 0x40) ? 4242 : 0;  // ...or now and then as a user the desk refuses
    core_.emplace(*this, c);
  }

  void run(ByteReader& in) {
    for (std::size_t n = 0; n < kMaxActions && !in.empty(); ++n) step(in);
    finish();
  }

  // ---- DeskEffects ------------------------------------------------------------------------
  void send(std::vector<uint8_t> bytes) override {
    pr::FrameDecoder d;
    DESK_CHECK(d.feed(bytes), "the desk sent a bad frame header");
    std::size_t frames = 0;
    while (auto f = d.next()) {
      ++frames;
      auto m = pr::decode(*f);
      DESK_CHECK(m.ok(), "the desk sent a message that does not decode");
      DESK_CHECK(!std::holds_alternative<pr::Request>(m->body), "the desk sent a request");
      if (const auto* r = std::get_if<pr::Reply>(&m->body)) on_reply(m->id, *r);
    }
    DESK_CHECK(frames > 0 && d.buffered() == 0, "send() with a partial frame");
  }
  void close_link(const std::string&) override { link_closed_ = true; }
  void execute(cl::LaneId lane, cl::PcscCall c) override {
    DESK_CHECK(!closed_lanes_.count(lane), "a call on a closed lane");
    for (const auto& p : pending_) DESK_CHECK(p.lane != lane, "two calls in flight on one lane");
    check_call(c);
    pending_.push_back({lane, std::move(c)});
  }
  void lane_closed(cl::LaneId lane) override {
    DESK_CHECK(closed_lanes_.insert(lane).second, "a lane closed twice");
    for (const auto& p : pending_) DESK_CHECK(p.lane != lane, "a lane closed with a call in flight");
  }

 private:
  struct Pending {
    cl::LaneId lane;
    cl::PcscCall call;
  };

  // ---- the oracle's model of the desk's pcscd -----------------------------------------------
  void check_call(const cl::PcscCall& c) {
    std::visit(
        [&](const auto& x) {
          using T = std::decay_t<decltype(x)>;
          if constexpr (std::is_same_v<T, cl::call::Establish>) {
          } else if constexpr (std::is_same_v<T, cl::call::Release> || std::is_same_v<T, cl::call::Connect>) {
            DESK_CHECK(live_contexts_.count(x.ctx), "a call on a context the edge never made or released");
          } else {
            DESK_CHECK(live_cards_.count(x.card), "a call on a card handle that is not live");
          }
        },
        c);
  }

  cl::CallResult result_for(const cl::PcscCall& c, ByteReader& in) {
    cl::CallResult r;
    const uint8_t pick = in.u8();
    if (pick % 4 == 3) r.rv = (pick & 0x80) ? in.u32() : kErrors[in.u8() % std::size(kErrors)];
    const bool ok = r.rv == 0;
    std::visit(
        [&](const auto& x) {
          using T = std::decay_t<decltype(x)>;
          if constexpr (std::is_same_v<T, cl::call::Establish>) {
            if (ok) {
              r.ctx = next_raw_++;
              live_contexts_.insert(r.ctx);
            }
          } else if constexpr (std::is_same_v<T, cl::call::Release>) {
            // pcscd releases the context whatever it answers, and its handles with it
            live_contexts_.erase(x.ctx);
            for (auto it = live_cards_.begin(); it != live_cards_.end();) {
              it = it->second == x.ctx ? live_cards_.erase(it) : std::next(it);
            }
          } else if constexpr (std::is_same_v<T, cl::call::Connect>) {
            if (ok) {
              r.card = next_raw_++;
              r.protocol = 1 + in.u8() % 2;
              live_cards_[r.card] = x.ctx;
            }
          } else if constexpr (std::is_same_v<T, cl::call::Disconnect>) {
            if (ok) live_cards_.erase(x.card);
          } else if constexpr (std::is_same_v<T, cl::call::Reconnect>) {
            r.protocol = 1 + in.u8() % 2;
          } else if constexpr (std::is_same_v<T, cl::call::Transmit> || std::is_same_v<T, cl::call::Control> ||
                               std::is_same_v<T, cl::call::GetAttrib>) {
            if (ok) {
              r.data = in.bytes(in.u8() % 64);
              static const uint8_t kSw[][2] = {{0x90, 0x00}, {0x61, 0x10}, {0x6C, 0x08}, {0x6A, 0x82}, {0x62, 0x82}};
              const auto& sw = kSw[in.u8() % std::size(kSw)];
              if (std::is_same_v<T, cl::call::Transmit>) r.data.insert(r.data.end(), sw, sw + 2);
              r.length = static_cast<uint32_t>(r.data.size());
              r.protocol = 2;
            } else {
              r.length = in.u16();
            }
          } else if constexpr (std::is_same_v<T, cl::call::Status>) {
            if (ok) {
              r.reader = kReaders[in.u8() % std::size(kReaders)];
              r.state = in.u32();
              r.protocol = 2;
              r.atr = in.bytes(in.u8() % 34);  // (pcscd: MAX_ATR_SIZE 33)
            }
          }
        },
        c);
    return r;
  }

  // ---- replies --------------------------------------------------------------------------------
  void on_reply(uint32_t id, const pr::Reply& r) {
    if (r.handle.value != 0) remember(handles_, r.handle.value);
    if (!tracked_) return;
    auto it = outstanding_.find(id);
    DESK_CHECK(it != outstanding_.end(), "a reply to no outstanding request of this session");
    outstanding_.erase(it);
  }

  static void remember(std::vector<uint32_t>& v, uint32_t x) {
    if (v.size() >= 32) v.erase(v.begin());
    v.push_back(x);
  }

  // ---- the script -----------------------------------------------------------------------------
  void hear(const pr::Message& m) { core_->receive(pr::encode_frame(m), now_); }

  void server_hello(ByteReader& in) {
    pr::Hello h = pr::local_hello(pr::Role::kServer, in.u8() & 1 ? pr::caps::kAll : in.u32());
    h.software = "cardbridge-shim fuzz";
    h.peer_name = "fuzz-server";
    h.instance = 100 + in.u8();
    if (in.u8() % 16 == 0) h.version_minor = in.u8();
    hear(pr::Message{0, h});
  }

  void transport_up(ByteReader& in) {
    if (up_ || shut_) return;
    up_ = true;
    link_closed_ = false;
    tracked_ = true;
    outstanding_.clear();
    handles_.clear();
    core_->transport_up(now_, cardbridge::PeerIdentity::unix_user(peer_uid_, 99));
    server_hello(in);
  }

  void transport_down() {
    if (!up_) return;
    up_ = false;
    core_->transport_down(now_);
  }

  void request(ByteReader& in) {
    pr::Request q;
    q.op = static_cast<pr::Op>(1 + in.u8() % pr::kMaxOp);
    q.context = pr::ContextId{1 + in.u8() % 5u};
    const uint8_t h = in.u8();
    q.handle = pr::DeskHandle{handles_.empty() || h >= 0xF0 ? h : handles_[handles_.size() - 1 - h % handles_.size()]};
    const uint8_t f = in.u8();
    if (f & 1) q.reader = kReaders[(f >> 1) % std::size(kReaders)];
    q.share_mode = 1 + in.u8() % 3;
    q.protocols = in.u8() % 4;
    q.disposition = in.u8() % 4;
    q.code = in.u8() & 1 ? 0x42000D48 : in.u32();
    q.data = in.bytes(in.u8() % 48);
    q.recv_length = in.u16();
    // Flags byte: bits 0-3 the request flags (kWantImage included); bit 4 a prelude (card
    // image) of up to 3 commands from kPrelude picked by bits 5-7 (no byte of its own: the
    // seeds' scripts keep their meaning).
    const uint8_t fl = in.u8();
    q.flags = fl % 16;
    if (fl & 0x10) {
      for (uint8_t i = 0; i <= (fl >> 5) % 3; ++i) q.prelude.push_back(kPrelude[((fl >> 5) + i) % std::size(kPrelude)]);
    }
    q.recv_protocol = in.u8() % 3;
    const uint8_t after = in.u8() % 4;
    for (uint8_t i = 0; i < after && next_id_ > 1; ++i) q.after.push_back(1 + in.u16() % (next_id_ - 1));
    uint32_t id = next_id_++;
    if (in.u8() == 0xFF) {
      id = in.u16();  // a repeated or unknown id: the tracking stops for this session
      tracked_ = false;
    }
    if (tracked_) outstanding_.insert(id);
    hear(pr::Message{id, std::move(q)});
  }

  void complete(ByteReader& in) {
    if (pending_.empty()) return;
    const std::size_t i = in.u8() % pending_.size();
    Pending p = std::move(pending_[i]);
    pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(i));
    core_->call_done(p.lane, result_for(p.call, in), now_);
  }

  void readers(ByteReader& in) {
    std::vector<pr::ReaderInfo> rs;
    const uint8_t nb = in.u8();
    const uint8_t n = nb % 4;
    // bit 7: the desk's PC/SC service fails (no pcscd), the desk-service status
    const uint32_t service_rv = (nb & 0x80) ? 0x8010001Du : 0u;  // SCARD_E_NO_SERVICE
    for (uint8_t i = 0; i < n && i < std::size(kReaders); ++i) {
      pr::ReaderInfo r;
      r.name = kReaders[i];
      r.state = in.u16() & 0x0FFF;
      r.event_count = in.u16();
      r.atr = in.bytes(in.u8() % 33);
      rs.push_back(std::move(r));
    }
    core_->readers(std::move(rs), now_, service_rv);
  }

  void step(ByteReader& in) {
    switch (in.u8() % 12) {
      case 0:
      case 1:
      case 2:
        if (up_) request(in);
        break;
      case 3:
      case 4:
      case 5:
        complete(in);
        break;
      case 6:
        if (up_) {
          tracked_ = false;  // (the bytes may hold requests the oracle cannot see)
          core_->receive(in.bytes(in.u8()), now_);
        }
        break;
      case 7:
        readers(in);
        break;
      case 8:
        now_ += std::chrono::milliseconds(in.u16());
        core_->tick(now_);
        break;
      case 9:
        if (up_ && !(in.u8() & 3)) {
          transport_down();
        } else {
          transport_up(in);
        }
        break;
      case 10:
        if (up_) {
          if (in.u8() & 1) {
            server_hello(in);
          } else {
            hear(pr::Message{0, pr::Error{static_cast<pr::ErrorCode>(in.u8() % 6), "fuzz"}});
          }
        }
        break;
      case 11:
        if (in.u8() == 0x5D) {  // rarely: the agent stops serving this link
          core_->shutdown(now_);
          shut_ = true;
          up_ = false;
          drain(in);
        }
        break;
    }
    if (link_closed_ && up_) transport_down();  // the edge drops a link the core closed
  }

  // Completes every pending call (success unless the input says otherwise) until none is left.
  void drain(ByteReader& in) {
    for (std::size_t guard = 0; !pending_.empty(); ++guard) {
      DESK_CHECK(guard < 100000, "calls keep coming after shutdown");
      Pending p = std::move(pending_.front());
      pending_.erase(pending_.begin());
      core_->call_done(p.lane, result_for(p.call, in), now_);
    }
  }

  void finish() {
    ByteReader none({});
    if (!shut_) {
      transport_down();
      core_->shutdown(now_);
    }
    drain(none);
    DESK_CHECK(core_->idle(), "the core is not idle after shutdown with every call answered");
    DESK_CHECK(core_->handle_count() == 0, "card handles left after shutdown");
    DESK_CHECK(live_contexts_.empty(), "a PC/SC context at the desk was never released");
  }

  std::optional<cl::DeskCore> core_;
  cl::TimePoint now_ = cl::TimePoint{} + std::chrono::hours(1000);
  bool up_ = false, shut_ = false, link_closed_ = false, tracked_ = true;
  std::vector<Pending> pending_;
  std::set<cl::LaneId> closed_lanes_;
  std::set<cl::ScardContext> live_contexts_;
  std::map<cl::ScardHandle, cl::ScardContext> live_cards_;  // card -> its context
  std::set<uint32_t> outstanding_;
  std::vector<uint32_t> handles_;
  int64_t next_raw_ = 0x1C000001;
  uint32_t next_id_ = 1;
  uint32_t peer_uid_ = 0;
};

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Quiet by default (speed); CARDBRIDGE_FUZZ_LOG=trace shows what a reproducer does.
  const char* level = std::getenv("CARDBRIDGE_FUZZ_LOG");
  auto parsed = cardbridge::log::parse_level(level ? level : "off");
  cardbridge::log::init(parsed.value_or(spdlog::level::off), "fuzz");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  ByteReader in({data, size});
  const uint8_t flags = in.u8();
  Harness h(flags);
  h.run(in);
  return 0;
}
