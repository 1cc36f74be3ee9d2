// ShimCore's round-trip savings that keep pcscd's behaviour (docs/performance.md):
// EndTransaction and Disconnect answered at once and pipelined, the other clients' card
// operations ordered after them (by the desk with desk-ordering, fenced here without it),
// and BeginTransaction deferred to the handle's next card operation, with pcscd's lock
// rules still applied to the others.
#include <algorithm>
#include <cstdint>
#include <vector>

#include <gtest/gtest.h>

#include "core/optimized_fixture.hpp"
#include "core/shim_core_test.hpp"

namespace cardbridge::shim::core_test {
namespace {

namespace rf = cardbridge::protocol::request_flags;

// ---- pipelining -------------------------------------------------------------------------

TEST_F(ShimCoreOptimized, PipelinedDisconnectAnsweredAtOnceAndStillSent) {
  auto a = rig.client();
  pr::Request cq;
  const uint32_t ha = rig.connect(a, kReaderA, kShareShared, {.handle = 0x77}, &cq);
  const auto rt = rig.core.stats().round_trips;
  a.send_disconnect(ha, kLeaveCard);
  EXPECT_EQ(a.take_all(), Bytes(Le().u32(ha).u32(kLeaveCard).u32(kSuccess)));
  auto disc = rig.desk.expect(pr::Op::kDisconnect);
  EXPECT_EQ(disc.q.handle.value, 0x77u);
  EXPECT_EQ(disc.q.disposition, kLeaveCard);
  EXPECT_EQ(disc.q.context, cq.context);
  EXPECT_EQ(rig.core.stats().round_trips, rt);
  EXPECT_EQ(rig.core.stats().pipelined, 1u);
  EXPECT_EQ(entry(a.readers_state(), 0).sharing, 0);
  rig.desk.reply(disc.id, {});
  EXPECT_TRUE(a.nothing_pending()) << "the desk's answer goes nowhere";
}

TEST_F(ShimCoreOptimized, PipelinedEndAnsweredAtOnceAndStillSent) {
  auto a = rig.client();
  const uint32_t ha = rig.connect(a, kReaderA, kShareShared, {.handle = 0x77});
  deferred_begin(a, ha);
  transmit(a, ha, kSelectMf);
  a.send_end(ha, kLeaveCard);
  EXPECT_EQ(a.take_all(), Bytes(Le().u32(ha).u32(kLeaveCard).u32(kSuccess)));
  auto end = rig.desk.expect(pr::Op::kEndTransaction);
  EXPECT_EQ(end.q.handle.value, 0x77u);
  EXPECT_EQ(end.q.disposition, kLeaveCard);
  rig.desk.reply(end.id, {});
  EXPECT_TRUE(a.nothing_pending());
}

TEST_F(ShimCoreOptimized, OtherClientsCardOperationGoesAtOnceOrderedAfterThePipelinedRequest) {
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b, kReaderA, kShareShared, {.handle = 0xB0B});
  const uint32_t end_id = pipelined_end(a, ha);
  const auto rt = rig.core.stats().round_trips;
  b.send_transmit(hb, kSelectMf);
  auto tx = rig.desk.expect(pr::Op::kTransmit);
  EXPECT_EQ(tx.q.handle.value, 0xB0Bu);
  EXPECT_EQ(tx.q.after, std::vector<uint32_t>{end_id}) << "the desk runs it after A's END";
  EXPECT_EQ(rig.core.stats().round_trips, rt + 1);
  rig.desk.reply(tx.id, ok_reply({0x61, 0x02}));
  EXPECT_EQ(b.transmit_reply().data, (Bytes{0x61, 0x02}));
  rig.desk.reply(end_id, {});
  // Once the END is done, nothing is waited for any more.
  b.send_transmit(hb, kSelectMf);
  EXPECT_TRUE(rig.desk.expect(pr::Op::kTransmit).q.after.empty());
}

TEST_F(ShimCoreOptimizedOldDesk, OtherClientsCardOperationIsFencedBehindAPipelinedRequest) {
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b, kReaderA, kShareShared, {.handle = 0xB0B});
  const uint32_t end_id = pipelined_end(a, ha);
  b.send_transmit(hb, kSelectMf);
  EXPECT_TRUE(rig.desk.idle()) << "held until the pipelined END is done at the desk";
  EXPECT_TRUE(b.nothing_pending());
  rig.desk.reply(end_id, {});
  auto tx = rig.desk.expect(pr::Op::kTransmit);
  EXPECT_EQ(tx.q.handle.value, 0xB0Bu);
  EXPECT_EQ(tx.q.data, kSelectMf);
  rig.desk.reply(tx.id, ok_reply({0x61, 0x02}));
  EXPECT_EQ(b.transmit_reply().data, (Bytes{0x61, 0x02}));
}

TEST_F(ShimCoreOptimizedOldDesk, FenceAlsoHoldsBehindAPipelinedDisconnect) {
  auto [a, ha] = rig.connected_client();
  auto [b, hb] = rig.connected_client();
  a.send_disconnect(ha, kResetCard);
  EXPECT_EQ(a.disconnect_reply().rv, kSuccess);
  const auto disc = rig.desk.expect(pr::Op::kDisconnect);
  b.send_get_attrib(hb, kAttrVendorName);
  EXPECT_TRUE(rig.desk.idle());
  rig.desk.reply(disc.id, {});
  rig.desk.expect(pr::Op::kGetAttrib);
}

TEST_F(ShimCoreOptimized, OwnPipelinedRequestsAreNotWaitedFor) {
  auto [a, ha] = rig.connected_client();
  const uint32_t ha2 = rig.connect(a);
  a.send_disconnect(ha, kLeaveCard);
  a.take_all();
  rig.desk.expect(pr::Op::kDisconnect);
  a.send_transmit(ha2, kSelectMf);  // same context: the desk runs its requests in order anyway
  EXPECT_TRUE(rig.desk.expect(pr::Op::kTransmit).q.after.empty());
}

TEST_F(ShimCoreOptimized, ConnectBehindAPipelinedEndGoesAtOnceOrdered) {
  auto a = rig.client();
  auto c = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t end_id = pipelined_end(a, ha);
  c.send_connect(kReaderA);
  auto conn = rig.desk.expect(pr::Op::kConnect);
  EXPECT_EQ(conn.q.after, std::vector<uint32_t>{end_id});
  EXPECT_EQ(answer_connect(c, conn).rv, kSuccess);
}

// ---- deferred Begin ---------------------------------------------------------------------

TEST_F(ShimCoreOptimized, DeferredBeginIsCarriedByTheNextTransmit) {
  auto [a, ha] = rig.connected_client();
  deferred_begin(a, ha);
  EXPECT_EQ(rig.core.stats().deferred_begins, 1u);
  pr::Request q;
  transmit(a, ha, kSelectMf, &q);
  EXPECT_TRUE(q.flags & rf::kBeginFirst);
  transmit(a, ha, kSelectMf, &q);
  EXPECT_FALSE(q.flags & rf::kBeginFirst) << "carried once";
}

TEST_F(ShimCoreOptimized, BeginThenEndLeaveSendsNothing) {
  auto [a, ha] = rig.connected_client();
  const std::size_t before = rig.fx.desk.size();
  deferred_begin(a, ha);
  a.send_end(ha, kLeaveCard);
  EXPECT_EQ(a.take_all(), Bytes(Le().u32(ha).u32(kLeaveCard).u32(kSuccess)));
  EXPECT_EQ(rig.fx.desk.size(), before);
  pr::Request q;
  transmit(a, ha, kSelectMf, &q);
  EXPECT_FALSE(q.flags & rf::kBeginFirst);
}

TEST_F(ShimCoreOptimized, OtherClientGetsSharingViolationLocallyWhileATransactionIsDeferredOrHeld) {
  auto [a, ha] = rig.connected_client();
  auto [b, hb] = rig.connected_client();
  deferred_begin(a, ha);
  const std::size_t before = rig.fx.desk.size();
  b.send_begin(hb);
  EXPECT_EQ(b.take_all(), Bytes(Le().u32(hb).u32(kESharingViolation)));
  b.send_transmit(hb, kSelectMf);
  EXPECT_EQ(b.transmit_reply().rv, kESharingViolation);
  EXPECT_TRUE(b.nothing_pending());
  EXPECT_EQ(b.scard_status(hb), kESharingViolation);
  EXPECT_EQ(rig.fx.desk.size(), before);
  transmit(a, ha, kSelectMf);  // the transaction is now held at the desk
  b.send_begin(hb);
  EXPECT_EQ(b.begin_reply().rv, kESharingViolation);
  b.send_transmit(hb, kSelectMf);
  EXPECT_EQ(b.transmit_reply().rv, kESharingViolation);
  EXPECT_EQ(rig.fx.desk.size(), before + 1) << "only A's transmit went out";
  a.send_end(ha, kLeaveCard);
  EXPECT_EQ(a.end_reply().rv, kSuccess);
  b.send_begin(hb);
  EXPECT_EQ(b.begin_reply().rv, kSuccess);
}

TEST_F(ShimCoreOptimized, ConnectIsParkedWhileATransactionIsDeferred) {
  auto a = rig.client();
  auto c = rig.client();
  const uint32_t ha = rig.connect(a);
  deferred_begin(a, ha);
  c.send_connect(kReaderA);
  EXPECT_TRUE(rig.desk.idle()) << "pcscd blocks a Connect while a transaction is held";
  EXPECT_TRUE(c.nothing_pending());
  a.send_end(ha, kLeaveCard);
  EXPECT_EQ(a.end_reply().rv, kSuccess);
  auto conn = rig.desk.expect(pr::Op::kConnect);
  EXPECT_EQ(conn.q.reader, kReaderA);
  auto rep = answer_connect(c, conn);
  EXPECT_EQ(rep.rv, kSuccess);
  EXPECT_NE(rep.card, 0u);
}

TEST_F(ShimCoreOptimizedOldDesk, ConnectIsParkedWhileATransactionIsHeldAndProceedsAfterEnd) {
  auto a = rig.client();
  auto c = rig.client();
  const uint32_t ha = rig.connect(a);
  deferred_begin(a, ha);
  transmit(a, ha, kSelectMf);
  c.send_connect(kReaderA);
  EXPECT_TRUE(rig.desk.idle());
  a.send_end(ha, kLeaveCard);
  EXPECT_EQ(a.end_reply().rv, kSuccess);
  const auto end = rig.desk.expect(pr::Op::kEndTransaction);
  EXPECT_TRUE(rig.desk.idle()) << "the Connect also waits behind the pipelined END";
  rig.desk.reply(end.id, {});
  const auto conn = rig.desk.expect(pr::Op::kConnect);
  EXPECT_EQ(answer_connect(c, conn).rv, kSuccess);
}

TEST_F(ShimCoreOptimized, CardRemovalClearsADeferredBegin) {
  auto [a, ha] = rig.connected_client();
  auto [b, hb] = rig.connected_client();
  deferred_begin(a, ha);
  EXPECT_EQ(b.scard_status(hb), kESharingViolation);
  rig.desk.push({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  EXPECT_EQ(b.scard_status(hb), kWRemovedCard) << "no lingering SHARING_VIOLATION";
  rig.desk.push({card_in(kReaderA, 3), empty_reader(kReaderB)});
  auto c = rig.client();
  c.send_connect(kReaderA);
  rig.desk.expect(pr::Op::kConnect);  // not parked
  // A's transaction is gone: its next operation carries no Begin.
  a.send_transmit(ha, kSelectMf);
  EXPECT_FALSE(rig.desk.expect(pr::Op::kTransmit).q.flags & rf::kBeginFirst);
}

// ---- a client going away holding a (deferred) transaction ---------------------------------

TEST_F(ShimCoreOptimized, ClientDyingWithADeferredSharedTransactionResetsTheCard) {
  auto a = rig.client();
  auto b = rig.client();
  pr::Request cq;
  const uint32_t ha = rig.connect(a, kReaderA, kShareShared, {.handle = 0xAA}, &cq);
  const uint32_t hb = rig.connect(b);
  deferred_begin(a, ha);
  a.close();
  const auto disc = rig.desk.expect(pr::Op::kDisconnect);
  EXPECT_EQ(disc.q.handle.value, 0xAAu);
  EXPECT_EQ(disc.q.disposition, kResetCard) << "pcscd MSGCleanupClient: the lock holder is reset";
  EXPECT_EQ(disc.q.context, cq.context);
  const auto rel = rig.desk.expect(pr::Op::kReleaseContext);
  EXPECT_EQ(rel.q.context, cq.context);
  EXPECT_EQ(b.scard_status(hb), kWResetCard);
  EXPECT_EQ(entry(b.readers_state(), 0).protocol, 0u) << "cardProtocol 0 after the reset";
  rig.desk.reply(disc.id, {});
  rig.desk.reply(rel.id, {});
  EXPECT_TRUE(b.nothing_pending());
}

TEST_F(ShimCoreOptimized, ClientDyingWithoutATransactionResetsNothing) {
  auto a = rig.client();
  auto b = rig.client();
  rig.connect(a);
  const uint32_t hb = rig.connect(b);
  a.close();
  rig.desk.expect(pr::Op::kReleaseContext);
  EXPECT_TRUE(rig.desk.idle());
  EXPECT_EQ(b.scard_status(hb), kSuccess);
}

// ---- Disconnect(RESET) and another client's transaction -------------------------------------

// pcscd: SCardDisconnect(RESET/UNPOWER) waits while another handle holds the transaction
// (winscard.c: while (hLockId != 0) sleep); the card is reset only after that handle's End.
TEST_F(ShimCoreOptimized, DisconnectResetWaitsForAnotherClientsTransaction) {
  auto [a, ha] = rig.connected_client();
  auto [b, hb] = rig.connected_client();
  deferred_begin(a, ha);
  transmit(a, ha, kSelectMf);  // the transaction is held at the desk
  b.send_disconnect(hb, kResetCard);
  EXPECT_EQ(a.scard_status(ha), kSuccess) << "no reset can happen inside A's transaction";
  a.send_end(ha, kLeaveCard);
  EXPECT_EQ(a.end_reply().rv, kSuccess);
  const std::size_t first = rig.desk.read_position();
  rig.drain_end_first();
  const auto is_reset = [](const pr::Message& m) {
    const auto* q = std::get_if<pr::Request>(&m.body);
    return q && q->op == pr::Op::kDisconnect && q->disposition == kResetCard;
  };
  EXPECT_TRUE(std::any_of(rig.fx.desk.begin() + static_cast<std::ptrdiff_t>(first), rig.fx.desk.end(), is_reset));
  EXPECT_EQ(b.take_all(), Bytes(Le().u32(hb).u32(kResetCard).u32(kSuccess)));
  EXPECT_EQ(a.scard_status(ha), kWResetCard) << "after the End, the reset is seen";
}

TEST_F(ShimCoreOptimized, DisconnectResetDoesNotResetTheCardUnderADeferredTransaction) {
  auto [a, ha] = rig.connected_client();
  auto [b, hb] = rig.connected_client();
  deferred_begin(a, ha);
  b.send_disconnect(hb, kResetCard);
  while (!rig.desk.idle()) {
    auto req = rig.desk.request();
    EXPECT_NE(req.q.op, pr::Op::kDisconnect)
        << "the reset would reach the card inside A's transaction (pcscd makes it wait)";
    rig.desk.reply(req.id, {});
  }
  EXPECT_EQ(a.scard_status(ha), kSuccess);
  pr::Request q;
  transmit(a, ha, kSelectMf, &q);
  EXPECT_TRUE(q.flags & rf::kBeginFirst);
  a.send_end(ha, kLeaveCard);
  EXPECT_EQ(a.end_reply().rv, kSuccess);
  rig.desk.serve();
  EXPECT_EQ(b.take_all(), Bytes(Le().u32(hb).u32(kResetCard).u32(kSuccess)));
  EXPECT_EQ(a.scard_status(ha), kWResetCard);
}

}  // namespace
}  // namespace cardbridge::shim::core_test
