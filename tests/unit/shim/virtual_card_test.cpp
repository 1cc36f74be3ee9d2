// VirtualCard: the shim's answers from a card image are the card's, byte for byte and
// status words included; the current file is tracked as the card would; what it cannot
// answer goes to the card after the SELECT that puts the card where the program expects.
#include "cardbridge/shim_core/virtual_card.hpp"

#include <gtest/gtest.h>

namespace cardbridge::shim {
namespace {

using Bytes = VirtualCard::Bytes;
constexpr uint32_t kT0 = 1, kT1 = 2;

const Bytes kSelSn = {0x00, 0xA4, 0x09, 0x04, 0x04, 0x3F, 0x00, 0xD0, 0x03};       // EF.SN.ICC, FCP wanted
const Bytes kSelSnQuiet = {0x00, 0xA4, 0x09, 0x0C, 0x04, 0x3F, 0x00, 0xD0, 0x03};  // no answer data
const Bytes kSelDir = {0x00, 0xA4, 0x09, 0x04, 0x04, 0x3F, 0x00, 0x2F, 0x00};
const Bytes kSelMissing = {0x00, 0xA4, 0x09, 0x04, 0x04, 0x3F, 0x00, 0x2F, 0x01};
// FCP of a 12-byte transparent EF, then 9000: 11 bytes of data, fetched with GET RESPONSE 0B
const Bytes kFcpSn = {0x62, 0x09, 0x80, 0x02, 0x00, 0x0C, 0x82, 0x01, 0x01, 0x83, 0x00, 0x90, 0x00};
const Bytes kFcpDir = {0x62, 0x09, 0x80, 0x02, 0x00, 0x28, 0x82, 0x01, 0x01, 0x83, 0x00, 0x90, 0x00};

Bytes content(std::size_t n, uint8_t start) {
  Bytes b(n);
  for (std::size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(start + i);
  return b;
}

Bytes with_sw(Bytes data, uint8_t sw1 = 0x90, uint8_t sw2 = 0x00) {
  data.push_back(sw1);
  data.push_back(sw2);
  return data;
}

protocol::CardImage image() {
  protocol::CardImage im;
  im.event_count = 7;
  im.complete = true;
  im.send_protocol = kT0;
  im.recv_protocol = kT0;
  im.selects = {protocol::ImageSelect{kSelSn, {0x61, 0x0B}, kFcpSn},
                protocol::ImageSelect{kSelSnQuiet, {0x90, 0x00}, {}},
                protocol::ImageSelect{kSelDir, {0x61, 0x0B}, kFcpDir},
                protocol::ImageSelect{kSelMissing, {0x6A, 0x82}, {}}};
  im.files = {protocol::ImageFile{Bytes{0x00, 'P', 0x3F, 0x00, 0xD0, 0x03}, content(12, 0x10)},
              protocol::ImageFile{Bytes{0x00, 'P', 0x3F, 0x00, 0x2F, 0x00}, content(40, 0x80)}};
  return im;
}

Bytes local(const VirtualCard::Decision& d) {
  auto* l = std::get_if<VirtualCard::Local>(&d);
  EXPECT_NE(l, nullptr) << "went to the card";
  return l ? l->response : Bytes{};
}

std::vector<Bytes> forwarded(const VirtualCard::Decision& d) {
  auto* f = std::get_if<VirtualCard::Forward>(&d);
  EXPECT_NE(f, nullptr) << "answered from the image";
  return f ? f->prelude : std::vector<Bytes>{};
}

TEST(VirtualCard, AnswersSelectGetResponseAndReadsAsTheCard) {
  VirtualCard vc(image());
  EXPECT_EQ(local(vc.transmit(kSelSn, kT0)), (Bytes{0x61, 0x0B}));
  EXPECT_EQ(local(vc.transmit(Bytes{0x00, 0xC0, 0x00, 0x00, 0x0B}, kT0)), kFcpSn);
  EXPECT_EQ(local(vc.transmit(Bytes{0x00, 0xB0, 0x00, 0x00, 0x0C}, kT0)), with_sw(content(12, 0x10)));
  EXPECT_EQ(local(vc.transmit(Bytes{0x00, 0xB0, 0x00, 0x04, 0x04}, kT0)), with_sw(content(4, 0x14)));
  // another file: the current file moves with the program's SELECTs
  EXPECT_EQ(local(vc.transmit(kSelDir, kT0)), (Bytes{0x61, 0x0B}));
  EXPECT_EQ(local(vc.transmit(Bytes{0x00, 0xB0, 0x00, 0x00, 0x28}, kT0)), with_sw(content(40, 0x80)));
  // a SELECT the card refused: refused again, and the current file stays
  EXPECT_EQ(local(vc.transmit(kSelMissing, kT0)), (Bytes{0x6A, 0x82}));
  EXPECT_EQ(local(vc.transmit(Bytes{0x00, 0xB0, 0x00, 0x20, 0x08}, kT0)), with_sw(content(8, 0xA0)));
}

TEST(VirtualCard, GetResponseInPiecesAsAT0Card) {
  VirtualCard vc(image());
  local(vc.transmit(kSelSn, kT0));
  // Le 5 of 11: 5 bytes and 61 06 for the rest
  EXPECT_EQ(local(vc.transmit(Bytes{0x00, 0xC0, 0x00, 0x00, 0x05}, kT0)),
            with_sw(Bytes(kFcpSn.begin(), kFcpSn.begin() + 5), 0x61, 0x06));
  EXPECT_EQ(local(vc.transmit(Bytes{0x00, 0xC0, 0x00, 0x00, 0x06}, kT0)),
            with_sw(Bytes(kFcpSn.begin() + 5, kFcpSn.end() - 2)));
  // nothing waits any more: the card answers the next GET RESPONSE itself
  EXPECT_TRUE(forwarded(vc.transmit(Bytes{0x00, 0xC0, 0x00, 0x00, 0x05}, kT0)).size() == 1);
}

TEST(VirtualCard, WhatItCannotAnswerGoesAfterTheSelectTheProgramExpects) {
  VirtualCard vc(image());
  local(vc.transmit(kSelSn, kT0));
  local(vc.transmit(Bytes{0x00, 0xC0, 0x00, 0x00, 0x0B}, kT0));
  // past the end of the file: the card's own answer (6B00, 6282...), from the right file
  const Bytes past = {0x00, 0xB0, 0x00, 0x0A, 0x08};
  auto prelude = forwarded(vc.transmit(past, kT0));
  ASSERT_EQ(prelude.size(), 1u);
  EXPECT_EQ(prelude[0], kSelSnQuiet);  // the quiet way back (9000, no data)
  // the card took it as the image says: from now on the card is in the program's file
  EXPECT_TRUE(vc.forwarded(past, prelude, {Bytes{0x90, 0x00}}, Bytes{0x62, 0x82}));
  const Bytes pin_status = {0x00, 0x20, 0x00, 0x01};
  EXPECT_TRUE(forwarded(vc.transmit(pin_status, kT0)).empty());
  // a relative SELECT depends on the current file too
  const Bytes relative = {0x00, 0xA4, 0x00, 0x00, 0x02, 0x50, 0x31};
  local(vc.transmit(kSelDir, kT0));
  prelude = forwarded(vc.transmit(relative, kT0));
  ASSERT_EQ(prelude.size(), 1u);
  EXPECT_EQ(prelude[0], kSelDir);  // no quiet SELECT of EF.DIR recorded: the program's own
}

TEST(VirtualCard, GetResponseBeyondWhatWaitsReplaysTheSelectFirst) {
  VirtualCard vc(image());
  local(vc.transmit(kSelSn, kT0));
  local(vc.transmit(Bytes{0x00, 0xC0, 0x00, 0x00, 0x04}, kT0));
  // Le 0x20 > 7 left: the card's own answer (6Cxx or what it does), on the same data
  auto prelude = forwarded(vc.transmit(Bytes{0x00, 0xC0, 0x00, 0x00, 0x20}, kT0));
  ASSERT_EQ(prelude.size(), 2u);
  EXPECT_EQ(prelude[0], kSelSn);
  EXPECT_EQ(prelude[1], (Bytes{0x00, 0xC0, 0x00, 0x00, 0x04}));
}

TEST(VirtualCard, APreludeAnsweredOtherwiseMeansAnotherCard) {
  VirtualCard vc(image());
  local(vc.transmit(kSelSn, kT0));
  const Bytes verify_status = {0x00, 0x20, 0x00, 0x01};
  auto prelude = forwarded(vc.transmit(verify_status, kT0));
  ASSERT_EQ(prelude.size(), 1u);
  EXPECT_FALSE(vc.forwarded(verify_status, prelude, {Bytes{0x6A, 0x82}}, Bytes{0x63, 0xC3}));
  EXPECT_FALSE(vc.forwarded(verify_status, prelude, {}, Bytes{0x63, 0xC3}));
}

TEST(VirtualCard, AnotherProtocolOrAResetGoesBackToTheCard) {
  VirtualCard vc(image());
  // answers recorded under T=0 are not a T=1 card's
  EXPECT_TRUE(forwarded(vc.transmit(kSelSn, kT1)).empty());
  local(vc.transmit(kSelSn, kT0));
  vc.card_reset();
  // after a reset the card's current file is its own: a READ goes there, with no prelude
  EXPECT_TRUE(forwarded(vc.transmit(Bytes{0x00, 0xB0, 0x00, 0x00, 0x0C}, kT0)).empty());
  // an absolute SELECT not in the image goes as it is
  EXPECT_TRUE(forwarded(vc.transmit(Bytes{0x00, 0xA4, 0x09, 0x04, 0x04, 0x3F, 0x00, 0x50, 0x00}, kT0)).empty());
}

TEST(VirtualCard, ASelectTheCardAnsweredMovesBothViews) {
  VirtualCard vc(image());
  const Bytes sel_odf = {0x00, 0xA4, 0x09, 0x04, 0x06, 0x3F, 0x00, 0x50, 0x00, 0x50, 0x31};
  EXPECT_TRUE(forwarded(vc.transmit(sel_odf, kT0)).empty());
  EXPECT_TRUE(vc.forwarded(sel_odf, {}, {}, Bytes{0x61, 0x20}));
  // the program's file is now the ODF, which the image does not hold: the card answers,
  // and needs no prelude (it is there already)
  EXPECT_TRUE(forwarded(vc.transmit(Bytes{0x00, 0xB0, 0x00, 0x00, 0x10}, kT0)).empty());
  // an image answer moves the program's view away; coming back needs the card's SELECT
  local(vc.transmit(kSelSn, kT0));
  EXPECT_EQ(forwarded(vc.transmit(Bytes{0x00, 0x20, 0x00, 0x01}, kT0)).size(), 1u);
}

}  // namespace
}  // namespace cardbridge::shim
