// ShimCore: the pcscd impersonation, sans I/O.
//
// It consumes events (a client connected / sent bytes / went away; the desk link came
// up / delivered a message / went down; time passed) and produces effects through
// ShimEffects (bytes to a client, close a client, a frame to the desk). One thread calls
// it (the shim's io_context thread); it has no locks and never blocks.
//
// What it answers locally, from the state the desk pushes (no desk round trip):
// version handshake, establish/release context, the reader-state array (ListReaders,
// Status), the event wait and its stop, cancel, reader events. What touches the card
// is forwarded: connect, reconnect, disconnect, transactions, transmit, control,
// get/set attribute. Semantics follow pcscd 1.9.9 (docs/pcsc-lite-wire.md).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "cardbridge/protocol/messages.hpp"
#include "core/reader_table.hpp"
#include "pcscd_wire/wire.hpp"

namespace cardbridge::shim {

using ClientId = uint64_t;
using Clock = std::chrono::steady_clock;

// Implemented by the I/O layer. Calls happen synchronously from ShimCore methods.
class ShimEffects {
 public:
  virtual ~ShimEffects() = default;
  virtual void send_to_client(ClientId id, std::vector<uint8_t> bytes) = 0;
  // The core has forgotten the client; the I/O layer closes the socket.
  virtual void close_client(ClientId id) = 0;
  // A complete frame (header included) for the desk link.
  virtual void send_to_desk(std::vector<uint8_t> frame) = 0;
  // The desk link is unusable (protocol error); the I/O layer drops and re-establishes it.
  virtual void reset_desk_link(const std::string& reason) = 0;
  // Audit trail (security officers): which desk, reader and card (ATR only) were used and
  // when. Never APDU contents. |client| is 0 for events that concern no client.
  virtual void audit(ClientId client, const std::string& event) { (void)client; (void)event; }
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

  static Optimizations all() { return {true, true, true, true, true}; }
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
  // answers pings on a thread of their own, so a slow card op does not trip it.
  std::chrono::milliseconds liveness_after{5000};
  std::chrono::milliseconds liveness_timeout{5000};
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
  uint64_t protocol_errors = 0;   // client connections closed for malformed input
  uint64_t desk_sessions = 0;     // desk hellos accepted
  uint64_t desk_bytes_in = 0;
  uint64_t desk_bytes_out = 0;
};

class ShimCore {
 public:
  ShimCore(ShimEffects& effects, ShimConfig config);
  ~ShimCore();
  ShimCore(const ShimCore&) = delete;
  ShimCore& operator=(const ShimCore&) = delete;

  // ---- client side (pcsc-lite protocol) ----
  void client_opened(ClientId id);
  void client_data(ClientId id, std::span<const uint8_t> bytes);
  void client_closed(ClientId id);

  // ---- desk side ----
  void desk_connected(Clock::time_point now);  // transport up: we say hello
  void desk_frame(std::span<const uint8_t> payload, Clock::time_point now);
  void desk_disconnected();  // transport down
  // Timers: call tick() at or after next_deadline().
  std::optional<Clock::time_point> next_deadline() const;
  void tick(Clock::time_point now);

  // Sends a Ping to the desk; |done| runs with true when the answer arrives, with false
  // when the desk is or goes away. For latency probes (control socket, doctor).
  void ping_desk(std::function<void(bool)> done);

  // ---- introspection (status, doctor, tests) ----
  bool desk_up() const { return desk_.established; }
  const std::string& desk_name() const { return desk_.peer_name; }
  const std::string& desk_software() const { return desk_.software; }
  uint64_t negotiated_capabilities() const { return desk_.capabilities; }
  const ReaderTable& readers() const { return readers_; }
  const ShimStats& stats() const { return stats_; }
  const ShimConfig& config() const { return config_; }
  uint64_t desk_generation() const { return desk_.generation; }
  std::size_t client_count() const { return clients_.size(); }
  std::size_t handle_count() const { return handles_.size(); }

 private:
  struct Client;
  struct Handle;
  struct PendingCall;

  // client request processing
  void pump(Client& c);
  bool handle_request(Client& c, const wire::DecodedRequest& req);  // false: stop pumping
  void violation(Client& c, const std::string& what);
  void send(Client& c, std::vector<uint8_t> bytes);
  void drop_client(ClientId id, bool close_socket);
  void release_context(Client& c);
  Handle* owned_handle(Client& c, int32_t card, const char* what);
  // A desk call about handle |h|: the pending record (command, hCard, reader slot) and the
  // request (op, desk handle).
  static PendingCall call_on(wire::Command command, const Handle& h);
  static protocol::Request request_on(protocol::Op op, const Handle& h);
  bool is_orphan(const Handle& h) const;
  bool removed_since(const Handle& h) const;
  void set_baseline(Handle& h, const protocol::Reply& rep);

  // the pcscd commands
  void on_version(Client& c, const wire::VersionStruct& s);
  void on_establish(Client& c, const wire::EstablishStruct& s);
  void on_release(Client& c, const wire::ReleaseStruct& s);
  void on_connect(Client& c, const wire::ConnectStruct& s);
  void on_reconnect(Client& c, const wire::ReconnectStruct& s);
  void on_disconnect(Client& c, const wire::DisconnectStruct& s);
  void on_begin(Client& c, const wire::BeginStruct& s);
  void on_end(Client& c, const wire::EndStruct& s);
  void on_transmit(Client& c, const wire::TransmitRequest& r);
  void on_control(Client& c, const wire::ControlRequest& r);
  void on_status(Client& c, const wire::StatusStruct& s);
  void on_cancel(Client& c, const wire::CancelStruct& s);
  void on_get_attrib(Client& c, const wire::GetSetStruct& s);
  void on_set_attrib(Client& c, const wire::GetSetStruct& s);
  void on_header_only(Client& c, wire::Command cmd);

  // desk calls
  void call_desk(Client& c, protocol::Request req, PendingCall call);
  void complete(Client& c, const PendingCall& call, const protocol::Reply& reply);
  void fail_call(Client& c, const PendingCall& call, uint32_t rv);
  void send_desk(const protocol::Message& m);
  void send_hello(bool reply);
  void on_desk_message(protocol::Message m);
  void on_desk_hello(const protocol::Hello& h);
  void on_desk_snapshot(const protocol::ReaderSnapshot& s);
  void on_desk_reply(uint32_t id, const protocol::Reply& r);
  void desk_lost(const std::string& why);
  protocol::ContextId desk_context(Client& c);

  // events
  void after_state_change();  // recompute the array; signal waiters if it changed
  void signal_waiters();
  void deliver_signal(Client& c, uint32_t rv);
  std::array<int32_t, ReaderTable::kSlots> sharing() const;
  void mark_reset(std::size_t slot, uint32_t except_card, bool include_caller);
  void after_power_action(std::size_t slot, uint32_t disposition);
  void learn_card_state(std::size_t slot, const protocol::Reply& r);
  uint32_t request_flags(Handle& h, protocol::Op op, bool& carried_begin);
  void drop_prefetch_on_slot(std::size_t slot, uint32_t except_card);
  void adapt_get_response(Handle& h, const std::vector<uint8_t>& apdu);
  bool predicted_clean(const Handle& h) const;  // no pending event, no foreign lock
  // Another handle of this shim holds a transaction (or exclusive access) on the reader.
  // The shim is authoritative for its own clients' locks (a deferred Begin exists only
  // here), so it answers SHARING_VIOLATION itself, as pcscd would.
  bool locked_by_other(const Handle& h) const;
  // What pcscd answers a handle's card operation before it reaches the card, in its order:
  // the desk lost the handle (orphan), or another handle holds the transaction.
  std::optional<uint32_t> refusal(const Handle& h) const;
  // Sends the client the request struct |r| back with |rv| (a call that ends here).
  template <class S>
  void answer(Client& c, S r, uint32_t rv);
  bool transaction_on_slot(std::size_t slot) const;
  void resume_parked();
  void send_async(Client& c, protocol::Request req, uint32_t card, std::vector<std::size_t> slots = {});
  // A pipelined request of another client on the same reader is still in flight at the
  // desk: this client's card operation waits for it (the desk runs contexts in parallel,
  // so without this fence it could overtake what pcscd would have done first).
  bool fenced(std::size_t slot, ClientId client) const;
  // With the desk-ordering capability the desk waits instead: the ids it must wait for.
  std::vector<uint32_t> fence_ids(std::size_t slot, ClientId client) const;
  void release_fenced();
  bool uses(uint64_t cap) const { return (desk_.capabilities & cap) != 0; }

  uint32_t new_id();  // random, positive, 31-bit, unique among live contexts and handles

  ShimEffects& fx_;
  ShimConfig config_;
  std::mt19937 rng_;
  ReaderTable readers_;
  std::vector<uint8_t> last_array_;
  uint16_t reader_events_ = 1;  // pcscd 2.x readerEvents: +1 per reader add/remove, never 0
  std::map<ClientId, std::unique_ptr<Client>> clients_;
  // Connects waiting, as pcscd makes them wait, for another handle's transaction to end.
  std::vector<std::pair<ClientId, wire::ConnectStruct>> parked_connects_;
  // Disconnects with RESET/UNPOWER waiting, as pcscd makes them wait, for another handle's
  // transaction to end (the card must not be reset inside it).
  std::vector<std::pair<ClientId, wire::DisconnectStruct>> parked_disconnects_;
  struct Fenced;
  std::vector<std::unique_ptr<Fenced>> fenced_;
  std::unordered_map<uint32_t, Handle> handles_;  // by hCard
  std::set<uint32_t> live_ids_;
  ShimStats stats_;

  struct DeskState {
    bool transport_up = false;
    bool established = false;
    uint64_t generation = 0;      // bumps with every accepted desk session
    uint64_t local_instance = 0;  // our Hello instance for this transport session
    uint64_t peer_instance = 0;
    uint64_t capabilities = 0;
    std::string peer_name;
    std::string software;
    uint32_t next_request = 1;
    uint32_t next_context = 1;
    std::optional<Clock::time_point> hello_due;
    std::map<uint32_t, ClientId> pending;  // request id -> client waiting for it
    struct Async {
      uint32_t card = 0;
      std::vector<std::size_t> slots;  // readers it may change
      ClientId client = 0;
    };
    std::map<uint32_t, Async> async;       // pipelined request id -> what it was about
    std::map<uint32_t, std::function<void(bool)>> probes;
    Clock::time_point last_heard{};               // last frame from the desk
    std::optional<Clock::time_point> busy_since;  // first request sent while none was outstanding
    std::optional<uint32_t> liveness_probe;       // our Ping in flight
    Clock::time_point liveness_sent{};
  } desk_;
  bool awaiting_desk() const { return !desk_.pending.empty() || !desk_.async.empty(); }
  std::optional<Clock::time_point> liveness_deadline() const;
};

}  // namespace cardbridge::shim
