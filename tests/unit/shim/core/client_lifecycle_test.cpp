// ShimCore: a client going away (EOF) or releasing its context. Its desk context is
// released, its handles go (the card reset where it held the transaction, as pcscd's
// MSGCleanupClient does), answers still in flight for it go nowhere, and the other
// clients' card operations wait for the release when it may reset their card
// (pcsc-protocol.md §5.7).
#include <cstdint>

#include <gtest/gtest.h>

#include "core/shim_core_test.hpp"

namespace cardbridge::shim::core_test {
namespace {

TEST(ShimCoreClients, CloseOrReleaseContextReleasesTheDeskContext) {
  Rig r(kStandardDesk);
  auto a = r.client();
  auto idle = r.client();
  pr::Request connect_req;
  r.connect(a, kReaderA, kShareShared, {}, &connect_req);
  ASSERT_NE(connect_req.context.value, 0u);
  EXPECT_EQ(entry(idle.readers_state(), 0).sharing, 1);
  a.close();
  auto rel = r.desk.expect(pr::Op::kReleaseContext);
  EXPECT_EQ(rel.q.context, connect_req.context);
  EXPECT_FALSE(r.fx.closed_by_core(a.id())) << "the I/O layer reported the close; nothing to close";
  EXPECT_TRUE(r.desk.idle()) << "no Disconnect(RESET) for a plain shared handle";
  EXPECT_EQ(entry(idle.readers_state(), 0).sharing, 0);
  r.desk.reply(rel.id, {});
  EXPECT_EQ(r.readers()[0].sharing, 0);
  // A client that never reached the desk has no desk context to release.
  idle.close();
  EXPECT_TRUE(r.desk.idle());
  EXPECT_EQ(r.core.client_count(), 0u);
  EXPECT_EQ(r.core.handle_count(), 0u);
  // SCardReleaseContext on the wire does the same.
  auto c3 = r.client();
  pr::Request connect3;
  r.connect(c3, kReaderA, kShareShared, {}, &connect3);
  c3.send_release(c3.context());
  EXPECT_EQ(c3.take_all(), Bytes(Le().u32(c3.context()).u32(kSuccess)));
  EXPECT_EQ(r.desk.expect(pr::Op::kReleaseContext).q.context, connect3.context);
  EXPECT_EQ(r.core.handle_count(), 0u);
}

TEST(ShimCoreClients, ReplyForAClientThatWentAwayGoesNowhereAndTheOthersAreOrderedAfterItsRelease) {
  Rig r(kStandardDesk);
  auto [a, ha] = r.connected_client();
  auto [b, hb] = r.connected_client();
  a.send_transmit(ha, kSelectMf);
  const auto tx_a = r.desk.expect(pr::Op::kTransmit);
  a.close();  // RecordingEffects fails the test if anything is sent to it from now on
  const auto release = r.desk.expect(pr::Op::kReleaseContext);
  r.desk.reply(tx_a.id, ok_reply(kSw9000));
  b.send_transmit(hb, kSelectMf);
  // The release may reset the card: B's transmit goes at once, but tells the desk to run
  // it after the release (desk-ordering).
  auto tx_b = r.desk.expect(pr::Op::kTransmit);
  EXPECT_EQ(tx_b.q.after, std::vector<uint32_t>{release.id});
  r.desk.reply(release.id, {});
  r.desk.reply(tx_b.id, ok_reply(kSw9000));
  EXPECT_EQ(b.transmit_reply().data, kSw9000);
  EXPECT_EQ(r.core.client_count(), 1u);
}

TEST(ShimCoreClients, WithADeskWithoutOrderingTheReplyForAClosedClientIsIgnoredAndTheOthersWaitForItsRelease) {
  Rig r(kStandardDesk, rig_config(), pr::caps::kAll & ~pr::caps::kDeskOrdering);
  auto [c, card] = r.connected_client();
  auto [other, card2] = r.connected_client();
  c.send_transmit(card, kSelectMf);
  auto req = r.desk.expect(pr::Op::kTransmit);
  const ClientId gone = c.id();
  c.close();
  auto rel = r.desk.expect(pr::Op::kReleaseContext);
  const auto effects = r.fx.events.size();
  r.desk.reply(req.id, r.desk.answer(req));
  EXPECT_EQ(r.fx.available(gone), 0u);
  EXPECT_EQ(r.fx.events.size(), effects) << "no effect at all";
  EXPECT_TRUE(r.fx.resets.empty());
  // The other client's card operation on that reader waits for the release to be done
  // at the desk (it may reset the card), then goes out.
  other.send_transmit(card2, kSelectMf);
  EXPECT_TRUE(r.desk.idle()) << "the release may reset the card: the other client waits for it";
  r.desk.reply(rel.id, {});
  auto tx = r.desk.expect(pr::Op::kTransmit);
  EXPECT_TRUE(tx.q.after.empty());
  r.desk.reply(tx.id, r.desk.answer(tx));
  EXPECT_EQ(other.transmit_reply().rv, kSuccess);
}

// §5.7: a client that dies holding the transaction gets its card reset (others see
// W_RESET_CARD); one that held nothing leaves the card alone.
TEST(ShimCoreClients, DeathWithATransactionResetsTheCardForTheOthers) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  auto [c2, card2] = r.connected_client();
  auto c3 = r.client();
  r.connect(c3);
  // c3 dies holding nothing: no reset.
  c3.close();
  r.desk.answer_next(pr::Op::kReleaseContext);
  EXPECT_EQ(c2.status(card2), kSuccess);
  EXPECT_EQ(r.readers()[0].sharing, 2);
  // c dies inside a transaction.
  r.begin_at_desk(c, card);
  EXPECT_EQ(c2.status(card2), kESharingViolation);
  c.close();
  auto rel = r.desk.expect(pr::Op::kReleaseContext);
  EXPECT_NE(rel.q.context.value, 0u);
  EXPECT_EQ(c2.status(card2), kWResetCard) << "lock gone, card reset";
  auto slot = r.readers()[0];
  EXPECT_EQ(slot.sharing, 1);
  EXPECT_EQ(slot.protocol, 0u);
}

}  // namespace
}  // namespace cardbridge::shim::core_test
