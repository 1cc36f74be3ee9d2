// Fuzz target: shim::ShimCore driven by arbitrary client bytes and arbitrary desk frames,
// interleaved for a few clients (action language: shim_script.hpp).
//
// The harness plays the I/O layer the way ShimService does: client ids are never reused,
// a closed client gets no more bytes, desk bytes go to the core as they come (its link
// session frames them), reset_desk_link() drops the link after the current call returns.
// Oracle (besides ASan/UBSan): the core never writes to a client it closed or that went
// away, never closes a client twice, never talks to a desk link that is down, and every
// frame it sends the desk is well formed and of a kind a server may send.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/framing.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/log.hpp"
#include "core/shim_core.hpp"
#include "fuzz_util.hpp"
#include "shim_script.hpp"

namespace pr = cardbridge::protocol;
namespace shim = cardbridge::shim;
namespace wire = cardbridge::shim::wire;
namespace script = cardbridge::fuzz::shim_script;
using cardbridge::fuzz::ByteReader;

namespace {

constexpr std::size_t kMaxActions = 4000;
constexpr std::size_t kMaxRemembered = 64;

std::size_t body_size(uint32_t command) {
  switch (command) {
    case 0x01: return sizeof(wire::EstablishStruct);
    case 0x02: return sizeof(wire::ReleaseStruct);
    case 0x04: return sizeof(wire::ConnectStruct);
    case 0x05: return sizeof(wire::ReconnectStruct);
    case 0x06: return sizeof(wire::DisconnectStruct);
    case 0x07: return sizeof(wire::BeginStruct);
    case 0x08: return sizeof(wire::EndStruct);
    case 0x09: return sizeof(wire::TransmitStruct);
    case 0x0A: return sizeof(wire::ControlStruct);
    case 0x0B: return sizeof(wire::StatusStruct);
    case 0x0D: return sizeof(wire::CancelStruct);
    case 0x0F:
    case 0x10: return sizeof(wire::GetSetStruct);
    case 0x11: return sizeof(wire::VersionStruct);
    default: return 0;
  }
}

bool has_card_field(uint32_t c) {
  return c == 0x05 || c == 0x06 || c == 0x07 || c == 0x08 || c == 0x09 || c == 0x0A || c == 0x0B ||
         c == 0x0F || c == 0x10;
}
bool has_context_field(uint32_t c) { return c == 0x02 || c == 0x04 || c == 0x0D; }

void put32(std::vector<uint8_t>& b, std::size_t off, uint32_t v) {
  if (b.size() >= off + 4) std::memcpy(b.data() + off, &v, 4);
}
uint32_t get32(const std::vector<uint8_t>& b, std::size_t off) {
  uint32_t v = 0;
  if (b.size() >= off + 4) std::memcpy(&v, b.data() + off, 4);
  return v;
}

template <typename T>
void remember(std::vector<T>& v, T x) {
  if (v.size() >= kMaxRemembered) v.erase(v.begin());
  v.push_back(x);
}
// Pick 0 is the most recent entry, 1 the one before, ...
template <typename T>
T recent(const std::vector<T>& v, uint8_t pick) {
  return v[v.size() - 1 - pick % v.size()];
}

class Harness final : public shim::ShimEffects {
 public:
  explicit Harness(uint8_t flags) : core_(*this, config(flags)) {}

  // ---- ShimEffects ----
  void send_to_client(shim::ClientId id, std::vector<uint8_t> bytes) override {
    FUZZ_ASSERT(open_.contains(id));  // never to a closed or vanished client
    FUZZ_ASSERT(!bytes.empty());
    client_bytes_ += bytes.size();
    // Learn ids the way a client would, to aim later requests at live handles.
    const auto last = last_command_.find(id);
    if (bytes.size() == sizeof(wire::ConnectStruct) && get32(bytes, 148) == 0) {
      remember(cards_, get32(bytes, 140));
    } else if (bytes.size() == sizeof(wire::EstablishStruct) && last != last_command_.end() &&
               last->second == 0x01 && get32(bytes, 8) == 0) {
      remember(contexts_, get32(bytes, 4));
    }
  }
  void close_client(shim::ClientId id) override {
    FUZZ_ASSERT(open_.erase(id) == 1);  // exactly once, and only an open client
  }
  void send_to_desk(std::vector<uint8_t> frame) override {
    FUZZ_ASSERT(desk_up_);
    FUZZ_ASSERT(frame.size() > pr::kFrameHeaderSize);
    pr::FrameDecoder d;
    FUZZ_ASSERT(d.feed(frame));
    auto payload = d.next();
    FUZZ_ASSERT(payload.has_value() && d.buffered() == 0);
    auto m = pr::decode(*payload);
    FUZZ_ASSERT(m.ok());
    FUZZ_ASSERT(!std::holds_alternative<pr::Reply>(m->body) &&
                !std::holds_alternative<pr::ReaderSnapshot>(m->body));
    if (std::holds_alternative<pr::Request>(m->body)) remember(pending_, m->id);
    desk_bytes_ += frame.size();
  }
  void reset_desk_link(const std::string&) override { reset_requested_ = true; }

  // ---- the script ----
  void run(ByteReader& in, uint8_t flags) {
    if (flags & script::kFlagDeskReady) {
      desk_connect();
      pr::Hello h;
      h.version_major = pr::kVersionMajor;
      h.role = pr::Role::kDesk;
      h.capabilities = pr::caps::kAll;
      h.instance = 1;
      to_desk_message(pr::Message{0, h});
      pr::ReaderSnapshot s{1, {pr::ReaderInfo{script::kReaderNames[0], 0x20, 1, {0x3B, 0x80, 0x80, 0x01, 0x01}},
                               pr::ReaderInfo{script::kReaderNames[1], 0x10, 0, {}}}};
      to_desk_message(pr::Message{0, s});
      after_action();
    }
    for (std::size_t n = 0; n < kMaxActions && !in.empty(); ++n) {
      step(in);
      after_action();
      (void)core_.next_deadline();
    }
    // Everybody leaves: exercises the cleanup paths.
    for (auto id : std::vector<shim::ClientId>(open_.begin(), open_.end())) {
      open_.erase(id);
      core_.client_closed(id, now_);
    }
    if (desk_up_) {
      desk_up_ = false;
      core_.desk_disconnected(now_);
    }
    FUZZ_ASSERT(core_.client_count() == 0);
    FUZZ_ASSERT(core_.handle_count() == 0);
  }

 private:
  static shim::ShimConfig config(uint8_t flags) {
    shim::ShimConfig c;
    c.server_name = "fuzz-server";
    c.capabilities = pr::caps::kAll;
    c.one_round_trip_per_call = (flags & script::kFlagOneRoundTrip) != 0;
    c.random_seed = 1;  // deterministic ids
    c.hello_retry = std::chrono::milliseconds(500);
    return c;
  }

  std::optional<shim::ClientId> pick_client(uint8_t pick) {
    if (open_.empty()) return std::nullopt;
    auto it = open_.begin();
    std::advance(it, pick % open_.size());
    return *it;
  }

  void client_send(shim::ClientId id, const std::vector<uint8_t>& bytes) { core_.client_data(id, bytes, now_); }

  void desk_connect() {
    if (desk_up_) return;
    desk_up_ = true;
    core_.desk_connected(now_);
  }

  void desk_bytes(std::span<const uint8_t> bytes) {
    if (!desk_up_) return;
    core_.desk_bytes(bytes, now_);
    after_action();  // a framing or protocol error asks for the link to be reset
  }

  void to_desk_message(const pr::Message& m) { desk_bytes(pr::encode_frame(m)); }

  void after_action() {
    if (reset_requested_) {
      reset_requested_ = false;
      if (desk_up_) {
        desk_up_ = false;
        core_.desk_disconnected(now_);
      }
    }
  }

  void step(ByteReader& in) {
    switch (in.u8() % script::kActionCount) {
      case script::kOpen: {
        const shim::ClientId id = next_client_++;
        open_.insert(id);
        core_.client_opened(id, now_);
        break;
      }
      case script::kClose: {
        if (auto id = pick_client(in.u8())) {
          open_.erase(*id);
          core_.client_closed(*id, now_);
        }
        break;
      }
      case script::kClientBytes: {
        auto id = pick_client(in.u8());
        auto bytes = in.bytes(in.u8());
        if (id) client_send(*id, bytes);
        break;
      }
      case script::kRequest: request(in); break;
      case script::kReply: reply(in); break;
      case script::kSnapshot: snapshot(in); break;
      case script::kHello: {
        const uint8_t f = in.u8();
        pr::Hello h;
        h.role = static_cast<pr::Role>(f & 3);
        h.reply = (f & 4) != 0;
        h.version_major = (f & 8) ? pr::kVersionMajor + 1 : pr::kVersionMajor;
        h.version_minor = f >> 4;
        h.capabilities = in.u32();
        h.instance = in.u8();
        h.software = "fuzz-desk";
        h.peer_name = "fuzz";
        to_desk_message(pr::Message{0, h});
        break;
      }
      case script::kDeskBytes: {
        auto bytes = in.bytes(in.u16());
        desk_bytes(bytes);
        break;
      }
      case script::kDeskPayload: {
        auto payload = in.bytes(in.u16());
        if (!payload.empty()) desk_bytes(pr::frame(payload));
        break;
      }
      case script::kDeskError: {
        const uint8_t code = in.u8();
        auto text = in.bytes(in.u8());
        to_desk_message(pr::Message{0, pr::Error{static_cast<pr::ErrorCode>(code), std::string(text.begin(), text.end())}});
        break;
      }
      case script::kDeskDown:
        if (desk_up_) {
          desk_up_ = false;
          core_.desk_disconnected(now_);
        }
        break;
      case script::kDeskUp: desk_connect(); break;
      case script::kTick:
        now_ += std::chrono::milliseconds(in.u16());
        core_.tick(now_);
        break;
      default: break;
    }
  }

  void request(ByteReader& in) {
    auto id = pick_client(in.u8());
    const uint32_t command = script::kRequestCommands[in.u8() % script::kRequestCommands.size()];
    const uint8_t fix = in.u8();
    const uint8_t pick = in.u8();
    auto body = in.bytes(in.u16());
    auto trailing = in.bytes(in.u16());
    const std::size_t size = body_size(command);
    if (fix & script::kFixHeader) body.resize(size);
    if (fix & script::kFixHandle) {
      if (has_card_field(command) && !cards_.empty()) put32(body, 0, recent(cards_, pick));
      if (has_context_field(command) && !contexts_.empty()) put32(body, 0, recent(contexts_, pick));
    }
    if ((fix & script::kFixReader) && command == 0x04 && body.size() >= 4 + 128) {
      const std::string name = script::kReaderNames[pick % script::kReaderNames.size()];
      std::memset(body.data() + 4, 0, 128);
      std::memcpy(body.data() + 4, name.data(), std::min<std::size_t>(name.size(), 127));
    }
    if ((fix & script::kFixVersion) && command == 0x11) {
      put32(body, 0, 4);
      put32(body, 4, 4u + pick % 3u);
    }
    if (fix & script::kFixLength) {
      if (command == 0x09) put32(body, 12, static_cast<uint32_t>(trailing.size()));
      if (command == 0x0A) put32(body, 8, static_cast<uint32_t>(trailing.size()));
    }
    const uint32_t header_size = (fix & script::kFixHeader) ? static_cast<uint32_t>(size)
                                                            : static_cast<uint32_t>(body.size());
    std::vector<uint8_t> bytes(8);
    put32(bytes, 0, header_size);
    put32(bytes, 4, command);
    bytes.insert(bytes.end(), body.begin(), body.end());
    bytes.insert(bytes.end(), trailing.begin(), trailing.end());
    if (!id) return;
    last_command_[*id] = command;
    // Like the real client: header and body in separate writes.
    client_send(*id, std::vector<uint8_t>(bytes.begin(), bytes.begin() + 8));
    if (open_.contains(*id) && bytes.size() > 8) client_send(*id, std::vector<uint8_t>(bytes.begin() + 8, bytes.end()));
  }

  void reply(ByteReader& in) {
    const uint8_t which = in.u8();
    const uint8_t rv_pick = in.u8();
    pr::Reply r;
    r.handle = pr::DeskHandle{in.u32()};
    r.protocol = in.u32();
    r.state = in.u32();
    r.length = in.u32();
    r.data = in.bytes(in.u16());
    r.atr = in.bytes(in.u8());
    const uint8_t prefetched = in.u8() % 4;
    for (uint8_t i = 0; i < prefetched; ++i) {
      pr::Prefetched p;
      p.command = in.bytes(in.u8());
      p.response = in.bytes(in.u8());
      r.prefetched.push_back(std::move(p));
    }
    const uint32_t rv = script::kReplyRvs[rv_pick % script::kReplyRvs.size()];
    r.rv = rv == 0xFFFFFFFF ? r.handle.value : rv;
    const uint32_t id = pending_.empty() ? which : recent(pending_, which);
    to_desk_message(pr::Message{id, r});
  }

  void snapshot(ByteReader& in) {
    pr::ReaderSnapshot s;
    s.sequence = ++sequence_;
    const uint8_t count = in.u8() % 24;
    for (uint8_t i = 0; i < count; ++i) {
      const uint8_t name = in.u8();
      pr::ReaderInfo r;
      r.name = name < script::kReaderNames.size() ? std::string(script::kReaderNames[name])
                                                  : "Reader " + std::to_string(name);
      r.state = in.u16();
      r.event_count = in.u16();
      r.atr = in.bytes(in.u8() % 40);
      s.readers.push_back(std::move(r));
    }
    to_desk_message(pr::Message{0, s});
  }

  shim::ShimCore core_;
  std::set<shim::ClientId> open_;
  shim::ClientId next_client_ = 1;
  std::map<shim::ClientId, uint32_t> last_command_;
  std::vector<uint32_t> cards_, contexts_, pending_;
  bool desk_up_ = false;
  bool reset_requested_ = false;
  uint64_t sequence_ = 0;
  shim::Clock::time_point now_ = shim::Clock::time_point{} + std::chrono::hours(1000);
  std::size_t client_bytes_ = 0, desk_bytes_ = 0;
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
  h.run(in, flags);
  return 0;
}
