// ShimCore: a client's byte stream. Requests cut anywhere or batched are reassembled and
// answered in order; input pcscd would refuse (a body of the wrong size, an opcode clients
// never send, an oversized length, a handle the connection does not own) closes that
// connection, and only it (pcsc-protocol.md §2.1, §5.1 MSGCheckHandleAssociation).
#include <cstdint>

#include <gtest/gtest.h>

#include "core/shim_core_test.hpp"

namespace cardbridge::shim::core_test {
namespace {

// §2.1: the header and the struct come in separate writes, but the shim must reassemble
// any split (and any batching) of the stream.
TEST(ShimCoreStream, RequestsCutAnywhereOrBatchedAreAnsweredInOrder) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  // One TRANSMIT, byte by byte.
  pcsclite::TransmitFields t;
  t.card = card;
  t.send_length = static_cast<uint32_t>(kSelectMf.size());
  const Bytes req = pcsclite::request(cmd::kTransmit, pcsclite::transmit(t), kSelectMf);
  for (uint8_t b : req) {
    EXPECT_TRUE(r.desk.idle());
    c.send_raw(Bytes{b});
  }
  auto q = r.desk.expect(pr::Op::kTransmit);
  EXPECT_EQ(q.q.data, kSelectMf);
  r.desk.reply(q.id, r.desk.answer(q));
  EXPECT_EQ(c.transmit_reply().data, (Bytes{0x90, 0x00}));
  // VERSION + ESTABLISH + GET_READERS_STATE + an unknown opcode in one write.
  auto c2 = r.raw_client();
  Bytes batch = cat(pcsclite::request(cmd::kVersion, pcsclite::version(4, 4)),
                    pcsclite::request(cmd::kEstablish, pcsclite::establish(kScopeSystem)));
  batch = cat(batch, pcsclite::header(0, cmd::kGetReadersState));
  batch = cat(batch, pcsclite::header(0, cmd::kGetReaderEvents + 0x100));  // unknown: closes, after the others
  c2.send_raw(batch);
  Bytes out = c2.take_all();
  ASSERT_EQ(out.size(), 12u + 12u + kArraySize);
  EXPECT_EQ(slice(out, 0, 12), Bytes(Le().i32(4).i32(4).u32(kSuccess)));
  EXPECT_EQ(le32(out, 12 + 8), kSuccess);
  EXPECT_EQ(slice(out, 24, kArraySize), r.array());
  EXPECT_TRUE(c2.closed_by_shim());
}

// A real client sends one request at a time; requests piling up behind one that waits for
// the desk beyond two maximal TRANSMITs are abuse: the connection is closed, nobody else's.
TEST(ShimCoreStream, UnansweredRequestsPilingUpCloseTheConnection) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  auto [other, other_card] = r.connected_client();
  c.send_transmit(card, kSelectMf);  // waits for the desk
  r.desk.expect(pr::Op::kTransmit);
  pcsclite::TransmitFields t;
  t.card = card;
  const Bytes apdu(65536, 0x00);
  t.send_length = static_cast<uint32_t>(apdu.size());
  const Bytes big = pcsclite::request(cmd::kTransmit, pcsclite::transmit(t), apdu);
  c.send_raw(big);
  EXPECT_FALSE(c.closed_by_shim()) << "one request queued is fine";
  c.send_raw(big);
  c.send_raw(big);
  EXPECT_TRUE(c.closed_by_shim());
  EXPECT_FALSE(other.closed_by_shim());
  r.desk.expect(pr::Op::kReleaseContext);  // the closed client's desk context goes
  other.send_transmit(other_card, kSelectMf);
  auto q = r.desk.expect(pr::Op::kTransmit);
  r.desk.reply(q.id, r.desk.answer(q));
  EXPECT_EQ(other.transmit_reply().rv, kSuccess);
}

// pcscd 1.9.9 allows 200 card handles per context (pcscd.h); the 201st Connect is refused.
TEST(ShimCoreConnect, MoreThan200HandlesInOneContextIsNoMemory) {
  Rig r(kStandardDesk);
  auto c = r.client();
  for (int i = 0; i < 200; ++i) r.connect(c, kReaderA, kShareShared);
  c.send_connect(kReaderA, kShareShared, kT0T1);
  auto cr = c.connect_reply();
  EXPECT_EQ(cr.rv, kENoMemory);
  EXPECT_TRUE(r.desk.idle()) << "refused before the desk";
}

TEST(ShimCoreHandles, AHandleNotOwnedByTheConnectionClosesItAndOnlyIt) {
  Rig r(kStandardDesk);
  auto [owner, card] = r.connected_client();
  const std::size_t desk_before = r.fx.desk.size();
  const auto errors = r.core.stats().protocol_errors;
  // TRANSMIT and STATUS on another connection's handle.
  auto intruder = r.client();
  intruder.send_transmit(card, kSelectMf);
  EXPECT_TRUE(intruder.closed_by_shim());
  EXPECT_TRUE(intruder.nothing_pending());
  EXPECT_EQ(r.core.stats().protocol_errors, errors + 1);
  auto peeker = r.client();
  peeker.send_status(card);
  EXPECT_TRUE(peeker.closed_by_shim());
  EXPECT_TRUE(peeker.nothing_pending());
  EXPECT_EQ(r.core.stats().protocol_errors, errors + 2);
  // A made-up handle, on STATUS.
  auto guesser = r.client();
  guesser.send_status(0x12345678);
  EXPECT_TRUE(guesser.closed_by_shim());
  EXPECT_TRUE(guesser.nothing_pending());
  EXPECT_EQ(r.fx.desk.size(), desk_before) << "nothing forwarded";
  // The owner is unaffected.
  EXPECT_FALSE(owner.closed_by_shim());
  EXPECT_EQ(owner.status(card), kSuccess);
  EXPECT_EQ(owner.scard_status(card), kSuccess);
  owner.send_transmit(card, kSelectMf);
  r.desk.serve();
  auto tr = owner.transmit_reply();
  EXPECT_EQ(tr.rv, kSuccess);
  EXPECT_EQ(tr.data, (Bytes{0x90, 0x00}));
  EXPECT_EQ(r.readers()[0].sharing, 1);
}

TEST(ShimCoreMalformed, MalformedInputClosesOnlyThatClient) {
  Rig r(kStandardDesk);
  auto good = r.client();
  // Half a request from the good client first: it must survive the others' errors.
  const Bytes good_header = pcsclite::header(0, cmd::kGetReadersState);
  good.send_raw(slice(good_header, 0, 3));

  auto header_only = r.client();  // a header announcing 11 bytes for ESTABLISH (12)
  header_only.send_header(11, cmd::kEstablish);
  EXPECT_TRUE(header_only.closed_by_shim());
  auto connect_size = r.client();  // 156 bytes for CONNECT (152)
  connect_size.send_header(152 + 4, cmd::kConnect);
  EXPECT_TRUE(connect_size.closed_by_shim());
  auto bad_size = r.client();
  bad_size.send(cmd::kEstablish, Bytes(13, 0));
  EXPECT_TRUE(bad_size.closed_by_shim());
  auto list_readers = r.client();
  list_readers.send(cmd::kListReaders, Bytes(8, 0));
  EXPECT_TRUE(list_readers.closed_by_shim());
  auto unused = r.client();
  unused.send_cmd(cmd::kGetStatusChange);
  EXPECT_TRUE(unused.closed_by_shim());
  auto unknown = r.client();
  unknown.send_cmd(0x42);
  EXPECT_TRUE(unknown.closed_by_shim());
  auto huge = r.client();  // cbSendLength 65549
  huge.send(cmd::kTransmit, Le().u32(0).u32(0).u32(0).u32(65549).u32(0).u32(0).u32(0).u32(0));
  EXPECT_TRUE(huge.closed_by_shim());
  auto attr = r.client();  // cbAttrLen 265
  attr.send(cmd::kGetAttrib, Le().u32(0).u32(0).zeros(264).u32(265).u32(0));
  EXPECT_TRUE(attr.closed_by_shim());
  EXPECT_EQ(r.core.stats().protocol_errors, 8u);
  for (auto* x : {&header_only, &connect_size, &bad_size, &list_readers, &unused, &unknown, &huge, &attr}) {
    EXPECT_TRUE(x->nothing_pending());
  }

  EXPECT_FALSE(good.closed_by_shim());
  good.send_raw(slice(good_header, 3, 5));
  auto array = good.take(kArraySize);
  EXPECT_EQ(entry(array, 0).name, kReaderA);
  EXPECT_TRUE(good.nothing_pending());
  EXPECT_EQ(good.readers_state().size(), kArraySize);
}

TEST(ShimCoreMalformed, UnknownOrUnusedOpcodesCloseTheConnection) {
  Rig r;
  uint64_t expected = 0;
  for (uint32_t command : {0x03u, 0x0Cu, 0x0Eu, 0x00u, 0x18u, 0x42u, 0xFFFFFFFFu}) {
    auto c = r.client();
    c.send_header(0, command);
    EXPECT_TRUE(c.closed_by_shim()) << "opcode 0x" << std::hex << command;
    EXPECT_TRUE(c.nothing_pending());
    EXPECT_EQ(r.core.stats().protocol_errors, ++expected);
  }
  EXPECT_EQ(r.core.client_count(), 0u);
}

TEST(ShimCoreMalformed, OversizedTransmitOrAttributeClosesTheConnection) {
  Rig r(kStandardDesk);
  auto [owner, owner_card] = r.connected_client();
  auto [c, card] = r.connected_client();
  // cbSendLength 65549: closed on the struct, before any data arrives.
  c.send(cmd::kTransmit, Le().u32(card).u32(kT1).u32(16).u32(65549).u32(3).u32(16).u32(258).u32(0));
  EXPECT_TRUE(c.closed_by_shim());
  EXPECT_TRUE(c.nothing_pending());
  r.desk.expect(pr::Op::kReleaseContext);
  EXPECT_TRUE(r.desk.idle()) << "no transmit forwarded";
  auto c2 = r.client();
  c2.send(cmd::kGetAttrib, Le().u32(0).u32(kAttrAtrString).zeros(264).u32(265).u32(0));
  EXPECT_TRUE(c2.closed_by_shim());
  EXPECT_EQ(r.core.stats().protocol_errors, 2u);
  EXPECT_EQ(owner.status(owner_card), kSuccess);
}

// CMD_GET_READER_EVENTS is a protocol 4.5 command: pcscd 1.9.9 does not know it.
TEST(ShimCoreMalformed, GetReaderEventsFromA44ClientClosesTheConnection) {
  Rig r(kStandardDesk);
  auto old = r.client(4);
  auto other = r.client(5);
  const auto errors = r.core.stats().protocol_errors;
  old.send_cmd(cmd::kGetReaderEvents);
  EXPECT_TRUE(old.closed_by_shim());
  EXPECT_TRUE(old.nothing_pending());
  EXPECT_EQ(r.core.stats().protocol_errors, errors + 1);
  EXPECT_FALSE(other.closed_by_shim());
  EXPECT_EQ(other.reader_events().rv, kSuccess);
}

}  // namespace
}  // namespace cardbridge::shim::core_test
