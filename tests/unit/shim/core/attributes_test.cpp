// ShimCore: SCARD_GET_ATTRIB / SCARD_SET_ATTRIB (280-byte structs both ways,
// pcsc-protocol.md §2.3), and the cache of static reader attributes
// (Optimizations::cache_attributes).
#include <cstdint>
#include <optional>

#include <gtest/gtest.h>

#include "core/shim_core_test.hpp"

namespace cardbridge::shim::core_test {
namespace {

TEST(ShimCoreAttrib, GetAttribReturns280BytesWithTheDataAndItsLength) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  c.send_get_attrib(card, kAttrAtrString);
  auto req = r.desk.expect(pr::Op::kGetAttrib);
  EXPECT_EQ(req.q.code, kAttrAtrString);
  EXPECT_EQ(req.q.recv_length, 264u);
  r.desk.reply(req.id, r.desk.answer(req));
  EXPECT_EQ(c.take_all(), Bytes(Le().u32(card).u32(kAttrAtrString).padded(kAtr, 264).u32(5).u32(kSuccess)));
  // An error keeps the 280-byte size.
  r.desk.handler = [](const FakeDesk::Req&) -> std::optional<pr::Reply> { return rv_reply(kEUnsupportedFeature); };
  c.send_get_attrib(card, kAttrVendorIfdVersion);
  r.desk.serve();
  auto g = c.get_attrib_reply();
  EXPECT_EQ(g.rv, kEUnsupportedFeature);
  EXPECT_EQ(g.attr_id, kAttrVendorIfdVersion);
  EXPECT_EQ(g.card, card);
}

TEST(ShimCoreAttrib, SetAttribForwardsTheValueAndEchoesTheStruct) {
  Rig r(kStandardDesk);
  auto [c, card] = r.connected_client();
  c.send_set_attrib(card, kAttrAtrString, Bytes{0x00});  // testpcsc step 11: "", 1
  auto req = r.desk.expect(pr::Op::kSetAttrib);
  EXPECT_EQ(req.q.handle.value, 1u);
  EXPECT_EQ(req.q.code, kAttrAtrString);
  EXPECT_EQ(req.q.data, (Bytes{0x00}));
  r.desk.reply(req.id, rv_reply(kEUnsupportedFeature));
  auto s = c.set_attrib_reply();
  EXPECT_EQ(s.card, card);
  EXPECT_EQ(s.attr_id, kAttrAtrString);
  EXPECT_EQ(s.length, 1u);
  EXPECT_EQ(s.rv, kEUnsupportedFeature);
  c.send_set_attrib(card, kAttrVendorName, Bytes{1, 2, 3});
  r.desk.serve();
  EXPECT_EQ(c.set_attrib_reply().rv, kSuccess);
}

TEST(ShimCoreAttrib, TheCacheServesStaticAttributesAndDropsTheAtrOnACardEvent) {
  Rig r(kStandardDesk, optimized_config());
  auto a = r.client();
  const uint32_t h = r.connect(a);  // a named variable: the lambda below captures it
  auto get = [&](uint32_t attr) {
    a.send_get_attrib(h, attr);
    return a.get_attrib_reply();
  };
  const Bytes vendor = {'A', 'C', 'M', 'E'};
  a.send_get_attrib(h, kAttrVendorName);
  auto q = r.desk.expect(pr::Op::kGetAttrib);
  EXPECT_EQ(q.q.code, kAttrVendorName);
  r.desk.reply(q.id, ok_reply(vendor));
  const Bytes want = Le().u32(h).u32(kAttrVendorName).padded(vendor, 264).u32(4).u32(kSuccess);
  EXPECT_EQ(a.take_all(), want);
  const std::size_t before = r.fx.desk.size();
  a.send_get_attrib(h, kAttrVendorName);
  EXPECT_EQ(a.take_all(), want) << "served from the cache, byte for byte";
  EXPECT_EQ(r.fx.desk.size(), before);
  EXPECT_EQ(r.core.stats().attribute_cache_hits, 1u);

  a.send_get_attrib(h, kAttrAtrString);
  r.desk.answer_next(pr::Op::kGetAttrib, ok_reply(kAtr));
  EXPECT_EQ(a.get_attrib_reply().length, 5u);
  EXPECT_EQ(get(kAttrAtrString).length, 5u);
  EXPECT_EQ(r.fx.desk.size(), before + 1);

  // Card swapped; the handle reconnects.
  r.desk.push({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  r.desk.push({card_in(kReaderA, 3, kAtr2), empty_reader(kReaderB)});
  r.reconnect_at_desk(a, h, kLeaveCard, 3);
  const std::size_t after = r.fx.desk.size();
  EXPECT_EQ(get(kAttrVendorName).length, 4u) << "the vendor is still cached";
  EXPECT_EQ(r.fx.desk.size(), after);
  a.send_get_attrib(h, kAttrAtrString);
  EXPECT_EQ(r.desk.expect(pr::Op::kGetAttrib).q.code, kAttrAtrString) << "the ATR was dropped on the card event";
}

}  // namespace
}  // namespace cardbridge::shim::core_test
