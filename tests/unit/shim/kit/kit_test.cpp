// The test kit's own checks must be able to fail: a kit whose contract checks never fire
// would make every ShimCore test pass for the wrong reason.
#include <string>
#include <vector>

#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include "cardbridge/protocol/codec.hpp"
#include "kit/rig.hpp"

namespace cardbridge::shim::kit {
namespace {

namespace pr = cardbridge::protocol;

pr::Message server_hello() {
  pr::Hello h;
  h.version_major = pr::kVersionMajor;
  h.role = pr::Role::kServer;
  h.instance = 1;
  return pr::Message{0, h};
}

TEST(ShimTestKit, RecordingEffectsReportsEveryBreachOfTheContract) {
  std::vector<std::string> breaches;
  RecordingEffects fx([&](const std::string& b) { breaches.push_back(b); });
  fx.send_to_client(1, {0x00});  // never opened
  fx.client_opened(2);
  fx.send_to_client(2, {});  // empty write
  fx.close_client(2);
  fx.send_to_client(2, {0x00});  // after the core closed it
  fx.close_client(2);            // twice
  fx.client_opened(3);
  fx.client_gone(3);
  fx.close_client(3);  // after it went away
  fx.client_opened(3);  // an id reused
  fx.send_to_desk(pr::encode_frame(server_hello()));  // desk transport down
  EXPECT_EQ(breaches.size(), 7u);
  fx.desk_transport_up();
  breaches.clear();
  fx.send_to_desk(pr::encode_frame(pr::Message{0, pr::Reply{}}));  // a desk's message
  auto bad_header = pr::encode_frame(server_hello());
  bad_header[3] ^= 1;
  fx.send_to_desk(bad_header);
  fx.send_to_desk({0, 0, 0, 0});  // no payload
  EXPECT_EQ(breaches.size(), 3u);
  fx.send_to_desk(pr::encode_frame(server_hello()));
  EXPECT_EQ(breaches.size(), 3u) << "a hello is what a server sends";
  EXPECT_EQ(fx.desk.size(), 2u) << "well-formed frames are recorded even when sent in breach";
}

TEST(ShimTestKit, ARigFailsTheTestOnABreach) {
  EXPECT_NONFATAL_FAILURE(
      {
        Rig r;
        r.fx.send_to_client(42, {0x01});
      },
      "effects contract");
}

TEST(ShimTestKit, TypedRepliesFailWhenTheStreamIsOutOfStep) {
  EXPECT_NONFATAL_FAILURE(
      {
        Rig r;
        auto c = r.raw_client();
        c.send_version(4, 4);
        c.send_version(4, 4);
        c.version_reply();  // two replies pending: the first is read, the second is extra
      },
      "out of step");
  EXPECT_NONFATAL_FAILURE(
      {
        Rig r;
        auto c = r.raw_client();
        c.establish_reply();  // nothing was asked
      },
      "wanted 12 reply bytes");
}

TEST(ShimTestKit, TheClientEncodesRequestsAsLibpcscliteDoes) {
  // [traced] pcsc-protocol.md §2.1/§2.3: VERSION {4, 4, 0} and the TRANSMIT header.
  EXPECT_EQ(hex(pcsclite::request(pcsclite::cmd::kVersion, pcsclite::version(4, 4))),
            "0c000000110000000400000004000000" "00000000");
  pcsclite::TransmitFields t;
  t.card = 0x4953d442;
  t.send_length = 7;
  EXPECT_EQ(hex(slice(pcsclite::request(pcsclite::cmd::kTransmit, pcsclite::transmit(t)), 0, 8)),
            "2000000009000000");
  EXPECT_EQ(pcsclite::connect(1, "R", 2, 3).size(), pcsclite::kConnectSize);
  EXPECT_EQ(pcsclite::get_attrib(1, 2).size(), pcsclite::kGetSetSize);
  EXPECT_EQ(expected_slot("R", 0, 0, 0, {}, 0).size(), kSlotSize);
}

}  // namespace
}  // namespace cardbridge::shim::kit
