// ShimCore: SCARD_TRANSMIT and SCARD_CONTROL: forwarded with the desk's handle, answered
// with the struct and then the data only on success, the caller's buffer size checked
// (INSUFFICIENT_BUFFER with the size needed), lengths clamped to pcscd's maximum, and each
// answer to the client that asked (pcsc-protocol.md §2.3, §5.6).
#include <algorithm>
#include <cstdint>
#include <optional>
#include <set>
#include <vector>

#include <gtest/gtest.h>

#include "core/shim_core_test.hpp"

namespace cardbridge::shim::core_test {
namespace {

TEST(ShimCoreTransmit, ForwardedAndAnsweredWithTheStructThenTheDataByteForByte) {
  Rig r(kStandardDesk);
  auto c = r.client();
  pr::Request connect;
  const uint32_t card = r.connect(c, kReaderA, kShareShared, {}, &connect);
  c.send_transmit(card, kSelectMf, 300);
  EXPECT_TRUE(c.nothing_pending());
  auto req = r.desk.expect(pr::Op::kTransmit);
  EXPECT_EQ(req.q.handle.value, 1u) << "the desk's handle, not the hCard";
  EXPECT_EQ(req.q.protocols, kT1) << "send PCI protocol";
  EXPECT_EQ(req.q.data, kSelectMf);
  EXPECT_EQ(req.q.recv_length, 300u);
  EXPECT_EQ(req.q.context, connect.context) << "same desk context as the CONNECT";
  pr::Reply rep;
  rep.data = {0x6F, 0x10, 0x90, 0x00};
  rep.length = 4;
  rep.protocol = kT1;
  r.desk.reply(req.id, rep);
  EXPECT_EQ(c.take_all(), Bytes(Le()
                                    .u32(card)
                                    .u32(kT1)
                                    .u32(16)
                                    .u32(static_cast<uint32_t>(kSelectMf.size()))
                                    .u32(kT1)
                                    .u32(16)
                                    .u32(4)
                                    .u32(kSuccess)
                                    .bytes(rep.data)));

  // A caller buffer above 65548, and the receive PCI the desk's driver reported.
  const uint32_t h = r.connect(c, kReaderA, kShareShared, {.handle = 0x0000BEEF});
  auto sent = c.send_transmit(h, kSelectMf, 100000);
  EXPECT_TRUE(c.nothing_pending());
  auto q = r.desk.expect(pr::Op::kTransmit);
  EXPECT_EQ(q.q.handle.value, 0x0000BEEFu);
  EXPECT_EQ(q.q.data, kSelectMf);
  EXPECT_EQ(q.q.protocols, kT1);
  EXPECT_EQ(q.q.recv_protocol, kT0T1);
  EXPECT_EQ(q.q.recv_length, 65548u) << "clamped to MAX_BUFFER_SIZE_EXTENDED";
  EXPECT_EQ(q.q.flags, 0u);
  r.desk.reply(q.id, ok_reply(kSw9000, kT0));
  sent.recv_pci_protocol = kT0;  // what the driver left in the receive PCI
  sent.recv_length = 2;
  EXPECT_EQ(c.take_all(), cat(pcsclite::transmit(sent), kSw9000));
}

TEST(ShimCoreTransmit, ReceiveLengthIsClampedTo65548) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  for (uint32_t asked : {65548u, 65549u, 100000u, 0xFFFFFFFFu}) {
    c.send_transmit(card, kSelectMf, asked);
    auto req = r.desk.expect(pr::Op::kTransmit);
    EXPECT_EQ(req.q.recv_length, 65548u) << asked;
    r.desk.reply(req.id, r.desk.answer(req));
    auto tr = c.transmit_reply();
    EXPECT_EQ(tr.rv, kSuccess);
    EXPECT_EQ(tr.data, kSw9000);
  }
  // An extended APDU of the maximum size goes through whole.
  Bytes big(65548, 0xAB);
  c.send_transmit(card, big, 65548);
  EXPECT_EQ(r.desk.expect(pr::Op::kTransmit).q.data, big);
}

TEST(ShimCoreTransmit, ADeskErrorIsPassedOnWithNoData) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  r.desk.handler = [](const FakeDesk::Req& q) -> std::optional<pr::Reply> {
    if (q.q.op != pr::Op::kTransmit) return std::nullopt;
    return rv_reply(kWRemovedCard);
  };
  c.send_transmit(card, kSelectMf);
  r.desk.serve();
  auto tr = c.transmit_reply();  // checks: exactly 32 bytes
  EXPECT_EQ(tr.rv, kWRemovedCard);
  EXPECT_EQ(tr.card, card);
  EXPECT_EQ(tr.recv_length, 0u);
  EXPECT_TRUE(tr.data.empty());
  // A careless desk sends data with its error: it must not reach the client.
  r.desk.handler = nullptr;
  c.send_transmit(card, kSelectMf);
  pr::Reply bad = rv_reply(kENotTransacted);
  bad.data = {0x01, 0x02, 0x03};
  r.desk.answer_next(pr::Op::kTransmit, bad);
  auto nt = c.transmit_reply();
  EXPECT_EQ(nt.rv, kENotTransacted);
  EXPECT_EQ(nt.recv_length, 0u);
  EXPECT_TRUE(c.nothing_pending()) << "no data after an error";
  // And the next one succeeds.
  c.send_transmit(card, kSelectMf);
  r.desk.serve();
  auto ok = c.transmit_reply();
  EXPECT_EQ(ok.rv, kSuccess);
  EXPECT_EQ(ok.data, kSw9000);
}

TEST(ShimCoreTransmit, ResponseLargerThanTheBufferIsInsufficientBufferWithTheNeededLengthAndKeepsTheStreamInStep) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  r.desk.transmit_response = {1, 2, 3, 4, 5, 6, 7, 8, 0x90, 0x00};
  c.send_transmit(card, kSelectMf, 4);
  r.desk.serve();
  auto tr = c.transmit_reply();  // checks: 32 bytes and no data
  EXPECT_EQ(tr.rv, kEInsufficientBuffer);
  EXPECT_EQ(tr.recv_length, 10u) << "the length needed";
  EXPECT_EQ(tr.card, card);
  EXPECT_TRUE(tr.data.empty());
  // The stream is in step: the next requests get exactly their own answers.
  EXPECT_EQ(c.status(card), kSuccess);
  c.send_transmit(card, kSelectMf, 10);
  r.desk.serve();
  auto ok = c.transmit_reply();
  EXPECT_EQ(ok.rv, kSuccess);
  EXPECT_EQ(ok.data, r.desk.transmit_response);
  // A 6-byte answer for a 2-byte buffer, then a 258-byte buffer.
  c.send_transmit(card, kSelectMf, 2);
  r.desk.answer_next(pr::Op::kTransmit, ok_reply({0x6F, 0x00, 0x84, 0x01, 0x90, 0x00}));
  auto small = c.transmit_reply();
  EXPECT_EQ(small.rv, kEInsufficientBuffer);
  EXPECT_EQ(small.recv_length, 6u);
  EXPECT_EQ(small.card, card);
  c.send_transmit(card, kSelectMf, 258);
  r.desk.answer_next(pr::Op::kTransmit, ok_reply(kSw9000));
  EXPECT_EQ(c.transmit_reply().data, kSw9000);
  // A desk that reports INSUFFICIENT_BUFFER itself: its needed length is passed on.
  r.desk.handler = [](const FakeDesk::Req& q) -> std::optional<pr::Reply> {
    if (q.q.op != pr::Op::kTransmit) return std::nullopt;
    pr::Reply rep = rv_reply(kEInsufficientBuffer);
    rep.length = 600;
    return rep;
  };
  c.send_transmit(card, kSelectMf, 258);
  r.desk.serve();
  auto desk_small = c.transmit_reply();
  EXPECT_EQ(desk_small.rv, kEInsufficientBuffer);
  EXPECT_EQ(desk_small.recv_length, 600u);
}

TEST(ShimCoreTransmit, InterleavedTransmitsAreAnsweredToTheRightClient) {
  Rig r;
  r.desk_up({card_in(kReaderA, 1), card_in(kReaderB, 1)});
  constexpr std::size_t kClients = 8;
  std::vector<PcscClient> clients;
  std::vector<uint32_t> cards;
  for (std::size_t i = 0; i < kClients; ++i) {
    clients.push_back(r.client(4 + static_cast<int32_t>(i % 3)));
    cards.push_back(r.connect(clients.back(), i % 2 ? kReaderB : kReaderA, kShareShared,
                              {.handle = 0xA0 + static_cast<uint32_t>(i)}));
  }
  for (uint8_t round = 0; round < 3; ++round) {
    for (std::size_t i = 0; i < kClients; ++i) {
      clients[i].send_transmit(cards[i], Bytes{0x80, 0x10, static_cast<uint8_t>(i), round, 0x00});
    }
    std::vector<FakeDesk::Req> reqs;
    std::set<uint32_t> ids;
    std::set<uint32_t> contexts;
    while (auto q = r.desk.next_request()) {
      EXPECT_EQ(q->q.op, pr::Op::kTransmit);
      EXPECT_TRUE(ids.insert(q->id).second) << "correlation ids are unique";
      contexts.insert(q->q.context.value);
      reqs.push_back(*q);
    }
    ASSERT_EQ(reqs.size(), kClients);
    EXPECT_EQ(contexts.size(), kClients) << "a desk context per client";
    for (std::size_t k = 0; k < kClients; ++k) {
      EXPECT_EQ(reqs[k].q.handle.value, 0xA0u + reqs[k].q.data[2]) << "the client's own desk handle";
    }
    // Answer in a scrambled order; the data names the request it answers.
    std::vector<std::size_t> order = {5, 2, 7, 0, 3, 6, 1, 4};
    std::rotate(order.begin(), order.begin() + round, order.end());
    std::vector<bool> answered(kClients, false);
    for (std::size_t k : order) {
      pr::Reply rep;
      rep.data = {reqs[k].q.data[2], reqs[k].q.data[3], 0x90, 0x00};
      rep.protocol = kT1;
      r.desk.reply(reqs[k].id, rep);
      answered[reqs[k].q.data[2]] = true;
      for (std::size_t i = 0; i < kClients; ++i) {
        if (!answered[i]) {
          EXPECT_TRUE(clients[i].nothing_pending()) << "client " << i << " answered early";
        }
      }
    }
    for (std::size_t i = 0; i < kClients; ++i) {
      auto tr = clients[i].transmit_reply();
      EXPECT_EQ(tr.card, cards[i]);
      EXPECT_EQ(tr.data, (Bytes{static_cast<uint8_t>(i), round, 0x90, 0x00})) << "client " << i << " round " << +round;
    }
  }
}

TEST(ShimCoreControl, ForwardedWithTrailingDataAndAnsweredWithBytesReturned) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  const uint32_t code = ctl_code(1);
  c.send_control(card, code, Bytes{0x02}, 100);  // testpcsc step 9
  auto req = r.desk.expect(pr::Op::kControl);
  EXPECT_EQ(req.q.handle.value, 1u);
  EXPECT_EQ(req.q.code, code);
  EXPECT_EQ(req.q.data, (Bytes{0x02}));
  EXPECT_EQ(req.q.recv_length, 100u);
  r.desk.reply(req.id, r.desk.answer(req));
  EXPECT_EQ(c.take_all(),
            Bytes(Le().u32(card).u32(code).u32(1).u32(100).u32(3).u32(kSuccess).bytes(r.desk.control_response)));
  // Two data bytes, a 6-byte TLV back.
  const Bytes tlv = {0x12, 0x04, 0x42, 0x33, 0x00, 0x12};
  c.send_control(card, 0x42000D48, Bytes{0x01, 0x02}, 100);
  auto q2 = r.desk.expect(pr::Op::kControl);
  EXPECT_EQ(q2.q.data, (Bytes{0x01, 0x02}));
  r.desk.reply(q2.id, ok_reply(tlv));
  EXPECT_EQ(c.take_all(), cat(Le().u32(card).u32(0x42000D48).u32(2).u32(100).u32(6).u32(kSuccess), tlv));
  // More than the caller's 4 bytes: INSUFFICIENT_BUFFER, the size needed, no data.
  c.send_control(card, 0x42000D48, {}, 4);
  r.desk.answer_next(pr::Op::kControl, ok_reply(tlv));
  EXPECT_EQ(c.take_all(), Bytes(Le().u32(card).u32(0x42000D48).u32(0).u32(4).u32(6).u32(kEInsufficientBuffer)));
  // No data to send (CM_IOCTL_GET_FEATURE_REQUEST) and an error: 24 bytes only [traced].
  r.desk.handler = [](const FakeDesk::Req& q) -> std::optional<pr::Reply> {
    pr::Reply rep;
    rep.rv = q.q.code == 0x42000D48 ? kEUnsupportedFeature : kSuccess;
    rep.data = q.q.code == 0x42000D48 ? Bytes{} : Bytes(40, 0x11);
    rep.length = static_cast<uint32_t>(rep.data.size());
    return rep;
  };
  c.send_control(card, 0x42000D48, {}, 100);
  auto q3 = r.desk.expect(pr::Op::kControl);
  EXPECT_TRUE(q3.q.data.empty());
  r.desk.reply(q3.id, *r.desk.handler(q3));
  auto cr = c.control_reply();
  EXPECT_EQ(cr.rv, kEUnsupportedFeature);
  EXPECT_TRUE(cr.data.empty());
  c.send_control(card, 0x42000001, {}, 100);
  r.desk.answer_next(pr::Op::kControl, rv_reply(kEUnsupportedFeature));
  EXPECT_EQ(c.control_reply().rv, kEUnsupportedFeature);
  // 40 bytes for a 16-byte buffer: INSUFFICIENT_BUFFER, the needed size, no data.
  c.send_control(card, ctl_code(5), {}, 16);
  r.desk.serve();
  auto big = c.control_reply();
  EXPECT_EQ(big.rv, kEInsufficientBuffer);
  EXPECT_EQ(big.bytes_returned, 40u);
  EXPECT_TRUE(big.data.empty());
  EXPECT_EQ(c.status(card), kSuccess) << "in step";
}

}  // namespace
}  // namespace cardbridge::shim::core_test
