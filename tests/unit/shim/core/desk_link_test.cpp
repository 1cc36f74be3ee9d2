// ShimCore and its desk link (protocol::LinkSession underneath): the hello exchange and
// its retries, sessions and instances, what a desk must not send, liveness probes while
// requests are outstanding, and what the programs see when the desk goes away or comes
// back (in-flight calls fail, handles become orphans; pcsc-protocol.md §1.3, §5.2).
#include <algorithm>
#include <cstdint>
#include <variant>
#include <vector>

#include <gtest/gtest.h>

#include "cardbridge/protocol/codec.hpp"
#include "core/shim_core_test.hpp"

namespace cardbridge::shim::core_test {
namespace {

// =====================================================================================
// Hello and sessions

TEST(ShimCoreDeskLink, ADeskHelloIsAnsweredWithAHelloReplyAndAReplyIsNot) {
  {
    // The desk speaks first (or did not see our hello).
    Rig r;
    auto ours = r.desk.connect_transport();
    EXPECT_EQ(ours.version_major, pr::kVersionMajor);
    EXPECT_EQ(ours.peer_name, "shim-under-test");
    EXPECT_EQ(ours.capabilities, pr::caps::kAll) << "what ShimConfig offers";
    EXPECT_FALSE(r.core.desk_up());
    r.desk.hello_as(0xABCDEF, /*reply=*/false);
    auto answer = r.desk.expect_hello();
    EXPECT_TRUE(answer.reply);
    EXPECT_EQ(answer.role, pr::Role::kServer);
    EXPECT_EQ(answer.instance, ours.instance) << "same session instance";
    EXPECT_TRUE(r.core.desk_up());
    EXPECT_EQ(r.core.desk_name(), "desk-under-test");
    EXPECT_EQ(r.core.stats().desk_sessions, 1u);
  }
  {
    // The desk answers our hello (reply=true): nothing back; a hello that is not a reply,
    // from the same instance, is answered and changes nothing.
    Rig r;
    auto first = r.desk.connect_transport();
    r.desk.hello_as(7, /*reply=*/true);
    EXPECT_TRUE(r.core.desk_up());
    EXPECT_TRUE(r.desk.idle()) << "no answer to a reply";
    r.desk.hello_as(7, /*reply=*/false);
    auto answer = r.desk.expect_hello();
    EXPECT_TRUE(answer.reply);
    EXPECT_EQ(answer.instance, first.instance);
    EXPECT_EQ(r.core.desk_generation(), 1u) << "same instance: the same session";
    EXPECT_EQ(r.core.stats().desk_sessions, 1u);
    EXPECT_EQ(r.core.negotiated_capabilities(), pr::caps::kAll);
  }
}

TEST(ShimCoreDeskLink, ARepeatedHelloWithTheSameInstanceChangesNothing) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  auto waiter = r.client();
  r.wait(waiter);
  const auto generation = r.core.desk_generation();
  const auto sessions = r.core.stats().desk_sessions;
  const Bytes before = r.array();
  r.desk.hello(/*reply=*/true);
  r.desk.hello(/*reply=*/false);
  while (auto m = r.desk.next()) {
    auto* h = std::get_if<pr::Hello>(&m->body);
    ASSERT_NE(h, nullptr) << "only hello replies: " << pr::describe(*m);
    EXPECT_TRUE(h->reply);
  }
  EXPECT_EQ(r.core.desk_generation(), generation);
  EXPECT_EQ(r.core.stats().desk_sessions, sessions);
  EXPECT_TRUE(r.fx.resets.empty());
  EXPECT_TRUE(waiter.nothing_pending());
  EXPECT_EQ(r.array(), before);
  c.send_transmit(card, kSelectMf);
  auto tx = r.desk.expect(pr::Op::kTransmit);
  EXPECT_EQ(tx.q.handle.value, 1u) << "handle still valid";
  r.desk.reply(tx.id, ok_reply(kSw9000));
  EXPECT_EQ(c.transmit_reply().rv, kSuccess);
}

TEST(ShimCoreDeskLink, AHelloWithANewInstanceIsANewSession) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  const auto generation = r.core.desk_generation();
  uint64_t sessions = r.core.stats().desk_sessions;
  for (bool reply : {true, false}) {
    r.desk.hello_as(reply ? 0x0BADCAFE : 0xD35C0099, reply);
    EXPECT_EQ(r.core.desk_generation(), generation + (reply ? 1 : 2));
    EXPECT_EQ(r.core.stats().desk_sessions, ++sessions);
    EXPECT_TRUE(r.core.desk_up());
    EXPECT_EQ(r.array(), kZeroArray) << "the old session's readers are gone until the new snapshot";
    EXPECT_TRUE(all_zero(c.readers_state()));
    c.send_transmit(card, kSelectMf);
    EXPECT_EQ(c.transmit_reply().rv, kEInvalidValue) << "orphaned";
  }
}

TEST(ShimCoreDeskLink, MajorVersionMismatchSendsAnErrorAndResetsTheLink) {
  Rig r;
  r.desk.connect_transport();
  r.desk.hello_as(0x42, false, pr::kVersionMajor + 1);
  auto m = r.desk.next();
  ASSERT_TRUE(m.has_value());
  auto* e = std::get_if<pr::Error>(&m->body);
  ASSERT_NE(e, nullptr) << pr::describe(*m);
  EXPECT_EQ(e->code, pr::ErrorCode::kVersion);
  EXPECT_EQ(r.fx.resets.size(), 1u);
  EXPECT_FALSE(r.core.desk_up());
}

TEST(ShimCoreDeskLink, APeerThatIsNotADeskResetsTheLink) {
  Rig r;
  r.desk.connect_transport();
  r.desk.hello_as(0x42, false, pr::kVersionMajor, pr::Role::kServer);
  EXPECT_EQ(r.fx.resets.size(), 1u);
  EXPECT_FALSE(r.core.desk_up());
}

TEST(ShimCoreDeskLink, AReplyForAnUnknownRequestIdIsIgnored) {
  Rig r(kStandardDesk);
  auto [a, ha] = r.connected_client();
  const auto effects = r.fx.events.size();
  r.desk.reply(987654, ok_reply(kSw9000));
  EXPECT_EQ(r.fx.events.size(), effects) << "no effect at all";
  a.send_transmit(ha, kSelectMf);
  const auto tx = r.desk.expect(pr::Op::kTransmit);
  r.desk.reply(tx.id + 1000, ok_reply({0xDE, 0xAD, 0x90, 0x00}));
  EXPECT_TRUE(a.nothing_pending());
  EXPECT_TRUE(r.fx.resets.empty());
  EXPECT_TRUE(r.core.desk_up());
  r.desk.reply(tx.id, ok_reply(kSw9000));
  EXPECT_EQ(a.transmit_reply().data, kSw9000);
  EXPECT_EQ(a.status(ha), kSuccess);
}

TEST(ShimCoreDeskLink, NothingBeforeHelloAndNoRequestsFromTheDesk) {
  Rig r;
  r.desk.connect_transport();
  r.desk.snapshot({card_in(kReaderA, 1)});  // before the hello exchange: ignored
  auto c = r.client();
  EXPECT_TRUE(all_zero(c.readers_state()));
  r.desk.hello_as(5, false);
  r.desk.expect_hello();
  r.desk.send(pr::Message{0, pr::Error{pr::ErrorCode::kLimit, "just saying"}});
  EXPECT_TRUE(r.core.desk_up()) << "an Error is only logged";
  EXPECT_TRUE(r.fx.resets.empty());
  pr::Request q;
  q.op = pr::Op::kPing;
  r.desk.send(pr::Message{1, q});  // a desk never sends requests
  EXPECT_EQ(r.fx.resets.size(), 1u);
  EXPECT_FALSE(r.core.desk_up());
}

TEST(ShimCoreDeskLink, HelloIsRetriedUntilTheDeskAnswers) {
  struct Timeline {
    std::chrono::milliseconds quiet, due;  // a tick before the retry is due, and one at or after it
    bool desk_replies;                     // the desk's hello is a reply, or a hello of its own
  };
  for (Timeline t : {Timeline{100ms, 600ms, true}, Timeline{499ms, 500ms, false}}) {
    Rig r;
    const auto t0 = r.now;
    EXPECT_FALSE(r.core.next_deadline().has_value()) << "no desk transport";
    auto first = r.desk.connect_transport();
    ASSERT_TRUE(r.core.next_deadline().has_value());
    EXPECT_EQ(*r.core.next_deadline(), t0 + 500ms);
    r.tick_at(t0 + t.quiet);
    EXPECT_TRUE(r.desk.idle()) << "not due yet";
    r.tick_at(t0 + t.due);
    auto again = r.desk.expect_hello();
    EXPECT_FALSE(again.reply);
    EXPECT_EQ(again.instance, first.instance);
    ASSERT_TRUE(r.core.next_deadline().has_value());
    EXPECT_EQ(*r.core.next_deadline(), t0 + t.due + 500ms);
    r.desk.hello(t.desk_replies);
    if (!t.desk_replies) {
      EXPECT_TRUE(r.desk.expect_hello().reply);
    }
    EXPECT_TRUE(r.core.desk_up());
    EXPECT_FALSE(r.core.next_deadline().has_value()) << "established and idle: no timer";
    r.tick_at(t0 + 10s);
    EXPECT_TRUE(r.desk.idle()) << "nothing once the desk answered";
  }
}

// =====================================================================================
// Liveness

// The latency probe of the control socket (cdrsession status/doctor): a Ping answered by
// the desk, or false at once without a desk and when the desk goes while it is out.
TEST(ShimCoreDeskLink, PingDeskReportsTheAnswerOrTheDesksAbsence) {
  Rig r;
  std::vector<bool> results;
  r.core.ping_desk(r.now, [&](bool ok) { results.push_back(ok); });
  EXPECT_EQ(results, std::vector<bool>{false}) << "no desk: answered at once";
  r.desk_up({card_in(kReaderA, 1)});
  r.core.ping_desk(r.now, [&](bool ok) { results.push_back(ok); });
  auto [id, q] = r.desk.expect(pr::Op::kPing);
  EXPECT_EQ(q.context.value, 0u) << "a Ping needs no desk context";
  r.desk.reply(id, pr::Reply{});
  EXPECT_EQ(results, (std::vector<bool>{false, true}));
  r.core.ping_desk(r.now, [&](bool ok) { results.push_back(ok); });
  r.desk.expect(pr::Op::kPing);
  r.core.desk_disconnected(r.now);
  EXPECT_EQ(results, (std::vector<bool>{false, true, false}));
}

TEST(ShimCoreLiveness, AProbeOnlyWhileRequestsAreOutstanding) {
  Rig r(kStandardDesk);
  auto a = r.client();
  const uint32_t ha = r.connect(a);  // the desk's last frame arrives at r.now
  const auto t = r.now;
  EXPECT_FALSE(r.core.next_deadline().has_value()) << "an idle link carries nothing";
  a.send_transmit(ha, kSelectMf);
  const auto tx = r.desk.expect(pr::Op::kTransmit);
  ASSERT_TRUE(r.core.next_deadline().has_value());
  EXPECT_EQ(*r.core.next_deadline(), t + 5s);
  r.tick_at(t + 4999ms);
  EXPECT_TRUE(r.desk.idle());
  r.tick_at(t + 5s);
  const auto ping = r.desk.expect(pr::Op::kPing);
  EXPECT_EQ(*r.core.next_deadline(), t + 10s);
  r.now = t + 6s;
  r.desk.reply(ping.id, {});
  EXPECT_TRUE(r.core.desk_up());
  EXPECT_EQ(*r.core.next_deadline(), t + 11s) << "counted again from the desk's last byte";
  r.desk.reply(tx.id, ok_reply(kSw9000));
  EXPECT_EQ(a.transmit_reply().data, kSw9000);
  EXPECT_FALSE(r.core.next_deadline().has_value());
}

TEST(ShimCoreLiveness, AnUnansweredProbeLosesTheDesk) {
  Rig r(kStandardDesk);
  auto [a, ha] = r.connected_client();
  const auto t = r.now;
  a.send_transmit(ha, kSelectMf);
  r.desk.expect(pr::Op::kTransmit);
  r.tick_at(t + 5s);
  r.desk.expect(pr::Op::kPing);
  r.tick_at(t + 9999ms);
  EXPECT_TRUE(r.core.desk_up());
  EXPECT_TRUE(a.nothing_pending());
  r.tick_at(t + 10s);
  EXPECT_FALSE(r.core.desk_up());
  EXPECT_EQ(r.fx.resets.size(), 1u);
  EXPECT_EQ(a.transmit_reply().rv, kEReaderUnavailable);
  EXPECT_TRUE(all_zero(a.readers_state()));
}

// =====================================================================================
// Malformed desk input

TEST(ShimCoreDeskLink, AMalformedDeskFrameResetsTheLinkAndFailsTheCallsInFlight) {
  for (const Bytes& garbage : {Bytes{0xFF, 0xFF, 0xFF, 0x01, 0x02}, Bytes{0x0A, 0xFF, 0xFF, 0x01}}) {
    ASSERT_FALSE(pr::decode(garbage).ok()) << "precondition: not a valid message";
    Rig r(kStandardDesk);
    auto [a, ha] = r.connected_client();
    a.send_transmit(ha, kSelectMf);
    r.desk.expect(pr::Op::kTransmit);
    r.desk.payload(garbage);
    ASSERT_EQ(r.fx.resets.size(), 1u);
    EXPECT_FALSE(r.core.desk_up());
    EXPECT_EQ(a.transmit_reply().rv, kEReaderUnavailable);
    EXPECT_EQ(r.array(), kZeroArray);
    EXPECT_FALSE(a.closed_by_shim());
  }
}

// =====================================================================================
// Desk lost, desk back

TEST(ShimCoreDeskLoss, InFlightTransmitFailsAtOnceReadersVanishAndWaitersAreSignalled) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  auto waiter = r.client();
  r.wait(waiter);
  c.send_transmit(card, kSelectMf);
  ASSERT_EQ(r.desk.queued_requests(), 1u);
  r.desk.transport_down();
  auto tr = c.transmit_reply();  // at once, 32 bytes, no data
  EXPECT_EQ(tr.rv, kEReaderUnavailable);
  EXPECT_EQ(tr.card, card);
  EXPECT_EQ(waiter.take_all(), signal_bytes(kSuccess));
  EXPECT_EQ(r.array(), kZeroArray);
  EXPECT_FALSE(r.core.desk_up());
  EXPECT_FALSE(c.closed_by_shim());
  // The old handle now answers like a handle whose reader is gone, locally.
  const std::size_t desk_before = r.fx.desk.size();
  c.send_transmit(card, kSelectMf);
  auto orphan = c.transmit_reply();
  EXPECT_EQ(orphan.rv, kEInvalidValue) << "pcscd: RFReaderInfoById fails";
  EXPECT_EQ(c.status(card), kEInvalidValue);
  EXPECT_EQ(r.fx.desk.size(), desk_before);
}

TEST(ShimCoreDeskLoss, OrphanHandlesAnswerInvalidValueDisconnectCleanlyAndStayOrphanedInANewSession) {
  Rig r(kStandardDesk);
  auto [a, ha] = r.connected_client();
  const uint32_t hb = r.connect(a);
  auto [early, early_card] = r.connected_client();
  auto [c2, card2] = r.connected_client();
  r.desk.transport_down();
  const std::size_t desk_before = r.fx.desk.size();

  // Every card operation of an orphan is answered locally.
  a.send_transmit(ha, kSelectMf);
  EXPECT_EQ(a.transmit_reply().rv, kEInvalidValue);
  a.send_begin(ha);
  EXPECT_EQ(a.begin_reply().rv, kEInvalidValue);
  EXPECT_EQ(a.scard_status(ha), kEReaderUnavailable) << "libpcsclite: the reader name is not in the array";
  EXPECT_EQ(a.status(ha), kEInvalidValue);
  a.send_end(ha, kLeaveCard);
  EXPECT_EQ(a.end_reply().rv, kEInvalidValue);
  a.send_control(ha, 0x42000D48, {}, 100);
  EXPECT_EQ(a.take_all(), Bytes(Le().u32(ha).u32(0x42000D48).u32(0).u32(100).u32(0).u32(kEInvalidValue)));
  a.send_get_attrib(ha, kAttrVendorName);
  EXPECT_EQ(a.get_attrib_reply().rv, kEInvalidValue);
  a.send_reconnect(ha, kShareShared, kT0T1, kLeaveCard);
  EXPECT_EQ(a.reconnect_reply().rv, kEInvalidValue);
  // pcscd: disconnecting a handle whose reader is gone succeeds.
  early.send_disconnect(early_card, kLeaveCard);
  EXPECT_EQ(early.disconnect_reply(), (DispositionReply{early_card, kLeaveCard, kSuccess}));

  // A new desk session (new instance) brings the readers back; the old handles stay orphans.
  r.desk.instance = 0xD35C0002;
  r.standard_desk();
  EXPECT_TRUE(r.core.desk_up());
  auto slots = r.readers();
  EXPECT_EQ(slots[0].name, kReaderA);
  EXPECT_EQ(slots[0].sharing, 0) << "orphans hold no share of the new reader";
  const std::size_t after_hello = r.fx.desk.size();
  a.send_transmit(ha, kSelectMf);
  EXPECT_EQ(a.transmit_reply().rv, kEInvalidValue);
  EXPECT_EQ(a.scard_status(ha), kEInvalidValue) << "same name again: STATUS is sent and fails";
  c2.send_transmit(card2, kSelectMf);
  EXPECT_EQ(c2.transmit_reply().rv, kEInvalidValue);
  EXPECT_EQ(c2.status(card2), kEInvalidValue);
  EXPECT_EQ(entry(a.readers_state(), 0).sharing, 0) << "orphans do not count";
  a.send_disconnect(ha, kLeaveCard);
  EXPECT_EQ(a.take_all(), Bytes(Le().u32(ha).u32(kLeaveCard).u32(kSuccess)));
  a.send_disconnect(hb, kResetCard);
  EXPECT_EQ(a.disconnect_reply().rv, kSuccess);
  c2.send_disconnect(card2, kResetCard);
  EXPECT_EQ(c2.disconnect_reply(), (DispositionReply{card2, kResetCard, kSuccess}));
  EXPECT_EQ(r.fx.desk.size(), after_hello) << "an orphan's reset must not touch the new session's card";
  EXPECT_GT(after_hello, desk_before);
  // New handles work; the contexts themselves still work.
  const uint32_t fresh = r.connect(c2);
  EXPECT_NE(fresh, card2);
  c2.send_transmit(fresh, kSelectMf);
  r.desk.serve();
  EXPECT_EQ(c2.transmit_reply().rv, kSuccess);
  r.connect(a);
}

TEST(ShimCoreDeskLoss, AnUnpluggedReaderOrphansItsHandlesEvenIfItComesBack) {
  Rig r(kStandardDesk);
  auto a = r.client();
  auto b = r.client();
  const uint32_t ha = r.connect(a);
  const uint32_t hb = r.connect(b, kReaderB, kShareDirect, {.protocol = 0, .counter = 0, .reader_state = kReaderAbsent});
  r.desk.push({empty_reader(kReaderB)});  // A unplugged
  EXPECT_EQ(a.scard_status(ha), kEReaderUnavailable);
  a.send_transmit(ha, kSelectMf);
  EXPECT_EQ(a.transmit_reply().rv, kEInvalidValue);
  r.desk.push({empty_reader(kReaderB), card_in(kReaderA, 1)});  // back (slot 0 again)
  EXPECT_EQ(entry(a.readers_state(), 0).sharing, 0);
  EXPECT_EQ(a.scard_status(ha), kEInvalidValue);
  const std::size_t before = r.fx.desk.size();
  a.send_transmit(ha, kSelectMf);
  EXPECT_EQ(a.transmit_reply().rv, kEInvalidValue);
  EXPECT_EQ(r.fx.desk.size(), before);
  EXPECT_EQ(b.scard_status(hb), kSuccess) << "the other reader's handle is untouched";
}

// =====================================================================================
// The desk's own PC/SC service and the audit events (issue 10)

TEST(ShimCoreDeskLink, TheDesksMissingPcscServiceIsKeptUntilItAnswersAgain) {
  Rig r;
  r.desk.connect_transport();
  r.desk.hello_as(0x51, /*reply=*/false);
  r.desk.expect_hello();
  ASSERT_TRUE(r.core.desk_up());
  EXPECT_EQ(r.core.desk_service_rv(), 0u);
  r.desk.send(pr::Message{0, pr::ReaderSnapshot{1, {}, pcsc::kENoService}});
  EXPECT_EQ(r.core.desk_service_rv(), pcsc::kENoService);
  r.desk.send(pr::Message{0, pr::ReaderSnapshot{2, {card_in(kReaderA, 1)}, 0}});
  EXPECT_EQ(r.core.desk_service_rv(), 0u) << "the desk's pcscd is back";
  r.desk.send(pr::Message{0, pr::ReaderSnapshot{3, {}, pcsc::kENoService}});
  r.desk.transport_down();
  EXPECT_EQ(r.core.desk_service_rv(), 0u) << "no desk, no verdict on its service";
}

TEST(ShimCoreAudit, DeskSessionsReadersAndCardConnectsAreAuditedATransmitIsNot) {
  Rig r(kStandardDesk);
  auto has = [&r](const std::string& text, bool from_client) {
    return std::any_of(r.fx.audits.begin(), r.fx.audits.end(), [&](const auto& a) {
      return a.second.find(text) != std::string::npos && (a.first != 0) == from_client;
    });
  };
  EXPECT_TRUE(has("desk connected: declared-name='desk-under-test'", false));
  EXPECT_TRUE(has("reader added: reader='" + kReaderA + "'", false));
  auto [c, card] = r.connected_client();
  EXPECT_TRUE(has("card connected: reader='" + kReaderA + "'", true));
  EXPECT_TRUE(has("share=shared", true));
  const std::size_t before = r.fx.audits.size();
  c.send_transmit(card, Bytes{0x00, 0x84, 0x00, 0x00, 0x08}, 300);
  EXPECT_EQ(r.fx.audits.size(), before) << "a transmit is no audit event";
  r.desk.transport_down();
  EXPECT_TRUE(has("desk disconnected: declared-name='desk-under-test'", false));
}

}  // namespace
}  // namespace cardbridge::shim::core_test
