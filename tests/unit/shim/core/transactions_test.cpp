// ShimCore: transactions as pcscd runs them, without the optimisations (each Begin/End is a
// desk round trip): the lock refuses the other handles' card operations, a Connect or a
// Disconnect(RESET) waits for the transaction to end, End(RESET) marks every handle
// (pcsc-protocol.md §5.2, §5.3).
#include <cstdint>

#include <gtest/gtest.h>

#include "core/shim_core_test.hpp"

namespace cardbridge::shim::core_test {
namespace {

TEST(ShimCoreTransaction, SharingViolationForTheOthersWhileAHandleHoldsATransaction) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  auto [c2, card2] = r.connected_client();
  c.send_begin(card);
  r.desk.serve();
  EXPECT_EQ(c.begin_reply(), (PairReply{card, kSuccess}));
  EXPECT_EQ(c2.status(card2), kESharingViolation);
  EXPECT_EQ(c.status(card), kSuccess) << "the holder itself";
  // The others' card operations are refused too, without bothering the desk.
  c2.send_transmit(card2, kSelectMf);
  EXPECT_EQ(c2.transmit_reply().rv, kESharingViolation);
  EXPECT_TRUE(r.desk.idle());
  c.send_end(card, kLeaveCard);
  r.desk.serve();
  EXPECT_EQ(c.end_reply(), (DispositionReply{card, kLeaveCard, kSuccess}));
  EXPECT_EQ(c2.status(card2), kSuccess);
}

TEST(ShimCoreTransaction, EndTransactionWithResetMarksEveryHandleIncludingTheCaller) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  auto [c2, card2] = r.connected_client();
  r.begin_at_desk(c, card);
  c.send_end(card, kResetCard);
  auto req = r.desk.expect(pr::Op::kEndTransaction);
  EXPECT_EQ(req.q.disposition, kResetCard);
  r.desk.reply(req.id, {});
  EXPECT_EQ(c.end_reply(), (DispositionReply{card, kResetCard, kSuccess}));
  EXPECT_EQ(c.status(card), kWResetCard);
  EXPECT_EQ(c2.status(card2), kWResetCard);
  c.send_reconnect(card, kShareShared, kT0T1, kLeaveCard, kT1);
  r.desk.serve();
  EXPECT_EQ(c.reconnect_reply().rv, kSuccess);
  EXPECT_EQ(c.status(card), kSuccess);
  EXPECT_EQ(c2.status(card2), kWResetCard) << "only the reconnected handle is cleared";
}

// §5.2: "Connect when another handle holds a transaction: pcscd blocks inside Connect
// (polling every 100 ms) until the lock is released. It does not return an error."
TEST(ShimCoreTransaction, ConnectWaitsWhileAnotherHandleHoldsATransaction) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  r.begin_at_desk(c, card);
  auto c2 = r.client();
  c2.send_connect(kReaderA);
  EXPECT_TRUE(c2.nothing_pending()) << "blocked, not refused";
  EXPECT_TRUE(r.desk.idle());
  c.send_end(card, kLeaveCard);
  r.desk.serve();  // the END, then the CONNECT released by it
  EXPECT_EQ(c.end_reply(), (DispositionReply{card, kLeaveCard, kSuccess}));
  auto cr = c2.connect_reply();
  EXPECT_EQ(cr.rv, kSuccess);
  EXPECT_NE(cr.card, 0u);
  EXPECT_EQ(r.readers()[0].sharing, 2);
}

// pcscd: SCardDisconnect(RESET/UNPOWER) waits while another handle holds the transaction
// (winscard.c: while (hLockId != 0) sleep); the card is reset only after that handle's End.
TEST(ShimCoreTransaction, DisconnectWithResetWaitsForAnotherHandlesTransaction) {
  Rig r(kStandardDesk);
  auto [a, ha] = r.connected_client();
  auto [b, hb] = r.connected_client();
  r.begin_at_desk(a, ha);
  b.send_disconnect(hb, kResetCard);
  EXPECT_TRUE(b.nothing_pending()) << "pcscd blocks it while A holds the transaction";
  EXPECT_EQ(a.scard_status(ha), kSuccess);
  a.send_end(ha, kLeaveCard);
  r.drain_end_first();
  EXPECT_EQ(a.end_reply().rv, kSuccess);
  EXPECT_EQ(b.take_all(), Bytes(Le().u32(hb).u32(kResetCard).u32(kSuccess)));
  EXPECT_EQ(a.scard_status(ha), kWResetCard);
}

}  // namespace
}  // namespace cardbridge::shim::core_test
