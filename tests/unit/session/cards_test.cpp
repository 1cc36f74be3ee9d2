// Card identification by ATR (cdrsession/lib/include/cardbridge/session/cards.hpp): every ATR of
// /work/shared/docs/cps-cards.md, every Vitale entry of pcsc-tools' smartcard_list.txt
// (Debian 12, pcsc-tools 1.6.2), the CPx-family fallback and unknown cards.
#include "cardbridge/session/cards.hpp"

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "cardbridge/support/hex.hpp"

namespace cardbridge::session {
namespace {

CardIdentity id(const std::string& atr_hex) {
  auto atr = from_hex(atr_hex);
  EXPECT_TRUE(atr.has_value()) << atr_hex;
  return identify_atr(atr.value_or(std::vector<uint8_t>{}));
}

struct Known {
  const char* atr;
  CardKind kind;
  const char* name;
  bool professional;
};

// cps-cards.md, "Card family and ATRs".
const Known kCpsCardsMd[] = {
    {"3B AC 00 40 2A 00 12 25 00 64 80 00 03 10 00 90 00", CardKind::kCps3, "cps3", true},
    {"3B 8F 80 01 00 31 B8 64 04 B0 EC C1 73 94 01 80 82 90 00 0E", CardKind::kCps3Contactless, "cps3-contactless",
     true},
    {"3B 9B 18 80 01 00 12 25 00 64 80 04 01 00 00 90 44", CardKind::kCps4, "cps4", true},
    {"3B DC 18 FF 00 00 12 25 00 64 80 00 04 01 00 90 00", CardKind::kCps4, "cps4", true},
    {"3B AC 00 40 2A 00 12 25 00 64 80 82 02 12 00 90 00", CardKind::kCps2ter, "cps2ter", true},
};

TEST(Cards, EveryAtrOfCpsCardsMdIsRecognised) {
  for (const auto& k : kCpsCardsMd) {
    SCOPED_TRACE(k.atr);
    const auto c = id(k.atr);
    EXPECT_EQ(c.kind, k.kind);
    EXPECT_STREQ(kind_name(c.kind), k.name);
    EXPECT_EQ(c.professional, k.professional);
    EXPECT_FALSE(c.label.empty());
  }
}

TEST(Cards, LabelsNameTheGeneration) {
  EXPECT_EQ(id("3BAC00402A001225006480000310009000").label, "CPS3");
  EXPECT_NE(id("3B8F80010031B86404B0ECC173940180829000 0E").label.find("CPS3"), std::string::npos);
  EXPECT_NE(id("3B9B18800100122500648004010000 9044").label.find("CPS4"), std::string::npos);
  EXPECT_NE(id("3BDC18FF000012250064800004010090 00").label.find("CPS4"), std::string::npos);
  EXPECT_EQ(id("3BAC00402A001225006480820212009000").label, "CPS2ter");
}

TEST(Cards, AcceptsAnyHexSpelling) {
  // What the shim's status document carries: upper case, no spaces.
  EXPECT_EQ(id("3BAC00402A001225006480000310009000").kind, CardKind::kCps3);
  EXPECT_EQ(id("3bac00402a001225006480000310009000").kind, CardKind::kCps3);
  EXPECT_EQ(id("3b:ac:00:40:2a:00:12:25:00:64:80:00:03:10:00:90:00").kind, CardKind::kCps3);
}

// smartcard_list.txt: "Vitale 2 (french health card)", "Carte Vitale 2 (Nouvelle version avec
// photo)", "Carte Vitale 2 (French health card)", "Carte Vitale (HealthCare)" x2, "Vitale Card
// French Healthcare (HealthCare)".
TEST(Cards, EveryVitale2EntryOfSmartcardList) {
  for (const char* atr : {"3B 75 13 00 00 43 09 EA 90 00", "3B 75 13 00 00 44 09 EA 90 00",
                          "3B 75 13 00 00 45 09 EA 90 00", "3B 75 13 00 00 47 09 EA 90 00",
                          "3B 75 13 00 00 48 09 EA 90 00", "3B 75 13 00 00 49 09 EA 90 00"}) {
    SCOPED_TRACE(atr);
    const auto c = id(atr);
    EXPECT_EQ(c.kind, CardKind::kVitale2);
    EXPECT_STREQ(kind_name(c.kind), "vitale2");
    EXPECT_FALSE(c.professional) << "a Vitale card is the patient's, not a CPx card";
    EXPECT_NE(c.label.find("Vitale 2"), std::string::npos) << c.label;
  }
}

// smartcard_list.txt: "3F 65 25 00 2[2C] 09 [F6]9 90 00" Sesam Vitale, "3F 65 25 00 52 09 6A 90 00"
// French carte Vitale, "3F 65 25 00 A[34] 09 6A 90 00" Sesam Vitale (character classes expanded).
TEST(Cards, EveryVitale1EntryOfSmartcardList) {
  for (const char* atr : {"3F 65 25 00 22 09 F9 90 00", "3F 65 25 00 22 09 69 90 00", "3F 65 25 00 2C 09 F9 90 00",
                          "3F 65 25 00 2C 09 69 90 00", "3F 65 25 00 52 09 6A 90 00", "3F 65 25 00 A3 09 6A 90 00",
                          "3F 65 25 00 A4 09 6A 90 00"}) {
    SCOPED_TRACE(atr);
    const auto c = id(atr);
    EXPECT_EQ(c.kind, CardKind::kVitale1);
    EXPECT_STREQ(kind_name(c.kind), "vitale1");
    EXPECT_FALSE(c.professional);
    EXPECT_NE(c.label.find("Vitale 1"), std::string::npos) << c.label;
  }
}

TEST(Cards, NewerCpxGenerationsFallBackToTheFamilyMarker) {
  // The ANS historical bytes 12 25 00 64 80 with another version: still a CPx card CDR can use.
  for (const char* atr : {"3B AC 00 40 2A 00 12 25 00 64 80 00 05 10 00 90 00",  // CPS3 with another version
                          "3B 9B 18 80 01 00 12 25 00 64 80 05 01 00 00 90 45",  // a future CPS4 batch
                          "3B 8A 80 01 12 25 00 64 80 00 03 10"}) {
    SCOPED_TRACE(atr);
    const auto c = id(atr);
    EXPECT_EQ(c.kind, CardKind::kCpxFamily);
    EXPECT_STREQ(kind_name(c.kind), "cpx-family");
    EXPECT_TRUE(c.professional);
  }
}

TEST(Cards, UnknownCards) {
  for (const char* atr : {
           "3B 95 13 81 01 80 73 FF 01 00 0B",                    // the harness's vicc ISO 7816 card
           "3B 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 01 00 00 00 00 6A",  // a PC/SC storage card
           "3B DC 18 FF 80 11 C1 80 73 C8 21 13 66 05 03 63 51 00 02 32",  // GoTrust Idem (also 3B DC 18 FF)
           "3B 75 13 00 00 9C 02 02 01 02",                       // Cyberflex: 3B 75 13 00 00 but not Vitale
           "3B 8F 80 01 00 31 B8 64 04 B0 EC C1 73 94 01 80 FF FF FF E3",  // near the CPS3 contactless
           "3B", "3B 00"}) {
    SCOPED_TRACE(atr);
    const auto c = id(atr);
    EXPECT_EQ(c.kind, CardKind::kUnknown);
    EXPECT_STREQ(kind_name(c.kind), "unknown");
    EXPECT_FALSE(c.professional);
    EXPECT_EQ(c.label, "unknown card");
  }
  EXPECT_EQ(identify_atr({}).kind, CardKind::kUnknown);
  // An exact pattern must match the whole ATR: a CPS3 ATR one byte short or long is not "CPS3"
  // (it still carries the CPx marker, so it falls back to the family).
  EXPECT_EQ(id("3B AC 00 40 2A 00 12 25 00 64 80 00 03 10 00 90").kind, CardKind::kCpxFamily);
  EXPECT_EQ(id("3B AC 00 40 2A 00 12 25 00 64 80 00 03 10 00 90 00 00").kind, CardKind::kCpxFamily);
  // The Vitale wildcards stand for exactly one byte.
  EXPECT_EQ(id("3B 75 13 00 00 09 EA 90 00").kind, CardKind::kUnknown);
  EXPECT_EQ(id("3B 75 13 00 00 45 45 09 EA 90 00").kind, CardKind::kUnknown);
  // A wrong byte in a fixed position of a Vitale 2 pattern.
  EXPECT_EQ(id("3B 75 13 00 00 45 09 EB 90 00").kind, CardKind::kUnknown);
}

TEST(Cards, OtherCardsWithTheVitale1PrefixAreNotVitale) {
  // smartcard_list.txt lists bank and telephone cards under 3F 65 25 08 .. .. .. 90 00, and other
  // 3F 65 25 00 2B 09 xx cards; none of them is a Vitale card. The doctor and the audit trail must
  // not call a CB Visa card "Vitale 1".
  for (const char* atr : {"3F 65 25 08 43 04 6C 90 00",   // CB visa La Poste France (Oberthur)
                          "3F 65 25 08 63 04 6C 90 00",   // CB Master Carte du Credit Mutuel
                          "3F 65 25 08 22 04 68 90 00",   // France Telecom card (ex Pastel)
                          "3F 65 25 08 33 04 20 90 00",   // D-Trust card
                          "3F 65 25 00 2B 09 EB 90 00",   // Bull Scot 5
                          "3F 65 25 00 53 43 68 90 00"}) {  // a pay-TV card
    SCOPED_TRACE(atr);
    EXPECT_EQ(id(atr).kind, CardKind::kUnknown) << id(atr).label;
  }
}

TEST(Cards, KindNames) {
  EXPECT_STREQ(kind_name(CardKind::kCps3), "cps3");
  EXPECT_STREQ(kind_name(CardKind::kCps3Contactless), "cps3-contactless");
  EXPECT_STREQ(kind_name(CardKind::kCps4), "cps4");
  EXPECT_STREQ(kind_name(CardKind::kCps2ter), "cps2ter");
  EXPECT_STREQ(kind_name(CardKind::kCpxFamily), "cpx-family");
  EXPECT_STREQ(kind_name(CardKind::kVitale1), "vitale1");
  EXPECT_STREQ(kind_name(CardKind::kVitale2), "vitale2");
  EXPECT_STREQ(kind_name(CardKind::kUnknown), "unknown");
}


// ---- pcsc-tools' ATR list (names for the cards our table does not know) --------------------------

std::vector<std::string> from_list(const std::string& atr_hex, const std::string& list) {
  std::istringstream in(list);
  return describe_from_atr_list(from_hex(atr_hex).value_or(std::vector<uint8_t>{}), in);
}

// The list's format (pcsc-tools 1.6): '#' comments, a pattern line (hex bytes, '.' for any
// digit, or a regular expression), its descriptions on the following tab-indented lines, a
// blank line between entries.
const char* kList =
    "# smartcard_list.txt excerpt\n"
    "3B 02 14 50\n"
    "\tSchlumberger Multiflex 3k\n"
    "\n"
    "3B 95 13 81 01 80 73 FF 01 00 0B\n"
    "\tvsmartcard - iso7816 (Other)\n"
    "\thttps://example.invalid/vsmartcard/\n"
    "\n"
    "3B 8F 80 01 80 4F 0C A0 00 00 03 06 .. 00 01 00 00 00 00 ..\n"
    "\tstorage card (PC/SC part 3)\n"
    "\n"
    "3B DC 18 FF 81 91 FE 1F C3 80 73 C8 21 13 66 0[0-9] .. .. .. .. ..\n"
    "\tregular-expression entry\n"
    "\n";

TEST(CardsAtrList, ExactEntryWithAllItsLines) {
  EXPECT_EQ(from_list("3B 95 13 81 01 80 73 FF 01 00 0B", kList),
            (std::vector<std::string>{"vsmartcard - iso7816 (Other)", "https://example.invalid/vsmartcard/"}));
}

TEST(CardsAtrList, DotsAndRegularExpressions) {
  EXPECT_EQ(from_list("3B 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 01 00 00 00 00 6A", kList),
            (std::vector<std::string>{"storage card (PC/SC part 3)"}));
  EXPECT_EQ(from_list("3B DC 18 FF 81 91 FE 1F C3 80 73 C8 21 13 66 05 03 63 51 00 02", kList),
            (std::vector<std::string>{"regular-expression entry"}));
  EXPECT_TRUE(from_list("3B DC 18 FF 81 91 FE 1F C3 80 73 C8 21 13 66 15 03 63 51 00 02", kList).empty());
}

TEST(CardsAtrList, WholeAtrOnlyAndNoMatch) {
  EXPECT_TRUE(from_list("3B 95 13 81 01 80 73 FF 01 00", kList).empty()) << "a prefix is not a match";
  EXPECT_TRUE(from_list("3B 95 13 81 01 80 73 FF 01 00 0B 00", kList).empty());
  EXPECT_TRUE(from_list("3B 00", kList).empty());
  EXPECT_TRUE(from_list("3B 95 13 81 01 80 73 FF 01 00 0B", "").empty());
  EXPECT_TRUE(describe_from_atr_list(from_hex("3B00").value(), std::string("/nonexistent/list.txt")).empty());
}

TEST(CardsAtrList, InstalledListNamesTheHarnessCard) {
  // pcsc-tools is installed by scripts/install-deps; the real list knows vsmartcard's card.
  std::ifstream probe(kAtrListPath);
  if (!probe) GTEST_SKIP() << kAtrListPath << " not installed (package pcsc-tools)";
  const auto names = describe_from_atr_list(from_hex("3B951381018073FF01000B").value());
  ASSERT_FALSE(names.empty());
  EXPECT_NE(names.front().find("vsmartcard"), std::string::npos) << names.front();
}

}  // namespace
}  // namespace cardbridge::session
