// LinkSession: the hello exchange, negotiation, request ids, probes, liveness and protocol
// errors, for both roles, with time passed in.
#include "cardbridge/protocol/link_session.hpp"

#include <gtest/gtest.h>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/version.hpp"

namespace cardbridge::protocol {
namespace {

using namespace std::chrono_literals;

TimePoint t0() { return TimePoint{} + 1000h; }

// Records everything the session asks of its handler, decoded.
struct Recorder : LinkSession::Handler {
  std::vector<Message> sent;
  std::vector<std::string> closed;
  std::vector<PeerSession> started;
  std::vector<std::string> ended;
  std::vector<std::pair<uint32_t, Request>> requests;
  std::vector<std::pair<uint32_t, Reply>> replies;
  std::vector<ReaderSnapshot> snapshots;

  void link_send(std::vector<uint8_t> bytes) override {
    FrameDecoder d;
    ASSERT_TRUE(d.feed(bytes));
    auto f = d.next();
    ASSERT_TRUE(f.has_value());
    EXPECT_FALSE(d.next().has_value()) << "one frame per send";
    auto m = decode(*f);
    ASSERT_TRUE(m.ok()) << m.error().what;
    sent.push_back(std::move(*m));
  }
  void link_close(const std::string& reason) override { closed.push_back(reason); }
  void session_started(const PeerSession& p, TimePoint) override { started.push_back(p); }
  void session_ended(const std::string& reason, TimePoint) override { ended.push_back(reason); }
  void received_request(uint32_t id, Request&& r, TimePoint) override { requests.emplace_back(id, std::move(r)); }
  void received_reply(uint32_t id, Reply&& r, TimePoint) override { replies.emplace_back(id, std::move(r)); }
  void received_snapshot(ReaderSnapshot&& s, TimePoint) override { snapshots.push_back(std::move(s)); }

  template <typename T>
  std::vector<T> sent_of() const {
    std::vector<T> out;
    for (const auto& m : sent) {
      if (auto* b = std::get_if<T>(&m.body)) out.push_back(*b);
    }
    return out;
  }
};

Hello peer_hello(Role role, uint64_t instance, bool reply = false, uint64_t caps = caps::kAll) {
  Hello h = local_hello(role, caps);
  h.software = "peer 1.0";
  h.peer_name = "the-peer";
  h.instance = instance;
  h.reply = reply;
  return h;
}

std::vector<uint8_t> framed(const Message& m) { return encode_frame(m); }

// The peers the tests' transports report.
const PeerIdentity kDeskPeer = PeerIdentity::unix_user(1000, 77);
const PeerIdentity kServerPeer = PeerIdentity::unix_user(0, 88);

LinkSettings server_settings() {
  LinkSettings s;
  s.role = Role::kServer;
  s.capabilities = caps::kAll;
  s.software = "cardbridge-shim test";
  s.name = "server-host";
  s.hello_retry = 500ms;
  s.liveness_after = 5s;
  s.liveness_timeout = 5s;
  s.random_seed = 42;
  s.peer_policy.unix_uids = {1000, 0};
  return s;
}

LinkSettings desk_settings() {
  LinkSettings s;
  s.role = Role::kDesk;
  s.capabilities = caps::kReaderPush | caps::kDeferredBegin;
  s.software = "cardbridge-desk test";
  s.name = "desk-7";
  s.random_seed = 7;
  s.peer_policy.unix_uids = {0};
  return s;
}

struct Server {
  Recorder rec;
  LinkSession link{rec, server_settings()};
  void up() { link.transport_up(t0(), kDeskPeer); }
  void hear(const Message& m, TimePoint now = t0()) { link.receive(framed(m), now); }
  void establish(uint64_t instance = 99) {
    up();
    hear(Message{0, peer_hello(Role::kDesk, instance)});
    ASSERT_TRUE(link.established());
  }
};

TEST(LinkSession, TransportUpSaysHelloWithOurRoleNameAndInstance) {
  Server s;
  s.up();
  auto hellos = s.rec.sent_of<Hello>();
  ASSERT_EQ(hellos.size(), 1u);
  EXPECT_EQ(hellos[0].role, Role::kServer);
  EXPECT_EQ(hellos[0].peer_name, "server-host");
  EXPECT_EQ(hellos[0].software, "cardbridge-shim test");
  EXPECT_EQ(hellos[0].version_major, kVersionMajor);
  EXPECT_NE(hellos[0].instance, 0u);
  EXPECT_FALSE(hellos[0].reply);
  EXPECT_FALSE(s.link.established());
}

TEST(LinkSession, EachTransportUpIsANewInstance) {
  Server s;
  s.up();
  s.link.transport_down(t0());
  s.up();
  auto hellos = s.rec.sent_of<Hello>();
  ASSERT_EQ(hellos.size(), 2u);
  EXPECT_NE(hellos[0].instance, hellos[1].instance);
}

TEST(LinkSession, HelloIsRepeatedUntilThePeerAnswersThenNeverAgain) {
  Server s;
  s.up();
  EXPECT_EQ(s.link.next_deadline(), t0() + 500ms);
  s.link.tick(t0() + 499ms);
  EXPECT_EQ(s.rec.sent_of<Hello>().size(), 1u);
  s.link.tick(t0() + 500ms);
  EXPECT_EQ(s.rec.sent_of<Hello>().size(), 2u);
  EXPECT_EQ(s.link.next_deadline(), t0() + 1000ms);
  s.hear(Message{0, peer_hello(Role::kDesk, 5, /*reply=*/true)}, t0() + 600ms);
  EXPECT_TRUE(s.link.established());
  EXPECT_FALSE(s.link.next_deadline().has_value()) << "an idle established link has no timer";
  s.link.tick(t0() + 10s);
  EXPECT_EQ(s.rec.sent_of<Hello>().size(), 2u);
}

TEST(LinkSession, AHelloIsAnsweredWithAReplyAndAReplyIsNot) {
  Server s;
  s.up();
  s.hear(Message{0, peer_hello(Role::kDesk, 5, /*reply=*/false)});
  auto hellos = s.rec.sent_of<Hello>();
  ASSERT_EQ(hellos.size(), 2u);
  EXPECT_TRUE(hellos[1].reply);
  Server t;
  t.up();
  t.hear(Message{0, peer_hello(Role::kDesk, 5, /*reply=*/true)});
  EXPECT_EQ(t.rec.sent_of<Hello>().size(), 1u);
  EXPECT_TRUE(t.link.established());
}

TEST(LinkSession, SessionCarriesThePeersDeclarationsAndTheNegotiatedCapabilities) {
  Server s;
  s.up();
  s.hear(Message{0, peer_hello(Role::kDesk, 77, false, caps::kReaderPush | caps::kReadAhead)});
  ASSERT_EQ(s.rec.started.size(), 1u);
  const auto& p = s.rec.started[0];
  EXPECT_EQ(p.name, "the-peer");
  EXPECT_EQ(p.software, "peer 1.0");
  EXPECT_EQ(p.instance, 77u);
  EXPECT_EQ(p.generation, 1u);
  EXPECT_EQ(p.capabilities, caps::kReaderPush | caps::kReadAhead);
  EXPECT_TRUE(s.link.uses(caps::kReadAhead));
  EXPECT_FALSE(s.link.uses(caps::kDeferredBegin));
}

TEST(LinkSession, RepeatedHelloOfTheSameInstanceIsAnsweredButStartsNothing) {
  Server s;
  s.establish(5);
  s.hear(Message{0, peer_hello(Role::kDesk, 5)});
  EXPECT_EQ(s.rec.started.size(), 1u);
  EXPECT_TRUE(s.rec.ended.empty());
  EXPECT_EQ(s.rec.sent_of<Hello>().size(), 3u) << "ours, the reply, the reply to the repeat";
}

TEST(LinkSession, ANewPeerInstanceEndsTheSessionAndStartsTheNext) {
  Server s;
  s.establish(5);
  const uint32_t id = s.link.request(Request{Op::kTransmit}, t0());
  ASSERT_NE(id, 0u);
  s.hear(Message{0, peer_hello(Role::kDesk, 6)});
  ASSERT_EQ(s.rec.ended.size(), 1u);
  ASSERT_EQ(s.rec.started.size(), 2u);
  EXPECT_EQ(s.rec.started[1].generation, 2u);
  EXPECT_FALSE(s.link.awaiting_replies()) << "the old session's request is void";
  s.hear(Message{id, Reply{}});
  EXPECT_TRUE(s.rec.replies.empty()) << "a reply to the old session is not delivered";
}

TEST(LinkSession, WrongRoleClosesTheLinkWithoutASession) {
  Server s;
  s.up();
  s.hear(Message{0, peer_hello(Role::kServer, 5)});
  EXPECT_FALSE(s.link.established());
  ASSERT_EQ(s.rec.closed.size(), 1u);
  EXPECT_NE(s.rec.closed[0].find("peer is not a CardBridge desk (role server)"), std::string::npos) << s.rec.closed[0];
}

TEST(LinkSession, VersionMismatchSendsAnErrorThenCloses) {
  Server s;
  s.up();
  Hello h = peer_hello(Role::kDesk, 5);
  h.version_major = kVersionMajor + 1;
  s.hear(Message{0, h});
  auto errors = s.rec.sent_of<Error>();
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].code, ErrorCode::kVersion);
  ASSERT_EQ(s.rec.closed.size(), 1u);
  EXPECT_EQ(s.rec.closed[0], "version mismatch");
}

TEST(LinkSession, MalformedBytesCloseTheLinkOnceAndTheRestIsIgnored) {
  Server s;
  s.establish();
  const std::vector<uint8_t> junk{0, 0, 0, 3, 0xFF, 0xFF, 0xFF};
  s.link.receive(junk, t0());
  ASSERT_EQ(s.rec.closed.size(), 1u);
  EXPECT_NE(s.rec.closed[0].find("malformed message from the desk"), std::string::npos);
  EXPECT_EQ(s.rec.ended.size(), 1u);
  s.link.receive(junk, t0());
  s.hear(Message{0, peer_hello(Role::kDesk, 8)});
  EXPECT_EQ(s.rec.closed.size(), 1u);
  EXPECT_FALSE(s.link.established()) << "nothing is decoded until the transport comes up again";
  EXPECT_FALSE(s.link.next_deadline().has_value()) << "no hello retries on a failed connection";
}

TEST(LinkSession, OversizedAndEmptyFramesCloseTheLink) {
  for (const auto& header : {std::vector<uint8_t>{0, 0x10, 0, 0}, std::vector<uint8_t>{0, 0, 0, 0}}) {
    Server s;
    s.establish();
    s.link.receive(header, t0());
    ASSERT_EQ(s.rec.closed.size(), 1u);
    EXPECT_FALSE(s.link.established());
  }
}

TEST(LinkSession, FramesBeforeABadHeaderInTheSameChunkAreStillServed) {
  Server s;
  s.establish();
  const uint32_t id = s.link.request(Request{Op::kPing}, t0());
  auto bytes = framed(Message{id, Reply{}});
  bytes.insert(bytes.end(), {0, 0, 0, 0});
  s.link.receive(bytes, t0());
  EXPECT_EQ(s.rec.replies.size(), 1u);
  EXPECT_EQ(s.rec.closed.size(), 1u);
}

TEST(LinkSession, FramesMayArriveInPiecesOfAnySize) {
  Server s;
  s.up();
  auto bytes = framed(Message{0, peer_hello(Role::kDesk, 5)});
  for (uint8_t b : bytes) s.link.receive(std::span<const uint8_t>(&b, 1), t0());
  EXPECT_TRUE(s.link.established());
}

TEST(LinkSession, MessagesBeforeTheHelloAreIgnored) {
  Server s;
  s.up();
  s.hear(Message{0, ReaderSnapshot{1, {}}});
  EXPECT_TRUE(s.rec.snapshots.empty());
  EXPECT_TRUE(s.rec.closed.empty());
}

TEST(LinkSession, AMessageKindTheRoleNeverReceivesIsAProtocolError) {
  Server s;
  s.establish();
  Request q;
  q.op = Op::kTransmit;
  s.hear(Message{9, q});
  ASSERT_EQ(s.rec.closed.size(), 1u);
  EXPECT_TRUE(s.rec.requests.empty());
}

TEST(LinkSession, RequestIdsAreNonZeroDistinctAndRepliesFindTheirRequest) {
  Server s;
  s.establish();
  const uint32_t a = s.link.request(Request{Op::kTransmit}, t0());
  const uint32_t b = s.link.request(Request{Op::kStatus}, t0());
  EXPECT_NE(a, 0u);
  EXPECT_NE(b, 0u);
  EXPECT_NE(a, b);
  Reply r;
  r.rv = 0x80100069;
  s.hear(Message{b, r});
  ASSERT_EQ(s.rec.replies.size(), 1u);
  EXPECT_EQ(s.rec.replies[0].first, b);
  EXPECT_EQ(s.rec.replies[0].second.rv, 0x80100069u);
  EXPECT_TRUE(s.link.awaiting_replies());
  s.hear(Message{b, r});
  EXPECT_EQ(s.rec.replies.size(), 1u) << "a second reply to the same id is dropped";
  s.hear(Message{a, Reply{}});
  EXPECT_FALSE(s.link.awaiting_replies());
}

TEST(LinkSession, NoRequestLeavesWithoutASession) {
  Server s;
  s.up();
  EXPECT_EQ(s.link.request(Request{Op::kTransmit}, t0()), 0u);
  EXPECT_TRUE(s.rec.sent_of<Request>().empty());
  bool answered = true;
  s.link.ping(t0(), [&](bool ok) { answered = ok; });
  EXPECT_FALSE(answered);
}

TEST(LinkSession, PingsRunTheirCallbackAndAreNotDeliveredAsReplies) {
  Server s;
  s.establish();
  std::vector<bool> results;
  s.link.ping(t0(), [&](bool ok) { results.push_back(ok); });
  auto reqs = s.rec.sent;
  const auto& m = reqs.back();
  ASSERT_TRUE(std::holds_alternative<Request>(m.body));
  EXPECT_EQ(std::get<Request>(m.body).op, Op::kPing);
  s.hear(Message{m.id, Reply{}});
  EXPECT_EQ(results, std::vector<bool>{true});
  EXPECT_TRUE(s.rec.replies.empty());
  s.link.ping(t0(), [&](bool ok) { results.push_back(ok); });
  s.link.transport_down(t0());
  EXPECT_EQ(results, (std::vector<bool>{true, false}));
}

TEST(LinkSession, LivenessPingsASilentPeerOnlyWhileRequestsAreOutstanding) {
  Server s;
  s.establish();
  EXPECT_FALSE(s.link.next_deadline());
  s.link.request(Request{Op::kBeginTransaction}, t0() + 1s);
  EXPECT_EQ(s.link.next_deadline(), t0() + 6s);
  s.link.tick(t0() + 6s);
  auto pings = s.rec.sent_of<Request>();
  ASSERT_EQ(pings.size(), 2u);
  EXPECT_EQ(pings[1].op, Op::kPing);
  EXPECT_EQ(s.link.next_deadline(), t0() + 11s);
  // The desk answers the ping (the Begin is still waiting for the card): alive.
  s.hear(Message{s.rec.sent.back().id, Reply{}}, t0() + 7s);
  EXPECT_TRUE(s.link.established());
  EXPECT_EQ(s.link.next_deadline(), t0() + 12s);
}

TEST(LinkSession, APeerThatAnswersNothingIsLostAfterTheTimeout) {
  Server s;
  s.establish();
  s.link.request(Request{Op::kTransmit}, t0());
  s.link.tick(t0() + 5s);
  s.link.tick(t0() + 9999ms);
  EXPECT_TRUE(s.link.established());
  s.link.tick(t0() + 10s);
  EXPECT_FALSE(s.link.established());
  ASSERT_EQ(s.rec.closed.size(), 1u);
  EXPECT_EQ(s.rec.closed[0], "the peer does not answer");
  EXPECT_EQ(s.rec.ended, std::vector<std::string>{"the peer does not answer"});
}

TEST(LinkSession, BytesFromThePeerPostponeLiveness) {
  Server s;
  s.establish();
  s.link.request(Request{Op::kTransmit}, t0());
  s.hear(Message{0, ReaderSnapshot{3, {}}}, t0() + 4s);
  EXPECT_EQ(s.link.next_deadline(), t0() + 9s);
}

TEST(LinkSession, TransportDownEndsTheSessionOnce) {
  Server s;
  s.establish();
  s.link.transport_down(t0());
  s.link.transport_down(t0());
  EXPECT_EQ(s.rec.ended.size(), 1u);
  EXPECT_FALSE(s.link.next_deadline());
}

TEST(LinkSession, DeskRoleReceivesRequestsAndSendsRepliesAndSnapshots) {
  Recorder rec;
  LinkSession desk{rec, desk_settings()};
  desk.transport_up(t0(), kServerPeer);
  desk.receive(framed(Message{0, peer_hello(Role::kServer, 3)}), t0());
  ASSERT_TRUE(desk.established());
  EXPECT_EQ(desk.peer().capabilities, caps::kReaderPush | caps::kDeferredBegin);
  Request q;
  q.op = Op::kTransmit;
  q.data = {0x00, 0x84, 0x00, 0x00, 0x08};
  desk.receive(framed(Message{12, q}), t0());
  ASSERT_EQ(rec.requests.size(), 1u);
  EXPECT_EQ(rec.requests[0].first, 12u);
  EXPECT_EQ(rec.requests[0].second, q);
  desk.reply(12, Reply{});
  desk.snapshot(ReaderSnapshot{4, {}});
  ASSERT_GE(rec.sent.size(), 4u);
  EXPECT_EQ(rec.sent[rec.sent.size() - 2].id, 12u);
  EXPECT_TRUE(std::holds_alternative<ReaderSnapshot>(rec.sent.back().body));
  desk.receive(framed(Message{5, Reply{}}), t0());
  EXPECT_EQ(rec.closed.size(), 1u) << "a desk never receives replies";
}

TEST(LinkSession, ADeskWithoutLivenessNeverPings) {
  Recorder rec;
  LinkSession desk{rec, desk_settings()};
  desk.transport_up(t0(), kServerPeer);
  desk.receive(framed(Message{0, peer_hello(Role::kServer, 3)}), t0());
  EXPECT_FALSE(desk.next_deadline());
}

// ---- who may be the peer (docs/security.md): checked before the first byte -------------

TEST(LinkSession, AnUnauthorisedPeerGetsNotOneByteAndTheLinkIsClosed) {
  Recorder rec;
  LinkSession link{rec, server_settings()};
  link.transport_up(t0(), PeerIdentity::unix_user(1001, 5));  // another user's process on the socket
  EXPECT_TRUE(rec.sent.empty()) << "not even our hello";
  ASSERT_EQ(rec.closed.size(), 1u);
  EXPECT_NE(rec.closed[0].find("uid 1001"), std::string::npos) << rec.closed[0];
  EXPECT_FALSE(link.next_deadline()) << "no hello retries to an unauthorised peer";
  link.receive(framed(Message{0, peer_hello(Role::kDesk, 5)}), t0());
  EXPECT_FALSE(link.established()) << "its hello is not even read";
  EXPECT_TRUE(rec.started.empty());
}

TEST(LinkSession, TheVerifiedIdentityTravelsWithTheSessionApartFromTheDeclaredName) {
  Server s;
  s.up();
  s.hear(Message{0, peer_hello(Role::kDesk, 5)});
  ASSERT_EQ(s.rec.started.size(), 1u);
  EXPECT_EQ(s.rec.started[0].verified.kind, PeerIdentity::Kind::kUnixUser);
  EXPECT_EQ(s.rec.started[0].verified.uid, 1000u);
  EXPECT_EQ(s.rec.started[0].name, "the-peer") << "what the hello declared";
}

TEST(LinkSession, PlainTcpIsRefusedUnlessAllowedByName) {
  Recorder rec;
  LinkSession link{rec, server_settings()};
  link.transport_up(t0(), PeerIdentity::insecure_tcp("127.0.0.1:7000"));
  EXPECT_TRUE(rec.sent.empty());
  ASSERT_EQ(rec.closed.size(), 1u);
  auto settings = server_settings();
  settings.peer_policy.allow_insecure_tcp = true;
  Recorder rec2;
  LinkSession allowed{rec2, settings};
  allowed.transport_up(t0(), PeerIdentity::insecure_tcp("127.0.0.1:7000"));
  EXPECT_EQ(rec2.sent_of<Hello>().size(), 1u);
  EXPECT_TRUE(rec2.closed.empty());
}

TEST(LinkSession, ARefusedConnectionDoesNotStopTheNextAuthorisedOne) {
  Recorder rec;
  LinkSession link{rec, server_settings()};
  link.transport_up(t0(), PeerIdentity::unix_user(1001, 5));
  link.transport_down(t0());
  link.transport_up(t0(), kDeskPeer);
  EXPECT_EQ(rec.sent_of<Hello>().size(), 1u);
  link.receive(framed(Message{0, peer_hello(Role::kDesk, 5)}), t0());
  EXPECT_TRUE(link.established());
}

TEST(LinkSession, StatsCountBytesBothWays) {
  Server s;
  s.up();
  const auto in = framed(Message{0, peer_hello(Role::kDesk, 5)});
  s.link.receive(in, t0());
  EXPECT_EQ(s.link.stats().bytes_in, in.size());
  std::size_t out = 0;
  for (const auto& m : s.rec.sent) out += encode_frame(m).size();
  EXPECT_EQ(s.link.stats().bytes_out, out);
  EXPECT_EQ(s.link.stats().sessions, 1u);
}

}  // namespace
}  // namespace cardbridge::protocol
