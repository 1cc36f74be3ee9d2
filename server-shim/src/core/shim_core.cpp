#include "core/shim_core.hpp"

#include <algorithm>
#include <cstring>
#include <deque>

#include <fmt/format.h>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/framing.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/hex.hpp"
#include "cardbridge/support/redact.hpp"
#include "cardbridge/support/scard.hpp"

namespace cardbridge::shim {

namespace sc = cardbridge::scard;
namespace pr = cardbridge::protocol;
using wire::Command;

namespace {

// TRANSMIT and CONTROL replies: the struct, then the data only when rv == 0 (as libpcsclite reads them).
template <typename Struct>
std::vector<uint8_t> with_data_on_success(const Struct& r, const std::vector<uint8_t>& data) {
  return r.rv == sc::kSuccess ? wire::bytes_of(r, data) : wire::bytes_of(r);
}

std::shared_ptr<spdlog::logger> logger() {
  static auto l = log::get("cardbridge.shim");
  return l;
}

// pcscd 1.9.9 limits (pcscd.h): card handles per context.
constexpr std::size_t kMaxHandlesPerContext = 200;
// Requests a client may queue behind one that waits for the desk. A real client sends
// one request at a time per connection; anything beyond this is abuse.
constexpr std::size_t kMaxBufferedInput = 2 * (sizeof(wire::TransmitStruct) + sc::kMaxBufferSizeExtended + 8);

// Error a handle gets once its reader is gone (desk lost, reader unplugged, roaming):
// pcscd no longer finds the handle in any reader (RFReaderInfoById -> INVALID_VALUE).
constexpr uint32_t kOrphanRv = sc::kEInvalidValue;
// A call in flight when the desk disappears fails like an I/O on an unplugged reader.
constexpr uint32_t kLostInFlightRv = sc::kEReaderUnavailable;

// Reader attributes that do not change while the reader exists (plus the ATR, which is
// dropped from the cache on every card event).
bool cacheable_attribute(uint32_t attr) {
  switch (attr) {
    case sc::kAttrVendorName:
    case sc::kAttrVendorIfdType:
    case sc::kAttrVendorIfdVersion:
    case sc::kAttrVendorIfdSerialNo:
    case sc::kAttrChannelId:
    case sc::kAttrMaxInput:
    case sc::kAttrDeviceFriendlyName:
    case sc::kAttrDeviceSystemName:
    case sc::kAttrAtrString:
      return true;
    default:
      return false;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// State

struct ShimCore::PendingCall {
  Command command{};
  uint32_t card = 0;  // hCard the call is about (0: none)
  // Copies of the request structs needed to build the reply.
  wire::ConnectStruct connect{};
  wire::ReconnectStruct reconnect{};
  wire::DisconnectStruct disconnect{};
  wire::BeginStruct begin{};
  wire::EndStruct end{};
  wire::TransmitStruct transmit{};
  wire::ControlStruct control{};
  wire::GetSetStruct getset{};
  std::size_t slot = 0;
  bool carried_begin = false;  // the request carried a deferred BeginTransaction
  // The command, kept only when its response may be logged (see redact.hpp).
  std::vector<uint8_t> command_apdu;
};

struct ShimCore::Fenced {
  ClientId client = 0;
  pr::Request request;
  PendingCall call;
};

struct ShimCore::Client {
  ClientId id = 0;
  wire::RequestDecoder decoder;
  int32_t minor = wire::kMinorLowest;
  uint32_t context = 0;             // hContext (0: none)
  pr::ContextId desk_ctx;           // the desk's context for it (0: not created yet)
  uint64_t desk_ctx_generation = 0; // desk session the context belongs to
  std::set<uint32_t> handles;
  bool registered = false;          // waiting for reader events
  bool hold_signal = false;         // protocol 4.6: WAIT answered, ARRAY not yet
  std::optional<uint32_t> held_signal;
  std::optional<uint32_t> waiting;  // desk request id in flight
  PendingCall call;
  bool dead = false;
};

struct ShimCore::Handle {
  uint32_t card = 0;
  ClientId owner = 0;
  uint32_t context = 0;
  std::size_t slot = 0;
  uint64_t generation = 0;  // desk session the handle lives in
  pr::DeskHandle desk;
  uint32_t share_mode = 0;
  uint32_t protocol = 0;
  uint32_t event_baseline = 0;  // reader event counter when (re)connected
  bool baseline_present = true; // a card was in the reader then
  bool reset_pending = false;
  uint32_t lock_count = 0;      // transaction nesting held by this handle (as answered)
  bool begin_pending = false;   // a deferred Begin not yet carried to the desk
  std::deque<pr::Prefetched> prefetch;  // speculative answers, in predicted order
  uint32_t prefetch_protocol = 0;       // the send PCI protocol they were fetched with
  uint32_t prefetch_recv_protocol = 0;  // the receive PCI the driver reported then
  uint32_t lock_floor() const { return share_mode == sc::kShareExclusive ? 1 : 0; }
};

ShimCore::PendingCall ShimCore::call_on(Command command, const Handle& h) {
  PendingCall call;
  call.command = command;
  call.card = h.card;
  call.slot = h.slot;
  return call;
}

pr::Request ShimCore::request_on(pr::Op op, const Handle& h) {
  pr::Request q;
  q.op = op;
  q.handle = h.desk;
  return q;
}

std::string Optimizations::disable(std::string_view names) {
  std::string error;
  while (!names.empty()) {
    auto comma = names.find(',');
    auto name = names.substr(0, comma);
    if (name == "pipeline") {
      pipeline = false;
    } else if (name == "defer-begin") {
      defer_begin = false;
    } else if (name == "prefetch-get-response") {
      prefetch_get_response = false;
    } else if (name == "read-ahead") {
      read_ahead = false;
    } else if (name == "cache-attributes") {
      cache_attributes = false;
    } else if (!name.empty()) {
      error += fmt::format("unknown optimisation '{}'; ", name);
    }
    if (comma == std::string_view::npos) break;
    names.remove_prefix(comma + 1);
  }
  return error;
}

ShimCore::ShimCore(ShimEffects& effects, ShimConfig config)
    : fx_(effects), config_(std::move(config)) {
  rng_.seed(config_.random_seed != 0 ? config_.random_seed : std::random_device{}());
  last_array_ = readers_.serialize(sharing());
}

ShimCore::~ShimCore() = default;

uint32_t ShimCore::new_id() {
  std::uniform_int_distribution<uint32_t> dist(1, 0x7FFFFFFF);
  for (;;) {
    uint32_t v = dist(rng_);
    if (live_ids_.insert(v).second) return v;
  }
}

// ---------------------------------------------------------------------------------------
// Client side

void ShimCore::client_opened(ClientId id) {
  auto c = std::make_unique<Client>();
  c->id = id;
  clients_.emplace(id, std::move(c));
  ++stats_.client_connections;
  logger()->debug("client {}: connected", id);
}

void ShimCore::client_data(ClientId id, std::span<const uint8_t> bytes) {
  auto it = clients_.find(id);
  if (it == clients_.end()) return;
  Client& c = *it->second;
  c.decoder.feed(bytes);
  if (c.decoder.buffered() > kMaxBufferedInput) {
    violation(c, fmt::format("{} bytes of unanswered requests", c.decoder.buffered()));
    return;
  }
  pump(c);
}

void ShimCore::client_closed(ClientId id) {
  logger()->debug("client {}: closed", id);
  drop_client(id, false);
}

void ShimCore::pump(Client& c) {
  const ClientId id = c.id;
  while (!c.waiting) {
    auto next = c.decoder.next();
    if (!next) return;
    if (!*next) {
      violation(c, next->error().what);
      return;
    }
    if (!handle_request(c, next->value())) return;
    if (clients_.find(id) == clients_.end()) return;  // closed while handling
  }
}

void ShimCore::violation(Client& c, const std::string& what) {
  ++stats_.protocol_errors;
  logger()->warn("client {}: protocol error: {}; closing the connection", c.id, what);
  drop_client(c.id, true);
}

void ShimCore::send(Client& c, std::vector<uint8_t> bytes) { fx_.send_to_client(c.id, std::move(bytes)); }

void ShimCore::drop_client(ClientId id, bool close_socket) {
  auto it = clients_.find(id);
  if (it == clients_.end()) return;
  Client& c = *it->second;
  release_context(c);
  if (c.waiting) desk_.pending.erase(*c.waiting);
  std::erase_if(parked_connects_, [id](const auto& p) { return p.first == id; });
  std::erase_if(parked_disconnects_, [id](const auto& p) { return p.first == id; });
  std::erase_if(fenced_, [id](const auto& f) { return f->client == id; });
  auto owned = std::move(it->second);
  clients_.erase(it);
  if (close_socket) fx_.close_client(id);
  after_state_change();
}

// Forgets the client's context and handles, and tells the desk to release its context
// (which disconnects the desk handles, resetting the card where a transaction or an
// exclusive connection was held: pcscd's MSGCleanupClient rule).
void ShimCore::release_context(Client& c) {
  std::vector<std::size_t> touched;  // readers where this context had handles
  for (uint32_t card : c.handles) {
    if (auto it = handles_.find(card); it != handles_.end() && !is_orphan(it->second)) touched.push_back(it->second.slot);
  }
  for (uint32_t card : c.handles) {
    auto it = handles_.find(card);
    if (it == handles_.end()) continue;
    Handle& h = it->second;
    // pcscd (MSGCleanupClient, SCardReleaseContext): a handle that holds the transaction or
    // exclusive access is disconnected with RESET unless the card was already reset or
    // removed, so that no security state leaks; every other handle then sees W_RESET.
    if (!is_orphan(h) && h.lock_count > 0 && !h.reset_pending && !removed_since(h)) {
      if (h.begin_pending && h.share_mode != sc::kShareExclusive && c.desk_ctx_generation == desk_.generation) {
        // The transaction existed only here (deferred Begin): reset as pcscd would have.
        pr::Request r;
        r.op = pr::Op::kDisconnect;
        r.handle = h.desk;
        r.disposition = sc::kResetCard;
        send_async(c, std::move(r), h.card);
      }
      mark_reset(h.slot, h.card, false);
      after_power_action(h.slot, sc::kResetCard);
    }
    handles_.erase(it);
    live_ids_.erase(card);
  }
  c.handles.clear();
  if (c.desk_ctx.value != 0 && c.desk_ctx_generation == desk_.generation && desk_.established) {
    pr::Request r;
    r.op = pr::Op::kReleaseContext;
    // Nobody waits for it, but other clients' card operations on the readers it had
    // handles on do (the release changes sharing and may reset the card).
    send_async(c, std::move(r), 0, std::move(touched));
  }
  c.desk_ctx = {};
  if (c.context != 0) live_ids_.erase(c.context);
  c.context = 0;
  c.registered = false;
  c.hold_signal = false;
  c.held_signal.reset();
}

ShimCore::Handle* ShimCore::owned_handle(Client& c, int32_t card, const char* what) {
  auto key = static_cast<uint32_t>(card);
  if (!c.handles.contains(key)) {
    // pcscd (MSGCheckHandleAssociation) drops a connection that uses a handle it does
    // not own. libpcsclite never sends such a request: only a hostile peer does.
    violation(c, fmt::format("{} on a handle 0x{:08X} this connection does not own", what, key));
    return nullptr;
  }
  return &handles_.at(key);
}

bool ShimCore::is_orphan(const Handle& h) const {
  return !desk_.established || h.generation != desk_.generation;
}

// pcscd marks every handle of a reader REMOVED when the card is taken out (not when one
// is inserted). The counter counts both: from a present card any change is a removal; from
// an empty reader it takes two events (in, out).
bool ShimCore::removed_since(const Handle& h) const {
  const auto& slot = readers_.slot(h.slot);
  const uint32_t delta = (slot.event_count - h.event_baseline) & 0xFFFF;
  return h.baseline_present ? delta != 0 : delta >= 2;
}

void ShimCore::set_baseline(Handle& h, const pr::Reply& rep) {
  const auto& slot = readers_.slot(h.slot);
  h.event_baseline = rep.state != 0 ? (rep.state >> 16) & 0xFFFF : slot.event_count;
  h.baseline_present = rep.state != 0 ? (rep.state & sc::kReaderPresent) != 0
                                      : (slot.desk_state & sc::kStatePresent) != 0;
}

// True when pcscd would find nothing to report for this handle: no card removal or reset
// pending and no other handle of the reader holding a transaction.
bool ShimCore::predicted_clean(const Handle& h) const {
  if (is_orphan(h) || h.reset_pending || removed_since(h)) return false;
  for (const auto& [card, other] : handles_) {
    if (card != h.card && other.slot == h.slot && other.generation == h.generation &&
        (other.lock_count > 0 || other.begin_pending))
      return false;
  }
  return true;
}

bool ShimCore::locked_by_other(const Handle& h) const {
  for (const auto& [card, other] : handles_) {
    if (card != h.card && other.slot == h.slot && other.generation == h.generation &&
        (other.lock_count > 0 || other.begin_pending))
      return true;
  }
  return false;
}

bool ShimCore::transaction_on_slot(std::size_t slot) const {
  for (const auto& [card, h] : handles_) {
    if (h.slot == slot && h.generation == desk_.generation && desk_.established &&
        (h.lock_count > h.lock_floor() || h.begin_pending))
      return true;
  }
  return false;
}

// Re-runs the parked Connects whose reader is no longer in a transaction.
void ShimCore::resume_parked() {
  if (!parked_disconnects_.empty()) {
    auto parked = std::move(parked_disconnects_);
    parked_disconnects_.clear();
    for (auto& [id, s] : parked) {
      auto it = clients_.find(id);
      if (it == clients_.end()) continue;
      Client& c = *it->second;
      c.waiting.reset();
      on_disconnect(c, s);
      if (clients_.find(id) != clients_.end() && !c.waiting) pump(c);
    }
  }
  if (parked_connects_.empty()) return;
  auto parked = std::move(parked_connects_);
  parked_connects_.clear();
  for (auto& [id, s] : parked) {
    auto it = clients_.find(id);
    if (it == clients_.end()) continue;
    Client& c = *it->second;
    c.waiting.reset();
    on_connect(c, s);
    if (clients_.find(id) != clients_.end() && !c.waiting) pump(c);
  }
}

uint32_t ShimCore::request_flags(Handle& h, pr::Op op, bool& carried_begin) {
  uint32_t flags = 0;
  carried_begin = false;
  if (h.begin_pending) {
    flags |= pr::request_flags::kBeginFirst;
    h.begin_pending = false;
    carried_begin = true;
  }
  if (op == pr::Op::kTransmit) {
    if (config_.optimizations.prefetch_get_response && uses(pr::caps::kPrefetchGetResponse))
      flags |= pr::request_flags::kPrefetchGetResponse;
    // Read-ahead only inside a transaction (or exclusive access): nobody else can touch
    // the card between the desk's reads and the program's.
    if (config_.optimizations.read_ahead && uses(pr::caps::kReadAhead) &&
        (h.lock_count > 0 || h.share_mode == sc::kShareExclusive))
      flags |= pr::request_flags::kReadAhead;
  }
  return flags;
}

// The desk fetched GET RESPONSE with Le = SW2 (what ISO 7816 and OpenSC-based middleware
// send). A program asking with another Le gets what the card would have answered
// (ISO 7816-4 5.1.3): Le < available: the first Le bytes and 61xx for the rest; Le = 00 or
// Le >= available: everything, with 9000. The front entry is rewritten accordingly.
void ShimCore::adapt_get_response(Handle& h, const std::vector<uint8_t>& apdu) {
  auto& next = h.prefetch.front();
  const auto& cmd = next.command;
  if (apdu.size() != 5 || cmd.size() != 5 || apdu == cmd) return;
  if (apdu[0] != cmd[0] || apdu[1] != 0xC0 || cmd[1] != 0xC0 || apdu[2] != 0 || apdu[3] != 0) return;
  const auto& resp = next.response;
  if (resp.size() < 2 || resp[resp.size() - 2] != 0x90 || resp.back() != 0x00) return;
  const std::size_t n = resp.size() - 2;
  const std::size_t le = apdu[4] == 0 ? 256 : apdu[4];
  if (le >= n) {
    next.command = apdu;  // the whole answer, 9000
    return;
  }
  pr::Prefetched first;
  first.command = apdu;
  first.response.assign(resp.begin(), resp.begin() + static_cast<std::ptrdiff_t>(le));
  const std::size_t rest = n - le;
  first.response.push_back(0x61);
  first.response.push_back(static_cast<uint8_t>(rest >= 256 ? 0 : rest));
  pr::Prefetched second;
  second.command = {cmd[0], 0xC0, 0x00, 0x00, static_cast<uint8_t>(rest >= 256 ? 0 : rest)};
  second.response.assign(resp.begin() + static_cast<std::ptrdiff_t>(le), resp.end());
  h.prefetch.pop_front();
  h.prefetch.push_front(std::move(second));
  h.prefetch.push_front(std::move(first));
}

void ShimCore::drop_prefetch_on_slot(std::size_t slot, uint32_t except_card) {
  for (auto& [card, h] : handles_) {
    if (h.slot != slot || card == except_card || h.prefetch.empty()) continue;
    stats_.prefetch_discarded += h.prefetch.size();
    h.prefetch.clear();
  }
}

// A request whose answer nobody waits for (pipelined End/Disconnect). The desk runs it
// in order with the context's later requests.
void ShimCore::send_async(Client& c, pr::Request req, uint32_t card, std::vector<std::size_t> slots) {
  if (!desk_.established) return;
  req.context = desk_context(c);
  const uint32_t id = desk_.next_request++;
  if (desk_.next_request == 0) desk_.next_request = 1;
  if (auto it = handles_.find(card); it != handles_.end()) slots.push_back(it->second.slot);
  desk_.async[id] = DeskState::Async{card, std::move(slots), c.id};
  ++stats_.pipelined;
  send_desk(pr::Message{id, std::move(req)});
}

void ShimCore::ping_desk(std::function<void(bool)> done) {
  if (!desk_.established) {
    done(false);
    return;
  }
  pr::Request q;
  q.op = pr::Op::kPing;
  const uint32_t id = desk_.next_request++;
  if (desk_.next_request == 0) desk_.next_request = 1;
  desk_.probes[id] = std::move(done);
  send_desk(pr::Message{id, std::move(q)});
}

bool ShimCore::handle_request(Client& c, const wire::DecodedRequest& req) {
  ++stats_.client_requests;
  logger()->trace("client {}: {}", c.id, wire::command_name(static_cast<uint32_t>(req.command)));
  std::visit(
      [&](const auto& body) {
        using T = std::decay_t<decltype(body)>;
        if constexpr (std::is_same_v<T, wire::VersionStruct>) on_version(c, body);
        if constexpr (std::is_same_v<T, wire::EstablishStruct>) on_establish(c, body);
        if constexpr (std::is_same_v<T, wire::ReleaseStruct>) on_release(c, body);
        if constexpr (std::is_same_v<T, wire::ConnectStruct>) on_connect(c, body);
        if constexpr (std::is_same_v<T, wire::ReconnectStruct>) on_reconnect(c, body);
        if constexpr (std::is_same_v<T, wire::DisconnectStruct>) on_disconnect(c, body);
        if constexpr (std::is_same_v<T, wire::BeginStruct>) on_begin(c, body);
        if constexpr (std::is_same_v<T, wire::EndStruct>) on_end(c, body);
        if constexpr (std::is_same_v<T, wire::CancelStruct>) on_cancel(c, body);
        if constexpr (std::is_same_v<T, wire::StatusStruct>) on_status(c, body);
        if constexpr (std::is_same_v<T, wire::TransmitRequest>) on_transmit(c, body);
        if constexpr (std::is_same_v<T, wire::ControlRequest>) on_control(c, body);
        if constexpr (std::is_same_v<T, wire::GetSetStruct>) {
          if (req.command == Command::kGetAttrib) {
            on_get_attrib(c, body);
          } else {
            on_set_attrib(c, body);
          }
        }
        if constexpr (std::is_same_v<T, wire::HeaderOnly>) on_header_only(c, body.command);
      },
      req.body);
  return true;
}

// ---- version, contexts --------------------------------------------------------------

void ShimCore::on_version(Client& c, const wire::VersionStruct& s) {
  wire::VersionStruct r = s;
  if (s.major != wire::kProtocolMajor || s.minor < wire::kMinorLowest) {
    // pcsc-lite < 1.8.24 or a different major: refused as pcscd 2.x refuses it.
    logger()->warn("client {}: unsupported pcsc-lite protocol {}.{}", c.id, s.major, s.minor);
    r.major = wire::kProtocolMajor;
    r.minor = wire::kMinorLowest;  // what pcscd 1.9.9 answers
    r.rv = sc::kEServiceStopped;
  } else if (s.minor > wire::kMinorHighest) {
    // A newer client: answer with our highest version; 2.4.1+ clients fall back.
    r.major = wire::kProtocolMajor;
    r.minor = wire::kMinorHighest;
    r.rv = sc::kEServiceStopped;
  } else {
    c.minor = s.minor;
    r.rv = sc::kSuccess;
  }
  send(c, wire::bytes_of(r));
}

pr::ContextId ShimCore::desk_context(Client& c) {
  if (c.desk_ctx.value == 0 || c.desk_ctx_generation != desk_.generation) {
    c.desk_ctx = pr::ContextId{desk_.next_context++};
    if (desk_.next_context == 0) desk_.next_context = 1;
    c.desk_ctx_generation = desk_.generation;
  }
  return c.desk_ctx;
}

void ShimCore::on_establish(Client& c, const wire::EstablishStruct& s) {
  wire::EstablishStruct r = s;
  if (s.scope > sc::kScopeGlobal) {
    r.context = 0;
    return answer(c, r, sc::kEInvalidValue);
  }
  if (c.context != 0) release_context(c);  // a repeated ESTABLISH replaces the context
  c.context = new_id();
  r.context = c.context;
  r.rv = sc::kSuccess;
  logger()->debug("client {}: context 0x{:08X}", c.id, c.context);
  if (config_.one_round_trip_per_call && desk_.established) {
    pr::Request q;
    q.op = pr::Op::kEstablishContext;
    q.code = s.scope;
    PendingCall call;
    call.command = Command::kEstablishContext;
    call.getset.attr_id = r.context;  // remembered for the reply
    call.getset.attr_length = s.scope;
    call_desk(c, std::move(q), std::move(call));
    return;
  }
  send(c, wire::bytes_of(r));
}

void ShimCore::on_release(Client& c, const wire::ReleaseStruct& s) {
  wire::ReleaseStruct r = s;
  if (c.context == 0 || s.context != c.context) {
    r.rv = sc::kEInvalidValue;
  } else {
    release_context(c);
    r.rv = sc::kSuccess;
    after_state_change();
    if (config_.one_round_trip_per_call && desk_.established) {
      pr::Request q;
      q.op = pr::Op::kPing;
      PendingCall call;
      call.command = Command::kReleaseContext;
      call.getset.attr_id = s.context;
      call_desk(c, std::move(q), std::move(call));
      return;
    }
  }
  send(c, wire::bytes_of(r));
}

// ---- card operations ------------------------------------------------------------------

template <class S>
void ShimCore::answer(Client& c, S r, uint32_t rv) {
  r.rv = rv;
  send(c, wire::bytes_of(r));
}

std::optional<uint32_t> ShimCore::refusal(const Handle& h) const {
  if (is_orphan(h)) return kOrphanRv;
  if (locked_by_other(h)) return sc::kESharingViolation;
  return std::nullopt;
}

void ShimCore::on_connect(Client& c, const wire::ConnectStruct& s) {
  wire::ConnectStruct r = s;
  r.card = 0;
  r.active_protocol = 0;
  auto reply = [&](uint32_t rv) {
    r.rv = rv;
    send(c, wire::bytes_of(r));
  };
  if (c.context == 0 || s.context != c.context) return reply(sc::kEInvalidValue);
  // pcscd's argument checks, in its order (winscard.c SCardConnect).
  constexpr uint32_t kKnownProtocols = sc::kProtocolT0 | sc::kProtocolT1 | sc::kProtocolRaw | sc::kProtocolAnyOld;
  if (s.share_mode != sc::kShareDirect && !(s.preferred_protocols & kKnownProtocols)) return reply(sc::kEProtoMismatch);
  if (s.share_mode != sc::kShareExclusive && s.share_mode != sc::kShareShared && s.share_mode != sc::kShareDirect)
    return reply(sc::kEInvalidValue);
  const std::string name = wire::read_name(s.reader);
  auto slot = readers_.find(name);
  if (!slot || !desk_.established) return reply(sc::kEUnknownReader);
  if (c.handles.size() >= kMaxHandlesPerContext) return reply(sc::kENoMemory);
  const bool exclusive_holder = std::any_of(handles_.begin(), handles_.end(), [&](const auto& e) {
    return e.second.slot == *slot && e.second.generation == desk_.generation && e.second.share_mode == sc::kShareExclusive;
  });
  if (!exclusive_holder && transaction_on_slot(*slot)) {
    // pcscd blocks a Connect while another handle holds a transaction on the reader.
    c.waiting = 0;  // parked locally (desk request ids start at 1)
    parked_connects_.emplace_back(c.id, s);
    return;
  }
  pr::Request q;
  q.op = pr::Op::kConnect;
  q.reader = name;
  q.share_mode = s.share_mode;
  q.protocols = s.preferred_protocols;
  PendingCall call;
  call.command = Command::kConnect;
  call.connect = s;
  call.slot = *slot;
  call_desk(c, std::move(q), std::move(call));
}

void ShimCore::on_reconnect(Client& c, const wire::ReconnectStruct& s) {
  Handle* h = owned_handle(c, s.card, "RECONNECT");
  if (!h) return;
  if (auto rv = refusal(*h)) return answer(c, s, *rv);
  pr::Request q = request_on(pr::Op::kReconnect, *h);
  q.share_mode = s.share_mode;
  q.protocols = s.preferred_protocols;
  q.disposition = s.initialization;
  PendingCall call = call_on(Command::kReconnect, *h);
  call.reconnect = s;
  q.flags = request_flags(*h, q.op, call.carried_begin);
  h->prefetch.clear();
  drop_prefetch_on_slot(h->slot, 0);
  call_desk(c, std::move(q), std::move(call));
}

void ShimCore::on_disconnect(Client& c, const wire::DisconnectStruct& s) {
  Handle* h = owned_handle(c, s.card, "DISCONNECT");
  if (!h) return;
  wire::DisconnectStruct r = s;
  auto forget = [&](uint32_t card) {
    c.handles.erase(card);
    live_ids_.erase(card);
    handles_.erase(card);
  };
  if (s.disposition > sc::kEjectCard) {
    return answer(c, r, sc::kEInvalidValue);
  }
  if (is_orphan(*h)) {
    // pcscd: disconnecting a handle whose reader is gone succeeds.
    forget(h->card);
    return answer(c, r, sc::kSuccess);
  }
  if ((s.disposition == sc::kResetCard || s.disposition == sc::kUnpowerCard) && locked_by_other(*h)) {
    // pcscd (SCardDisconnect) waits until the other handle's transaction is over before it
    // resets the card; that transaction may exist only here (deferred Begin).
    c.waiting = 0;  // parked locally (desk request ids start at 1)
    parked_disconnects_.emplace_back(c.id, s);
    return;
  }
  if (h->begin_pending) {  // the deferred Begin never reached the desk: nothing to end
    h->begin_pending = false;
    --h->lock_count;
  }
  h->prefetch.clear();
  pr::Request q = request_on(pr::Op::kDisconnect, *h);
  q.disposition = s.disposition;
  if (config_.optimizations.pipeline) {
    // A valid handle with a valid disposition always disconnects: answer now.
    const uint32_t card = h->card;
    const std::size_t slot = h->slot;
    send_async(c, std::move(q), card);
    forget(card);
    if (s.disposition == sc::kResetCard || s.disposition == sc::kUnpowerCard) {
      mark_reset(slot, card, false);
      after_power_action(slot, s.disposition);
    }
    r.rv = sc::kSuccess;
    send(c, wire::bytes_of(r));
    after_state_change();
    return;
  }
  PendingCall call = call_on(Command::kDisconnect, *h);
  call.disconnect = s;
  call_desk(c, std::move(q), std::move(call));
}

void ShimCore::on_begin(Client& c, const wire::BeginStruct& s) {
  Handle* h = owned_handle(c, s.card, "BEGIN_TRANSACTION");
  if (!h) return;
  wire::BeginStruct r = s;
  if (is_orphan(*h)) {
    return answer(c, r, kOrphanRv);
  }
  // pcscd checks the pending event before the lock: let the desk report W_REMOVED/W_RESET.
  const bool event_pending = h->reset_pending || removed_since(*h);
  if (!event_pending && locked_by_other(*h)) {  // the client sleeps 100 ms and asks again
    return answer(c, r, sc::kESharingViolation);
  }
  if (config_.optimizations.defer_begin && uses(pr::caps::kDeferredBegin) && !h->begin_pending &&
      h->lock_count == h->lock_floor() && predicted_clean(*h)) {
    // The desk takes the lock right before the handle's next card operation.
    h->begin_pending = true;
    ++h->lock_count;
    ++stats_.deferred_begins;
    return answer(c, r, sc::kSuccess);
  }
  pr::Request q = request_on(pr::Op::kBeginTransaction, *h);
  PendingCall call = call_on(Command::kBeginTransaction, *h);
  call.begin = s;
  q.flags = request_flags(*h, q.op, call.carried_begin);
  call_desk(c, std::move(q), std::move(call));
}

void ShimCore::on_end(Client& c, const wire::EndStruct& s) {
  Handle* h = owned_handle(c, s.card, "END_TRANSACTION");
  if (!h) return;
  wire::EndStruct r = s;
  if (is_orphan(*h)) {
    return answer(c, r, kOrphanRv);
  }
  if (!h->reset_pending && !removed_since(*h) && s.disposition <= sc::kEjectCard && locked_by_other(*h)) {
    return answer(c, r, sc::kESharingViolation);
  }
  h->prefetch.clear();  // read-ahead is only valid inside the transaction
  const bool resets = s.disposition == sc::kResetCard || s.disposition == sc::kUnpowerCard;
  if (h->begin_pending && s.disposition == sc::kLeaveCard) {
    // Begin and End with nothing in between: the card never saw the transaction.
    h->begin_pending = false;
    --h->lock_count;
    r.rv = sc::kSuccess;
    send(c, wire::bytes_of(r));
    resume_parked();
    return;
  }
  pr::Request q = request_on(pr::Op::kEndTransaction, *h);
  q.disposition = s.disposition;
  PendingCall call = call_on(Command::kEndTransaction, *h);
  call.end = s;
  q.flags = request_flags(*h, q.op, call.carried_begin);
  if (config_.optimizations.pipeline && s.disposition <= sc::kEjectCard && h->lock_count > h->lock_floor() &&
      predicted_clean(*h)) {
    // pcscd's End fails only for a pending reset/removal, a transaction it does not
    // hold, or a bad disposition: none of them here. Answer now.
    --h->lock_count;
    if (resets) {
      mark_reset(h->slot, h->card, true);
      readers_.slot(h->slot).card_protocol = 0;  // pcscd: the protocol is renegotiated after the reset
    }
    send_async(c, std::move(q), h->card);
    r.rv = sc::kSuccess;
    send(c, wire::bytes_of(r));
    after_state_change();
    return;
  }
  call_desk(c, std::move(q), std::move(call));
}

void ShimCore::on_transmit(Client& c, const wire::TransmitRequest& t) {
  Handle* h = owned_handle(c, t.fixed.card, "TRANSMIT");
  if (!h) return;
  if (auto rv = refusal(*h)) return answer(c, t.fixed, *rv);
  logger()->debug("client {}: transmit {}", c.id, redact::command(t.apdu));
  if (!h->prefetch.empty() && t.fixed.send_pci_protocol == h->prefetch_protocol && predicted_clean(*h)) {
    adapt_get_response(*h, t.apdu);
  }
  if (!h->prefetch.empty()) {
    const auto& next = h->prefetch.front();
    if (next.command == t.apdu && t.fixed.send_pci_protocol == h->prefetch_protocol && predicted_clean(*h)) {
      // The desk already sent this very command to the card, right after the previous
      // one, with nothing in between: serve its answer.
      pr::Reply rep;
      rep.rv = sc::kSuccess;
      rep.data = next.response;
      rep.protocol = h->prefetch_recv_protocol;
      PendingCall call = call_on(Command::kTransmit, *h);
      call.transmit = t.fixed;
      if (logger()->should_log(spdlog::level::debug) && redact::apdu_body_loggable(t.apdu)) call.command_apdu = t.apdu;
      h->prefetch.pop_front();
      ++stats_.prefetch_hits;
      complete(c, call, rep);
      return;
    }
    stats_.prefetch_discarded += h->prefetch.size();
    h->prefetch.clear();
  }
  pr::Request q = request_on(pr::Op::kTransmit, *h);
  q.protocols = t.fixed.send_pci_protocol;
  q.recv_protocol = t.fixed.recv_pci_protocol;
  q.recv_length = static_cast<uint32_t>(
      std::min<std::size_t>(t.fixed.recv_length, sc::kMaxBufferSizeExtended));
  q.data = t.apdu;
  PendingCall call = call_on(Command::kTransmit, *h);
  call.transmit = t.fixed;
  q.flags = request_flags(*h, q.op, call.carried_begin);
  drop_prefetch_on_slot(h->slot, h->card);
  if (logger()->should_log(spdlog::level::debug) && redact::apdu_body_loggable(t.apdu)) {
    call.command_apdu = t.apdu;  // kept only to log the response of a non-secret command
  }
  call_desk(c, std::move(q), std::move(call));
}

void ShimCore::on_control(Client& c, const wire::ControlRequest& t) {
  Handle* h = owned_handle(c, t.fixed.card, "CONTROL");
  if (!h) return;
  if (auto rv = refusal(*h)) {
    wire::ControlStruct r = t.fixed;
    r.bytes_returned = 0;
    return answer(c, r, *rv);
  }
  logger()->debug("client {}: control {}", c.id, redact::control(t.fixed.control_code, t.data));
  pr::Request q = request_on(pr::Op::kControl, *h);
  q.code = t.fixed.control_code;
  q.recv_length = static_cast<uint32_t>(
      std::min<std::size_t>(t.fixed.recv_length, sc::kMaxBufferSizeExtended));
  q.data = t.data;
  PendingCall call = call_on(Command::kControl, *h);
  call.control = t.fixed;
  q.flags = request_flags(*h, q.op, call.carried_begin);
  drop_prefetch_on_slot(h->slot, 0);  // a control (PIN pad...) may change the card's state
  call_desk(c, std::move(q), std::move(call));
}

void ShimCore::on_get_attrib(Client& c, const wire::GetSetStruct& s) {
  Handle* h = owned_handle(c, s.card, "GET_ATTRIB");
  if (!h) return;
  if (auto rv = refusal(*h)) return answer(c, s, *rv);
  PendingCall call = call_on(Command::kGetAttrib, *h);
  call.getset = s;
  if (config_.optimizations.cache_attributes && cacheable_attribute(s.attr_id) && !h->begin_pending &&
      predicted_clean(*h)) {
    auto& cache = readers_.slot(h->slot).attributes;
    if (auto it = cache.find(s.attr_id); it != cache.end()) {
      pr::Reply rep;
      rep.rv = it->second.rv;
      rep.data = it->second.data;
      rep.length = it->second.length;
      ++stats_.attribute_cache_hits;
      complete(c, call, rep);
      return;
    }
  }
  pr::Request q = request_on(pr::Op::kGetAttrib, *h);
  q.code = s.attr_id;
  q.recv_length = s.attr_length;
  q.flags = request_flags(*h, q.op, call.carried_begin);
  call_desk(c, std::move(q), std::move(call));
}

void ShimCore::on_set_attrib(Client& c, const wire::GetSetStruct& s) {
  Handle* h = owned_handle(c, s.card, "SET_ATTRIB");
  if (!h) return;
  if (auto rv = refusal(*h)) return answer(c, s, *rv);
  pr::Request q = request_on(pr::Op::kSetAttrib, *h);
  q.code = s.attr_id;
  q.data.assign(s.attr, s.attr + s.attr_length);
  PendingCall call = call_on(Command::kSetAttrib, *h);
  call.getset = s;
  q.flags = request_flags(*h, q.op, call.carried_begin);
  readers_.slot(h->slot).attributes.erase(s.attr_id);
  drop_prefetch_on_slot(h->slot, 0);
  call_desk(c, std::move(q), std::move(call));
}

// SCardStatus: the client has already fetched the array and found the reader; the daemon
// only checks the handle (pcscd order: pending reset/removal, then the transaction lock).
void ShimCore::on_status(Client& c, const wire::StatusStruct& s) {
  Handle* h = owned_handle(c, s.card, "STATUS");
  if (!h) return;
  wire::StatusStruct r = s;
  if (is_orphan(*h)) {
    r.rv = kOrphanRv;
  } else {
    // pcscd 1.9.9 SCardStatus: RFCheckSharing, then the pending event, then the reader
    // status; no card-presence check.
    const auto& slot = readers_.slot(h->slot);
    if (locked_by_other(*h)) {
      r.rv = sc::kESharingViolation;
    } else if (removed_since(*h)) {
      r.rv = sc::kWRemovedCard;
    } else if (h->reset_pending) {
      r.rv = sc::kWResetCard;
    } else if (slot.desk_state & (sc::kStateUnknown | sc::kStateUnavailable)) {
      r.rv = sc::kEReaderUnavailable;
    } else {
      r.rv = sc::kSuccess;
    }
  }
  // (Per-call mode charged SCardStatus its round trip on the CMD_GET_READERS_STATE
  // that libpcsclite sends first.)
  send(c, wire::bytes_of(r));
}

void ShimCore::on_cancel(Client& c, const wire::CancelStruct& s) {
  wire::CancelStruct r = s;
  r.rv = sc::kEInvalidHandle;
  for (auto& [id, other] : clients_) {
    if (other->context == 0 || other->context != static_cast<uint32_t>(s.context)) continue;
    if (other->registered) {
      other->registered = false;
      deliver_signal(*other, sc::kECancelled);
      r.rv = sc::kSuccess;
    } else {
      // pcscd 1.9.9 answers INVALID_HANDLE when the target is not waiting; 2.0.1+
      // answers SUCCESS. Behave like the daemon generation the target client expects.
      r.rv = other->minor >= 5 ? sc::kSuccess : sc::kEInvalidHandle;
    }
    break;
  }
  send(c, wire::bytes_of(r));
}

void ShimCore::on_header_only(Client& c, Command cmd) {
  switch (cmd) {
    case Command::kGetReadersState:
      if (config_.one_round_trip_per_call && desk_.established) {
        pr::Request q;
        q.op = pr::Op::kPing;
        PendingCall call;
        call.command = Command::kGetReadersState;
        call_desk(c, std::move(q), std::move(call));
        return;
      }
      send(c, last_array_);
      return;
    case Command::kWaitReaderStateChange:
      if (config_.one_round_trip_per_call && desk_.established) {
        pr::Request q;
        q.op = pr::Op::kPing;
        PendingCall call;
        call.command = Command::kWaitReaderStateChange;
        call_desk(c, std::move(q), std::move(call));
        return;
      }
      c.registered = true;
      if (c.minor >= 6) {
        c.hold_signal = true;  // the client reads SIZE and ARRAY next
      } else {
        send(c, last_array_);
      }
      return;
    case Command::kStopWaitingReaderStateChange:
      if (c.registered) {
        c.registered = false;
        wire::WaitReaderStateChange w{0, sc::kSuccess};
        send(c, wire::bytes_of(w));
      }
      // Not registered: the signal already sent is read as the answer (pcscd does the same).
      return;
    case Command::kGetReaderEvents: {
      if (c.minor < 5) return violation(c, "CMD_GET_READER_EVENTS from a protocol 4.4 client");
      wire::GetReaderEvents e{reader_events_, sc::kSuccess};
      send(c, wire::bytes_of(e));
      return;
    }
    case Command::kGetReadersStateSize: {
      if (c.minor < 6) return violation(c, "CMD_GET_READERS_STATE_SIZE before protocol 4.6");
      int32_t n = static_cast<int32_t>(ReaderTable::kSlots);
      send(c, wire::bytes_of(n));
      return;
    }
    case Command::kGetReadersStateArray:
      if (c.minor < 6) return violation(c, "CMD_GET_READERS_STATE_ARRAY before protocol 4.6");
      if (config_.one_round_trip_per_call && desk_.established && !c.hold_signal) {
        // 4.6 clients read the array with SIZE + ARRAY instead of CMD_GET_READERS_STATE:
        // charge SCardStatus/SCardListReaders here (the ARRAY after a WAIT was charged there).
        pr::Request q;
        q.op = pr::Op::kPing;
        PendingCall call;
        call.command = Command::kGetReadersState;
        call_desk(c, std::move(q), std::move(call));
        return;
      }
      send(c, last_array_);
      if (c.hold_signal) {
        c.hold_signal = false;
        if (c.held_signal) {
          uint32_t rv = *c.held_signal;
          c.held_signal.reset();
          deliver_signal(c, rv);
        }
      }
      return;
    default:
      return violation(c, fmt::format("unexpected command {}", wire::command_name(static_cast<uint32_t>(cmd))));
  }
}

// ---------------------------------------------------------------------------------------
// Desk calls

bool ShimCore::fenced(std::size_t slot, ClientId client) const { return !fence_ids(slot, client).empty(); }

std::vector<uint32_t> ShimCore::fence_ids(std::size_t slot, ClientId client) const {
  std::vector<uint32_t> ids;
  for (const auto& [id, a] : desk_.async) {
    if (a.client != client && std::find(a.slots.begin(), a.slots.end(), slot) != a.slots.end()) ids.push_back(id);
  }
  return ids;
}

void ShimCore::release_fenced() {
  if (fenced_.empty()) return;
  auto held = std::move(fenced_);
  fenced_.clear();
  for (auto& f : held) {
    auto it = clients_.find(f->client);
    if (it == clients_.end()) continue;
    Client& c = *it->second;
    c.waiting.reset();
    call_desk(c, std::move(f->request), std::move(f->call));  // may fence again
  }
}

void ShimCore::call_desk(Client& c, pr::Request req, PendingCall call) {
  if (!desk_.established) {
    fail_call(c, call, kLostInFlightRv);
    return;
  }
  const bool card_op = req.op != pr::Op::kPing && req.op != pr::Op::kEstablishContext;
  std::vector<uint32_t> after;
  if (card_op && uses(pr::caps::kDeskOrdering)) after = fence_ids(call.slot, c.id);
  if (card_op && uses(pr::caps::kDeskOrdering) && after.size() <= pr::kMaxAfter) {
    // The desk keeps the order for us: it starts this request once the other clients'
    // pipelined requests on the reader are done, as pcscd would have run them first.
    req.after = std::move(after);
  } else if (card_op && fenced(call.slot, c.id)) {
    c.waiting = 0;  // held locally until the other client's pipelined request is done
    auto f = std::make_unique<Fenced>();
    f->client = c.id;
    f->request = std::move(req);
    f->call = std::move(call);
    fenced_.push_back(std::move(f));
    return;
  }
  // A Ping needs no PC/SC context at the desk: context 0 is served by one shared worker.
  req.context = req.op == pr::Op::kPing ? pr::ContextId{0} : desk_context(c);
  const uint32_t id = desk_.next_request++;
  if (desk_.next_request == 0) desk_.next_request = 1;
  c.waiting = id;
  c.call = std::move(call);
  desk_.pending[id] = c.id;
  ++stats_.round_trips;
  send_desk(pr::Message{id, std::move(req)});
}

void ShimCore::send_desk(const pr::Message& m) {
  if (!desk_.transport_up) return;
  if (std::holds_alternative<pr::Request>(m.body)) {
    ++stats_.desk_requests;
    // The request is registered (pending/async) after this call: "nothing outstanding" here
    // means this request starts a busy period.
    if (!awaiting_desk() && !desk_.busy_since) desk_.busy_since = Clock::now();
  }
  logger()->trace("desk <- {}", pr::describe(m));
  auto frame = pr::encode_frame(m);
  stats_.desk_bytes_out += frame.size();
  fx_.send_to_desk(std::move(frame));
}

void ShimCore::fail_call(Client& c, const PendingCall& call, uint32_t rv) {
  pr::Reply r;
  r.rv = rv;
  complete(c, call, r);
}

// What pcscd writes into the array after a Disconnect with RESET/UNPOWER (winscard.c):
// the protocol is renegotiated later (0), and UNPOWER leaves the card present, unpowered.
void ShimCore::after_power_action(std::size_t slot, uint32_t disposition) {
  auto& s = readers_.slot(slot);
  s.card_protocol = 0;
  if (disposition == sc::kUnpowerCard) s.daemon_state = sc::kReaderPresent;
}

void ShimCore::mark_reset(std::size_t slot, uint32_t except_card, bool include_caller) {
  for (auto& [card, h] : handles_) {
    if (h.slot != slot || h.generation != desk_.generation) continue;
    if (card == except_card && !include_caller) continue;
    h.reset_pending = true;
  }
}

// The desk adds what its SCardStatus said after connect/reconnect: the full dwState
// (event counter << 16 | pcscd reader state), the ATR and the active protocol.
void ShimCore::learn_card_state(std::size_t slot, const pr::Reply& r) {
  auto& s = readers_.slot(slot);
  if (r.state != 0) {
    s.daemon_state = r.state & 0xFFFF;
    s.card_protocol = r.card_protocol;  // cardProtocol as SCardStatus reported it (0 after power-down)
  } else if (r.protocol != 0) {
    s.card_protocol = r.protocol;
  }
}

void ShimCore::complete(Client& c, const PendingCall& call, const pr::Reply& rep) {
  c.waiting.reset();
  if (call.carried_begin && rep.begin_rv != sc::kSuccess) {
    // The deferred Begin failed at the desk (card removed or reset meanwhile): the
    // transaction never started and the operation's answer carries the reason.
    if (auto it = handles_.find(call.card); it != handles_.end() && it->second.lock_count > 0) {
      --it->second.lock_count;
    }
  }
  switch (call.command) {
    case Command::kEstablishContext: {
      wire::EstablishStruct r{call.getset.attr_length, call.getset.attr_id, sc::kSuccess};
      send(c, wire::bytes_of(r));
      break;
    }
    case Command::kGetReadersState:
      send(c, last_array_);
      break;
    case Command::kReleaseContext: {
      wire::ReleaseStruct r{call.getset.attr_id, sc::kSuccess};
      send(c, wire::bytes_of(r));
      break;
    }
    case Command::kWaitReaderStateChange:
      c.registered = true;
      if (c.minor >= 6) {
        c.hold_signal = true;
      } else {
        send(c, last_array_);
      }
      break;
    case Command::kConnect: {
      wire::ConnectStruct r = call.connect;
      r.card = 0;
      r.active_protocol = 0;
      r.rv = rep.rv;
      if (rep.rv == sc::kSuccess) {
        if (rep.handle.value == 0 || !desk_.established) {
          r.rv = sc::kFInternalError;
        } else {
          Handle h;
          h.card = new_id();
          h.owner = c.id;
          h.context = c.context;
          h.slot = call.slot;
          h.generation = desk_.generation;
          h.desk = rep.handle;
          h.share_mode = call.connect.share_mode;
          h.protocol = rep.protocol;
          set_baseline(h, rep);
          if (h.share_mode == sc::kShareExclusive) h.lock_count = 1;
          learn_card_state(call.slot, rep);
          handles_.emplace(h.card, h);
          c.handles.insert(h.card);
          r.card = static_cast<int32_t>(h.card);
          r.active_protocol = rep.protocol;
          fx_.audit(c.id, fmt::format("card connected: reader='{}' atr={} share={}",
                                      log::printable(readers_.slot(call.slot).name),
                                      to_hex(readers_.slot(call.slot).atr, false),
                                      h.share_mode == sc::kShareExclusive ? "exclusive"
                                      : h.share_mode == sc::kShareDirect  ? "direct"
                                                                          : "shared"));
          logger()->debug("client {}: connected to '{}' handle 0x{:08X} protocol {}", c.id,
                          log::printable(readers_.slot(call.slot).name), h.card, rep.protocol);
        }
      }
      send(c, wire::bytes_of(r));
      after_state_change();
      break;
    }
    case Command::kReconnect: {
      wire::ReconnectStruct r = call.reconnect;
      r.rv = rep.rv;
      auto it = handles_.find(call.card);
      if (rep.rv == sc::kSuccess && it != handles_.end()) {
        auto& h = it->second;
        r.active_protocol = rep.protocol;
        h.protocol = rep.protocol;
        h.share_mode = call.reconnect.share_mode;
        h.reset_pending = false;
        set_baseline(h, rep);
        if (h.share_mode == sc::kShareExclusive) {
          h.lock_count = std::max<uint32_t>(h.lock_count, 1);
        }
        if (call.reconnect.initialization == sc::kResetCard ||
            call.reconnect.initialization == sc::kUnpowerCard) {
          mark_reset(h.slot, h.card, false);
        }
        learn_card_state(h.slot, rep);
      }
      send(c, wire::bytes_of(r));
      after_state_change();
      break;
    }
    case Command::kDisconnect: {
      wire::DisconnectStruct r = call.disconnect;
      r.rv = rep.rv;
      if (rep.rv == sc::kSuccess) {
        auto it = handles_.find(call.card);
        if (it != handles_.end()) {
          const std::size_t slot = it->second.slot;
          handles_.erase(it);
          if (call.disconnect.disposition == sc::kResetCard ||
              call.disconnect.disposition == sc::kUnpowerCard) {
            mark_reset(slot, call.card, false);
            after_power_action(slot, call.disconnect.disposition);
          }
        }
        c.handles.erase(call.card);
        live_ids_.erase(call.card);
      }
      send(c, wire::bytes_of(r));
      after_state_change();
      break;
    }
    case Command::kBeginTransaction: {
      wire::BeginStruct r = call.begin;
      r.rv = rep.rv;
      auto it = handles_.find(call.card);
      if (rep.rv == sc::kSuccess && it != handles_.end()) ++it->second.lock_count;
      send(c, wire::bytes_of(r));
      break;
    }
    case Command::kEndTransaction: {
      wire::EndStruct r = call.end;
      r.rv = rep.rv;
      auto it = handles_.find(call.card);
      if (rep.rv == sc::kSuccess && it != handles_.end()) {
        auto& h = it->second;
        const uint32_t floor = h.share_mode == sc::kShareExclusive ? 1 : 0;
        if (h.lock_count > floor) --h.lock_count;
        if (call.end.disposition == sc::kResetCard || call.end.disposition == sc::kUnpowerCard) {
          mark_reset(h.slot, h.card, true);
          readers_.slot(h.slot).card_protocol = 0;
        }
        if (h.lock_count == h.lock_floor()) h.prefetch.clear();
      }
      send(c, wire::bytes_of(r));
      after_state_change();  // resumes parked connects and republishes the array
      break;
    }
    case Command::kTransmit: {
      wire::TransmitStruct r = call.transmit;
      r.rv = rep.rv;
      if (rep.rv == sc::kSuccess) {
        if (rep.data.size() > call.transmit.recv_length) {
          // Never send more than the client's buffer: its stream would fall out of step.
          r.rv = sc::kEInsufficientBuffer;
          r.recv_length = static_cast<uint32_t>(rep.data.size());
        } else {
          r.recv_length = static_cast<uint32_t>(rep.data.size());
          r.recv_pci_protocol = rep.protocol;  // what the desk's driver left in the receive PCI
        }
      } else {
        r.recv_length = rep.length;
        r.recv_pci_protocol = rep.protocol;  // pcscd returns the driver's receive PCI even on errors
      }
      logger()->debug("client {}: transmit -> {} {}", c.id, sc::rv_text(r.rv),
                      r.rv == sc::kSuccess ? redact::response(call.command_apdu, rep.data) : "");
      if (r.rv == sc::kSuccess && !rep.prefetched.empty()) {
        if (auto it = handles_.find(call.card); it != handles_.end()) {
          it->second.prefetch.assign(rep.prefetched.begin(), rep.prefetched.end());
          it->second.prefetch_protocol = call.transmit.send_pci_protocol;
          it->second.prefetch_recv_protocol = rep.protocol;
        }
      }
      send(c, with_data_on_success(r, rep.data));
      break;
    }
    case Command::kControl: {
      wire::ControlStruct r = call.control;
      r.rv = rep.rv;
      if (rep.rv == sc::kSuccess && rep.data.size() > call.control.recv_length) {
        r.rv = sc::kEInsufficientBuffer;
        r.bytes_returned = static_cast<uint32_t>(rep.data.size());
      } else {
        r.bytes_returned = rep.rv == sc::kSuccess ? static_cast<uint32_t>(rep.data.size()) : rep.length;
      }
      send(c, with_data_on_success(r, rep.data));
      break;
    }
    case Command::kGetAttrib: {
      wire::GetSetStruct r = call.getset;
      r.rv = rep.rv;
      std::memset(r.attr, 0, sizeof r.attr);
      if (rep.rv == sc::kSuccess) {
        const auto n = std::min(rep.data.size(), sizeof r.attr);
        if (n != 0) std::memcpy(r.attr, rep.data.data(), n);
        r.attr_length = static_cast<uint32_t>(rep.data.size());
        if (rep.data.size() > sizeof r.attr) r.rv = sc::kEInsufficientBuffer;
      } else {
        r.attr_length = rep.length;
      }
      if (config_.optimizations.cache_attributes && cacheable_attribute(call.getset.attr_id) &&
          (r.rv == sc::kSuccess || r.rv == sc::kEUnsupportedFeature)) {
        if (auto it = handles_.find(call.card); it != handles_.end() && !is_orphan(it->second) &&
                                               predicted_clean(it->second)) {
          readers_.slot(it->second.slot).attributes[call.getset.attr_id] =
              ReaderSlot::CachedAttribute{r.rv, rep.data, r.attr_length};
        }
      }
      send(c, wire::bytes_of(r));
      break;
    }
    case Command::kSetAttrib: {
      wire::GetSetStruct r = call.getset;
      r.rv = rep.rv;
      send(c, wire::bytes_of(r));
      break;
    }
    default:
      CARDBRIDGE_CHECK(false);
  }
  pump(c);
}

// ---------------------------------------------------------------------------------------
// Desk link

void ShimCore::desk_connected(Clock::time_point now) {
  desk_.transport_up = true;
  desk_.established = false;
  desk_.last_heard = now;
  desk_.busy_since.reset();
  desk_.liveness_probe.reset();
  desk_.local_instance = (uint64_t{rng_()} << 32) | rng_();
  send_hello(false);
  desk_.hello_due = now + config_.hello_retry;
}

void ShimCore::send_hello(bool reply) {
  pr::Hello h = pr::local_hello(pr::Role::kServer, config_.capabilities);
  h.software = fmt::format("cardbridge-shim {}", CARDBRIDGE_VERSION);
  h.peer_name = config_.server_name;
  h.instance = desk_.local_instance;
  h.reply = reply;
  send_desk(pr::Message{0, h});
}

std::optional<Clock::time_point> ShimCore::liveness_deadline() const {
  if (!desk_.established || !awaiting_desk()) return std::nullopt;
  if (desk_.liveness_probe) return desk_.liveness_sent + config_.liveness_timeout;
  const auto since = std::max(desk_.last_heard, desk_.busy_since.value_or(desk_.last_heard));
  return since + config_.liveness_after;
}

std::optional<Clock::time_point> ShimCore::next_deadline() const {
  if (desk_.transport_up && !desk_.established) return desk_.hello_due;
  return liveness_deadline();
}

void ShimCore::tick(Clock::time_point now) {
  if (auto due = liveness_deadline(); due && now >= *due) {
    if (desk_.liveness_probe) {
      logger()->warn("desk '{}' does not answer (no reply to a ping in {} ms with requests outstanding)",
                     log::printable(desk_.peer_name), config_.liveness_timeout.count());
      desk_lost("the desk does not answer");
      fx_.reset_desk_link("the desk does not answer");
      return;
    }
    pr::Request q;
    q.op = pr::Op::kPing;
    const uint32_t id = desk_.next_request++;
    if (desk_.next_request == 0) desk_.next_request = 1;
    desk_.liveness_probe = id;
    desk_.liveness_sent = now;
    desk_.probes[id] = [this](bool) { desk_.liveness_probe.reset(); };
    send_desk(pr::Message{id, std::move(q)});
  }
  if (desk_.transport_up && !desk_.established && desk_.hello_due && now >= *desk_.hello_due) {
    // Some channels drop what is sent before the far end opened (xrdp, FreeRDP static
    // channels): say hello again until the desk answers.
    send_hello(false);
    desk_.hello_due = now + config_.hello_retry;
  }
}

void ShimCore::desk_frame(std::span<const uint8_t> payload, Clock::time_point now) {
  stats_.desk_bytes_in += payload.size() + pr::kFrameHeaderSize;
  desk_.last_heard = now;
  auto m = pr::decode(payload);
  if (!m) {
    logger()->error("desk link: malformed message ({}); resetting the link", m.error().what);
    desk_lost("malformed message from the desk");
    fx_.reset_desk_link("malformed message: " + m.error().what);
    return;
  }
  on_desk_message(std::move(*m));
}

void ShimCore::on_desk_message(pr::Message m) {
  logger()->trace("desk -> {}", pr::describe(m));
  if (auto* h = std::get_if<pr::Hello>(&m.body)) return on_desk_hello(*h);
  if (auto* e = std::get_if<pr::Error>(&m.body)) {
    logger()->error("desk reports error {}: {}", static_cast<uint32_t>(e->code), log::printable(e->message));
    return;
  }
  if (!desk_.established) {
    logger()->warn("desk link: {} before hello; ignored", pr::describe(m));
    return;
  }
  if (auto* s = std::get_if<pr::ReaderSnapshot>(&m.body)) return on_desk_snapshot(*s);
  if (auto* r = std::get_if<pr::Reply>(&m.body)) return on_desk_reply(m.id, *r);
  logger()->error("desk link: unexpected {}; resetting the link", pr::describe(m));
  desk_lost("unexpected message from the desk");
  fx_.reset_desk_link("unexpected message");
}

void ShimCore::on_desk_hello(const pr::Hello& h) {
  if (h.role != pr::Role::kDesk) {
    logger()->error("desk link: peer is not a desk (role {})", static_cast<int>(h.role));
    desk_lost("peer is not a desk");
    fx_.reset_desk_link("peer is not a desk");
    return;
  }
  auto n = pr::negotiate(pr::local_hello(pr::Role::kServer, config_.capabilities), h);
  if (!n) {
    logger()->error("desk link: desk speaks protocol {}.{}, we speak {}.{}", h.version_major,
                    h.version_minor, pr::kVersionMajor, pr::kVersionMinor);
    send_desk(pr::Message{0, pr::Error{pr::ErrorCode::kVersion, "unsupported protocol version"}});
    desk_lost("version mismatch");
    fx_.reset_desk_link("version mismatch");
    return;
  }
  if (!h.reply) send_hello(true);
  if (desk_.established && h.instance == desk_.peer_instance) return;  // a repeated hello
  if (desk_.established) desk_lost("the desk restarted its session");  // roaming or restart
  desk_.established = true;
  desk_.hello_due.reset();
  desk_.peer_instance = h.instance;
  desk_.capabilities = n->capabilities;
  desk_.peer_name = h.peer_name;
  desk_.software = h.software;
  ++desk_.generation;
  ++stats_.desk_sessions;
  fx_.audit(0, fmt::format("desk connected: name='{}' software='{}'", log::printable(h.peer_name),
                           log::printable(h.software)));
  logger()->info("desk '{}' ({}) connected, protocol {}.{}, capabilities {}", log::printable(h.peer_name),
                 log::printable(h.software), pr::kVersionMajor, n->minor, pr::capabilities_text(n->capabilities));
}

void ShimCore::on_desk_snapshot(const pr::ReaderSnapshot& s) {
  auto changes = readers_.apply(s);
  if (changes.dropped) {
    logger()->warn("desk has more than {} readers; {} not shown", ReaderTable::kSlots, changes.dropped);
  }
  for (const auto& [slot, name] : changes.removed) {
    logger()->info("reader '{}' removed (slot {})", log::printable(name), slot);
    fx_.audit(0, fmt::format("reader removed: reader='{}'", log::printable(name)));
    for (auto& [card, h] : handles_) {
      if (h.slot == slot && h.generation == desk_.generation) h.generation = 0;  // orphaned
    }
  }
  for (std::size_t slot : changes.added) {
    logger()->info("reader '{}' added (slot {})", log::printable(readers_.slot(slot).name), slot);
    const auto& added = readers_.slot(slot);
    fx_.audit(0, (added.desk_state & sc::kStatePresent)
                     ? fmt::format("reader added: reader='{}' card present atr={}", log::printable(added.name),
                                   to_hex(added.atr, false))
                     : fmt::format("reader added: reader='{}' no card", log::printable(added.name)));
  }
  for (std::size_t slot : changes.card_events) {
    const auto& r = readers_.slot(slot);
    logger()->info("reader '{}': card {}", log::printable(r.name), (r.desk_state & sc::kStatePresent) ? "present" : "absent");
    if (r.desk_state & sc::kStatePresent) {
      fx_.audit(0, fmt::format("card inserted: reader='{}' atr={}", log::printable(r.name), to_hex(r.atr, false)));
    } else {
      fx_.audit(0, fmt::format("card removed: reader='{}'", log::printable(r.name)));
    }
    // Card removal ends every transaction on that reader (pcscd clears the lock).
    for (auto& [card, h] : handles_) {
      if (h.slot == slot && h.generation == desk_.generation && removed_since(h)) {
        // Removal ends every transaction on the reader (pcscd clears the lock), deferred
        // ones included: the desk never took them.
        h.lock_count = 0;
        h.begin_pending = false;
        h.prefetch.clear();
      }
    }
  }
  if (!changes.added.empty() || !changes.removed.empty()) {
    reader_events_ = static_cast<uint16_t>(reader_events_ + 1);
    if (reader_events_ == 0) reader_events_ = 1;
  }
  after_state_change();
}

void ShimCore::on_desk_reply(uint32_t id, const pr::Reply& r) {
  if (auto a = desk_.async.find(id); a != desk_.async.end()) {
    if (r.rv != sc::kSuccess) {
      logger()->warn("pipelined request #{} on handle 0x{:08X} failed at the desk: {}", id, a->second.card,
                     sc::rv_text(r.rv));
    }
    desk_.async.erase(a);
    if (!awaiting_desk()) desk_.busy_since.reset();
    release_fenced();
    return;
  }
  if (auto p = desk_.probes.find(id); p != desk_.probes.end()) {
    auto done = std::move(p->second);
    desk_.probes.erase(p);
    done(true);
    return;
  }
  auto it = desk_.pending.find(id);
  if (it == desk_.pending.end()) return;  // a fire-and-forget request, or a dead client
  const ClientId cid = it->second;
  desk_.pending.erase(it);
  if (!awaiting_desk()) desk_.busy_since.reset();
  auto cit = clients_.find(cid);
  if (cit == clients_.end()) return;
  Client& c = *cit->second;
  if (!c.waiting || *c.waiting != id) return;
  PendingCall call = std::move(c.call);
  complete(c, call, r);
}

void ShimCore::desk_disconnected() {
  desk_lost("desk link closed");
  desk_.transport_up = false;
  desk_.hello_due.reset();
}

// The desk is gone (or replaced): readers vanish, in-flight calls fail, handles become
// orphans that answer like handles on an unplugged reader.
void ShimCore::desk_lost(const std::string& why) {
  if (desk_.established) {
    logger()->warn("desk '{}' lost: {}", log::printable(desk_.peer_name), why);
    fx_.audit(0, fmt::format("desk disconnected: name='{}' reason='{}'", log::printable(desk_.peer_name), why));
  }
  desk_.established = false;
  desk_.async.clear();
  desk_.busy_since.reset();
  desk_.liveness_probe.reset();
  release_fenced();  // fails them: the desk is gone
  auto probes = std::move(desk_.probes);
  desk_.probes.clear();
  for (auto& [id, done] : probes) done(false);
  auto pending = std::move(desk_.pending);
  desk_.pending.clear();
  for (auto& [id, cid] : pending) {
    auto cit = clients_.find(cid);
    if (cit == clients_.end()) continue;
    Client& c = *cit->second;
    if (!c.waiting || *c.waiting != id) continue;
    PendingCall call = std::move(c.call);
    fail_call(c, call, kLostInFlightRv);
  }
  for (auto& [card, h] : handles_) h.generation = 0;
  if (!readers_.clear().empty()) {
    reader_events_ = static_cast<uint16_t>(reader_events_ + 1);
    if (reader_events_ == 0) reader_events_ = 1;
  }
  after_state_change();
}

// ---------------------------------------------------------------------------------------
// Events

std::array<int32_t, ReaderTable::kSlots> ShimCore::sharing() const {
  std::array<int32_t, ReaderTable::kSlots> out{};
  std::array<bool, ReaderTable::kSlots> exclusive{};
  for (const auto& [card, h] : handles_) {
    if (h.generation != desk_.generation || !desk_.established) continue;
    if (h.share_mode == sc::kShareExclusive) exclusive[h.slot] = true;
    ++out[h.slot];
  }
  for (std::size_t i = 0; i < ReaderTable::kSlots; ++i) {
    const auto& s = readers_.slot(i);
    if (!s.used()) {
      out[i] = 0;
      continue;
    }
    if (exclusive[i] || (out[i] == 0 && (s.desk_state & sc::kStateExclusive))) {
      out[i] = -1;
    } else if (out[i] == 0 && (s.desk_state & sc::kStateInUse)) {
      out[i] = 1;  // someone at the desk holds the card
    }
  }
  return out;
}

void ShimCore::after_state_change() {
  resume_parked();
  auto array = readers_.serialize(sharing());
  if (array == last_array_) return;
  last_array_ = std::move(array);
  signal_waiters();
}

void ShimCore::signal_waiters() {
  for (auto& [id, c] : clients_) {
    if (!c->registered) continue;
    c->registered = false;  // pcscd clears the registration list when it signals
    deliver_signal(*c, sc::kSuccess);
  }
}

void ShimCore::deliver_signal(Client& c, uint32_t rv) {
  if (c.hold_signal) {
    if (!c.held_signal || rv != sc::kSuccess) c.held_signal = rv;
    return;
  }
  wire::WaitReaderStateChange w{0, rv};
  send(c, wire::bytes_of(w));
}

}  // namespace cardbridge::shim
