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
// The card image (docs/performance.md, "The card image"): the core learns, from what
// programs send, which SELECTs and public files a login of each card type uses (ImageStore,
// shared by the desk's links), and while a reader's card sits unused it reads them on a lane
// of its own (Imager), in short transactions; a program's request for that reader makes it
// yield at once. The image goes to the server with the reply to a Connect that asks for it
// (request flag kWantImage), never before; a Transmit may carry a prelude (the SELECTs that
// put the card back into the state the program's view of it expects).
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
#include "cardbridge/desk_core/image_store.hpp"
#include "cardbridge/desk_core/imager.hpp"
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
  // The card image (on by default; off: the desk never reads a card on its own and sends no
  // image). |images| is shared by the desk's links (nullptr: this core keeps its own).
  bool card_image = true;
  std::shared_ptr<ImageStore> images;
  // Imaging starts once a reader's card has been left alone this long by the server's programs.
  std::chrono::milliseconds image_idle_delay{1000};
  // An image older than this has its card's update marker read again before it is sent.
  std::chrono::milliseconds image_recheck_after{60000};
  ImagerSettings imager;
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
  uint64_t image_passes = 0;       // imaging passes started
  uint64_t image_apdus = 0;        // APDUs the imaging sent to cards
  uint64_t images_sent = 0;        // card images sent with a Connect reply
  uint64_t images_voided = 0;      // images given up (a write, the update marker, another card)
  uint64_t prelude_commands = 0;   // prelude commands sent before a program's command
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
  std::optional<TimePoint> next_deadline() const;
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
  bool idle() const { return lanes_.empty() && imaging_.empty(); }

  // ---- introspection ----
  bool session_established() const { return link_.established(); }
  const std::string& server_name() const { return server_name_; }
  const DeskStats& stats() const { return stats_; }
  const protocol::ReaderSnapshot& current_readers() const { return snapshot_; }
  std::size_t lane_count() const { return lanes_.size(); }
  std::size_t handle_count() const { return handles_.size(); }
  // The card image of |reader|'s card (protocol::image_state), and whether it is being read.
  uint32_t image_state(const std::string& reader) const;
  bool imaging(const std::string& reader) const { return imaging_.contains(reader); }
  ImageStore& image_store() const { return *images_; }

 private:
  struct Task;
  struct Lane;
  struct Imaging;
  struct CardWatch;

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
  const std::string* reader_of(const protocol::Request& r) const;

  // ---- the card image (desk_core.cpp, "card image") ----
  // The snapshot with image states; pushed when it changed (or when the desk's service status did).
  void publish_readers(bool service_changed = false);
  void touch(const std::string& reader);  // a program's request for |reader|: imaging yields
  bool session_busy(const std::string& reader) const;
  void publish_busy();  // session_busy() of every reader, for the other links' imaging
  void consider_imaging();                // starts imaging where a card sits unused
  void pump_imaging(Imaging& im);
  void imaging_call_done(Imaging& im, CallResult r);
  void finish_imaging(const std::string& reader);
  void void_image(const std::string& reader, const char* why);
  // Program traffic: what the core learns and watches (|program|: the program sent it).
  void observe_card(const std::string& reader, std::span<const uint8_t> command, const CallResult& r, bool program);
  void card_reset_seen(const std::string& reader);
  const protocol::ReaderInfo* reader_info(const std::string& reader) const;
  // Connect with kWantImage: attach the image, after reading the update marker again when
  // the image is old (Task steps kImageCheck).
  bool start_image_check(Lane& lane, Task& task);
  void attach_image(Task& task);

  DeskEffects& fx_;
  DeskConfig config_;
  protocol::LinkSession link_;
  std::string server_name_;
  bool shutting_down_ = false;
  protocol::ReaderSnapshot snapshot_;     // as pushed (with the image states)
  std::vector<protocol::ReaderInfo> monitor_readers_;  // as the reader monitor reported them
  std::map<LaneId, std::unique_ptr<Lane>> lanes_;
  std::map<uint32_t, LaneId> by_context_;  // the session's server context id -> lane
  LaneId next_lane_ = 1;
  struct HandleEntry {
    LaneId lane = 0;
    ScardHandle card = 0;
    std::string reader;
    // The reader's answer to CM_IOCTL_GET_FEATURE_REQUEST, once asked (policy: PIN-pad codes).
    std::optional<std::vector<ReaderFeature>> features;
  };
  std::map<uint32_t, HandleEntry> handles_;  // desk handle id -> PC/SC handle
  uint32_t next_handle_ = 1;
  std::set<uint32_t> unfinished_;  // this session's requests not answered yet (desk ordering)
  TimePoint now_{};
  DeskStats stats_;
  // The card image.
  std::shared_ptr<ImageStore> images_;
  std::map<std::string, std::unique_ptr<Imaging>> imaging_;  // reader -> the pass under way
  std::map<LaneId, std::string> imaging_lanes_;
  struct Schedule {
    TimePoint not_before{};   // idle delay after the last program request, or back-off
    std::chrono::milliseconds backoff{0};
    bool wait_for_change = false;  // busy (a desk program holds the card): until its state changes
  };
  std::map<std::string, Schedule> schedule_;
  std::optional<TimePoint> imaging_wake_;  // the earliest time consider_imaging() has work
  std::map<std::string, std::unique_ptr<CardWatch>> watches_;  // reader -> what programs did to its card
};

}  // namespace cardbridge::client
