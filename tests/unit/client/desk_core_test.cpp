// DeskCore, sans I/O: the test is its edge. Every PC/SC call the core asks for waits in the
// test's queue until the test makes it (on FakeCardApi, or with a result of its own); the
// order in which lanes' calls complete is the test's choice, so blocking, ordering and
// session ends are played exactly, with no thread and no clock.
#include "cardbridge/desk_core/desk_core.hpp"

#include <deque>
#include <map>
#include <set>

#include <gtest/gtest.h>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/framing.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/scard.hpp"
#include "fake_card_api.hpp"

namespace cardbridge::client {
namespace {

namespace pr = cardbridge::protocol;
namespace sc = cardbridge::scard;
using fake::FakeCard;
using fake::FakeCardApi;
using namespace std::chrono_literals;

const std::string kReader1 = "Gemalto PC Twin Reader 00 00";
const std::string kReader2 = "OMNIKEY CardMan 3121 01 00";
const Bytes kAtr1 = {0x3B, 0x7F, 0x96, 0x00, 0x00, 0x80, 0x31, 0x80, 0x65, 0xB0};
const Bytes kSelect = {0x00, 0xA4, 0x04, 0x00, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x03, 0x10, 0x10};
const Bytes kGetChallenge = {0x00, 0x84, 0x00, 0x00, 0x08};
constexpr uint32_t kFeatureRequest = 0x42000D48;  // SCARD_CTL_CODE(3400)

TimePoint t0() { return TimePoint{} + 1000h; }
const PeerIdentity kServer = PeerIdentity::unix_user(0, 99);

FakeCard test_card() {
  FakeCard c;
  c.atr = kAtr1;
  c.protocols = sc::kProtocolT0 | sc::kProtocolT1;
  c.answers[kSelect] = {0x90, 0x00};
  c.answers[kGetChallenge] = {1, 2, 3, 4, 5, 6, 7, 8, 0x90, 0x00};
  return c;
}

pr::Request req(pr::Op op, uint32_t ctx, uint32_t handle = 0) {
  pr::Request q;
  q.op = op;
  q.context = pr::ContextId{ctx};
  q.handle = pr::DeskHandle{handle};
  return q;
}
pr::Request connect_req(uint32_t ctx, const std::string& reader, uint32_t share = sc::kShareShared) {
  auto q = req(pr::Op::kConnect, ctx);
  q.reader = reader;
  q.share_mode = share;
  q.protocols = sc::kProtocolT0 | sc::kProtocolT1;
  return q;
}
pr::Request transmit_req(uint32_t ctx, uint32_t handle, Bytes apdu, uint32_t recv_length = 258) {
  auto q = req(pr::Op::kTransmit, ctx, handle);
  q.protocols = sc::kProtocolT1;
  q.data = std::move(apdu);
  q.recv_length = recv_length;
  return q;
}

pr::Hello server_hello(uint64_t instance, uint64_t caps = pr::caps::kAll) {
  pr::Hello h = pr::local_hello(pr::Role::kServer, caps);
  h.software = "cardbridge-shim test";
  h.peer_name = "session-server-7";
  h.instance = instance;
  return h;
}

// The core's edge, played by the test.
class Edge : public DeskEffects {
 public:
  struct Pending {
    LaneId lane;
    PcscCall call;
  };
  std::vector<pr::Message> sent;
  std::vector<std::string> closed;
  std::deque<Pending> calls;
  std::vector<LaneId> lanes_closed;

  void send(std::vector<uint8_t> bytes) override {
    pr::FrameDecoder d;
    ASSERT_TRUE(d.feed(bytes));
    auto f = d.next();
    ASSERT_TRUE(f);
    auto m = pr::decode(*f);
    ASSERT_TRUE(m.ok()) << m.error().what;
    sent.push_back(std::move(*m));
  }
  void close_link(const std::string& reason) override { closed.push_back(reason); }
  void execute(LaneId lane, PcscCall c) override {
    for (const auto& p : calls) EXPECT_NE(p.lane, lane) << "a lane has at most one call in flight";
    calls.push_back(Pending{lane, std::move(c)});
  }
  void lane_closed(LaneId lane) override { lanes_closed.push_back(lane); }
  void audit(const DeskAudit& a) override { audits.push_back(a); }
  std::vector<DeskAudit> audits;

  std::set<LaneId> busy_lanes() const {
    std::set<LaneId> out;
    for (const auto& p : calls) out.insert(p.lane);
    return out;
  }
};

class DeskCoreTest : public ::testing::Test {
 protected:
  DeskCoreTest() {
    api.add_reader(kReader1);
    api.add_reader(kReader2);
    api.insert_card(kReader1, test_card());
    config.desk_name = "desk-042";
    config.capabilities = pr::caps::kAll;
    config.random_seed = 3;
    config.server_policy.unix_uids = {0};  // the tests' server comes as root over a UNIX socket
  }

  DeskCore& core() {
    if (!core_) core_ = std::make_unique<DeskCore>(edge, config);
    return *core_;
  }
  void hear(const pr::Message& m) { core().receive(pr::encode_frame(m), t0()); }
  void establish(uint64_t instance = 0x5E55100, uint64_t caps = pr::caps::kAll) {
    core().transport_up(t0(), kServer);
    hear(pr::Message{0, server_hello(instance, caps)});
    ASSERT_TRUE(core().session_established());
  }
  uint32_t submit(pr::Request q) {
    const uint32_t id = next_id_++;
    hear(pr::Message{id, std::move(q)});
    return id;
  }

  // Makes the oldest pending call (of |lane|, or of any lane) on the fake, and reports it.
  bool run_one(std::optional<LaneId> lane = std::nullopt) {
    for (auto it = edge.calls.begin(); it != edge.calls.end(); ++it) {
      if (lane && it->lane != *lane) continue;
      Edge::Pending p = std::move(*it);
      edge.calls.erase(it);
      core().call_done(p.lane, run_call(api, p.call), t0());
      return true;
    }
    return false;
  }
  // Completes the oldest pending call of |lane| with |r| instead of making it.
  void answer(LaneId lane, CallResult r) {
    for (auto it = edge.calls.begin(); it != edge.calls.end(); ++it) {
      if (it->lane != lane) continue;
      edge.calls.erase(it);
      core().call_done(lane, std::move(r), t0());
      return;
    }
    ADD_FAILURE() << "no call pending on lane " << lane;
  }
  void run_all() {
    while (run_one()) {
    }
  }
  std::optional<pr::Reply> reply_to(uint32_t id) const {
    for (const auto& m : edge.sent) {
      if (auto* r = std::get_if<pr::Reply>(&m.body); r && m.id == id) return *r;
    }
    return std::nullopt;
  }
  pr::Reply call(pr::Request q) {
    const uint32_t id = submit(std::move(q));
    run_all();
    auto r = reply_to(id);
    EXPECT_TRUE(r) << "no reply to request " << id;
    return r.value_or(pr::Reply{});
  }
  // Context |ctx| with a card handle on kReader1; returns the desk handle.
  uint32_t connected(uint32_t ctx, uint32_t share = sc::kShareShared) {
    auto r = call(connect_req(ctx, kReader1, share));
    EXPECT_EQ(r.rv, sc::kSuccess);
    return r.handle.value;
  }
  template <typename T>
  std::vector<T> sent_of() const {
    std::vector<T> out;
    for (const auto& m : edge.sent) {
      if (auto* b = std::get_if<T>(&m.body)) out.push_back(*b);
    }
    return out;
  }
  std::size_t calls_of(const PcscCall& kind) const {
    std::size_t n = 0;
    for (const auto& p : edge.calls) n += p.call.index() == kind.index();
    return n;
  }

  FakeCardApi api;
  DeskConfig config;
  Edge edge;
  std::unique_ptr<DeskCore> core_;
  uint32_t next_id_ = 1;
};

// ---- the session ------------------------------------------------------------------------

TEST_F(DeskCoreTest, TransportUpSaysHelloAsTheDeskWithItsName) {
  core().transport_up(t0(), kServer);
  auto hellos = sent_of<pr::Hello>();
  ASSERT_EQ(hellos.size(), 1u);
  EXPECT_EQ(hellos[0].role, pr::Role::kDesk);
  EXPECT_EQ(hellos[0].peer_name, "desk-042");
  EXPECT_EQ(hellos[0].software.rfind("cardbridge-desk ", 0), 0u) << hellos[0].software;
  EXPECT_EQ(core().next_deadline(), t0() + config.hello_retry) << "retried until the server answers";
}

TEST_F(DeskCoreTest, TheServersHelloIsAnsweredThenTheCurrentReadersAreSent) {
  core().readers({pr::ReaderInfo{kReader1, sc::kStatePresent, 3, kAtr1}}, t0());
  EXPECT_TRUE(sent_of<pr::ReaderSnapshot>().empty()) << "nothing is pushed before a session";
  establish();
  ASSERT_GE(edge.sent.size(), 3u);
  auto* reply_hello = std::get_if<pr::Hello>(&edge.sent[1].body);
  ASSERT_TRUE(reply_hello);
  EXPECT_TRUE(reply_hello->reply);
  auto* snap = std::get_if<pr::ReaderSnapshot>(&edge.sent[2].body);
  ASSERT_TRUE(snap);
  ASSERT_EQ(snap->readers.size(), 1u);
  EXPECT_EQ(snap->readers[0].name, kReader1);
  EXPECT_EQ(snap->readers[0].atr, kAtr1);
  EXPECT_EQ(core().server_name(), "session-server-7");
}

TEST_F(DeskCoreTest, ReaderChangesArePushedOnceAndAnIdleDeskSendsNothing) {
  establish();
  const auto before = edge.sent.size();
  std::vector<pr::ReaderInfo> v1{pr::ReaderInfo{kReader1, sc::kStateEmpty, 1, {}}};
  core().readers(v1, t0());
  core().readers(v1, t0());
  auto snaps = sent_of<pr::ReaderSnapshot>();
  ASSERT_EQ(edge.sent.size(), before + 1);
  EXPECT_EQ(snaps.back().readers, v1);
  EXPECT_GT(snaps.back().sequence, snaps.front().sequence);
  EXPECT_FALSE(core().next_deadline()) << "an established idle desk has no timer";
}

TEST_F(DeskCoreTest, RequestsBeforeTheHelloAreIgnored) {
  core().transport_up(t0(), kServer);
  submit(req(pr::Op::kEstablishContext, 1));
  EXPECT_TRUE(edge.calls.empty());
  EXPECT_TRUE(sent_of<pr::Reply>().empty());
}

TEST_F(DeskCoreTest, AMalformedFrameClosesTheLink) {
  establish();
  const std::vector<uint8_t> junk{0, 0, 0, 2, 0xFF, 0xFF};
  core().receive(junk, t0());
  ASSERT_EQ(edge.closed.size(), 1u);
  EXPECT_FALSE(core().session_established());
}

TEST_F(DeskCoreTest, AServerThePolicyDoesNotAllowGetsNoHelloAndTheLinkIsClosed) {
  core().transport_up(t0(), PeerIdentity::unix_user(1001, 5));
  EXPECT_TRUE(edge.sent.empty());
  ASSERT_EQ(edge.closed.size(), 1u);
  hear(pr::Message{0, server_hello(9)});
  EXPECT_FALSE(core().session_established());
  EXPECT_TRUE(edge.calls.empty());
}

// ---- contexts and calls -----------------------------------------------------------------

TEST_F(DeskCoreTest, EachServerContextGetsAPcscContextOfItsOwn) {
  establish();
  EXPECT_EQ(call(req(pr::Op::kEstablishContext, 1)).rv, sc::kSuccess);
  EXPECT_EQ(call(req(pr::Op::kEstablishContext, 2)).rv, sc::kSuccess);
  EXPECT_EQ(call(req(pr::Op::kEstablishContext, 1)).rv, sc::kSuccess);
  EXPECT_EQ(api.live_worker_contexts(), 2u);
  EXPECT_EQ(core().lane_count(), 2u);
}

TEST_F(DeskCoreTest, ADeadDeskServiceIsReportedOnTheRequest) {
  establish();
  api.set_service_available(false);
  EXPECT_EQ(call(req(pr::Op::kEstablishContext, 1)).rv, sc::kENoService);
}

TEST_F(DeskCoreTest, ConnectAnswersADeskHandleTheProtocolAndTheCardState) {
  establish();
  auto r = call(connect_req(1, kReader1));
  ASSERT_EQ(r.rv, sc::kSuccess);
  EXPECT_NE(r.handle.value, 0u);
  EXPECT_NE(r.handle.value, static_cast<uint32_t>(api.live_handles().at(0))) << "never the raw handle";
  EXPECT_EQ(r.protocol, sc::kProtocolT1) << "the card's T=1, as the desk's PC/SC chose it";
  EXPECT_EQ(r.atr, kAtr1);
  EXPECT_NE(r.state & sc::kReaderPresent, 0u);
  EXPECT_EQ(r.state >> 16, api.event_counter(kReader1));
  EXPECT_NE(r.card_protocol, 0u);
}

TEST_F(DeskCoreTest, ConnectFailuresArePassedThrough) {
  establish();
  EXPECT_EQ(call(connect_req(1, kReader2)).rv, sc::kENoSmartcard);
  EXPECT_EQ(call(connect_req(1, "No Such Reader")).rv, sc::kEUnknownReader);
}

TEST_F(DeskCoreTest, AConnectOnAContextOfARestartedServiceStartsOverWithAFreshContext) {
  establish();
  EXPECT_EQ(call(req(pr::Op::kEstablishContext, 1)).rv, sc::kSuccess);
  api.set_service_available(false);
  api.set_service_available(true);  // the old context stays dead
  auto r = call(connect_req(1, kReader1));
  EXPECT_EQ(r.rv, sc::kSuccess);
  EXPECT_EQ(api.live_worker_contexts(), 1u);
}

// Found by fuzz_desk_core: the fresh context's Connect kept the dead context's card handles
// mapped, so later calls on them reached the new pcscd with handles of the old one.
TEST_F(DeskCoreTest, AContextStartedOverForgetsTheDeadContextsHandles) {
  establish();
  const uint32_t old_handle = connected(1);
  api.set_service_available(false);
  api.set_service_available(true);  // the old context and its handle stay dead
  EXPECT_EQ(call(connect_req(1, kReader1)).rv, sc::kSuccess);
  const auto transmits = api.calls(fake::Call::kTransmit);
  EXPECT_EQ(call(transmit_req(1, old_handle, kGetChallenge)).rv, sc::kEInvalidHandle);
  EXPECT_EQ(api.calls(fake::Call::kTransmit), transmits) << "the dead handle went to the desk's pcscd";
}

TEST_F(DeskCoreTest, ConnectToAReaderThePolicyHidesIsAnUnknownReader) {
  config.policy.reader_filter = {"omnikey"};
  establish();
  EXPECT_EQ(call(connect_req(1, kReader1)).rv, sc::kEUnknownReader);
  EXPECT_EQ(api.calls(fake::Call::kConnect), 0u) << "the reader was never touched";
}

TEST_F(DeskCoreTest, TransmitReturnsTheCardsAnswerAndTheReceivePci) {
  establish();
  const uint32_t h = connected(1);
  auto r = call(transmit_req(1, h, kGetChallenge));
  EXPECT_EQ(r.rv, sc::kSuccess);
  EXPECT_EQ(r.data, (Bytes{1, 2, 3, 4, 5, 6, 7, 8, 0x90, 0x00}));
  EXPECT_TRUE(r.prefetched.empty());
}

TEST_F(DeskCoreTest, TransmitIntoTooSmallABufferPassesTheNeededLength) {
  establish();
  const uint32_t h = connected(1);
  auto r = call(transmit_req(1, h, kGetChallenge, 4));
  EXPECT_EQ(r.rv, sc::kEInsufficientBuffer);
  EXPECT_EQ(r.length, 10u);
  EXPECT_TRUE(r.data.empty());
}

TEST_F(DeskCoreTest, ARemovedCardIsReported) {
  establish();
  const uint32_t h = connected(1);
  api.remove_card(kReader1);
  EXPECT_EQ(call(transmit_req(1, h, kSelect)).rv, sc::kWRemovedCard);
}

TEST_F(DeskCoreTest, ControlRunsOnlyWhenThePolicyAllowsTheCode) {
  config.policy.control_allow = ControlAllow{.pinpad = false, .codes = {kFeatureRequest}};
  api.set_control_answer(kReader1, kFeatureRequest, {0x12, 0x04, 0x42, 0x33, 0x00, 0x12});
  api.set_control_answer(kReader1, 0x42000001, {0x90, 0x00});
  establish();
  const uint32_t h = connected(1);
  auto ok = req(pr::Op::kControl, 1, h);
  ok.code = kFeatureRequest;
  ok.recv_length = 64;
  auto r = call(ok);
  EXPECT_EQ(r.rv, sc::kSuccess);
  EXPECT_EQ(r.data.size(), 6u);
  auto refused = ok;
  refused.code = 0x42000001;
  EXPECT_EQ(call(refused).rv, sc::kEUnsupportedFeature);
  EXPECT_EQ(api.calls(fake::Call::kControl), 1u) << "a refused code never reaches the reader";
}

// The default policy: feature discovery and the PIN-pad codes the reader announces; escape
// commands refused before they reach the reader.
constexpr uint32_t kEscape = 0x42000DAC;        // IOCTL_CCID_ESCAPE
constexpr uint32_t kVerifyDirect = 0x42330006;  // FEATURE_VERIFY_PIN_DIRECT, as libccid numbers it
constexpr uint32_t kGetKey = 0x42330010;        // FEATURE_GET_KEY: announced, but not a PIN-pad code

TEST_F(DeskCoreTest, TheDefaultPolicyRefusesEscapeCommandsBeforeTheReader) {
  api.set_control_answer(kReader1, kEscape, {0x90, 0x00});
  establish();
  const uint32_t h = connected(1);
  auto esc = req(pr::Op::kControl, 1, h);
  esc.code = kEscape;
  esc.recv_length = 64;
  EXPECT_EQ(call(esc).rv, sc::kEUnsupportedFeature);
  EXPECT_EQ(api.calls(fake::Call::kControl), 0u) << "the escape command reached the reader";
}

TEST_F(DeskCoreTest, TheDefaultPolicyLetsThroughThePinPadCodesTheReaderAnnounces) {
  api.set_control_answer(kReader1, kFeatureRequest,
                         {0x06, 0x04, 0x42, 0x33, 0x00, 0x06, 0x10, 0x04, 0x42, 0x33, 0x00, 0x10});
  api.set_control_answer(kReader1, kVerifyDirect, {0x90, 0x00});
  api.set_control_answer(kReader1, kGetKey, {0x31});
  establish();
  const uint32_t h = connected(1);
  auto verify = req(pr::Op::kControl, 1, h);
  verify.code = kVerifyDirect;
  verify.data = {0x1E, 0x1E, 0x02};  // a PIN_VERIFY_STRUCTURE's start; content irrelevant here
  verify.recv_length = 64;
  auto r = call(verify);
  EXPECT_EQ(r.rv, sc::kSuccess);
  EXPECT_EQ(r.data, (Bytes{0x90, 0x00}));
  EXPECT_EQ(api.calls(fake::Call::kControl), 2u) << "the feature list, then the verify";
  EXPECT_EQ(call(verify).rv, sc::kSuccess);
  EXPECT_EQ(api.calls(fake::Call::kControl), 3u) << "the feature list is asked once per handle";
  auto key = verify;
  key.code = kGetKey;
  EXPECT_EQ(call(key).rv, sc::kEUnsupportedFeature) << "GET_KEY returns the typed keys: not a PIN-pad code";
  EXPECT_EQ(api.calls(fake::Call::kControl), 3u);
}

TEST_F(DeskCoreTest, APinPadCodeTheReaderDoesNotAnnounceIsRefused) {
  // No feature list at all (the fake answers SCARD_E_UNSUPPORTED_FEATURE, as a reader
  // without part 10 support does).
  api.set_control_answer(kReader1, kVerifyDirect, {0x90, 0x00});
  establish();
  const uint32_t h = connected(1);
  auto verify = req(pr::Op::kControl, 1, h);
  verify.code = kVerifyDirect;
  verify.recv_length = 64;
  EXPECT_EQ(call(verify).rv, sc::kEUnsupportedFeature);
  EXPECT_EQ(api.calls(fake::Call::kControl), 1u) << "only the feature request reached the reader";
}

TEST_F(DeskCoreTest, AttributesAreReadAndWrittenWhenThePolicyAllows) {
  config.policy.set_attrib_allow = SetAttribAllow{.all = false, .attributes = {sc::kAttrVendorName}};
  api.set_attribute(kReader1, sc::kAttrVendorName, {'A', 'C', 'M', 'E'});
  establish();
  const uint32_t h = connected(1);
  auto get = req(pr::Op::kGetAttrib, 1, h);
  get.code = sc::kAttrVendorName;
  get.recv_length = 64;
  auto r = call(get);
  EXPECT_EQ(r.rv, sc::kSuccess);
  EXPECT_EQ(r.data, (Bytes{'A', 'C', 'M', 'E'}));
  auto set = req(pr::Op::kSetAttrib, 1, h);
  set.code = sc::kAttrVendorName;
  set.data = {'Z'};
  EXPECT_EQ(call(set).rv, sc::kSuccess);
  EXPECT_EQ(call(get).data, (Bytes{'Z'})) << "the value reached the reader";
}

TEST_F(DeskCoreTest, SetAttribIsRefusedByDefault) {
  api.set_attribute(kReader1, sc::kAttrVendorName, {'A', 'C', 'M', 'E'});
  establish();
  const uint32_t h = connected(1);
  auto set = req(pr::Op::kSetAttrib, 1, h);
  set.code = sc::kAttrVendorName;
  set.data = {'Z'};
  EXPECT_EQ(call(set).rv, sc::kEUnsupportedFeature);
  EXPECT_EQ(api.calls(fake::Call::kSetAttrib), 0u) << "a refused SetAttrib reached the reader";
  auto get = req(pr::Op::kGetAttrib, 1, h);
  get.code = sc::kAttrVendorName;
  get.recv_length = 64;
  EXPECT_EQ(call(get).data, (Bytes{'A', 'C', 'M', 'E'}));
}

TEST_F(DeskCoreTest, ReconnectAnswersTheProtocolAndTheCardState) {
  establish();
  const uint32_t h = connected(1);
  auto q = req(pr::Op::kReconnect, 1, h);
  q.share_mode = sc::kShareShared;
  q.protocols = sc::kProtocolT1;
  q.disposition = sc::kResetCard;
  auto r = call(q);
  EXPECT_EQ(r.rv, sc::kSuccess);
  EXPECT_EQ(r.protocol, sc::kProtocolT1);
  EXPECT_EQ(r.atr, kAtr1);
}

TEST_F(DeskCoreTest, DisconnectForgetsTheHandle) {
  establish();
  const uint32_t h = connected(1);
  auto d = req(pr::Op::kDisconnect, 1, h);
  d.disposition = sc::kLeaveCard;
  EXPECT_EQ(call(d).rv, sc::kSuccess);
  EXPECT_EQ(core().handle_count(), 0u);
  EXPECT_EQ(call(transmit_req(1, h, kSelect)).rv, sc::kEInvalidHandle);
}

TEST_F(DeskCoreTest, StatusAnswersReaderStateProtocolAndAtr) {
  establish();
  const uint32_t h = connected(1);
  auto r = call(req(pr::Op::kStatus, 1, h));
  EXPECT_EQ(r.rv, sc::kSuccess);
  EXPECT_EQ(r.reader, kReader1);
  EXPECT_EQ(r.atr, kAtr1);
  EXPECT_NE(r.protocol, 0u);
}

TEST_F(DeskCoreTest, AHandleOfAnotherContextOrAnUnknownOneIsInvalid) {
  establish();
  const uint32_t h = connected(1);
  EXPECT_EQ(call(transmit_req(2, h, kSelect)).rv, sc::kEInvalidHandle);
  EXPECT_EQ(call(transmit_req(1, h + 1000, kSelect)).rv, sc::kEInvalidHandle);
  EXPECT_EQ(api.calls(fake::Call::kTransmit), 0u);
}

TEST_F(DeskCoreTest, PingsAreAnsweredAtOnceEvenWithEveryLaneBusy) {
  establish();
  submit(connect_req(1, kReader1));
  ASSERT_EQ(edge.calls.size(), 1u);  // the lane's Establish is at the edge, not made
  const uint32_t ping = submit(req(pr::Op::kPing, 0));
  EXPECT_TRUE(reply_to(ping)) << "the server's liveness check never waits for a card";
  EXPECT_EQ(edge.calls.size(), 1u) << "a Ping makes no PC/SC call";
}

// ---- lanes: parallel contexts, order within one ---------------------------------------------

TEST_F(DeskCoreTest, ABlockedCallHoldsUpOnlyItsOwnContext) {
  establish();
  const uint32_t h1 = connected(1);
  const uint32_t h2 = connected(2);
  const uint32_t begin = submit(req(pr::Op::kBeginTransaction, 1, h1));  // say pcscd makes it wait
  const LaneId blocked = edge.calls.back().lane;
  const uint32_t other = submit(transmit_req(2, h2, kGetChallenge));
  ASSERT_EQ(edge.busy_lanes().size(), 2u);
  ASSERT_TRUE(run_one(edge.calls.back().lane));
  EXPECT_TRUE(reply_to(other));
  EXPECT_FALSE(reply_to(begin));
  run_one(blocked);
  EXPECT_TRUE(reply_to(begin));
}

TEST_F(DeskCoreTest, RepliesOfOneContextKeepTheirOrderAndOneCallIsInFlightPerContext) {
  establish();
  const uint32_t h = connected(1);
  std::vector<uint32_t> ids;
  for (int i = 0; i < 4; ++i) ids.push_back(submit(transmit_req(1, h, kSelect)));
  EXPECT_EQ(edge.calls.size(), 1u);
  run_all();
  std::vector<uint32_t> order;
  for (const auto& m : edge.sent) {
    if (std::holds_alternative<pr::Reply>(m.body) && m.id >= ids.front()) order.push_back(m.id);
  }
  EXPECT_EQ(order, ids);
}

// Found by fuzz_desk_core (ASan: a use after free): a ReleaseContext waiting for another
// context's request, on a lane whose PC/SC context was never made, is answered and closes
// its lane from inside the loop that wakes the waiting lanes.
TEST_F(DeskCoreTest, AWaitingReleaseOfAContextThatNeverGotOneClosesItsLaneSafely) {
  establish();
  api.set_service_available(false);
  EXPECT_EQ(call(transmit_req(2, 7, kSelect)).rv, sc::kENoService) << "context 2: no PC/SC context";
  EXPECT_EQ(call(transmit_req(3, 7, kSelect)).rv, sc::kENoService) << "context 3: no PC/SC context";
  api.set_service_available(true);
  const uint32_t h1 = connected(1);
  ASSERT_EQ(core().lane_count(), 3u) << "contexts 2 and 3 keep lanes without a PC/SC context";
  const uint32_t end = submit(req(pr::Op::kEndTransaction, 1, h1));
  uint32_t releases[2];
  for (uint32_t c = 2; c <= 3; ++c) {
    auto r = req(pr::Op::kReleaseContext, c);
    r.after = {end};
    releases[c - 2] = submit(r);
  }
  EXPECT_FALSE(reply_to(releases[0]) || reply_to(releases[1])) << "the releases wait for the End";
  run_all();
  for (uint32_t id : releases) {
    auto r = reply_to(id);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->rv, sc::kSuccess);
  }
  EXPECT_EQ(core().lane_count(), 1u) << "contexts 2 and 3 are gone, context 1 stays";
}

TEST_F(DeskCoreTest, ARequestWaitsForTheEarlierRequestsOfOtherContextsItNames) {
  establish();
  const uint32_t h1 = connected(1);
  const uint32_t h2 = connected(2);
  const uint32_t end = submit(req(pr::Op::kEndTransaction, 1, h1));  // pipelined by the shim
  auto t = transmit_req(2, h2, kSelect);
  t.after = {end};
  const uint32_t tx = submit(t);
  EXPECT_EQ(edge.calls.size(), 1u) << "the transmit waits for the End";
  run_one();
  EXPECT_TRUE(reply_to(end));
  ASSERT_EQ(edge.calls.size(), 1u) << "now it starts";
  run_all();
  EXPECT_TRUE(reply_to(tx));
}

TEST_F(DeskCoreTest, OrderingIdsThatCannotBeWaitedForAreIgnored) {
  establish();
  const uint32_t h = connected(1);
  auto t = transmit_req(1, h, kSelect);
  t.after = {4242, 0, next_id_ + 5};  // unknown, zero, later than itself
  EXPECT_EQ(call(t).rv, sc::kSuccess);
}

TEST_F(DeskCoreTest, WithoutTheOrderingCapabilityAfterIsIgnored) {
  establish(0x5E55100, pr::caps::kAll & ~pr::caps::kDeskOrdering);
  const uint32_t h1 = connected(1);
  const uint32_t h2 = connected(2);
  submit(req(pr::Op::kEndTransaction, 1, h1));
  auto t = transmit_req(2, h2, kSelect);
  t.after = {next_id_ - 1};
  submit(t);
  EXPECT_EQ(edge.calls.size(), 2u);
}

TEST_F(DeskCoreTest, TheSessionEndingReleasesARequestWaitingForOrder) {
  establish();
  const uint32_t h1 = connected(1);
  const uint32_t h2 = connected(2);
  const uint32_t end = submit(req(pr::Op::kEndTransaction, 1, h1));
  auto t = transmit_req(2, h2, kSelect);
  t.after = {end};
  submit(t);
  core().transport_down(t0());
  run_all();
  EXPECT_TRUE(core().idle());
  EXPECT_EQ(api.live_worker_contexts(), 0u);
  EXPECT_EQ(api.calls(fake::Call::kTransmit), 0u);
}

// ---- releasing contexts, ending sessions --------------------------------------------------

TEST_F(DeskCoreTest, ReleaseContextRunsWhatWasSentBeforeThenReleasesAndAnswers) {
  establish();
  const uint32_t h = connected(1);
  const uint32_t tx = submit(transmit_req(1, h, kSelect));
  const uint32_t rel = submit(req(pr::Op::kReleaseContext, 1));
  run_all();
  ASSERT_TRUE(reply_to(tx));
  ASSERT_TRUE(reply_to(rel));
  EXPECT_EQ(api.live_worker_contexts(), 0u);
  EXPECT_EQ(core().handle_count(), 0u);
  EXPECT_EQ(edge.lanes_closed.size(), 1u);
  EXPECT_EQ(call(transmit_req(1, h, kSelect)).rv, sc::kEInvalidHandle) << "a new context 1 knows no handle";
}

TEST_F(DeskCoreTest, ReleasingAnUnknownContextIsAnsweredWithoutACall) {
  establish();
  EXPECT_EQ(call(req(pr::Op::kReleaseContext, 9)).rv, sc::kSuccess);
  EXPECT_EQ(api.calls(fake::Call::kRelease), 0u);
}

TEST_F(DeskCoreTest, TheTransportGoingReleasesEverythingAndNothingMoreIsSent) {
  establish();
  connected(1);
  connected(2);
  submit(transmit_req(1, 1, kSelect));
  const auto sent = edge.sent.size();
  core().transport_down(t0());
  run_all();
  EXPECT_EQ(edge.sent.size(), sent);
  EXPECT_EQ(api.live_worker_contexts(), 0u);
  EXPECT_TRUE(core().idle());
}

TEST_F(DeskCoreTest, AnAnswerInFlightIsNotDeliveredToTheNextSession) {
  establish(1);
  const uint32_t h = connected(1);
  const uint32_t tx = submit(transmit_req(1, h, kGetChallenge));
  hear(pr::Message{0, server_hello(2)});  // the server restarted (or the user roamed)
  ASSERT_TRUE(core().session_established());
  run_all();
  EXPECT_FALSE(reply_to(tx));
  EXPECT_EQ(api.live_worker_contexts(), 0u);
}

TEST_F(DeskCoreTest, AConnectThatFinishesAfterTheSessionEndedLeavesNoHandle) {
  establish();
  submit(req(pr::Op::kEstablishContext, 1));
  run_all();
  const uint32_t c = submit(connect_req(1, kReader1, sc::kShareExclusive));
  core().transport_down(t0());
  run_all();  // the Connect made at the desk, then the context released
  EXPECT_FALSE(reply_to(c));
  EXPECT_TRUE(api.live_handles().empty());
  EXPECT_EQ(api.live_worker_contexts(), 0u);
}

TEST_F(DeskCoreTest, MoreContextsThanTheLimitGetNoMemory) {
  config.max_contexts = 2;
  establish();
  EXPECT_EQ(call(req(pr::Op::kEstablishContext, 1)).rv, sc::kSuccess);
  EXPECT_EQ(call(req(pr::Op::kEstablishContext, 2)).rv, sc::kSuccess);
  EXPECT_EQ(call(req(pr::Op::kEstablishContext, 3)).rv, sc::kENoMemory);
  EXPECT_EQ(core().stats().refused_contexts, 1u);
  call(req(pr::Op::kReleaseContext, 1));
  EXPECT_EQ(call(req(pr::Op::kEstablishContext, 3)).rv, sc::kSuccess);
}

TEST_F(DeskCoreTest, ContextsOfAnEndedSessionStillBusyCountTowardsTheLimit) {
  config.max_contexts = 1;
  establish(1);
  const uint32_t h = connected(1);
  submit(req(pr::Op::kBeginTransaction, 1, h));  // stays at the edge
  hear(pr::Message{0, server_hello(2)});
  EXPECT_EQ(call(req(pr::Op::kEstablishContext, 1)).rv, sc::kENoMemory) << "the old lane still holds a context";
  run_all();
  EXPECT_EQ(call(req(pr::Op::kEstablishContext, 1)).rv, sc::kSuccess);
}

TEST_F(DeskCoreTest, ShutdownReleasesEveryContextOnceTheCallsInFlightReturn) {
  establish();
  const uint32_t h = connected(1);
  connected(2);
  submit(transmit_req(1, h, kSelect));
  core().shutdown(t0());
  EXPECT_FALSE(core().idle()) << "lane 1's call is still at the edge";
  run_all();
  EXPECT_TRUE(core().idle());
  EXPECT_EQ(api.live_worker_contexts(), 0u);
  core().receive(pr::encode_frame(pr::Message{99, req(pr::Op::kEstablishContext, 5)}), t0());
  EXPECT_TRUE(edge.calls.empty()) << "nothing is served after shutdown";
}

// ---- deferred Begin and speculation --------------------------------------------------------

TEST_F(DeskCoreTest, ADeferredBeginIsTakenBeforeTheOperationThatCarriesIt) {
  establish();
  const uint32_t h = connected(1);
  auto t = transmit_req(1, h, kSelect);
  t.flags = pr::request_flags::kBeginFirst;
  auto r = call(t);
  EXPECT_EQ(r.rv, sc::kSuccess);
  EXPECT_EQ(r.begin_rv, sc::kSuccess);
  EXPECT_EQ(api.calls(fake::Call::kBeginTransaction), 1u);
  EXPECT_TRUE(api.transaction_holder(kReader1).has_value());
}

TEST_F(DeskCoreTest, AFailedDeferredBeginIsReportedAndTheOperationNotMade) {
  establish();
  const uint32_t h = connected(1);
  api.remove_card(kReader1);
  auto t = transmit_req(1, h, kSelect);
  t.flags = pr::request_flags::kBeginFirst;
  auto r = call(t);
  EXPECT_EQ(r.rv, sc::kWRemovedCard);
  EXPECT_EQ(r.begin_rv, sc::kWRemovedCard);
  EXPECT_EQ(api.calls(fake::Call::kTransmit), 0u);
}

TEST_F(DeskCoreTest, A61xxAnswerComesWithItsGetResponse) {
  establish();
  const uint32_t h = connected(1);
  auto t = transmit_req(1, h, kSelect);
  t.flags = pr::request_flags::kPrefetchGetResponse;
  const LaneId lane = [&] {
    submit(t);
    return edge.calls.back().lane;
  }();
  CallResult first;
  first.data = {0x61, 0x1C};
  answer(lane, first);
  ASSERT_EQ(edge.calls.size(), 1u);
  auto* gr = std::get_if<call::Transmit>(&edge.calls.front().call);
  ASSERT_TRUE(gr);
  const Bytes get_response{0x00, 0xC0, 0x00, 0x00, 0x1C};
  EXPECT_EQ(gr->command, get_response);
  CallResult second;
  second.data.assign(0x1C, 0xAB);
  second.data.push_back(0x90);
  second.data.push_back(0x00);
  answer(lane, second);
  auto r = reply_to(next_id_ - 1);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->data, (Bytes{0x61, 0x1C}));
  ASSERT_EQ(r->prefetched.size(), 1u);
  EXPECT_EQ(r->prefetched[0].command, get_response);
  EXPECT_EQ(r->prefetched[0].response, second.data);
}

TEST_F(DeskCoreTest, NoSpeculationWithoutTheFlagOrTheCapability) {
  establish(0x5E55100, pr::caps::kAll & ~pr::caps::kPrefetchGetResponse);
  const uint32_t h = connected(1);
  auto t = transmit_req(1, h, kSelect);
  t.flags = pr::request_flags::kPrefetchGetResponse;  // asked, but not negotiated
  submit(t);
  CallResult first;
  first.data = {0x61, 0x1C};
  answer(edge.calls.back().lane, first);
  EXPECT_TRUE(edge.calls.empty());
  ASSERT_TRUE(reply_to(next_id_ - 1));
  EXPECT_TRUE(reply_to(next_id_ - 1)->prefetched.empty());
}

// A 500-byte EF: its FCP gives the size, the program's first READ BINARY the chunk (231
// bytes, the Cryptolib's); the rest of the file is read ahead in that chunk size.
TEST_F(DeskCoreTest, AFullReadBinaryChunkIsFollowedByTheRestOfTheFile) {
  establish();
  const uint32_t h = connected(1);
  const Bytes select_ef{0x00, 0xA4, 0x00, 0x04, 0x02, 0x50, 0x31};
  auto s1 = transmit_req(1, h, select_ef);
  s1.flags = pr::request_flags::kReadAhead;
  submit(s1);
  CallResult fcp;
  fcp.data = {0x62, 0x04, 0x80, 0x02, 0x01, 0xF4, 0x90, 0x00};
  answer(edge.calls.back().lane, fcp);
  EXPECT_TRUE(edge.calls.empty()) << "a SELECT alone reads nothing ahead: middleware selects files it never reads";

  const Bytes read0{0x00, 0xB0, 0x00, 0x00, 0xE7};
  auto r1 = transmit_req(1, h, read0);
  r1.flags = pr::request_flags::kReadAhead;
  const uint32_t id = submit(r1);
  const LaneId lane = edge.calls.back().lane;
  auto chunk = [](std::size_t n, uint8_t fill) {
    CallResult c;
    c.data.assign(n, fill);
    c.data.push_back(0x90);
    c.data.push_back(0x00);
    return c;
  };
  answer(lane, chunk(231, 1));
  std::vector<Bytes> asked;
  for (uint8_t fill : {uint8_t{2}, uint8_t{3}}) {
    ASSERT_EQ(edge.calls.size(), 1u);
    auto* t = std::get_if<call::Transmit>(&edge.calls.front().call);
    ASSERT_TRUE(t);
    asked.push_back(t->command);
    answer(lane, chunk(fill == 2 ? 231 : 38, fill));
  }
  EXPECT_EQ(asked, (std::vector<Bytes>{{0x00, 0xB0, 0x00, 0xE7, 0xE7}, {0x00, 0xB0, 0x01, 0xCE, 0x26}}));
  EXPECT_TRUE(edge.calls.empty()) << "the file ends at 500 bytes";
  auto r = reply_to(id);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->prefetched.size(), 2u);
  EXPECT_EQ(r->prefetched[1].response.size(), 40u);
}

TEST_F(DeskCoreTest, ReadAheadStopsAtTheFirstErrorAnswer) {
  establish();
  const uint32_t h = connected(1);
  auto s1 = transmit_req(1, h, {0x00, 0xA4, 0x00, 0x04, 0x02, 0x50, 0x31});
  s1.flags = pr::request_flags::kReadAhead;
  submit(s1);
  CallResult fcp;
  fcp.data = {0x62, 0x04, 0x80, 0x02, 0x01, 0xF4, 0x90, 0x00};  // 500 bytes
  answer(edge.calls.back().lane, fcp);
  auto r1 = transmit_req(1, h, {0x00, 0xB0, 0x00, 0x00, 0x80});
  r1.flags = pr::request_flags::kReadAhead;
  submit(r1);
  CallResult chunk;
  chunk.data.assign(0x80, 7);
  chunk.data.push_back(0x90);
  chunk.data.push_back(0x00);
  answer(edge.calls.back().lane, chunk);
  ASSERT_EQ(edge.calls.size(), 1u) << "the next chunk is read ahead";
  CallResult denied;
  denied.data = {0x69, 0x82};
  answer(edge.calls.back().lane, denied);
  EXPECT_TRUE(edge.calls.empty());
  auto r = reply_to(next_id_ - 1);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->prefetched.size(), 1u) << "the error answer itself is served, then nothing more";
  EXPECT_EQ(r->prefetched[0].response, denied.data);
}

TEST_F(DeskCoreTest, AFailedSpeculativeCallEndsSpeculationWithoutAnAnswerForIt) {
  establish();
  const uint32_t h = connected(1);
  auto t = transmit_req(1, h, kSelect);
  t.flags = pr::request_flags::kPrefetchGetResponse;
  submit(t);
  const LaneId lane = edge.calls.back().lane;
  CallResult first;
  first.data = {0x61, 0x10};
  answer(lane, first);
  CallResult failed;
  failed.rv = sc::kWRemovedCard;
  answer(lane, failed);
  auto r = reply_to(next_id_ - 1);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->rv, sc::kSuccess) << "the program's own command succeeded";
  EXPECT_TRUE(r->prefetched.empty());
}

// ---- the card image (issue 13) ----------------------------------------------------------

const Bytes kSelSn = {0x00, 0xA4, 0x09, 0x04, 0x04, 0x3F, 0x00, 0xD0, 0x03};
const Bytes kReadSn = {0x00, 0xB0, 0x00, 0x00, 0x0C};
// FCP: 12-byte transparent EF, READ BINARY always allowed (compact form, SC 00)
const Bytes kFcpSn = {0x62, 0x0C, 0x80, 0x02, 0x00, 0x0C, 0x82, 0x01, 0x01, 0x8C, 0x03, 0x03, 0x12, 0x00, 0x90, 0x00};
const Bytes kSnContent = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0x90, 0x00};

class DeskCoreImageTest : public DeskCoreTest {
 protected:
  DeskCoreImageTest() {
    FakeCard c = test_card();
    c.answers[kSelSn] = kFcpSn;
    c.answers[kReadSn] = kSnContent;
    api.remove_card(kReader1);
    api.insert_card(kReader1, c);
    config.image_idle_delay = 1s;
  }
  void card_in_reader() {
    core().readers({pr::ReaderInfo{kReader1, sc::kStatePresent, api.event_counter(kReader1), kAtr1}}, now);
  }
  // A program reads EF.SN.ICC as the Cryptolib does: the desk learns what cards of this type
  // are read for.
  void program_reads_the_serial(uint32_t ctx) {
    const uint32_t h = connected(ctx);
    EXPECT_EQ(call(transmit_req(ctx, h, kSelSn)).data, kFcpSn);
    EXPECT_EQ(call(transmit_req(ctx, h, kReadSn)).data, kSnContent);
    auto d = req(pr::Op::kDisconnect, ctx, h);
    d.disposition = sc::kLeaveCard;
    EXPECT_EQ(call(d).rv, sc::kSuccess);
  }
  // Makes every call asked for (at |now|) and moves the clock to each timer, until nothing is left.
  void drive() {
    for (int guard = 0; guard < 1000; ++guard) {
      if (!edge.calls.empty()) {
        Edge::Pending p = std::move(edge.calls.front());
        edge.calls.pop_front();
        imaging_calls.push_back(p.call.index());
        core().call_done(p.lane, run_call(api, p.call), now);
        continue;
      }
      auto due = core().next_deadline();
      if (!due) return;
      now = std::max(now, *due);
      core().tick(now);
      if (edge.calls.empty() && core().next_deadline() == due) return;
    }
    ADD_FAILURE() << "the core never went quiet";
  }
  uint32_t last_pushed_image() const {
    auto snaps = sent_of<pr::ReaderSnapshot>();
    if (snaps.empty() || snaps.back().readers.empty()) return 99;
    return snaps.back().readers.front().image;
  }

  TimePoint now = t0();
  std::vector<std::size_t> imaging_calls;
};

TEST_F(DeskCoreImageTest, LearnsFromProgramsReadsTheCardWhenLeftAloneAndSendsTheImageWithAConnect) {
  establish();
  card_in_reader();
  EXPECT_FALSE(core().next_deadline()) << "nothing learned yet: nothing to read";
  program_reads_the_serial(1);
  EXPECT_EQ(core().image_state(kReader1), pr::image_state::kNone);
  ASSERT_TRUE(core().next_deadline()) << "the card is left alone: imaging is due";
  EXPECT_GE(*core().next_deadline(), now + 1s) << "not before the idle delay";
  drive();
  EXPECT_EQ(core().image_state(kReader1), pr::image_state::kComplete);
  EXPECT_EQ(last_pushed_image(), pr::image_state::kComplete);
  EXPECT_GE(core().stats().image_apdus, 2u);
  EXPECT_FALSE(core().imaging(kReader1));

  auto q = connect_req(2, kReader1);
  q.flags = pr::request_flags::kWantImage;
  auto r = call(q);
  ASSERT_EQ(r.rv, sc::kSuccess);
  ASSERT_TRUE(r.image);
  EXPECT_TRUE(r.image->complete);
  EXPECT_EQ(r.image->event_count, api.event_counter(kReader1));
  ASSERT_EQ(r.image->selects.size(), 1u);
  EXPECT_EQ(r.image->selects[0].command, kSelSn);
  EXPECT_EQ(r.image->selects[0].response, kFcpSn);
  ASSERT_EQ(r.image->files.size(), 1u);
  EXPECT_EQ(r.image->files[0].content, Bytes(kSnContent.begin(), kSnContent.end() - 2));
  // a Connect that does not ask for it gets none (the image is personal data)
  auto plain = call(connect_req(3, kReader1));
  EXPECT_FALSE(plain.image);
}

TEST_F(DeskCoreImageTest, AWriteCommandDropsTheImage) {
  establish();
  card_in_reader();
  program_reads_the_serial(1);
  drive();
  ASSERT_EQ(core().image_state(kReader1), pr::image_state::kComplete);
  const uint32_t h = connected(2);
  call(transmit_req(2, h, Bytes{0x00, 0xD6, 0x00, 0x00, 0x01, 0x42}));  // UPDATE BINARY
  EXPECT_EQ(core().image_state(kReader1), pr::image_state::kNone);
  EXPECT_EQ(last_pushed_image(), pr::image_state::kNone) << "the server's copies must go too";
  EXPECT_EQ(core().stats().images_voided, 1u);
}

TEST_F(DeskCoreImageTest, AnotherCardInTheReaderIsNotTheImagesCard) {
  establish();
  card_in_reader();
  program_reads_the_serial(1);
  drive();
  ASSERT_EQ(core().image_state(kReader1), pr::image_state::kComplete);
  FakeCard other = test_card();
  api.remove_card(kReader1);
  api.insert_card(kReader1, other);
  card_in_reader();  // same ATR, new insertion
  EXPECT_EQ(core().image_state(kReader1), pr::image_state::kNone);
  auto q = connect_req(2, kReader1);
  q.flags = pr::request_flags::kWantImage;
  EXPECT_FALSE(call(q).image);
}

TEST_F(DeskCoreImageTest, TheImagingYieldsAtOnceToAProgram) {
  establish();
  card_in_reader();
  program_reads_the_serial(1);
  now += 2s;
  core().tick(now);
  ASSERT_TRUE(core().imaging(kReader1));
  // the imaging's calls up to its first APDU
  for (int guard = 0; guard < 20 && !(edge.calls.size() == 1 && std::holds_alternative<call::Transmit>(edge.calls.front().call));
       ++guard) {
    ASSERT_FALSE(edge.calls.empty());
    Edge::Pending p = std::move(edge.calls.front());
    edge.calls.pop_front();
    core().call_done(p.lane, run_call(api, p.call), now);
  }
  const LaneId imaging_lane = edge.calls.front().lane;
  // A program wants the card while the APDU is at the card.
  submit(connect_req(5, kReader1));
  std::vector<std::size_t> after;
  for (int guard = 0; guard < 20 && !edge.calls.empty(); ++guard) {
    Edge::Pending p = std::move(edge.calls.front());
    edge.calls.pop_front();
    if (p.lane == imaging_lane) after.push_back(p.call.index());
    core().call_done(p.lane, run_call(api, p.call), now);
  }
  // the APDU in flight completes; then End, Disconnect, Release: no other APDU
  EXPECT_EQ(after, (std::vector<std::size_t>{PcscCall{call::Transmit{}}.index(), PcscCall{call::End{}}.index(),
                                             PcscCall{call::Disconnect{}}.index(), PcscCall{call::Release{}}.index()}));
  EXPECT_FALSE(core().imaging(kReader1));
  EXPECT_EQ(core().image_state(kReader1), pr::image_state::kPartial) << "what was read whole stays";
}

TEST_F(DeskCoreImageTest, ACardADeskProgramHoldsExclusivelyIsLeftAlone) {
  establish();
  card_in_reader();
  program_reads_the_serial(1);
  // Another program at the desk takes the card exclusively (the reader monitor says so).
  core().readers({pr::ReaderInfo{kReader1, sc::kStatePresent | sc::kStateExclusive | sc::kStateInUse,
                                 api.event_counter(kReader1), kAtr1}},
                 now);
  now += 10s;
  core().tick(now);
  EXPECT_TRUE(edge.calls.empty()) << "nothing is asked of a card another program holds";
  EXPECT_FALSE(core().imaging(kReader1));
  // It lets go: the imaging runs.
  card_in_reader();
  drive();
  EXPECT_EQ(core().image_state(kReader1), pr::image_state::kComplete);
}

TEST_F(DeskCoreImageTest, ASharingViolationStopsTheImagingBeforeAnyApduAndItTriesAgainLater) {
  establish();
  card_in_reader();
  program_reads_the_serial(1);
  now += 2s;
  core().tick(now);
  ASSERT_TRUE(core().imaging(kReader1));
  // A desk program got the card exclusively between the monitor's last report and the Connect.
  bool refused = false;
  std::size_t apdus = 0;
  for (int guard = 0; guard < 20 && !edge.calls.empty(); ++guard) {
    Edge::Pending p = std::move(edge.calls.front());
    edge.calls.pop_front();
    if (std::holds_alternative<call::Transmit>(p.call)) ++apdus;
    if (std::holds_alternative<call::Connect>(p.call) && !refused) {
      refused = true;
      CallResult r;
      r.rv = sc::kESharingViolation;
      core().call_done(p.lane, r, now);
      continue;
    }
    core().call_done(p.lane, run_call(api, p.call), now);
  }
  EXPECT_TRUE(refused);
  EXPECT_EQ(apdus, 0u);
  EXPECT_FALSE(core().imaging(kReader1));
  EXPECT_EQ(core().image_state(kReader1), pr::image_state::kNone);
  ASSERT_TRUE(core().next_deadline()) << "it tries again";
  EXPECT_GE(*core().next_deadline(), now + 2s) << "after a back-off";
  drive();
  EXPECT_EQ(core().image_state(kReader1), pr::image_state::kComplete);
}

TEST_F(DeskCoreImageTest, APreludeRunsBeforeTheCommandInTheSameRequest) {
  establish();
  card_in_reader();
  const uint32_t h = connected(1);
  auto t = transmit_req(1, h, kReadSn);
  t.prelude = {kSelSn};
  auto r = call(t);
  ASSERT_EQ(r.prelude_answers.size(), 1u);
  EXPECT_EQ(r.prelude_answers[0], kFcpSn);
  EXPECT_EQ(r.data, kSnContent);
  // a prelude the card refuses stops there: the program's command is not sent
  const Bytes refused_select = {0x00, 0xA4, 0x09, 0x04, 0x04, 0x3F, 0x00, 0x2F, 0x01};
  t.prelude = {refused_select, kSelSn};
  r = call(t);
  ASSERT_EQ(r.prelude_answers.size(), 1u);
  EXPECT_EQ(r.prelude_answers[0], (Bytes{0x6D, 0x00}));
  EXPECT_TRUE(r.data.empty());
  EXPECT_EQ(r.rv, sc::kSuccess);
}

TEST_F(DeskCoreImageTest, OffByConfigurationTheDeskNeverReadsTheCardOnItsOwn) {
  config.card_image = false;
  establish();
  // ... and offers no image in its hello (found by the desk.conf card-image = off integration test).
  auto hellos = sent_of<pr::Hello>();
  ASSERT_FALSE(hellos.empty());
  for (const auto& h : hellos) EXPECT_EQ(h.capabilities & pr::caps::kCardImage, 0u);
  card_in_reader();
  program_reads_the_serial(1);
  EXPECT_FALSE(core().next_deadline());
  now += 10s;
  core().tick(now);
  EXPECT_TRUE(edge.calls.empty());
  EXPECT_FALSE(core().imaging(kReader1));
  auto q = connect_req(2, kReader1);
  q.flags = pr::request_flags::kWantImage;
  EXPECT_FALSE(call(q).image);
}

// Found by fuzz_desk_core: a Connect flagged with a deferred Begin (no shim sends one) made
// the desk call SCardBeginTransaction on card handle 0. The flag is ignored on a Connect.
TEST_F(DeskCoreTest, ADeferredBeginFlagOnAConnectIsIgnored) {
  establish();
  auto q = connect_req(1, kReader1);
  q.flags = pr::request_flags::kBeginFirst;
  const uint32_t id = submit(q);
  while (!edge.calls.empty()) {
    for (const auto& p : edge.calls) {
      EXPECT_FALSE(std::holds_alternative<call::Begin>(p.call)) << "a Begin before the card is connected";
    }
    run_one();
  }
  auto r = reply_to(id);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->rv, sc::kSuccess);
  EXPECT_NE(r->handle.value, 0u);
}

// ---- issue 10: the desk's PC/SC service and the desk's audit events ------------------------

TEST_F(DeskCoreTest, AMissingDeskServiceIsPushedToServersThatUnderstandIt) {
  establish();
  core().readers({}, t0(), sc::kENoService);
  auto snaps = sent_of<pr::ReaderSnapshot>();
  EXPECT_EQ(snaps.back().service_rv, sc::kENoService);
  EXPECT_TRUE(snaps.back().readers.empty());
  // The service coming back is a change too, even with still no reader.
  core().readers({}, t0(), 0);
  snaps = sent_of<pr::ReaderSnapshot>();
  EXPECT_EQ(snaps.back().service_rv, 0u);
  EXPECT_GT(snaps.back().sequence, snaps[snaps.size() - 2].sequence);
}

TEST_F(DeskCoreTest, OlderServersGetNoServiceField) {
  establish(0x5E55100, pr::caps::kAll & ~pr::caps::kDeskService);
  core().readers({}, t0(), sc::kENoService);
  auto snaps = sent_of<pr::ReaderSnapshot>();
  ASSERT_FALSE(snaps.empty());
  EXPECT_EQ(snaps.back().service_rv, 0u) << "a field the server did not announce is not sent";
}

TEST_F(DeskCoreTest, AuditsServerSessionsCardConnectsAndRefusals) {
  config.policy.reader_filter = {"Reader"};
  config.policy.reader_deny = {"01"};
  config.policy.control_allow = ControlAllow{.pinpad = false};
  establish();
  ASSERT_FALSE(edge.audits.empty());
  EXPECT_EQ(edge.audits[0].kind, DeskAudit::Kind::kServerConnected);
  EXPECT_EQ(edge.audits[0].server, "session-server-7");
  EXPECT_STREQ(edge.audits[0].event_name(), "server-connected");

  const uint32_t h = connected(1);
  auto card = std::find_if(edge.audits.begin(), edge.audits.end(),
                           [](const DeskAudit& a) { return a.kind == DeskAudit::Kind::kCardConnected; });
  ASSERT_NE(card, edge.audits.end());
  EXPECT_EQ(card->reader, kReader1);
  EXPECT_EQ(card->atr, kAtr1);
  EXPECT_EQ(card->share_mode, sc::kShareShared);

  EXPECT_EQ(call(connect_req(2, kReader2)).rv, sc::kEUnknownReader);
  EXPECT_EQ(edge.audits.back().kind, DeskAudit::Kind::kReaderRefused);
  EXPECT_EQ(edge.audits.back().reader, kReader2);

  auto ctl = req(pr::Op::kControl, 1, h);
  ctl.code = 0x42000D48;
  ctl.recv_length = 16;
  EXPECT_EQ(call(ctl).rv, sc::kEUnsupportedFeature);
  EXPECT_EQ(edge.audits.back().kind, DeskAudit::Kind::kControlRefused);
  EXPECT_EQ(edge.audits.back().code, 0x42000D48u);
  EXPECT_NE(edge.audits.back().text().find("42000D48"), std::string::npos) << edge.audits.back().text();

  core().transport_down(t0());
  EXPECT_EQ(edge.audits.back().kind, DeskAudit::Kind::kServerDisconnected);
}

TEST_F(DeskCoreTest, AuditTextsNeverCarryApduData) {
  establish();
  const uint32_t h = connected(1);
  const std::size_t before = edge.audits.size();
  call(transmit_req(1, h, kGetChallenge));
  EXPECT_EQ(edge.audits.size(), before) << "a transmit is no audit event";
  for (const auto& a : edge.audits) {
    EXPECT_EQ(a.text().find("0102030405060708"), std::string::npos) << a.text();
    EXPECT_EQ(a.text().find('\x1b'), std::string::npos);
  }
}

}  // namespace
}  // namespace cardbridge::client
