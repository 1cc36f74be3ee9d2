// ShimCore in per-call mode (ShimConfig::one_round_trip_per_call, the benchmark baseline):
// every PC/SC call the shim would answer by itself costs one desk round trip first
// (EstablishContext makes the desk's context, the others a Ping), and the answers stay
// those of the normal mode.
#include <cstdint>

#include <gtest/gtest.h>

#include "core/shim_core_test.hpp"

namespace cardbridge::shim::core_test {
namespace {

TEST(ShimCorePerCall, LocalCallsCostOneRoundTripEach) {
  Rig r(kStandardDesk, per_call_config());
  auto c = r.raw_client();
  c.version(4, 4);
  EXPECT_TRUE(r.desk.idle()) << "CMD_VERSION stays local";
  const auto rt0 = r.core.stats().round_trips;

  c.send_establish(kScopeSystem);
  EXPECT_TRUE(c.nothing_pending());
  auto est = r.desk.expect(pr::Op::kEstablishContext);
  EXPECT_EQ(est.q.code, kScopeSystem);
  EXPECT_TRUE(r.desk.idle());
  r.desk.reply(est.id, {});
  auto e = c.establish_reply();
  EXPECT_EQ(e.rv, kSuccess);
  EXPECT_NE(e.context, 0u);
  EXPECT_EQ(r.core.stats().round_trips, rt0 + 1);

  c.send_cmd(cmd::kGetReadersState);
  EXPECT_TRUE(c.nothing_pending());
  r.desk.answer_next(pr::Op::kPing);
  EXPECT_TRUE(r.desk.idle());
  auto array = c.take(kArraySize);
  EXPECT_EQ(entry(array, 0).name, kReaderA);
  EXPECT_EQ(r.core.stats().round_trips, rt0 + 2);

  c.send_cmd(cmd::kWait);
  EXPECT_TRUE(c.nothing_pending());
  r.desk.answer_next(pr::Op::kPing);
  EXPECT_EQ(c.take(kArraySize), array);
  EXPECT_EQ(r.core.stats().round_trips, rt0 + 3);
  r.desk.push({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  EXPECT_EQ(c.take_all(), signal_bytes(kSuccess)) << "registered once the ping came back";

  c.send_release(e.context);
  EXPECT_TRUE(c.nothing_pending());
  r.desk.answer_next(pr::Op::kPing);  // the round trip is charged first, then the release is done
  EXPECT_EQ(c.take_all(), Bytes(Le().u32(e.context).u32(kSuccess)));
  r.desk.expect(pr::Op::kReleaseContext);  // the desk context goes, nobody waits for it
  EXPECT_EQ(r.core.stats().round_trips, rt0 + 4);
  EXPECT_TRUE(r.desk.idle());
}

TEST(ShimCorePerCall, StatusAndListReadersCostOnePingEachAndAnswerAsTheNormalMode) {
  struct Answers {
    Bytes status_array, status, list_array;
    uint64_t status_round_trips = 0, list_round_trips = 0;
  };
  auto run = [](bool per_call) {
    Answers out;
    Rig r(kStandardDesk, per_call ? per_call_config() : rig_config());
    auto [c, card] = r.connected_client();
    r.desk.log.clear();
    // SCardStatus: CMD_GET_READERS_STATE then STATUS [traced].
    auto rt0 = r.core.stats().round_trips;
    c.send_cmd(cmd::kGetReadersState);
    if (per_call) {
      EXPECT_TRUE(c.nothing_pending()) << "waits for the desk";
      auto ping = r.desk.expect(pr::Op::kPing);
      EXPECT_TRUE(r.desk.idle());
      r.desk.reply(ping.id, {});
    }
    out.status_array = c.take(kArraySize);
    EXPECT_TRUE(c.nothing_pending());
    c.send_status(card);
    EXPECT_TRUE(r.desk.idle()) << "STATUS itself needs no second round trip";
    out.status = c.take(8);
    EXPECT_TRUE(c.nothing_pending());
    out.status_round_trips = r.core.stats().round_trips - rt0;
    // SCardListReaders: CMD_GET_READERS_STATE.
    rt0 = r.core.stats().round_trips;
    c.send_cmd(cmd::kGetReadersState);
    r.desk.serve();
    out.list_array = c.take(kArraySize);
    EXPECT_TRUE(c.nothing_pending());
    out.list_round_trips = r.core.stats().round_trips - rt0;
    if (per_call) {
      EXPECT_EQ(r.desk.log.size(), 2u);
      for (const auto& q : r.desk.log) EXPECT_EQ(q.q.op, pr::Op::kPing);
    }
    return out;
  };
  const Answers fast = run(false);
  const Answers slow = run(true);
  EXPECT_EQ(fast.status_round_trips, 0u);
  EXPECT_EQ(fast.list_round_trips, 0u);
  EXPECT_EQ(slow.status_round_trips, 1u);
  EXPECT_EQ(slow.list_round_trips, 1u);
  EXPECT_EQ(slow.status_array, fast.status_array);
  EXPECT_EQ(slow.status, fast.status);
  EXPECT_EQ(slow.list_array, fast.list_array);
  EXPECT_EQ(le32(slow.status, 4), kSuccess);
  EXPECT_EQ(entry(slow.list_array, 0).sharing, 1);
}

// A 2.5 client (protocol 4.6) reads the array with CMD_GET_READERS_STATE_SIZE +
// CMD_GET_READERS_STATE_ARRAY instead of CMD_GET_READERS_STATE (winscard_clnt.c@2.5.1
// getReaderStates). Per-call mode must charge SCardStatus and SCardListReaders one round
// trip for it too, and GetStatusChange (WAIT + SIZE + ARRAY) still one.
TEST(ShimCorePerCall, A46ClientsStatusListReadersAndWaitCostOnePingEach) {
  Rig r(per_call_config());
  r.desk_up({card_in(kReaderA, 1)}, pr::caps::kReaderPush);
  auto c = r.client(6);
  const uint32_t card = r.connect(c);
  const Bytes expected_array = r.array();
  r.desk.log.clear();
  auto read_array = [&] {
    EXPECT_EQ(c.state_size(), 16);
    c.send_cmd(cmd::kStateArray);
    r.desk.serve();
    Bytes a = c.take(kArraySize);
    EXPECT_TRUE(c.nothing_pending());
    return a;
  };
  // SCardStatus: SIZE, ARRAY, STATUS.
  auto rt0 = r.core.stats().round_trips;
  EXPECT_EQ(read_array(), expected_array);
  EXPECT_EQ(c.status(card), kSuccess);
  EXPECT_EQ(r.core.stats().round_trips - rt0, 1u) << "SCardStatus of a 4.6 client";
  // SCardListReaders: SIZE, ARRAY.
  rt0 = r.core.stats().round_trips;
  EXPECT_EQ(read_array(), expected_array);
  EXPECT_EQ(r.core.stats().round_trips - rt0, 1u) << "SCardListReaders of a 4.6 client";
  // SCardGetStatusChange: WAIT, SIZE, ARRAY.
  rt0 = r.core.stats().round_trips;
  c.send_cmd(cmd::kWait);
  r.desk.serve();
  EXPECT_TRUE(c.nothing_pending());
  EXPECT_EQ(read_array(), expected_array);
  EXPECT_EQ(r.core.stats().round_trips - rt0, 1u) << "SCardGetStatusChange of a 4.6 client";
  std::size_t pings = 0;
  for (const auto& q : r.desk.log) {
    if (q.q.op == pr::Op::kReleaseContext) continue;  // a bystander of r.array() going away
    EXPECT_EQ(q.q.op, pr::Op::kPing);
    ++pings;
  }
  EXPECT_EQ(pings, 3u);
}

}  // namespace
}  // namespace cardbridge::shim::core_test
