// ShimCore, byte for byte: what an unmodified libpcsclite client (1.9.9 = protocol 4.4,
// 2.3 = 4.5, 2.5 = 4.6) sends and reads, against the desk end of cardbridge.v1.
//
// The expected behaviour is pcscd's, as /work/shared/docs/pcsc-protocol.md describes it
// (cited as §n). Requests are written field by field by PcscClientSim; replies are read
// with the exact length the real client reads, so that an extra or missing byte (a stream
// out of step) fails the test that caused it.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/messages.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/scard.hpp"
#include "core/shim_core.hpp"
#include "fake_desk.hpp"
#include "fake_effects.hpp"
#include "pcsc_client_sim.hpp"

namespace cardbridge::shim {
namespace {

using namespace std::chrono_literals;
using testkit::Bytes;
using testkit::ConnectReply;
using testkit::kArrayBytes;
using testkit::kAtr;
using testkit::kSlotBytes;
using testkit::Le;
using testkit::PcscClientSim;
using testkit::reader_card;
using testkit::reader_empty;
using testkit::slice;
using testkit::slot_bytes;
namespace op = testkit::op;
namespace pr = cardbridge::protocol;
namespace sc = cardbridge::scard;

constexpr uint32_t kSuccess = 0x00000000;
constexpr uint32_t kCancelled = 0x80100002;
constexpr uint32_t kInvalidHandle = 0x80100003;
constexpr uint32_t kInsufficientBuffer = 0x80100008;
constexpr uint32_t kUnknownReader = 0x80100009;
constexpr uint32_t kSharingViolation = 0x8010000B;
constexpr uint32_t kInvalidValue = 0x80100011;
constexpr uint32_t kReaderUnavailable = 0x80100017;
constexpr uint32_t kServiceStopped = 0x8010001E;
constexpr uint32_t kUnsupportedFeature = 0x8010001F;
constexpr uint32_t kWResetCard = 0x80100068;
constexpr uint32_t kWRemovedCard = 0x80100069;

constexpr uint32_t kShareExclusive = 1, kShareShared = 2;
constexpr uint32_t kLeave = 0, kReset = 1;
constexpr uint32_t kT0 = 1, kT1 = 2;

const Bytes kZeroArray(kArrayBytes, 0);
const Bytes kSignal = Le().u32(0).u32(0);                    // event signal / STOP reply {0, 0}
const Bytes kCancelSignal = Le().u32(0).u32(0x80100002);     // [traced] 00000000 02001080
const Bytes kSelectMf = {0x00, 0xA4, 0x00, 0x00, 0x02, 0x3F, 0x00};  // testpcsc step 8

const std::string kReaderA = "Virtual PCD 00 00";
const std::string kReaderB = "Virtual PCD 00 01";

// The shim logs every event; keep the test output readable (SHIM_TEST_LOG=debug to see it).
class QuietLogs : public ::testing::Environment {
 public:
  void SetUp() override {
    const char* level = std::getenv("SHIM_TEST_LOG");
    auto parsed = log::parse_level(level ? level : "off");
    log::init(parsed.value_or(spdlog::level::off), "shim_core_tests");
  }
};
[[maybe_unused]] ::testing::Environment* const kQuietLogs = ::testing::AddGlobalTestEnvironment(new QuietLogs);

ShimConfig test_config(bool per_call = false) {
  ShimConfig c;
  c.server_name = "shim-under-test";
  c.capabilities = pr::caps::kReaderPush;
  c.random_seed = 0x5EED1234;
  c.one_round_trip_per_call = per_call;
  return c;
}

// One shim, its effects, a desk and a clock.
struct Rig {
  explicit Rig(ShimConfig cfg = test_config()) : core(fx, std::move(cfg)), desk(core, fx, now) {}

  Clock::time_point now = Clock::time_point(1h);
  testkit::FakeEffects fx;
  ShimCore core;
  testkit::FakeDesk desk;
  ClientId next_id = 1;

  PcscClientSim open() {
    PcscClientSim c(core, fx, next_id++, &now);
    c.open();
    return c;
  }
  // SCardEstablishContext: CMD_VERSION {4, minor} then ESTABLISH_CONTEXT.
  PcscClientSim client(int32_t minor = 4) {
    auto c = open();
    auto v = c.version(4, minor);
    EXPECT_EQ(v.rv, kSuccess);
    c.send_establish(sc::kScopeSystem);
    desk.serve();  // per-call mode asks the desk
    auto e = c.establish_reply();
    EXPECT_EQ(e.rv, kSuccess);
    c.context = e.context;
    return c;
  }
  void up(std::vector<pr::ReaderInfo> readers) {
    desk.up();
    desk.push(std::move(readers));
  }
  ConnectReply connect(PcscClientSim& c, const std::string& reader, uint32_t share = kShareShared,
                       uint32_t protocols = kT0 | kT1) {
    c.send_connect(c.context, reader, share, protocols);
    desk.serve();
    return c.connect_reply();
  }
  int32_t card(PcscClientSim& c, const std::string& reader, uint32_t share = kShareShared) {
    auto r = connect(c, reader, share);
    EXPECT_EQ(r.rv, kSuccess);
    EXPECT_NE(r.card, 0);
    return r.card;
  }
  // SCardListReaders as a bystander sees it.
  // (Per-call mode: the desk answers the Ping it costs; elsewhere the desk is left alone,
  // so that requests a test holds in flight stay unanswered.)
  Bytes array() {
    auto c = open();
    c.send_cmd(op::kGetReadersState);
    if (core.config().one_round_trip_per_call) desk.serve();
    auto a = c.take_exact(kArrayBytes, "CMD_GET_READERS_STATE");
    c.close();
    return a;
  }
  // Registers |c| for events (protocol 4.4/4.5: the array comes back at once).
  void wait(PcscClientSim& c) {
    c.send_cmd(op::kWait);
    EXPECT_EQ(c.take().size(), kArrayBytes) << "WAIT answered with the array";
  }
};

// =====================================================================================
// CMD_VERSION (§2.3, §4)

TEST(ShimCoreVersion, Accepts44_45_46AndEchoesTheClientsMinor) {
  Rig r;
  for (int32_t minor : {4, 5, 6}) {
    auto c = r.open();
    c.send_version(4, minor);
    EXPECT_EQ(c.take(), Bytes(Le().i32(4).i32(minor).u32(kSuccess))) << "minor " << minor;
    EXPECT_FALSE(c.closed());
  }
  // [traced] 1.9.9: request 04000000 04000000 00000000, reply identical.
  auto c = r.open();
  c.send_raw(Le().u32(12).u32(0x11).get());
  c.send_raw(Le().u32(4).u32(4).u32(0).get());
  EXPECT_EQ(testkit::hex(c.take()), "040000000400000000000000");
}

TEST(ShimCoreVersion, TooOldOrOtherMajorGetsServiceStoppedWithTheServersVersion) {
  Rig r;
  const std::vector<std::pair<int32_t, int32_t>> refused = {{4, 3}, {4, 0}, {3, 4}, {3, 0}, {5, 6}, {0, 0}};
  for (auto [major, minor] : refused) {
    auto c = r.open();
    auto v = c.version(major, minor);
    EXPECT_EQ(v.rv, kServiceStopped) << major << "." << minor;
    // The server's own version: major 4 and a minor the shim serves (4.4 as 1.9.9, or 4.6 as 2.5).
    EXPECT_EQ(v.major, 4) << major << "." << minor;
    EXPECT_TRUE(v.minor >= 4 && v.minor <= 6) << major << "." << minor << " -> minor " << v.minor;
    EXPECT_FALSE(c.closed()) << "pcscd leaves the connection open; the client closes it";
  }
}

TEST(ShimCoreVersion, NewerMinorGetsServer46AndTheClientCanFallBackOnTheSameSocket) {
  Rig r;
  auto c = r.open();
  c.send_version(4, 7);
  EXPECT_EQ(c.take(), Bytes(Le().i32(4).i32(6).u32(kServiceStopped)));
  EXPECT_FALSE(c.closed());
  // 2.4.1+ clients send CMD_VERSION again with the server's {major, minor} (§4).
  c.send_version(4, 6);
  EXPECT_EQ(c.take(), Bytes(Le().i32(4).i32(6).u32(kSuccess)));
  auto e = c.establish();
  EXPECT_EQ(e.rv, kSuccess);
  // ... and it is served as a 4.6 client: WAIT sends nothing.
  c.send_cmd(op::kWait);
  EXPECT_TRUE(c.nothing_pending());
}

// =====================================================================================
// Contexts (§2.3 ESTABLISH/RELEASE, §1.2, §5.1)

TEST(ShimCoreContext, EstablishScopes0To3Succeed) {
  Rig r;
  for (uint32_t scope = 0; scope <= 3; ++scope) {
    auto c = r.open();
    c.version(4, 4);
    c.send_establish(scope);
    Bytes b = c.take_exact(12, "ESTABLISH");
    EXPECT_EQ(testkit::rd32(b, 0), scope) << "dwScope echoed";
    EXPECT_NE(testkit::rd32(b, 4), 0u);
    EXPECT_EQ(testkit::rd32(b, 8), kSuccess);
  }
}

TEST(ShimCoreContext, EstablishScope4IsInvalidValue) {
  Rig r;
  auto c = r.open();
  c.version(4, 4);
  c.send_establish(4);
  EXPECT_EQ(c.take(), Bytes(Le().u32(4).u32(0).u32(kInvalidValue)));
  EXPECT_FALSE(c.closed());
}

TEST(ShimCoreContext, ContextsArePositive31BitNonZeroAndUniqueAcrossConnections) {
  Rig r;
  std::set<uint32_t> seen;
  for (int i = 0; i < 150; ++i) {
    auto c = r.client();
    EXPECT_NE(c.context, 0u);
    EXPECT_LE(c.context, 0x7FFFFFFFu) << "SYS_RandomInt() & 0x7FFFFFFF";
    EXPECT_TRUE(seen.insert(c.context).second) << "duplicate hContext 0x" << std::hex << c.context;
  }
}

TEST(ShimCoreContext, RepeatedEstablishOnOneConnectionReplacesTheContext) {
  Rig r;
  r.up({reader_card(kReaderA)});
  auto c = r.client();
  const uint32_t first = c.context;
  auto again = c.establish();
  ASSERT_EQ(again.rv, kSuccess);
  const uint32_t second = again.context;
  EXPECT_NE(second, 0u);
  EXPECT_NE(second, first);
  // The old context is gone: CONNECT and RELEASE with it fail, CANCEL no longer finds it.
  c.send_connect(first, kReaderA, kShareShared, kT0 | kT1);
  EXPECT_EQ(c.connect_reply().rv, kInvalidValue);
  EXPECT_EQ(r.desk.queued_requests(), 0u);
  auto canceller = r.open();
  EXPECT_EQ(canceller.cancel(first), kInvalidHandle);
  EXPECT_EQ(c.release(first), kInvalidValue);
  // The new one works.
  auto cr = r.connect(c, kReaderA);
  EXPECT_EQ(cr.context, second);
  EXPECT_EQ(cr.rv, kSuccess);
  EXPECT_EQ(c.release(second), kSuccess);
}

TEST(ShimCoreContext, ReleaseWithAnotherContextIsInvalidValue) {
  Rig r;
  auto c = r.client();
  EXPECT_EQ(c.release(c.context + 1), kInvalidValue);
  EXPECT_EQ(c.release(0), kInvalidValue);
  EXPECT_FALSE(c.closed());
  EXPECT_EQ(c.release(c.context), kSuccess);
  EXPECT_EQ(c.release(c.context), kInvalidValue) << "already released";
  EXPECT_FALSE(c.closed());
}

// =====================================================================================
// The reader-state array (§3.1, CMD_GET_READERS_STATE §2.3)

TEST(ShimCoreArray, BeforeTheDeskIsUpTheArrayIs2944ZeroBytes) {
  Rig r;
  auto c = r.client();
  EXPECT_EQ(c.readers_state(), kZeroArray);
  // Transport up, hello sent, desk silent: still no readers.
  r.core.desk_connected(r.now);
  EXPECT_EQ(c.readers_state(), kZeroArray);
  // Desk established, no snapshot yet: still none.
  r.desk.hello(r.desk.instance, false);
  EXPECT_EQ(c.readers_state(), kZeroArray);
}

TEST(ShimCoreArray, SnapshotGivesNamesCountersStateBitsAndAtr) {
  Rig r;
  r.up({reader_empty("Alpha Reader 00 00", 0), reader_card("Beta Reader 01 00", 3)});
  auto a = r.array();
  ASSERT_EQ(a.size(), kArrayBytes);
  // EMPTY -> SCARD_ABSENT 0x02; PRESENT with an ATR -> PRESENT|POWERED|NEGOTIABLE 0x34.
  EXPECT_EQ(slice(a, 0, kSlotBytes), slot_bytes("Alpha Reader 00 00", 0, 0x02, 0, {}, 0));
  EXPECT_EQ(slice(a, kSlotBytes, kSlotBytes), slot_bytes("Beta Reader 01 00", 3, 0x34, 0, kAtr, 0));
  EXPECT_EQ(slice(a, 2 * kSlotBytes, kArrayBytes - 2 * kSlotBytes), Bytes(kArrayBytes - 2 * kSlotBytes, 0));
  // The card goes: counter and state follow, the ATR is cleared.
  r.desk.push({reader_empty("Alpha Reader 00 00", 0), reader_empty("Beta Reader 01 00", 4)});
  a = r.array();
  EXPECT_EQ(slice(a, kSlotBytes, kSlotBytes), slot_bytes("Beta Reader 01 00", 4, 0x02, 0, {}, 0));
}

TEST(ShimCoreArray, ReadersKeepTheirSlotAndNewOnesTakeTheFirstFreeSlot) {
  Rig r;
  r.up({reader_empty("A 00 00"), reader_empty("B 00 00"), reader_empty("C 00 00")});
  auto names = [&] {
    std::vector<std::string> out;
    for (const auto& s : testkit::parse_array(r.array())) out.push_back(s.name);
    out.resize(5);
    return out;
  };
  using V = std::vector<std::string>;
  EXPECT_EQ(names(), (V{"A 00 00", "B 00 00", "C 00 00", "", ""}));
  r.desk.push({reader_empty("A 00 00"), reader_empty("C 00 00")});  // B unplugged
  EXPECT_EQ(names(), (V{"A 00 00", "", "C 00 00", "", ""}));
  auto a = r.array();
  EXPECT_EQ(slice(a, kSlotBytes, kSlotBytes), Bytes(kSlotBytes, 0)) << "a removed reader's slot is zeroed";
  r.desk.push({reader_empty("D 00 00"), reader_empty("A 00 00"), reader_empty("C 00 00")});  // D plugged
  EXPECT_EQ(names(), (V{"A 00 00", "D 00 00", "C 00 00", "", ""}));
  // Order in the snapshot and card events do not move anybody.
  r.desk.push({reader_card("C 00 00", 1), reader_empty("A 00 00"), reader_empty("D 00 00"),
               reader_empty("E 00 00")});
  EXPECT_EQ(names(), (V{"A 00 00", "D 00 00", "C 00 00", "E 00 00", ""}));
  auto slots = testkit::parse_array(r.array());
  EXPECT_EQ(slots[2].reader_state, 0x34u);
  EXPECT_EQ(slots[2].atr(), kAtr);
}

// =====================================================================================
// Event wait, protocol 4.4 (§2.3 0x13/0x14, §2.6)

TEST(ShimCoreWait44, WaitRegistersAndAnswersWithTheArrayAtOnce) {
  Rig r;
  r.up({reader_empty(kReaderA)});
  auto c = r.client(4);
  c.send_cmd(op::kWait);
  auto a = c.take();
  EXPECT_EQ(a, r.array()) << "WAIT answers the current 2944-byte array, nothing else";
  // Registered: the next change signals it.
  r.desk.push({reader_card(kReaderA, 1)});
  EXPECT_EQ(c.take(), kSignal);
}

TEST(ShimCoreWait44, AChangeSignalsEveryRegisteredClientOnceAndUnregistersThem) {
  Rig r;
  r.up({reader_empty(kReaderA)});
  auto a = r.client(4);
  auto b = r.client(5);
  auto idle = r.client(4);
  r.wait(a);
  r.wait(b);
  r.desk.push({reader_card(kReaderA, 1)});  // card inserted
  EXPECT_EQ(a.take(), kSignal);
  EXPECT_EQ(b.take(), kSignal);
  EXPECT_TRUE(idle.nothing_pending());
  // The array was updated before the signal: the re-WAIT shows the card.
  a.send_cmd(op::kWait);
  auto arr = testkit::parse_array(a.take());
  ASSERT_FALSE(arr.empty());
  EXPECT_EQ(arr[0].reader_state, 0x34u);
  EXPECT_EQ(arr[0].event_counter, 1u);
  // b is no longer registered: the next change signals a only.
  r.desk.push({reader_empty(kReaderA, 2)});
  EXPECT_EQ(a.take(), kSignal);
  EXPECT_TRUE(b.nothing_pending());
  EXPECT_TRUE(idle.nothing_pending());
}

TEST(ShimCoreWait44, StopWhileRegisteredRepliesZeroZero) {
  Rig r;
  r.up({reader_empty(kReaderA)});
  auto c = r.client(4);
  r.wait(c);
  c.send_cmd(op::kStopWait);
  EXPECT_EQ(c.take(), kSignal) << "{timeOut 0, rv 0}";
  r.desk.push({reader_card(kReaderA, 1)});
  EXPECT_TRUE(c.nothing_pending()) << "unregistered by STOP";
}

TEST(ShimCoreWait44, StopAfterTheSignalSendsNothing) {
  Rig r;
  r.up({reader_empty(kReaderA)});
  auto c = r.client(4);
  r.wait(c);
  r.desk.push({reader_card(kReaderA, 1)});
  EXPECT_EQ(c.take(), kSignal);
  c.send_cmd(op::kStopWait);
  EXPECT_TRUE(c.nothing_pending()) << "the signal already sent is read as the STOP reply";
  // In step: the next request gets exactly its own answer.
  EXPECT_EQ(c.readers_state().size(), kArrayBytes);
}

TEST(ShimCoreWait44, ASnapshotThatChangesNothingSendsNoSignal) {
  Rig r;
  r.up({reader_card(kReaderA, 1), reader_empty(kReaderB)});
  auto c = r.client(4);
  r.wait(c);
  r.desk.push({reader_card(kReaderA, 1), reader_empty(kReaderB)});  // same content, new sequence
  r.desk.push({reader_empty(kReaderB), reader_card(kReaderA, 1)});  // other order
  EXPECT_TRUE(c.nothing_pending());
  c.send_cmd(op::kStopWait);
  EXPECT_EQ(c.take(), kSignal) << "still registered";
}

// =====================================================================================
// Protocol 4.5: CMD_GET_READER_EVENTS (§2.3, §4)

TEST(ShimCoreProtocol45, ReaderEventsStartsAtOneAndCountsReaderAddRemoveNotCards) {
  Rig r;
  auto c = r.client(5);
  EXPECT_EQ(c.reader_events(), (std::pair<uint32_t, uint32_t>{1, kSuccess}));
  r.desk.up();
  EXPECT_EQ(c.reader_events().first, 1u) << "no reader yet";
  r.desk.push({reader_empty(kReaderA)});
  const uint32_t one_reader = c.reader_events().first;
  EXPECT_EQ(one_reader, 2u) << "+1 for the reader added";
  r.desk.push({reader_card(kReaderA, 1)});
  r.desk.push({reader_empty(kReaderA, 2)});
  EXPECT_EQ(c.reader_events().first, one_reader) << "card insert/remove does not count";
  r.desk.push({reader_empty(kReaderA, 2), reader_empty(kReaderB)});
  const uint32_t two_readers = c.reader_events().first;
  EXPECT_GT(two_readers, one_reader) << "reader added";
  r.desk.push({reader_empty(kReaderB)});
  const uint32_t removed = c.reader_events().first;
  EXPECT_GT(removed, two_readers) << "reader removed";
  auto [events, rv] = c.reader_events();
  EXPECT_EQ(events, removed);
  EXPECT_EQ(rv, kSuccess);
  // A 4.5 client still gets the array with WAIT.
  c.send_cmd(op::kWait);
  EXPECT_EQ(c.take().size(), kArrayBytes);
}

TEST(ShimCoreProtocol45, GetReaderEventsFromA44ClientClosesTheConnection) {
  Rig r;
  auto old = r.client(4);
  auto other = r.client(5);
  const auto errors = r.core.stats().protocol_errors;
  old.send_cmd(op::kGetReaderEvents);
  EXPECT_TRUE(old.closed());
  EXPECT_TRUE(old.nothing_pending());
  EXPECT_EQ(r.core.stats().protocol_errors, errors + 1);
  EXPECT_FALSE(other.closed());
  EXPECT_EQ(other.reader_events().second, kSuccess);
}

// =====================================================================================
// Protocol 4.6: WAIT without data, 0x16/0x17 (§2.3, §4 "What the shim should do" 3)

TEST(ShimCoreProtocol46, WaitSendsNothingSizeIs16AndArrayIs16Slots) {
  Rig r;
  r.up({reader_card(kReaderA, 1)});
  auto c = r.client(6);
  c.send_cmd(op::kWait);
  EXPECT_TRUE(c.nothing_pending()) << "4.6: WAIT only registers";
  c.send_cmd(op::kStateSize);
  EXPECT_EQ(c.take(), Bytes(Le().i32(16)));
  c.send_cmd(op::kStateArray);
  EXPECT_EQ(c.take(), r.array()) << "16 x 184 bytes";
  r.desk.push({reader_empty(kReaderA, 2)});
  EXPECT_EQ(c.take(), kSignal);
}

TEST(ShimCoreProtocol46, ASignalBetweenWaitAndArrayIsHeldUntilRightAfterTheArray) {
  Rig r;
  r.up({reader_empty(kReaderA)});
  auto c = r.client(6);
  c.send_cmd(op::kWait);
  r.desk.push({reader_card(kReaderA, 1)});  // the change falls between WAIT and SIZE
  EXPECT_TRUE(c.nothing_pending()) << "the signal would be read as the array size";
  c.send_cmd(op::kStateSize);
  EXPECT_EQ(c.take(), Bytes(Le().i32(16))) << "exactly the size, no signal yet";
  c.send_cmd(op::kStateArray);
  Bytes out = c.take();
  ASSERT_EQ(out.size(), kArrayBytes + 8) << "the array, then the held signal";
  EXPECT_EQ(slice(out, 0, kArrayBytes), r.array()) << "the array is the new one";
  EXPECT_EQ(slice(out, kArrayBytes, 8), kSignal);
  // Delivered means unregistered.
  r.desk.push({reader_empty(kReaderA, 2)});
  EXPECT_TRUE(c.nothing_pending());
}

// =====================================================================================
// SCARD_CANCEL on its own connection (§1.2, §2.3, §5.5)

TEST(ShimCoreCancel, CancelOfAWaitingContextSignalsTheTargetAndSucceeds) {
  Rig r;
  r.up({reader_empty(kReaderA)});
  auto target = r.client(4);
  r.wait(target);
  auto canceller = r.open();  // no CMD_VERSION first [traced]
  canceller.send_cancel(target.context);
  EXPECT_EQ(canceller.take(), Bytes(Le().u32(target.context).u32(kSuccess)));
  EXPECT_EQ(target.take(), kCancelSignal);
  EXPECT_FALSE(canceller.closed());
  canceller.close();
  // Unregistered: a later change sends nothing more.
  r.desk.push({reader_card(kReaderA, 1)});
  EXPECT_TRUE(target.nothing_pending());
  // The target's stream is in step.
  EXPECT_EQ(target.readers_state().size(), kArrayBytes);
}

TEST(ShimCoreCancel, TargetNotWaiting44IsInvalidHandleAnd45PlusIsSuccess) {
  Rig r;
  auto t44 = r.client(4);
  auto t45 = r.client(5);
  auto t46 = r.client(6);
  EXPECT_EQ(r.open().cancel(t44.context), kInvalidHandle);
  EXPECT_EQ(r.open().cancel(t45.context), kSuccess);
  EXPECT_EQ(r.open().cancel(t46.context), kSuccess);
  EXPECT_TRUE(t44.nothing_pending());
  EXPECT_TRUE(t45.nothing_pending());
  EXPECT_TRUE(t46.nothing_pending());
  // STOP after a WAIT that was not cancelled still gets its {0,0}.
  r.wait(t45);
  t45.send_cmd(op::kStopWait);
  EXPECT_EQ(t45.take(), kSignal);
}

TEST(ShimCoreCancel, UnknownContextIsInvalidHandle) {
  Rig r;
  auto c = r.client(4);
  auto canceller = r.open();
  EXPECT_EQ(canceller.cancel(c.context ^ 0x1234), kInvalidHandle);
  EXPECT_EQ(r.open().cancel(0), kInvalidHandle);
  EXPECT_TRUE(c.nothing_pending());
}

TEST(ShimCoreCancel, CancelOfA46WaiterBeforeItsArrayComesAfterTheArray) {
  Rig r;
  r.up({reader_empty(kReaderA)});
  auto t = r.client(6);
  t.send_cmd(op::kWait);
  EXPECT_EQ(r.open().cancel(t.context), kSuccess);
  EXPECT_TRUE(t.nothing_pending());
  t.send_cmd(op::kStateSize);
  EXPECT_EQ(t.take(), Bytes(Le().i32(16)));
  t.send_cmd(op::kStateArray);
  Bytes out = t.take();
  ASSERT_EQ(out.size(), kArrayBytes + 8);
  EXPECT_EQ(slice(out, kArrayBytes, 8), kCancelSignal);
}

// =====================================================================================
// SCARD_CONNECT (§2.3, §5.1, §5.2)

TEST(ShimCoreConnect, ForwardedToTheDeskAndAnsweredWithANewHandle) {
  Rig r;
  r.up({reader_card(kReaderA, 1)});
  auto c = r.client();
  auto waiter = r.client();
  r.wait(waiter);
  c.send_connect(c.context, kReaderA, kShareShared, kT0 | kT1);  // [traced] share 2, proto 3
  EXPECT_TRUE(c.nothing_pending()) << "no answer before the desk's";
  auto req = r.desk.expect_request(pr::Op::kConnect);
  EXPECT_EQ(req.q.reader, kReaderA);
  EXPECT_EQ(req.q.share_mode, kShareShared);
  EXPECT_EQ(req.q.protocols, kT0 | kT1);
  EXPECT_NE(req.q.context.value, 0u);
  pr::Reply rep;
  rep.handle = pr::DeskHandle{7};
  rep.protocol = kT1;
  rep.state = (1u << 16) | 0x34u;
  rep.atr = kAtr;
  rep.card_protocol = kT1;
  r.desk.reply(req.id, rep);
  auto cr = c.connect_reply();
  EXPECT_EQ(cr.context, c.context);
  EXPECT_EQ(cr.reader, kReaderA);
  EXPECT_EQ(cr.share, kShareShared);
  EXPECT_EQ(cr.protocols, kT0 | kT1);
  EXPECT_GT(cr.card, 0) << "positive 31-bit";
  EXPECT_NE(cr.card, 7) << "never the desk's handle";
  EXPECT_NE(static_cast<uint32_t>(cr.card), c.context);
  EXPECT_EQ(cr.active_protocol, kT1);
  EXPECT_EQ(cr.rv, kSuccess);
  // [traced] after Connect: sharing 1, protocol 2; waiters are told.
  auto a = r.array();
  EXPECT_EQ(slice(a, 0, kSlotBytes), slot_bytes(kReaderA, 1, 0x34, 1, kAtr, kT1));
  EXPECT_EQ(waiter.take(), kSignal);
}

TEST(ShimCoreConnect, HandlesAreUniqueSharingCountsAndExclusiveIsMinusOne) {
  Rig r;
  r.up({reader_card(kReaderA, 1), reader_card(kReaderB, 1)});
  auto c1 = r.client();
  auto c2 = r.client();
  auto c3 = r.client();
  std::set<int32_t> cards;
  cards.insert(r.card(c1, kReaderA));
  cards.insert(r.card(c1, kReaderA));  // two handles on one context
  cards.insert(r.card(c2, kReaderA));
  auto waiter = r.client();
  r.wait(waiter);
  cards.insert(r.card(c3, kReaderB, kShareExclusive));
  EXPECT_EQ(cards.size(), 4u);
  for (int32_t card : cards) {
    EXPECT_GT(card, 4) << "desk handles 1..4 must not leak";
    EXPECT_NE(static_cast<uint32_t>(card), c1.context);
    EXPECT_NE(static_cast<uint32_t>(card), c2.context);
    EXPECT_NE(static_cast<uint32_t>(card), c3.context);
  }
  auto slots = testkit::parse_array(r.array());
  EXPECT_EQ(slots[0].sharing, 3);
  EXPECT_EQ(slots[1].sharing, -1);
  EXPECT_EQ(slots[1].protocol, kT1);
  EXPECT_EQ(waiter.take(), kSignal) << "exclusive connect changed readerSharing";
}

TEST(ShimCoreConnect, UnknownReaderIsAnsweredLocally) {
  Rig r;
  r.up({reader_card(kReaderA, 1)});
  auto c = r.client();
  c.send_connect(c.context, "No Such Reader 00 00", kShareShared, kT0 | kT1);
  auto cr = c.connect_reply();
  EXPECT_EQ(cr.rv, kUnknownReader);
  EXPECT_EQ(cr.card, 0);
  EXPECT_EQ(r.desk.queued_requests(), 0u) << "no desk request";
  // Before any desk: the same.
  Rig r2;
  auto d = r2.client();
  d.send_connect(d.context, kReaderA, kShareShared, kT0 | kT1);
  EXPECT_EQ(d.connect_reply().rv, kUnknownReader);
}

TEST(ShimCoreConnect, WrongContextIsInvalidValue) {
  Rig r;
  r.up({reader_card(kReaderA, 1)});
  auto c = r.client();
  auto other = r.client();
  c.send_connect(other.context, kReaderA, kShareShared, kT0 | kT1);
  auto cr = c.connect_reply();
  EXPECT_EQ(cr.rv, kInvalidValue);
  EXPECT_EQ(cr.card, 0);
  EXPECT_EQ(r.desk.queued_requests(), 0u);
  EXPECT_FALSE(c.closed());
  EXPECT_EQ(testkit::parse_array(r.array())[0].sharing, 0);
}

// =====================================================================================
// SCARD_TRANSMIT / CONTROL / GET_ATTRIB / SET_ATTRIB (§2.3, §5.6)

struct Connected {
  Rig r;
  PcscClientSim c;
  int32_t card = 0;
  explicit Connected(ShimConfig cfg = test_config()) : r(std::move(cfg)), c(r.core, r.fx, 0, &r.now) {
    r.up({reader_card(kReaderA, 1)});
    c = r.client();
    card = r.card(c, kReaderA);
  }
};

TEST(ShimCoreTransmit, ForwardedAndAnsweredWithTheStructThenTheData) {
  Connected t;
  t.c.send_transmit(t.card, kT1, kSelectMf, 300);
  auto req = t.r.desk.expect_request(pr::Op::kTransmit);
  EXPECT_EQ(req.q.handle.value, 1u) << "the desk's handle, not the hCard";
  EXPECT_EQ(req.q.protocols, kT1) << "send PCI protocol";
  EXPECT_EQ(req.q.data, kSelectMf);
  EXPECT_EQ(req.q.recv_length, 300u);
  EXPECT_EQ(req.q.context, t.r.desk.log.front().q.context) << "same desk context as the CONNECT";
  pr::Reply rep;
  rep.data = {0x6F, 0x10, 0x90, 0x00};
  rep.length = 4;
  rep.protocol = kT1;
  t.r.desk.reply(req.id, rep);
  Bytes expected = Le()
                       .i32(t.card)
                       .u32(kT1)
                       .u32(16)
                       .u32(static_cast<uint32_t>(kSelectMf.size()))
                       .u32(kT1)
                       .u32(16)
                       .u32(4)
                       .u32(kSuccess)
                       .bytes(rep.data);
  EXPECT_EQ(t.c.take(), expected);
}

TEST(ShimCoreTransmit, ReceiveLengthIsClampedTo65548) {
  Connected t;
  for (uint32_t asked : {65548u, 65549u, 100000u, 0xFFFFFFFFu}) {
    t.c.send_transmit(t.card, kT1, kSelectMf, asked);
    auto req = t.r.desk.expect_request(pr::Op::kTransmit);
    EXPECT_EQ(req.q.recv_length, 65548u) << asked;
    t.r.desk.reply(req.id, t.r.desk.answer(req));
    auto tr = t.c.transmit_reply();
    EXPECT_EQ(tr.rv, kSuccess);
    EXPECT_EQ(tr.data, (Bytes{0x90, 0x00}));
  }
  // An extended APDU of the maximum size goes through whole.
  Bytes big(65548, 0xAB);
  t.c.send_transmit(t.card, kT1, big, 65548);
  auto req = t.r.desk.expect_request(pr::Op::kTransmit);
  EXPECT_EQ(req.q.data, big);
}

TEST(ShimCoreTransmit, DeskErrorIsPassedThroughWithNoData) {
  Connected t;
  t.r.desk.handler = [](const testkit::FakeDesk::Req& q) -> std::optional<pr::Reply> {
    if (q.q.op != pr::Op::kTransmit) return std::nullopt;
    pr::Reply rep;
    rep.rv = kWRemovedCard;
    return rep;
  };
  t.c.send_transmit(t.card, kT1, kSelectMf, 258);
  t.r.desk.serve();
  auto tr = t.c.transmit_reply();  // checks: exactly 32 bytes
  EXPECT_EQ(tr.rv, kWRemovedCard);
  EXPECT_EQ(tr.card, t.card);
  EXPECT_TRUE(tr.data.empty());
  t.r.desk.handler = nullptr;
  t.c.send_transmit(t.card, kT1, kSelectMf, 258);
  t.r.desk.serve();
  auto ok = t.c.transmit_reply();
  EXPECT_EQ(ok.rv, kSuccess);
  EXPECT_EQ(ok.data, (Bytes{0x90, 0x00}));
}

TEST(ShimCoreTransmit, ResponseLargerThanTheClientsBufferIsInsufficientBufferWithTheNeededLength) {
  Connected t;
  t.r.desk.transmit_response = {1, 2, 3, 4, 5, 6, 7, 8, 0x90, 0x00};
  t.c.send_transmit(t.card, kT1, kSelectMf, 4);
  t.r.desk.serve();
  auto tr = t.c.transmit_reply();  // checks: 32 bytes and no data
  EXPECT_EQ(tr.rv, kInsufficientBuffer);
  EXPECT_EQ(tr.recv_length, 10u) << "the length needed";
  EXPECT_TRUE(tr.data.empty());
  // The stream is in step: the next requests get exactly their own answers.
  EXPECT_EQ(t.c.status(t.card), kSuccess);
  t.c.send_transmit(t.card, kT1, kSelectMf, 10);
  t.r.desk.serve();
  auto ok = t.c.transmit_reply();
  EXPECT_EQ(ok.rv, kSuccess);
  EXPECT_EQ(ok.data, t.r.desk.transmit_response);
  // A desk that reports INSUFFICIENT_BUFFER itself: its needed length is passed on.
  t.r.desk.handler = [](const testkit::FakeDesk::Req& q) -> std::optional<pr::Reply> {
    pr::Reply rep;
    if (q.q.op != pr::Op::kTransmit) return std::nullopt;
    rep.rv = kInsufficientBuffer;
    rep.length = 600;
    return rep;
  };
  t.c.send_transmit(t.card, kT1, kSelectMf, 258);
  t.r.desk.serve();
  auto small = t.c.transmit_reply();
  EXPECT_EQ(small.rv, kInsufficientBuffer);
  EXPECT_EQ(small.recv_length, 600u);
}

TEST(ShimCoreControl, ForwardedWithTrailingDataAndAnsweredWithBytesReturned) {
  Connected t;
  const uint32_t code = sc::ctl_code(1);
  t.c.send_control(t.card, code, {0x02}, 100);  // testpcsc step 9
  auto req = t.r.desk.expect_request(pr::Op::kControl);
  EXPECT_EQ(req.q.handle.value, 1u);
  EXPECT_EQ(req.q.code, code);
  EXPECT_EQ(req.q.data, (Bytes{0x02}));
  EXPECT_EQ(req.q.recv_length, 100u);
  t.r.desk.reply(req.id, t.r.desk.answer(req));
  EXPECT_EQ(t.c.take(), Bytes(Le().i32(t.card).u32(code).u32(1).u32(100).u32(3).u32(kSuccess).bytes(
                            t.r.desk.control_response)));
  // No data to send (CM_IOCTL_GET_FEATURE_REQUEST) and an error: 24 bytes only [traced].
  t.r.desk.handler = [](const testkit::FakeDesk::Req& q) -> std::optional<pr::Reply> {
    pr::Reply rep;
    rep.rv = q.q.code == 0x42000D48 ? kUnsupportedFeature : kSuccess;
    rep.data = q.q.code == 0x42000D48 ? Bytes{} : Bytes(40, 0x11);
    rep.length = static_cast<uint32_t>(rep.data.size());
    return rep;
  };
  t.c.send_control(t.card, 0x42000D48, {}, 100);
  auto req2 = t.r.desk.expect_request(pr::Op::kControl);
  EXPECT_TRUE(req2.q.data.empty());
  t.r.desk.reply(req2.id, *t.r.desk.handler(req2));
  auto cr = t.c.control_reply();
  EXPECT_EQ(cr.rv, kUnsupportedFeature);
  EXPECT_TRUE(cr.data.empty());
  // More than the caller's buffer: INSUFFICIENT_BUFFER, the needed size, no data.
  t.c.send_control(t.card, sc::ctl_code(5), {}, 16);
  t.r.desk.serve();
  auto big = t.c.control_reply();
  EXPECT_EQ(big.rv, kInsufficientBuffer);
  EXPECT_EQ(big.bytes_returned, 40u);
  EXPECT_TRUE(big.data.empty());
  EXPECT_EQ(t.c.status(t.card), kSuccess) << "in step";
}

TEST(ShimCoreAttrib, GetAttribReturns280BytesWithTheDataAndItsLength) {
  Connected t;
  t.c.send_get_attrib(t.card, sc::kAttrAtrString);
  auto req = t.r.desk.expect_request(pr::Op::kGetAttrib);
  EXPECT_EQ(req.q.code, sc::kAttrAtrString);
  EXPECT_EQ(req.q.recv_length, 264u);
  t.r.desk.reply(req.id, t.r.desk.answer(req));
  EXPECT_EQ(t.c.take(), Bytes(Le().i32(t.card).u32(sc::kAttrAtrString).padded(kAtr, 264).u32(5).u32(kSuccess)));
  // An error keeps the 280-byte size.
  t.r.desk.handler = [](const testkit::FakeDesk::Req&) -> std::optional<pr::Reply> {
    pr::Reply rep;
    rep.rv = kUnsupportedFeature;
    return rep;
  };
  t.c.send_get_attrib(t.card, sc::kAttrVendorIfdVersion);
  t.r.desk.serve();
  auto g = t.c.getset_reply("GET_ATTRIB");
  EXPECT_EQ(g.rv, kUnsupportedFeature);
  EXPECT_EQ(g.attr_id, sc::kAttrVendorIfdVersion);
  EXPECT_EQ(g.card, t.card);
}

TEST(ShimCoreAttrib, SetAttribForwardsTheValueAndEchoesTheStruct) {
  Connected t;
  t.c.send_set_attrib(t.card, sc::kAttrAtrString, {0x00});  // testpcsc step 11: "", 1
  auto req = t.r.desk.expect_request(pr::Op::kSetAttrib);
  EXPECT_EQ(req.q.handle.value, 1u);
  EXPECT_EQ(req.q.code, sc::kAttrAtrString);
  EXPECT_EQ(req.q.data, (Bytes{0x00}));
  pr::Reply rep;
  rep.rv = kUnsupportedFeature;
  t.r.desk.reply(req.id, rep);
  auto s = t.c.getset_reply("SET_ATTRIB");
  EXPECT_EQ(s.card, t.card);
  EXPECT_EQ(s.attr_id, sc::kAttrAtrString);
  EXPECT_EQ(s.length, 1u);
  EXPECT_EQ(s.rv, kUnsupportedFeature);
  t.c.send_set_attrib(t.card, 0x00010100, {1, 2, 3});
  t.r.desk.serve();
  EXPECT_EQ(t.c.getset_reply("SET_ATTRIB").rv, kSuccess);
}

// =====================================================================================
// SCARD_STATUS, answered from the shim's state (§2.3, §5.3, §5.4)

TEST(ShimCoreStatus, AnsweredLocallyWithSuccess) {
  Connected t;
  const auto requests = t.r.core.stats().desk_requests;
  t.c.send_status(t.card);
  EXPECT_EQ(t.c.take(), Bytes(Le().i32(t.card).u32(kSuccess)));
  EXPECT_EQ(t.r.core.stats().desk_requests, requests);
  EXPECT_EQ(t.r.desk.queued_requests(), 0u);
}

TEST(ShimCoreStatus, RemovedCardAfterTheCardWasTakenOut) {
  Connected t;
  auto c2 = t.r.client();
  const int32_t card2 = t.r.card(c2, kReaderA);
  t.r.desk.push({reader_empty(kReaderA, 2)});
  for (int i = 0; i < 2; ++i) {  // each time, until reconnected or disconnected
    EXPECT_EQ(t.c.status(t.card), kWRemovedCard);
    EXPECT_EQ(c2.status(card2), kWRemovedCard);
  }
  EXPECT_EQ(t.r.desk.queued_requests(), 0u);
}

TEST(ShimCoreStatus, RemovedCardAfterTheCardWasSwapped) {
  Connected t;
  t.r.desk.push({reader_card(kReaderA, 3, {0x3B, 0x00})});  // out and in again: counter +2
  EXPECT_EQ(t.c.status(t.card), kWRemovedCard);
}

TEST(ShimCoreStatus, ResetCardForTheOtherHandlesAfterReconnectWithReset) {
  Connected t;
  auto c2 = t.r.client();
  const int32_t card2 = t.r.card(c2, kReaderA);
  t.c.send_reconnect(t.card, kShareShared, kT0 | kT1, kReset, kT1);
  auto req = t.r.desk.expect_request(pr::Op::kReconnect);
  EXPECT_EQ(req.q.handle.value, 1u);
  EXPECT_EQ(req.q.disposition, kReset);
  EXPECT_EQ(req.q.share_mode, kShareShared);
  EXPECT_EQ(req.q.protocols, kT0 | kT1);
  t.r.desk.reply(req.id, t.r.desk.answer(req));
  auto rr = t.c.reconnect_reply();
  EXPECT_EQ(rr.card, t.card);
  EXPECT_EQ(rr.initialization, kReset);
  EXPECT_EQ(rr.active_protocol, kT1);
  EXPECT_EQ(rr.rv, kSuccess);
  EXPECT_EQ(t.c.status(t.card), kSuccess) << "the caller's own reset is not reported to it";
  EXPECT_EQ(c2.status(card2), kWResetCard);
  EXPECT_EQ(c2.status(card2), kWResetCard) << "each time";
  // RECONNECT (LEAVE) clears it.
  c2.send_reconnect(card2, kShareShared, kT0 | kT1, kLeave, kT1);
  t.r.desk.serve();
  EXPECT_EQ(c2.reconnect_reply().rv, kSuccess);
  EXPECT_EQ(c2.status(card2), kSuccess);
  EXPECT_EQ(t.c.status(t.card), kSuccess);
}

TEST(ShimCoreStatus, ResetCardForTheOtherHandlesAfterDisconnectWithReset) {
  Connected t;
  auto c2 = t.r.client();
  const int32_t card2 = t.r.card(c2, kReaderA);
  t.c.send_disconnect(t.card, kReset);
  auto req = t.r.desk.expect_request(pr::Op::kDisconnect);
  EXPECT_EQ(req.q.disposition, kReset);
  t.r.desk.reply(req.id, t.r.desk.answer(req));
  EXPECT_EQ(t.c.card_disp_reply(t.card, kReset, "DISCONNECT"), kSuccess);
  EXPECT_EQ(c2.status(card2), kWResetCard);
  EXPECT_EQ(testkit::parse_array(t.r.array())[0].sharing, 1);
  // The disconnected handle is no longer this connection's: using it closes the connection.
  t.c.send_status(t.card);
  EXPECT_TRUE(t.c.closed());
  EXPECT_FALSE(c2.closed());
}

TEST(ShimCoreStatus, EndTransactionWithResetMarksEveryHandleIncludingTheCaller) {
  Connected t;
  auto c2 = t.r.client();
  const int32_t card2 = t.r.card(c2, kReaderA);
  t.c.send_begin(t.card);
  t.r.desk.expect_request(pr::Op::kBeginTransaction);
  t.r.desk.reply(t.r.desk.log.back().id, pr::Reply{});
  EXPECT_EQ(t.c.rv8_reply(static_cast<uint32_t>(t.card), "BEGIN"), kSuccess);
  t.c.send_end(t.card, kReset);
  auto req = t.r.desk.expect_request(pr::Op::kEndTransaction);
  EXPECT_EQ(req.q.disposition, kReset);
  t.r.desk.reply(req.id, pr::Reply{});
  EXPECT_EQ(t.c.card_disp_reply(t.card, kReset, "END_TRANSACTION"), kSuccess);
  EXPECT_EQ(t.c.status(t.card), kWResetCard);
  EXPECT_EQ(c2.status(card2), kWResetCard);
  t.c.send_reconnect(t.card, kShareShared, kT0 | kT1, kLeave, kT1);
  t.r.desk.serve();
  EXPECT_EQ(t.c.reconnect_reply().rv, kSuccess);
  EXPECT_EQ(t.c.status(t.card), kSuccess);
  EXPECT_EQ(c2.status(card2), kWResetCard) << "only the reconnected handle is cleared";
}

TEST(ShimCoreStatus, SharingViolationWhileAnotherHandleHoldsATransaction) {
  Connected t;
  auto c2 = t.r.client();
  const int32_t card2 = t.r.card(c2, kReaderA);
  t.c.send_begin(t.card);
  t.r.desk.serve();
  EXPECT_EQ(t.c.rv8_reply(static_cast<uint32_t>(t.card), "BEGIN"), kSuccess);
  EXPECT_EQ(c2.status(card2), kSharingViolation);
  EXPECT_EQ(t.c.status(t.card), kSuccess) << "the holder itself";
  // The others' card operations are refused too, without bothering the desk.
  c2.send_transmit(card2, kT1, kSelectMf, 258);
  EXPECT_EQ(c2.transmit_reply().rv, kSharingViolation);
  EXPECT_EQ(t.r.desk.queued_requests(), 0u);
  t.c.send_end(t.card, kLeave);
  t.r.desk.serve();
  EXPECT_EQ(t.c.card_disp_reply(t.card, kLeave, "END_TRANSACTION"), kSuccess);
  EXPECT_EQ(c2.status(card2), kSuccess);
}

// =====================================================================================
// Handles of another connection (§2.1, §5.1 MSGCheckHandleAssociation)

TEST(ShimCoreHandles, AHandleNotOwnedByTheConnectionClosesItAndOnlyIt) {
  Connected t;
  auto intruder = t.r.client();
  const auto errors = t.r.core.stats().protocol_errors;
  intruder.send_transmit(t.card, kT1, kSelectMf, 258);
  EXPECT_TRUE(intruder.closed());
  EXPECT_TRUE(intruder.nothing_pending());
  EXPECT_EQ(t.r.desk.queued_requests(), 0u) << "nothing forwarded";
  EXPECT_EQ(t.r.core.stats().protocol_errors, errors + 1);
  // The owner is unaffected.
  EXPECT_EQ(t.c.status(t.card), kSuccess);
  t.c.send_transmit(t.card, kT1, kSelectMf, 258);
  t.r.desk.serve();
  EXPECT_EQ(t.c.transmit_reply().rv, kSuccess);
  // A made-up handle, on STATUS.
  auto guesser = t.r.client();
  guesser.send_status(0x12345678);
  EXPECT_TRUE(guesser.closed());
  EXPECT_TRUE(guesser.nothing_pending());
  EXPECT_FALSE(t.c.closed());
  EXPECT_EQ(testkit::parse_array(t.r.array())[0].sharing, 1);
}

// =====================================================================================
// Desk lost, desk back (§1.3, §5.2 "a handle whose reader is gone")

TEST(ShimCoreDeskLoss, InFlightTransmitFailsAtOnceReadersVanishAndWaitersAreSignalled) {
  Connected t;
  auto waiter = t.r.client();
  t.r.wait(waiter);
  t.c.send_transmit(t.card, kT1, kSelectMf, 258);
  ASSERT_EQ(t.r.desk.queued_requests(), 1u);
  t.r.core.desk_disconnected(t.r.now);
  auto tr = t.c.transmit_reply();  // at once, 32 bytes, no data
  EXPECT_EQ(tr.rv, kReaderUnavailable);
  EXPECT_EQ(tr.card, t.card);
  EXPECT_EQ(waiter.take(), kSignal);
  EXPECT_EQ(t.r.array(), kZeroArray);
  EXPECT_FALSE(t.r.core.desk_up());
  // The old handle now answers like a handle whose reader is gone, locally.
  t.r.fx.desk.clear();
  t.c.send_transmit(t.card, kT1, kSelectMf, 258);
  auto orphan = t.c.transmit_reply();
  EXPECT_NE(orphan.rv, kSuccess);
  EXPECT_EQ(orphan.rv, kInvalidValue) << "pcscd: RFReaderInfoById fails";
  EXPECT_EQ(t.c.status(t.card), kInvalidValue);
  EXPECT_TRUE(t.r.fx.desk.empty());
}

TEST(ShimCoreDeskLoss, OrphansDisconnectCleanlyAndStayOrphanedWhenTheDeskComesBack) {
  Connected t;
  auto c2 = t.r.client();
  const int32_t card2 = t.r.card(c2, kReaderA);
  t.r.core.desk_disconnected(t.r.now);
  t.c.send_disconnect(t.card, kLeave);
  EXPECT_EQ(t.c.card_disp_reply(t.card, kLeave, "DISCONNECT"), kSuccess);
  // A new desk session (new instance) with the same reader.
  t.r.desk.instance = 0xD35C0002;
  t.r.up({reader_card(kReaderA, 1)});
  EXPECT_TRUE(t.r.core.desk_up());
  auto slots = testkit::parse_array(t.r.array());
  EXPECT_EQ(slots[0].name, kReaderA);
  EXPECT_EQ(slots[0].sharing, 0) << "orphans hold no share of the new reader";
  c2.send_transmit(card2, kT1, kSelectMf, 258);
  EXPECT_EQ(c2.transmit_reply().rv, kInvalidValue);
  EXPECT_EQ(c2.status(card2), kInvalidValue);
  EXPECT_EQ(t.r.desk.queued_requests(), 0u);
  c2.send_disconnect(card2, kReset);
  EXPECT_EQ(c2.card_disp_reply(card2, kReset, "DISCONNECT"), kSuccess);
  EXPECT_EQ(t.r.desk.queued_requests(), 0u) << "an orphan's reset must not touch the new session's card";
  // New handles work.
  const int32_t fresh = t.r.card(c2, kReaderA);
  EXPECT_NE(fresh, card2);
  c2.send_transmit(fresh, kT1, kSelectMf, 258);
  t.r.desk.serve();
  EXPECT_EQ(c2.transmit_reply().rv, kSuccess);
}

// =====================================================================================
// Client goes away (§5.7)

TEST(ShimCoreClientClose, ClosingAClientReleasesItsDeskContext) {
  Connected t;
  const auto desk_ctx = t.r.desk.log.front().q.context;
  ASSERT_NE(desk_ctx.value, 0u);
  t.c.close();
  auto rel = t.r.desk.expect_request(pr::Op::kReleaseContext);
  EXPECT_EQ(rel.q.context, desk_ctx);
  EXPECT_FALSE(t.r.fx.was_closed(t.c.id())) << "the I/O layer reported the close; nothing to close";
  t.r.desk.reply(rel.id, pr::Reply{});
  EXPECT_EQ(testkit::parse_array(t.r.array())[0].sharing, 0);
  // A client that never reached the desk costs no request.
  auto local = t.r.client();
  local.close();
  EXPECT_EQ(t.r.desk.queued_requests(), 0u);
  // SCardReleaseContext on the wire does the same.
  auto c3 = t.r.client();
  t.r.card(c3, kReaderA);
  const auto ctx3 = t.r.desk.log.back().q.context;
  EXPECT_EQ(c3.release(c3.context), kSuccess);
  EXPECT_EQ(t.r.desk.expect_request(pr::Op::kReleaseContext).q.context, ctx3);
}

TEST(ShimCoreClientClose, ADeskReplyForAClosedClientIsIgnored) {
  Connected t;
  auto other = t.r.client();
  const int32_t card2 = t.r.card(other, kReaderA);
  t.c.send_transmit(t.card, kT1, kSelectMf, 258);
  auto req = t.r.desk.expect_request(pr::Op::kTransmit);
  const ClientId gone = t.c.id();
  t.c.close();
  auto rel = t.r.desk.expect_request(pr::Op::kReleaseContext);
  const auto log_size = t.r.fx.log.size();
  t.r.desk.reply(req.id, t.r.desk.answer(req));
  EXPECT_EQ(t.r.fx.pending_bytes(gone), 0u);
  EXPECT_EQ(t.r.fx.log.size(), log_size) << "no effect at all";
  EXPECT_TRUE(t.r.fx.resets.empty());
  // The other client's card operation on that reader waits for the release to be done
  // at the desk (it may reset the card), then goes out.
  other.send_transmit(card2, kT1, kSelectMf, 258);
  EXPECT_EQ(t.r.desk.queued_requests(), 0u);
  t.r.desk.reply(rel.id, pr::Reply{});
  t.r.desk.serve();
  EXPECT_EQ(other.transmit_reply().rv, kSuccess);
}

// =====================================================================================
// Malformed input (§2.1)

TEST(ShimCoreMalformed, WrongBodySizeClosesOnlyThatConnection) {
  Rig r;
  auto bad = r.client();
  auto good = r.client();
  bad.send_header(11, op::kEstablish);
  EXPECT_TRUE(bad.closed());
  EXPECT_TRUE(bad.nothing_pending());
  EXPECT_EQ(r.core.stats().protocol_errors, 1u);
  EXPECT_FALSE(good.closed());
  EXPECT_EQ(good.readers_state().size(), kArrayBytes);
  auto bad2 = r.client();
  bad2.send_header(152 + 4, op::kConnect);
  EXPECT_TRUE(bad2.closed());
  EXPECT_EQ(r.core.stats().protocol_errors, 2u);
}

TEST(ShimCoreMalformed, UnknownOrUnusedOpcodesCloseTheConnection) {
  Rig r;
  uint64_t expected = 0;
  for (uint32_t command : {0x03u, 0x0Cu, 0x0Eu, 0x00u, 0x18u, 0x42u, 0xFFFFFFFFu}) {
    auto c = r.client();
    c.send_header(0, command);
    EXPECT_TRUE(c.closed()) << "opcode 0x" << std::hex << command;
    EXPECT_TRUE(c.nothing_pending());
    EXPECT_EQ(r.core.stats().protocol_errors, ++expected);
  }
  EXPECT_EQ(r.core.client_count(), 0u);
}

TEST(ShimCoreMalformed, OversizedTransmitOrAttributeClosesTheConnection) {
  Connected t;
  auto c = t.r.client();
  const int32_t card = t.r.card(c, kReaderA);
  // cbSendLength 65549: closed on the struct, before any data arrives.
  c.send(op::kTransmit, Le().i32(card).u32(kT1).u32(16).u32(65549).u32(3).u32(16).u32(258).u32(0));
  EXPECT_TRUE(c.closed());
  EXPECT_TRUE(c.nothing_pending());
  EXPECT_EQ(t.r.desk.expect_request(pr::Op::kReleaseContext).q.op, pr::Op::kReleaseContext);
  EXPECT_EQ(t.r.desk.queued_requests(), 0u) << "no transmit forwarded";
  auto c2 = t.r.client();
  c2.send(op::kGetAttrib, Le().i32(0).u32(sc::kAttrAtrString).zeros(264).u32(265).u32(0));
  EXPECT_TRUE(c2.closed());
  EXPECT_EQ(t.r.core.stats().protocol_errors, 2u);
  EXPECT_EQ(t.c.status(t.card), kSuccess);
}

// =====================================================================================
// Desk link: hello, errors, retries

TEST(ShimCoreDeskLink, AMalformedDeskFrameResetsTheLink) {
  Connected t;
  const Bytes garbage = {0xFF, 0xFF, 0xFF, 0x01, 0x02};
  t.r.core.desk_bytes(pr::frame(garbage), t.r.now);
  ASSERT_EQ(t.r.fx.resets.size(), 1u);
  EXPECT_FALSE(t.r.core.desk_up());
  EXPECT_EQ(t.r.array(), kZeroArray);
  EXPECT_FALSE(t.c.closed());
}

TEST(ShimCoreHello, ADeskHelloIsAnsweredWithAHelloReply) {
  Rig r;
  r.core.desk_connected(r.now);
  auto ours = r.desk.expect_hello();
  ASSERT_TRUE(ours);
  EXPECT_EQ(ours->role, pr::Role::kServer);
  EXPECT_FALSE(ours->reply);
  EXPECT_EQ(ours->version_major, pr::kVersionMajor);
  EXPECT_EQ(ours->peer_name, "shim-under-test");
  EXPECT_EQ(ours->capabilities, pr::caps::kReaderPush);
  EXPECT_FALSE(r.core.desk_up());
  r.desk.hello(0xABCDEF, false);  // the desk speaks first, or did not see ours
  auto answer = r.desk.expect_hello();
  ASSERT_TRUE(answer);
  EXPECT_TRUE(answer->reply);
  EXPECT_EQ(answer->role, pr::Role::kServer);
  EXPECT_EQ(answer->instance, ours->instance) << "same session instance";
  EXPECT_TRUE(r.core.desk_up());
  EXPECT_EQ(r.core.desk_name(), "desk-under-test");
  EXPECT_EQ(r.core.stats().desk_sessions, 1u);
  // A desk answering our hello (reply=true) gets nothing back.
  Rig r2;
  r2.desk.up();
  EXPECT_TRUE(r2.core.desk_up());
  EXPECT_TRUE(r2.fx.desk.empty());
}

TEST(ShimCoreHello, ARepeatedHelloWithTheSameInstanceChangesNothing) {
  Connected t;
  auto waiter = t.r.client();
  t.r.wait(waiter);
  const auto generation = t.r.core.desk_generation();
  const auto sessions = t.r.core.stats().desk_sessions;
  const Bytes before = t.r.array();
  t.r.desk.hello(t.r.desk.instance, true);
  t.r.desk.hello(t.r.desk.instance, false);
  for (const auto& m : t.r.fx.desk) {
    auto* h = std::get_if<pr::Hello>(&m.body);
    ASSERT_NE(h, nullptr) << "only hello replies: " << pr::describe(m);
    EXPECT_TRUE(h->reply);
  }
  t.r.fx.desk.clear();
  EXPECT_EQ(t.r.core.desk_generation(), generation);
  EXPECT_EQ(t.r.core.stats().desk_sessions, sessions);
  EXPECT_TRUE(t.r.fx.resets.empty());
  EXPECT_TRUE(waiter.nothing_pending());
  EXPECT_EQ(t.r.array(), before);
  t.c.send_transmit(t.card, kT1, kSelectMf, 258);
  EXPECT_EQ(t.r.desk.expect_request(pr::Op::kTransmit).q.handle.value, 1u) << "handle still valid";
}

TEST(ShimCoreHello, AHelloWithANewInstanceIsANewSession) {
  Connected t;
  const auto generation = t.r.core.desk_generation();
  t.r.desk.hello(0x0BADCAFE, true);
  EXPECT_EQ(t.r.core.desk_generation(), generation + 1);
  EXPECT_TRUE(t.r.core.desk_up());
  EXPECT_EQ(t.r.array(), kZeroArray) << "the old session's readers are gone until the new snapshot";
  t.c.send_transmit(t.card, kT1, kSelectMf, 258);
  EXPECT_EQ(t.c.transmit_reply().rv, kInvalidValue) << "orphaned";
}

TEST(ShimCoreHello, MajorVersionMismatchSendsAnErrorAndResetsTheLink) {
  Rig r;
  r.core.desk_connected(r.now);
  r.desk.expect_hello();
  r.desk.hello(0x42, false, pr::kVersionMajor + 1);
  ASSERT_FALSE(r.fx.desk.empty());
  auto m = r.fx.desk.front();
  auto* e = std::get_if<pr::Error>(&m.body);
  ASSERT_NE(e, nullptr) << pr::describe(m);
  EXPECT_EQ(e->code, pr::ErrorCode::kVersion);
  EXPECT_EQ(r.fx.resets.size(), 1u);
  EXPECT_FALSE(r.core.desk_up());
}

TEST(ShimCoreHello, APeerThatIsNotADeskResetsTheLink) {
  Rig r;
  r.core.desk_connected(r.now);
  r.desk.expect_hello();
  r.desk.hello(0x42, false, pr::kVersionMajor, pr::Role::kServer);
  EXPECT_EQ(r.fx.resets.size(), 1u);
  EXPECT_FALSE(r.core.desk_up());
}

TEST(ShimCoreHello, AReplyForAnUnknownRequestIdIsIgnored) {
  Connected t;
  const auto log_size = t.r.fx.log.size();
  pr::Reply rep;
  rep.data = {0x90, 0x00};
  t.r.desk.reply(987654, rep);
  EXPECT_EQ(t.r.fx.log.size(), log_size);
  EXPECT_TRUE(t.r.core.desk_up());
  EXPECT_EQ(t.c.status(t.card), kSuccess);
}

TEST(ShimCoreHello, HelloIsRetriedUntilTheDeskAnswers) {
  Rig r;
  const auto t0 = r.now;
  EXPECT_FALSE(r.core.next_deadline().has_value()) << "no desk transport";
  r.core.desk_connected(t0);
  auto first = r.desk.expect_hello();
  ASSERT_TRUE(first);
  ASSERT_TRUE(r.core.next_deadline().has_value());
  EXPECT_EQ(*r.core.next_deadline(), t0 + 500ms);
  r.core.tick(t0 + 100ms);
  EXPECT_TRUE(r.fx.desk.empty()) << "not due yet";
  r.core.tick(t0 + 600ms);
  auto again = r.desk.expect_hello();
  ASSERT_TRUE(again);
  EXPECT_FALSE(again->reply);
  EXPECT_EQ(again->instance, first->instance);
  ASSERT_TRUE(r.core.next_deadline().has_value());
  EXPECT_EQ(*r.core.next_deadline(), t0 + 600ms + 500ms);
  r.desk.hello(r.desk.instance, true);
  EXPECT_TRUE(r.core.desk_up());
  EXPECT_FALSE(r.core.next_deadline().has_value());
  r.core.tick(t0 + 5s);
  EXPECT_TRUE(r.fx.desk.empty()) << "nothing once the desk answered";
}

// =====================================================================================
// Many clients at once

TEST(ShimCoreConcurrency, InterleavedTransmitsAreAnsweredToTheRightClient) {
  Rig r;
  r.up({reader_card(kReaderA, 1), reader_card(kReaderB, 1)});
  constexpr int kClients = 8;
  std::vector<PcscClientSim> clients;
  std::vector<int32_t> cards;
  for (int i = 0; i < kClients; ++i) {
    clients.push_back(r.client(4 + i % 3));
    cards.push_back(r.card(clients.back(), i % 2 ? kReaderB : kReaderA));
  }
  for (int round = 0; round < 3; ++round) {
    for (int i = 0; i < kClients; ++i) {
      clients[static_cast<std::size_t>(i)].send_transmit(
          cards[static_cast<std::size_t>(i)], kT1,
          {0x80, 0x10, static_cast<uint8_t>(i), static_cast<uint8_t>(round), 0x00}, 258);
    }
    std::vector<testkit::FakeDesk::Req> reqs;
    std::set<uint32_t> ids;
    while (auto q = r.desk.next_request()) {
      EXPECT_EQ(q->q.op, pr::Op::kTransmit);
      EXPECT_TRUE(ids.insert(q->id).second) << "correlation ids are unique";
      reqs.push_back(*q);
    }
    ASSERT_EQ(reqs.size(), static_cast<std::size_t>(kClients));
    // Answer in a scrambled order; the data names the request it answers.
    std::vector<std::size_t> order = {5, 2, 7, 0, 3, 6, 1, 4};
    std::rotate(order.begin(), order.begin() + round, order.end());
    for (std::size_t k : order) {
      pr::Reply rep;
      rep.data = {reqs[k].q.data[2], reqs[k].q.data[3], 0x90, 0x00};
      rep.protocol = kT1;
      r.desk.reply(reqs[k].id, rep);
    }
    for (int i = 0; i < kClients; ++i) {
      auto tr = clients[static_cast<std::size_t>(i)].transmit_reply();
      EXPECT_EQ(tr.card, cards[static_cast<std::size_t>(i)]);
      EXPECT_EQ(tr.data, (Bytes{static_cast<uint8_t>(i), static_cast<uint8_t>(round), 0x90, 0x00}))
          << "client " << i << " round " << round;
    }
  }
}

// =====================================================================================
// More pcscd semantics around the array and the handles

// §3.1: "pcscd fills cardProtocol when the first Connect negotiates the protocol, and resets
// it to 0 on reset, power-down or removal." SCardEndTransaction(RESET/UNPOWER) resets the
// card in pcscd (winscard.c@1.9.9: "the protocol is unset after a power on").
TEST(ShimCoreArray, CardProtocolIsZeroAfterAResetByDisconnectOrEndTransaction) {
  {
    Connected t;
    auto c2 = t.r.client();
    t.r.card(c2, kReaderA);
    ASSERT_EQ(testkit::parse_array(t.r.array())[0].protocol, kT1);
    t.c.send_disconnect(t.card, kReset);
    t.r.desk.serve();
    EXPECT_EQ(t.c.card_disp_reply(t.card, kReset, "DISCONNECT"), kSuccess);
    EXPECT_EQ(testkit::parse_array(t.r.array())[0].protocol, 0u) << "after DISCONNECT(RESET)";
  }
  {
    Connected t;
    ASSERT_EQ(testkit::parse_array(t.r.array())[0].protocol, kT1);
    t.c.send_begin(t.card);
    t.r.desk.serve();
    EXPECT_EQ(t.c.rv8_reply(static_cast<uint32_t>(t.card), "BEGIN"), kSuccess);
    t.c.send_end(t.card, kReset);
    t.r.desk.serve();
    EXPECT_EQ(t.c.card_disp_reply(t.card, kReset, "END_TRANSACTION"), kSuccess);
    auto slot = testkit::parse_array(t.r.array())[0];
    EXPECT_EQ(slot.protocol, 0u) << "after END_TRANSACTION(RESET)";
    EXPECT_EQ(slot.reader_state, 0x34u);
    EXPECT_EQ(slot.sharing, 1);
  }
}

// §5.2: "Connect when another handle holds a transaction: pcscd blocks inside Connect
// (polling every 100 ms) until the lock is released. It does not return an error."
TEST(ShimCoreConnect, ConnectWaitsWhileAnotherHandleHoldsATransaction) {
  Connected t;
  t.c.send_begin(t.card);
  t.r.desk.serve();
  EXPECT_EQ(t.c.rv8_reply(static_cast<uint32_t>(t.card), "BEGIN"), kSuccess);
  auto c2 = t.r.client();
  c2.send_connect(c2.context, kReaderA, kShareShared, kT0 | kT1);
  EXPECT_TRUE(c2.nothing_pending()) << "blocked, not refused";
  EXPECT_EQ(t.r.desk.queued_requests(), 0u);
  t.c.send_end(t.card, kLeave);
  t.r.desk.serve();  // the END, then the CONNECT released by it
  EXPECT_EQ(t.c.card_disp_reply(t.card, kLeave, "END_TRANSACTION"), kSuccess);
  t.r.desk.serve();
  auto cr = c2.connect_reply();
  EXPECT_EQ(cr.rv, kSuccess);
  EXPECT_NE(cr.card, 0);
  EXPECT_EQ(testkit::parse_array(t.r.array())[0].sharing, 2);
}

// §5.7: a client that dies holding the transaction gets its card reset (others see
// W_RESET_CARD); one that held nothing leaves the card alone.
TEST(ShimCoreClientClose, DeathWithATransactionResetsTheCardForTheOthers) {
  Connected t;
  auto c2 = t.r.client();
  const int32_t card2 = t.r.card(c2, kReaderA);
  auto c3 = t.r.client();
  t.r.card(c3, kReaderA);
  // c3 dies holding nothing: no reset.
  c3.close();
  auto rel3 = t.r.desk.expect_request(pr::Op::kReleaseContext);
  t.r.desk.reply(rel3.id, pr::Reply{});
  EXPECT_EQ(c2.status(card2), kSuccess);
  EXPECT_EQ(testkit::parse_array(t.r.array())[0].sharing, 2);
  // t.c dies inside a transaction.
  t.c.send_begin(t.card);
  t.r.desk.serve();
  EXPECT_EQ(t.c.rv8_reply(static_cast<uint32_t>(t.card), "BEGIN"), kSuccess);
  EXPECT_EQ(c2.status(card2), kSharingViolation);
  t.c.close();
  auto rel = t.r.desk.expect_request(pr::Op::kReleaseContext);
  EXPECT_NE(rel.q.context.value, 0u);
  EXPECT_EQ(c2.status(card2), kWResetCard) << "lock gone, card reset";
  auto slot = testkit::parse_array(t.r.array())[0];
  EXPECT_EQ(slot.sharing, 1);
  EXPECT_EQ(slot.protocol, 0u);
}

// §5.4: Reconnect clears a pending removal.
TEST(ShimCoreStatus, ReconnectAfterTheCardCameBackClearsRemovedCard) {
  Connected t;
  t.r.desk.push({reader_card(kReaderA, 3)});  // out and in again
  EXPECT_EQ(t.c.status(t.card), kWRemovedCard);
  t.c.send_reconnect(t.card, kShareShared, kT0 | kT1, kLeave, kT1);
  t.r.desk.serve();
  auto rr = t.c.reconnect_reply();
  EXPECT_EQ(rr.rv, kSuccess);
  EXPECT_EQ(rr.active_protocol, kT1);
  EXPECT_EQ(t.c.status(t.card), kSuccess);
  EXPECT_EQ(testkit::parse_array(t.r.array())[0].protocol, kT1);
}

// §2.1: the header and the struct come in separate writes, but the shim must reassemble
// any split (and any batching) of the stream.
TEST(ShimCoreStream, RequestsCutAnywhereOrBatchedAreAnsweredInOrder) {
  Connected t;
  // One TRANSMIT, byte by byte.
  Bytes req = Le()
                  .u32(32)
                  .u32(op::kTransmit)
                  .i32(t.card)
                  .u32(kT1)
                  .u32(16)
                  .u32(static_cast<uint32_t>(kSelectMf.size()))
                  .u32(3)
                  .u32(16)
                  .u32(258)
                  .u32(0)
                  .bytes(kSelectMf);
  for (uint8_t b : req) {
    EXPECT_EQ(t.r.desk.queued_requests(), 0u);
    t.c.send_raw({b});
  }
  auto q = t.r.desk.expect_request(pr::Op::kTransmit);
  EXPECT_EQ(q.q.data, kSelectMf);
  t.r.desk.reply(q.id, t.r.desk.answer(q));
  EXPECT_EQ(t.c.transmit_reply().data, (Bytes{0x90, 0x00}));
  // VERSION + ESTABLISH + GET_READERS_STATE + STATUS in one write.
  auto c2 = t.r.open();
  Bytes batch = Le()
                    .u32(12).u32(op::kVersion).i32(4).i32(4).u32(0)
                    .u32(12).u32(op::kEstablish).u32(2).u32(0).u32(0)
                    .u32(0).u32(op::kGetReadersState)
                    .u32(0).u32(op::kGetReaderEvents + 0x100)  // unknown: closes, after the others
                    .get();
  c2.send_raw(batch);
  Bytes out = c2.take();
  ASSERT_EQ(out.size(), 12u + 12u + kArrayBytes);
  EXPECT_EQ(slice(out, 0, 12), Bytes(Le().i32(4).i32(4).u32(kSuccess)));
  EXPECT_EQ(testkit::rd32(out, 12 + 8), kSuccess);
  EXPECT_EQ(slice(out, 24, kArrayBytes), t.r.array());
  EXPECT_TRUE(c2.closed());
}

// =====================================================================================
// Per-call mode (ShimConfig::one_round_trip_per_call)

TEST(ShimCorePerCall, StatusAndListReadersCostOnePingEachAndAnswerAsTheOptimisedMode) {
  struct Answers {
    Bytes status_array, status, list_array;
    uint64_t status_round_trips = 0, list_round_trips = 0;
  };
  auto run = [](bool per_call) {
    Answers out;
    Rig r(test_config(per_call));
    r.up({reader_card(kReaderA, 1), reader_empty(kReaderB)});
    auto c = r.client();
    const int32_t card = r.card(c, kReaderA);
    r.desk.log.clear();
    // SCardStatus: CMD_GET_READERS_STATE then STATUS [traced].
    auto rt0 = r.core.stats().round_trips;
    c.send_cmd(op::kGetReadersState);
    if (per_call) {
      EXPECT_TRUE(c.nothing_pending()) << "waits for the desk";
      EXPECT_EQ(r.desk.expect_request(pr::Op::kPing).q.op, pr::Op::kPing);
      EXPECT_EQ(r.desk.queued_requests(), 0u);
      r.desk.reply(r.desk.log.back().id, pr::Reply{});
    }
    out.status_array = c.take_exact(kArrayBytes, "CMD_GET_READERS_STATE");
    c.send_status(card);
    EXPECT_EQ(r.desk.queued_requests(), 0u) << "STATUS itself needs no second round trip";
    out.status = c.take_exact(8, "STATUS");
    out.status_round_trips = r.core.stats().round_trips - rt0;
    // SCardListReaders: CMD_GET_READERS_STATE.
    rt0 = r.core.stats().round_trips;
    c.send_cmd(op::kGetReadersState);
    r.desk.serve();
    out.list_array = c.take_exact(kArrayBytes, "CMD_GET_READERS_STATE");
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
  EXPECT_EQ(testkit::rd32(slow.status, 4), kSuccess);
  EXPECT_EQ(testkit::parse_array(slow.list_array)[0].sharing, 1);
}

// A 2.5 client (protocol 4.6) reads the array with CMD_GET_READERS_STATE_SIZE +
// CMD_GET_READERS_STATE_ARRAY instead of CMD_GET_READERS_STATE (winscard_clnt.c@2.5.1
// getReaderStates). Per-call mode must charge SCardStatus and SCardListReaders one round
// trip for it too, and GetStatusChange (WAIT + SIZE + ARRAY) still one.
TEST(ShimCorePerCall, A46ClientsStatusListReadersAndWaitCostOnePingEach) {
  Rig r(test_config(true));
  r.up({reader_card(kReaderA, 1)});
  auto c = r.client(6);
  const int32_t card = r.card(c, kReaderA);
  const Bytes expected_array = r.array();
  r.desk.log.clear();
  auto read_array = [&] {
    c.send_cmd(op::kStateSize);
    EXPECT_EQ(c.take(), Bytes(Le().i32(16)));
    c.send_cmd(op::kStateArray);
    r.desk.serve();
    return c.take_exact(kArrayBytes, "CMD_GET_READERS_STATE_ARRAY");
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
  c.send_cmd(op::kWait);
  r.desk.serve();
  EXPECT_TRUE(c.nothing_pending());
  EXPECT_EQ(read_array(), expected_array);
  EXPECT_EQ(r.core.stats().round_trips - rt0, 1u) << "SCardGetStatusChange of a 4.6 client";
  std::size_t pings = 0;
  for (const auto& q : r.desk.log) {
    if (q.q.op == pr::Op::kReleaseContext) continue;  // the bystander of r.array() going away
    EXPECT_EQ(q.q.op, pr::Op::kPing);
    ++pings;
  }
  EXPECT_EQ(pings, 3u);
}

}  // namespace
}  // namespace cardbridge::shim
