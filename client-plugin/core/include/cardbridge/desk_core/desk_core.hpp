// DeskCore: the desk side of CardBridge, sans I/O.
//
// It serves one server link: the link session (protocol::LinkSession, role desk), the
// server's contexts and the desk's card handles, the desk's policy, the order of requests
// and the speculation that answers a program's next commands ahead. It makes no PC/SC call
// itself: it asks its edge to make them (DeskEffects::execute) on *lanes*, one per server
// context, each with a PC/SC context of its own, and is told the result (call_done).
// A lane runs one call at a time, in order, so a blocking call (a Connect pcscd makes wait
// behind another program's transaction) holds up only its own context; lanes run in
// parallel. Reader state comes from the edge's reader monitor (readers()).
//
// Threading: none. The edge serialises every call into the core (one mutex); effects are
// called synchronously from inside those calls. Time is passed in.
//
// Life of a request: received -> queued on its context's lane -> waits for the earlier
// requests it names (desk ordering) -> one or more PC/SC calls (a deferred Begin, the
// operation, a Status after a Connect, speculative Transmits) -> one reply. Pings are
// answered at once, whatever the lanes are doing (the server's liveness check).
//
// Shutdown: shutdown() releases every context once the calls in flight return; idle() is
// true when no lane is left.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "cardbridge/protocol/link_session.hpp"
#include "cardbridge/protocol/messages.hpp"
#include "cardbridge/desk_core/desk_audit.hpp"
#include "cardbridge/desk_core/pcsc_call.hpp"
#include "cardbridge/desk_core/policy.hpp"
#include "cardbridge/desk_core/speculation.hpp"

namespace cardbridge::client {

using TimePoint = protocol::TimePoint;
using LaneId = uint64_t;  // the core's id for a lane (never reused)

struct DeskConfig {
  std::string desk_name;   // shown to the server (doctor, audit): the thin client's name
  std::string software = "cardbridge-desk";
  // For the audit trail: how servers reach this desk ("rdp static channel", "tls:0.0.0.0:4433").
  std::string link;
  uint64_t capabilities = 0;
  Policy policy;
  std::chrono::milliseconds hello_retry{500};
  // PC/SC contexts this link may hold at the desk (each is one of the desk pcscd's
  // contexts). A request for one more context is answered SCARD_E_NO_MEMORY.
  std::size_t max_contexts = 64;
  uint64_t random_seed = 0;  // hello instances; 0: std::random_device
  // Who may be the server (docs/security.md): the agent's UNIX peers (its own user, root),
  // the allowed TLS servers, the RDP channel for the add-in; plain TCP only when the admin
  // says so.
  PeerPolicy server_policy;
};

// What the core asks of its edge. Called synchronously from the core's methods.
class DeskEffects {
 public:
  virtual ~DeskEffects() = default;
  virtual void send(std::vector<uint8_t> bytes) = 0;             // whole frames, to the server
  virtual void close_link(const std::string& reason) = 0;        // protocol error: drop the link
  // Make |c| on lane |lane| and report with call_done(lane, ...). A lane has at most one
  // call in flight; calls of one lane are made in the order asked.
  virtual void execute(LaneId lane, PcscCall c) = 0;
  // Lane |lane| will never be asked for a call again (its PC/SC context is released).
  virtual void lane_closed(LaneId lane) = 0;
  // An audit event (desk_audit.hpp).
  virtual void audit(const DeskAudit& event) { (void)event; }
};

struct DeskStats {
  uint64_t requests = 0;
  uint64_t snapshots_sent = 0;
  uint64_t sessions = 0;
  uint64_t calls = 0;              // PC/SC calls asked of the edge
  uint64_t speculative_calls = 0;  // of which speculative Transmits
  uint64_t refused_contexts = 0;   // requests refused at max_contexts
};

class DeskCore : private protocol::LinkSession::Handler {
 public:
  DeskCore(DeskEffects& effects, DeskConfig config);
  ~DeskCore() override;
  DeskCore(const DeskCore&) = delete;
  DeskCore& operator=(const DeskCore&) = delete;

  // ---- the server link ----
  // The transport is up, to a server it identified as |peer|: hello if the policy allows
  // it, else the link is closed without a byte sent.
  void transport_up(TimePoint now, PeerIdentity peer);
  void transport_down(TimePoint now);
  void receive(std::span<const uint8_t> bytes, TimePoint now);
  std::optional<TimePoint> next_deadline() const { return link_.next_deadline(); }
  void tick(TimePoint now);

  // ---- the edge ----
  void call_done(LaneId lane, CallResult result, TimePoint now);
  // The reader monitor's view (already filtered by the policy), whenever it may have
  // changed; pushed to the server when it did. |service_rv|: 0 while the desk's PC/SC
  // service answers, else the error it fails with (then no reader); the server hears it
  // when it has the desk-service capability.
  void readers(std::vector<protocol::ReaderInfo> readers, TimePoint now, uint32_t service_rv = 0);
  // Ends the server session and releases every context; idle() once all lanes are gone.
  void shutdown(TimePoint now);
  bool idle() const { return lanes_.empty(); }

  // ---- introspection ----
  bool session_established() const { return link_.established(); }
  const std::string& server_name() const { return server_name_; }
  const DeskStats& stats() const { return stats_; }
  const protocol::ReaderSnapshot& current_readers() const { return snapshot_; }
  std::size_t lane_count() const { return lanes_.size(); }
  std::size_t handle_count() const { return handles_.size(); }

 private:
  struct Task;
  struct Lane;

  // LinkSession::Handler
  void link_send(std::vector<uint8_t> bytes) override;
  void link_close(const std::string& reason) override;
  void session_started(const protocol::PeerSession& peer, TimePoint now) override;
  void session_ended(const std::string& reason, TimePoint now) override;
  void received_request(uint32_t id, protocol::Request&& r, TimePoint now) override;

  void send_snapshot();
  Lane* lane_for(const protocol::Request& r, uint32_t id);
  void retire_all();
  void retire(Lane& lane);
  void pump(Lane& lane);                 // starts the lane's next task if it can
  void start(Lane& lane, Task& task);    // the task's first call
  void advance(Lane& lane, Task& task, CallResult r);  // the task's next step
  void execute(Lane& lane, PcscCall c);
  void finish(Lane& lane, protocol::Reply reply);  // replies, ends the task, pumps
  void audit_control_refused(uint32_t code);
  void close_lane(Lane& lane);
  bool ordered(const Task& task) const;  // the requests it waits for are done
  void task_done(uint32_t id);
  bool speculate(Lane& lane, Task& task, const CallResult* last);  // true: a call is under way
  std::optional<ScardHandle> card_of(const Lane& lane, protocol::DeskHandle h) const;

  DeskEffects& fx_;
  DeskConfig config_;
  protocol::LinkSession link_;
  std::string server_name_;
  bool shutting_down_ = false;
  protocol::ReaderSnapshot snapshot_;
  std::map<LaneId, std::unique_ptr<Lane>> lanes_;
  std::map<uint32_t, LaneId> by_context_;  // the session's server context id -> lane
  LaneId next_lane_ = 1;
  struct HandleEntry {
    LaneId lane = 0;
    ScardHandle card = 0;
    // The reader's answer to CM_IOCTL_GET_FEATURE_REQUEST, once asked (policy: PIN-pad codes).
    std::optional<std::vector<ReaderFeature>> features;
  };
  std::map<uint32_t, HandleEntry> handles_;  // desk handle id -> PC/SC handle
  uint32_t next_handle_ = 1;
  std::set<uint32_t> unfinished_;  // this session's requests not answered yet (desk ordering)
  TimePoint now_{};
  DeskStats stats_;
};

}  // namespace cardbridge::client
