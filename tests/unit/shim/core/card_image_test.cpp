// ShimCore and the desk's card image (docs/performance.md, "The card image"): the first
// Connect asks for it; SELECT and READ BINARY it holds are answered without the desk, byte
// for byte; what it cannot answer goes with the SELECT that puts the card back where the
// program is (a prelude, same round trip); a prelude the card answers otherwise, a card
// event, the desk voiding the image and a write command all drop it.
#include <cstdint>

#include <gtest/gtest.h>

#include "core/optimized_fixture.hpp"
#include "core/shim_core_test.hpp"

namespace cardbridge::shim::core_test {
namespace {

namespace rf = cardbridge::protocol::request_flags;

const Bytes kSelSn = {0x00, 0xA4, 0x09, 0x04, 0x04, 0x3F, 0x00, 0xD0, 0x03};
const Bytes kSelSnQuiet = {0x00, 0xA4, 0x09, 0x0C, 0x04, 0x3F, 0x00, 0xD0, 0x03};
const Bytes kFcp = {0x62, 0x09, 0x80, 0x02, 0x00, 0x0C, 0x82, 0x01, 0x01, 0x83, 0x00, 0x90, 0x00};
const Bytes kReadSn = {0x00, 0xB0, 0x00, 0x00, 0x0C};
const Bytes kSn = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
const Bytes kPinStatus = {0x00, 0x20, 0x00, 0x01};

pr::CardImage image(uint32_t event_count = 1) {
  pr::CardImage im;
  im.event_count = event_count;
  im.complete = true;
  im.send_protocol = kT0;
  im.recv_protocol = kT0;
  im.selects = {pr::ImageSelect{kSelSn, {0x61, 0x0B}, kFcp}, pr::ImageSelect{kSelSnQuiet, {0x90, 0x00}, {}}};
  im.files = {pr::ImageFile{Bytes{0x00, 'P', 0x3F, 0x00, 0xD0, 0x03}, kSn}};
  return im;
}

class ShimCoreImage : public ShimCoreOptimized {
 protected:
  // A Connect (T=0) that asks for the image; the desk sends |im|.
  uint32_t connect_with_image(PcscClient& c, std::optional<pr::CardImage> im = image()) {
    c.send_connect(kReaderA);
    auto [id, q] = rig.desk.expect(pr::Op::kConnect);
    EXPECT_TRUE(q.flags & rf::kWantImage) << "the session's first Connect asks for the image";
    pr::Reply r = ok_reply({}, kT0);
    r.handle = pr::DeskHandle{0xC0C};
    r.state = (1u << 16) | kReaderCardReady;
    r.card_protocol = kT0;
    r.image = std::move(im);
    rig.desk.reply(id, r);
    return c.connect_reply().card;
  }
  // A transmit (T=0) the shim must answer without the desk.
  Bytes local(PcscClient& c, uint32_t card, const Bytes& apdu) {
    const std::size_t before = rig.fx.desk.size();
    c.send_transmit(card, apdu, 258, kT0);
    auto r = c.transmit_reply();
    EXPECT_EQ(r.rv, kSuccess);
    EXPECT_EQ(rig.fx.desk.size(), before) << "the desk was asked";
    return r.data;
  }
  FakeDesk::Req forwarded(PcscClient& c, uint32_t card, const Bytes& apdu) {
    c.send_transmit(card, apdu, 258, kT0);
    return rig.desk.expect(pr::Op::kTransmit);
  }
};

TEST_F(ShimCoreImage, SelectGetResponseAndReadAreAnsweredFromTheImage) {
  auto c = rig.client();
  const uint32_t h = connect_with_image(c);
  ASSERT_NE(rig.core.card_image(0), nullptr);
  EXPECT_EQ(local(c, h, kSelSn), (Bytes{0x61, 0x0B}));
  EXPECT_EQ(local(c, h, Bytes{0x00, 0xC0, 0x00, 0x00, 0x0B}), kFcp);
  EXPECT_EQ(local(c, h, kReadSn), cat(kSn, kSw9000));
  EXPECT_EQ(rig.core.stats().image_answers, 3u);
  // a second Connect of the session does not ask again: the image is complete
  auto c2 = rig.client();
  c2.send_connect(kReaderA);
  auto [id, q] = rig.desk.expect(pr::Op::kConnect);
  EXPECT_FALSE(q.flags & rf::kWantImage);
}

TEST_F(ShimCoreImage, TheFirstCommandItCannotAnswerCarriesTheSelectThatPutsTheCardBack) {
  auto c = rig.client();
  const uint32_t h = connect_with_image(c);
  local(c, h, kSelSn);
  auto req = forwarded(c, h, kPinStatus);
  EXPECT_EQ(req.q.data, kPinStatus);
  ASSERT_EQ(req.q.prelude.size(), 1u);
  EXPECT_EQ(req.q.prelude[0], kSelSnQuiet);
  pr::Reply r = ok_reply({0x63, 0xC3}, kT0);
  r.prelude_answers = {{0x90, 0x00}};
  rig.desk.reply(req.id, r);
  EXPECT_EQ(c.transmit_reply().data, (Bytes{0x63, 0xC3}));
  // the card is where the program is now: no prelude for the next one
  auto again = forwarded(c, h, kPinStatus);
  EXPECT_TRUE(again.q.prelude.empty());
  EXPECT_NE(rig.core.card_image(0), nullptr);
}

TEST_F(ShimCoreImage, APreludeTheCardAnswersOtherwiseDropsTheImageAndTheCommandGoesAgain) {
  auto c = rig.client();
  const uint32_t h = connect_with_image(c);
  local(c, h, kSelSn);
  auto req = forwarded(c, h, kPinStatus);
  ASSERT_EQ(req.q.prelude.size(), 1u);
  pr::Reply r = ok_reply({}, kT0);
  r.prelude_answers = {{0x6A, 0x82}};  // not the card the image was read from
  rig.desk.reply(req.id, r);
  EXPECT_EQ(rig.core.card_image(0), nullptr);
  EXPECT_EQ(rig.core.stats().images_dropped, 1u);
  auto retry = rig.desk.expect(pr::Op::kTransmit);
  EXPECT_EQ(retry.q.data, kPinStatus);
  EXPECT_TRUE(retry.q.prelude.empty());
  rig.desk.reply(retry.id, ok_reply({0x6A, 0x88}, kT0));
  EXPECT_EQ(c.transmit_reply().data, (Bytes{0x6A, 0x88})) << "the program gets the card's own answer";
}

TEST_F(ShimCoreImage, AWriteCommandDropsTheImage) {
  auto c = rig.client();
  const uint32_t h = connect_with_image(c);
  local(c, h, kSelSn);
  auto req = forwarded(c, h, Bytes{0x00, 0xD6, 0x00, 0x00, 0x01, 0x42});
  EXPECT_EQ(req.q.prelude.size(), 1u) << "the write happens in the file the program selected";
  EXPECT_EQ(rig.core.card_image(0), nullptr);
}

TEST_F(ShimCoreImage, ACardEventOrTheDeskVoidingItDropsTheImage) {
  auto c = rig.client();
  connect_with_image(c);
  ASSERT_NE(rig.core.card_image(0), nullptr);
  auto a = card_in(kReaderA, 1);
  a.image = pr::image_state::kComplete;
  rig.desk.push({a, empty_reader(kReaderB)});
  EXPECT_NE(rig.core.card_image(0), nullptr);
  a.image = pr::image_state::kNone;  // the desk saw a write, or EF_ACTUA changed
  rig.desk.push({a, empty_reader(kReaderB)});
  EXPECT_EQ(rig.core.card_image(0), nullptr);

  auto c2 = rig.client();
  connect_with_image(c2);
  ASSERT_NE(rig.core.card_image(0), nullptr);
  rig.desk.push({card_in(kReaderA, 3), empty_reader(kReaderB)});  // removed and inserted again
  EXPECT_EQ(rig.core.card_image(0), nullptr);
}

TEST_F(ShimCoreImage, AnImageOfAnotherInsertionIsIgnored) {
  auto c = rig.client();
  const uint32_t h = connect_with_image(c, image(/*event_count=*/7));
  EXPECT_EQ(rig.core.card_image(0), nullptr);
  EXPECT_EQ(forwarded(c, h, kSelSn).q.data, kSelSn);
}

}  // namespace
}  // namespace cardbridge::shim::core_test
