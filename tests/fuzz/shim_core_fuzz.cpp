// Fuzz target: shim::ShimCore driven by arbitrary client bytes and arbitrary desk frames,
// interleaved for a few clients (action language: shim_script.hpp).
//
// The harness plays the I/O layer the way ShimService does: client ids are never reused,
// a closed client gets no more bytes, desk bytes go to the core as they come (its link
// session frames them), reset_desk_link() drops the link after the current call returns.
// It is built from the shim test kit (tests/unit/shim/kit): RecordingEffects holds the
// oracle (besides ASan/UBSan) and aborts on a breach: the core never writes to a client it
// closed or that went away, never closes a client twice, never talks to a desk link that
// is down, and every frame it sends the desk is well formed and of a kind a server may
// send. DeskEnd carries the desk's side of the link; requests are patched with the kit's
// libpcsclite layouts.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <iterator>
#include <optional>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/shim_core/shim_core.hpp"
#include "fuzz_util.hpp"
#include "kit/bytes.hpp"
#include "kit/desk_end.hpp"
#include "kit/libpcsclite.hpp"
#include "kit/recording_effects.hpp"
#include "shim_script.hpp"

namespace pr = cardbridge::protocol;
namespace shim = cardbridge::shim;
namespace kit = cardbridge::shim::kit;
namespace pcsclite = cardbridge::shim::kit::pcsclite;
namespace script = cardbridge::fuzz::shim_script;
using cardbridge::fuzz::ByteReader;

namespace {

constexpr std::size_t kMaxActions = 4000;
constexpr std::size_t kMaxRemembered = 64;

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

[[noreturn]] void breach(const std::string& what) {
  cardbridge::fuzz::invariant_failed(("effects contract: " + what).c_str(), __FILE__, __LINE__);
}

class Harness {
 public:
  explicit Harness(uint8_t flags) : core_(fx_, config(flags)), desk_(core_, fx_, now_) {
    // Read the effects as they happen instead of keeping them.
    fx_.keep_client_bytes = false;
    fx_.keep_desk_messages = false;
    fx_.keep_log = false;
    fx_.on_client_write = [this](shim::ClientId id, std::span<const uint8_t> bytes) { learn(id, bytes); };
    fx_.on_desk_message = [this](const pr::Message& m) {
      if (std::holds_alternative<pr::Request>(m.body)) remember(pending_, m.id);
    };
    desk_.instance = 1;
    desk_.name = "fuzz";
    desk_.software = "fuzz-desk";
  }

  void run(ByteReader& in, uint8_t flags) {
    if (flags & script::kFlagDeskReady) {
      desk_connect();
      auto h = desk_.make_hello(/*reply=*/false);
      h.version_minor = 0;
      h.capabilities = pr::caps::kAll;
      to_desk(pr::Message{0, h});
      desk_.snapshot({pr::ReaderInfo{script::kReaderNames[0], 0x20, 1, {0x3B, 0x80, 0x80, 0x01, 0x01}},
                      pr::ReaderInfo{script::kReaderNames[1], 0x10, 0, {}}});
      after_action();
    }
    for (std::size_t n = 0; n < kMaxActions && !in.empty(); ++n) {
      step(in);
      after_action();
      (void)core_.next_deadline();
    }
    // Everybody leaves: exercises the cleanup paths.
    for (auto id : std::vector<shim::ClientId>(fx_.open_clients().begin(), fx_.open_clients().end())) {
      fx_.client_gone(id);
      core_.client_closed(id, now_);
    }
    if (desk_.transport_is_up()) desk_.transport_down();
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
    c.desk_policy.unix_uids = {1000, 0};  // the kit's DeskEnd comes as uid 1000
    return c;
  }

  // Learns ids the way a client would, to aim later requests at live handles.
  void learn(shim::ClientId id, std::span<const uint8_t> bytes) {
    const auto last = last_command_.find(id);
    if (bytes.size() == pcsclite::kConnectSize && kit::le32(bytes, 148) == 0) {
      remember(cards_, kit::le32(bytes, 140));
    } else if (bytes.size() == pcsclite::kEstablishSize && last != last_command_.end() &&
               last->second == pcsclite::cmd::kEstablish && kit::le32(bytes, 8) == 0) {
      remember(contexts_, kit::le32(bytes, 4));
    }
  }

  std::optional<shim::ClientId> pick_client(uint8_t pick) const {
    const auto& open = fx_.open_clients();
    if (open.empty()) return std::nullopt;
    auto it = open.begin();
    std::advance(it, pick % open.size());
    return *it;
  }

  void client_send(shim::ClientId id, const std::vector<uint8_t>& bytes) { core_.client_data(id, bytes, now_); }

  void desk_connect() {
    if (!desk_.transport_is_up()) desk_.transport_up();
  }
  // What the desk sends goes nowhere while its transport is down; a framing or protocol
  // error asks for the link to be reset, which happens once the call has returned.
  void desk_bytes(std::span<const uint8_t> bytes) {
    desk_.bytes(bytes);
    after_action();
  }
  void to_desk(const pr::Message& m) {
    desk_.send(m);
    after_action();
  }

  void after_action() {
    if (fx_.take_reset_request() && desk_.transport_is_up()) desk_.transport_down();
  }

  void step(ByteReader& in) {
    switch (in.u8() % script::kActionCount) {
      case script::kOpen: {
        const shim::ClientId id = next_client_++;
        fx_.client_opened(id);
        core_.client_opened(id, now_);
        break;
      }
      case script::kClose: {
        if (auto id = pick_client(in.u8())) {
          fx_.client_gone(*id);
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
        auto h = desk_.make_hello(/*reply=*/(f & 4) != 0);
        h.role = static_cast<pr::Role>(f & 3);
        h.version_major = (f & 8) ? pr::kVersionMajor + 1 : pr::kVersionMajor;
        h.version_minor = f >> 4;
        h.capabilities = in.u32();
        h.instance = in.u8();
        to_desk(pr::Message{0, h});
        break;
      }
      case script::kDeskBytes: {
        auto bytes = in.bytes(in.u16());
        desk_bytes(bytes);
        break;
      }
      case script::kDeskPayload: {
        auto payload = in.bytes(in.u16());
        if (!payload.empty()) {
          desk_.payload(payload);
          after_action();
        }
        break;
      }
      case script::kDeskError: {
        const uint8_t code = in.u8();
        auto text = in.bytes(in.u8());
        to_desk(pr::Message{0, pr::Error{static_cast<pr::ErrorCode>(code), std::string(text.begin(), text.end())}});
        break;
      }
      case script::kDeskDown:
        if (desk_.transport_is_up()) desk_.transport_down();
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
    const std::size_t size = pcsclite::body_size(command);
    if (fix & script::kFixHeader) body.resize(size);
    if (fix & script::kFixHandle) {
      if (pcsclite::starts_with_card(command) && !cards_.empty()) kit::put_le32(body, 0, recent(cards_, pick));
      if (pcsclite::starts_with_context(command) && !contexts_.empty()) kit::put_le32(body, 0, recent(contexts_, pick));
    }
    if ((fix & script::kFixReader) && command == pcsclite::cmd::kConnect && body.size() >= 4 + pcsclite::kReaderNameField) {
      const std::string name = script::kReaderNames[pick % script::kReaderNames.size()];
      const kit::Bytes field = kit::Le().text(name.substr(0, pcsclite::kReaderNameField - 1), pcsclite::kReaderNameField);
      std::copy(field.begin(), field.end(), body.begin() + 4);
    }
    if ((fix & script::kFixVersion) && command == pcsclite::cmd::kVersion) {
      kit::put_le32(body, 0, 4);
      kit::put_le32(body, 4, 4u + pick % 3u);
    }
    if (fix & script::kFixLength) {
      if (command == pcsclite::cmd::kTransmit) kit::put_le32(body, 12, static_cast<uint32_t>(trailing.size()));
      if (command == pcsclite::cmd::kControl) kit::put_le32(body, 8, static_cast<uint32_t>(trailing.size()));
    }
    const uint32_t header_size = (fix & script::kFixHeader) ? static_cast<uint32_t>(size)
                                                            : static_cast<uint32_t>(body.size());
    if (!id) return;
    last_command_[*id] = command;
    // Like the real client: header and body (with any trailing data) in separate writes.
    client_send(*id, pcsclite::header(header_size, command));
    if (fx_.is_open(*id) && !(body.empty() && trailing.empty())) client_send(*id, kit::cat(body, trailing));
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
    to_desk(pr::Message{id, r});
  }

  void snapshot(ByteReader& in) {
    std::vector<pr::ReaderInfo> readers;
    const uint8_t count = in.u8() % 24;
    for (uint8_t i = 0; i < count; ++i) {
      const uint8_t name = in.u8();
      pr::ReaderInfo r;
      r.name = name < script::kReaderNames.size() ? std::string(script::kReaderNames[name])
                                                  : "Reader " + std::to_string(name);
      r.state = in.u16();
      r.event_count = in.u16();
      r.atr = in.bytes(in.u8() % 40);
      readers.push_back(std::move(r));
    }
    desk_.snapshot(std::move(readers));
    after_action();
  }

  shim::TimePoint now_ = shim::TimePoint{} + std::chrono::hours(1000);
  kit::RecordingEffects fx_{breach};
  shim::ShimCore core_;
  kit::DeskEnd desk_;
  shim::ClientId next_client_ = 1;
  std::map<shim::ClientId, uint32_t> last_command_;
  std::vector<uint32_t> cards_, contexts_, pending_;
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
