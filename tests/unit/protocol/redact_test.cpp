// Redaction of card traffic for logs (security-critical): PIN- and key-bearing APDUs and
// every control buffer are never printed, nor is a PIN's length; card data (answers) only
// with the diagnostic switch on. The tests assert on the *absence* of secret bytes in the
// output, in every hex spelling, not only on the presence of a marker.
#include "cardbridge/support/redact.hpp"

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "cardbridge/support/hex.hpp"
#include "cardbridge/support/scard.hpp"

namespace cardbridge::redact {
namespace {

using Bytes = std::vector<uint8_t>;

Bytes cat(Bytes a, const Bytes& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Fails if any spelling of |secret| (spaced or not, upper or lower case) is in |text|.
void expect_no_secret(const std::string& text, const Bytes& secret) {
  ASSERT_FALSE(secret.empty());
  const std::string spaced = to_hex(secret);
  const std::string plain = to_hex(secret, false);
  std::string lower_spaced = spaced, lower_plain = plain;
  for (auto& c : lower_spaced) c = static_cast<char>(std::tolower(c));
  for (auto& c : lower_plain) c = static_cast<char>(std::tolower(c));
  EXPECT_EQ(text.find(spaced), std::string::npos) << "secret " << spaced << " in: " << text;
  EXPECT_EQ(text.find(plain), std::string::npos) << "secret " << plain << " in: " << text;
  EXPECT_EQ(text.find(lower_spaced), std::string::npos) << text;
  EXPECT_EQ(text.find(lower_plain), std::string::npos) << text;
  // The raw bytes themselves (a PIN is often ASCII digits).
  EXPECT_EQ(text.find(std::string(secret.begin(), secret.end())), std::string::npos) << text;
}

const Bytes kPin = {0x31, 0x32, 0x33, 0x34, 0xFF, 0xFF, 0xFF, 0xFF};
const Bytes kPin2 = {0x39, 0x38, 0x37, 0x36, 0x35, 0x34, 0xFF, 0xFF};
const Bytes kPuk = {0x12, 0x34, 0x56, 0x78, 0x87, 0x65, 0x43, 0x21};

Bytes short_apdu(uint8_t cla, uint8_t ins, uint8_t p1, uint8_t p2, const Bytes& data) {
  Bytes a = {cla, ins, p1, p2, static_cast<uint8_t>(data.size())};
  return cat(a, data);
}

Bytes extended_apdu(uint8_t cla, uint8_t ins, uint8_t p1, uint8_t p2, const Bytes& data) {
  Bytes a = {cla, ins, p1, p2, 0x00, static_cast<uint8_t>(data.size() >> 8), static_cast<uint8_t>(data.size())};
  return cat(a, data);
}

// ---- PIN-bearing commands -------------------------------------------------------------

TEST(RedactCommand, VerifyPin) {
  Bytes apdu = short_apdu(0x00, 0x20, 0x00, 0x81, kPin);
  ASSERT_EQ(to_hex(apdu), "00 20 00 81 08 31 32 33 34 FF FF FF FF");
  std::string out = command(apdu);
  EXPECT_EQ(out, "00 20 00 81 <PIN redacted>") << "neither the PIN nor its length";
  expect_no_secret(out, kPin);
  expect_no_secret(out, Bytes(kPin.begin(), kPin.begin() + 4));
  EXPECT_FALSE(apdu_body_loggable(apdu));
  EXPECT_TRUE(apdu_carries_pin(apdu));
}

TEST(RedactCommand, VerifyWithLe) {
  Bytes apdu = cat(short_apdu(0x00, 0x20, 0x00, 0x81, kPin), {0x00});
  std::string out = command(apdu);
  expect_no_secret(out, kPin);
  EXPECT_NE(out.find("redacted"), std::string::npos) << out;
}

TEST(RedactCommand, ChangeReferenceData) {
  Bytes apdu = short_apdu(0x00, 0x24, 0x00, 0x81, cat(kPin, kPin2));
  std::string out = command(apdu);
  EXPECT_EQ(out, "00 24 00 81 <PIN redacted>");
  expect_no_secret(out, kPin);
  expect_no_secret(out, kPin2);
  EXPECT_TRUE(apdu_carries_pin(apdu));
}

TEST(RedactCommand, ResetRetryCounter) {
  Bytes apdu = short_apdu(0x00, 0x2C, 0x00, 0x81, cat(kPuk, kPin2));
  std::string out = command(apdu);
  expect_no_secret(out, kPuk);
  expect_no_secret(out, kPin2);
  EXPECT_NE(out.find("redacted"), std::string::npos);
  EXPECT_TRUE(apdu_carries_pin(apdu));
}

TEST(RedactCommand, EnableAndDisableVerificationRequirement) {
  for (uint8_t ins : {uint8_t{0x26}, uint8_t{0x28}}) {
    Bytes apdu = short_apdu(0x00, ins, 0x00, 0x81, kPin);
    std::string out = command(apdu);
    expect_no_secret(out, kPin);
    EXPECT_NE(out.find("redacted"), std::string::npos) << out;
    EXPECT_TRUE(apdu_carries_pin(apdu));
  }
}

TEST(RedactCommand, OddInsVariants) {
  // Odd INS: data in BER-TLV (ISO 7816-4 5.4.3). Still PIN material.
  for (uint8_t ins : {uint8_t{0x21}, uint8_t{0x25}, uint8_t{0x27}, uint8_t{0x29}, uint8_t{0x2D}}) {
    SCOPED_TRACE(static_cast<int>(ins));
    Bytes tlv = cat({0x53, static_cast<uint8_t>(kPin.size())}, kPin);
    Bytes apdu = short_apdu(0x00, ins, 0x00, 0x81, tlv);
    std::string out = command(apdu);
    expect_no_secret(out, kPin);
    EXPECT_NE(out.find("redacted"), std::string::npos) << out;
    EXPECT_TRUE(apdu_carries_pin(apdu));
    EXPECT_FALSE(apdu_body_loggable(apdu));
  }
}

TEST(RedactCommand, ExtendedLengthVerify) {
  Bytes apdu = extended_apdu(0x00, 0x20, 0x00, 0x81, kPin);
  ASSERT_EQ(to_hex(apdu), "00 20 00 81 00 00 08 31 32 33 34 FF FF FF FF");
  std::string out = command(apdu);
  EXPECT_EQ(out, "00 20 00 81 <PIN redacted>");
  expect_no_secret(out, kPin);
  // With an extended Le as well (case 4E).
  std::string out2 = command(cat(apdu, {0x00, 0x00}));
  expect_no_secret(out2, kPin);
  EXPECT_NE(out2.find("redacted"), std::string::npos);
}

TEST(RedactCommand, LongExtendedChangeReferenceData) {
  Bytes secret(300);
  for (std::size_t i = 0; i < secret.size(); ++i) secret[i] = static_cast<uint8_t>(0x40 + i % 50);
  Bytes apdu = extended_apdu(0x00, 0x24, 0x00, 0x01, secret);
  std::string out = command(apdu);
  EXPECT_EQ(out, "00 24 00 01 <PIN redacted>");
}

TEST(RedactCommand, APinCommandLooksTheSameWhateverThePinLength) {
  // Every PIN length, short and extended, gives one and the same line.
  for (uint8_t ins : {uint8_t{0x20}, uint8_t{0x24}, uint8_t{0x2C}, uint8_t{0x21}}) {
    const std::string expected = fmt::format("00 {:02X} 00 81 <PIN redacted>", ins);
    for (std::size_t len = 1; len <= 64; ++len) {
      Bytes pin(len, 0x30);
      EXPECT_EQ(command(short_apdu(0x00, ins, 0x00, 0x81, pin)), expected) << len;
      EXPECT_EQ(command(extended_apdu(0x00, ins, 0x00, 0x81, pin)), expected) << len;
      EXPECT_EQ(command(cat(short_apdu(0x00, ins, 0x00, 0x81, pin), {0x00})), expected) << len;
    }
  }
  // A VERIFY without data (how many tries are left) has nothing to hide.
  EXPECT_EQ(command(Bytes{0x00, 0x20, 0x00, 0x81}), "00 20 00 81");
}

TEST(RedactCommand, ProprietaryClassIsRedactedWhateverTheIns) {
  // Proprietary classes give INS codes proprietary meaning: even "SELECT" may carry keys.
  for (uint8_t cla : {uint8_t{0x80}, uint8_t{0x84}, uint8_t{0x90}, uint8_t{0xA0}, uint8_t{0xC0}}) {
    for (uint8_t ins : {uint8_t{0x20}, uint8_t{0xA4}, uint8_t{0xB0}, uint8_t{0xCA}, uint8_t{0xD8}, uint8_t{0x50}}) {
      SCOPED_TRACE(testing::Message() << std::hex << int{cla} << " " << int{ins});
      Bytes apdu = short_apdu(cla, ins, 0x00, 0x00, kPuk);
      std::string out = command(apdu);
      expect_no_secret(out, kPuk);
      EXPECT_NE(out.find("redacted"), std::string::npos) << out;
      EXPECT_FALSE(apdu_body_loggable(apdu));
      std::string rsp = response(apdu, cat(kPin, {0x90, 0x00}));
      expect_no_secret(rsp, kPin);
    }
  }
}

TEST(RedactCommand, SecureMessagingClassIsRedacted) {
  // First interindustry class: b4-b3 = SM indication (0x04, 0x08, 0x0C); further
  // interindustry: b6 (0x60..0x6F).
  for (uint8_t cla : {uint8_t{0x04}, uint8_t{0x08}, uint8_t{0x0C}, uint8_t{0x0D}, uint8_t{0x60}, uint8_t{0x6F}}) {
    for (uint8_t ins : {uint8_t{0xA4}, uint8_t{0xB0}, uint8_t{0x20}, uint8_t{0xCA}}) {
      SCOPED_TRACE(testing::Message() << std::hex << int{cla} << " " << int{ins});
      Bytes apdu = short_apdu(cla, ins, 0x04, 0x0C, kPuk);
      std::string out = command(apdu);
      expect_no_secret(out, kPuk);
      EXPECT_NE(out.find("redacted"), std::string::npos) << out;
      std::string rsp = response(apdu, cat(kPin, {0x90, 0x00}));
      expect_no_secret(rsp, kPin);
      EXPECT_NE(rsp.find("redacted"), std::string::npos) << rsp;
    }
  }
}

TEST(RedactCommand, ReaderPseudoApduIsRedacted) {
  // CLA FF: PC/SC part 3 pseudo-APDUs (LOAD KEYS, GENERAL AUTHENTICATE, ...), and
  // reader-specific PIN pad commands.
  Bytes load_key = short_apdu(0xFF, 0x82, 0x00, 0x00, {0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5});
  std::string out = command(load_key);
  expect_no_secret(out, {0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5});
  EXPECT_EQ(out, "FF 82 00 00 Lc=6 <6 bytes redacted>");
  Bytes pinpad = short_apdu(0xFF, 0x20, 0x00, 0x81, kPin);
  expect_no_secret(command(pinpad), kPin);
  Bytes ff_select = short_apdu(0xFF, 0xA4, 0x00, 0x00, kPuk);
  expect_no_secret(command(ff_select), kPuk);
  Bytes ff_get_data = {0xFF, 0xCA, 0x00, 0x00, 0x00};
  expect_no_secret(response(ff_get_data, cat(kPuk, {0x90, 0x00})), kPuk);
}

TEST(RedactCommand, UnknownInstructionsAreRedacted) {
  // Allow-list: PSO, INTERNAL/EXTERNAL AUTHENTICATE, GENERAL AUTHENTICATE, PUT DATA,
  // UPDATE BINARY, ENVELOPE, and unassigned codes all hide their data.
  for (uint8_t ins : {uint8_t{0x2A}, uint8_t{0x88}, uint8_t{0x82}, uint8_t{0x86}, uint8_t{0x87},
                      uint8_t{0xDA}, uint8_t{0xDB}, uint8_t{0xD6}, uint8_t{0xC2}, uint8_t{0x47}, uint8_t{0x00},
                      uint8_t{0xFE}}) {
    SCOPED_TRACE(static_cast<int>(ins));
    Bytes apdu = short_apdu(0x00, ins, 0x00, 0x00, kPuk);
    std::string out = command(apdu);
    expect_no_secret(out, kPuk);
    EXPECT_NE(out.find("redacted"), std::string::npos) << out;
  }
}

// ---- allowed commands -----------------------------------------------------------------

TEST(RedactCommand, SelectBodyShown) {
  Bytes aid = {0xA0, 0x00, 0x00, 0x00, 0x03, 0x10, 0x10};
  Bytes apdu = cat(short_apdu(0x00, 0xA4, 0x04, 0x00, aid), {0x00});
  EXPECT_TRUE(apdu_body_loggable(apdu));
  EXPECT_FALSE(apdu_carries_pin(apdu));
  EXPECT_EQ(command(apdu), "00 A4 04 00 Lc=7 [A0 00 00 00 03 10 10]");
}

TEST(RedactCommand, SelectOnLogicalChannelShown) {
  // CLA 01..03: logical channels, no SM. CLA 0x40: further interindustry, channel 4, no SM.
  for (uint8_t cla : {uint8_t{0x01}, uint8_t{0x03}, uint8_t{0x40}, uint8_t{0x4F}}) {
    Bytes apdu = short_apdu(cla, 0xA4, 0x00, 0x0C, {0x3F, 0x00});
    EXPECT_TRUE(apdu_body_loggable(apdu)) << int{cla};
    EXPECT_NE(command(apdu).find("[3F 00]"), std::string::npos) << command(apdu);
  }
}

TEST(RedactCommand, ExtendedSelectShown) {
  Bytes apdu = extended_apdu(0x00, 0xA4, 0x04, 0x00, {0xD2, 0x76, 0x00, 0x01, 0x24, 0x01});
  EXPECT_EQ(command(apdu), "00 A4 04 00 Lc=6 [D2 76 00 01 24 01]");
}

TEST(RedactCommand, CaseOneAndTwoShowHeaderOnly) {
  EXPECT_EQ(command(Bytes{0x00, 0xB0, 0x00, 0x00}), "00 B0 00 00");
  EXPECT_EQ(command(Bytes{0x00, 0xB0, 0x00, 0x00, 0x00}), "00 B0 00 00 Le");
  EXPECT_EQ(command(Bytes{0x00, 0x84, 0x00, 0x00, 0x08}), "00 84 00 00 Le");
  EXPECT_EQ(command(Bytes{0x00, 0xB0, 0x00, 0x00, 0x00, 0x01, 0x00}), "00 B0 00 00 Le");
}

// Card data: off by default (a READ BINARY answer is the holder's identity).
class CardDataLogging {
 public:
  CardDataLogging() { set_card_data_logging(true); }
  ~CardDataLogging() { set_card_data_logging(false); }
};

TEST(RedactResponse, CardDataIsHiddenByDefault) {
  ASSERT_FALSE(card_data_logging());
  // EF.IdentiteCPS-like content: the holder's name.
  const Bytes identity = {'D', 'U', 'P', 'O', 'N', 'T', ' ', 'M', 'A', 'R', 'I', 'E'};
  for (const Bytes& cmd : {Bytes{0x00, 0xB0, 0x00, 0x00, 0x0C}, Bytes{0x00, 0xB2, 0x01, 0x0C, 0x00},
                           Bytes{0x00, 0xCA, 0x01, 0x00, 0x00}, Bytes{0x00, 0xA4, 0x04, 0x00, 0x02, 0x3F, 0x00, 0x00},
                           Bytes{0x00, 0xB1, 0x00, 0x00, 0x04, 0x54, 0x02, 0x00, 0x00, 0x00}}) {
    std::string out = response(cmd, cat(identity, {0x90, 0x00}));
    EXPECT_EQ(out, "SW=9000 <12 bytes redacted>") << to_hex(cmd);
    expect_no_secret(out, identity);
    expect_no_secret(out, Bytes(identity.begin(), identity.begin() + 4));
  }
  // The commands themselves stay readable (file ids, AIDs, offsets: not personal data).
  EXPECT_EQ(command(Bytes{0x00, 0xA4, 0x00, 0x0C, 0x02, 0x2F, 0x02}), "00 A4 00 0C Lc=2 [2F 02]");
}

TEST(RedactResponse, AllowedCommandResponsesShownOnlyWithTheDiagnosticSwitch) {
  CardDataLogging on;
  Bytes read_binary = {0x00, 0xB0, 0x00, 0x00, 0x04};
  EXPECT_EQ(response(read_binary, Bytes{0xDE, 0xAD, 0xBE, 0xEF, 0x90, 0x00}), "SW=9000 [DE AD BE EF]");
  Bytes get_challenge = {0x00, 0x84, 0x00, 0x00, 0x08};
  EXPECT_EQ(response(get_challenge, Bytes{1, 2, 3, 4, 5, 6, 7, 8, 0x90, 0x00}),
            "SW=9000 [01 02 03 04 05 06 07 08]");
  Bytes select = {0x00, 0xA4, 0x04, 0x00, 0x02, 0x3F, 0x00, 0x00};
  EXPECT_EQ(response(select, Bytes{0x6F, 0x00, 0x90, 0x00}), "SW=9000 [6F 00]");
  Bytes get_data = {0x00, 0xCA, 0x01, 0x00, 0x00};
  EXPECT_EQ(response(get_data, Bytes{0x01, 0x61, 0x05}), "SW=6105 [01]");
  Bytes read_record = {0x00, 0xB2, 0x01, 0x0C, 0x00};
  EXPECT_EQ(response(read_record, Bytes{0x70, 0x00, 0x90, 0x00}), "SW=9000 [70 00]");
  Bytes manage_channel = {0x00, 0x70, 0x00, 0x00, 0x01};
  EXPECT_EQ(response(manage_channel, Bytes{0x01, 0x90, 0x00}), "SW=9000 [01]");
}

TEST(RedactResponse, TheDiagnosticSwitchNeverShowsSecrets) {
  CardDataLogging on;
  const Bytes data = {0x55, 0x66, 0x77, 0x88, 0x99, 0xAA};
  for (const Bytes& cmd : {short_apdu(0x00, 0x20, 0x00, 0x81, kPin), Bytes{0x00, 0xC0, 0x00, 0x00, 0x06},
                           Bytes{0x00, 0x2A, 0x9E, 0x9A, 0x02, 0x01, 0x02, 0x00},
                           short_apdu(0x80, 0xB0, 0x00, 0x00, kPuk), short_apdu(0x0C, 0xB0, 0x00, 0x00, kPuk)}) {
    std::string out = response(cmd, cat(data, {0x90, 0x00}));
    EXPECT_EQ(out, "SW=9000 <6 bytes redacted>") << to_hex(cmd);
    expect_no_secret(command(cmd), kPin);
  }
  EXPECT_EQ(command(short_apdu(0x00, 0x20, 0x00, 0x81, kPin)), "00 20 00 81 <PIN redacted>");
}

TEST(RedactResponse, GetResponseDataIsRedacted) {
  CardDataLogging on;  // even so
  // On T=0 (and whenever a card answers 61xx) the response data of *every* command,
  // secret ones included, is fetched with GET RESPONSE: after PSO: DECIPHER it is the
  // deciphered key, after INTERNAL/GENERAL AUTHENTICATE the authentication cryptogram.
  // A stateless redactor cannot know which command GET RESPONSE continues, so its
  // response data must be treated as secret. (The GET RESPONSE command itself, a case-2
  // APDU, has no data and its header stays visible.)
  const Bytes session_key = {0x4B, 0x45, 0x59, 0x21, 0x0A, 0x0B, 0x0C, 0x0D};
  Bytes get_response = {0x00, 0xC0, 0x00, 0x00, 0x08};
  EXPECT_EQ(command(get_response), "00 C0 00 00 Le");
  std::string out = response(get_response, cat(session_key, {0x90, 0x00}));
  expect_no_secret(out, session_key);
  EXPECT_EQ(out, "SW=9000 <8 bytes redacted>");
}

TEST(RedactResponse, StatusWordOnly) {
  Bytes verify = short_apdu(0x00, 0x20, 0x00, 0x81, kPin);
  EXPECT_EQ(response(verify, Bytes{0x63, 0xC2}), "SW=63C2");
  EXPECT_EQ(response(verify, Bytes{0x90, 0x00}), "SW=9000");
}

TEST(RedactResponse, SecretCommandResponsesRedacted) {
  const Bytes data = {0x55, 0x66, 0x77, 0x88, 0x99, 0xAA};
  for (const Bytes& cmd : {short_apdu(0x00, 0x20, 0x00, 0x81, kPin), short_apdu(0x00, 0x24, 0x00, 0x81, kPin),
                           short_apdu(0x00, 0x2C, 0x00, 0x81, kPin),
                           Bytes{0x00, 0x88, 0x00, 0x00, 0x02, 0x01, 0x02, 0x00},  // INTERNAL AUTHENTICATE
                           Bytes{0x00, 0x2A, 0x9E, 0x9A, 0x02, 0x01, 0x02, 0x00},  // PSO: compute signature
                           Bytes{0x00, 0x87, 0x00, 0x9A, 0x02, 0x7C, 0x00, 0x00}}) {  // GENERAL AUTHENTICATE
    std::string out = response(cmd, cat(data, {0x90, 0x00}));
    EXPECT_EQ(out, "SW=9000 <6 bytes redacted>") << to_hex(cmd);
    expect_no_secret(out, data);
  }
}

TEST(RedactResponse, ResponseOfMalformedAllowedCommandRedacted) {
  Bytes broken_select = {0x00, 0xA4, 0x04, 0x00, 0x09, 0xA0, 0x00};  // Lc says 9, 2 present
  std::string out = response(broken_select, cat(kPuk, {0x90, 0x00}));
  expect_no_secret(out, kPuk);
}

TEST(RedactResponse, NoStatusWord) {
  Bytes select = {0x00, 0xA4, 0x04, 0x00, 0x00};
  EXPECT_EQ(response(select, Bytes{}), "<0 bytes, no status word>");
  EXPECT_EQ(response(select, Bytes{0x90}), "<1 bytes, no status word>");
  EXPECT_EQ(response(Bytes{}, Bytes{0x90, 0x00}), "SW=9000");
  EXPECT_EQ(response(Bytes{}, Bytes{0x01, 0x90, 0x00}), "SW=9000 <1 bytes redacted>");
}

// ---- malformed ------------------------------------------------------------------------

TEST(RedactCommand, TooShortForAHeader) {
  EXPECT_EQ(command(Bytes{}), "<0 bytes, no APDU header>");
  EXPECT_EQ(command(Bytes{0x00, 0x20, 0x00}), "<3 bytes, no APDU header>");
  EXPECT_FALSE(apdu_body_loggable(Bytes{0x00, 0xA4, 0x04}));
  EXPECT_FALSE(apdu_carries_pin(Bytes{0x00}));
  EXPECT_TRUE(apdu_carries_pin(Bytes{0x00, 0x20}));
}

TEST(RedactCommand, LcLongerThanData) {
  Bytes apdu = {0x00, 0x20, 0x00, 0x81, 0x08, 0x31, 0x32, 0x33, 0x34};  // 4 of 8 bytes
  std::string out = command(apdu);
  expect_no_secret(out, {0x31, 0x32, 0x33, 0x34});
  EXPECT_NE(out.find("redacted"), std::string::npos) << out;
  // Even for an allowed instruction the body of a malformed APDU is not shown: the split
  // between header and data is a guess.
  Bytes select = {0x00, 0xA4, 0x04, 0x00, 0x10, 0xA0, 0x00, 0x00, 0x00, 0x03};
  std::string out2 = command(select);
  expect_no_secret(out2, {0xA0, 0x00, 0x00, 0x00, 0x03});
  EXPECT_FALSE(apdu_body_loggable(select));
}

TEST(RedactCommand, LcShorterThanData) {
  Bytes select = {0x00, 0xA4, 0x04, 0x00, 0x02, 0x3F, 0x00, 0x11, 0x22, 0x33, 0x44};
  EXPECT_FALSE(apdu_body_loggable(select));
  expect_no_secret(command(select), {0x11, 0x22, 0x33, 0x44});
}

TEST(RedactCommand, BrokenExtendedLengths) {
  for (const Bytes& a : {Bytes{0x00, 0xA4, 0x04, 0x00, 0x00, 0x31},                     // 00 + 1 byte
                         Bytes{0x00, 0xA4, 0x04, 0x00, 0x00, 0x00, 0x00, 0x31, 0x32},   // Lc=0 extended
                         Bytes{0x00, 0xA4, 0x04, 0x00, 0x00, 0xFF, 0xFF, 0x31, 0x32},   // Lc > data
                         Bytes{0x00, 0x20, 0x00, 0x81, 0x00, 0x00, 0x02, 0x31, 0x32, 0x33, 0x34}}) {
    SCOPED_TRACE(to_hex(a));
    std::string out = command(a);
    EXPECT_EQ(out.find("31 32"), std::string::npos) << out;
  }
}

TEST(RedactCommand, EveryTruncationOfAVerifyIsSafe) {
  Bytes apdu = extended_apdu(0x00, 0x20, 0x00, 0x81, kPin);
  for (std::size_t n = 0; n <= apdu.size(); ++n) {
    std::span<const uint8_t> part(apdu.data(), n);
    std::string out = command(part);
    std::string rsp = response(part, cat(kPin2, {0x90, 0x00}));
    if (n > 9) expect_no_secret(out, Bytes(kPin.begin(), kPin.begin() + static_cast<std::ptrdiff_t>(n - 7)));
    expect_no_secret(rsp, kPin2);
  }
}

TEST(RedactControl, NeverShowsTheBuffer) {
  Bytes buf = cat(kPin, kPuk);
  std::string out = control(0x42000D48, buf);
  EXPECT_EQ(out, "ctl 0x42000D48 <buffer redacted>") << "not even the length (PIN-pad structures)";
  expect_no_secret(out, kPin);
  expect_no_secret(out, kPuk);
  // FEATURE_VERIFY_PIN_DIRECT style buffer: PIN_VERIFY_STRUCTURE followed by the APDU.
  Bytes verify_direct = cat({0x00, 0x00, 0x89, 0x47, 0x04, 0x08, 0x04, 0x02, 0x01, 0x00, 0x00, 0x00,
                             0x00, 0x00, 0x00, 0x0D, 0x00, 0x00, 0x00},
                            short_apdu(0x00, 0x20, 0x00, 0x81, kPin));
  std::string out2 = control(scard::ctl_code(0x3400), verify_direct);
  expect_no_secret(out2, kPin);
  EXPECT_EQ(out2.find("00 20 00 81"), std::string::npos) << out2;
  EXPECT_EQ(control(1, {}), "ctl 0x00000001");
  EXPECT_EQ(control(scard::ctl_code(0x3400), verify_direct), control(scard::ctl_code(0x3400), Bytes(3, 0)))
      << "buffers of any length look the same";
}

// ---- property: PIN instructions never leak -------------------------------------------

TEST(RedactProperty, RandomPinApdusNeverLeakData) {
  const uint8_t pin_ins[] = {0x20, 0x21, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2C, 0x2D};
  std::mt19937 rng(0xC0FFEE);  // fixed seed: deterministic
  auto byte = [&] { return static_cast<uint8_t>(rng() & 0xFF); };
  for (int iter = 0; iter < 20000; ++iter) {
    const uint8_t cla = (iter % 4 == 0) ? byte() : static_cast<uint8_t>(byte() & 0x03);
    const uint8_t ins = pin_ins[rng() % std::size(pin_ins)];
    const uint8_t p1 = byte(), p2 = byte();
    Bytes data(4 + rng() % 60);
    for (auto& b : data) b = byte();
    Bytes apdu;
    switch (rng() % 5) {
      case 0: apdu = short_apdu(cla, ins, p1, p2, data); break;
      case 1: apdu = cat(short_apdu(cla, ins, p1, p2, data), {byte()}); break;
      case 2: apdu = extended_apdu(cla, ins, p1, p2, data); break;
      case 3: apdu = cat(extended_apdu(cla, ins, p1, p2, data), {byte(), byte()}); break;
      default:  // malformed: a random tail after the header
        apdu = cat({cla, ins, p1, p2}, data);
        break;
    }
    ASSERT_TRUE(apdu_carries_pin(apdu));
    ASSERT_FALSE(apdu_body_loggable(apdu)) << to_hex(apdu);
    const std::string header = to_hex(std::span<const uint8_t>(apdu).first(4));
    const std::string out = command(apdu);
    ASSERT_EQ(out.rfind(header, 0), 0u) << out;
    const std::string tail = out.substr(header.size());
    const std::string rsp = response(apdu, cat(data, {0x90, 0x00}));
    // No window of >= 4 data bytes, in any spelling, after the (public) header. Every
    // longer window contains a 4-byte one, so checking all 4-byte windows is enough.
    for (std::size_t off = 0; off + 4 <= data.size(); ++off) {
      std::span<const uint8_t> window(data.data() + off, 4);
      const std::string w = to_hex(window), wp = to_hex(window, false);
      ASSERT_EQ(tail.find(w), std::string::npos) << to_hex(apdu) << " -> " << out;
      ASSERT_EQ(tail.find(wp), std::string::npos) << to_hex(apdu) << " -> " << out;
      ASSERT_EQ(rsp.find(w), std::string::npos) << to_hex(apdu) << " -> " << rsp;
      ASSERT_EQ(rsp.find(wp), std::string::npos) << to_hex(apdu) << " -> " << rsp;
    }
    // And the shape is fixed: nothing after the header but the marker (no length).
    ASSERT_EQ(tail, " <PIN redacted>") << out;
  }
}

TEST(RedactProperty, RandomApdusNeverCrashAndNeverShowNonAllowListedBodies) {
  std::mt19937 rng(12345);
  for (int iter = 0; iter < 20000; ++iter) {
    Bytes apdu(rng() % 40);
    for (auto& b : apdu) b = static_cast<uint8_t>(rng());
    Bytes rsp(rng() % 20);
    for (auto& b : rsp) b = static_cast<uint8_t>(rng());
    const std::string out = command(apdu);
    const std::string r = response(apdu, rsp);
    EXPECT_FALSE(out.empty());
    EXPECT_FALSE(r.empty());
    if (!apdu_body_loggable(apdu)) {
      ASSERT_EQ(out.find('['), std::string::npos) << to_hex(apdu) << " -> " << out;
      ASSERT_EQ(r.find('['), std::string::npos) << to_hex(apdu) << " -> " << r;
    }
    if (apdu_carries_pin(apdu)) {
      ASSERT_FALSE(apdu_body_loggable(apdu)) << to_hex(apdu);
    }
  }
}

}  // namespace
}  // namespace cardbridge::redact
