// The card image's shared ISO 7816-4 rules (protocol/image): which file an absolute SELECT
// names, what an FCP says about a file, which commands may change the card, and the
// lookups over an image both ends make.
#include <gtest/gtest.h>

#include "cardbridge/card_image/apdu.hpp"
#include "cardbridge/card_image/image.hpp"

namespace cardbridge::card_image {
namespace {

Bytes b(std::initializer_list<uint8_t> v) { return Bytes(v); }

Key path_key(std::initializer_list<uint16_t> fids, uint8_t channel = 0) {
  Key k(1, static_cast<char>(channel));
  k += 'P';
  for (uint16_t f : fids) {
    k += static_cast<char>(f >> 8);
    k += static_cast<char>(f & 0xFF);
  }
  return k;
}

TEST(CardImageSelect, AbsoluteSelectsNameTheirTarget) {
  // by path from the MF, 3F00 included (P1 09): what the Cryptolib sends
  EXPECT_EQ(select_key(b({0x00, 0xA4, 0x09, 0x04, 0x04, 0x3F, 0x00, 0xD0, 0x03})), path_key({0x3F00, 0xD003}));
  // by path from the MF, 3F00 implied (P1 08), no answer wanted (P2 0C)
  EXPECT_EQ(select_key(b({0x00, 0xA4, 0x08, 0x0C, 0x04, 0x50, 0x00, 0x50, 0x31})),
            path_key({0x3F00, 0x5000, 0x5031}));
  // the MF by its identifier, and with no data
  EXPECT_EQ(select_key(b({0x00, 0xA4, 0x00, 0x00, 0x02, 0x3F, 0x00})), path_key({0x3F00}));
  EXPECT_EQ(select_key(b({0x00, 0xA4, 0x00, 0x0C})), path_key({0x3F00}));
  // by DF name (AID), with Le
  const Bytes aid = {0xE8, 0x28, 0xBD, 0x08, 0x0F, 0x80, 0x25, 0x00, 0x00, 0x01, 0xFF, 0x00, 0x10};
  Bytes cmd = {0x00, 0xA4, 0x04, 0x00, static_cast<uint8_t>(aid.size())};
  cmd.insert(cmd.end(), aid.begin(), aid.end());
  cmd.push_back(0x00);
  auto key = select_key(cmd);
  ASSERT_TRUE(key);
  EXPECT_EQ((*key)[1], 'A');
  EXPECT_EQ(key->substr(2), std::string(aid.begin(), aid.end()));
  EXPECT_EQ(key_text(*key), "A:E828BD080F8025000001FF0010");
  // channel 1 (CPS4's ChipDoc applet) is another key than channel 0
  EXPECT_EQ(select_key(b({0x01, 0xA4, 0x09, 0x04, 0x04, 0x3F, 0x00, 0xD0, 0x03})), path_key({0x3F00, 0xD003}, 1));
  EXPECT_EQ(key_text(path_key({0x3F00, 0x5000, 0x5031})), "P:3F00/5000/5031");
}

TEST(CardImageSelect, RelativeOrOddSelectsNameNothing) {
  EXPECT_FALSE(select_key(b({0x00, 0xA4, 0x00, 0x00, 0x02, 0x50, 0x31})));  // a FID under the current DF
  EXPECT_FALSE(select_key(b({0x00, 0xA4, 0x02, 0x00, 0x02, 0x50, 0x31})));  // EF under the current DF
  EXPECT_FALSE(select_key(b({0x00, 0xA4, 0x03, 0x00})));                    // the parent DF
  EXPECT_FALSE(select_key(b({0x00, 0xA4, 0x09, 0x04, 0x02, 0x50, 0x31})));  // a path that does not start at 3F00
  EXPECT_FALSE(select_key(b({0x00, 0xA4, 0x04, 0x02, 0x02, 0xA0, 0x00})));  // next occurrence
  EXPECT_FALSE(select_key(b({0x80, 0xA4, 0x09, 0x04, 0x02, 0x3F, 0x00})));  // proprietary class
  EXPECT_FALSE(select_key(b({0x10, 0xA4, 0x09, 0x04, 0x02, 0x3F, 0x00})));  // command chaining
  EXPECT_FALSE(select_key(b({0x00, 0xA4, 0x09, 0x04, 0x04, 0x3F, 0x00, 0x3F, 0xFF})));  // 3FFF in a path
  EXPECT_FALSE(select_key(b({0x00, 0xA4, 0x09, 0x04, 0x05, 0x3F, 0x00, 0xD0, 0x03})));  // Lc beyond the data
  EXPECT_FALSE(select_key(b({0x00, 0xA4, 0x09, 0x04, 0x00, 0x00, 0x02, 0x3F, 0x00})));  // extended length
}

TEST(CardImageRules, SelectOutcomes) {
  EXPECT_EQ(select_outcome(b({0x90, 0x00})), SelectOutcome::kSelected);
  EXPECT_EQ(select_outcome(b({0x61, 0x1A})), SelectOutcome::kSelected);
  EXPECT_EQ(select_outcome(b({0x62, 0x0A, 0x90, 0x00})), SelectOutcome::kSelected);
  EXPECT_EQ(select_outcome(b({0x6A, 0x82})), SelectOutcome::kRefused);
  EXPECT_EQ(select_outcome(b({0x6E, 0x00})), SelectOutcome::kRefused);
  EXPECT_EQ(select_outcome(b({0x62, 0x83})), SelectOutcome::kUnclear);  // selected, but invalidated
  EXPECT_EQ(select_outcome(b({0x01, 0x6A, 0x82})), SelectOutcome::kUnclear);
}

TEST(CardImageRules, WhatMayModifyTheCard) {
  for (int ins : {0xD6, 0xD0, 0xDC, 0xE2, 0x24, 0x2C, 0x0E, 0xE0, 0xE4, 0xDA, 0x44, 0x04}) {
    EXPECT_TRUE(may_modify(b({0x00, static_cast<uint8_t>(ins), 0x00, 0x00}))) << std::hex << ins;
  }
  for (int ins : {0xA4, 0xB0, 0xC0, 0xCA, 0xCB, 0x20, 0x22, 0x2A, 0x88, 0x84}) {
    EXPECT_FALSE(may_modify(b({0x00, static_cast<uint8_t>(ins), 0x00, 0x00}))) << std::hex << ins;
  }
  EXPECT_TRUE(raises_security(b({0x00, 0x20, 0x00, 0x01, 0x08, 1, 2, 3, 4, 0xFF, 0xFF, 0xFF, 0xFF}), b({0x90, 0x00})));
  EXPECT_FALSE(raises_security(b({0x00, 0x20, 0x00, 0x01}), b({0x90, 0x00})));  // PIN status only
  EXPECT_FALSE(raises_security(b({0x00, 0x20, 0x00, 0x01, 0x08, 1, 2, 3, 4, 0xFF, 0xFF, 0xFF, 0xFF}), b({0x63, 0xC2})));
  EXPECT_TRUE(loses_track(b({0x00, 0xA4, 0x00, 0x00, 0x02, 0x50, 0x31}), b({0x90, 0x00})));  // relative, selected
  EXPECT_FALSE(loses_track(b({0x00, 0xA4, 0x00, 0x00, 0x02, 0x50, 0x31}), b({0x6A, 0x82})));  // refused: nothing moved
  EXPECT_TRUE(loses_track(b({0x00, 0x70, 0x00, 0x00, 0x01}), b({0x01, 0x90, 0x00})));         // MANAGE CHANNEL
  EXPECT_FALSE(loses_track(b({0x00, 0xA4, 0x09, 0x04, 0x02, 0x3F, 0x00}), b({0x61, 0x20})));
}

TEST(CardImageRules, ReadBinaryAndGetResponse) {
  auto rb = read_binary(b({0x00, 0xB0, 0x01, 0x02, 0x00}));
  ASSERT_TRUE(rb);
  EXPECT_EQ(rb->offset, 0x0102u);
  EXPECT_EQ(rb->le, 256u);
  EXPECT_FALSE(read_binary(b({0x00, 0xB0, 0x81, 0x02, 0x10})));  // short EF identifier mode
  EXPECT_FALSE(read_binary(b({0x00, 0xB0, 0x00, 0x00})));        // no Le
  EXPECT_TRUE(is_get_response(b({0x00, 0xC0, 0x00, 0x00, 0x1A})));
  EXPECT_FALSE(is_get_response(b({0x00, 0xC0, 0x00, 0x01, 0x1A})));
  EXPECT_EQ(channel_of(0x41), 5);
  EXPECT_EQ(channel_of(0x03), 3);
  EXPECT_FALSE(channel_of(0x80));
}

TEST(CardImageFcp, SizeTypeAndReadCondition) {
  // FCP: 80 size 0x0C, 82 transparent EF, 83 FID, 8C compact: AM 0x03 (b2 update, b1 read),
  // SC for update 0x12, SC for read 0x00 (always)
  const Bytes always = {0x62, 0x10, 0x80, 0x02, 0x00, 0x0C, 0x82, 0x01, 0x01, 0x83, 0x02,
                        0xD0, 0x03, 0x8C, 0x03, 0x03, 0x12, 0x00};
  auto fi = parse_fcp(always);
  ASSERT_TRUE(fi);
  EXPECT_TRUE(fi->transparent_ef);
  EXPECT_EQ(fi->size, 12u);
  EXPECT_EQ(fi->read, ReadAccess::kAlways);
  Bytes pin = always;
  pin.back() = 0x11;  // reading needs a PIN
  EXPECT_EQ(parse_fcp(pin)->read, ReadAccess::kRestricted);
  // IAS-ECC wraps the compact form in A1
  const Bytes wrapped = {0x62, 0x0E, 0x80, 0x02, 0x07, 0x14, 0x82, 0x01, 0x01, 0xA1, 0x05,
                         0x8C, 0x03, 0x03, 0x12, 0x00};
  EXPECT_EQ(parse_fcp(wrapped)->read, ReadAccess::kAlways);
  EXPECT_EQ(parse_fcp(wrapped)->size, 0x0714u);
  // a DF is no transparent EF; no security attributes: unknown
  const Bytes df = {0x62, 0x07, 0x82, 0x01, 0x38, 0x83, 0x02, 0x50, 0x00};
  EXPECT_FALSE(parse_fcp(df)->transparent_ef);
  EXPECT_EQ(parse_fcp(df)->read, ReadAccess::kUnknown);
  EXPECT_FALSE(parse_fcp(b({0x6F, 0x05, 0x80})));  // truncated
  EXPECT_FALSE(parse_fcp(b({0x90, 0x00})));
}

TEST(CardImageIndex, LookupsAndTheQuietWayBack) {
  protocol::CardImage im;
  const Bytes fcp_select = {0x00, 0xA4, 0x09, 0x04, 0x04, 0x3F, 0x00, 0xD0, 0x03};
  const Bytes quiet_select = {0x00, 0xA4, 0x09, 0x0C, 0x04, 0x3F, 0x00, 0xD0, 0x03};
  const Bytes fcp = {0x62, 0x09, 0x80, 0x02, 0x00, 0x0C, 0x82, 0x01, 0x01, 0x83, 0x00, 0x90, 0x00};
  im.selects = {protocol::ImageSelect{fcp_select, {0x61, 0x0B}, fcp},
                protocol::ImageSelect{quiet_select, {0x90, 0x00}, {}}};
  im.files = {protocol::ImageFile{Bytes{0x00, 'P', 0x3F, 0x00, 0xD0, 0x03}, Bytes(12, 7)}};
  ImageIndex index(im);
  const Key key = path_key({0x3F00, 0xD003});
  ASSERT_NE(index.select(fcp_select), nullptr);
  EXPECT_EQ(index.select(fcp_select)->response, b({0x61, 0x0B}));
  EXPECT_EQ(index.select(b({0x00, 0xA4, 0x09, 0x04, 0x04, 0x3F, 0x00, 0xD0, 0x10})), nullptr);
  ASSERT_NE(index.way_to(key), nullptr);
  EXPECT_EQ(index.way_to(key)->command, quiet_select);  // 9000 without data: the cheapest way back
  ASSERT_TRUE(index.info(key));
  EXPECT_EQ(index.info(key)->size, 12u);  // from the FCP fetched after 61xx
  ASSERT_NE(index.file(key), nullptr);
  EXPECT_EQ(index.file(key)->size(), 12u);
  EXPECT_EQ(index.file(path_key({0x3F00, 0xD010})), nullptr);
}

}  // namespace
}  // namespace cardbridge::card_image
