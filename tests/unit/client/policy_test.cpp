// Desk policy: which readers the server sees and which SCardControl codes it may use.
#include "cardbridge/desk_core/policy.hpp"

#include <gtest/gtest.h>

#include "cardbridge/support/scard.hpp"

namespace cardbridge::client {
namespace {

namespace sc = cardbridge::scard;

constexpr uint32_t kFeatureRequest = 0x42000D48;  // pcsc-lite SCARD_CTL_CODE(3400)

Policy with_filter(std::vector<std::string> filter) {
  Policy p;
  p.reader_filter = std::move(filter);
  return p;
}

// ---- reader filter ------------------------------------------------------------------------

TEST(PolicyReaderFilter, EmptyFilterExposesEveryReader) {
  const Policy p;
  EXPECT_TRUE(p.reader_allowed("Gemalto PC Twin Reader 00 00"));
  EXPECT_TRUE(p.reader_allowed("HID Global OMNIKEY 3x21 Smart Card Reader [OMNIKEY 3x21] 01 00"));
  EXPECT_TRUE(p.reader_allowed(""));
}

TEST(PolicyReaderFilter, MatchesCaseInsensitiveSubstrings) {
  const Policy p = with_filter({"gemalto"});
  EXPECT_TRUE(p.reader_allowed("Gemalto PC Twin Reader 00 00"));
  EXPECT_TRUE(p.reader_allowed("GEMALTO USB Shell Token V2 01 00"));
  EXPECT_TRUE(p.reader_allowed("xx-gEmAlTo-yy"));  // anywhere in the name
  EXPECT_FALSE(p.reader_allowed("OMNIKEY CardMan 3121 00 00"));
  EXPECT_FALSE(p.reader_allowed("Gemalt"));  // the entry must be inside the name, not the reverse
  EXPECT_FALSE(p.reader_allowed(""));
}

TEST(PolicyReaderFilter, AnyEntryMayMatch) {
  const Policy p = with_filter({"CPS", "Omnikey"});
  EXPECT_TRUE(p.reader_allowed("Lecteur CPS 3 00 00"));
  EXPECT_TRUE(p.reader_allowed("HID OMNIKEY 5422 01 00"));
  EXPECT_FALSE(p.reader_allowed("Gemalto PC Twin Reader 00 00"));
}

TEST(PolicyReaderFilter, ParseSplitsOnCommasAndTrims) {
  EXPECT_EQ(Policy::parse_reader_filter("Gemalto, Omnikey ,, CPS "),
            (std::vector<std::string>{"Gemalto", "Omnikey", "CPS"}));
  EXPECT_EQ(Policy::parse_reader_filter("Gemalto PC Twin"), (std::vector<std::string>{"Gemalto PC Twin"}));
  EXPECT_TRUE(Policy::parse_reader_filter("").empty());
  EXPECT_TRUE(Policy::parse_reader_filter(" , ,").empty());
}

TEST(PolicyReaderFilter, ParsedFilterDrivesReaderAllowed) {
  const Policy p = with_filter(Policy::parse_reader_filter(" gemalto , CPS"));
  EXPECT_TRUE(p.reader_allowed("Gemalto PC Twin Reader 00 00"));
  EXPECT_TRUE(p.reader_allowed("Lecteur cps 3"));
  EXPECT_FALSE(p.reader_allowed("OMNIKEY CardMan 3121 00 00"));
}

// ---- control codes ------------------------------------------------------------------------

TEST(PolicyControlAllow, CtlCodeMatchesPcscLite) {
  EXPECT_EQ(sc::ctl_code(3400), kFeatureRequest);
}

TEST(PolicyControlAllow, AllMeansEveryCode) {
  for (const char* text : {"all", "ALL", " All ", ""}) {
    auto r = Policy::parse_control_allow(text);
    ASSERT_TRUE(r.ok()) << "'" << text << "'";
    EXPECT_FALSE(r->has_value()) << "'" << text << "'";
    Policy p;
    p.control_allow = *r;
    EXPECT_TRUE(p.control_allowed(kFeatureRequest));
    EXPECT_TRUE(p.control_allowed(0));
    EXPECT_TRUE(p.control_allowed(0xFFFFFFFF));
  }
}

TEST(PolicyControlAllow, NoneMeansNoCode) {
  for (const char* text : {"none", "NONE", " None "}) {
    auto r = Policy::parse_control_allow(text);
    ASSERT_TRUE(r.ok()) << text;
    ASSERT_TRUE(r->has_value()) << text;
    EXPECT_TRUE((*r)->empty()) << text;
    Policy p;
    p.control_allow = *r;
    EXPECT_FALSE(p.control_allowed(kFeatureRequest));
    EXPECT_FALSE(p.control_allowed(0));
  }
}

TEST(PolicyControlAllow, SmallDecimalIsAFunctionNumber) {
  auto r = Policy::parse_control_allow("3400");
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(r->has_value());
  EXPECT_EQ(**r, (std::set<uint32_t>{kFeatureRequest}));
}

TEST(PolicyControlAllow, LargeHexIsARawCode) {
  for (const char* text : {"0x42000D48", "0X42000d48", " 0x42000d48 "}) {
    auto r = Policy::parse_control_allow(text);
    ASSERT_TRUE(r.ok()) << text;
    ASSERT_TRUE(r->has_value()) << text;
    EXPECT_EQ(**r, (std::set<uint32_t>{kFeatureRequest})) << text;
  }
}

TEST(PolicyControlAllow, SmallHexIsAFunctionNumberToo) {
  auto r = Policy::parse_control_allow("0xD48");  // 3400
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(**r, (std::set<uint32_t>{kFeatureRequest}));
}

TEST(PolicyControlAllow, LargeDecimalIsARawCode) {
  auto r = Policy::parse_control_allow("1107299656");  // 0x42000D48
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(**r, (std::set<uint32_t>{kFeatureRequest}));
  auto boundary = Policy::parse_control_allow("65535,65536");
  ASSERT_TRUE(boundary.ok());
  EXPECT_EQ(**boundary, (std::set<uint32_t>{sc::ctl_code(65535), 65536u}));
}

TEST(PolicyControlAllow, ListMixesForms) {
  auto r = Policy::parse_control_allow("3400, 0x42000D49 ,3401");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(**r, (std::set<uint32_t>{kFeatureRequest, 0x42000D49, sc::ctl_code(3401)}));
  Policy p;
  p.control_allow = *r;
  EXPECT_TRUE(p.control_allowed(kFeatureRequest));
  EXPECT_TRUE(p.control_allowed(0x42000D49));
  EXPECT_TRUE(p.control_allowed(sc::ctl_code(3401)));
  EXPECT_FALSE(p.control_allowed(sc::ctl_code(3402)));
  EXPECT_FALSE(p.control_allowed(3400));  // the raw number is not the code
}

TEST(PolicyControlAllow, BadInputIsAnError) {
  for (const char* text : {"abc", "0x", "3400x", "-1", "0xZZ", "99999999999", "0x100000000", "3400 3401",
                           "none,3400", "all,3400", "+3400", "3400;3401"}) {
    auto r = Policy::parse_control_allow(text);
    EXPECT_FALSE(r.ok()) << "'" << text << "' should be refused";
    if (!r.ok()) {
      EXPECT_NE(r.error().find("bad control code"), std::string::npos) << r.error();
    }
  }
}

TEST(PolicyControlAllow, DefaultPolicyAllowsEverything) {
  const Policy p;
  EXPECT_TRUE(p.control_allowed(kFeatureRequest));
  EXPECT_TRUE(p.control_allowed(0x12345678));
}

// ---- the admin's policy encloses the connection's (issue 10) ---------------------------------

TEST(PolicyNarrowed, DenyListHidesWhateverTheFilterSays) {
  Policy p;
  p.reader_deny = {"hello"};
  EXPECT_FALSE(p.reader_allowed("Windows Hello Reader 00 00"));
  EXPECT_TRUE(p.reader_allowed("Gemalto PC Twin Reader 00 00"));
  p.reader_filter = {"reader"};
  EXPECT_FALSE(p.reader_allowed("Windows Hello Reader 00 00"));
}

TEST(PolicyNarrowed, AConnectionCannotWidenTheAdminsReaders) {
  Policy admin = with_filter({"gemalto"});
  admin.reader_deny = {"twin 01"};
  const Policy all;  // the connection asks for every reader
  const Policy p = Policy::narrowed(admin, all);
  EXPECT_TRUE(p.reader_allowed("Gemalto PC Twin 00 00"));
  EXPECT_FALSE(p.reader_allowed("OMNIKEY 3121 00 00")) << "the admin's filter still applies";
  EXPECT_FALSE(p.reader_allowed("Gemalto PC Twin 01 00")) << "the admin's deny list still applies";
  // A connection filter naming a reader the admin hides does not bring it back.
  const Policy q = Policy::narrowed(admin, with_filter({"omnikey", "gemalto"}));
  EXPECT_FALSE(q.reader_allowed("OMNIKEY 3121 00 00"));
  EXPECT_TRUE(q.reader_allowed("Gemalto PC Twin 00 00"));
}

TEST(PolicyNarrowed, AConnectionMayNarrow) {
  const Policy p = Policy::narrowed(Policy{}, with_filter({"omnikey"}));
  EXPECT_TRUE(p.reader_allowed("OMNIKEY 3121 00 00"));
  EXPECT_FALSE(p.reader_allowed("Gemalto PC Twin 00 00"));
}

TEST(PolicyNarrowed, ControlCodesMustPassBoth) {
  Policy admin;
  admin.control_allow = std::set<uint32_t>{kFeatureRequest};
  Policy everything;  // "all"
  EXPECT_TRUE(Policy::narrowed(admin, everything).control_allowed(kFeatureRequest));
  EXPECT_FALSE(Policy::narrowed(admin, everything).control_allowed(sc::ctl_code(1)))
      << "the connection's 'all' does not widen the admin's list";
  Policy none;
  none.control_allow = std::set<uint32_t>{};
  EXPECT_FALSE(Policy::narrowed(admin, none).control_allowed(kFeatureRequest));
  Policy forbidding;
  forbidding.control_allow = std::set<uint32_t>{};
  Policy asks;
  asks.control_allow = std::set<uint32_t>{kFeatureRequest};
  EXPECT_FALSE(Policy::narrowed(forbidding, asks).control_allowed(kFeatureRequest));
}

TEST(PolicyNarrowed, NestingTwiceKeepsEveryLayer) {
  const Policy inner = Policy::narrowed(with_filter({"gemalto"}), with_filter({"twin"}));
  const Policy outer = Policy::narrowed(with_filter({"00 00"}), inner);
  EXPECT_TRUE(outer.reader_allowed("Gemalto PC Twin 00 00"));
  EXPECT_FALSE(outer.reader_allowed("Gemalto PC Twin 01 00"));
  EXPECT_FALSE(outer.reader_allowed("Gemalto Shell Token 00 00"));
  EXPECT_FALSE(outer.reader_allowed("OMNIKEY Twin 00 00"));
}

}  // namespace
}  // namespace cardbridge::client
