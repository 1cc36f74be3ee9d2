// ShimCore: the desk link's session (protocol::LinkSession: hello, readers, replies) and the
// reader-state array the session's programs wait on.
#include "cardbridge/shim_core/shim_core.hpp"

#include "cardbridge/support/log.hpp"
#include "shim_core_internal.hpp"

namespace cardbridge::shim {

namespace sc = cardbridge::scard;
namespace pr = cardbridge::protocol;

namespace {

log::Channel logger{"cardbridge.shim"};

}  // namespace

// ---------------------------------------------------------------------------------------
// The desk session (protocol::LinkSession)

void ShimCore::desk_connected(TimePoint now, PeerIdentity peer) {
  now_ = now;
  link_.transport_up(now, std::move(peer));
}

void ShimCore::desk_bytes(std::span<const uint8_t> bytes, TimePoint now) {
  now_ = now;
  link_.receive(bytes, now);
}

void ShimCore::desk_disconnected(TimePoint now) {
  now_ = now;
  link_.transport_down(now);
}

void ShimCore::tick(TimePoint now) {
  now_ = now;
  link_.tick(now);
}

void ShimCore::ping_desk(TimePoint now, std::function<void(bool)> done) {
  now_ = now;
  link_.ping(now, std::move(done));
}

void ShimCore::link_send(std::vector<uint8_t> bytes) { fx_.send_to_desk(std::move(bytes)); }

void ShimCore::link_close(const std::string& reason) { fx_.reset_desk_link(reason); }

void ShimCore::session_started(const pr::PeerSession& peer, TimePoint) {
  desk_ = peer;
  desk_service_rv_ = 0;
  handles_.set_live_generation(peer.generation);
  // What the transport verified, and what the desk only declares (its name and software).
  AuditRecord audit;
  audit.kind = AuditRecord::Kind::kDeskConnected;
  audit.desk_name = peer.name;
  audit.desk_software = peer.software;
  audit.desk_identity = peer.verified.describe();
  fx_.audit_record(0, audit);
  after_state_change();
}

// The desk is gone (or replaced): readers vanish, in-flight calls fail, handles become
// orphans that answer like handles on an unplugged reader.
void ShimCore::session_ended(const std::string& reason, TimePoint) {
  logger->warn("desk '{}' lost: {}", log::printable(desk_.name), reason);
  AuditRecord audit;
  audit.kind = AuditRecord::Kind::kDeskDisconnected;
  audit.desk_name = desk_.name;
  audit.desk_software = desk_.software;
  audit.desk_identity = desk_.verified.describe();
  audit.reason = reason;
  fx_.audit_record(0, audit);
  async_.clear();
  handles_.set_live_generation(0);
  handles_.orphan_all();
  release_fenced();  // fails them: the desk is gone
  auto pending = std::move(pending_);
  pending_.clear();
  for (auto& [id, cid] : pending) {
    auto cit = clients_.find(cid);
    if (cit == clients_.end()) continue;
    Client& c = *cit->second;
    if (c.waiting != id) continue;
    fail_call(c, std::move(c.call), internal::kLostInFlightRv);
  }
  for (std::size_t slot = 0; slot < ReaderTable::kSlots; ++slot) drop_image(slot, "the desk is gone");
  if (!readers_.clear().empty()) bump_reader_events();
  after_state_change();
}

void ShimCore::received_snapshot(pr::ReaderSnapshot&& s, TimePoint) {
  if (s.service_rv != desk_service_rv_) {
    if (s.service_rv != 0) {
      logger->warn("desk '{}': its PC/SC service fails ({}): no pcscd at the desk?", log::printable(desk_.name),
                   sc::rv_text(s.service_rv));
    } else if (desk_service_rv_ != 0) {
      logger->info("desk '{}': its PC/SC service answers again", log::printable(desk_.name));
    }
    desk_service_rv_ = s.service_rv;
  }
  auto changes = readers_.apply(s);
  if (changes.dropped) {
    logger->warn("desk has more than {} readers; {} not shown", ReaderTable::kSlots, changes.dropped);
  }
  for (const auto& [slot, name] : changes.removed) {
    logger->info("reader '{}' removed (slot {})", log::printable(name), slot);
    AuditRecord audit;
    audit.kind = AuditRecord::Kind::kReaderRemoved;
    audit.reader = name;
    fx_.audit_record(0, audit);
    handles_.orphan_slot(slot);
    drop_image(slot, "the reader is gone");
  }
  for (std::size_t slot : changes.added) {
    const auto& added = readers_.slot(slot);
    logger->info("reader '{}' added (slot {})", log::printable(added.name), slot);
    AuditRecord audit;
    audit.kind = AuditRecord::Kind::kReaderAdded;
    audit.reader = added.name;
    audit.card_present = (added.desk_state & sc::kStatePresent) != 0;
    if (audit.card_present) audit.atr = added.atr;
    fx_.audit_record(0, audit);
  }
  for (std::size_t slot : changes.card_events) {
    const auto& r = readers_.slot(slot);
    const bool present = (r.desk_state & sc::kStatePresent) != 0;
    logger->info("reader '{}': card {}", log::printable(r.name), present ? "present" : "absent");
    AuditRecord audit;
    audit.kind = present ? AuditRecord::Kind::kCardInserted : AuditRecord::Kind::kCardRemoved;
    audit.reader = r.name;
    if (present) audit.atr = r.atr;
    fx_.audit_record(0, audit);
    handles_.card_removed(slot);  // removal ends every transaction on the reader, deferred ones included
    drop_image(slot, "card event");
  }
  for (std::size_t slot : changes.image_voided) drop_image(slot, "the desk voided it");
  if (!changes.added.empty() || !changes.removed.empty()) bump_reader_events();
  after_state_change();
}

void ShimCore::received_reply(uint32_t id, pr::Reply&& r, TimePoint) {
  if (auto a = async_.find(id); a != async_.end()) {
    if (r.rv != sc::kSuccess) {
      logger->warn("pipelined request #{} on handle 0x{:08X} failed at the desk: {}", id, a->second.card,
                   sc::rv_text(r.rv));
    }
    async_.erase(a);
    return release_fenced();
  }
  auto it = pending_.find(id);
  if (it == pending_.end()) return;  // a dead client's call
  const ClientId cid = it->second;
  pending_.erase(it);
  auto cit = clients_.find(cid);
  if (cit == clients_.end()) return;
  Client& c = *cit->second;
  if (c.waiting != id) return;
  complete(c, std::move(c.call), r);
}

// ---------------------------------------------------------------------------------------
// The reader-state array and its waiters

void ShimCore::bump_reader_events() {
  reader_events_ = static_cast<uint16_t>(reader_events_ + 1);
  if (reader_events_ == 0) reader_events_ = 1;
}

void ShimCore::after_state_change() {
  resume_parked();
  publish_array();
}

void ShimCore::publish_array() {
  const auto held = handles_.sharing();
  std::array<int32_t, ReaderTable::kSlots> sharing{};
  for (std::size_t i = 0; i < ReaderTable::kSlots; ++i) {
    const auto& s = readers_.slot(i);
    if (!s.used()) continue;
    sharing[i] = held.count[i];
    if (held.exclusive[i] || (held.count[i] == 0 && (s.desk_state & sc::kStateExclusive))) {
      sharing[i] = -1;
    } else if (held.count[i] == 0 && (s.desk_state & sc::kStateInUse)) {
      sharing[i] = 1;  // someone at the desk holds the card
    }
  }
  auto array = readers_.serialize(sharing);
  if (array == last_array_) return;
  last_array_ = std::move(array);
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
  send(c, wire::bytes_of(wire::WaitReaderStateChange{0, rv}));
}

}  // namespace cardbridge::shim
