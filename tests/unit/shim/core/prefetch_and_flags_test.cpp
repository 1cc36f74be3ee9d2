// ShimCore's speculation (docs/performance.md): a GET RESPONSE the desk fetched right after
// a 61xx is served only to exactly the predicted command (ISO 7816-4 5.1.3 for another Le),
// and the request flags that ask the desk for it (prefetch, read-ahead, deferred Begin)
// are set only when the shim is configured for them and the desk announced them.
#include <cstdint>

#include <gtest/gtest.h>

#include "core/optimized_fixture.hpp"
#include "core/shim_core_test.hpp"

namespace cardbridge::shim::core_test {
namespace {

namespace rf = cardbridge::protocol::request_flags;
namespace caps = cardbridge::protocol::caps;

// ---- prefetched GET RESPONSE ------------------------------------------------------------

class ShimCorePrefetch : public ShimCoreOptimized {
 protected:
  // SELECT answered 61 10, with the GET RESPONSE (Le 10) prefetched by the desk.
  uint32_t setup(PcscClient& a) {
    const uint32_t h = rig.connect(a);
    pr::Reply r = ok_reply({0x61, 0x10}, kT0);
    r.prefetched.push_back(pr::Prefetched{kGetResponse10, cat(body_, kSw9000)});
    pr::Request q;
    EXPECT_EQ(transmit(a, h, kSelectAid, &q, r), (Bytes{0x61, 0x10}));
    EXPECT_TRUE(q.flags & rf::kPrefetchGetResponse);
    desk_before_ = rig.fx.desk.size();
    return h;
  }
  const Bytes kSelectAid = {0x00, 0xA4, 0x04, 0x00, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x03, 0x10, 0x10};
  const Bytes kGetResponse10 = {0x00, 0xC0, 0x00, 0x00, 0x10};
  Bytes body_ = {0x6F, 0x0E, 0x84, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x03, 0x10, 0x10, 0xA5, 0x03, 0x88, 0x01, 0x02};
  std::size_t desk_before_ = 0;
};

TEST_F(ShimCorePrefetch, ExactCommandServedWithoutTheDesk) {
  auto a = rig.client();
  const uint32_t h = setup(a);
  auto sent = a.send_transmit(h, kGetResponse10);
  sent.recv_pci_protocol = kT0;
  sent.recv_length = 18;
  EXPECT_EQ(a.take_all(), cat(cat(pcsclite::transmit(sent), body_), kSw9000));
  EXPECT_EQ(rig.fx.desk.size(), desk_before_);
  EXPECT_EQ(rig.core.stats().prefetch_hits, 1u);
  // Served once only.
  a.send_transmit(h, kGetResponse10);
  rig.desk.expect(pr::Op::kTransmit);
}

TEST_F(ShimCorePrefetch, OtherCommandDiscardsThePrediction) {
  auto a = rig.client();
  const uint32_t h = setup(a);
  const Bytes read_binary = {0x00, 0xB0, 0x00, 0x00, 0x10};
  pr::Request q;
  transmit(a, h, read_binary, &q);
  EXPECT_EQ(q.data, read_binary);
  EXPECT_EQ(rig.core.stats().prefetch_discarded, 1u);
  EXPECT_EQ(rig.core.stats().prefetch_hits, 0u);
  a.send_transmit(h, kGetResponse10);
  EXPECT_EQ(rig.desk.expect(pr::Op::kTransmit).q.data, kGetResponse10) << "no longer predicted";
}

TEST_F(ShimCorePrefetch, GetResponseWithSmallerLeIsServedPerIso) {
  auto a = rig.client();
  const uint32_t h = setup(a);
  a.send_transmit(h, Bytes{0x00, 0xC0, 0x00, 0x00, 0x08});
  auto first = a.transmit_reply();
  EXPECT_EQ(first.rv, kSuccess);
  EXPECT_EQ(first.data, cat(slice(body_, 0, 8), Bytes{0x61, 0x08}));
  a.send_transmit(h, Bytes{0x00, 0xC0, 0x00, 0x00, 0x08});
  auto second = a.transmit_reply();
  EXPECT_EQ(second.data, cat(slice(body_, 8, 8), kSw9000));
  EXPECT_EQ(rig.fx.desk.size(), desk_before_);
  EXPECT_EQ(rig.core.stats().prefetch_hits, 2u);
  EXPECT_TRUE(a.nothing_pending());
}

TEST_F(ShimCorePrefetch, GetResponseWithLe00GetsEverything) {
  auto a = rig.client();
  const uint32_t h = setup(a);
  a.send_transmit(h, Bytes{0x00, 0xC0, 0x00, 0x00, 0x00});
  EXPECT_EQ(a.transmit_reply().data, cat(body_, kSw9000));
  EXPECT_EQ(rig.fx.desk.size(), desk_before_);
}

// ---- request flags ----------------------------------------------------------------------

TEST_F(ShimCoreOptimized, ReadAheadOnlyInsideATransactionOrExclusive) {
  auto a = rig.client();
  auto x = rig.client();
  const uint32_t ha = rig.connect(a);
  pr::Request q;
  transmit(a, ha, kSelectMf, &q);
  EXPECT_EQ(q.flags, rf::kPrefetchGetResponse) << "shared, no transaction: no read-ahead";
  deferred_begin(a, ha);
  transmit(a, ha, kSelectMf, &q);
  EXPECT_EQ(q.flags, rf::kBeginFirst | rf::kPrefetchGetResponse | rf::kReadAhead);
  transmit(a, ha, kSelectMf, &q);
  EXPECT_EQ(q.flags, rf::kPrefetchGetResponse | rf::kReadAhead);
  a.send_end(ha, kLeaveCard);
  a.take_all();
  rig.desk.answer_next(pr::Op::kEndTransaction);
  transmit(a, ha, kSelectMf, &q);
  EXPECT_EQ(q.flags, rf::kPrefetchGetResponse);

  rig.desk.push({card_in(kReaderA, 1), empty_reader(kReaderB), card_in(kReaderC, 1, kAtr2)});
  const uint32_t hx = rig.connect(x, kReaderC, kShareExclusive);
  transmit(x, hx, kSelectMf, &q);
  EXPECT_EQ(q.flags, rf::kPrefetchGetResponse | rf::kReadAhead) << "exclusive access";
}

TEST(ShimCoreFlags, NothingWhenTheDeskDoesNotAnnounceTheCapabilities) {
  Rig r(kStandardDesk, optimized_config(), caps::kReaderPush);
  auto [a, ha] = r.connected_client();
  a.send_begin(ha);
  r.desk.answer_next(pr::Op::kBeginTransaction);  // not deferred
  EXPECT_EQ(a.begin_reply().rv, kSuccess);
  a.send_transmit(ha, kSelectMf);
  EXPECT_EQ(r.desk.answer_next(pr::Op::kTransmit, ok_reply(kSw9000)).q.flags, 0u);
  a.transmit_reply();
  EXPECT_EQ(r.core.stats().deferred_begins, 0u);
}

TEST(ShimCoreFlags, OnlyTheAnnouncedCapabilityIsUsed) {
  Rig r(kStandardDesk, optimized_config(), caps::kReaderPush | caps::kPrefetchGetResponse);
  auto [a, ha] = r.connected_client();
  r.begin_at_desk(a, ha);
  a.send_transmit(ha, kSelectMf);
  EXPECT_EQ(r.desk.answer_next(pr::Op::kTransmit, ok_reply(kSw9000)).q.flags, rf::kPrefetchGetResponse)
      << "no read-ahead without the capability, even in a transaction";
}

TEST(ShimCoreFlags, NothingWhenTheShimHasNoOptimizations) {
  Rig r(kStandardDesk);  // Optimizations{}: none; the desk announces everything
  auto [a, ha] = r.connected_client();
  r.begin_at_desk(a, ha);
  a.send_transmit(ha, kSelectMf);
  EXPECT_EQ(r.desk.answer_next(pr::Op::kTransmit, ok_reply(kSw9000)).q.flags, 0u);
  a.transmit_reply();
  // END goes to the desk and is answered only after it (no pipelining).
  a.send_end(ha, kLeaveCard);
  EXPECT_TRUE(a.nothing_pending());
  r.desk.answer_next(pr::Op::kEndTransaction);
  EXPECT_EQ(a.end_reply().rv, kSuccess);
  // No attribute cache.
  for (int i = 0; i < 2; ++i) {
    a.send_get_attrib(ha, kAttrVendorName);
    r.desk.answer_next(pr::Op::kGetAttrib, ok_reply({'X'}));
    EXPECT_EQ(a.get_attrib_reply().rv, kSuccess);
  }
  EXPECT_EQ(r.core.stats().attribute_cache_hits, 0u);
}

}  // namespace
}  // namespace cardbridge::shim::core_test
