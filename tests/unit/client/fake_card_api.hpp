// FakeCardApi: an in-memory PC/SC service behind the CardApi interface, for the desk
// engine's unit tests.
//
// It models what the engine depends on, with pcsc-lite's semantics (1.9.x .. 2.x):
//  * readers (in insertion order) with an optional card (ATR, supported protocols, scripted
//    APDU answers), a 16-bit event counter bumped on every insertion and removal, reader
//    attributes and control-code answers;
//  * contexts and card handles with their owner context; releasing a context disconnects
//    its handles; raw values are large and distinctive (0x1C0000xx, 0x7A5C00xx) so that a
//    test can tell them from the engine's own ids;
//  * sharing: an exclusive handle excludes every other handle, and the reverse;
//  * transactions: begin_transaction BLOCKS while another handle holds the reader's
//    transaction (condition variable), and wakes when the holder ends it, disconnects, its
//    context is released, the card goes, or the service goes;
//  * get_status_change blocks until a watched reader (or the "\\?PnP?\Notification"
//    pseudo-reader, whose event state carries the reader count in its upper 16 bits)
//    differs from the caller's current state, the timeout expires, cancel() is called on
//    the context, or the service goes;
//  * fault injection: the whole service down (SCARD_E_NO_SERVICE, existing contexts stay
//    dead afterwards), a call that throws once, a call that is held at its entry until the
//    test lets it go.
//
// Thread-safety: every method may be called from any thread. One mutex guards the whole
// model and one condition variable signals every change (blocked calls and test waits
// share it). The object must outlive every call in progress on it.
#pragma once

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "cardbridge/desk_core/card_api.hpp"

namespace cardbridge::client::fake {

// One entry per CardApi method (call counters, holds, thrown faults).
enum class Call : uint8_t {
  kEstablish,
  kRelease,
  kListReaders,
  kGetStatusChange,
  kCancel,
  kConnect,
  kReconnect,
  kDisconnect,
  kBeginTransaction,
  kEndTransaction,
  kTransmit,
  kControl,
  kGetAttrib,
  kSetAttrib,
  kStatus,
};
inline constexpr std::size_t kCallCount = 15;

struct FakeCard {
  std::vector<uint8_t> atr;
  uint32_t protocols = 0x0002;  // protocols the card supports (T=1)
  // Exact command -> answer (data and status word).
  std::map<std::vector<uint8_t>, std::vector<uint8_t>> answers;
  std::vector<uint8_t> default_answer{0x6D, 0x00};  // INS not supported
  bool mute = false;
};

// What a test may want to know about a context.
struct ContextInfo {
  ScardContext id = 0;
  bool live = false;
  bool watcher = false;  // called list_readers or get_status_change (the engine's monitor)
};

// Kinds of injected throw.
enum class Throw : uint8_t { kStd, kNonStd };

class FakeCardApi final : public CardApi {
 public:
  static constexpr ScardContext kFirstContext = 0x1C000001;
  static constexpr ScardHandle kFirstHandle = 0x7A5C0001;
  static constexpr const char* kPnpReader = "\\\\?PnP?\\Notification";

  FakeCardApi() = default;
  ~FakeCardApi() override = default;
  FakeCardApi(const FakeCardApi&) = delete;
  FakeCardApi& operator=(const FakeCardApi&) = delete;

  // ---- the world ------------------------------------------------------------------------
  void add_reader(const std::string& name);
  void remove_reader(const std::string& name);
  // Into an occupied reader: a swap (removal and insertion) seen as one change.
  void insert_card(const std::string& reader, FakeCard card);
  void remove_card(const std::string& reader);
  void set_attribute(const std::string& reader, uint32_t attr, std::vector<uint8_t> value);
  void set_control_answer(const std::string& reader, uint32_t code, std::vector<uint8_t> answer);
  // Down: every call returns SCARD_E_NO_SERVICE, blocked calls wake with it, every context
  // and handle dies. Up again: new contexts work; the old ones stay dead (NO_SERVICE).
  void set_service_available(bool up);

  // ---- fault injection ------------------------------------------------------------------
  // The next call of |c| throws (std::runtime_error, or an int for kNonStd) at its entry.
  void throw_once(Call c, Throw kind = Throw::kStd);
  // Calls of |c| wait at their entry (before any effect) until release_hold(c).
  void hold(Call c);
  void release_hold(Call c);

  // ---- inspection -----------------------------------------------------------------------
  std::size_t calls(Call c) const;
  std::vector<ContextInfo> contexts() const;
  std::vector<ScardHandle> live_handles() const;
  std::vector<ScardContext> released() const;  // in release order (successful releases)
  std::size_t live_worker_contexts() const;     // live, not watchers
  std::size_t blocked_in_begin() const;
  std::vector<uint8_t> last_command() const;   // of the last transmit that reached a card
  uint32_t last_send_protocol() const;
  uint16_t event_counter(const std::string& reader) const;
  std::optional<ScardHandle> transaction_holder(const std::string& reader) const;

  // ---- waits (true when the condition held before |timeout|) ------------------------------
  bool wait_calls(Call c, std::size_t n, std::chrono::milliseconds timeout) const;
  bool wait_held(Call c, std::size_t n, std::chrono::milliseconds timeout) const;
  bool wait_blocked_in_begin(std::size_t n, std::chrono::milliseconds timeout) const;
  bool wait_released(std::size_t n, std::chrono::milliseconds timeout) const;
  bool wait_live_worker_contexts(std::size_t n, std::chrono::milliseconds timeout) const;
  bool wait_context_released(ScardContext ctx, std::chrono::milliseconds timeout) const;
  // A get_status_change is blocked and has seen the current state of the world: whoever
  // watches (the engine's monitor) has consumed every change made so far.
  bool wait_watcher_idle(std::chrono::milliseconds timeout) const;

  // ---- CardApi --------------------------------------------------------------------------
  uint32_t establish(uint32_t scope, ScardContext* ctx) override;
  uint32_t release(ScardContext ctx) override;
  uint32_t list_readers(ScardContext ctx, std::vector<std::string>* readers) override;
  uint32_t get_status_change(ScardContext ctx, uint32_t timeout_ms, std::vector<ReaderStateIo>& states) override;
  uint32_t cancel(ScardContext ctx) override;
  uint32_t connect(ScardContext ctx, const std::string& reader, uint32_t share_mode, uint32_t protocols,
                   ScardHandle* card, uint32_t* active_protocol) override;
  uint32_t reconnect(ScardHandle card, uint32_t share_mode, uint32_t protocols, uint32_t initialization,
                     uint32_t* active_protocol) override;
  uint32_t disconnect(ScardHandle card, uint32_t disposition) override;
  uint32_t begin_transaction(ScardHandle card) override;
  uint32_t end_transaction(ScardHandle card, uint32_t disposition) override;
  uint32_t transmit(ScardHandle card, uint32_t send_protocol, std::span<const uint8_t> command,
                    uint32_t* recv_protocol, uint32_t recv_capacity, Buffer* response) override;
  uint32_t control(ScardHandle card, uint32_t code, std::span<const uint8_t> in, uint32_t recv_capacity,
                   Buffer* out) override;
  uint32_t get_attrib(ScardHandle card, uint32_t attr, uint32_t capacity, Buffer* out) override;
  uint32_t set_attrib(ScardHandle card, uint32_t attr, std::span<const uint8_t> value) override;
  uint32_t status(ScardHandle card, std::string* reader, uint32_t* state, uint32_t* protocol,
                  std::vector<uint8_t>* atr) override;

 private:
  struct Reader {
    std::string name;
    std::optional<FakeCard> card;
    uint64_t card_generation = 0;  // bumps on insertion and removal: handles see W_REMOVED_CARD
    uint16_t events = 0;
    std::map<uint32_t, std::vector<uint8_t>> attributes;
    std::map<uint32_t, std::vector<uint8_t>> control_answers;
    ScardHandle transaction = 0;  // holder, 0 = none
  };
  struct Context {
    bool live = true;
    bool watcher = false;
    uint64_t service_epoch = 0;
    uint64_t cancels = 0;
    std::optional<uint64_t> idle_at;  // world generation a blocked get_status_change has seen
  };
  struct Handle {
    ScardContext ctx = 0;
    std::string reader;
    uint32_t share = 0;
    uint32_t protocol = 0;
    uint64_t card_generation = 0;
    bool live = true;
    bool reset_pending = false;  // another handle reset the card: W_RESET_CARD once
  };
  using Lock = std::unique_lock<std::mutex>;

  void enter(Lock& lock, Call c);  // counts, honours holds and injected throws
  uint32_t check_context(ScardContext ctx) const;
  // Validates |card| (service, handle, context); on success |*h| and |*r| point at it.
  uint32_t check_handle(ScardHandle card, Handle** h, Reader** r);
  // The card |h| was made for has left |r| (removed, or another card inserted since).
  static bool card_gone(const Handle& h, const Reader& r) { return !r.card || r.card_generation != h.card_generation; }
  // What pcscd reports before a card operation: the removal, else a reset another handle
  // made (once); SCARD_S_SUCCESS when neither.
  static uint32_t pending_event(Handle& h, const Reader& r);
  Reader* find_reader(const std::string& name);
  const Reader* find_reader(const std::string& name) const;
  uint32_t reader_event_state(const Reader& r) const;
  void drop_handle(ScardHandle id, Handle& h);
  void reset_others(const Handle& self, ScardHandle self_id);
  std::size_t live_worker_contexts_locked() const;
  template <typename Pred>
  bool wait(std::chrono::milliseconds timeout, Pred pred) const {
    Lock lock(mu_);
    return changed_.wait_for(lock, timeout, pred);
  }
  // Every change to the model bumps the generation (see wait_watcher_idle).
  void notify() {
    ++generation_;
    changed_.notify_all();
  }

  mutable std::mutex mu_;
  mutable std::condition_variable changed_;
  bool service_up_ = true;
  uint64_t service_epoch_ = 0;
  std::vector<Reader> readers_;
  std::map<ScardContext, Context> contexts_;
  std::map<ScardHandle, Handle> handles_;
  ScardContext next_context_ = kFirstContext;
  ScardHandle next_handle_ = kFirstHandle;
  std::vector<ScardContext> released_;
  std::array<std::size_t, kCallCount> calls_{};
  std::array<bool, kCallCount> held_{};
  std::array<std::size_t, kCallCount> waiting_in_hold_{};
  std::array<std::optional<Throw>, kCallCount> throw_{};
  std::size_t blocked_in_begin_ = 0;
  uint64_t generation_ = 0;
  std::vector<uint8_t> last_command_;
  uint32_t last_send_protocol_ = 0;
};

}  // namespace cardbridge::client::fake
