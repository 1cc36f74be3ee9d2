// Support code: hex, PC/SC names, Result.
#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <gtest/gtest.h>

#include "cardbridge/support/hex.hpp"
#include "cardbridge/support/peer.hpp"
#include "cardbridge/support/result.hpp"
#include "cardbridge/support/scard.hpp"

namespace cardbridge {
namespace {

using Bytes = std::vector<uint8_t>;

TEST(HexTest, ToHexSpacedUpperCase) {
  EXPECT_EQ(to_hex(Bytes{}), "");
  EXPECT_EQ(to_hex(Bytes{0x00}), "00");
  EXPECT_EQ(to_hex(Bytes{0x3B, 0x8F, 0x80, 0x01}), "3B 8F 80 01");
  EXPECT_EQ(to_hex(Bytes{0xab, 0xcd, 0xef}), "AB CD EF");
}

TEST(HexTest, ToHexUnspaced) {
  EXPECT_EQ(to_hex(Bytes{0x3B, 0x8F, 0x80, 0x01}, false), "3B8F8001");
  EXPECT_EQ(to_hex(Bytes{}, false), "");
}

TEST(HexTest, ToHexEveryByte) {
  Bytes all(256);
  for (int i = 0; i < 256; ++i) all[static_cast<std::size_t>(i)] = static_cast<uint8_t>(i);
  std::string h = to_hex(all);
  EXPECT_EQ(h.size(), 256u * 3 - 1);
  EXPECT_EQ(h.substr(0, 8), "00 01 02");
  EXPECT_EQ(h.substr(h.size() - 5), "FE FF");
  auto back = from_hex(h);
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(*back, all);
  auto back2 = from_hex(to_hex(all, false));
  ASSERT_TRUE(back2.has_value());
  EXPECT_EQ(*back2, all);
}

TEST(HexTest, FromHexAcceptsCaseAndSeparators) {
  EXPECT_EQ(from_hex("3b8f"), (Bytes{0x3B, 0x8F}));
  EXPECT_EQ(from_hex("3B 8F"), (Bytes{0x3B, 0x8F}));
  EXPECT_EQ(from_hex("3b:8F:00"), (Bytes{0x3B, 0x8F, 0x00}));
  EXPECT_EQ(from_hex("  aB\tCd\n"), (Bytes{0xAB, 0xCD}));
  EXPECT_EQ(from_hex(""), Bytes{});
  EXPECT_EQ(from_hex("   "), Bytes{});
}

TEST(HexTest, FromHexRejectsBadInput) {
  EXPECT_FALSE(from_hex("3").has_value());         // odd
  EXPECT_FALSE(from_hex("3B8").has_value());       // odd
  EXPECT_FALSE(from_hex("3G").has_value());        // bad digit
  EXPECT_FALSE(from_hex("0x3B").has_value());      // prefix
  EXPECT_FALSE(from_hex("3 B").has_value());       // separator inside a byte
  EXPECT_FALSE(from_hex("3B-8F").has_value());     // unknown separator
  EXPECT_FALSE(from_hex(std::string("3B\0", 3)).has_value());
  EXPECT_FALSE(from_hex("\xC3\xA9").has_value());  // non-ASCII
}

TEST(ScardTest, RvTextHasNameAndNumber) {
  EXPECT_EQ(scard::rv_text(0), "SCARD_S_SUCCESS (0x00000000)");
  EXPECT_EQ(scard::rv_text(0x8010000A), "SCARD_E_TIMEOUT (0x8010000A)");
  EXPECT_EQ(scard::rv_text(scard::kENoService), "SCARD_E_NO_SERVICE (0x8010001D)");
  EXPECT_EQ(scard::rv_text(scard::kWRemovedCard), "SCARD_W_REMOVED_CARD (0x80100069)");
  EXPECT_EQ(scard::rv_text(0x12345678), "SCARD_? (0x12345678)");
}

TEST(ScardTest, EveryKnownRvHasAName) {
  const uint32_t known[] = {
      scard::kFInternalError, scard::kECancelled, scard::kEInvalidHandle, scard::kEInvalidParameter,
      scard::kEInvalidTarget, scard::kENoMemory, scard::kFWaitedTooLong, scard::kEInsufficientBuffer,
      scard::kEUnknownReader, scard::kETimeout, scard::kESharingViolation, scard::kENoSmartcard,
      scard::kEUnknownCard, scard::kECantDispose, scard::kEProtoMismatch, scard::kENotReady,
      scard::kEInvalidValue, scard::kESystemCancelled, scard::kFCommError, scard::kFUnknownError,
      scard::kEInvalidAtr, scard::kENotTransacted, scard::kEReaderUnavailable, scard::kPShutdown,
      scard::kEPciTooSmall, scard::kEReaderUnsupported, scard::kEDuplicateReader,
      scard::kECardUnsupported, scard::kENoService, scard::kEServiceStopped,
      scard::kEUnsupportedFeature, scard::kENoReadersAvailable, scard::kWUnsupportedCard,
      scard::kWUnresponsiveCard, scard::kWUnpoweredCard, scard::kWResetCard, scard::kWRemovedCard,
      scard::kWSecurityViolation};
  std::set<std::string_view> names;
  for (uint32_t rv : known) {
    auto name = scard::rv_name(rv);
    EXPECT_TRUE(name.starts_with("SCARD_")) << std::hex << rv;
    EXPECT_NE(name, "SCARD_?") << std::hex << rv;
    names.insert(name);
  }
  EXPECT_EQ(names.size(), std::size(known));
}

TEST(ScardTest, StateText) {
  EXPECT_EQ(scard::state_text(0), "UNAWARE");
  EXPECT_EQ(scard::state_text(scard::kStatePresent), "PRESENT");
  EXPECT_EQ(scard::state_text(scard::kStateChanged | scard::kStatePresent | scard::kStateInUse),
            "CHANGED|PRESENT|INUSE");
  EXPECT_EQ(scard::state_text(scard::kStateEmpty | (3u << 16)), "EMPTY events=3");
  EXPECT_EQ(scard::state_text(0x7FF),
            "IGNORE|CHANGED|UNKNOWN|UNAVAILABLE|EMPTY|PRESENT|ATRMATCH|EXCLUSIVE|INUSE|MUTE|UNPOWERED");
  EXPECT_EQ(scard::state_text(0xFFFF0000u), "UNAWARE events=65535");
}

TEST(ScardTest, Constants) {
  EXPECT_EQ(scard::kMaxBufferSizeExtended, 65548u);
  EXPECT_EQ(scard::ctl_code(0xD48), 0x42000D48u);
  EXPECT_EQ(scard::kProtocolAny, 3u);
}

TEST(ResultTest, ValueAndError) {
  Result<int, std::string> ok = 5;
  ASSERT_TRUE(ok.ok());
  EXPECT_TRUE(static_cast<bool>(ok));
  EXPECT_EQ(*ok, 5);
  Result<int, std::string> bad = unexpected(std::string("nope"));
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error(), "nope");
}

TEST(ResultDeathTest, ValueOfAnErrorAborts) {
  Result<int, std::string> bad = unexpected(std::string("nope"));
  EXPECT_DEATH((void)bad.value(), "internal check failed");
}

}  // namespace
}  // namespace cardbridge

// ---- PeerPolicy: who may be at the other end of a desk link (support/peer.hpp) ----------
namespace cardbridge {
namespace {

PeerIdentity cert(std::string cn, std::vector<std::string> dns, std::string fp) {
  PeerIdentity p;
  p.kind = PeerIdentity::Kind::kTlsCertificate;
  p.common_name = std::move(cn);
  p.dns_names = std::move(dns);
  p.fingerprint = std::move(fp);
  return p;
}
const std::string kFp(64, 'a');

TEST(PeerPolicy, UnixPeersByUid) {
  PeerPolicy p;
  p.unix_uids = {1000, 0};
  EXPECT_FALSE(p.refusal(PeerIdentity::unix_user(1000, 1)));
  EXPECT_FALSE(p.refusal(PeerIdentity::unix_user(0, 1)));
  auto why = p.refusal(PeerIdentity::unix_user(1001, 1));
  ASSERT_TRUE(why);
  EXPECT_NE(why->find("uid 1001"), std::string::npos);
}

TEST(PeerPolicy, ATlsPeerMustBePinnedByNameOrFingerprint) {
  PeerPolicy none;
  EXPECT_TRUE(none.refusal(cert("desk-07", {}, kFp))) << "a CA signature alone is not enough";
  PeerPolicy by_name;
  by_name.tls_names = {"Desk-07.hospital.example"};
  EXPECT_FALSE(by_name.refusal(cert("x", {"desk-07.hospital.example"}, kFp))) << "DNS name, any case";
  EXPECT_FALSE(by_name.refusal(cert("DESK-07.hospital.example", {}, kFp))) << "or the CN";
  EXPECT_TRUE(by_name.refusal(cert("web.hospital.example", {"web.hospital.example"}, kFp)));
  EXPECT_TRUE(by_name.refusal(cert("desk-07.hospital.example.evil", {}, kFp))) << "exact, not a prefix";
  PeerPolicy by_fp;
  by_fp.tls_fingerprints = {"sha256:" + std::string(32, 'A') + std::string(32, 'b')};
  EXPECT_TRUE(by_fp.refusal(cert("desk-07", {}, kFp))) << "another certificate";
  by_fp.tls_fingerprints = {"sha256:" + std::string(63, 'a')};
  EXPECT_TRUE(by_fp.refusal(cert("desk-07", {}, kFp))) << "a malformed pin matches nothing";
  by_fp.tls_fingerprints = {"AA:" + std::string(62, 'a')};
  EXPECT_FALSE(by_fp.refusal(cert("anything", {}, kFp)));
}

TEST(PeerPolicy, RdpAndPlainTcpOnlyWhenAllowed) {
  PeerPolicy p;
  EXPECT_TRUE(p.refusal(PeerIdentity::rdp_channel("xrdp static")));
  EXPECT_TRUE(p.refusal(PeerIdentity::insecure_tcp("127.0.0.1:1")));
  EXPECT_TRUE(p.refusal(PeerIdentity{})) << "unidentified";
  p.allow_rdp_channel = true;
  p.allow_insecure_tcp = true;
  EXPECT_FALSE(p.refusal(PeerIdentity::rdp_channel("xrdp static")));
  EXPECT_FALSE(p.refusal(PeerIdentity::insecure_tcp("127.0.0.1:1")));
}

TEST(PeerPolicy, FingerprintsAreNormalised) {
  EXPECT_EQ(normalize_fingerprint("sha256:" + std::string(64, 'F')), std::string(64, 'f'));
  EXPECT_FALSE(normalize_fingerprint("sha256:abc"));
  EXPECT_FALSE(normalize_fingerprint(std::string(64, 'g')));
}

TEST(PeerIdentity, DescribeSaysWhatWasVerified) {
  EXPECT_EQ(PeerIdentity::unix_user(1000, 42).describe(), "uid 1000 pid 42");
  EXPECT_EQ(PeerIdentity::insecure_tcp("127.0.0.1:7").describe(), "UNAUTHENTICATED tcp 127.0.0.1:7");
  EXPECT_EQ(cert("desk-07", {}, kFp).describe(), "certificate CN=desk-07 sha256:" + kFp);
}

}  // namespace
}  // namespace cardbridge
