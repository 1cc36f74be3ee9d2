#include "cardbridge/protocol/link_session.hpp"

#include <fmt/format.h>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/log.hpp"

namespace cardbridge::protocol {

namespace {
log::Channel logger{"cardbridge.link"};

const char* role_name(Role r) {
  switch (r) {
    case Role::kDesk: return "desk";
    case Role::kServer: return "server";
    case Role::kUnspecified: break;
  }
  return "unspecified";
}
}  // namespace

LinkSession::LinkSession(Handler& handler, LinkSettings settings)
    : handler_(handler), settings_(std::move(settings)), frames_(settings_.max_frame) {
  rng_.seed(settings_.random_seed != 0 ? settings_.random_seed
                                       : (uint64_t{std::random_device{}()} << 32) | std::random_device{}());
}

// ---- transport -------------------------------------------------------------------------

void LinkSession::transport_up(TimePoint now, PeerIdentity peer) {
  if (established()) end_session("the link was re-established", now);
  transport_up_ = true;
  failed_ = false;
  if (auto why = settings_.peer_policy.refusal(peer)) {
    // Not one byte for an unauthorised peer (our hello included).
    logger->error("refusing the {} link with {}: {}", role_name(peer_role()), peer.describe(), *why);
    failed_ = true;
    hello_due_.reset();
    handler_.link_close("unauthorised peer: " + *why);
    return;
  }
  transport_peer_ = std::move(peer);
  frames_ = FrameDecoder(settings_.max_frame);
  outstanding_.clear();
  busy_since_.reset();
  liveness_probe_.reset();
  last_heard_ = now;
  local_instance_ = rng_();
  if (local_instance_ == 0) local_instance_ = 1;
  send_hello(false);
  hello_due_ = now + settings_.hello_retry;
}

void LinkSession::transport_down(TimePoint now) {
  transport_up_ = false;
  hello_due_.reset();
  end_session("link closed", now);
}

void LinkSession::receive(std::span<const uint8_t> bytes, TimePoint now) {
  if (!transport_up_ || failed_) return;
  stats_.bytes_in += bytes.size();
  last_heard_ = now;
  if (!frames_.feed(bytes)) {
    // Frames completed before the bad header are still served: they were well formed.
    while (auto f = frames_.next()) {
      if (failed_) return;
      auto m = decode(*f);
      if (!m) return malformed(m.error().what, now);
      on_message(std::move(*m), now);
    }
    if (!failed_) protocol_error(fmt::format("bad frame ({})", to_string(*frames_.error())), now);
    return;
  }
  while (auto f = frames_.next()) {
    auto m = decode(*f);
    if (!m) return malformed(m.error().what, now);
    on_message(std::move(*m), now);
    if (failed_ || !transport_up_) return;  // the handler may have closed the link
  }
}

// ---- time -------------------------------------------------------------------------------

std::optional<TimePoint> LinkSession::liveness_deadline() const {
  if (!established() || outstanding_.empty() || settings_.liveness_after.count() == 0) return std::nullopt;
  if (liveness_probe_) return liveness_sent_ + settings_.liveness_timeout;
  const TimePoint since = std::max(last_heard_, busy_since_.value_or(last_heard_));
  return since + settings_.liveness_after;
}

std::optional<TimePoint> LinkSession::next_deadline() const {
  if (transport_up_ && !established() && !failed_) return hello_due_;
  return liveness_deadline();
}

void LinkSession::tick(TimePoint now) {
  if (auto due = liveness_deadline(); due && now >= *due) {
    if (liveness_probe_) {
      logger->warn("{} '{}' does not answer (no reply to a ping in {} ms with requests outstanding)",
                   role_name(peer_role()), log::printable(peer_->name), settings_.liveness_timeout.count());
      return protocol_error("the peer does not answer", now);
    }
    liveness_sent_ = now;
    liveness_probe_ = send_ping(now, [this](bool) { liveness_probe_.reset(); });
  }
  if (transport_up_ && !established() && !failed_ && hello_due_ && now >= *hello_due_) {
    send_hello(false);
    hello_due_ = now + settings_.hello_retry;
  }
}

// ---- sending ----------------------------------------------------------------------------

void LinkSession::send(const Message& m) {
  if (!transport_up_ || failed_) return;
  if (logger->should_log(spdlog::level::trace)) logger->trace("-> {}", describe(m));
  auto frame = encode_frame(m);
  stats_.bytes_out += frame.size();
  handler_.link_send(std::move(frame));
}

void LinkSession::send_hello(bool reply) {
  Hello h = local_hello(settings_.role, settings_.capabilities);
  h.software = settings_.software;
  h.peer_name = settings_.name;
  h.instance = local_instance_;
  h.reply = reply;
  send(Message{0, std::move(h)});
}

uint32_t LinkSession::next_id() {
  for (;;) {
    const uint32_t id = next_id_++;
    if (next_id_ == 0) next_id_ = 1;
    if (!outstanding_.contains(id)) return id;
  }
}

uint32_t LinkSession::request(Request r, TimePoint now) {
  if (!established()) return 0;
  const uint32_t id = next_id();
  if (outstanding_.empty()) busy_since_ = now;
  outstanding_.emplace(id, nullptr);
  ++stats_.requests;
  send(Message{id, std::move(r)});
  return id;
}

void LinkSession::reply(uint32_t id, const Reply& r) {
  if (!established()) return;
  send(Message{id, r});
}

void LinkSession::snapshot(const ReaderSnapshot& s) {
  if (!established()) return;
  send(Message{0, s});
}

void LinkSession::ping(TimePoint now, std::function<void(bool)> done) {
  if (!established()) {
    if (done) done(false);
    return;
  }
  send_ping(now, std::move(done));
}

uint32_t LinkSession::send_ping(TimePoint now, std::function<void(bool)> done) {
  Request q;
  q.op = Op::kPing;
  const uint32_t id = next_id();
  if (outstanding_.empty()) busy_since_ = now;
  outstanding_.emplace(id, done ? std::move(done) : [](bool) {});
  send(Message{id, std::move(q)});
  return id;
}

void LinkSession::fail(const std::string& reason, TimePoint now) { protocol_error(reason, now); }

// ---- receiving --------------------------------------------------------------------------

void LinkSession::on_message(Message&& m, TimePoint now) {
  if (logger->should_log(spdlog::level::trace)) logger->trace("<- {}", describe(m));
  if (auto* h = std::get_if<Hello>(&m.body)) return on_hello(*h, now);
  if (auto* e = std::get_if<Error>(&m.body)) {
    logger->error("peer reports error {}: {}", static_cast<uint32_t>(e->code), log::printable(e->message));
    return;
  }
  const bool desk = settings_.role == Role::kDesk;
  const bool expected = desk ? std::holds_alternative<Request>(m.body)
                             : std::holds_alternative<Reply>(m.body) || std::holds_alternative<ReaderSnapshot>(m.body);
  if (!expected) return protocol_error(fmt::format("unexpected message: {}", describe(m)), now);
  if (!established()) {
    logger->warn("{} before the hello exchange; ignored", describe(m));
    return;
  }
  if (auto* q = std::get_if<Request>(&m.body)) {
    ++stats_.requests;
    return handler_.received_request(m.id, std::move(*q), now);
  }
  if (auto* r = std::get_if<Reply>(&m.body)) return on_reply(m.id, std::move(*r), now);
  if (auto* s = std::get_if<ReaderSnapshot>(&m.body)) return handler_.received_snapshot(std::move(*s), now);
}

void LinkSession::on_hello(const Hello& h, TimePoint now) {
  const Role expected = peer_role();
  if (h.role != expected) {
    return protocol_error(
        fmt::format("peer is not a CardBridge {} (role {})", role_name(expected), role_name(h.role)), now);
  }
  Hello ours = local_hello(settings_.role, settings_.capabilities);
  auto n = negotiate(ours, h);
  if (!n) {
    logger->error("{} speaks protocol {}.{}, we speak {}.{}", role_name(expected), h.version_major, h.version_minor,
                  kVersionMajor, kVersionMinor);
    send(Message{0, Error{ErrorCode::kVersion, "unsupported protocol version"}});
    return protocol_error("version mismatch", now);
  }
  if (!h.reply) send_hello(true);
  if (established() && h.instance == peer_->instance) return;  // a repeated hello
  if (established()) end_session("the peer started a new session", now);
  hello_due_.reset();
  PeerSession p;
  p.generation = ++generation_;
  p.verified = transport_peer_;
  p.name = h.peer_name;
  p.software = h.software;
  p.instance = h.instance;
  p.minor = n->minor;
  p.capabilities = n->capabilities;
  peer_ = std::move(p);
  ++stats_.sessions;
  logger->info("{} '{}' ({}) connected, protocol {}.{}, capabilities {}; verified: {} (the name is declared)",
               role_name(expected), log::printable(peer_->name), log::printable(peer_->software), kVersionMajor,
               peer_->minor, capabilities_text(peer_->capabilities), peer_->verified.describe());
  handler_.session_started(*peer_, now);
}

void LinkSession::on_reply(uint32_t id, Reply&& r, TimePoint now) {
  auto it = outstanding_.find(id);
  if (it == outstanding_.end()) {
    logger->debug("reply #{} answers no outstanding request; ignored", id);
    return;
  }
  auto probe = std::move(it->second);
  outstanding_.erase(it);
  if (outstanding_.empty()) busy_since_.reset();
  if (probe) return probe(true);
  handler_.received_reply(id, std::move(r), now);
}

void LinkSession::end_session(const std::string& reason, TimePoint now) {
  auto probes = std::move(outstanding_);
  outstanding_.clear();
  busy_since_.reset();
  liveness_probe_.reset();
  const bool was = established();
  peer_.reset();
  for (auto& [id, done] : probes) {
    if (done) done(false);
  }
  if (was) handler_.session_ended(reason, now);
}

void LinkSession::malformed(const std::string& what, TimePoint now) {
  protocol_error(fmt::format("malformed message from the {} ({})", role_name(peer_role()), what), now);
}

void LinkSession::protocol_error(const std::string& reason, TimePoint now) {
  if (failed_) return;
  logger->error("{} link: {}; closing it", role_name(peer_role()), reason);
  failed_ = true;
  hello_due_.reset();
  end_session(reason, now);
  handler_.link_close(reason);
}

}  // namespace cardbridge::protocol
