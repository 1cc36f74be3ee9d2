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

constexpr uint32_t kEscape = 0x42000DAC;          // IOCTL_CCID_ESCAPE = SCARD_CTL_CODE(3500)
constexpr uint32_t kVerifyDirect = 0x42330006;    // what a PIN-pad reader announces (libccid)
constexpr uint32_t kModifyDirect = 0x42330007;
constexpr uint32_t kPinProperties = 0x4233000A;
constexpr uint32_t kGetKey = 0x42330010;          // returns the keys typed: never "pinpad"
constexpr uint32_t kEscCommand = 0x42330013;      // the reader's own escape code
constexpr uint32_t kMct = 0x42330008;

const std::vector<ReaderFeature> kPinPadReader = {
    {feature::kVerifyPinDirect, kVerifyDirect}, {feature::kModifyPinDirect, kModifyDirect},
    {feature::kIfdPinProperties, kPinProperties}, {feature::kGetKey, kGetKey},
    {feature::kCcidEscCommand, kEscCommand}, {feature::kMctReaderDirect, kMct}};

Policy with_control(std::string_view text) {
  auto r = Policy::parse_control_allow(text);
  EXPECT_TRUE(r.ok()) << "'" << text << "': " << (r.ok() ? "" : r.error());
  Policy p;
  if (r.ok()) p.control_allow = *r;
  return p;
}

TEST(PolicyControlAllow, CtlCodeMatchesPcscLite) {
  EXPECT_EQ(sc::ctl_code(3400), kFeatureRequest);
  EXPECT_EQ(kGetFeatureRequest, kFeatureRequest);
  EXPECT_EQ(kCcidEscape, sc::ctl_code(3500));
}

TEST(PolicyControlAllow, TheDefaultIsPinPadOnly) {
  const Policy p;  // what the agent and the add-in start with
  EXPECT_EQ(p.control_verdict(kFeatureRequest, nullptr), ControlVerdict::kAllowed) << "feature discovery";
  EXPECT_EQ(p.control_verdict(kEscape, nullptr), ControlVerdict::kRefused) << "escape commands are opt-in";
  EXPECT_EQ(p.control_verdict(kEscape, &kPinPadReader), ControlVerdict::kRefused);
  EXPECT_EQ(p.control_verdict(0x12345678, &kPinPadReader), ControlVerdict::kRefused);
  // A PIN-pad code is allowed only when the reader announces it as one.
  EXPECT_EQ(p.control_verdict(kVerifyDirect, nullptr), ControlVerdict::kNeedsFeatures);
  EXPECT_EQ(p.control_verdict(kVerifyDirect, &kPinPadReader), ControlVerdict::kAllowed);
  EXPECT_EQ(p.control_verdict(kModifyDirect, &kPinPadReader), ControlVerdict::kAllowed);
  EXPECT_EQ(p.control_verdict(kPinProperties, &kPinPadReader), ControlVerdict::kAllowed);
  EXPECT_EQ(p.control_verdict(kGetKey, &kPinPadReader), ControlVerdict::kRefused) << "GET_KEY reads typed keys";
  EXPECT_EQ(p.control_verdict(kEscCommand, &kPinPadReader), ControlVerdict::kRefused);
  EXPECT_EQ(p.control_verdict(kMct, &kPinPadReader), ControlVerdict::kRefused);
  const std::vector<ReaderFeature> none;
  EXPECT_EQ(p.control_verdict(kVerifyDirect, &none), ControlVerdict::kRefused) << "not announced by this reader";
  // Parsing "" or "pinpad" gives the same rule.
  EXPECT_EQ(with_control("").control_allow, p.control_allow);
  EXPECT_EQ(with_control(" PinPad ").control_allow, p.control_allow);
}

TEST(PolicyControlAllow, EscapeIsOptIn) {
  const Policy p = with_control("pinpad,escape");
  EXPECT_EQ(p.control_verdict(kEscape, nullptr), ControlVerdict::kAllowed);
  EXPECT_EQ(p.control_verdict(kEscCommand, &kPinPadReader), ControlVerdict::kAllowed);
  EXPECT_EQ(p.control_verdict(kVerifyDirect, &kPinPadReader), ControlVerdict::kAllowed);
  EXPECT_EQ(p.control_verdict(kMct, &kPinPadReader), ControlVerdict::kRefused);
  const Policy only = with_control("escape");
  EXPECT_EQ(only.control_verdict(kEscape, nullptr), ControlVerdict::kAllowed);
  EXPECT_EQ(only.control_verdict(kFeatureRequest, nullptr), ControlVerdict::kRefused);
  EXPECT_EQ(only.control_verdict(kVerifyDirect, &kPinPadReader), ControlVerdict::kRefused);
}

TEST(PolicyControlAllow, AllMeansEveryCode) {
  for (const char* text : {"all", "ALL", " All "}) {
    const Policy p = with_control(text);
    EXPECT_EQ(p.control_verdict(kFeatureRequest, nullptr), ControlVerdict::kAllowed) << text;
    EXPECT_EQ(p.control_verdict(0, nullptr), ControlVerdict::kAllowed) << text;
    EXPECT_EQ(p.control_verdict(0xFFFFFFFF, nullptr), ControlVerdict::kAllowed) << text;
    EXPECT_EQ(p.control_verdict(kEscape, nullptr), ControlVerdict::kAllowed) << text;
  }
}

TEST(PolicyControlAllow, NoneMeansNoCode) {
  for (const char* text : {"none", "NONE", " None "}) {
    const Policy p = with_control(text);
    EXPECT_EQ(p.control_verdict(kFeatureRequest, nullptr), ControlVerdict::kRefused) << text;
    EXPECT_EQ(p.control_verdict(kVerifyDirect, &kPinPadReader), ControlVerdict::kRefused) << text;
    EXPECT_EQ(p.control_verdict(0, nullptr), ControlVerdict::kRefused) << text;
  }
}

TEST(PolicyControlAllow, NumbersAddCodes) {
  // A small number is a function number, a large one a raw code; 0x is hex.
  EXPECT_EQ(with_control("3400").control_allow.codes, (std::set<uint32_t>{kFeatureRequest}));
  EXPECT_EQ(with_control("0xD48").control_allow.codes, (std::set<uint32_t>{kFeatureRequest}));
  EXPECT_EQ(with_control("0X42000d48").control_allow.codes, (std::set<uint32_t>{kFeatureRequest}));
  EXPECT_EQ(with_control("1107299656").control_allow.codes, (std::set<uint32_t>{kFeatureRequest}));
  EXPECT_EQ(with_control("65535,65536").control_allow.codes, (std::set<uint32_t>{sc::ctl_code(65535), 65536u}));
  // Numbers alone: only them (no pinpad), unless pinpad is named too.
  const Policy p = with_control("3401, 0x42000D49");
  EXPECT_FALSE(p.control_allow.pinpad);
  EXPECT_EQ(p.control_verdict(sc::ctl_code(3401), nullptr), ControlVerdict::kAllowed);
  EXPECT_EQ(p.control_verdict(0x42000D49, nullptr), ControlVerdict::kAllowed);
  EXPECT_EQ(p.control_verdict(3401, nullptr), ControlVerdict::kRefused) << "the raw number is not the code";
  EXPECT_EQ(p.control_verdict(kFeatureRequest, nullptr), ControlVerdict::kRefused);
  const Policy both = with_control("pinpad,3401");
  EXPECT_EQ(both.control_verdict(kFeatureRequest, nullptr), ControlVerdict::kAllowed);
  EXPECT_EQ(both.control_verdict(sc::ctl_code(3401), nullptr), ControlVerdict::kAllowed);
}

TEST(PolicyControlAllow, BadInputIsAnError) {
  for (const char* text : {"abc", "0x", "3400x", "-1", "0xZZ", "99999999999", "0x100000000", "3400 3401",
                           "none,3400", "none,pinpad", "+3400", "3400;3401", ","}) {
    auto r = Policy::parse_control_allow(text);
    EXPECT_FALSE(r.ok()) << "'" << text << "' should be refused";
  }
}

TEST(PolicyControlAllow, DescribeNamesTheRule) {
  EXPECT_EQ(Policy::describe(Policy{}.control_allow), "pinpad");
  EXPECT_EQ(Policy::describe(with_control("escape,pinpad,3400").control_allow), "pinpad,escape,0x42000D48");
  EXPECT_EQ(Policy::describe(with_control("none").control_allow), "none");
}

// ---- reader features (PC/SC part 10) ------------------------------------------------------

TEST(ReaderFeatures, ParsesTagLengthCodeBigEndian) {
  const std::vector<uint8_t> answer = {0x06, 0x04, 0x42, 0x33, 0x00, 0x06, 0x0A, 0x04, 0x42, 0x33, 0x00, 0x0A};
  EXPECT_EQ(feature::parse_features(answer),
            (std::vector<ReaderFeature>{{0x06, 0x42330006}, {0x0A, 0x4233000A}}));
}

TEST(ReaderFeatures, MalformedEntriesAreSkippedAndATruncatedTailEndsTheList) {
  // A 2-byte entry (skipped), a good one, then a tail that claims 4 bytes but has 2.
  const std::vector<uint8_t> answer = {0x07, 0x02, 0xAA, 0xBB, 0x06, 0x04, 0x42, 0x33, 0x00, 0x06, 0x07, 0x04, 0x42, 0x33};
  EXPECT_EQ(feature::parse_features(answer), (std::vector<ReaderFeature>{{0x06, 0x42330006}}));
  EXPECT_TRUE(feature::parse_features({}).empty());
  const std::vector<uint8_t> lone = {0x06};
  EXPECT_TRUE(feature::parse_features(lone).empty());
}

// ---- SET_ATTRIB ---------------------------------------------------------------------------

TEST(PolicySetAttrib, RefusedByDefault) {
  const Policy p;
  EXPECT_FALSE(p.set_attrib_allowed(sc::kAttrVendorName));
  EXPECT_FALSE(p.set_attrib_allowed(0));
  EXPECT_EQ(Policy::describe(p.set_attrib_allow), "none");
}

TEST(PolicySetAttrib, AllOrAList) {
  auto all = Policy::parse_set_attrib_allow("all");
  ASSERT_TRUE(all.ok());
  Policy p;
  p.set_attrib_allow = *all;
  EXPECT_TRUE(p.set_attrib_allowed(sc::kAttrVendorName));
  auto list = Policy::parse_set_attrib_allow("0x00010100, 65794");
  ASSERT_TRUE(list.ok());
  p.set_attrib_allow = *list;
  EXPECT_TRUE(p.set_attrib_allowed(0x00010100));
  EXPECT_TRUE(p.set_attrib_allowed(65794));
  EXPECT_FALSE(p.set_attrib_allowed(0x00010101));
  EXPECT_EQ(Policy::describe(p.set_attrib_allow), "0x00010100,0x00010102");
  for (const char* bad : {"x", "0x", "1 2", "-3"}) EXPECT_FALSE(Policy::parse_set_attrib_allow(bad).ok()) << bad;
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
  admin.control_allow = ControlAllow{.pinpad = false, .codes = {kFeatureRequest}};
  Policy everything;
  everything.control_allow = ControlAllow{.all = true};
  EXPECT_TRUE(Policy::narrowed(admin, everything).control_verdict(kFeatureRequest, nullptr) == ControlVerdict::kAllowed);
  EXPECT_FALSE(Policy::narrowed(admin, everything).control_verdict(sc::ctl_code(1), nullptr) == ControlVerdict::kAllowed)
      << "the connection's 'all' does not widen the admin's list";
  Policy none;
  none.control_allow = ControlAllow{.pinpad = false};
  EXPECT_FALSE(Policy::narrowed(admin, none).control_verdict(kFeatureRequest, nullptr) == ControlVerdict::kAllowed);
  Policy forbidding;
  forbidding.control_allow = ControlAllow{.pinpad = false};
  Policy asks;
  asks.control_allow = ControlAllow{.pinpad = false, .codes = {kFeatureRequest}};
  EXPECT_FALSE(Policy::narrowed(forbidding, asks).control_verdict(kFeatureRequest, nullptr) == ControlVerdict::kAllowed);
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
