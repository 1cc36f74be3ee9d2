// Version and capability negotiation (protocol/version.hpp).
#include "cardbridge/protocol/version.hpp"

#include <gtest/gtest.h>

namespace cardbridge::protocol {
namespace {

Hello hello(uint32_t major, uint32_t minor, uint64_t capabilities) {
  Hello h;
  h.version_major = major;
  h.version_minor = minor;
  h.capabilities = capabilities;
  h.role = Role::kDesk;
  return h;
}

TEST(VersionTest, CurrentVersionIsOneOne) {
  EXPECT_EQ(kVersionMajor, 1u);
  EXPECT_EQ(kVersionMinor, 1u);
}

TEST(VersionTest, AOneZeroPeerGetsNeitherDeskServiceNorCardImage) {
  // A 1.0 peer announces at most bits 0-4: the link runs at 1.0 without the minor-1 capabilities.
  const uint64_t one_zero = caps::kReaderPush | caps::kDeferredBegin | caps::kPrefetchGetResponse |
                            caps::kReadAhead | caps::kDeskOrdering;
  auto n = negotiate(local_hello(Role::kServer, caps::kAll), hello(1, 0, one_zero));
  ASSERT_TRUE(n.has_value());
  EXPECT_EQ(n->minor, 0u);
  EXPECT_EQ(n->capabilities, one_zero);
  EXPECT_EQ(n->capabilities & (caps::kDeskService | caps::kCardImage), 0u);
}

TEST(VersionTest, DeskServiceAndCardImageAreNegotiatedApart) {
  // Either end may turn the card image off (--no-card-image, --disable card-image) and keep
  // the desk's service status, and the other way round.
  auto a = negotiate(local_hello(Role::kDesk, caps::kAll), local_hello(Role::kServer, caps::kAll & ~caps::kCardImage));
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->minor, kVersionMinor);
  EXPECT_TRUE(a->capabilities & caps::kDeskService);
  EXPECT_FALSE(a->capabilities & caps::kCardImage);
  auto b = negotiate(local_hello(Role::kDesk, caps::kAll & ~caps::kDeskService), local_hello(Role::kServer, caps::kAll));
  ASSERT_TRUE(b.has_value());
  EXPECT_FALSE(b->capabilities & caps::kDeskService);
  EXPECT_TRUE(b->capabilities & caps::kCardImage);
}

TEST(VersionTest, SameVersionAllCapabilities) {
  auto n = negotiate(hello(1, 0, caps::kAll), hello(1, 0, caps::kAll));
  ASSERT_TRUE(n.has_value());
  EXPECT_EQ(n->minor, 0u);
  EXPECT_EQ(n->capabilities, caps::kAll);
}

TEST(VersionTest, MajorMismatchFailsBothWays) {
  EXPECT_FALSE(negotiate(hello(1, 0, caps::kAll), hello(2, 0, caps::kAll)).has_value());
  EXPECT_FALSE(negotiate(hello(2, 0, caps::kAll), hello(1, 0, caps::kAll)).has_value());
  EXPECT_FALSE(negotiate(hello(1, 5, 0), hello(0, 5, 0)).has_value());
  EXPECT_FALSE(negotiate(hello(1, 0, 0), hello(0xFFFFFFFF, 0, 0)).has_value());
}

TEST(VersionTest, MinorIsTheMinimum) {
  auto a = negotiate(hello(1, 3, 0), hello(1, 7, 0));
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->minor, 3u);
  auto b = negotiate(hello(1, 7, 0), hello(1, 3, 0));
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(b->minor, 3u);
  auto c = negotiate(hello(1, 0, 0), hello(1, 0xFFFFFFFF, 0));
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->minor, 0u);
}

TEST(VersionTest, CapabilitiesAreTheIntersection) {
  auto n = negotiate(hello(1, 0, caps::kReaderPush | caps::kDeferredBegin | caps::kReadAhead),
                     hello(1, 0, caps::kDeferredBegin | caps::kPrefetchGetResponse | caps::kReadAhead));
  ASSERT_TRUE(n.has_value());
  EXPECT_EQ(n->capabilities, caps::kDeferredBegin | caps::kReadAhead);
}

TEST(VersionTest, UnknownCapabilityBitsIntersectToo) {
  // A future capability only counts when both ends announce it.
  const uint64_t future = 1ull << 40;
  auto n = negotiate(hello(1, 0, future | caps::kReaderPush), hello(1, 0, caps::kReaderPush));
  ASSERT_TRUE(n.has_value());
  EXPECT_EQ(n->capabilities, caps::kReaderPush);
  auto m = negotiate(hello(1, 0, future), hello(1, 0, future));
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->capabilities, future);
}

TEST(VersionTest, NoCommonCapabilityIsStillAgreement) {
  auto n = negotiate(hello(1, 0, caps::kReaderPush), hello(1, 0, caps::kReadAhead));
  ASSERT_TRUE(n.has_value());
  EXPECT_EQ(n->capabilities, 0u);
}

TEST(VersionTest, CapabilityBitsAreDistinct) {
  EXPECT_EQ(caps::kReaderPush & caps::kDeferredBegin, 0u);
  EXPECT_EQ(caps::kDeskService & caps::kCardImage, 0u);
  EXPECT_EQ(caps::kAll, 0x7Fu);
}

TEST(CapabilitiesTextTest, Names) {
  EXPECT_EQ(capabilities_text(0), "none");
  EXPECT_EQ(capabilities_text(caps::kReaderPush), "reader-push");
  EXPECT_EQ(capabilities_text(caps::kDeferredBegin), "deferred-begin");
  EXPECT_EQ(capabilities_text(caps::kPrefetchGetResponse), "prefetch-get-response");
  EXPECT_EQ(capabilities_text(caps::kReadAhead), "read-ahead");
  EXPECT_EQ(capabilities_text(caps::kAll),
            "reader-push,deferred-begin,prefetch-get-response,read-ahead,desk-ordering,desk-service,card-image");
  EXPECT_EQ(capabilities_text(caps::kReaderPush | caps::kReadAhead), "reader-push,read-ahead");
}

TEST(CapabilitiesTextTest, UnknownBitsAreNotNamed) {
  EXPECT_EQ(capabilities_text(caps::kDeferredBegin | (1ull << 63)), "deferred-begin");
}

}  // namespace
}  // namespace cardbridge::protocol
