// ShimCore: SCARD_CONNECT and SCARD_DISCONNECT: what pcscd refuses locally and in which
// order, what goes to the desk, the hCards the program gets (never the desk's handles), and
// the sharing count the reader-state array shows (pcsc-protocol.md §2.3, §5.1, §5.2).
#include <cstdint>
#include <set>
#include <string>

#include <gtest/gtest.h>

#include "core/shim_core_test.hpp"

namespace cardbridge::shim::core_test {
namespace {

TEST(ShimCoreConnect, ForwardedToTheDeskAndAnsweredWithANewHandleNeverTheDesks) {
  Rig r(kStandardDesk);
  auto c = r.client();
  auto waiter = r.client();
  r.wait(waiter);
  c.send_connect(kReaderA, kShareShared, kT0T1);  // [traced] share 2, protocols 3
  EXPECT_TRUE(c.nothing_pending()) << "no answer before the desk's";
  auto [id, q] = r.desk.expect(pr::Op::kConnect);
  EXPECT_EQ(q.reader, kReaderA);
  EXPECT_EQ(q.share_mode, kShareShared);
  EXPECT_EQ(q.protocols, kT0T1);
  EXPECT_NE(q.context.value, 0u);
  pr::Reply rep;
  rep.handle = pr::DeskHandle{0x0000BEEF};
  rep.protocol = kT1;
  rep.state = (1u << 16) | kReaderCardReady;
  rep.atr = kAtr;
  rep.card_protocol = kT1;
  r.desk.reply(id, rep);
  auto cr = c.connect_reply();
  EXPECT_EQ(cr.rv, kSuccess);
  EXPECT_EQ(cr.context, c.context());
  EXPECT_EQ(cr.reader, kReaderA);
  EXPECT_EQ(cr.share, kShareShared);
  EXPECT_EQ(cr.protocols, kT0T1);
  EXPECT_EQ(cr.active_protocol, kT1);
  EXPECT_GT(cr.card, 0u);
  EXPECT_LE(cr.card, 0x7FFFFFFFu) << "positive 31-bit";
  EXPECT_NE(cr.card, 0x0000BEEFu) << "never the desk's handle";
  EXPECT_NE(cr.card, c.context());
  // [traced] after Connect: sharing 1, protocol 2; waiters are told.
  EXPECT_EQ(slot_of(r.array(), 0), expected_slot(kReaderA, 1, 0x34, 1, kAtr, kT1));
  EXPECT_EQ(waiter.take_all(), signal_bytes(kSuccess));
  // The shim's handle maps to the desk's, in the same desk context.
  c.send_transmit(cr.card, kSelectMf);
  auto t = r.desk.expect(pr::Op::kTransmit);
  EXPECT_EQ(t.q.handle.value, 0x0000BEEFu);
  EXPECT_EQ(t.q.context, q.context);

  // Many connects: handles unique, positive, never the desk's value.
  std::set<uint32_t> cards{cr.card};
  for (uint32_t i = 0; i < 20; ++i) {
    auto x = r.client();
    const uint32_t desk_handle = 0x100 + i;
    const uint32_t card = r.connect(x, kReaderA, kShareShared, {.handle = desk_handle});
    EXPECT_NE(card, desk_handle);
    EXPECT_GT(card, 0u);
    EXPECT_LE(card, 0x7FFFFFFFu);
    EXPECT_TRUE(cards.insert(card).second);
  }
}

TEST(ShimCoreConnect, HandlesAreUniqueSharingCountsThemAndExclusiveIsMinusOne) {
  Rig r;
  r.desk_up({card_in(kReaderA, 1), empty_reader(kReaderB), card_in(kReaderC, 1, kAtr2)});
  auto c1 = r.client();
  auto c2 = r.client();
  auto c3 = r.client();
  std::set<uint32_t> cards;
  cards.insert(r.connect(c1, kReaderA));
  EXPECT_EQ(r.readers()[0].sharing, 1);
  EXPECT_EQ(r.readers()[0].protocol, kT1) << "the negotiated protocol shows in the array";
  cards.insert(r.connect(c1, kReaderA));  // two handles on one context
  EXPECT_EQ(r.readers()[0].sharing, 2);
  const uint32_t c2_card = r.connect(c2, kReaderA);
  cards.insert(c2_card);
  auto waiter = r.client();
  r.wait(waiter);
  cards.insert(r.connect(c3, kReaderC, kShareExclusive));
  EXPECT_EQ(cards.size(), 4u);
  for (uint32_t card : cards) {
    EXPECT_GT(card, 4u) << "desk handles 1..4 must not leak";
    EXPECT_NE(card, c1.context());
    EXPECT_NE(card, c2.context());
    EXPECT_NE(card, c3.context());
  }
  auto slots = r.readers();
  EXPECT_EQ(slots[0].sharing, 3);
  EXPECT_EQ(slots[1].sharing, 0);
  EXPECT_EQ(slots[2].sharing, -1);
  EXPECT_EQ(slots[2].protocol, kT1);
  EXPECT_EQ(waiter.take_all(), signal_bytes(kSuccess)) << "the exclusive connect changed readerSharing";
  // A disconnect gives its share back.
  c2.send_disconnect(c2_card, kLeaveCard);
  r.desk.answer_next(pr::Op::kDisconnect);
  EXPECT_EQ(c2.take_all(), Bytes(Le().u32(c2_card).u32(kLeaveCard).u32(kSuccess)));
  EXPECT_EQ(r.readers()[0].sharing, 2);
}

TEST(ShimCoreConnect, ArgumentChecksInPcscdOrder) {
  Rig r(kStandardDesk);
  auto c = r.client();
  auto expect_rv = [&](const std::string& reader, uint32_t share, uint32_t protocols, uint32_t rv) {
    c.send_connect(reader, share, protocols);
    auto cr = c.connect_reply();
    EXPECT_EQ(cr.rv, rv) << reader << " share " << share << " protocols " << protocols;
    EXPECT_EQ(cr.card, 0u);
    EXPECT_EQ(cr.active_protocol, 0u);
    EXPECT_TRUE(r.desk.idle()) << "refused locally";
  };
  const std::string unknown = "No Such Reader 00 00";
  expect_rv(unknown, 5, 0, kEProtoMismatch);                    // protocol first
  expect_rv(unknown, 5, kT15, kEProtoMismatch);                 // T15 alone is not a protocol
  expect_rv(unknown, 5, kT0T1, kEInvalidValue);                 // then the share mode
  expect_rv(unknown, 0, kAnyOld, kEInvalidValue);               // 0x1000 passes the protocol check
  expect_rv(unknown, kShareShared, kT0T1, kEUnknownReader);     // then the reader
  expect_rv(kReaderA, 4, kRaw, kEInvalidValue);
  // DIRECT needs no protocol: forwarded.
  c.send_connect(kReaderA, kShareDirect, 0);
  auto [id, q] = r.desk.expect(pr::Op::kConnect);
  EXPECT_EQ(q.share_mode, kShareDirect);
  EXPECT_EQ(q.protocols, 0u);
}

TEST(ShimCoreConnect, UnknownReaderOrNoDeskIsAnsweredLocally) {
  {
    Rig r;
    r.desk_up({card_in(kReaderA, 1)});
    auto c = r.client();
    c.send_connect("No Such Reader 00 00");
    auto cr = c.connect_reply();
    EXPECT_EQ(cr.rv, kEUnknownReader);
    EXPECT_EQ(cr.card, 0u);
    EXPECT_TRUE(r.desk.idle()) << "no desk request";
  }
  {
    Rig r;  // before any desk
    auto c = r.client();
    c.send_connect(kReaderA);
    EXPECT_EQ(c.connect_reply().rv, kEUnknownReader);
    EXPECT_TRUE(r.fx.desk.empty());
  }
}

// pcscd (winscard.c SCardConnect) checks the reader's presence after the reader, the
// exclusive holder and the transaction: the shim knows from the desk's pushes that the
// reader is empty and answers without a round trip. DIRECT reaches an empty reader.
TEST(ShimCoreConnect, AnEmptyReaderIsNoSmartcardWithoutARoundTripExceptForDirect) {
  Rig r(kStandardDesk);  // reader B is empty
  auto c = r.client();
  for (uint32_t share : {kShareShared, kShareExclusive}) {
    c.send_connect(kReaderB, share, kT0T1);
    auto cr = c.connect_reply();
    EXPECT_EQ(cr.rv, kENoSmartcard);
    EXPECT_EQ(cr.card, 0u);
    EXPECT_TRUE(r.desk.idle()) << "no desk request for share mode " << share;
  }
  EXPECT_EQ(r.core.stats().local_answers, 2u);
  EXPECT_EQ(r.core.stats().round_trips, 0u);
  c.send_connect(kReaderB, kShareDirect, 0);
  auto [id, q] = r.desk.expect(pr::Op::kConnect);
  EXPECT_EQ(q.share_mode, kShareDirect);
  EXPECT_EQ(q.reader, kReaderB);
}

TEST(ShimCoreConnect, WrongContextIsInvalidValue) {
  Rig r(kStandardDesk);
  auto c = r.client();
  auto other = r.client();
  c.send_connect(other.context(), kReaderA, kShareShared, kT0T1);
  auto cr = c.connect_reply();
  EXPECT_EQ(cr.rv, kEInvalidValue);
  EXPECT_EQ(cr.card, 0u);
  EXPECT_TRUE(r.desk.idle());
  EXPECT_FALSE(c.closed_by_shim());
  EXPECT_EQ(r.readers()[0].sharing, 0);
}

TEST(ShimCoreDisconnect, UnpowerLeavesThePresentBitAndResetsTheOthers) {
  Rig r(kStandardDesk);
  auto [a, ha] = r.connected_client();
  auto [b, hb] = r.connected_client();
  a.send_disconnect(ha, kUnpowerCard);
  EXPECT_TRUE(a.nothing_pending());
  r.desk.answer_next(pr::Op::kDisconnect);
  EXPECT_EQ(a.take_all(), Bytes(Le().u32(ha).u32(kUnpowerCard).u32(kSuccess)));
  auto e = entry(b.readers_state(), 0);
  EXPECT_EQ(e.reader_state, kReaderPresent) << "pcscd: Disconnect(UNPOWER) leaves PRESENT only";
  EXPECT_EQ(e.atr_length, 5u) << "and keeps the ATR";
  EXPECT_EQ(e.protocol, 0u);
  EXPECT_EQ(e.sharing, 1);
  EXPECT_EQ(b.scard_status(hb), kWResetCard);
}

}  // namespace
}  // namespace cardbridge::shim::core_test
