// LinkSession: one end of the desk <-> server link, sans I/O. Both ends use it: the desk
// engine (role desk) and the shim (role server).
//
// It owns everything about the link that is not PC/SC: framing in both directions, the
// hello exchange and version/capability negotiation, the peer's instance and the session
// generation, request ids, outstanding requests and ping probes, and liveness. It never
// reads a clock (time is passed in), opens a socket or starts a thread: the transport
// feeds it bytes and link events, calls tick() at next_deadline(), and carries out what
// it asks through LinkSession::Handler.
//
// Hello exchange (docs/protocol.md): each end says hello when its transport comes up and
// again every |hello_retry| until it hears the peer's (some channels drop what is sent
// before the far end opened: xrdp, FreeRDP static channels); a hello that is not itself a
// reply is answered with a reply hello. A session starts when a hello of the expected role
// and a compatible version arrives; the same instance again is a repeat; another instance
// ends the session and starts a new one (the peer restarted, or the user roamed).
//
// Protocol errors (a bad frame, an undecodable message, the wrong role, a message kind
// this role never receives) end the session and ask the handler to close the transport;
// after that nothing more is decoded until transport_up().
//
// Threading: one thread at a time (the caller's); callbacks run synchronously inside the
// call that caused them, and may call back into the session.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "cardbridge/protocol/framing.hpp"
#include "cardbridge/protocol/messages.hpp"
#include "cardbridge/support/peer.hpp"

namespace cardbridge::protocol {

using TimePoint = std::chrono::steady_clock::time_point;

struct LinkSettings {
  Role role = Role::kUnspecified;  // ours
  uint64_t capabilities = 0;       // offered; the session uses the intersection
  std::string software;            // "cardbridge-shim 0.1.0"
  std::string name;                // our name as the peer shows it (host or desk name)
  std::chrono::milliseconds hello_retry{500};
  // Liveness, only while requests are outstanding (an idle link carries nothing): after
  // |liveness_after| without a byte from the peer, a Ping; no answer within
  // |liveness_timeout| and the session is lost. Zero: off (the desk relies on its transport).
  std::chrono::milliseconds liveness_after{0};
  std::chrono::milliseconds liveness_timeout{0};
  std::size_t max_frame = kDefaultMaxFrame;
  uint64_t random_seed = 0;  // for instance numbers; 0: std::random_device
  // Who may be at the other end (checked at transport_up(), before our first byte).
  PeerPolicy peer_policy;
};

// The peer of an established session: who the transport verified it is, what its hello
// declared (name and software are declarations, not identities), and what was negotiated.
struct PeerSession {
  uint64_t generation = 0;  // 1 for the first session of this LinkSession, +1 for each next
  PeerIdentity verified;
  std::string name;
  std::string software;
  uint64_t instance = 0;
  uint32_t minor = 0;
  uint64_t capabilities = 0;  // negotiated
};

struct LinkStats {
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;
  uint64_t requests = 0;   // requests sent (server) or received (desk)
  uint64_t sessions = 0;   // sessions started
};

class LinkSession {
 public:
  class Handler {
   public:
    virtual ~Handler() = default;
    // Bytes (whole frames) for the transport.
    virtual void link_send(std::vector<uint8_t> bytes) = 0;
    // The transport must be closed (the desk agent) or reset and reopened (the shim).
    virtual void link_close(const std::string& reason) = 0;
    virtual void session_started(const PeerSession& peer, TimePoint now) = 0;
    // The established session is over: every outstanding request is void.
    virtual void session_ended(const std::string& reason, TimePoint now) = 0;
    // Messages of the established session. A desk receives requests; a server receives
    // replies and snapshots (the other kinds are protocol errors and never arrive here).
    virtual void received_request(uint32_t /*id*/, Request&& /*r*/, TimePoint /*now*/) {}
    virtual void received_reply(uint32_t /*id*/, Reply&& /*r*/, TimePoint /*now*/) {}
    virtual void received_snapshot(ReaderSnapshot&& /*s*/, TimePoint /*now*/) {}
  };

  LinkSession(Handler& handler, LinkSettings settings);
  LinkSession(const LinkSession&) = delete;
  LinkSession& operator=(const LinkSession&) = delete;

  // ---- transport events ----
  // A new connection, whose other end the transport identified as |peer|: if the policy
  // allows it, our hello (new instance); if not, nothing is sent and the handler is asked
  // to close the connection (link_close) with the reason.
  void transport_up(TimePoint now, PeerIdentity peer);
  void transport_down(TimePoint now);  // the connection is gone
  void receive(std::span<const uint8_t> bytes, TimePoint now);
  // ---- time ----
  std::optional<TimePoint> next_deadline() const;
  void tick(TimePoint now);

  // ---- sending (established sessions only) ----
  // Sends |r| with a fresh id and keeps it outstanding until its reply; 0 when there is no
  // session (nothing sent).
  uint32_t request(Request r, TimePoint now);
  void reply(uint32_t id, const Reply& r);      // desk
  void snapshot(const ReaderSnapshot& s);       // desk
  // A Ping; |done| runs with true when its reply arrives, with false when the session ends
  // first (also at once when there is none).
  void ping(TimePoint now, std::function<void(bool)> done);
  // A protocol error of the peer that the application found (e.g. a reply that makes no
  // sense): ends the session and closes the transport.
  void fail(const std::string& reason, TimePoint now);

  // ---- state ----
  bool transport_is_up() const { return transport_up_; }
  bool established() const { return peer_.has_value(); }
  // Valid while established().
  const PeerSession& peer() const { return *peer_; }
  uint64_t generation() const { return generation_; }
  bool uses(uint64_t capability) const { return peer_ && (peer_->capabilities & capability) != 0; }
  bool awaiting_replies() const { return !outstanding_.empty(); }
  const LinkStats& stats() const { return stats_; }
  const LinkSettings& settings() const { return settings_; }

 private:
  void send(const Message& m);
  void send_hello(bool reply);
  void on_message(Message&& m, TimePoint now);
  void on_hello(const Hello& h, TimePoint now);
  void on_reply(uint32_t id, Reply&& r, TimePoint now);
  void end_session(const std::string& reason, TimePoint now);
  void protocol_error(const std::string& reason, TimePoint now);
  void malformed(const std::string& what, TimePoint now);
  uint32_t next_id();
  Role peer_role() const { return settings_.role == Role::kDesk ? Role::kServer : Role::kDesk; }
  uint32_t send_ping(TimePoint now, std::function<void(bool)> done);
  std::optional<TimePoint> liveness_deadline() const;

  Handler& handler_;
  LinkSettings settings_;
  std::mt19937_64 rng_;
  FrameDecoder frames_;
  bool transport_up_ = false;
  bool failed_ = false;  // a protocol error closed this connection: ignore its bytes
  PeerIdentity transport_peer_;
  uint64_t local_instance_ = 0;
  std::optional<TimePoint> hello_due_;
  std::optional<PeerSession> peer_;
  uint64_t generation_ = 0;
  uint32_t next_id_ = 1;
  // Outstanding requests: id -> probe callback (empty for ordinary requests).
  std::map<uint32_t, std::function<void(bool)>> outstanding_;
  TimePoint last_heard_{};
  std::optional<TimePoint> busy_since_;    // the first request sent while none was outstanding
  std::optional<uint32_t> liveness_probe_;
  TimePoint liveness_sent_{};
  LinkStats stats_;
};

}  // namespace cardbridge::protocol
