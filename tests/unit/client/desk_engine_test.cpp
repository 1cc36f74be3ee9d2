// DeskEngine, driven as the transport drives it (transport_up/down, on_frame) over
// FakeCardApi, an in-memory PC/SC service whose blocking calls block like libpcsclite's.
//
// Every wait is a condition-variable wait with a generous deadline (kDeadline) on something
// that must happen; "nothing happens" is checked over a short window (kQuiet) after the
// engine's monitor is known to have consumed every change (FakeCardApi::wait_watcher_idle).
// Frames the engine sends are decoded by FakeLink, which also checks their framing.
#include "core/desk_engine.hpp"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <future>
#include <string_view>

#include <gtest/gtest.h>
#include <spdlog/sinks/base_sink.h>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/framing.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/scard.hpp"
#include "fake_card_api.hpp"

namespace cardbridge::protocol {
// Readable failure messages (found by argument-dependent lookup).
void PrintTo(const ReaderInfo& r, std::ostream* os) {
  *os << "{'" << r.name << "' state 0x" << std::hex << r.state << std::dec << " events " << r.event_count
      << " atr " << r.atr.size() << " bytes}";
}
void PrintTo(const ReaderSnapshot& s, std::ostream* os) {
  *os << "snapshot #" << s.sequence << " [";
  for (const auto& r : s.readers) {
    PrintTo(r, os);
    *os << ' ';
  }
  *os << ']';
}
}  // namespace cardbridge::protocol

namespace cardbridge::client {
namespace {

namespace pr = cardbridge::protocol;
namespace sc = cardbridge::scard;
using fake::Call;
using fake::FakeCard;
using fake::FakeCardApi;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using Messages = std::vector<pr::Message>;

constexpr auto kDeadline = 5s;   // for what must happen
constexpr auto kQuiet = 300ms;   // for what must not
constexpr uint32_t kNoReply = 0xDEADBEEF;

const std::string kReader1 = "Gemalto PC Twin Reader 00 00";
const std::string kReader2 = "OMNIKEY CardMan 3121 01 00";
const std::string kReader3 = "Lecteur CPS 3 02 00";
const pr::Bytes kAtr1 = {0x3B, 0x7F, 0x96, 0x00, 0x00, 0x80, 0x31, 0x80, 0x65, 0xB0,
                         0x85, 0x03, 0x00, 0xEF, 0x12, 0x0F, 0xFF, 0x82, 0x90, 0x00};
const pr::Bytes kAtr2 = {0x3B, 0x02, 0x14, 0x50};
const pr::Bytes kAtr3 = {0x3B, 0x8F, 0x80, 0x01, 0x80, 0x4F, 0x0C, 0xA0, 0x00, 0x00, 0x03, 0x06};
const pr::Bytes kSelect = {0x00, 0xA4, 0x04, 0x00, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x03, 0x10, 0x10};
const pr::Bytes kGetCplc = {0x80, 0xCA, 0x9F, 0x7F, 0x00};
constexpr uint32_t kFeatureRequest = 0x42000D48;  // SCARD_CTL_CODE(3400)
constexpr uint32_t kPresentState = sc::kReaderPresent | sc::kReaderPowered | sc::kReaderSpecific;

pr::Bytes cplc() {  // 9F7F 2A <42 bytes> 9000
  pr::Bytes b{0x9F, 0x7F, 0x2A};
  for (uint8_t i = 0; i < 42; ++i) b.push_back(i);
  b.push_back(0x90);
  b.push_back(0x00);
  return b;
}
pr::Bytes read_cmd(uint8_t i) { return {0x00, 0xB0, 0x00, i, 0x01}; }
pr::Bytes read_answer(uint8_t i) { return {i, 0x90, 0x00}; }

FakeCard test_card(pr::Bytes atr) {
  FakeCard c;
  c.atr = std::move(atr);
  c.protocols = sc::kProtocolT0 | sc::kProtocolT1;
  c.answers[kSelect] = {0x90, 0x00};
  c.answers[kGetCplc] = cplc();
  for (uint8_t i = 0; i < 16; ++i) c.answers[read_cmd(i)] = read_answer(i);
  return c;
}

// ---- requests -------------------------------------------------------------------------------

pr::Request req(pr::Op op, uint32_t ctx, uint32_t handle = 0) {
  pr::Request q;
  q.op = op;
  q.context = pr::ContextId{ctx};
  q.handle = pr::DeskHandle{handle};
  return q;
}
pr::Request establish_req(uint32_t ctx) { return req(pr::Op::kEstablishContext, ctx); }
pr::Request release_req(uint32_t ctx) { return req(pr::Op::kReleaseContext, ctx); }
pr::Request connect_req(uint32_t ctx, const std::string& reader, uint32_t share = sc::kShareShared,
                        uint32_t protocols = sc::kProtocolT0 | sc::kProtocolT1) {
  auto q = req(pr::Op::kConnect, ctx);
  q.reader = reader;
  q.share_mode = share;
  q.protocols = protocols;
  return q;
}
pr::Request transmit_req(uint32_t ctx, uint32_t handle, pr::Bytes apdu, uint32_t recv_length = 258) {
  auto q = req(pr::Op::kTransmit, ctx, handle);
  q.protocols = sc::kProtocolT1;  // the send PCI
  q.recv_protocol = 0;
  q.data = std::move(apdu);
  q.recv_length = recv_length;
  return q;
}
pr::Request begin_req(uint32_t ctx, uint32_t handle) { return req(pr::Op::kBeginTransaction, ctx, handle); }
pr::Request end_req(uint32_t ctx, uint32_t handle, uint32_t disposition = sc::kLeaveCard) {
  auto q = req(pr::Op::kEndTransaction, ctx, handle);
  q.disposition = disposition;
  return q;
}

// ---- the link -------------------------------------------------------------------------------

// The transport: keeps every message the engine sent (decoded; a frame that does not decode
// is counted as bad) and every close_link reason. |hook| (if set) runs after a message is
// recorded, on the engine's thread, and may throw to play a failing transport.
class FakeLink {
 public:
  EngineIo io() {
    return EngineIo{[this](std::vector<uint8_t> frame) { on_send(std::move(frame)); },
                    [this](const std::string& reason) { on_close(reason); }};
  }
  void set_hook(std::function<void(const pr::Message&)> hook) {
    std::lock_guard lock(mu_);
    hook_ = std::move(hook);
  }
  void set_close_hook(std::function<void()> hook) {
    std::lock_guard lock(mu_);
    close_hook_ = std::move(hook);
  }

  bool wait(const std::function<bool(const Messages&)>& pred, Clock::duration timeout = kDeadline) const {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return pred(messages_); });
  }
  // True when the link saw no message at all during |window|.
  bool quiet_for(Clock::duration window) const {
    const auto mark = size();
    return !wait([&](const Messages& ms) { return ms.size() > mark; }, window);
  }
  Messages messages() const {
    std::lock_guard lock(mu_);
    return messages_;
  }
  std::size_t size() const {
    std::lock_guard lock(mu_);
    return messages_.size();
  }
  std::size_t bad_frames() const {
    std::lock_guard lock(mu_);
    return bad_frames_;
  }
  std::vector<std::string> closes() const {
    std::lock_guard lock(mu_);
    return closes_;
  }
  bool wait_closed(std::size_t n, Clock::duration timeout = kDeadline) const {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return closes_.size() >= n; });
  }

 private:
  void on_send(std::vector<uint8_t> frame) {
    std::optional<pr::Message> m;
    pr::FrameDecoder decoder;
    if (decoder.feed(frame)) {
      auto payload = decoder.next();
      if (payload && decoder.buffered() == 0 && !decoder.next()) {
        if (auto decoded = pr::decode(*payload)) m = std::move(*decoded);
      }
    }
    std::function<void(const pr::Message&)> hook;
    {
      std::lock_guard lock(mu_);
      if (m) {
        messages_.push_back(*m);
      } else {
        ++bad_frames_;
      }
      hook = hook_;
      cv_.notify_all();
    }
    if (hook && m) hook(*m);
  }
  void on_close(const std::string& reason) {
    std::function<void()> hook;
    {
      std::lock_guard lock(mu_);
      closes_.push_back(reason);
      hook = close_hook_;
      cv_.notify_all();
    }
    if (hook) hook();
  }

  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  Messages messages_;
  std::size_t bad_frames_ = 0;
  std::vector<std::string> closes_;
  std::function<void(const pr::Message&)> hook_;
  std::function<void()> close_hook_;
};

// ---- message helpers -----------------------------------------------------------------------

template <typename T>
std::vector<T> bodies(const Messages& ms, std::size_t from = 0) {
  std::vector<T> out;
  for (std::size_t i = from; i < ms.size(); ++i) {
    if (auto* b = std::get_if<T>(&ms[i].body)) out.push_back(*b);
  }
  return out;
}

std::optional<pr::Reply> find_reply(const Messages& ms, uint32_t id) {
  for (const auto& m : ms) {
    if (auto* r = std::get_if<pr::Reply>(&m.body); r && m.id == id) return *r;
  }
  return std::nullopt;
}

// Ids of the replies in arrival order, restricted to |ids|.
std::vector<uint32_t> reply_order(const Messages& ms, const std::set<uint32_t>& ids) {
  std::vector<uint32_t> out;
  for (const auto& m : ms) {
    if (std::holds_alternative<pr::Reply>(m.body) && ids.contains(m.id)) out.push_back(m.id);
  }
  return out;
}

std::size_t index_of_first(const Messages& ms, const std::function<bool(const pr::Message&)>& pred,
                           std::size_t from = 0) {
  for (std::size_t i = from; i < ms.size(); ++i) {
    if (pred(ms[i])) return i;
  }
  return ms.size();
}

const pr::ReaderInfo* reader_in(const pr::ReaderSnapshot& s, const std::string& name) {
  for (const auto& r : s.readers) {
    if (r.name == name) return &r;
  }
  return nullptr;
}

std::vector<std::string> names_in(const pr::ReaderSnapshot& s) {
  std::vector<std::string> out;
  for (const auto& r : s.readers) out.push_back(r.name);
  return out;
}

pr::Hello server_hello(uint64_t instance, bool reply = false, uint32_t major = pr::kVersionMajor) {
  pr::Hello h;
  h.version_major = major;
  h.version_minor = pr::kVersionMinor;
  h.capabilities = pr::caps::kAll;
  h.role = pr::Role::kServer;
  h.software = "cardbridge-shim test";
  h.peer_name = "session-server-7";
  h.instance = instance;
  h.reply = reply;
  return h;
}

// ---- the harness ----------------------------------------------------------------------------

// An engine over |api| with a FakeLink, and the server's side of the conversation. Usable
// from a fixture and from the tests that need their own fake (stop, death tests).
class EngineHarness {
 public:
  explicit EngineHarness(FakeCardApi& api) : api_(api) {
    config_.desk_name = "desk-042";
    config_.capabilities = pr::caps::kAll;
    config_.hello_retry = 2s;  // the retry tests set their own
  }
  ~EngineHarness() { engine_.reset(); }
  EngineHarness(const EngineHarness&) = delete;
  EngineHarness& operator=(const EngineHarness&) = delete;

  // Starts the engine and waits until its monitor has seen the readers.
  bool make_engine() {
    engine_ = std::make_unique<DeskEngine>(api_, config_, link_.io());
    engine_->start();
    return api_.wait_watcher_idle(kDeadline);
  }

  void send(const pr::Message& m) {
    const auto payload = pr::encode(m);
    engine_->on_frame(payload);
  }

  // transport_up + the server's hello; true once the engine sent its snapshot.
  bool establish_session(uint64_t instance = 0x5E55100) {
    engine_->transport_up();
    const auto mark = link_.size();
    send(pr::Message{0, server_hello(instance)});
    const bool got = link_.wait([&](const Messages& ms) { return !bodies<pr::ReaderSnapshot>(ms, mark).empty(); });
    return got && engine_->session_established();
  }

  uint32_t submit(pr::Request q) {
    const uint32_t id = next_id_++;
    send(pr::Message{id, std::move(q)});
    return id;
  }
  std::optional<pr::Reply> wait_reply(uint32_t id, Clock::duration timeout = kDeadline) {
    std::optional<pr::Reply> r;
    link_.wait([&](const Messages& ms) { return (r = find_reply(ms, id)).has_value(); }, timeout);
    return r;
  }
  // Sends |q| and waits for its reply; a missing reply reads as rv kNoReply.
  pr::Reply call(pr::Request q) {
    const auto op = q.op;
    const uint32_t id = submit(std::move(q));
    if (auto r = wait_reply(id)) return *r;
    ADD_FAILURE() << "no reply to request #" << id << " (" << pr::op_name(op) << ")";
    pr::Reply none;
    none.rv = kNoReply;
    return none;
  }
  uint32_t connect_handle(uint32_t ctx, const std::string& reader = kReader1, uint32_t share = sc::kShareShared) {
    const auto r = call(connect_req(ctx, reader, share));
    EXPECT_EQ(r.rv, sc::kSuccess) << sc::rv_text(r.rv);
    return r.handle.value;
  }
  std::optional<pr::ReaderSnapshot> wait_snapshot(std::size_t from,
                                                  const std::function<bool(const pr::ReaderSnapshot&)>& pred) {
    std::optional<pr::ReaderSnapshot> found;
    link_.wait([&](const Messages& ms) {
      for (const auto& s : bodies<pr::ReaderSnapshot>(ms, from)) {
        if (pred(s)) {
          found = s;
          return true;
        }
      }
      return false;
    });
    return found;
  }

  // The engine's PC/SC contexts in the fake: live, not the monitor's, not the test's own.
  std::vector<ScardContext> engine_contexts() const {
    std::vector<ScardContext> out;
    for (const auto& c : api_.contexts()) {
      if (c.live && !c.watcher && !external_.contains(c.id)) out.push_back(c.id);
    }
    return out;
  }
  // "Another program" on the desk: connects to |reader| and takes its transaction.
  ScardHandle external_holder(const std::string& reader) {
    ScardContext ctx = 0;
    EXPECT_EQ(api_.establish(sc::kScopeSystem, &ctx), sc::kSuccess);
    external_.insert(ctx);
    ScardHandle h = 0;
    uint32_t proto = 0;
    EXPECT_EQ(api_.connect(ctx, reader, sc::kShareShared, sc::kProtocolT1, &h, &proto), sc::kSuccess);
    EXPECT_EQ(api_.begin_transaction(h), sc::kSuccess);
    return h;
  }

  FakeCardApi& api_;
  FakeLink link_;
  EngineConfig config_;
  std::set<ScardContext> external_;
  uint32_t next_id_ = 100;
  std::unique_ptr<DeskEngine> engine_;  // last: destroyed first
};

struct OwnedApi {
  FakeCardApi owned_api_;
};

// Desk with reader 1 (a card) and reader 2 (empty).
// Contexts A and B on reader 1, C on reader 2; B holds a transaction and A's Begin (request
// |a_begin|) is blocked behind it. |ok| is false when a step failed (already reported).
struct ABlockedBehindB {
  uint32_t ha = 0, hb = 0, hc = 0, a_begin = 0;
  bool ok = false;
};
constexpr uint32_t kA = 1, kB = 2, kC = 3;

class DeskEngineTest : private OwnedApi, public ::testing::Test, public EngineHarness {
 protected:
  DeskEngineTest() : EngineHarness(owned_api_) {
    api_.add_reader(kReader1);
    api_.insert_card(kReader1, test_card(kAtr1));
    api_.add_reader(kReader2);
  }

  void TearDown() override {
    // Invariant of every test: one reply at most per request, and only well-formed frames.
    std::map<uint32_t, int> replies;
    for (const auto& m : link_.messages()) {
      if (std::holds_alternative<pr::Reply>(m.body)) ++replies[m.id];
    }
    for (const auto& [id, n] : replies) EXPECT_EQ(n, 1) << "request #" << id << " answered " << n << " times";
    EXPECT_EQ(link_.bad_frames(), 0u);
    // Wake whatever still waits in the fake, so that the engine stops while the fake lives.
    for (std::size_t c = 0; c < fake::kCallCount; ++c) api_.release_hold(static_cast<Call>(c));
    api_.set_service_available(false);
    engine_.reset();
  }

  void start_session() {
    ASSERT_TRUE(make_engine());
    ASSERT_TRUE(establish_session());
  }

  ABlockedBehindB block_a_behind_b() {
    ABlockedBehindB s;
    api_.insert_card(kReader2, test_card(kAtr2));
    start_session();
    if (HasFatalFailure()) return s;
    s.hb = connect_handle(kB, kReader1);
    s.ha = connect_handle(kA, kReader1);
    s.hc = connect_handle(kC, kReader2);
    const auto begin = call(begin_req(kB, s.hb));
    EXPECT_EQ(begin.rv, sc::kSuccess);
    if (begin.rv != sc::kSuccess) return s;
    s.a_begin = submit(begin_req(kA, s.ha));
    s.ok = api_.wait_blocked_in_begin(1, kDeadline);
    EXPECT_TRUE(s.ok) << "A's Begin did not block behind B's transaction";
    return s;
  }
};

// =============================================================================================
// Handshake
// =============================================================================================

TEST_F(DeskEngineTest, TransportUpSendsTheDeskHello) {
  ASSERT_TRUE(make_engine());
  engine_->transport_up();
  ASSERT_TRUE(link_.wait([](const Messages& ms) { return !bodies<pr::Hello>(ms).empty(); }));
  const auto hello = bodies<pr::Hello>(link_.messages()).front();
  EXPECT_EQ(hello.role, pr::Role::kDesk);
  EXPECT_EQ(hello.version_major, pr::kVersionMajor);
  EXPECT_EQ(hello.version_minor, pr::kVersionMinor);
  EXPECT_EQ(hello.capabilities, pr::caps::kAll);
  EXPECT_EQ(hello.peer_name, "desk-042");
  EXPECT_TRUE(hello.software.starts_with("cardbridge-desk")) << hello.software;
  EXPECT_NE(hello.instance, 0u);
  EXPECT_FALSE(hello.reply);
  EXPECT_FALSE(engine_->session_established());
  EXPECT_EQ(link_.messages().front().id, 0u);
}

TEST_F(DeskEngineTest, EachTransportUpIsANewInstance) {
  ASSERT_TRUE(make_engine());
  engine_->transport_up();
  engine_->transport_down();
  engine_->transport_up();
  ASSERT_TRUE(link_.wait([](const Messages& ms) { return bodies<pr::Hello>(ms).size() >= 2; }));
  const auto hellos = bodies<pr::Hello>(link_.messages());
  EXPECT_NE(hellos[0].instance, hellos[1].instance);
}

TEST_F(DeskEngineTest, HelloIsRetriedUntilTheServerAnswers) {
  config_.hello_retry = 20ms;
  ASSERT_TRUE(make_engine());
  engine_->transport_up();
  ASSERT_TRUE(link_.wait([](const Messages& ms) { return bodies<pr::Hello>(ms).size() >= 4; }))
      << "the hello is not retried";
  const auto hellos = bodies<pr::Hello>(link_.messages());
  for (const auto& h : hellos) {
    EXPECT_EQ(h.instance, hellos.front().instance) << "a retry is the same hello";
    EXPECT_FALSE(h.reply);
    EXPECT_EQ(h.role, pr::Role::kDesk);
  }

  const auto mark = link_.size();
  send(pr::Message{0, server_hello(77, /*reply=*/true)});
  ASSERT_TRUE(link_.wait([&](const Messages& ms) { return !bodies<pr::ReaderSnapshot>(ms, mark).empty(); }));
  // One retry may already have been on its way when the server's hello arrived; no more.
  EXPECT_FALSE(link_.wait([&](const Messages& ms) { return bodies<pr::Hello>(ms, mark).size() >= 2; }, kQuiet))
      << "hello retries continue after the server answered";
}

TEST_F(DeskEngineTest, ServerHelloIsAnsweredWithAReplyHelloThenTheSnapshot) {
  ASSERT_TRUE(make_engine());
  engine_->transport_up();
  ASSERT_TRUE(link_.wait([](const Messages& ms) { return !ms.empty(); }));
  const uint64_t instance = bodies<pr::Hello>(link_.messages()).front().instance;
  const auto mark = link_.size();
  send(pr::Message{0, server_hello(1234, /*reply=*/false)});
  ASSERT_TRUE(link_.wait([&](const Messages& ms) { return !bodies<pr::ReaderSnapshot>(ms, mark).empty(); }));
  const auto ms = link_.messages();
  const auto hello_at = index_of_first(ms, [](const pr::Message& m) {
    auto* h = std::get_if<pr::Hello>(&m.body);
    return h && h->reply;
  }, mark);
  const auto snapshot_at = index_of_first(
      ms, [](const pr::Message& m) { return std::holds_alternative<pr::ReaderSnapshot>(m.body); }, mark);
  ASSERT_LT(hello_at, ms.size()) << "no hello reply";
  EXPECT_LT(hello_at, snapshot_at);
  const auto& reply = std::get<pr::Hello>(ms[hello_at].body);
  EXPECT_EQ(reply.instance, instance);
  EXPECT_EQ(reply.role, pr::Role::kDesk);
  EXPECT_TRUE(engine_->session_established());
  EXPECT_EQ(engine_->server_name(), "session-server-7");
}

TEST_F(DeskEngineTest, ServerHelloReplyIsNotAnswered) {
  ASSERT_TRUE(make_engine());
  engine_->transport_up();
  const auto mark = link_.size();
  send(pr::Message{0, server_hello(1234, /*reply=*/true)});
  ASSERT_TRUE(link_.wait([&](const Messages& ms) { return !bodies<pr::ReaderSnapshot>(ms, mark).empty(); }));
  for (const auto& h : bodies<pr::Hello>(link_.messages(), mark)) EXPECT_FALSE(h.reply);
}

TEST_F(DeskEngineTest, SnapshotAfterTheHelloIsTheCurrentOne) {
  start_session();
  const auto snaps = bodies<pr::ReaderSnapshot>(link_.messages());
  ASSERT_EQ(snaps.size(), 1u);
  EXPECT_EQ(snaps[0], engine_->current_readers());
  EXPECT_EQ(names_in(snaps[0]), (std::vector<std::string>{kReader1, kReader2}));
}

TEST_F(DeskEngineTest, RepeatedHelloWithTheSameInstanceDoesNothing) {
  start_session();
  const uint32_t h = connect_handle(1);
  ASSERT_EQ(engine_contexts().size(), 1u);
  ASSERT_TRUE(api_.wait_watcher_idle(kDeadline));

  auto mark = link_.size();
  send(pr::Message{0, server_hello(0x5E55100, /*reply=*/true)});
  EXPECT_TRUE(link_.quiet_for(kQuiet));
  EXPECT_EQ(link_.size(), mark);

  // A repeated non-reply hello may be answered again (the server may have missed the
  // answer), but it neither resets the session nor resends the snapshot.
  mark = link_.size();
  send(pr::Message{0, server_hello(0x5E55100, /*reply=*/false)});
  EXPECT_FALSE(link_.wait(
      [&](const Messages& ms) {
        return !bodies<pr::ReaderSnapshot>(ms, mark).empty() || bodies<pr::Hello>(ms, mark).size() > 1;
      },
      kQuiet));
  const auto after = link_.messages();
  EXPECT_TRUE(bodies<pr::ReaderSnapshot>(after, mark).empty());
  for (std::size_t i = mark; i < after.size(); ++i) {
    auto* hello = std::get_if<pr::Hello>(&after[i].body);
    EXPECT_TRUE(hello && hello->reply) << "unexpected " << pr::describe(after[i]);
  }

  EXPECT_TRUE(api_.released().empty());
  EXPECT_EQ(engine_contexts().size(), 1u);
  EXPECT_EQ(engine_->stats().sessions, 1u);
  EXPECT_EQ(call(transmit_req(1, h, kSelect)).rv, sc::kSuccess) << "the handle survived";
}

TEST_F(DeskEngineTest, NewServerInstanceResetsTheSession) {
  start_session();
  const uint32_t h = connect_handle(1);
  const auto old_contexts = engine_contexts();
  ASSERT_EQ(old_contexts.size(), 1u);

  const auto mark = link_.size();
  send(pr::Message{0, server_hello(0xBEEF, /*reply=*/false)});
  ASSERT_TRUE(link_.wait([&](const Messages& ms) { return !bodies<pr::ReaderSnapshot>(ms, mark).empty(); }))
      << "the new session gets a snapshot";
  EXPECT_TRUE(api_.wait_context_released(old_contexts[0], kDeadline))
      << "the previous session's PC/SC context is not released";
  EXPECT_EQ(engine_->stats().sessions, 2u);

  const auto calls = api_.calls(Call::kTransmit);
  EXPECT_EQ(call(transmit_req(1, h, kSelect)).rv, sc::kEInvalidHandle) << "an old handle is not valid";
  EXPECT_EQ(api_.calls(Call::kTransmit), calls);
}

TEST_F(DeskEngineTest, VersionMajorMismatchSendsAnErrorAndClosesTheLink) {
  ASSERT_TRUE(make_engine());
  engine_->transport_up();
  const auto mark = link_.size();
  send(pr::Message{0, server_hello(9, false, pr::kVersionMajor + 1)});
  ASSERT_TRUE(link_.wait_closed(1));
  const auto ms = link_.messages();
  const auto errors = bodies<pr::Error>(ms, mark);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].code, pr::ErrorCode::kVersion);
  EXPECT_TRUE(bodies<pr::ReaderSnapshot>(ms, mark).empty());
  for (const auto& h : bodies<pr::Hello>(ms, mark)) EXPECT_FALSE(h.reply) << "a mismatched hello is not answered";
  EXPECT_FALSE(engine_->session_established());
}

TEST_F(DeskEngineTest, HelloFromANonServerClosesTheLink) {
  ASSERT_TRUE(make_engine());
  engine_->transport_up();
  auto h = server_hello(9);
  h.role = pr::Role::kDesk;
  send(pr::Message{0, h});
  ASSERT_TRUE(link_.wait_closed(1));
  EXPECT_FALSE(engine_->session_established());
}

TEST_F(DeskEngineTest, MalformedFramesCloseTheLink) {
  start_session();
  const auto mark = link_.size();
  const std::vector<std::vector<uint8_t>> bad = {
      {0xFF, 0xFF, 0xFF, 0xFF},  // not a protobuf envelope
      {},                        // an envelope without a body
      pr::encode(pr::Message{0, transmit_req(1, 1, kSelect)}),  // a request without an id
  };
  for (const auto& payload : bad) engine_->on_frame(payload);
  EXPECT_EQ(link_.closes().size(), bad.size());
  EXPECT_TRUE(link_.quiet_for(50ms));
  EXPECT_TRUE(bodies<pr::Reply>(link_.messages(), mark).empty());
}

TEST_F(DeskEngineTest, RequestsBeforeTheHelloAreIgnored) {
  ASSERT_TRUE(make_engine());
  engine_->transport_up();
  const auto mark = link_.size();
  submit(establish_req(1));
  EXPECT_TRUE(bodies<pr::Reply>(link_.messages(), mark).empty());
  EXPECT_TRUE(engine_contexts().empty());
}

// =============================================================================================
// Reader snapshots
// =============================================================================================

TEST_F(DeskEngineTest, InitialSnapshotDescribesEveryReader) {
  start_session();
  const auto snap = bodies<pr::ReaderSnapshot>(link_.messages()).back();
  ASSERT_EQ(snap.readers.size(), 2u);
  EXPECT_EQ(snap.readers[0], (pr::ReaderInfo{kReader1, sc::kStatePresent, 1, kAtr1}));
  EXPECT_EQ(snap.readers[1], (pr::ReaderInfo{kReader2, sc::kStateEmpty, 0, {}}));
  EXPECT_GT(snap.sequence, 0u);
}

TEST_F(DeskEngineTest, CardInsertionAndRemovalProduceSnapshots) {
  start_session();
  const auto first = bodies<pr::ReaderSnapshot>(link_.messages()).back();

  auto mark = link_.size();
  api_.insert_card(kReader2, test_card(kAtr2));
  auto inserted = wait_snapshot(mark, [](const pr::ReaderSnapshot& s) {
    auto* r = reader_in(s, kReader2);
    return r && (r->state & sc::kStatePresent);
  });
  ASSERT_TRUE(inserted) << "no snapshot after the insertion";
  EXPECT_EQ(*reader_in(*inserted, kReader2), (pr::ReaderInfo{kReader2, sc::kStatePresent, 1, kAtr2}));
  EXPECT_EQ(*reader_in(*inserted, kReader1), first.readers[0]);
  EXPECT_GT(inserted->sequence, first.sequence);

  mark = link_.size();
  api_.remove_card(kReader2);
  auto removed = wait_snapshot(mark, [](const pr::ReaderSnapshot& s) {
    auto* r = reader_in(s, kReader2);
    return r && (r->state & sc::kStateEmpty);
  });
  ASSERT_TRUE(removed) << "no snapshot after the removal";
  EXPECT_EQ(*reader_in(*removed, kReader2), (pr::ReaderInfo{kReader2, sc::kStateEmpty, 2, {}}));
  EXPECT_GT(removed->sequence, inserted->sequence);
  EXPECT_EQ(engine_->current_readers(), *removed);
}

TEST_F(DeskEngineTest, CardSwapSeenAsOneChangeStillProducesASnapshot) {
  start_session();
  const auto mark = link_.size();
  api_.insert_card(kReader1, test_card(kAtr3));  // removal + insertion: counter 1 -> 3
  auto swapped = wait_snapshot(mark, [](const pr::ReaderSnapshot& s) {
    auto* r = reader_in(s, kReader1);
    return r && r->atr == kAtr3;
  });
  ASSERT_TRUE(swapped);
  EXPECT_EQ(*reader_in(*swapped, kReader1), (pr::ReaderInfo{kReader1, sc::kStatePresent, 3, kAtr3}));
}

TEST_F(DeskEngineTest, ReaderHotPlugProducesSnapshots) {
  start_session();
  auto mark = link_.size();
  api_.add_reader(kReader3);
  auto added = wait_snapshot(mark, [](const pr::ReaderSnapshot& s) { return reader_in(s, kReader3) != nullptr; });
  ASSERT_TRUE(added) << "no snapshot after a reader arrived";
  EXPECT_EQ(names_in(*added), (std::vector<std::string>{kReader1, kReader2, kReader3}));
  EXPECT_EQ(*reader_in(*added, kReader3), (pr::ReaderInfo{kReader3, sc::kStateEmpty, 0, {}}));

  mark = link_.size();
  api_.remove_reader(kReader1);
  auto removed = wait_snapshot(mark, [](const pr::ReaderSnapshot& s) { return reader_in(s, kReader1) == nullptr; });
  ASSERT_TRUE(removed) << "no snapshot after a reader left";
  EXPECT_EQ(names_in(*removed), (std::vector<std::string>{kReader2, kReader3}));
}

// A log sink that stops the first thread logging a line containing |needle| until open():
// the only way to hold a thread at a precise point inside the engine from outside.
class GateSink final : public spdlog::sinks::base_sink<spdlog::details::null_mutex> {
 public:
  explicit GateSink(std::string needle) : needle_(std::move(needle)) {}
  bool wait_blocked(Clock::duration timeout) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return blocked_; });
  }
  void open() {
    std::lock_guard lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    const std::string_view text(msg.payload.data(), msg.payload.size());
    if (text.find(needle_) == std::string_view::npos) return;
    std::unique_lock lock(mu_);
    if (used_) return;
    used_ = true;
    blocked_ = true;
    cv_.notify_all();
    cv_.wait(lock, [&] { return open_; });
  }
  void flush_() override {}

 private:
  const std::string needle_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool used_ = false;
  bool blocked_ = false;
  bool open_ = false;
};

// Adds |sink| to the engine's logger for its lifetime (no engine thread may run then).
class ScopedSink {
 public:
  explicit ScopedSink(spdlog::sink_ptr sink) : logger_(log::get("cardbridge.desk")), sink_(std::move(sink)) {
    logger_->sinks().push_back(sink_);
  }
  ~ScopedSink() { std::erase(logger_->sinks(), sink_); }
  ScopedSink(const ScopedSink&) = delete;
  ScopedSink& operator=(const ScopedSink&) = delete;

 private:
  std::shared_ptr<spdlog::logger> logger_;
  spdlog::sink_ptr sink_;
};

// The snapshot sent for a new session and one pushed by the monitor at the same moment
// must reach the server in sequence order: the shim applies every snapshot it gets
// (ReaderTable::apply ignores |sequence|), so a stale one arriving last leaves it with a
// wrong reader view until the next card event.
TEST_F(DeskEngineTest, SnapshotsReachTheServerInSequenceOrderAroundTheHello) {
  auto gate = std::make_shared<GateSink>("connected");  // on_hello's "server '...' connected"
  {
    ScopedSink scoped(gate);
    ASSERT_TRUE(make_engine());
    engine_->transport_up();
    auto hello = std::async(std::launch::async, [&] { send(pr::Message{0, server_hello(31)}); });
    ASSERT_TRUE(gate->wait_blocked(kDeadline)) << "the engine no longer logs the session start";
    api_.insert_card(kReader2, test_card(kAtr2));
    const auto card_in = [](const pr::ReaderSnapshot& s) {
      auto* r = reader_in(s, kReader2);
      return r && (r->state & sc::kStatePresent);
    };
    // An engine that orders its pushes may hold the newer snapshot back until the first is out.
    link_.wait([&](const Messages& ms) { return std::ranges::any_of(bodies<pr::ReaderSnapshot>(ms), card_in); },
               kQuiet);
    gate->open();
    hello.get();
    ASSERT_TRUE(wait_snapshot(0, card_in));
    ASSERT_TRUE(api_.wait_watcher_idle(kDeadline));
    const auto snaps = bodies<pr::ReaderSnapshot>(link_.messages());
    for (std::size_t i = 1; i < snaps.size(); ++i) {
      EXPECT_LE(snaps[i - 1].sequence, snaps[i].sequence) << "snapshot " << i << " is older than the one before";
    }
    EXPECT_EQ(snaps.back(), engine_->current_readers()) << "the server's last snapshot is stale";
    engine_.reset();  // before the sink leaves the logger
  }
}

TEST_F(DeskEngineTest, IdleEngineSendsNothing) {
  start_session();
  ASSERT_TRUE(api_.wait_watcher_idle(kDeadline));
  EXPECT_TRUE(link_.quiet_for(kQuiet));
}

TEST_F(DeskEngineTest, NothingIsPushedBeforeTheSession) {
  ASSERT_TRUE(make_engine());
  api_.insert_card(kReader2, test_card(kAtr2));
  ASSERT_TRUE(api_.wait_watcher_idle(kDeadline));
  EXPECT_EQ(link_.size(), 0u);
  // ... but the engine knows, and the session starts with it.
  ASSERT_TRUE(establish_session());
  const auto snap = bodies<pr::ReaderSnapshot>(link_.messages()).back();
  ASSERT_NE(reader_in(snap, kReader2), nullptr);
  EXPECT_EQ(reader_in(snap, kReader2)->atr, kAtr2);
}

TEST_F(DeskEngineTest, ReaderFilterHidesReaders) {
  config_.policy.reader_filter = {"gemalto"};
  start_session();
  const auto snap = bodies<pr::ReaderSnapshot>(link_.messages()).back();
  EXPECT_EQ(names_in(snap), std::vector<std::string>{kReader1});

  // Events on a hidden reader, and a hidden reader arriving, are not news.
  api_.insert_card(kReader2, test_card(kAtr2));
  api_.add_reader(kReader3);
  ASSERT_TRUE(api_.wait_watcher_idle(kDeadline));
  EXPECT_TRUE(link_.quiet_for(kQuiet));

  // A visible one arriving is.
  const auto mark = link_.size();
  api_.add_reader("GEMALTO USB Shell Token V2 03 00");
  auto added = wait_snapshot(mark, [](const pr::ReaderSnapshot& s) { return s.readers.size() == 2; });
  ASSERT_TRUE(added);
  EXPECT_EQ(names_in(*added), (std::vector<std::string>{kReader1, "GEMALTO USB Shell Token V2 03 00"}));
}

TEST_F(DeskEngineTest, DeskServiceFailureEmptiesTheSnapshotUntilItReturns) {
  start_session();
  auto mark = link_.size();
  api_.set_service_available(false);
  auto empty = wait_snapshot(mark, [](const pr::ReaderSnapshot& s) { return s.readers.empty(); });
  ASSERT_TRUE(empty) << "readers of a dead PC/SC service are still announced";

  mark = link_.size();
  api_.set_service_available(true);
  auto back = wait_snapshot(mark, [](const pr::ReaderSnapshot& s) { return !s.readers.empty(); });
  ASSERT_TRUE(back) << "readers do not come back with the service";
  EXPECT_EQ(names_in(*back), (std::vector<std::string>{kReader1, kReader2}));
  EXPECT_EQ(*reader_in(*back, kReader1), (pr::ReaderInfo{kReader1, sc::kStatePresent, 1, kAtr1}));
  EXPECT_GT(back->sequence, empty->sequence);
}

// =============================================================================================
// Requests
// =============================================================================================

TEST_F(DeskEngineTest, EstablishContextOpensOnePcscContextPerServerContext) {
  start_session();
  EXPECT_EQ(call(establish_req(1)).rv, sc::kSuccess);
  EXPECT_EQ(engine_contexts().size(), 1u);
  EXPECT_EQ(call(establish_req(1)).rv, sc::kSuccess);
  EXPECT_EQ(engine_contexts().size(), 1u);
  EXPECT_EQ(call(establish_req(2)).rv, sc::kSuccess);
  EXPECT_EQ(engine_contexts().size(), 2u);
}

TEST_F(DeskEngineTest, EstablishContextReportsADeadDeskService) {
  start_session();
  api_.set_service_available(false);
  EXPECT_EQ(call(establish_req(1)).rv, sc::kENoService);
  api_.set_service_available(true);
  EXPECT_EQ(call(establish_req(1)).rv, sc::kSuccess);
}

TEST_F(DeskEngineTest, ConnectReplyCarriesADeskHandleTheProtocolAndTheStatus) {
  start_session();
  const auto r = call(connect_req(1, kReader1));
  ASSERT_EQ(r.rv, sc::kSuccess);
  EXPECT_NE(r.handle.value, 0u);
  const auto raw = api_.live_handles();
  ASSERT_EQ(raw.size(), 1u);
  EXPECT_NE(static_cast<ScardHandle>(r.handle.value), raw[0]) << "the raw SCARDHANDLE leaked to the server";
  EXPECT_NE(r.handle.value, static_cast<uint32_t>(raw[0]));
  EXPECT_EQ(r.protocol, sc::kProtocolT1);
  EXPECT_EQ(r.state, (1u << 16) | kPresentState);
  EXPECT_EQ(r.atr, kAtr1);

  // A second connection (another context) gets another id.
  const auto r2 = call(connect_req(2, kReader1, sc::kShareShared, sc::kProtocolT0));
  ASSERT_EQ(r2.rv, sc::kSuccess);
  EXPECT_NE(r2.handle.value, r.handle.value);
  EXPECT_EQ(r2.protocol, sc::kProtocolT0);
}

TEST_F(DeskEngineTest, ConnectFailuresArePassedThrough) {
  start_session();
  EXPECT_EQ(call(connect_req(1, kReader2)).rv, sc::kENoSmartcard);
  EXPECT_EQ(call(connect_req(1, "No Such Reader 09 00")).rv, sc::kEUnknownReader);
  connect_handle(2, kReader1, sc::kShareExclusive);
  EXPECT_EQ(call(connect_req(1, kReader1)).rv, sc::kESharingViolation);
}

TEST_F(DeskEngineTest, TransmitReturnsTheCardAnswer) {
  start_session();
  const uint32_t h = connect_handle(1);
  const auto r = call(transmit_req(1, h, kGetCplc));
  ASSERT_EQ(r.rv, sc::kSuccess);
  EXPECT_EQ(r.data, cplc());
  EXPECT_EQ(r.length, cplc().size());
  EXPECT_EQ(r.protocol, sc::kProtocolT1) << "the receive PCI protocol as the API set it";
  EXPECT_EQ(api_.last_command(), kGetCplc);
  EXPECT_EQ(api_.last_send_protocol(), sc::kProtocolT1);
}

TEST_F(DeskEngineTest, TransmitInsufficientBufferPassesTheNeededLength) {
  start_session();
  const uint32_t h = connect_handle(1);
  const auto r = call(transmit_req(1, h, kGetCplc, /*recv_length=*/10));
  EXPECT_EQ(r.rv, sc::kEInsufficientBuffer);
  EXPECT_EQ(r.length, cplc().size());
  EXPECT_TRUE(r.data.empty());
}

TEST_F(DeskEngineTest, TransmitOnARemovedCardReportsTheRemoval) {
  start_session();
  const uint32_t h = connect_handle(1);
  api_.remove_card(kReader1);
  EXPECT_EQ(call(transmit_req(1, h, kSelect)).rv, sc::kWRemovedCard);
}

TEST_F(DeskEngineTest, ControlIsExecutedWhenThePolicyAllowsIt) {
  const pr::Bytes features = {0x12, 0x04, 0x42, 0x33, 0x00, 0x12};
  api_.set_control_answer(kReader1, kFeatureRequest, features);
  start_session();
  const uint32_t h = connect_handle(1);
  auto q = req(pr::Op::kControl, 1, h);
  q.code = kFeatureRequest;
  q.recv_length = 256;
  const auto r = call(q);
  ASSERT_EQ(r.rv, sc::kSuccess);
  EXPECT_EQ(r.data, features);
  EXPECT_EQ(r.length, features.size());
  EXPECT_EQ(api_.calls(Call::kControl), 1u);
}

TEST_F(DeskEngineTest, ControlRefusedByThePolicyNeverReachesTheReader) {
  config_.policy.control_allow = std::set<uint32_t>{kFeatureRequest};
  api_.set_control_answer(kReader1, kFeatureRequest, {0x12, 0x04, 0x42, 0x33, 0x00, 0x12});
  api_.set_control_answer(kReader1, sc::ctl_code(1), {0x00});
  start_session();
  const uint32_t h = connect_handle(1);
  auto refused = req(pr::Op::kControl, 1, h);
  refused.code = sc::ctl_code(1);
  refused.recv_length = 256;
  EXPECT_EQ(call(refused).rv, sc::kEUnsupportedFeature);
  EXPECT_EQ(api_.calls(Call::kControl), 0u);

  auto allowed = refused;
  allowed.code = kFeatureRequest;
  EXPECT_EQ(call(allowed).rv, sc::kSuccess);
  EXPECT_EQ(api_.calls(Call::kControl), 1u);
}

TEST_F(DeskEngineTest, GetAndSetAttrib) {
  const pr::Bytes vendor = {'G', 'e', 'm', 'a', 'l', 't', 'o'};
  api_.set_attribute(kReader1, sc::kAttrVendorName, vendor);
  start_session();
  const uint32_t h = connect_handle(1);

  auto get = req(pr::Op::kGetAttrib, 1, h);
  get.code = sc::kAttrVendorName;
  get.recv_length = 64;
  auto r = call(get);
  ASSERT_EQ(r.rv, sc::kSuccess);
  EXPECT_EQ(r.data, vendor);
  EXPECT_EQ(r.length, vendor.size());

  get.recv_length = 3;
  r = call(get);
  EXPECT_EQ(r.rv, sc::kEInsufficientBuffer);
  EXPECT_EQ(r.length, vendor.size());

  get.code = sc::kAttrAtrString;
  get.recv_length = 64;
  EXPECT_EQ(call(get).data, kAtr1);

  auto set = req(pr::Op::kSetAttrib, 1, h);
  set.code = 0x7FFF0010;
  set.data = {0x01, 0x02, 0x03};
  EXPECT_EQ(call(set).rv, sc::kSuccess);
  get.code = 0x7FFF0010;
  EXPECT_EQ(call(get).data, (pr::Bytes{0x01, 0x02, 0x03}));
}

TEST_F(DeskEngineTest, ReconnectReportsTheNewProtocolAndStatus) {
  start_session();
  const uint32_t h = connect_handle(1);
  auto q = req(pr::Op::kReconnect, 1, h);
  q.share_mode = sc::kShareShared;
  q.protocols = sc::kProtocolT0;
  q.disposition = sc::kResetCard;
  const auto r = call(q);
  ASSERT_EQ(r.rv, sc::kSuccess);
  EXPECT_EQ(r.protocol, sc::kProtocolT0);
  EXPECT_EQ(r.state, (1u << 16) | kPresentState);
  EXPECT_EQ(r.atr, kAtr1);
  EXPECT_EQ(call(transmit_req(1, h, kSelect)).rv, sc::kEProtoMismatch) << "T=1 PCI on a T=0 connection";
}

TEST_F(DeskEngineTest, DisconnectForgetsTheHandle) {
  start_session();
  const uint32_t h = connect_handle(1);
  auto q = req(pr::Op::kDisconnect, 1, h);
  q.disposition = sc::kLeaveCard;
  EXPECT_EQ(call(q).rv, sc::kSuccess);
  EXPECT_TRUE(api_.live_handles().empty());
  EXPECT_EQ(call(transmit_req(1, h, kSelect)).rv, sc::kEInvalidHandle);
  EXPECT_EQ(call(q).rv, sc::kEInvalidHandle);
  EXPECT_EQ(api_.calls(Call::kTransmit), 0u);
  EXPECT_EQ(api_.calls(Call::kDisconnect), 1u);
}

TEST_F(DeskEngineTest, BeginAndEndTransaction) {
  start_session();
  const uint32_t h = connect_handle(1);
  EXPECT_EQ(call(begin_req(1, h)).rv, sc::kSuccess);
  EXPECT_TRUE(api_.transaction_holder(kReader1).has_value());
  EXPECT_EQ(call(end_req(1, h)).rv, sc::kSuccess);
  EXPECT_FALSE(api_.transaction_holder(kReader1).has_value());
  EXPECT_EQ(call(end_req(1, h)).rv, sc::kENotTransacted);
}

TEST_F(DeskEngineTest, StatusReportsReaderStateProtocolAndAtr) {
  start_session();
  const uint32_t h = connect_handle(1);
  const auto r = call(req(pr::Op::kStatus, 1, h));
  ASSERT_EQ(r.rv, sc::kSuccess);
  EXPECT_EQ(r.reader, kReader1);
  EXPECT_EQ(r.state, (1u << 16) | kPresentState);
  EXPECT_EQ(r.protocol, sc::kProtocolT1);
  EXPECT_EQ(r.atr, kAtr1);
}

TEST_F(DeskEngineTest, PingIsAnsweredWithoutOpeningAContext) {
  start_session();
  const auto r = call(req(pr::Op::kPing, 5));
  EXPECT_EQ(r.rv, sc::kSuccess);
  EXPECT_TRUE(engine_contexts().empty());
}

// =============================================================================================
// Handle isolation
// =============================================================================================

TEST_F(DeskEngineTest, HandleOfAnotherContextIsInvalid) {
  start_session();
  const uint32_t h = connect_handle(1);
  EXPECT_EQ(call(transmit_req(2, h, kSelect)).rv, sc::kEInvalidHandle);
  EXPECT_EQ(call(req(pr::Op::kStatus, 2, h)).rv, sc::kEInvalidHandle);
  EXPECT_EQ(call(begin_req(2, h)).rv, sc::kEInvalidHandle);
  auto disconnect = req(pr::Op::kDisconnect, 2, h);
  EXPECT_EQ(call(disconnect).rv, sc::kEInvalidHandle);
  EXPECT_EQ(api_.calls(Call::kTransmit), 0u);
  EXPECT_EQ(api_.calls(Call::kStatus), 1u) << "only the connect's own status call";
  EXPECT_EQ(api_.calls(Call::kBeginTransaction), 0u);
  EXPECT_EQ(api_.calls(Call::kDisconnect), 0u);
  EXPECT_EQ(call(transmit_req(1, h, kSelect)).rv, sc::kSuccess) << "its own context still uses it";
}

TEST_F(DeskEngineTest, UnknownHandlesAreInvalid) {
  start_session();
  const uint32_t h = connect_handle(1);
  const auto raw = api_.live_handles();
  ASSERT_EQ(raw.size(), 1u);
  for (uint32_t bogus : {0u, h + 1, 0xFFFFFFFFu, static_cast<uint32_t>(raw[0])}) {
    EXPECT_EQ(call(transmit_req(1, bogus, kSelect)).rv, sc::kEInvalidHandle) << bogus;
  }
  EXPECT_EQ(api_.calls(Call::kTransmit), 0u);
}

TEST_F(DeskEngineTest, ConnectToAFilteredReaderIsAnUnknownReader) {
  config_.policy.reader_filter = {"omnikey"};
  api_.insert_card(kReader2, test_card(kAtr2));
  start_session();
  EXPECT_EQ(call(connect_req(1, kReader1)).rv, sc::kEUnknownReader);
  EXPECT_EQ(api_.calls(Call::kConnect), 0u);
  EXPECT_EQ(call(connect_req(1, kReader2)).rv, sc::kSuccess);
}

// A Connect that completes after its session ended must not leave a handle the next
// session can reach (the connection belongs to the previous server's PC/SC context).
TEST_F(DeskEngineTest, ConnectFinishingAfterTheSessionEndedLeavesNoUsableHandle) {
  start_session();
  api_.hold(Call::kConnect);
  const uint32_t stale = submit(connect_req(7, kReader1));
  ASSERT_TRUE(api_.wait_held(Call::kConnect, 1, kDeadline));

  engine_->transport_down();
  ASSERT_TRUE(establish_session(0xA11CE));
  api_.release_hold(Call::kConnect);
  ASSERT_TRUE(api_.wait_released(1, kDeadline)) << "the old worker did not finish";
  EXPECT_FALSE(find_reply(link_.messages(), stale)) << "a reply crossed sessions";

  // The new server guesses desk handle ids in the same context id.
  for (uint32_t guess = 1; guess <= 4; ++guess) {
    EXPECT_EQ(call(transmit_req(7, guess, kSelect)).rv, sc::kEInvalidHandle) << guess;
  }
  EXPECT_EQ(api_.calls(Call::kTransmit), 0u)
      << "the engine passed a previous session's card handle to the PC/SC API";
}

// =============================================================================================
// Concurrency
// =============================================================================================

TEST_F(DeskEngineTest, BlockedBeginHoldsUpOnlyItsOwnContext) {
  const auto blocked = block_a_behind_b();
  ASSERT_TRUE(blocked.ok);
  const auto [ha, hb, hc, a_begin, ok] = blocked;
  const uint32_t a_next = submit(transmit_req(kA, ha, read_cmd(9)));  // queued behind the Begin

  // Another context goes on.
  const auto rc = call(transmit_req(kC, hc, read_cmd(1)));
  EXPECT_EQ(rc.rv, sc::kSuccess);
  EXPECT_EQ(rc.data, read_answer(1));

  // So does the holder's context, in order, with the right ids.
  std::vector<uint32_t> b_ids;
  for (uint8_t i = 1; i <= 3; ++i) b_ids.push_back(submit(transmit_req(kB, hb, read_cmd(i))));
  for (std::size_t i = 0; i < b_ids.size(); ++i) {
    auto r = wait_reply(b_ids[i]);
    ASSERT_TRUE(r) << "context B is held up";
    EXPECT_EQ(r->rv, sc::kSuccess);
    EXPECT_EQ(r->data, read_answer(static_cast<uint8_t>(i + 1))) << "reply #" << b_ids[i] << " is not its answer";
  }
  EXPECT_EQ(reply_order(link_.messages(), {b_ids.begin(), b_ids.end()}), b_ids);
  EXPECT_FALSE(find_reply(link_.messages(), a_begin)) << "A's Begin cannot have completed";
  EXPECT_FALSE(find_reply(link_.messages(), a_next));
  EXPECT_EQ(api_.blocked_in_begin(), 1u);

  const uint32_t b_end = submit(end_req(kB, hb));
  auto ra = wait_reply(a_begin);
  ASSERT_TRUE(ra) << "A's Begin did not complete after B's End";
  EXPECT_EQ(ra->rv, sc::kSuccess);
  auto rn = wait_reply(a_next);
  ASSERT_TRUE(rn);
  EXPECT_EQ(rn->rv, sc::kSuccess);
  EXPECT_EQ(rn->data, read_answer(9));
  ASSERT_TRUE(wait_reply(b_end));
  EXPECT_EQ(wait_reply(b_end)->rv, sc::kSuccess);
  EXPECT_EQ(reply_order(link_.messages(), {b_ids[2], b_end}), (std::vector<uint32_t>{b_ids[2], b_end}));
  EXPECT_EQ(reply_order(link_.messages(), {a_begin, a_next}), (std::vector<uint32_t>{a_begin, a_next}));
}

// Desk ordering: a request naming earlier requests of other contexts in |after| starts
// only once they are done (the server's causal order across contexts).
TEST_F(DeskEngineTest, RequestWaitsForTheEarlierRequestsItNames) {
  const auto blocked = block_a_behind_b();
  ASSERT_TRUE(blocked.ok);
  const auto [ha, hb, hc, a_begin, ok] = blocked;

  auto ordered = transmit_req(kC, hc, read_cmd(4));
  ordered.after = {a_begin};
  const uint32_t c_tx = submit(ordered);
  // Without |after| it would be answered at once (BlockedBeginHoldsUpOnlyItsOwnContext).
  EXPECT_FALSE(wait_reply(c_tx, 200ms)) << "ran before the request it names";

  const uint32_t b_end = submit(end_req(kB, hb));
  ASSERT_TRUE(wait_reply(b_end));
  auto ra = wait_reply(a_begin);
  ASSERT_TRUE(ra);
  EXPECT_EQ(ra->rv, sc::kSuccess);
  auto rc = wait_reply(c_tx);
  ASSERT_TRUE(rc) << "never ran after the request it names finished";
  EXPECT_EQ(rc->data, read_answer(4));
  EXPECT_EQ(reply_order(link_.messages(), {a_begin, c_tx}), (std::vector<uint32_t>{a_begin, c_tx}));
  ASSERT_EQ(call(end_req(kA, ha)).rv, sc::kSuccess);
}

TEST_F(DeskEngineTest, OrderingIdsThatCannotBeWaitedForAreIgnored) {
  start_session();
  const uint32_t h = connect_handle(1);
  auto q = transmit_req(1, h, read_cmd(2));
  q.after = {1, 0xFFFFFFF0u, 1000000};  // answered long ago, "later" (wrapped) and never sent
  auto r = wait_reply(submit(q));
  ASSERT_TRUE(r) << "waited for a request that will never come";
  EXPECT_EQ(r->data, read_answer(2));
}

TEST_F(DeskEngineTest, SessionEndReleasesARequestWaitingForOrder) {
  const auto blocked = block_a_behind_b();
  ASSERT_TRUE(blocked.ok);
  auto q = transmit_req(kB, blocked.hb, read_cmd(1));
  q.after = {blocked.a_begin};
  submit(q);  // B waits for A, A waits for B's End: only the session's end frees them
  const auto t0 = std::chrono::steady_clock::now();
  engine_->transport_down();
  engine_.reset();  // stop() must not hang on the waiting worker
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
}

TEST_F(DeskEngineTest, RepliesOfOneContextKeepTheirOrder) {
  start_session();
  const uint32_t h = connect_handle(1);
  std::vector<uint32_t> ids;
  for (uint8_t i = 0; i < 16; ++i) ids.push_back(submit(transmit_req(1, h, read_cmd(i))));
  ASSERT_TRUE(wait_reply(ids.back()));
  EXPECT_EQ(reply_order(link_.messages(), {ids.begin(), ids.end()}), ids);
  for (uint8_t i = 0; i < 16; ++i) EXPECT_EQ(find_reply(link_.messages(), ids[i])->data, read_answer(i));
}

// =============================================================================================
// ReleaseContext
// =============================================================================================

TEST_F(DeskEngineTest, ReleaseContextRunsWhatWasSentBeforeItThenReleasesAndAnswers) {
  start_session();
  const ScardHandle other = external_holder(kReader1);
  const uint32_t h = connect_handle(1);
  const auto ctxs = engine_contexts();
  ASSERT_EQ(ctxs.size(), 1u);

  const uint32_t begin = submit(begin_req(1, h));
  ASSERT_TRUE(api_.wait_blocked_in_begin(1, kDeadline));
  // The shim pipelines: requests sent before the release are part of the program's story
  // (e.g. a Disconnect(RESET)) and must run, in order, before the context goes.
  const uint32_t queued1 = submit(transmit_req(1, h, read_cmd(1)));
  const uint32_t queued2 = submit(transmit_req(1, h, read_cmd(2)));
  const uint32_t release = submit(release_req(1));

  // The worker is inside SCardBeginTransaction: its context cannot be released yet.
  EXPECT_EQ(engine_contexts(), ctxs);
  EXPECT_TRUE(api_.released().empty());
  EXPECT_FALSE(find_reply(link_.messages(), release));

  ASSERT_EQ(api_.end_transaction(other, sc::kLeaveCard), sc::kSuccess);
  ASSERT_TRUE(api_.wait_context_released(ctxs[0], kDeadline)) << "the context was not released";
  ASSERT_TRUE(link_.wait([&](const Messages& m) { return find_reply(m, release).has_value(); }))
      << "the release is answered once the context is released";
  const auto ms = link_.messages();
  ASSERT_TRUE(find_reply(ms, begin));
  EXPECT_EQ(find_reply(ms, begin)->rv, sc::kSuccess);
  ASSERT_TRUE(find_reply(ms, queued1));
  ASSERT_TRUE(find_reply(ms, queued2));
  EXPECT_EQ(find_reply(ms, release)->rv, sc::kSuccess);
  EXPECT_EQ(api_.calls(Call::kTransmit), 2u);
  // Order on the wire: begin, queued1, queued2, then the release.
  auto pos = [&](uint32_t id) {
    for (std::size_t i = 0; i < ms.size(); ++i) {
      if (ms[i].id == id && std::holds_alternative<pr::Reply>(ms[i].body)) return i;
    }
    return ms.size();
  };
  EXPECT_LT(pos(begin), pos(queued1));
  EXPECT_LT(pos(queued1), pos(queued2));
  EXPECT_LT(pos(queued2), pos(release));
}

TEST_F(DeskEngineTest, ReleaseContextForgetsItsHandles) {
  start_session();
  const uint32_t h = connect_handle(1);
  const auto ctxs = engine_contexts();
  ASSERT_EQ(ctxs.size(), 1u);
  const uint32_t release = submit(release_req(1));
  ASSERT_TRUE(api_.wait_context_released(ctxs[0], kDeadline));
  EXPECT_TRUE(api_.live_handles().empty());
  // The server reuses the context id: the old handle is gone with the old context.
  EXPECT_EQ(call(transmit_req(1, h, kSelect)).rv, sc::kEInvalidHandle);
  EXPECT_EQ(api_.calls(Call::kTransmit), 0u);
  ASSERT_TRUE(find_reply(link_.messages(), release));
  EXPECT_EQ(find_reply(link_.messages(), release)->rv, sc::kSuccess);
}

TEST_F(DeskEngineTest, ReleaseOfAnUnknownContextIsHarmless) {
  start_session();
  EXPECT_EQ(call(release_req(42)).rv, sc::kSuccess);  // answered at once: nothing to release
  EXPECT_EQ(call(establish_req(42)).rv, sc::kSuccess);
}

// =============================================================================================
// transport_down
// =============================================================================================

TEST_F(DeskEngineTest, TransportDownReleasesEverythingAndSendsNothingMore) {
  start_session();
  const uint32_t hb = connect_handle(2);
  ASSERT_EQ(call(begin_req(2, hb)).rv, sc::kSuccess);
  const uint32_t ha = connect_handle(1);
  submit(begin_req(1, ha));  // blocked behind B's transaction
  ASSERT_TRUE(api_.wait_blocked_in_begin(1, kDeadline));
  submit(transmit_req(1, ha, kSelect));
  ASSERT_EQ(call(establish_req(3)).rv, sc::kSuccess);
  ASSERT_EQ(engine_contexts().size(), 3u);

  const auto mark = link_.size();
  engine_->transport_down();
  EXPECT_FALSE(engine_->session_established());
  // B's release ends its transaction, which lets A's Begin complete: its reply is stale.
  ASSERT_TRUE(api_.wait_live_worker_contexts(0, kDeadline)) << "contexts left after transport_down";
  ASSERT_TRUE(api_.wait_watcher_idle(kDeadline));
  EXPECT_TRUE(link_.quiet_for(kQuiet));
  EXPECT_EQ(link_.size(), mark) << "frames were sent after transport_down";
}

TEST_F(DeskEngineTest, InFlightReplyIsNotDeliveredToTheNextSession) {
  start_session();
  const uint32_t h = connect_handle(1);
  api_.hold(Call::kTransmit);
  const uint32_t in_flight = submit(transmit_req(1, h, kSelect));
  ASSERT_TRUE(api_.wait_held(Call::kTransmit, 1, kDeadline));

  engine_->transport_down();
  ASSERT_TRUE(establish_session(0x2));
  api_.release_hold(Call::kTransmit);
  ASSERT_TRUE(api_.wait_live_worker_contexts(0, kDeadline));
  EXPECT_FALSE(find_reply(link_.messages(), in_flight)) << "the new server got the old server's reply";
}

// =============================================================================================
// Limits
// =============================================================================================

TEST_F(DeskEngineTest, MoreThanMaxContextsGetNoMemory) {
  config_.max_contexts = 2;
  start_session();
  const uint32_t h = connect_handle(1);
  EXPECT_EQ(call(establish_req(2)).rv, sc::kSuccess);
  EXPECT_EQ(call(establish_req(3)).rv, sc::kENoMemory);
  EXPECT_EQ(call(connect_req(4, kReader1)).rv, sc::kENoMemory);
  EXPECT_EQ(engine_contexts().size(), 2u);
  EXPECT_EQ(call(transmit_req(1, h, kSelect)).rv, sc::kSuccess) << "existing contexts keep working";

  submit(release_req(2));
  EXPECT_EQ(call(establish_req(3)).rv, sc::kSuccess) << "a released context frees its slot";
}

// A context the server released while it is stuck in a card call still holds a thread and a
// PC/SC context: it must count, or a server can make the desk grow without bound
// (connect, Begin on a busy card, release, repeat).
TEST_F(DeskEngineTest, ReleasedContextsStillBusyCountTowardsTheLimit) {
  config_.max_contexts = 2;
  start_session();
  const ScardHandle other = external_holder(kReader1);
  for (uint32_t ctx = 1; ctx <= 2; ++ctx) {
    const uint32_t h = connect_handle(ctx);
    submit(begin_req(ctx, h));
    ASSERT_TRUE(api_.wait_blocked_in_begin(ctx, kDeadline));
    submit(release_req(ctx));
  }
  EXPECT_EQ(call(establish_req(3)).rv, sc::kENoMemory) << "busy released contexts are not counted";
  EXPECT_LE(engine_contexts().size(), 2u);
  ASSERT_EQ(api_.end_transaction(other, sc::kLeaveCard), sc::kSuccess);
}

// =============================================================================================
// Exceptions
// =============================================================================================

TEST_F(DeskEngineTest, ExceptionFromTheCardApiBecomesAnInternalError) {
  start_session();
  const uint32_t h = connect_handle(1);
  api_.throw_once(Call::kTransmit);
  EXPECT_EQ(call(transmit_req(1, h, kSelect)).rv, sc::kFInternalError);
  EXPECT_EQ(call(transmit_req(1, h, kSelect)).rv, sc::kSuccess) << "the context survives";
}

TEST_F(DeskEngineTest, OnFrameDoesNotThrowWhenCloseLinkThrows) {
  ASSERT_TRUE(make_engine());
  link_.set_close_hook([] { throw std::runtime_error("socket already closed"); });
  const std::vector<uint8_t> garbage = {0xFF, 0xFF, 0xFF, 0xFF};
  EXPECT_NO_THROW(engine_->on_frame(garbage));
  EXPECT_EQ(link_.closes().size(), 1u);
}

TEST_F(DeskEngineTest, OnFrameDoesNotThrowWhateverTheTransportThrows) {
  ASSERT_TRUE(make_engine());
  engine_->transport_up();
  link_.set_hook([](const pr::Message&) { throw 7; });  // not a std::exception
  EXPECT_NO_THROW(send(pr::Message{0, server_hello(5, /*reply=*/false)}));
  link_.set_hook(nullptr);  // the engine's threads send too
}

TEST_F(DeskEngineTest, TransportUpDoesNotThrowWhenSendFrameThrows) {
  ASSERT_TRUE(make_engine());
  link_.set_hook([](const pr::Message&) { throw std::runtime_error("channel write failed"); });
  EXPECT_NO_THROW(engine_->transport_up());
  link_.set_hook(nullptr);  // the engine's threads send too
}

// The engine's own threads must survive a throwing dependency. Each scenario runs in a
// child process (death-test machinery, "threadsafe" style: the binary is re-executed), so
// that std::terminate from an escaping exception fails this test only.
void expect_survives(const std::function<int()>& scenario) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(std::_Exit(scenario()), ::testing::ExitedWithCode(0), "");
}

void add_test_readers(FakeCardApi& api) {
  api.add_reader(kReader1);
  api.insert_card(kReader1, test_card(kAtr1));
  api.add_reader(kReader2);
}

TEST(DeskEngineDeathTest, WorkerSurvivesASendFrameThatThrows) {
  expect_survives([] {
    FakeCardApi api;
    add_test_readers(api);
    EngineHarness h(api);
    if (!h.make_engine() || !h.establish_session()) return 10;
    h.link_.set_hook([](const pr::Message& m) {
      if (std::holds_alternative<pr::Reply>(m.body)) throw std::runtime_error("channel write failed");
    });
    const uint32_t first = h.submit(establish_req(1));
    if (!h.wait_reply(first)) return 11;
    const uint32_t second = h.submit(req(pr::Op::kPing, 1));
    if (!h.wait_reply(second)) return 12;
    return 0;
  });
}

TEST(DeskEngineDeathTest, WorkerSurvivesANonStdExceptionFromTheCardApi) {
  expect_survives([] {
    FakeCardApi api;
    add_test_readers(api);
    EngineHarness h(api);
    if (!h.make_engine() || !h.establish_session()) return 10;
    api.throw_once(Call::kEstablish, fake::Throw::kNonStd);
    const uint32_t id = h.submit(establish_req(1));
    auto r = h.wait_reply(id);
    if (!r) return 11;
    if (r->rv != sc::kFInternalError) return 12;
    return h.call(establish_req(1)).rv == sc::kSuccess ? 0 : 13;
  });
}

TEST(DeskEngineDeathTest, MonitorSurvivesAnExceptionFromTheCardApi) {
  expect_survives([] {
    FakeCardApi api;
    add_test_readers(api);
    api.throw_once(Call::kGetStatusChange);
    EngineHarness h(api);
    h.make_engine();
    // Whatever the engine does after the failure, it must go on watching the readers.
    if (!api.wait_watcher_idle(kDeadline)) return 10;
    api.insert_card(kReader2, test_card(kAtr2));
    if (!api.wait_watcher_idle(kDeadline)) return 11;
    const auto snap = h.engine_->current_readers();
    const auto* r2 = reader_in(snap, kReader2);
    return r2 && r2->atr == kAtr2 ? 0 : 12;
  });
}

// =============================================================================================
// stop()
// =============================================================================================

TEST(DeskEngineStop, IsBoundedWhileAWorkerIsStuckInBegin) {
  // Another program holds the card's transaction for ever: the worker's Begin never
  // returns. The fake is leaked on purpose, so that the abandoned worker blocks in it for
  // the rest of the process instead of waking up against a destroyed engine.
  static auto* api = new FakeCardApi;
  add_test_readers(*api);
  EngineHarness h(*api);
  ASSERT_TRUE(h.make_engine());
  ASSERT_TRUE(h.establish_session());
  h.external_holder(kReader1);
  const uint32_t handle = h.connect_handle(1);
  h.submit(begin_req(1, handle));
  ASSERT_TRUE(api->wait_blocked_in_begin(1, kDeadline));

  const auto t0 = Clock::now();
  h.engine_->stop();
  const auto took = Clock::now() - t0;
  EXPECT_LT(took, 3500ms) << "stop() is documented to wait at most 2 s for busy workers";
  EXPECT_FALSE(h.engine_->session_established());
  // The monitor's context is released; the stuck worker's cannot be.
  EXPECT_TRUE(api->wait_released(1, kDeadline));
}

TEST(DeskEngineStop, IsPromptWhenIdleAndIdempotent) {
  FakeCardApi api;
  add_test_readers(api);
  EngineHarness h(api);
  ASSERT_TRUE(h.make_engine());
  ASSERT_TRUE(h.establish_session());
  ASSERT_EQ(h.call(establish_req(1)).rv, sc::kSuccess);
  const auto t0 = Clock::now();
  h.engine_->stop();
  EXPECT_LT(Clock::now() - t0, 1s);
  EXPECT_TRUE(api.wait_released(2, kDeadline)) << "the worker's and the monitor's contexts";
  h.engine_->stop();
}

// stop() "releases everything": a transport that still delivers frames afterwards (a late
// channel callback) must not bring the engine back, open PC/SC contexts nobody will release,
// or start worker threads nobody will join.
TEST(DeskEngineStop, FramesAfterStopAreIgnored) {
  FakeCardApi api;
  add_test_readers(api);
  EngineHarness h(api);
  ASSERT_TRUE(h.make_engine());
  ASSERT_TRUE(h.establish_session());
  h.engine_->stop();
  const auto mark = h.link_.size();
  h.send(pr::Message{0, server_hello(0x51, /*reply=*/true)});
  const uint32_t id = h.submit(establish_req(1));
  EXPECT_FALSE(h.wait_reply(id, kQuiet)) << "a stopped engine served a request";
  EXPECT_FALSE(h.engine_->session_established());
  EXPECT_TRUE(h.engine_contexts().empty()) << "a stopped engine opened a PC/SC context";
  EXPECT_TRUE(bodies<pr::ReaderSnapshot>(h.link_.messages(), mark).empty());
}

}  // namespace
}  // namespace cardbridge::client
