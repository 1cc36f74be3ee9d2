#include "cardbridge/shim_core/shim_core.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/hex.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/scard.hpp"
#include "shim_core_internal.hpp"

namespace cardbridge::shim {

namespace sc = cardbridge::scard;
namespace pr = cardbridge::protocol;
using wire::Command;

namespace {

log::Channel logger{"cardbridge.shim"};

// Requests a client may queue behind one that waits for the desk. A real client sends
// one request at a time per connection; anything beyond this is abuse.
constexpr std::size_t kMaxBufferedInput = 2 * (sizeof(wire::TransmitStruct) + sc::kMaxBufferSizeExtended + 8);

pr::LinkSettings link_settings(const ShimConfig& c) {
  pr::LinkSettings s;
  s.role = pr::Role::kServer;
  s.capabilities = c.capabilities;
  s.software = fmt::format("cardbridge-shim {}", CARDBRIDGE_VERSION);
  s.name = c.server_name;
  s.hello_retry = c.hello_retry;
  s.liveness_after = c.liveness_after;
  s.liveness_timeout = c.liveness_timeout;
  s.random_seed = c.random_seed;
  s.peer_policy = c.desk_policy;
  return s;
}

}  // namespace

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
    } else if (name == "card-image") {
      card_image = false;
    } else if (!name.empty()) {
      error += fmt::format("unknown optimisation '{}'; ", name);
    }
    if (comma == std::string_view::npos) break;
    names.remove_prefix(comma + 1);
  }
  return error;
}

ShimCore::ShimCore(ShimEffects& effects, ShimConfig config)
    : fx_(effects), config_(std::move(config)), link_(*this, link_settings(config_)) {
  rng_.seed(config_.random_seed != 0 ? config_.random_seed : std::random_device{}());
  last_array_ = readers_.serialize({});
}

ShimCore::~ShimCore() = default;


ShimStats ShimCore::stats() const {
  ShimStats s = stats_;
  s.desk_sessions = link_.stats().sessions;
  s.desk_bytes_in = link_.stats().bytes_in;
  s.desk_bytes_out = link_.stats().bytes_out;
  s.desk_requests = link_.stats().requests;
  return s;
}

uint32_t ShimCore::new_id() {
  std::uniform_int_distribution<uint32_t> dist(1, 0x7FFFFFFF);
  for (;;) {
    uint32_t v = dist(rng_);
    if (live_ids_.insert(v).second) return v;
  }
}

// ---------------------------------------------------------------------------------------
// Clients

void ShimCore::client_opened(ClientId id, TimePoint now) {
  now_ = now;
  auto c = std::make_unique<Client>();
  c->id = id;
  clients_.emplace(id, std::move(c));
  ++stats_.client_connections;
  logger->debug("client {}: connected", id);
}

void ShimCore::client_data(ClientId id, std::span<const uint8_t> bytes, TimePoint now) {
  now_ = now;
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

void ShimCore::client_closed(ClientId id, TimePoint now) {
  now_ = now;
  logger->debug("client {}: closed", id);
  drop_client(id, false);
}

void ShimCore::pump(Client& c) {
  const ClientId id = c.id;
  while (!c.waiting) {
    auto next = c.decoder.next();
    if (!next) return;
    if (!*next) return violation(c, next->error().what);
    handle_request(c, std::move(next->value()));
    if (!clients_.contains(id)) return;  // closed while handling
  }
}

void ShimCore::violation(Client& c, const std::string& what) {
  ++stats_.protocol_errors;
  logger->warn("client {}: protocol error: {}; closing the connection", c.id, what);
  drop_client(c.id, true);
}

void ShimCore::send(Client& c, std::vector<uint8_t> bytes) { fx_.send_to_client(c.id, std::move(bytes)); }

void ShimCore::drop_client(ClientId id, bool close_socket) {
  auto it = clients_.find(id);
  if (it == clients_.end()) return;
  Client& c = *it->second;
  release_context(c);
  if (c.waiting) pending_.erase(*c.waiting);
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
    if (const Handle* h = handles_.find(card); h && !handles_.is_orphan(*h)) touched.push_back(h->slot);
  }
  for (uint32_t card : c.handles) {
    Handle* h = handles_.find(card);
    if (!h) continue;
    // pcscd (MSGCleanupClient, SCardReleaseContext): a handle that holds the transaction or
    // exclusive access is disconnected with RESET unless the card was already reset or
    // removed, so that no security state leaks; every other handle then sees W_RESET.
    if (!handles_.is_orphan(*h) && h->lock_count > 0 && !h->reset_pending && !handles_.removed_since(*h)) {
      if (h->begin_pending && h->share_mode != sc::kShareExclusive && c.desk_ctx_generation == link_.generation()) {
        // The transaction existed only here (deferred Begin): reset as pcscd would have.
        pr::Request r = request_on(pr::Op::kDisconnect, *h);
        r.disposition = sc::kResetCard;
        send_async(c, std::move(r), h->card, {});
      }
      mark_reset(h->slot, h->card, false);
      after_power_action(h->slot, sc::kResetCard);
    }
    handles_.erase(card);
    live_ids_.erase(card);
  }
  c.handles.clear();
  for (std::size_t slot : touched) after_handle_gone(slot);
  if (c.desk_ctx.value != 0 && c.desk_ctx_generation == link_.generation() && link_.established()) {
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

Handle* ShimCore::owned_handle(Client& c, int32_t card, const char* what) {
  auto key = static_cast<uint32_t>(card);
  if (!c.handles.contains(key)) {
    // pcscd (MSGCheckHandleAssociation) drops a connection that uses a handle it does
    // not own. libpcsclite never sends such a request: only a hostile peer does.
    violation(c, fmt::format("{} on a handle 0x{:08X} this connection does not own", what, key));
    return nullptr;
  }
  return handles_.find(key);
}

void ShimCore::forget_handle(Client& c, uint32_t card) {
  c.handles.erase(card);
  live_ids_.erase(card);
  handles_.erase(card);
}

void ShimCore::handle_request(Client& c, wire::DecodedRequest req) {
  ++stats_.client_requests;
  if (logger->should_log(spdlog::level::trace)) {
    logger->trace("client {}: {}", c.id, wire::command_name(static_cast<uint32_t>(req.command)));
  }
  if (charge_round_trip(c, req)) return;
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
}

// Per-call (benchmark) mode: the calls the shim answers by itself first cost one desk
// round trip, as with a redirector that forwards every PC/SC call. EstablishContext
// makes the desk's context; the others are charged a Ping. The request is handled as
// usual once the round trip is over (complete() runs it again with |charged| set).
bool ShimCore::charge_round_trip(Client& c, const wire::DecodedRequest& req) {
  if (!config_.one_round_trip_per_call || !link_.established()) return false;
  if (c.charged) {
    c.charged = false;
    return false;
  }
  pr::Request q;
  switch (req.command) {
    case Command::kEstablishContext:
      q.op = pr::Op::kEstablishContext;
      q.code = std::get<wire::EstablishStruct>(req.body).scope;
      break;
    case Command::kReleaseContext:
    case Command::kGetReadersState:
    case Command::kWaitReaderStateChange:
      q.op = pr::Op::kPing;
      break;
    case Command::kGetReadersStateArray:
      // 4.6 clients read the array with SIZE + ARRAY instead of CMD_GET_READERS_STATE; the
      // ARRAY after a WAIT was charged with the WAIT.
      if (c.hold_signal) return false;
      q.op = pr::Op::kPing;
      break;
    default:
      return false;
  }
  call_desk(c, std::move(q), ChargeCall{req}, 0);
  return true;
}

// ---- version, contexts, events -------------------------------------------------------

void ShimCore::on_version(Client& c, const wire::VersionStruct& s) {
  wire::VersionStruct r = s;
  if (s.major != wire::kProtocolMajor || s.minor < wire::kMinorLowest) {
    // pcsc-lite < 1.8.24 or a different major: refused as pcscd 2.x refuses it.
    logger->warn("client {}: unsupported pcsc-lite protocol {}.{}", c.id, s.major, s.minor);
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
  if (c.desk_ctx.value == 0 || c.desk_ctx_generation != link_.generation()) {
    c.desk_ctx = pr::ContextId{next_context_++};
    if (next_context_ == 0) next_context_ = 1;
    c.desk_ctx_generation = link_.generation();
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
  logger->debug("client {}: context 0x{:08X}", c.id, c.context);
  answer(c, r, sc::kSuccess);
}

void ShimCore::on_release(Client& c, const wire::ReleaseStruct& s) {
  if (c.context == 0 || s.context != c.context) return answer(c, s, sc::kEInvalidValue);
  release_context(c);
  answer(c, s, sc::kSuccess);
  after_state_change();
}

// SCardStatus: the client has already fetched the array and found the reader; the daemon
// only checks the handle (pcscd 1.9.9: RFCheckSharing, then the pending event, then the
// reader status; no card-presence check).
void ShimCore::on_status(Client& c, const wire::StatusStruct& s) {
  Handle* h = owned_handle(c, s.card, "STATUS");
  if (!h) return;
  uint32_t rv = sc::kSuccess;
  if (handles_.is_orphan(*h)) {
    rv = internal::kOrphanRv;
  } else if (handles_.locked_by_other(*h)) {
    rv = sc::kESharingViolation;
  } else if (handles_.removed_since(*h)) {
    rv = sc::kWRemovedCard;
  } else if (h->reset_pending) {
    rv = sc::kWResetCard;
  } else if (readers_.slot(h->slot).desk_state & (sc::kStateUnknown | sc::kStateUnavailable)) {
    rv = sc::kEReaderUnavailable;
  }
  answer(c, s, rv);
}

void ShimCore::on_cancel(Client& c, const wire::CancelStruct& s) {
  uint32_t rv = sc::kEInvalidHandle;
  for (auto& [id, other] : clients_) {
    if (other->context == 0 || other->context != static_cast<uint32_t>(s.context)) continue;
    if (other->registered) {
      other->registered = false;
      deliver_signal(*other, sc::kECancelled);
      rv = sc::kSuccess;
    } else {
      // pcscd 1.9.9 answers INVALID_HANDLE when the target is not waiting; 2.0.1+
      // answers SUCCESS. Behave like the daemon generation the target client expects.
      rv = other->minor >= 5 ? sc::kSuccess : sc::kEInvalidHandle;
    }
    break;
  }
  answer(c, s, rv);
}

void ShimCore::on_header_only(Client& c, Command cmd) {
  switch (cmd) {
    case Command::kGetReadersState:
      return send(c, last_array_);
    case Command::kWaitReaderStateChange:
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
        send(c, wire::bytes_of(wire::WaitReaderStateChange{0, sc::kSuccess}));
      }
      // Not registered: the signal already sent is read as the answer (pcscd does the same).
      return;
    case Command::kGetReaderEvents:
      if (c.minor < 5) return violation(c, "CMD_GET_READER_EVENTS from a protocol 4.4 client");
      return send(c, wire::bytes_of(wire::GetReaderEvents{reader_events_, sc::kSuccess}));
    case Command::kGetReadersStateSize:
      if (c.minor < 6) return violation(c, "CMD_GET_READERS_STATE_SIZE before protocol 4.6");
      return send(c, wire::bytes_of(static_cast<int32_t>(ReaderTable::kSlots)));
    case Command::kGetReadersStateArray:
      if (c.minor < 6) return violation(c, "CMD_GET_READERS_STATE_ARRAY before protocol 4.6");
      send(c, last_array_);
      if (c.hold_signal) {
        c.hold_signal = false;
        if (c.held_signal) {
          const uint32_t rv = *c.held_signal;
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

std::vector<uint32_t> ShimCore::fence_ids(std::size_t slot, ClientId client) const {
  std::vector<uint32_t> ids;
  for (const auto& [id, a] : async_) {
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
    call_desk(c, std::move(f->request), std::move(f->call), f->slot);  // may fence again
  }
}

void ShimCore::call_desk(Client& c, pr::Request req, PendingCall call, std::size_t slot) {
  if (!link_.established()) return fail_call(c, std::move(call), internal::kLostInFlightRv);
  const bool card_op = req.op != pr::Op::kPing && req.op != pr::Op::kEstablishContext;
  if (card_op) {
    auto after = fence_ids(slot, c.id);
    if (uses(pr::caps::kDeskOrdering) && after.size() <= pr::kMaxAfter) {
      // The desk keeps the order for us: it starts this request once the other clients'
      // pipelined requests on the reader are done, as pcscd would have run them first.
      req.after = std::move(after);
    } else if (!after.empty()) {
      c.waiting = 0;  // held here until the other client's pipelined request is done
      fenced_.push_back(std::make_unique<Fenced>(Fenced{c.id, std::move(req), std::move(call), slot}));
      return;
    }
  }
  // A Ping needs no PC/SC context at the desk: context 0 is served without one.
  req.context = req.op == pr::Op::kPing ? pr::ContextId{0} : desk_context(c);
  const uint32_t id = link_.request(std::move(req), now_);
  c.waiting = id;
  c.call = std::move(call);
  pending_[id] = c.id;
  ++stats_.round_trips;
}

void ShimCore::send_async(Client& c, pr::Request req, uint32_t card, std::vector<std::size_t> slots) {
  if (!link_.established()) return;
  req.context = desk_context(c);
  if (const Handle* h = handles_.find(card)) slots.push_back(h->slot);
  const uint32_t id = link_.request(std::move(req), now_);
  async_[id] = Async{card, std::move(slots), c.id};
  ++stats_.pipelined;
}

void ShimCore::fail_call(Client& c, PendingCall call, uint32_t rv) {
  pr::Reply r;
  r.rv = rv;
  complete(c, std::move(call), r);
}

}  // namespace cardbridge::shim
