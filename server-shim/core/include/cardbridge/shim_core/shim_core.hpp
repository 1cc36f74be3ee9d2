// ShimCore: the pcscd impersonation, sans I/O.
//
// It consumes events (a client connected / sent bytes / went away; the desk link came
// up / delivered bytes / went down; time passed) and produces effects through ShimEffects
// (bytes to a client, close a client, bytes to the desk). Every entry point is given the
// time; the core never reads a clock. One thread calls it (the shim's io_context thread);
// it has no locks and never blocks.
//
// What it answers locally, from the state the desk pushes (no desk round trip): version
// handshake, establish/release context, the reader-state array (ListReaders, Status), the
// event wait and its stop, cancel, reader events. What touches the card is forwarded:
// connect, reconnect, disconnect, transactions, transmit, control, get/set attribute.
// Semantics follow pcscd 1.9.9 (docs/pcsc-lite-wire.md).
//
// Where the pieces live:
//  * shim_core.cpp      clients, contexts, the reader-state array and its waiters, the
//                       desk session (through protocol::LinkSession), desk calls;
//  * card_calls.cpp     the card operations: what pcscd would refuse locally, what goes
//                       to the desk, and what the answer does to the handles;
//  * handle_table.*     handles and pcscd's lock / reset / removal rules;
//  * prefetch.*         serving the desk's speculative answers;
//  * pcscd_wire/        the client protocol and its reply builders.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <variant>
#include <vector>

#include "cardbridge/protocol/link_session.hpp"
#include "cardbridge/protocol/messages.hpp"
#include "cardbridge/shim_core/handle_table.hpp"
#include "cardbridge/shim_core/reader_table.hpp"
#include "cardbridge/shim_core/virtual_card.hpp"
#include "cardbridge/pcscd_wire/wire.hpp"

namespace cardbridge::shim {

using Clock = std::chrono::steady_clock;
using TimePoint = Clock::time_point;

// One audit event of the core: what happened at the desk or to a card. The I/O layer adds
// who and where (user, session, program pid and executable) and records it (journald).
struct AuditRecord {
  enum class Kind : uint8_t {
    kDeskConnected,     // desk_name (declared), desk_software, desk_identity (verified)
    kDeskDisconnected,  // desk_name, desk_identity, reason
    kReaderAdded,       // reader, card_present, atr
    kReaderRemoved,     // reader
    kCardInserted,      // reader, atr
    kCardRemoved,       // reader
    kCardConnected,     // reader, atr, share_mode (a program connected to the card)
  };
  Kind kind = Kind::kDeskConnected;
  std::string reader;          // as the desk named it (peer text: make it printable to show it)
  std::vector<uint8_t> atr;
  std::string desk_name;       // peer text
  std::string desk_software;   // peer text
  std::string desk_identity;   // what the transport verified (a uid, a certificate, an RDP channel)
  std::string reason;
  uint32_t share_mode = 0;
  bool card_present = false;

  // "card-connected", "desk-connected", ...
  const char* event_name() const;
  // The share mode's name ("shared", "exclusive", "direct").
  const char* share_text() const;
  // One line for people: "card connected: reader='...' atr=... share=shared".
  std::string text() const;
};

// Implemented by the I/O layer. Calls happen synchronously from ShimCore methods.
class ShimEffects {
 public:
  virtual ~ShimEffects() = default;
  virtual void send_to_client(ClientId id, std::vector<uint8_t> bytes) = 0;
  // The core has forgotten the client; the I/O layer closes the socket.
  virtual void close_client(ClientId id) = 0;
  // Whole frames for the desk link.
  virtual void send_to_desk(std::vector<uint8_t> bytes) = 0;
  // The desk link is unusable (protocol error, silent desk); the I/O layer drops and
  // re-establishes it.
  virtual void reset_desk_link(const std::string& reason) = 0;
  // Audit trail (security officers): which desk, reader and card (ATR only) were used and
  // when. Never APDU contents. |client| is 0 for events that concern no client.
  virtual void audit(ClientId client, const std::string& event) { (void)client; (void)event; }
  // The same event with its parts; by default, its text goes to audit().
  virtual void audit_record(ClientId client, const AuditRecord& record) { audit(client, record.text()); }
};

// Round-trip savings, each switchable (docs/performance.md). Every one keeps what a
// program observes identical to a local pcscd; the ones marked (desk) also need the
// desk's capability.
struct Optimizations {
  // EndTransaction and Disconnect are answered at once and sent without waiting, when
  // the shim can predict their success (no pending removal/reset, valid disposition).
  bool pipeline = false;
  // (desk) BeginTransaction is answered at once and carried by the handle's next card
  // operation; a failure surfaces on that operation.
  bool defer_begin = false;
  // (desk) After a 61xx the desk fetches the GET RESPONSE at once; served if the program
  // asks for exactly that command next.
  bool prefetch_get_response = false;
  // (desk) Inside a transaction, READ BINARY (and SELECT of a sized EF) is followed by
  // read-ahead up to the file size; served only for exactly the predicted commands.
  bool read_ahead = false;
  // Static reader attributes (vendor, IFD version, names, ATR) are answered from a
  // per-reader cache after the first fetch.
  bool cache_attributes = false;
  // (desk) The card image: the first Connect to a card asks the desk for the image of its
  // public files; SELECT, READ BINARY and GET RESPONSE are answered from it (VirtualCard).
  bool card_image = false;

  static Optimizations all() { return {true, true, true, true, true, true}; }
  // "pipeline,defer-begin,..." -> switched off; error text on an unknown name.
  std::string disable(std::string_view names);
};

struct ShimConfig {
  std::string server_name;  // sent in Hello
  // Capabilities the shim offers; the desk's answer decides what is used.
  uint64_t capabilities = 0;
  Optimizations optimizations;  // default: none
  // Baseline mode ("peers' behaviour"): every PC/SC call costs a desk round trip.
  bool one_round_trip_per_call = false;
  uint32_t random_seed = 0;  // 0: from std::random_device
  std::chrono::milliseconds hello_retry{500};
  // Liveness, only while requests are outstanding (an idle link carries nothing): after
  // |liveness_after| without a byte from the desk, a Ping; no answer within
  // |liveness_timeout| and the desk counts as lost (a network cut or a suspended client
  // keeps the transport open, and a PC/SC call would otherwise wait forever). The desk
  // answers pings at once, whatever its card operations are doing, so a slow card op
  // does not trip it.
  std::chrono::milliseconds liveness_after{5000};
  std::chrono::milliseconds liveness_timeout{5000};
  // Who may be the desk (docs/security.md): the UNIX peers (the session's user, root), the
  // pinned TLS desk, the session's RDP channel; plain TCP only when the admin says so.
  PeerPolicy desk_policy;
};

struct ShimStats {
  uint64_t client_connections = 0;
  uint64_t client_requests = 0;   // pcsc-lite requests served
  uint64_t desk_requests = 0;     // requests sent to the desk
  uint64_t round_trips = 0;       // desk requests a client call waited for
  uint64_t pipelined = 0;         // desk requests nobody waited for
  uint64_t deferred_begins = 0;
  uint64_t prefetch_hits = 0;     // transmits answered from prefetched responses
  uint64_t prefetch_discarded = 0;
  uint64_t attribute_cache_hits = 0;
  uint64_t local_answers = 0;     // card calls answered from pushed state (Connect to an empty reader)
  uint64_t image_answers = 0;     // transmits answered from the card image
  uint64_t image_preludes = 0;    // transmits sent with a prelude (the card put back in the program's state)
  uint64_t images_received = 0;   // card images the desk sent
  uint64_t images_dropped = 0;    // card images given up (write, desk voided it, prelude mismatch)
  uint64_t protocol_errors = 0;   // client connections closed for malformed input
  uint64_t desk_sessions = 0;     // desk hellos accepted
  uint64_t desk_bytes_in = 0;
  uint64_t desk_bytes_out = 0;
};

class ShimCore : private protocol::LinkSession::Handler {
 public:
  ShimCore(ShimEffects& effects, ShimConfig config);
  ~ShimCore() override;
  ShimCore(const ShimCore&) = delete;
  ShimCore& operator=(const ShimCore&) = delete;

  // ---- client side (pcsc-lite protocol) ----
  void client_opened(ClientId id, TimePoint now);
  void client_data(ClientId id, std::span<const uint8_t> bytes, TimePoint now);
  void client_closed(ClientId id, TimePoint now);

  // ---- desk side ----
  // Transport up, to a desk the transport identified as |peer|: we say hello if
  // ShimConfig::desk_policy allows it, else the link is reset without a byte sent.
  void desk_connected(TimePoint now, PeerIdentity peer);
  void desk_bytes(std::span<const uint8_t> bytes, TimePoint now);
  void desk_disconnected(TimePoint now);  // transport down
  // Timers: call tick() at or after next_deadline().
  std::optional<TimePoint> next_deadline() const { return link_.next_deadline(); }
  void tick(TimePoint now);

  // Sends a Ping to the desk; |done| runs with true when the answer arrives, with false
  // when the desk is or goes away. For latency probes (control socket, doctor).
  void ping_desk(TimePoint now, std::function<void(bool)> done);

  // ---- introspection (status, doctor, tests) ----
  bool desk_up() const { return link_.established(); }
  // The desk of the current session, or of the last one (as its hello declared it).
  const std::string& desk_name() const { return desk_.name; }
  const std::string& desk_software() const { return desk_.software; }
  // 0 while the desk's PC/SC service answers (or the desk does not say: no desk-service
  // capability), else the error the desk's own pcscd fails with (SCARD_E_NO_SERVICE).
  uint32_t desk_service_rv() const { return desk_up() ? desk_service_rv_ : 0; }
  // Who the transport verified the desk to be (a uid, a certificate, an RDP channel), for status.
  std::string desk_identity() const { return desk_.verified.describe(); }
  uint64_t negotiated_capabilities() const { return link_.established() ? link_.peer().capabilities : 0; }
  const ReaderTable& readers() const { return readers_; }
  ShimStats stats() const;
  const ShimConfig& config() const { return config_; }
  uint64_t desk_generation() const { return link_.generation(); }
  std::size_t client_count() const { return clients_.size(); }
  std::size_t handle_count() const { return handles_.size(); }
  // The card image held for reader |slot| (nullptr: none). Its content is never shown.
  const VirtualCard* card_image(std::size_t slot) const { return images_.at(slot).get(); }

 private:
  struct Client;
  // A card operation waiting for the desk: the request struct to answer, and what it is about.
  struct OnHandle {
    uint32_t card = 0;
    std::size_t slot = 0;
    bool carried_begin = false;  // the request carried a deferred BeginTransaction
  };
  struct ConnectCall { wire::ConnectStruct req; std::size_t slot = 0; };
  struct ReconnectCall : OnHandle { wire::ReconnectStruct req; };
  struct DisconnectCall : OnHandle { wire::DisconnectStruct req; };
  struct BeginCall : OnHandle { wire::BeginStruct req; };
  struct EndCall : OnHandle { wire::EndStruct req; };
  struct TransmitCall : OnHandle {
    wire::TransmitStruct req;
    std::vector<uint8_t> loggable_command;  // kept only to log the answer of a non-secret command
    // The card image's part (card_image): the command and the prelude sent before it, and
    // which image they were computed on.
    std::vector<uint8_t> apdu;
    std::vector<std::vector<uint8_t>> prelude;
    uint64_t image_serial = 0;  // 0: no image involved
  };
  struct ControlCall : OnHandle { wire::ControlStruct req; };
  struct GetAttribCall : OnHandle { wire::GetSetStruct req; };
  struct SetAttribCall : OnHandle { wire::GetSetStruct req; };
  // Per-call (benchmark) mode: the desk round trip charged before a locally answered call.
  struct ChargeCall { wire::DecodedRequest request; };
  using PendingCall = std::variant<ConnectCall, ReconnectCall, DisconnectCall, BeginCall, EndCall, TransmitCall,
                                   ControlCall, GetAttribCall, SetAttribCall, ChargeCall>;
  struct Fenced;

  // ---- clients (shim_core.cpp) ----
  void pump(Client& c);
  void handle_request(Client& c, wire::DecodedRequest req);
  bool charge_round_trip(Client& c, const wire::DecodedRequest& req);
  void violation(Client& c, const std::string& what);
  void send(Client& c, std::vector<uint8_t> bytes);
  template <typename S>
  void answer(Client& c, S s, uint32_t rv);
  void drop_client(ClientId id, bool close_socket);
  void release_context(Client& c);
  Handle* owned_handle(Client& c, int32_t card, const char* what);
  void forget_handle(Client& c, uint32_t card);
  uint32_t new_id();

  void on_version(Client& c, const wire::VersionStruct& s);
  void on_establish(Client& c, const wire::EstablishStruct& s);
  void on_release(Client& c, const wire::ReleaseStruct& s);
  void on_status(Client& c, const wire::StatusStruct& s);
  void on_cancel(Client& c, const wire::CancelStruct& s);
  void on_header_only(Client& c, wire::Command cmd);

  // ---- card operations (card_calls.cpp) ----
  void on_connect(Client& c, const wire::ConnectStruct& s);
  void on_reconnect(Client& c, const wire::ReconnectStruct& s);
  void on_disconnect(Client& c, const wire::DisconnectStruct& s);
  void on_begin(Client& c, const wire::BeginStruct& s);
  void on_end(Client& c, const wire::EndStruct& s);
  void on_transmit(Client& c, const wire::TransmitRequest& t);
  void on_control(Client& c, const wire::ControlRequest& t);
  void on_get_attrib(Client& c, const wire::GetSetStruct& s);
  void on_set_attrib(Client& c, const wire::GetSetStruct& s);
  // What pcscd answers a handle's card operation before it reaches the card, in its order:
  // the desk lost the handle (orphan), or another handle holds the transaction.
  std::optional<uint32_t> refusal(const Handle& h) const;
  static protocol::Request request_on(protocol::Op op, const Handle& h);
  static OnHandle on_handle(const Handle& h) { return OnHandle{h.card, h.slot, false}; }
  uint32_t request_flags(Handle& h, protocol::Op op, bool& carried_begin);
  void complete(Client& c, PendingCall call, const protocol::Reply& rep);
  void fail_call(Client& c, PendingCall call, uint32_t rv);
  void connected(Client& c, const ConnectCall& call, const protocol::Reply& rep);
  void after_power_action(std::size_t slot, uint32_t disposition);
  // ---- the card image (card_calls.cpp) ----
  // |transmit|: the image's answer, or the request's prelude (true: answered here).
  bool image_transmit(Client& c, Handle& h, TransmitCall& call, protocol::Request& q);
  // A transmit that went to the card came back: the image learns what the card did.
  // Returns false when it was sent again (its prelude was refused: the image is gone).
  bool image_forwarded(Client& c, TransmitCall& call, const protocol::Reply& rep);
  void install_image(std::size_t slot, protocol::CardImage image);
  void drop_image(std::size_t slot, const char* why);
  // The card of |slot| was reset (or may be touched by others): the image's view of the
  // current files is the card's own again.
  void image_card_reset(std::size_t slot);
  void mark_reset(std::size_t slot, uint32_t except_card, bool include_caller);
  void after_handle_gone(std::size_t slot);
  void learn_card_state(std::size_t slot, const protocol::Reply& r);
  void resume_parked();

  // ---- desk calls (shim_core.cpp) ----
  // |slot|: the reader a card operation is about (fencing).
  void call_desk(Client& c, protocol::Request req, PendingCall call, std::size_t slot);
  // A request whose answer nobody waits for (pipelined End/Disconnect, releases).
  void send_async(Client& c, protocol::Request req, uint32_t card, std::vector<std::size_t> slots);
  // Another client's pipelined request on the same reader is still in flight at the desk:
  // the desk runs contexts in parallel, so a card operation must not overtake what pcscd
  // would have run first. With the desk-ordering capability the desk waits (these ids go
  // in Request.after); without it the call is held here until they are done.
  std::vector<uint32_t> fence_ids(std::size_t slot, ClientId client) const;
  void release_fenced();
  protocol::ContextId desk_context(Client& c);
  bool uses(uint64_t cap) const { return link_.uses(cap); }

  // ---- LinkSession::Handler ----
  void link_send(std::vector<uint8_t> bytes) override;
  void link_close(const std::string& reason) override;
  void session_started(const protocol::PeerSession& peer, TimePoint now) override;
  void session_ended(const std::string& reason, TimePoint now) override;
  void received_reply(uint32_t id, protocol::Reply&& r, TimePoint now) override;
  void received_snapshot(protocol::ReaderSnapshot&& s, TimePoint now) override;

  // ---- the reader-state array and its waiters (shim_core.cpp) ----
  void after_state_change();  // resumes parked calls, republishes the array
  void publish_array();                    // recompute the array; signal waiters if it changed
  void deliver_signal(Client& c, uint32_t rv);
  void bump_reader_events();

  ShimEffects& fx_;
  ShimConfig config_;
  TimePoint now_{};  // the time of the event being handled (every entry point sets it)
  std::mt19937 rng_;
  protocol::LinkSession link_;
  protocol::PeerSession desk_;  // the desk of the current (or last) session
  uint32_t desk_service_rv_ = 0;  // the last snapshot's service_rv
  ReaderTable readers_;
  HandleTable handles_{readers_};
  std::vector<uint8_t> last_array_;
  uint16_t reader_events_ = 1;  // pcscd 2.x readerEvents: +1 per reader add/remove, never 0
  std::map<ClientId, std::unique_ptr<Client>> clients_;
  // Connects waiting, as pcscd makes them wait, for another handle's transaction to end;
  // Disconnects with RESET/UNPOWER likewise (the card must not be reset inside it).
  std::vector<std::pair<ClientId, wire::ConnectStruct>> parked_connects_;
  std::vector<std::pair<ClientId, wire::DisconnectStruct>> parked_disconnects_;
  std::vector<std::unique_ptr<Fenced>> fenced_;
  std::set<uint32_t> live_ids_;  // hContext and hCard values in use
  ShimStats stats_;
  uint32_t next_context_ = 1;    // desk context ids
  std::map<uint32_t, ClientId> pending_;  // desk request id -> client waiting for it
  struct Async {
    uint32_t card = 0;
    std::vector<std::size_t> slots;  // readers it may change
    ClientId client = 0;
  };
  std::map<uint32_t, Async> async_;  // pipelined request id -> what it was about
  // The card images, per reader slot, and a serial that names each one installed.
  std::array<std::unique_ptr<VirtualCard>, ReaderTable::kSlots> images_;
  std::array<uint64_t, ReaderTable::kSlots> image_serial_{};
  uint64_t next_image_serial_ = 1;
};

}  // namespace cardbridge::shim
