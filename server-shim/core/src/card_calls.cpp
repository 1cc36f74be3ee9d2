// ShimCore's card operations: for each pcscd command that touches the card, what pcscd
// would refuse before reaching the card (answered here), what goes to the desk (with the
// optimisations of docs/performance.md), and what the answer does to the handles.
#include <algorithm>

#include <fmt/format.h>

#include "cardbridge/card_image/apdu.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/hex.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/redact.hpp"
#include "cardbridge/support/scard.hpp"
#include "shim_core_internal.hpp"
#include "cardbridge/pcscd_wire/replies.hpp"

namespace cardbridge::shim {

namespace sc = cardbridge::scard;
namespace pr = cardbridge::protocol;

namespace {

log::Channel logger{"cardbridge.shim"};

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

bool resets(uint32_t disposition) { return disposition == sc::kResetCard || disposition == sc::kUnpowerCard; }

uint32_t bounded_length(uint32_t n) {
  return static_cast<uint32_t>(std::min<std::size_t>(n, sc::kMaxBufferSizeExtended));
}

}  // namespace

pr::Request ShimCore::request_on(pr::Op op, const Handle& h) {
  pr::Request q;
  q.op = op;
  q.handle = h.desk;
  return q;
}

std::optional<uint32_t> ShimCore::refusal(const Handle& h) const {
  if (handles_.is_orphan(h)) return internal::kOrphanRv;
  if (handles_.locked_by_other(h)) return sc::kESharingViolation;
  return std::nullopt;
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

// Re-runs the parked calls whose reader is no longer in a transaction (they park again
// otherwise).
void ShimCore::resume_parked() {
  auto rerun = [this](auto& parked, auto handler) {
    if (parked.empty()) return;
    auto calls = std::move(parked);
    parked.clear();
    for (auto& [id, s] : calls) {
      auto it = clients_.find(id);
      if (it == clients_.end()) continue;
      Client& c = *it->second;
      c.waiting.reset();
      (this->*handler)(c, s);
      if (clients_.contains(id) && !c.waiting) pump(c);
    }
  };
  rerun(parked_disconnects_, &ShimCore::on_disconnect);
  rerun(parked_connects_, &ShimCore::on_connect);
}

// ---- connect, reconnect, disconnect ---------------------------------------------------

void ShimCore::on_connect(Client& c, const wire::ConnectStruct& s) {
  wire::ConnectStruct r = s;
  r.card = 0;
  r.active_protocol = 0;
  if (c.context == 0 || s.context != c.context) return answer(c, r, sc::kEInvalidValue);
  // pcscd's argument checks, in its order (winscard.c SCardConnect).
  constexpr uint32_t kKnownProtocols = sc::kProtocolT0 | sc::kProtocolT1 | sc::kProtocolRaw | sc::kProtocolAnyOld;
  if (s.share_mode != sc::kShareDirect && !(s.preferred_protocols & kKnownProtocols))
    return answer(c, r, sc::kEProtoMismatch);
  if (s.share_mode != sc::kShareExclusive && s.share_mode != sc::kShareShared && s.share_mode != sc::kShareDirect)
    return answer(c, r, sc::kEInvalidValue);
  const std::string name = wire::read_name(s.reader);
  auto slot = readers_.find(name);
  if (!slot || !link_.established()) return answer(c, r, sc::kEUnknownReader);
  if (c.handles.size() >= internal::kMaxHandlesPerContext) return answer(c, r, sc::kENoMemory);
  if (!handles_.exclusive_on_slot(*slot) && handles_.transaction_on_slot(*slot)) {
    // pcscd blocks a Connect while another handle holds a transaction on the reader.
    c.waiting = 0;
    parked_connects_.emplace_back(c.id, s);
    return;
  }
  const uint32_t desk_state = readers_.slot(*slot).desk_state;
  if (s.share_mode != sc::kShareDirect && !(desk_state & sc::kStatePresent) && (desk_state & sc::kStateEmpty) &&
      !(desk_state & (sc::kStateExclusive | sc::kStateUnavailable | sc::kStateUnknown)) &&
      !handles_.exclusive_on_slot(*slot)) {
    // pcscd's answer for an empty reader, after the same checks (winscard.c SCardConnect:
    // reader status, exclusive holder, transaction, then SCARD_E_NO_SMARTCARD): the desk
    // pushed that the reader is empty, so no round trip. Middleware that connects to every
    // reader on each poll (the Cryptolib) asks this of the empty slot of a two-slot reader.
    ++stats_.local_answers;
    return answer(c, r, sc::kENoSmartcard);
  }
  pr::Request q;
  q.op = pr::Op::kConnect;
  q.reader = name;
  q.share_mode = s.share_mode;
  q.protocols = s.preferred_protocols;
  if (config_.optimizations.card_image && uses(pr::caps::kCardImage) && s.share_mode != sc::kShareDirect) {
    // The session's first Connect to this card (or one after an image that was still being
    // read) brings the card's image along.
    const auto* held = images_[*slot].get();
    if (!held || !held->complete()) q.flags |= pr::request_flags::kWantImage;
  }
  call_desk(c, std::move(q), ConnectCall{s, *slot}, *slot);
}

void ShimCore::connected(Client& c, const ConnectCall& call, const pr::Reply& rep) {
  wire::ConnectStruct r = call.req;
  r.card = 0;
  r.active_protocol = 0;
  r.rv = rep.rv;
  if (rep.rv == sc::kSuccess && (rep.handle.value == 0 || !link_.established())) r.rv = sc::kFInternalError;
  if (r.rv == sc::kSuccess) {
    Handle h;
    h.card = new_id();
    h.owner = c.id;
    h.context = c.context;
    h.slot = call.slot;
    h.generation = link_.generation();
    h.desk = rep.handle;
    h.share_mode = call.req.share_mode;
    h.protocol = rep.protocol;
    handles_.set_baseline(h, rep.state);
    if (h.share_mode == sc::kShareExclusive) h.lock_count = 1;
    learn_card_state(call.slot, rep);
    if (rep.image && config_.optimizations.card_image && uses(pr::caps::kCardImage)) install_image(call.slot, *rep.image);
    const auto& reader = readers_.slot(call.slot);
    AuditRecord audit;
    audit.kind = AuditRecord::Kind::kCardConnected;
    audit.reader = reader.name;
    audit.atr = reader.atr;
    audit.share_mode = h.share_mode;
    fx_.audit_record(c.id, audit);
    logger->debug("client {}: connected to '{}' handle 0x{:08X} protocol {}", c.id, log::printable(reader.name),
                  h.card, rep.protocol);
    r.card = static_cast<int32_t>(h.card);
    r.active_protocol = rep.protocol;
    c.handles.insert(h.card);
    handles_.add(std::move(h));
  }
  send(c, wire::bytes_of(r));
}

void ShimCore::on_reconnect(Client& c, const wire::ReconnectStruct& s) {
  Handle* h = owned_handle(c, s.card, "RECONNECT");
  if (!h) return;
  if (auto rv = refusal(*h)) return answer(c, s, *rv);
  pr::Request q = request_on(pr::Op::kReconnect, *h);
  q.share_mode = s.share_mode;
  q.protocols = s.preferred_protocols;
  q.disposition = s.initialization;
  ReconnectCall call{on_handle(*h), s};
  q.flags = request_flags(*h, q.op, call.carried_begin);
  h->prefetch.clear();
  stats_.prefetch_discarded += handles_.drop_prefetch_on_slot(h->slot, 0);
  call_desk(c, std::move(q), std::move(call), h->slot);
}

void ShimCore::on_disconnect(Client& c, const wire::DisconnectStruct& s) {
  Handle* h = owned_handle(c, s.card, "DISCONNECT");
  if (!h) return;
  if (s.disposition > sc::kEjectCard) return answer(c, s, sc::kEInvalidValue);
  if (handles_.is_orphan(*h)) {
    // pcscd: disconnecting a handle whose reader is gone succeeds.
    forget_handle(c, h->card);
    return answer(c, s, sc::kSuccess);
  }
  if (resets(s.disposition) && handles_.locked_by_other(*h)) {
    // pcscd (SCardDisconnect) waits until the other handle's transaction is over before it
    // resets the card; that transaction may exist only here (deferred Begin).
    c.waiting = 0;
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
    send_async(c, std::move(q), card, {});
    forget_handle(c, card);
    if (resets(s.disposition)) {
      mark_reset(slot, card, false);
      after_power_action(slot, s.disposition);
    }
    after_handle_gone(slot);
    answer(c, s, sc::kSuccess);
    return after_state_change();
  }
  call_desk(c, std::move(q), DisconnectCall{on_handle(*h), s}, h->slot);
}

// ---- transactions -----------------------------------------------------------------------

void ShimCore::on_begin(Client& c, const wire::BeginStruct& s) {
  Handle* h = owned_handle(c, s.card, "BEGIN_TRANSACTION");
  if (!h) return;
  if (handles_.is_orphan(*h)) return answer(c, s, internal::kOrphanRv);
  // pcscd checks the pending event before the lock: let the desk report W_REMOVED/W_RESET.
  const bool event_pending = h->reset_pending || handles_.removed_since(*h);
  if (!event_pending && handles_.locked_by_other(*h)) {  // the client sleeps 100 ms and asks again
    return answer(c, s, sc::kESharingViolation);
  }
  if (config_.optimizations.defer_begin && uses(pr::caps::kDeferredBegin) && !h->begin_pending &&
      h->lock_count == h->lock_floor() && handles_.predicted_clean(*h)) {
    // The desk takes the lock right before the handle's next card operation.
    h->begin_pending = true;
    ++h->lock_count;
    ++stats_.deferred_begins;
    return answer(c, s, sc::kSuccess);
  }
  pr::Request q = request_on(pr::Op::kBeginTransaction, *h);
  BeginCall call{on_handle(*h), s};
  q.flags = request_flags(*h, q.op, call.carried_begin);
  call_desk(c, std::move(q), std::move(call), h->slot);
}

void ShimCore::on_end(Client& c, const wire::EndStruct& s) {
  Handle* h = owned_handle(c, s.card, "END_TRANSACTION");
  if (!h) return;
  if (handles_.is_orphan(*h)) return answer(c, s, internal::kOrphanRv);
  if (!h->reset_pending && !handles_.removed_since(*h) && s.disposition <= sc::kEjectCard &&
      handles_.locked_by_other(*h)) {
    return answer(c, s, sc::kESharingViolation);
  }
  h->prefetch.clear();  // read-ahead is only valid inside the transaction
  if (h->begin_pending && s.disposition == sc::kLeaveCard) {
    // Begin and End with nothing in between: the card never saw the transaction.
    h->begin_pending = false;
    --h->lock_count;
    answer(c, s, sc::kSuccess);
    return resume_parked();
  }
  pr::Request q = request_on(pr::Op::kEndTransaction, *h);
  q.disposition = s.disposition;
  EndCall call{on_handle(*h), s};
  q.flags = request_flags(*h, q.op, call.carried_begin);
  if (config_.optimizations.pipeline && s.disposition <= sc::kEjectCard && h->lock_count > h->lock_floor() &&
      handles_.predicted_clean(*h)) {
    // pcscd's End fails only for a pending reset/removal, a transaction it does not
    // hold, or a bad disposition: none of them here. Answer now.
    --h->lock_count;
    if (resets(s.disposition)) {
      mark_reset(h->slot, h->card, true);
      readers_.slot(h->slot).card_protocol = 0;  // pcscd: the protocol is renegotiated after the reset
    }
    send_async(c, std::move(q), h->card, {});
    answer(c, s, sc::kSuccess);
    return after_state_change();
  }
  call_desk(c, std::move(q), std::move(call), h->slot);
}

// ---- transmit, control, attributes -------------------------------------------------

void ShimCore::on_transmit(Client& c, const wire::TransmitRequest& t) {
  Handle* h = owned_handle(c, t.fixed.card, "TRANSMIT");
  if (!h) return;
  if (auto rv = refusal(*h)) return answer(c, t.fixed, *rv);
  logger->debug("client {}: transmit {}", c.id, redact::Command{t.apdu});
  TransmitCall call{on_handle(*h), t.fixed, {}, t.apdu, {}, 0};
  if (logger->should_log(spdlog::level::debug) && redact::apdu_body_loggable(t.apdu)) call.loggable_command = t.apdu;
  pr::Request q = request_on(pr::Op::kTransmit, *h);
  if (image_transmit(c, *h, call, q)) return;
  if (!h->prefetch.empty()) {
    if (handles_.predicted_clean(*h)) {
      if (auto a = h->prefetch.take(t.apdu, t.fixed.send_pci_protocol)) {
        // The desk already sent this very command to the card, right after the previous
        // one, with nothing in between: serve its answer.
        ++stats_.prefetch_hits;
        pr::Reply rep;
        rep.data = std::move(a->response);
        rep.protocol = a->recv_protocol;
        return complete(c, std::move(call), rep);
      }
    }
    stats_.prefetch_discarded += h->prefetch.size();
    h->prefetch.clear();
  }
  q.protocols = t.fixed.send_pci_protocol;
  q.recv_protocol = t.fixed.recv_pci_protocol;
  q.recv_length = bounded_length(t.fixed.recv_length);
  q.data = t.apdu;
  q.flags = request_flags(*h, q.op, call.carried_begin);
  stats_.prefetch_discarded += handles_.drop_prefetch_on_slot(h->slot, h->card);
  call_desk(c, std::move(q), std::move(call), h->slot);
}

void ShimCore::on_control(Client& c, const wire::ControlRequest& t) {
  Handle* h = owned_handle(c, t.fixed.card, "CONTROL");
  if (!h) return;
  if (auto rv = refusal(*h)) {
    wire::ControlStruct r = t.fixed;
    r.bytes_returned = 0;
    return answer(c, r, *rv);
  }
  logger->debug("client {}: control {}", c.id, redact::Control{t.fixed.control_code, t.data});
  pr::Request q = request_on(pr::Op::kControl, *h);
  q.code = t.fixed.control_code;
  q.recv_length = bounded_length(t.fixed.recv_length);
  q.data = t.data;
  ControlCall call{on_handle(*h), t.fixed};
  q.flags = request_flags(*h, q.op, call.carried_begin);
  // A control (PIN pad...) may change the card's state.
  stats_.prefetch_discarded += handles_.drop_prefetch_on_slot(h->slot, 0);
  image_card_reset(h->slot);
  call_desk(c, std::move(q), std::move(call), h->slot);
}

void ShimCore::on_get_attrib(Client& c, const wire::GetSetStruct& s) {
  Handle* h = owned_handle(c, s.card, "GET_ATTRIB");
  if (!h) return;
  if (auto rv = refusal(*h)) return answer(c, s, *rv);
  GetAttribCall call{on_handle(*h), s};
  if (config_.optimizations.cache_attributes && cacheable_attribute(s.attr_id) && !h->begin_pending &&
      handles_.predicted_clean(*h)) {
    const auto& cache = readers_.slot(h->slot).attributes;
    if (auto it = cache.find(s.attr_id); it != cache.end()) {
      pr::Reply rep;
      rep.rv = it->second.rv;
      rep.data = it->second.data;
      rep.length = it->second.length;
      ++stats_.attribute_cache_hits;
      return complete(c, std::move(call), rep);
    }
  }
  pr::Request q = request_on(pr::Op::kGetAttrib, *h);
  q.code = s.attr_id;
  q.recv_length = s.attr_length;
  q.flags = request_flags(*h, q.op, call.carried_begin);
  call_desk(c, std::move(q), std::move(call), h->slot);
}

void ShimCore::on_set_attrib(Client& c, const wire::GetSetStruct& s) {
  Handle* h = owned_handle(c, s.card, "SET_ATTRIB");
  if (!h) return;
  if (auto rv = refusal(*h)) return answer(c, s, *rv);
  pr::Request q = request_on(pr::Op::kSetAttrib, *h);
  q.code = s.attr_id;
  q.data.assign(s.attr, s.attr + s.attr_length);
  SetAttribCall call{on_handle(*h), s};
  q.flags = request_flags(*h, q.op, call.carried_begin);
  readers_.slot(h->slot).attributes.erase(s.attr_id);
  stats_.prefetch_discarded += handles_.drop_prefetch_on_slot(h->slot, 0);
  image_card_reset(h->slot);
  call_desk(c, std::move(q), std::move(call), h->slot);
}

// ---- answers ----------------------------------------------------------------------------

// What pcscd writes into the array after a Disconnect with RESET/UNPOWER (winscard.c):
// the protocol is renegotiated later (0), and UNPOWER leaves the card present, unpowered.
void ShimCore::after_power_action(std::size_t slot, uint32_t disposition) {
  auto& s = readers_.slot(slot);
  s.card_protocol = 0;
  if (disposition == sc::kUnpowerCard) s.daemon_state = sc::kReaderPresent;
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

void ShimCore::complete(Client& c, PendingCall call, const pr::Reply& rep) {
  const ClientId id = c.id;
  c.waiting.reset();
  std::visit(
      [&](auto& k) {
        using K = std::decay_t<decltype(k)>;
        if constexpr (std::is_base_of_v<OnHandle, K>) {
          if (k.carried_begin && rep.begin_rv != sc::kSuccess) {
            // The deferred Begin failed at the desk (card removed or reset meanwhile): the
            // transaction never started and the operation's answer carries the reason.
            if (Handle* h = handles_.find(k.card); h && h->lock_count > 0) --h->lock_count;
          }
        }
        Handle* h = nullptr;
        if constexpr (std::is_base_of_v<OnHandle, K>) h = handles_.find(k.card);
        const bool ok = rep.rv == sc::kSuccess;

        if constexpr (std::is_same_v<K, ChargeCall>) {
          c.charged = true;
          handle_request(c, std::move(k.request));
          return;
        } else if constexpr (std::is_same_v<K, ConnectCall>) {
          connected(c, k, rep);
          after_state_change();
        } else if constexpr (std::is_same_v<K, ReconnectCall>) {
          wire::ReconnectStruct r = wire::with_rv(k.req, rep.rv);
          if (ok && h) {
            r.active_protocol = rep.protocol;
            h->protocol = rep.protocol;
            h->share_mode = k.req.share_mode;
            h->reset_pending = false;
            handles_.set_baseline(*h, rep.state);
            if (h->share_mode == sc::kShareExclusive) h->lock_count = std::max<uint32_t>(h->lock_count, 1);
            if (resets(k.req.initialization)) mark_reset(h->slot, h->card, false);
            learn_card_state(h->slot, rep);
          }
          send(c, wire::bytes_of(r));
          after_state_change();
        } else if constexpr (std::is_same_v<K, DisconnectCall>) {
          if (ok) {
            if (h) {
              const std::size_t slot = h->slot;
              handles_.erase(k.card);
              if (resets(k.req.disposition)) {
                mark_reset(slot, k.card, false);
                after_power_action(slot, k.req.disposition);
              }
              after_handle_gone(slot);
            }
            c.handles.erase(k.card);
            live_ids_.erase(k.card);
          }
          send(c, wire::bytes_of(wire::with_rv(k.req, rep.rv)));
          after_state_change();
        } else if constexpr (std::is_same_v<K, BeginCall>) {
          if (ok && h) ++h->lock_count;
          send(c, wire::bytes_of(wire::with_rv(k.req, rep.rv)));
        } else if constexpr (std::is_same_v<K, EndCall>) {
          if (ok && h) {
            if (h->lock_count > h->lock_floor()) --h->lock_count;
            if (resets(k.req.disposition)) {
              mark_reset(h->slot, h->card, true);
              readers_.slot(h->slot).card_protocol = 0;
            }
            if (h->lock_count == h->lock_floor()) h->prefetch.clear();
          }
          send(c, wire::bytes_of(wire::with_rv(k.req, rep.rv)));
          after_state_change();  // resumes parked connects and republishes the array
        } else if constexpr (std::is_same_v<K, TransmitCall>) {
          if (k.image_serial != 0 && !image_forwarded(c, k, rep)) return;  // sent again, without the prelude
          const wire::CallOutcome out{rep.rv, rep.data, rep.length, rep.protocol};
          auto bytes = wire::transmit_reply(k.req, out);
          if (ok) {
            logger->debug("client {}: transmit -> {} {}", c.id, sc::rv_text(rep.rv),
                          redact::Response{k.loggable_command, rep.data});
          } else {
            logger->debug("client {}: transmit -> {}", c.id, sc::rv_text(rep.rv));
          }
          if (ok && !rep.prefetched.empty() && rep.data.size() <= k.req.recv_length && h) {
            h->prefetch.assign(rep.prefetched, k.req.send_pci_protocol, rep.protocol);
          }
          send(c, std::move(bytes));
        } else if constexpr (std::is_same_v<K, ControlCall>) {
          send(c, wire::control_reply(k.req, wire::CallOutcome{rep.rv, rep.data, rep.length, 0}));
        } else if constexpr (std::is_same_v<K, GetAttribCall>) {
          wire::GetSetStruct r = wire::get_attrib_reply(k.req, wire::CallOutcome{rep.rv, rep.data, rep.length, 0});
          if (config_.optimizations.cache_attributes && cacheable_attribute(k.req.attr_id) &&
              (r.rv == sc::kSuccess || r.rv == sc::kEUnsupportedFeature) && h && handles_.predicted_clean(*h)) {
            readers_.slot(h->slot).attributes[k.req.attr_id] =
                ReaderSlot::CachedAttribute{r.rv, rep.data, r.attr_length};
          }
          send(c, wire::bytes_of(r));
        } else if constexpr (std::is_same_v<K, SetAttribCall>) {
          send(c, wire::bytes_of(wire::with_rv(k.req, rep.rv)));
        }
      },
      call);
  if (auto it = clients_.find(id); it != clients_.end() && !it->second->waiting) pump(*it->second);
}

// ---- the card image ----------------------------------------------------------------------

void ShimCore::mark_reset(std::size_t slot, uint32_t except_card, bool include_caller) {
  handles_.mark_reset(slot, except_card, include_caller);
  image_card_reset(slot);
}

void ShimCore::image_card_reset(std::size_t slot) {
  if (auto& vc = images_.at(slot)) vc->card_reset();
}

// No live handle of the session is left on the card: the desk may read it for its image
// (or another desk program use it) before the next one, so the card's current file is
// its own again.
void ShimCore::after_handle_gone(std::size_t slot) {
  bool any = false;
  handles_.for_each([&](const Handle& h) { any = any || (h.slot == slot && !handles_.is_orphan(h)); });
  if (!any) image_card_reset(slot);
}

void ShimCore::install_image(std::size_t slot, pr::CardImage image) {
  const auto& reader = readers_.slot(slot);
  if (image.event_count != reader.event_count || !(reader.desk_state & sc::kStatePresent)) {
    logger->info("reader '{}': card image of another card insertion ignored", log::printable(reader.name));
    return;
  }
  logger->info("reader '{}': card image received ({} selects, {} files{})", log::printable(reader.name),
               image.selects.size(), image.files.size(), image.complete ? "" : ", partial");
  ++stats_.images_received;
  images_[slot] = std::make_unique<VirtualCard>(std::move(image));
  image_serial_[slot] = next_image_serial_++;
  // Another handle of the session may have had the card do something: start from the
  // card's own current file (as for a card nobody here has used yet).
  images_[slot]->card_reset();
}

void ShimCore::drop_image(std::size_t slot, const char* why) {
  if (!images_.at(slot)) return;
  logger->info("reader '{}': card image dropped: {}", log::printable(readers_.slot(slot).name), why);
  images_[slot].reset();
  image_serial_[slot] = 0;
  ++stats_.images_dropped;
}

bool ShimCore::image_transmit(Client& c, Handle& h, TransmitCall& call, pr::Request& q) {
  VirtualCard* vc = images_[h.slot].get();
  if (!vc) return false;
  call.image_serial = image_serial_[h.slot];
  // A pending reset or removal, or another holder: the desk answers (with the error), as
  // it would without the image.
  if (!handles_.predicted_clean(h)) return false;
  auto decision = vc->transmit(call.apdu, call.req.send_pci_protocol);
  if (auto* local = std::get_if<VirtualCard::Local>(&decision)) {
    ++stats_.image_answers;
    // Speculative answers were the card's, for the state the program has now left.
    stats_.prefetch_discarded += h.prefetch.size();
    h.prefetch.clear();
    stats_.prefetch_discarded += handles_.drop_prefetch_on_slot(h.slot, h.card);
    pr::Reply rep;
    rep.data = std::move(local->response);
    rep.protocol = vc->recv_protocol();
    call.image_serial = 0;  // nothing for the image to learn: it gave the answer
    complete(c, std::move(call), rep);
    return true;
  }
  auto& forward = std::get<VirtualCard::Forward>(decision);
  if (!forward.prelude.empty()) {
    ++stats_.image_preludes;
    // The card is put back into the program's state first: what was read ahead was read
    // in another one.
    stats_.prefetch_discarded += h.prefetch.size();
    h.prefetch.clear();
  }
  call.prelude = forward.prelude;
  q.prelude = std::move(forward.prelude);
  // A write needs the program's current file too (the prelude above), then the image is
  // void: the card is not what was read.
  if (card_image::may_modify(call.apdu)) drop_image(h.slot, "a command that may modify the card");
  return false;
}

bool ShimCore::image_forwarded(Client& c, TransmitCall& call, const pr::Reply& rep) {
  const std::size_t slot = call.slot;
  // The desk runs the program's command only once every prelude command succeeded.
  const bool command_ran = call.prelude.empty() || rep.rv != sc::kSuccess ||
                           (rep.prelude_answers.size() == call.prelude.size() &&
                            card_image::success(rep.prelude_answers.back()));
  if (!command_ran) {
    // The card refused a SELECT of the prelude, so the program's command never ran: this is
    // not the card the image was read from. Without the image, ask the card again.
    drop_image(slot, "the card refused a SELECT its image answered");
    Handle* h = handles_.find(call.card);
    call.prelude.clear();
    call.image_serial = 0;
    if (!h || handles_.is_orphan(*h)) {
      fail_call(c, std::move(call), internal::kOrphanRv);
      return false;
    }
    pr::Request q = request_on(pr::Op::kTransmit, *h);
    q.protocols = call.req.send_pci_protocol;
    q.recv_protocol = call.req.recv_pci_protocol;
    q.recv_length = bounded_length(call.req.recv_length);
    q.data = call.apdu;
    bool carried = false;
    q.flags = request_flags(*h, q.op, carried);
    call_desk(c, std::move(q), std::move(call), slot);
    return false;
  }
  VirtualCard* vc = images_[slot].get();
  if (!vc || image_serial_[slot] != call.image_serial) return true;  // another image (or none) now
  if (rep.rv != sc::kSuccess) {
    vc->card_reset();  // the card's state is its own business now
    return true;
  }
  if (!vc->forwarded(call.apdu, call.prelude, rep.prelude_answers, rep.data)) {
    drop_image(slot, "the card's answers to a prelude differ from its image");
  } else if (!call.prelude.empty()) {
    logger->trace("card image: {} prelude command(s) sent before the program's", call.prelude.size());
  }
  return true;
}

}  // namespace cardbridge::shim
