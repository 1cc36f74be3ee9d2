// ShimCore: SCARD_STATUS, answered from the shim's own state, and the pending events it
// reports in pcscd's order: SHARING_VIOLATION, W_REMOVED_CARD, W_RESET_CARD,
// READER_UNAVAILABLE (pcsc-protocol.md §2.3, §5.3, §5.4). How resets (RECONNECT,
// DISCONNECT with RESET/UNPOWER) and card removals mark the other handles.
#include <cstdint>

#include <gtest/gtest.h>

#include "core/shim_core_test.hpp"

namespace cardbridge::shim::core_test {
namespace {

TEST(ShimCoreStatus, AnsweredLocallyWithSuccess) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  const auto requests = r.core.stats().desk_requests;
  c.send_status(card);
  EXPECT_EQ(c.take_all(), Bytes(Le().u32(card).u32(kSuccess)));
  EXPECT_EQ(r.core.stats().desk_requests, requests);
  EXPECT_TRUE(r.desk.idle());
}

TEST(ShimCoreStatus, RemovedCardAfterTheCardWasTakenOut) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  auto [c2, card2] = r.connected_client();
  r.desk.push({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  for (int i = 0; i < 2; ++i) {  // each time, until reconnected or disconnected
    EXPECT_EQ(c.status(card), kWRemovedCard);
    EXPECT_EQ(c2.status(card2), kWRemovedCard);
  }
  EXPECT_TRUE(r.desk.idle());
}

TEST(ShimCoreStatus, RemovedCardAfterTheCardWasSwapped) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  r.desk.push({card_in(kReaderA, 3, {0x3B, 0x00}), empty_reader(kReaderB)});  // out and in again: counter +2
  EXPECT_EQ(c.status(card), kWRemovedCard);
}

// §5.4: Reconnect clears a pending removal.
TEST(ShimCoreStatus, ReconnectAfterTheCardCameBackClearsRemovedCard) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  r.desk.push({card_in(kReaderA, 3), empty_reader(kReaderB)});  // out and in again
  EXPECT_EQ(c.status(card), kWRemovedCard);
  c.send_reconnect(card, kShareShared, kT0T1, kLeaveCard, kT1);
  r.desk.serve();
  auto rr = c.reconnect_reply();
  EXPECT_EQ(rr.rv, kSuccess);
  EXPECT_EQ(rr.active_protocol, kT1);
  EXPECT_EQ(c.status(card), kSuccess);
  EXPECT_EQ(r.readers()[0].protocol, kT1);
}

TEST(ShimCoreStatus, ResetCardForTheOtherHandlesAfterReconnectWithReset) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  auto [c2, card2] = r.connected_client();
  c.send_reconnect(card, kShareShared, kT0T1, kResetCard, kT1);
  auto req = r.desk.expect(pr::Op::kReconnect);
  EXPECT_EQ(req.q.handle.value, 1u) << "the desk's handle";
  EXPECT_EQ(req.q.disposition, kResetCard);
  EXPECT_EQ(req.q.share_mode, kShareShared);
  EXPECT_EQ(req.q.protocols, kT0T1);
  r.desk.reply(req.id, r.desk.answer(req));
  auto rr = c.reconnect_reply();
  EXPECT_EQ(rr.card, card);
  EXPECT_EQ(rr.initialization, kResetCard);
  EXPECT_EQ(rr.active_protocol, kT1);
  EXPECT_EQ(rr.rv, kSuccess);
  EXPECT_EQ(c.status(card), kSuccess) << "the caller's own reset is not reported to it";
  EXPECT_EQ(c2.status(card2), kWResetCard);
  EXPECT_EQ(c2.status(card2), kWResetCard) << "each time";
  // RECONNECT (LEAVE) clears it.
  c2.send_reconnect(card2, kShareShared, kT0T1, kLeaveCard, kT1);
  r.desk.serve();
  EXPECT_EQ(c2.reconnect_reply().rv, kSuccess);
  EXPECT_EQ(c2.status(card2), kSuccess);
  EXPECT_EQ(c.status(card), kSuccess);
}

TEST(ShimCoreStatus, ResetCardForTheOtherHandlesAfterDisconnectWithReset) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  auto [c2, card2] = r.connected_client();
  c.send_disconnect(card, kResetCard);
  auto req = r.desk.expect(pr::Op::kDisconnect);
  EXPECT_EQ(req.q.disposition, kResetCard);
  r.desk.reply(req.id, r.desk.answer(req));
  EXPECT_EQ(c.disconnect_reply(), (DispositionReply{card, kResetCard, kSuccess}));
  EXPECT_EQ(c2.status(card2), kWResetCard);
  EXPECT_EQ(r.readers()[0].sharing, 1);
  // The disconnected handle is no longer this connection's: using it closes the connection.
  c.send_status(card);
  EXPECT_TRUE(c.closed_by_shim());
  EXPECT_FALSE(c2.closed_by_shim());
}

TEST(ShimCoreStatus, RemovedBeforeReset) {
  Rig r(kStandardDesk);
  auto [a, ha] = r.connected_client();
  auto [b, hb] = r.connected_client();
  r.reconnect_at_desk(b, hb, kResetCard, 1);
  EXPECT_EQ(a.scard_status(ha), kWResetCard);
  EXPECT_EQ(b.scard_status(hb), kSuccess) << "the resetting handle itself is clean";
  r.desk.push({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  EXPECT_EQ(a.scard_status(ha), kWRemovedCard);
}

TEST(ShimCoreStatus, ResetBeforeReaderUnavailable) {
  Rig r(kStandardDesk);
  auto [a, ha] = r.connected_client();
  auto [b, hb] = r.connected_client();
  r.reconnect_at_desk(b, hb, kResetCard, 1);
  r.desk.push({pr::ReaderInfo{kReaderA, kStateUnavailable, 1, {}}, empty_reader(kReaderB)});
  EXPECT_EQ(entry(a.readers_state(), 0).reader_state, kReaderUnknown);
  EXPECT_EQ(a.scard_status(ha), kWResetCard);
  EXPECT_EQ(b.scard_status(hb), kEReaderUnavailable);
}

TEST(ShimCoreStatus, SharingViolationBeforeRemoved) {
  Rig r(kStandardDesk);
  auto [a, ha] = r.connected_client();
  auto [b, hb] = r.connected_client();
  EXPECT_EQ(a.scard_status(ha), kSuccess);
  r.begin_at_desk(b, hb);
  EXPECT_EQ(a.scard_status(ha), kESharingViolation);
  // Card out and in: A has a removal pending; B reconnects and takes the lock again.
  r.desk.push({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  r.desk.push({card_in(kReaderA, 3), empty_reader(kReaderB)});
  r.reconnect_at_desk(b, hb, kLeaveCard, 3);
  r.begin_at_desk(b, hb);
  const std::size_t before = r.fx.desk.size();
  EXPECT_EQ(a.scard_status(ha), kESharingViolation);
  r.end_at_desk(b, hb);
  EXPECT_EQ(a.scard_status(ha), kWRemovedCard);
  EXPECT_EQ(a.scard_status(ha), kWRemovedCard) << "returned on every call";
  EXPECT_EQ(r.fx.desk.size(), before + 1) << "STATUS itself never goes to the desk (only B's END did)";
}

TEST(ShimCoreStatus, DirectHandleInsertionIsNotARemoval) {
  Rig r(kStandardDesk);
  auto c = r.client();
  const uint32_t h = r.connect(c, kReaderB, kShareDirect, {.protocol = 0, .counter = 0, .reader_state = kReaderAbsent});
  EXPECT_EQ(c.scard_status(h), kSuccess) << "DIRECT on an empty reader";
  EXPECT_EQ(entry(c.readers_state(), 1).sharing, 1) << "DIRECT handles count in readerSharing";
  r.desk.push({card_in(kReaderA, 1), card_in(kReaderB, 1)});  // inserted
  EXPECT_EQ(c.scard_status(h), kSuccess) << "an insertion is not a removal";
  r.desk.push({card_in(kReaderA, 1), empty_reader(kReaderB, 2)});  // removed
  EXPECT_EQ(c.scard_status(h), kWRemovedCard);
}

}  // namespace
}  // namespace cardbridge::shim::core_test
