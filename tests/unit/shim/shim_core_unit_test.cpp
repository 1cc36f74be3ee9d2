// ShimCore, byte for byte: simulated libpcsclite 1.9.9 clients (core_kit_client.hpp) and a
// fake desk (core_kit_desk.hpp) drive the sans-I/O state machine; every reply is checked
// against what pcscd 1.9.9 sends (docs: pcsc-protocol.md, pcsc-semantics.md).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/version.hpp"
#include "core/shim_core.hpp"
#include "core_kit_client.hpp"
#include "core_kit_desk.hpp"
#include "core_kit_effects.hpp"

namespace {

using namespace core_kit;
namespace rf = cardbridge::protocol::request_flags;
namespace caps = cardbridge::protocol::caps;
using V = std::vector<uint8_t>;

constexpr uint32_t kT1 = sc::kProtocolT1;
constexpr uint32_t kT0T1 = sc::kProtocolT0 | sc::kProtocolT1;
constexpr uint32_t kState34 = sc::kReaderPresent | sc::kReaderPowered | sc::kReaderNegotiable;  // 0x34

const V kSelect = {0x00, 0xA4, 0x04, 0x00, 0x02, 0x3F, 0x00};
const V kSw9000 = {0x90, 0x00};

V cat(V a, const V& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

pr::Reply ok_reply(V data = {}, uint32_t protocol = 1) {
  pr::Reply r;
  r.rv = sc::kSuccess;
  r.data = std::move(data);
  r.protocol = protocol;
  return r;
}
pr::Reply rv_reply(uint32_t rv) {
  pr::Reply r;
  r.rv = rv;
  return r;
}

struct TxReply {
  wire::TransmitStruct s{};
  V data;
};
// A TRANSMIT reply as libpcsclite reads it: the struct, then pcbRecvLength bytes if rv == 0.
TxReply read_tx(PcscClient& c) {
  TxReply t;
  t.s = c.read<wire::TransmitStruct>();
  if (t.s.rv == sc::kSuccess) t.data = c.take(t.s.recv_length);
  return t;
}

// The 184 bytes pcscd writes for one reader (padding zero).
V entry_bytes(const std::string& name, uint32_t counter, uint32_t state, int32_t sharing, const V& atr, uint32_t protocol) {
  wire::ReaderState rs;
  std::memset(&rs, 0, sizeof rs);
  wire::copy_name(rs.name, name);
  rs.event_counter = counter;
  rs.reader_state = state;
  rs.reader_sharing = sharing;
  if (!atr.empty()) std::memcpy(rs.atr, atr.data(), atr.size());
  rs.atr_length = static_cast<uint32_t>(atr.size());
  rs.card_protocol = protocol;
  return as_bytes(rs);
}
V slot_bytes(const V& array, std::size_t slot) {
  return V(array.begin() + static_cast<std::ptrdiff_t>(slot * sizeof(wire::ReaderState)),
           array.begin() + static_cast<std::ptrdiff_t>((slot + 1) * sizeof(wire::ReaderState)));
}
bool all_zero(const V& v) {
  return std::all_of(v.begin(), v.end(), [](uint8_t b) { return b == 0; });
}
V signal_bytes(uint32_t rv) { return as_bytes(wire::WaitReaderStateChange{0, rv}); }

// Non-deferred Begin/End and Reconnect that reach the desk and succeed.
void begin_at_desk(Rig& rig, PcscClient& c, uint32_t card) {
  c.send_begin(card);
  rig.answer(pr::Op::kBeginTransaction, ok_reply());
  EXPECT_EQ(c.read<wire::BeginStruct>().rv, sc::kSuccess);
}
void end_at_desk(Rig& rig, PcscClient& c, uint32_t card, uint32_t disposition = sc::kLeaveCard) {
  c.send_end(card, disposition);
  rig.answer(pr::Op::kEndTransaction, ok_reply());
  EXPECT_EQ(c.read<wire::EndStruct>().rv, sc::kSuccess);
}
void reconnect_at_desk(Rig& rig, PcscClient& c, uint32_t card, uint32_t init, uint32_t counter) {
  c.send_reconnect(card, sc::kShareShared, kT0T1, init, kT1);
  pr::Reply r = ok_reply({}, kT1);
  r.state = (counter << 16) | kState34;
  r.card_protocol = kT1;
  rig.answer(pr::Op::kReconnect, r);
  EXPECT_EQ(c.read<wire::ReconnectStruct>().rv, sc::kSuccess);
}

// Answers every outstanding desk request with success, END_TRANSACTION first (the desk's
// pcscd holds a Disconnect(RESET) until the transaction ends), until the shim sends nothing more.
void drain_end_first(Rig& rig) {
  while (!rig.desk.idle()) {
    std::vector<std::pair<uint32_t, pr::Request>> sent;
    while (!rig.desk.idle()) sent.push_back(rig.desk.request());
    std::stable_sort(sent.begin(), sent.end(), [](const auto& x, const auto& y) {
      return x.second.op == pr::Op::kEndTransaction && y.second.op != pr::Op::kEndTransaction;
    });
    for (auto& [id, q] : sent) rig.desk.reply(id, ok_reply());
  }
}

// ======================================================================================
// Version handshake

TEST(ShimCoreVersion, Accepts44And45And46EchoingTheClientVersion) {
  Rig rig;
  for (int32_t minor : {4, 5, 6}) {
    auto c = rig.raw_client();
    c.send_version(4, minor);
    EXPECT_EQ(c.take(12), as_bytes(wire::VersionStruct{4, minor, sc::kSuccess})) << "4." << minor;
    EXPECT_TRUE(c.nothing_pending());
    EXPECT_FALSE(c.closed_by_shim());
    EXPECT_EQ(c.establish().rv, sc::kSuccess);
  }
}

TEST(ShimCoreVersion, RefusesOtherVersionsWithServiceStoppedAndKeepsTheConnection) {
  Rig rig;
  struct Case {
    int32_t major, minor, answered_minor;
  };
  for (Case k : {Case{4, 3, 4}, Case{4, 0, 4}, Case{3, 4, 4}, Case{5, 4, 4}, Case{4, 7, 6}}) {
    auto c = rig.raw_client();
    c.send_version(k.major, k.minor);
    auto r = c.read<wire::VersionStruct>();
    EXPECT_EQ(r.rv, sc::kEServiceStopped) << k.major << "." << k.minor;
    EXPECT_EQ(r.major, 4);
    EXPECT_EQ(r.minor, k.answered_minor) << k.major << "." << k.minor;
    EXPECT_TRUE(c.nothing_pending());
    EXPECT_FALSE(c.closed_by_shim()) << "pcscd leaves the connection open";
  }
}

TEST(ShimCoreVersion, NewerClientFallsBackOnTheSameSocket) {
  Rig rig;
  auto c = rig.raw_client();
  c.send_version(4, 7);
  auto r = c.read<wire::VersionStruct>();
  ASSERT_EQ(r.rv, sc::kEServiceStopped);
  // pcsc-lite 2.4.1+: CMD_VERSION again with the server's version.
  c.send_version(r.major, r.minor);
  EXPECT_EQ(c.take(12), as_bytes(wire::VersionStruct{4, 6, sc::kSuccess}));
  // It is now a 4.6 connection: WAIT registers without sending the array.
  c.send_header_only(Command::kWaitReaderStateChange);
  EXPECT_TRUE(c.nothing_pending());
}

// ======================================================================================
// Contexts

TEST(ShimCoreContext, EstablishAcceptsScopes0To3AndRefusesOthers) {
  Rig rig;
  auto c = rig.raw_client();
  c.version(4, 4);
  std::set<uint32_t> seen;
  for (uint32_t scope = 0; scope <= 3; ++scope) {
    c.send_establish(scope);
    auto r = c.read<wire::EstablishStruct>();
    EXPECT_EQ(r.scope, scope);
    EXPECT_EQ(r.rv, sc::kSuccess);
    EXPECT_GT(r.context, 0u);
    EXPECT_LE(r.context, 0x7FFFFFFFu) << "pcscd hands out positive 31-bit values";
    EXPECT_TRUE(seen.insert(r.context).second);
  }
  c.send_establish(4);
  EXPECT_EQ(c.take(12), as_bytes(wire::EstablishStruct{4, 0, sc::kEInvalidValue}));
  EXPECT_TRUE(c.nothing_pending());
  EXPECT_FALSE(c.closed_by_shim());
}

TEST(ShimCoreContext, RepeatedEstablishReplacesTheContext) {
  Rig rig;
  rig.standard_desk();
  auto c = rig.client();
  const uint32_t first = c.context();
  ASSERT_EQ(c.establish().rv, sc::kSuccess);  // libpcsclite does this when the value collides
  const uint32_t second = c.context();
  EXPECT_NE(first, second);
  // The old context is gone: CONNECT and RELEASE with it fail, nothing reaches the desk.
  c.send_connect(first, kReaderA, sc::kShareShared, kT0T1);
  auto cr = c.read<wire::ConnectStruct>();
  EXPECT_EQ(cr.rv, sc::kEInvalidValue);
  EXPECT_EQ(cr.card, 0);
  EXPECT_TRUE(rig.desk.idle());
  c.send_release(first);
  EXPECT_EQ(c.take(8), as_bytes(wire::ReleaseStruct{first, sc::kEInvalidValue}));
  // The new one works.
  rig.connect(c);
}

TEST(ShimCoreContext, ReleaseChecksTheContext) {
  Rig rig;
  auto c = rig.client();
  const uint32_t ctx = c.context();
  c.send_release(ctx ^ 0x1234);
  EXPECT_EQ(c.take(8), as_bytes(wire::ReleaseStruct{ctx ^ 0x1234, sc::kEInvalidValue}));
  c.send_release(ctx);
  EXPECT_EQ(c.take(8), as_bytes(wire::ReleaseStruct{ctx, sc::kSuccess}));
  c.send_release(ctx);
  EXPECT_EQ(c.take(8), as_bytes(wire::ReleaseStruct{ctx, sc::kEInvalidValue}));
  EXPECT_TRUE(c.nothing_pending());
  EXPECT_FALSE(c.closed_by_shim());
}

TEST(ShimCoreContext, IdsAreDeterministicForASeed) {
  Rig a, b;
  auto ca = a.client();
  auto cb = b.client();
  EXPECT_EQ(ca.context(), cb.context());
  auto config = kit_config();
  config.random_seed = 0xFACE;
  Rig c(config);
  EXPECT_NE(c.client().context(), ca.context());
}

// ======================================================================================
// The reader-state array

TEST(ShimCoreArray, AllZeroBeforeTheDesk) {
  Rig rig;
  auto c = rig.client();
  auto array = c.readers_state();
  EXPECT_EQ(array.size(), 2944u);
  EXPECT_TRUE(all_zero(array));
  EXPECT_TRUE(c.nothing_pending());
  auto c6 = rig.client(6);
  c6.send_header_only(Command::kGetReadersStateSize);
  EXPECT_EQ(c6.take(4), as_bytes(int32_t{16}));
  c6.send_header_only(Command::kGetReadersStateArray);
  EXPECT_TRUE(all_zero(c6.take(kArrayBytes)));
  EXPECT_TRUE(c6.nothing_pending());
}

TEST(ShimCoreArray, EncodesNamesCounterStateBitsAndAtr) {
  Rig rig;
  rig.desk.connect();
  rig.desk.snapshot({card_in(kReaderA, 1), empty_reader(kReaderB, 0),
                     pr::ReaderInfo{"Mute Reader 00 00", sc::kStatePresent | sc::kStateMute, 3, {}},
                     pr::ReaderInfo{"Broken Reader 00 00", sc::kStateUnavailable, 7, {}}});
  auto c = rig.client();
  auto array = c.readers_state();
  ASSERT_EQ(array.size(), 2944u);
  EXPECT_EQ(slot_bytes(array, 0), entry_bytes(kReaderA, 1, 0x34, 0, kAtr, 0));
  EXPECT_EQ(slot_bytes(array, 1), entry_bytes(kReaderB, 0, 0x02, 0, {}, 0));
  EXPECT_EQ(slot_bytes(array, 2), entry_bytes("Mute Reader 00 00", 3, 0x0C, 0, {}, 0));
  EXPECT_EQ(slot_bytes(array, 3), entry_bytes("Broken Reader 00 00", 7, 0x01, 0, {}, 0));
  for (std::size_t i = 4; i < 16; ++i) EXPECT_TRUE(all_zero(slot_bytes(array, i))) << "slot " << i;
}

TEST(ShimCoreArray, SharingCountsHandlesAndExclusiveIsMinusOne) {
  Rig rig;
  rig.desk.connect();
  rig.desk.snapshot({card_in(kReaderA, 1), empty_reader(kReaderB), card_in(kReaderC, 1, kAtr2)});
  auto a = rig.client();
  auto b = rig.client();
  auto x = rig.client();
  const uint32_t ha = rig.connect(a, kReaderA);
  EXPECT_EQ(entry(a.readers_state(), 0).reader_sharing, 1);
  EXPECT_EQ(entry(a.readers_state(), 0).card_protocol, kT1) << "the negotiated protocol shows in the array";
  const uint32_t hb = rig.connect(b, kReaderA);
  EXPECT_EQ(entry(a.readers_state(), 0).reader_sharing, 2);
  rig.connect(x, kReaderC, sc::kShareExclusive);
  auto array = a.readers_state();
  EXPECT_EQ(entry(array, 2).reader_sharing, -1);
  EXPECT_EQ(entry(array, 1).reader_sharing, 0);
  EXPECT_NE(ha, hb);
  b.send_disconnect(hb, sc::kLeaveCard);
  rig.answer(pr::Op::kDisconnect, ok_reply());
  EXPECT_EQ(b.take(12), as_bytes(wire::DisconnectStruct{static_cast<int32_t>(hb), sc::kLeaveCard, sc::kSuccess}));
  EXPECT_EQ(entry(a.readers_state(), 0).reader_sharing, 1);
}

TEST(ShimCoreArray, SlotsAreStable) {
  Rig rig;
  rig.standard_desk();
  auto c = rig.client();
  rig.desk.snapshot({empty_reader(kReaderB)});  // A unplugged
  auto array = c.readers_state();
  EXPECT_TRUE(all_zero(slot_bytes(array, 0))) << "a removed reader's slot is emptied";
  EXPECT_EQ(entry_name(entry(array, 1)), kReaderB) << "the other reader keeps its slot";
  rig.desk.snapshot({empty_reader(kReaderB), card_in(kReaderC, 1, kAtr2)});
  array = c.readers_state();
  EXPECT_EQ(entry_name(entry(array, 0)), kReaderC) << "a new reader takes the first free slot";
  EXPECT_EQ(entry_name(entry(array, 1)), kReaderB);
  rig.desk.snapshot({card_in(kReaderA, 1), card_in(kReaderC, 1, kAtr2), empty_reader(kReaderB)});
  array = c.readers_state();
  EXPECT_EQ(entry_name(entry(array, 0)), kReaderC);
  EXPECT_EQ(entry_name(entry(array, 1)), kReaderB);
  EXPECT_EQ(entry_name(entry(array, 2)), kReaderA);
}

// ======================================================================================
// Event wait (4.4)

TEST(ShimCoreEvents, WaitAnswersTheArrayAndAChangeSignalsEveryWaiterOnce) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  auto b = rig.client();
  const V before = a.readers_state();
  EXPECT_EQ(a.wait_for_change(), before) << "4.4: WAIT registers and answers the array at once";
  EXPECT_EQ(b.wait_for_change(), before);
  EXPECT_TRUE(a.nothing_pending());

  rig.desk.snapshot({empty_reader(kReaderA, 2), empty_reader(kReaderB)});  // card removed
  EXPECT_EQ(a.take_all(), signal_bytes(0));
  EXPECT_EQ(b.take_all(), signal_bytes(0));

  // Unregistered after the signal: a second change sends nothing.
  rig.desk.snapshot({card_in(kReaderA, 3), empty_reader(kReaderB)});
  EXPECT_TRUE(a.nothing_pending());
  EXPECT_TRUE(b.nothing_pending());
  // STOP after the signal: nothing (the client reads the signal as its answer).
  a.send_header_only(Command::kStopWaitingReaderStateChange);
  EXPECT_TRUE(a.nothing_pending());
  EXPECT_FALSE(a.closed_by_shim());
}

TEST(ShimCoreEvents, StopWhileRegisteredAnswersZeroZero) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  a.wait_for_change();
  a.send_header_only(Command::kStopWaitingReaderStateChange);
  EXPECT_EQ(a.take_all(), signal_bytes(0));
  // Unregistered now: a change does not signal.
  rig.desk.snapshot({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  EXPECT_TRUE(a.nothing_pending());
}

TEST(ShimCoreEvents, NoSignalWithoutAChange) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  a.wait_for_change();
  rig.desk.snapshot({card_in(kReaderA, 1), empty_reader(kReaderB)});  // same content, new sequence
  EXPECT_TRUE(a.nothing_pending());
  a.send_header_only(Command::kStopWaitingReaderStateChange);
  EXPECT_EQ(a.take_all(), signal_bytes(0)) << "still registered";
}

TEST(ShimCoreEvents, ReaderEventsFor45Clients) {
  Rig rig;
  auto a = rig.client(5);
  a.send_header_only(Command::kGetReaderEvents);
  auto e0 = a.read<wire::GetReaderEvents>();
  EXPECT_EQ(e0.rv, sc::kSuccess);
  EXPECT_NE(e0.reader_events, 0u);
  rig.standard_desk();
  a.send_header_only(Command::kGetReaderEvents);
  auto e1 = a.read<wire::GetReaderEvents>();
  EXPECT_NE(e1.reader_events, e0.reader_events) << "readers were added";
  rig.desk.snapshot({empty_reader(kReaderA, 2), empty_reader(kReaderB)});  // card event only
  a.send_header_only(Command::kGetReaderEvents);
  EXPECT_EQ(a.take(8), as_bytes(wire::GetReaderEvents{e1.reader_events, sc::kSuccess}));
  rig.desk.snapshot({empty_reader(kReaderB)});  // reader removed
  a.send_header_only(Command::kGetReaderEvents);
  auto e2 = a.read<wire::GetReaderEvents>();
  EXPECT_NE(e2.reader_events, e1.reader_events);
  EXPECT_NE(e2.reader_events, 0u);
  // 4.5 WAIT still answers the array.
  a.send_header_only(Command::kWaitReaderStateChange);
  EXPECT_EQ(a.available(), 2944u);
  // A 4.4 connection does not know 0x15 (pcscd 1.9.9 closes it).
  auto old = rig.client(4);
  old.send_header_only(Command::kGetReaderEvents);
  EXPECT_TRUE(old.closed_by_shim());
  EXPECT_TRUE(old.nothing_pending());
}

TEST(ShimCoreEvents, Protocol46SizeAndArray) {
  Rig rig;
  rig.standard_desk();
  auto legacy = rig.client(4);
  const V array = legacy.readers_state();
  auto c = rig.client(6);
  c.send_header_only(Command::kWaitReaderStateChange);
  EXPECT_TRUE(c.nothing_pending()) << "4.6: WAIT registers only";
  c.send_header_only(Command::kGetReadersStateSize);
  EXPECT_EQ(c.take(4), as_bytes(int32_t{16}));
  c.send_header_only(Command::kGetReadersStateArray);
  EXPECT_EQ(c.take(kArrayBytes), array);
  EXPECT_TRUE(c.nothing_pending());
  rig.desk.snapshot({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  EXPECT_EQ(c.take_all(), signal_bytes(0));
}

TEST(ShimCoreEvents, Protocol46SignalIsHeldBackUntilTheArrayIsAnswered) {
  Rig rig;
  rig.standard_desk();
  auto c = rig.client(6);
  c.send_header_only(Command::kWaitReaderStateChange);
  rig.desk.snapshot({empty_reader(kReaderA, 2), empty_reader(kReaderB)});  // change before SIZE
  EXPECT_TRUE(c.nothing_pending()) << "the signal must not land where the client expects the size";
  c.send_header_only(Command::kGetReadersStateSize);
  EXPECT_EQ(c.take_all(), as_bytes(int32_t{16}));
  c.send_header_only(Command::kGetReadersStateArray);
  auto array = c.take(kArrayBytes);
  EXPECT_EQ(entry(array, 0).event_counter, 2u);
  EXPECT_EQ(entry(array, 0).reader_state, 0x02u);
  EXPECT_EQ(c.take_all(), signal_bytes(0)) << "then the held signal, once";
}

// ======================================================================================
// Cancel

TEST(ShimCoreCancel, RegisteredTargetGetsCancelledAndCancellerSuccess) {
  Rig rig;
  rig.standard_desk();
  auto target = rig.client();
  target.wait_for_change();
  auto canceller = rig.raw_client();  // SCardCancel: new socket, only SCARD_CANCEL
  canceller.send_cancel(target.context());
  EXPECT_EQ(canceller.take_all(), as_bytes(wire::CancelStruct{static_cast<int32_t>(target.context()), sc::kSuccess}));
  EXPECT_EQ(target.take_all(), as_bytes(wire::WaitReaderStateChange{0, 0x80100002}));
  // Unregistered: a change sends nothing more.
  rig.desk.snapshot({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  EXPECT_TRUE(target.nothing_pending());
}

TEST(ShimCoreCancel, NotWaitingAndUnknownTargets) {
  Rig rig;
  rig.standard_desk();
  auto t44 = rig.client(4);
  auto t45 = rig.client(5);
  auto t46 = rig.client(6);
  auto canceller = rig.raw_client();
  canceller.send_cancel(t44.context());
  EXPECT_EQ(canceller.read<wire::CancelStruct>().rv, sc::kEInvalidHandle) << "pcscd 1.9.9";
  canceller.send_cancel(t45.context());
  EXPECT_EQ(canceller.read<wire::CancelStruct>().rv, sc::kSuccess) << "pcscd 2.0.1+";
  canceller.send_cancel(t46.context());
  EXPECT_EQ(canceller.read<wire::CancelStruct>().rv, sc::kSuccess);
  const uint32_t unknown = (t44.context() ^ t45.context() ^ t46.context()) | 1u;
  canceller.send_cancel(unknown);
  EXPECT_EQ(canceller.take_all(), as_bytes(wire::CancelStruct{static_cast<int32_t>(unknown), sc::kEInvalidHandle}));
  EXPECT_TRUE(t44.nothing_pending());
  EXPECT_TRUE(t45.nothing_pending());
  EXPECT_TRUE(t46.nothing_pending());
  // A 4.4 target that was already signalled is no longer waiting either.
  t44.wait_for_change();
  rig.desk.snapshot({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  EXPECT_EQ(t44.take_all(), signal_bytes(0));
  canceller.send_cancel(t44.context());
  EXPECT_EQ(canceller.read<wire::CancelStruct>().rv, sc::kEInvalidHandle);
  EXPECT_TRUE(t44.nothing_pending());
}

// ======================================================================================
// Connect

TEST(ShimCoreConnect, ForwardsToTheDeskAndNeverExposesTheDeskHandle) {
  Rig rig;
  rig.standard_desk();
  auto c = rig.client();
  c.send_connect(kReaderA, sc::kShareShared, kT0T1);
  EXPECT_TRUE(c.nothing_pending()) << "answered only after the desk";
  pr::Request q;
  const uint32_t id = rig.desk.expect(pr::Op::kConnect, &q);
  EXPECT_EQ(q.reader, kReaderA);
  EXPECT_EQ(q.share_mode, sc::kShareShared);
  EXPECT_EQ(q.protocols, kT0T1);
  EXPECT_NE(q.context.value, 0u);
  pr::Reply r = ok_reply({}, kT1);
  r.handle = pr::DeskHandle{0x0000BEEF};
  r.state = (1u << 16) | kState34;
  r.card_protocol = kT1;
  rig.desk.reply(id, r);
  auto rep = c.read<wire::ConnectStruct>();
  EXPECT_TRUE(c.nothing_pending());
  EXPECT_EQ(rep.rv, sc::kSuccess);
  EXPECT_EQ(rep.context, c.context());
  EXPECT_EQ(wire::read_name(rep.reader), kReaderA);
  EXPECT_EQ(rep.share_mode, sc::kShareShared);
  EXPECT_EQ(rep.preferred_protocols, kT0T1);
  EXPECT_EQ(rep.active_protocol, kT1);
  EXPECT_GT(rep.card, 0);
  EXPECT_NE(static_cast<uint32_t>(rep.card), 0x0000BEEFu);
  // The shim's handle maps to the desk's handle.
  c.send_transmit(static_cast<uint32_t>(rep.card), kSelect);
  pr::Request t;
  rig.desk.expect(pr::Op::kTransmit, &t);
  EXPECT_EQ(t.handle.value, 0x0000BEEFu);
  EXPECT_EQ(t.context, q.context);

  // Many connects: handles unique, positive, never the desk's value.
  std::set<uint32_t> cards{static_cast<uint32_t>(rep.card)};
  for (uint32_t i = 0; i < 20; ++i) {
    auto x = rig.client();
    const uint32_t desk_handle = 0x100 + i;
    const uint32_t card = rig.connect(x, kReaderA, sc::kShareShared, desk_handle);
    EXPECT_NE(card, desk_handle);
    EXPECT_GT(card, 0u);
    EXPECT_LE(card, 0x7FFFFFFFu);
    EXPECT_TRUE(cards.insert(card).second);
  }
}

TEST(ShimCoreConnect, ArgumentChecksInPcscdOrder) {
  Rig rig;
  rig.standard_desk();
  auto c = rig.client();
  auto expect_rv = [&](const std::string& reader, uint32_t share, uint32_t protocols, uint32_t rv) {
    c.send_connect(reader, share, protocols);
    auto r = c.read<wire::ConnectStruct>();
    EXPECT_EQ(r.rv, rv) << reader << " share " << share << " protocols " << protocols;
    EXPECT_EQ(r.card, 0);
    EXPECT_EQ(r.active_protocol, 0u);
    EXPECT_TRUE(c.nothing_pending());
    EXPECT_TRUE(rig.desk.idle()) << "refused locally";
  };
  const std::string unknown = "No Such Reader 00 00";
  expect_rv(unknown, 5, 0, sc::kEProtoMismatch);                        // protocol first
  expect_rv(unknown, 5, sc::kProtocolT15, sc::kEProtoMismatch);     // T15 alone is not a protocol
  expect_rv(unknown, 5, kT0T1, sc::kEInvalidValue);                     // then the share mode
  expect_rv(unknown, 0, sc::kProtocolAnyOld, sc::kEInvalidValue);       // 0x1000 passes the protocol check
  expect_rv(unknown, sc::kShareShared, kT0T1, sc::kEUnknownReader);     // then the reader
  expect_rv(kReaderA, 4, sc::kProtocolRaw, sc::kEInvalidValue);
  // DIRECT needs no protocol: forwarded.
  c.send_connect(kReaderA, sc::kShareDirect, 0);
  pr::Request q;
  rig.desk.expect(pr::Op::kConnect, &q);
  EXPECT_EQ(q.share_mode, sc::kShareDirect);
  EXPECT_EQ(q.protocols, 0u);
}

TEST(ShimCoreConnect, WithoutADeskTheReaderIsUnknown) {
  Rig rig;
  auto c = rig.client();
  c.send_connect(kReaderA);
  EXPECT_EQ(c.read<wire::ConnectStruct>().rv, sc::kEUnknownReader);
  EXPECT_TRUE(rig.fx.desk.empty());
}

// ======================================================================================
// Transmit

TEST(ShimCoreTransmit, ForwardsAndAnswersByteExact) {
  Rig rig;
  rig.standard_desk();
  auto c = rig.client();
  const uint32_t h = rig.connect(c, kReaderA, sc::kShareShared, 0x0000BEEF);
  auto sent = c.send_transmit(h, kSelect, 100000);  // a caller buffer above 65548
  EXPECT_TRUE(c.nothing_pending());
  pr::Request q;
  const uint32_t id = rig.desk.expect(pr::Op::kTransmit, &q);
  EXPECT_EQ(q.handle.value, 0x0000BEEFu);
  EXPECT_EQ(q.data, kSelect);
  EXPECT_EQ(q.protocols, kT1);
  EXPECT_EQ(q.recv_protocol, kT0T1);
  EXPECT_EQ(q.recv_length, 65548u) << "clamped to MAX_BUFFER_SIZE_EXTENDED";
  EXPECT_EQ(q.flags, 0u);
  rig.desk.reply(id, ok_reply(kSw9000, 1));
  wire::TransmitStruct want = sent;
  want.recv_pci_protocol = 1;  // what the driver left in the receive PCI
  want.recv_length = 2;
  want.rv = sc::kSuccess;
  EXPECT_EQ(c.take_all(), cat(as_bytes(want), kSw9000));
}

TEST(ShimCoreTransmit, DataOnlyWithSuccess) {
  Rig rig;
  rig.standard_desk();
  auto c = rig.client();
  const uint32_t h = rig.connect(c);
  c.send_transmit(h, kSelect);
  pr::Reply bad = rv_reply(sc::kENotTransacted);
  bad.data = {0x01, 0x02, 0x03};  // a careless desk: must not reach the client
  rig.answer(pr::Op::kTransmit, bad);
  auto r = c.read<wire::TransmitStruct>();
  EXPECT_EQ(r.rv, sc::kENotTransacted);
  EXPECT_EQ(r.recv_length, 0u);
  EXPECT_TRUE(c.nothing_pending()) << "no data after an error";
}

TEST(ShimCoreTransmit, ResponseLargerThanTheBufferGivesInsufficientBufferAndKeepsTheStreamInStep) {
  Rig rig;
  rig.standard_desk();
  auto c = rig.client();
  const uint32_t h = rig.connect(c);
  auto sent = c.send_transmit(h, kSelect, 2);
  rig.answer(pr::Op::kTransmit, ok_reply({0x6F, 0x00, 0x84, 0x01, 0x90, 0x00}));
  auto r = c.read<wire::TransmitStruct>();
  EXPECT_EQ(r.rv, sc::kEInsufficientBuffer);
  EXPECT_EQ(r.recv_length, 6u) << "the length needed";
  EXPECT_EQ(r.card, sent.card);
  EXPECT_TRUE(c.nothing_pending());
  c.send_transmit(h, kSelect, 258);
  rig.answer(pr::Op::kTransmit, ok_reply(kSw9000));
  auto t = read_tx(c);
  EXPECT_EQ(t.s.rv, sc::kSuccess);
  EXPECT_EQ(t.data, kSw9000);
  EXPECT_TRUE(c.nothing_pending());
}

TEST(ShimCoreTransmit, InterleavedClientsGetTheirOwnReplies) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a, kReaderA, sc::kShareShared, 0xA);
  const uint32_t hb = rig.connect(b, kReaderA, sc::kShareShared, 0xB);
  a.send_transmit(ha, {0x00, 0xB0, 0x00, 0x00, 0x02});
  b.send_transmit(hb, {0x00, 0xB0, 0x00, 0x02, 0x02});
  pr::Request qa, qb;
  const uint32_t ida = rig.desk.expect(pr::Op::kTransmit, &qa);
  const uint32_t idb = rig.desk.expect(pr::Op::kTransmit, &qb);
  EXPECT_EQ(qa.handle.value, 0xAu);
  EXPECT_EQ(qb.handle.value, 0xBu);
  EXPECT_NE(qa.context, qb.context);
  rig.desk.reply(idb, ok_reply({0xBB, 0xBB, 0x90, 0x00}));
  EXPECT_TRUE(a.nothing_pending());
  rig.desk.reply(ida, ok_reply({0xAA, 0xAA, 0x90, 0x00}));
  auto ra = read_tx(a);
  auto rb = read_tx(b);
  EXPECT_EQ(ra.data, (V{0xAA, 0xAA, 0x90, 0x00}));
  EXPECT_EQ(rb.data, (V{0xBB, 0xBB, 0x90, 0x00}));
  EXPECT_EQ(static_cast<uint32_t>(ra.s.card), ha);
  EXPECT_EQ(static_cast<uint32_t>(rb.s.card), hb);
  EXPECT_TRUE(a.nothing_pending());
  EXPECT_TRUE(b.nothing_pending());
}

TEST(ShimCoreControl, ForwardsTrailingDataAndChecksTheBuffer) {
  Rig rig;
  rig.standard_desk();
  auto c = rig.client();
  const uint32_t h = rig.connect(c, kReaderA, sc::kShareShared, 0xC7);
  const V data = {0x01, 0x02};
  c.send_control(h, 0x42000D48, data, 100);
  pr::Request q;
  uint32_t id = rig.desk.expect(pr::Op::kControl, &q);
  EXPECT_EQ(q.handle.value, 0xC7u);
  EXPECT_EQ(q.code, 0x42000D48u);
  EXPECT_EQ(q.data, data);
  EXPECT_EQ(q.recv_length, 100u);
  const V tlv = {0x12, 0x04, 0x42, 0x33, 0x00, 0x12};
  rig.desk.reply(id, ok_reply(tlv));
  EXPECT_EQ(c.take_all(), cat(as_bytes(wire::ControlStruct{static_cast<int32_t>(h), 0x42000D48, 2, 100, 6, 0}), tlv));
  c.send_control(h, 0x42000D48, {}, 4);
  rig.answer(pr::Op::kControl, ok_reply(tlv));
  EXPECT_EQ(c.take_all(), as_bytes(wire::ControlStruct{static_cast<int32_t>(h), 0x42000D48, 0, 4, 6, sc::kEInsufficientBuffer}));
  c.send_control(h, 0x42000001, {}, 100);
  rig.answer(pr::Op::kControl, rv_reply(sc::kEUnsupportedFeature));
  auto r = c.read<wire::ControlStruct>();
  EXPECT_EQ(r.rv, sc::kEUnsupportedFeature);
  EXPECT_TRUE(c.nothing_pending());
}

TEST(ShimCoreDisconnect, UnpowerLeavesThePresentBitAndResetsTheOthers) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b);
  a.send_disconnect(ha, sc::kUnpowerCard);
  EXPECT_TRUE(a.nothing_pending());
  rig.answer(pr::Op::kDisconnect, ok_reply());
  EXPECT_EQ(a.take_all(), as_bytes(wire::DisconnectStruct{static_cast<int32_t>(ha), sc::kUnpowerCard, sc::kSuccess}));
  auto e = entry(b.readers_state(), 0);
  EXPECT_EQ(e.reader_state, 0x04u) << "pcscd: Disconnect(UNPOWER) leaves PRESENT only";
  EXPECT_EQ(e.atr_length, 5u) << "and keeps the ATR";
  EXPECT_EQ(e.card_protocol, 0u);
  EXPECT_EQ(e.reader_sharing, 1);
  EXPECT_EQ(b.status(hb), sc::kWResetCard);
}

TEST(ShimCoreDisconnect, ResetWaitsForAnotherHandlesTransaction) {
  Rig rig;  // no optimizations: the transaction is taken at the desk
  rig.standard_desk();
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b);
  begin_at_desk(rig, a, ha);
  b.send_disconnect(hb, sc::kResetCard);
  EXPECT_TRUE(b.nothing_pending()) << "pcscd blocks it while A holds the transaction";
  EXPECT_EQ(a.status(ha), sc::kSuccess);
  a.send_end(ha, sc::kLeaveCard);
  drain_end_first(rig);
  EXPECT_EQ(a.read<wire::EndStruct>().rv, sc::kSuccess);
  EXPECT_EQ(b.take_all(), as_bytes(wire::DisconnectStruct{static_cast<int32_t>(hb), sc::kResetCard, sc::kSuccess}));
  EXPECT_EQ(a.status(ha), sc::kWResetCard);
}

TEST(ShimCoreClients, ReplyForAClientThatWentAwayGoesNowhere) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b);
  a.send_transmit(ha, kSelect);
  const uint32_t id = rig.desk.expect(pr::Op::kTransmit);
  a.close();  // FakeEffects fails the test if anything is sent to it from now on
  const uint32_t release = rig.desk.expect(pr::Op::kReleaseContext);
  rig.desk.reply(id, ok_reply(kSw9000));
  b.send_transmit(hb, kSelect);
  // The release may reset the card: B's transmit goes at once, but tells the desk to run
  // it after the release (desk-ordering).
  pr::Request q;
  const uint32_t tx = rig.desk.expect(pr::Op::kTransmit, &q);
  EXPECT_EQ(q.after, std::vector<uint32_t>{release});
  rig.desk.reply(release, ok_reply());
  rig.desk.reply(tx, ok_reply(kSw9000));
  EXPECT_EQ(read_tx(b).data, kSw9000);
  EXPECT_EQ(rig.core.client_count(), 1u);
}

TEST(ShimCoreClients, WithADeskWithoutOrderingTheShimHoldsTheOtherClientBack) {
  Rig rig;
  rig.standard_desk(pr::caps::kAll & ~pr::caps::kDeskOrdering);
  auto a = rig.client();
  auto b = rig.client();
  rig.connect(a);
  const uint32_t hb = rig.connect(b);
  a.close();
  const uint32_t release = rig.desk.expect(pr::Op::kReleaseContext);
  b.send_transmit(hb, kSelect);
  EXPECT_TRUE(rig.desk.idle()) << "the release may reset the card: B waits for it";
  rig.desk.reply(release, ok_reply());
  pr::Request q;
  rig.desk.expect(pr::Op::kTransmit, &q);
  EXPECT_TRUE(q.after.empty());
}

// ======================================================================================
// Status (answered locally, pcscd's order)

TEST(ShimCoreStatus, SharingViolationBeforeRemoved) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b);
  EXPECT_EQ(a.status(ha), sc::kSuccess);
  begin_at_desk(rig, b, hb);
  EXPECT_EQ(a.status(ha), sc::kESharingViolation);
  // Card out and in: A has a removal pending; B reconnects and takes the lock again.
  rig.desk.snapshot({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  rig.desk.snapshot({card_in(kReaderA, 3), empty_reader(kReaderB)});
  reconnect_at_desk(rig, b, hb, sc::kLeaveCard, 3);
  begin_at_desk(rig, b, hb);
  const std::size_t before = rig.fx.desk.size();
  EXPECT_EQ(a.status(ha), sc::kESharingViolation);
  end_at_desk(rig, b, hb);
  EXPECT_EQ(a.status(ha), sc::kWRemovedCard);
  EXPECT_EQ(a.status(ha), sc::kWRemovedCard) << "returned on every call";
  EXPECT_EQ(rig.fx.desk.size(), before + 1) << "STATUS itself never goes to the desk (only B's END did)";
}

TEST(ShimCoreStatus, RemovedBeforeReset) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b);
  reconnect_at_desk(rig, b, hb, sc::kResetCard, 1);
  EXPECT_EQ(a.status(ha), sc::kWResetCard);
  EXPECT_EQ(b.status(hb), sc::kSuccess) << "the resetting handle itself is clean";
  rig.desk.snapshot({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  EXPECT_EQ(a.status(ha), sc::kWRemovedCard);
}

TEST(ShimCoreStatus, ResetBeforeReaderUnavailable) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b);
  reconnect_at_desk(rig, b, hb, sc::kResetCard, 1);
  rig.desk.snapshot({pr::ReaderInfo{kReaderA, sc::kStateUnavailable, 1, {}}, empty_reader(kReaderB)});
  EXPECT_EQ(entry(a.readers_state(), 0).reader_state, 0x01u);
  EXPECT_EQ(a.status(ha), sc::kWResetCard);
  EXPECT_EQ(b.status(hb), sc::kEReaderUnavailable);
}

TEST(ShimCoreStatus, DirectHandleInsertionIsNotARemoval) {
  Rig rig;
  rig.standard_desk();
  auto c = rig.client();
  const uint32_t h = rig.connect(c, kReaderB, sc::kShareDirect, 0, 0, 0, sc::kReaderAbsent);
  EXPECT_EQ(c.status(h), sc::kSuccess) << "DIRECT on an empty reader";
  EXPECT_EQ(entry(c.readers_state(), 1).reader_sharing, 1) << "DIRECT handles count in readerSharing";
  rig.desk.snapshot({card_in(kReaderA, 1), card_in(kReaderB, 1)});  // inserted
  EXPECT_EQ(c.status(h), sc::kSuccess) << "an insertion is not a removal";
  rig.desk.snapshot({card_in(kReaderA, 1), empty_reader(kReaderB, 2)});  // removed
  EXPECT_EQ(c.status(h), sc::kWRemovedCard);
}

// ======================================================================================
// Bad clients

TEST(ShimCoreClients, ForeignHandleClosesOnlyThatConnection) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const std::size_t desk_before = rig.fx.desk.size();
  b.send_status(ha);
  EXPECT_TRUE(b.closed_by_shim());
  EXPECT_TRUE(b.nothing_pending());
  EXPECT_EQ(rig.core.stats().protocol_errors, 1u);
  auto c = rig.client();
  c.send_transmit(ha, kSelect);
  EXPECT_TRUE(c.closed_by_shim());
  EXPECT_TRUE(c.nothing_pending());
  EXPECT_EQ(rig.fx.desk.size(), desk_before) << "nothing reached the desk";
  // The owner is unaffected.
  EXPECT_FALSE(a.closed_by_shim());
  EXPECT_EQ(a.status(ha), sc::kSuccess);
  a.send_transmit(ha, kSelect);
  rig.answer(pr::Op::kTransmit, ok_reply(kSw9000));
  EXPECT_EQ(read_tx(a).data, kSw9000);
}

TEST(ShimCoreClients, MalformedInputClosesOnlyThatClient) {
  Rig rig;
  rig.standard_desk();
  auto good = rig.client();
  // Half a request from the good client first: it must survive the others' errors.
  wire::Header gh{0, static_cast<uint32_t>(Command::kGetReadersState)};
  const V ghb = as_bytes(gh);
  good.send_raw(V(ghb.begin(), ghb.begin() + 3));

  auto bad_size = rig.client();
  bad_size.request(Command::kEstablishContext, V(13, 0));
  EXPECT_TRUE(bad_size.closed_by_shim());
  auto list_readers = rig.client();
  list_readers.request(Command::kListReaders, V(8, 0));
  EXPECT_TRUE(list_readers.closed_by_shim());
  auto unused = rig.client();
  unused.request(static_cast<Command>(0x0C));
  EXPECT_TRUE(unused.closed_by_shim());
  auto unknown = rig.client();
  unknown.request(static_cast<Command>(0x42));
  EXPECT_TRUE(unknown.closed_by_shim());
  auto huge = rig.client();
  wire::TransmitStruct t{};
  t.send_length = 65549;
  huge.request_struct(Command::kTransmit, t);
  EXPECT_TRUE(huge.closed_by_shim());
  auto attr = rig.client();
  wire::GetSetStruct g{};
  g.attr_length = 265;
  attr.request_struct(Command::kGetAttrib, g);
  EXPECT_TRUE(attr.closed_by_shim());
  EXPECT_EQ(rig.core.stats().protocol_errors, 6u);
  for (auto* x : {&bad_size, &list_readers, &unused, &unknown, &huge, &attr}) EXPECT_TRUE(x->nothing_pending());

  EXPECT_FALSE(good.closed_by_shim());
  good.send_raw(V(ghb.begin() + 3, ghb.end()));
  auto array = good.take(kArrayBytes);
  EXPECT_EQ(entry_name(entry(array, 0)), kReaderA);
  EXPECT_TRUE(good.nothing_pending());
}

TEST(ShimCoreClients, CloseReleasesTheDeskContext) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  auto idle = rig.client();
  pr::Request connect_req;
  rig.connect(a, kReaderA, sc::kShareShared, 0, kT1, 1, kState34, &connect_req);
  EXPECT_EQ(entry(idle.readers_state(), 0).reader_sharing, 1);
  a.close();
  pr::Request q;
  rig.desk.expect(pr::Op::kReleaseContext, &q);
  EXPECT_EQ(q.context, connect_req.context);
  EXPECT_TRUE(rig.desk.idle()) << "no Disconnect(RESET) for a plain shared handle";
  EXPECT_EQ(entry(idle.readers_state(), 0).reader_sharing, 0);
  // A client that never used the desk has no desk context to release.
  idle.close();
  EXPECT_TRUE(rig.desk.idle());
  EXPECT_EQ(rig.core.client_count(), 0u);
  EXPECT_EQ(rig.core.handle_count(), 0u);
}

TEST(ShimCoreClients, ReleaseContextReleasesTheDeskContext) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  pr::Request connect_req;
  rig.connect(a, kReaderA, sc::kShareShared, 0, kT1, 1, kState34, &connect_req);
  a.send_release(a.context());
  EXPECT_EQ(a.take_all(), as_bytes(wire::ReleaseStruct{a.context(), sc::kSuccess}));
  pr::Request q;
  rig.desk.expect(pr::Op::kReleaseContext, &q);
  EXPECT_EQ(q.context, connect_req.context);
  EXPECT_EQ(rig.core.handle_count(), 0u);
}

// ======================================================================================
// Desk loss and orphans

TEST(ShimCoreDeskLoss, InFlightTransmitFailsAtOnceReadersVanishWaitersSignalled) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  auto w = rig.client();
  const uint32_t ha = rig.connect(a);
  w.wait_for_change();
  a.send_transmit(ha, kSelect);
  rig.desk.expect(pr::Op::kTransmit);
  EXPECT_TRUE(a.nothing_pending());
  rig.core.desk_disconnected(rig.now);
  auto r = a.read<wire::TransmitStruct>();
  EXPECT_EQ(r.rv, sc::kEReaderUnavailable);
  EXPECT_TRUE(a.nothing_pending());
  EXPECT_EQ(w.take_all(), signal_bytes(0));
  EXPECT_TRUE(all_zero(a.readers_state()));
  EXPECT_FALSE(rig.core.desk_up());
  EXPECT_FALSE(a.closed_by_shim());
}

TEST(ShimCoreDeskLoss, OrphanHandlesAnswerInvalidValueAndStayOrphanedInANewSession) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(a);
  rig.core.desk_disconnected(rig.now);
  const std::size_t desk_before = rig.fx.desk.size();

  a.send_transmit(ha, kSelect);
  auto t = a.read<wire::TransmitStruct>();
  EXPECT_EQ(t.rv, sc::kEInvalidValue);
  EXPECT_TRUE(a.nothing_pending());
  a.send_begin(ha);
  EXPECT_EQ(a.read<wire::BeginStruct>().rv, sc::kEInvalidValue);
  EXPECT_EQ(a.status(ha), sc::kEReaderUnavailable) << "libpcsclite: the reader name is not in the array";
  a.send_status(ha);
  EXPECT_EQ(a.read<wire::StatusStruct>().rv, sc::kEInvalidValue);
  a.send_end(ha, sc::kLeaveCard);
  EXPECT_EQ(a.read<wire::EndStruct>().rv, sc::kEInvalidValue);
  a.send_control(ha, 0x42000D48, {}, 100);
  EXPECT_EQ(a.take_all(), as_bytes(wire::ControlStruct{static_cast<int32_t>(ha), 0x42000D48, 0, 100, 0, sc::kEInvalidValue}));
  a.send_get_attrib(ha, sc::kAttrVendorName);
  EXPECT_EQ(a.read<wire::GetSetStruct>().rv, sc::kEInvalidValue);
  a.send_reconnect(ha, sc::kShareShared, kT0T1, sc::kLeaveCard);
  EXPECT_EQ(a.read<wire::ReconnectStruct>().rv, sc::kEInvalidValue);
  EXPECT_TRUE(a.nothing_pending());

  // A new desk session brings the readers back; the old handles stay orphans.
  rig.desk.connect(caps::kAll, 0xD35C0002);
  rig.desk.snapshot({card_in(kReaderA, 1), empty_reader(kReaderB)});
  EXPECT_EQ(entry_name(entry(a.readers_state(), 0)), kReaderA);
  const std::size_t after_hello = rig.fx.desk.size();
  a.send_transmit(ha, kSelect);
  EXPECT_EQ(a.read<wire::TransmitStruct>().rv, sc::kEInvalidValue);
  EXPECT_EQ(a.status(ha), sc::kEInvalidValue) << "same name again: 0x0B is sent and fails";
  EXPECT_EQ(entry(a.readers_state(), 0).reader_sharing, 0) << "orphans do not count";
  a.send_disconnect(ha, sc::kLeaveCard);
  EXPECT_EQ(a.take_all(), as_bytes(wire::DisconnectStruct{static_cast<int32_t>(ha), sc::kLeaveCard, sc::kSuccess}));
  a.send_disconnect(hb, sc::kResetCard);
  EXPECT_EQ(a.read<wire::DisconnectStruct>().rv, sc::kSuccess);
  EXPECT_EQ(rig.fx.desk.size(), after_hello) << "orphans never reach the new desk";
  EXPECT_GT(after_hello, desk_before);
  // The context itself still works.
  rig.connect(a);
}

TEST(ShimCoreDeskLoss, UnpluggedReaderOrphansItsHandlesEvenIfItComesBack) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b, kReaderB, sc::kShareDirect, 0, 0, 0, sc::kReaderAbsent);
  rig.desk.snapshot({empty_reader(kReaderB)});  // A unplugged
  EXPECT_EQ(a.status(ha), sc::kEReaderUnavailable);
  a.send_transmit(ha, kSelect);
  EXPECT_EQ(a.read<wire::TransmitStruct>().rv, sc::kEInvalidValue);
  rig.desk.snapshot({empty_reader(kReaderB), card_in(kReaderA, 1)});  // back (slot 0 again)
  EXPECT_EQ(entry(a.readers_state(), 0).reader_sharing, 0);
  EXPECT_EQ(a.status(ha), sc::kEInvalidValue);
  const std::size_t before = rig.fx.desk.size();
  a.send_transmit(ha, kSelect);
  EXPECT_EQ(a.read<wire::TransmitStruct>().rv, sc::kEInvalidValue);
  EXPECT_EQ(rig.fx.desk.size(), before);
  EXPECT_EQ(b.status(hb), sc::kSuccess) << "the other reader's handle is untouched";
}

// ======================================================================================
// Desk link rules

TEST(ShimCoreDesk, MalformedFrameResetsTheLink) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  const uint32_t ha = rig.connect(a);
  a.send_transmit(ha, kSelect);
  rig.desk.expect(pr::Op::kTransmit);
  const V garbage = {0x0A, 0xFF, 0xFF, 0x01};
  ASSERT_FALSE(pr::decode(garbage).ok()) << "precondition: not a valid message";
  rig.desk.payload(garbage);
  ASSERT_EQ(rig.fx.resets.size(), 1u);
  EXPECT_FALSE(rig.core.desk_up());
  EXPECT_EQ(a.read<wire::TransmitStruct>().rv, sc::kEReaderUnavailable);
}

TEST(ShimCoreDesk, HelloAnsweredOnlyWhenNotAReply) {
  Rig rig;
  auto first = rig.desk.transport_up();
  EXPECT_EQ(first.role, pr::Role::kServer);
  EXPECT_FALSE(first.reply);
  EXPECT_EQ(first.capabilities, caps::kAll);
  EXPECT_EQ(first.peer_name, "unit-shim");
  EXPECT_EQ(first.version_major, pr::kVersionMajor);
  rig.desk.hello(caps::kAll, 7, /*reply=*/true);
  EXPECT_TRUE(rig.core.desk_up());
  EXPECT_TRUE(rig.desk.idle()) << "no answer to a reply";
  rig.desk.hello(caps::kAll, 7, /*reply=*/false);
  auto m = rig.desk.next();
  ASSERT_TRUE(m && std::holds_alternative<pr::Hello>(m->body));
  EXPECT_TRUE(std::get<pr::Hello>(m->body).reply);
  EXPECT_EQ(std::get<pr::Hello>(m->body).instance, first.instance);
  EXPECT_EQ(rig.core.desk_generation(), 1u) << "same instance: the same session";
  EXPECT_EQ(rig.core.stats().desk_sessions, 1u);
  EXPECT_EQ(rig.core.negotiated_capabilities(), caps::kAll);
}

TEST(ShimCoreDesk, RepeatedHelloOfTheSameInstanceKeepsHandles) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  const uint32_t ha = rig.connect(a);
  const auto gen = rig.core.desk_generation();
  rig.desk.hello(caps::kAll, 0xD35C0001);  // the instance of standard_desk()
  ASSERT_TRUE(rig.desk.next().has_value());  // our hello reply
  EXPECT_EQ(rig.core.desk_generation(), gen);
  a.send_transmit(ha, kSelect);
  rig.answer(pr::Op::kTransmit, ok_reply(kSw9000));
  EXPECT_EQ(read_tx(a).s.rv, sc::kSuccess);
}

TEST(ShimCoreDesk, NewInstanceStartsANewSession) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  const uint32_t ha = rig.connect(a);
  const auto gen = rig.core.desk_generation();
  rig.desk.hello(caps::kAll, 0xD35C0099);
  EXPECT_EQ(rig.core.desk_generation(), gen + 1);
  EXPECT_EQ(rig.core.stats().desk_sessions, 2u);
  EXPECT_TRUE(all_zero(a.readers_state())) << "the new session has pushed no readers yet";
  a.send_transmit(ha, kSelect);
  EXPECT_EQ(a.read<wire::TransmitStruct>().rv, sc::kEInvalidValue);
}

TEST(ShimCoreDesk, MajorMismatchSendsErrorAndResets) {
  Rig rig;
  rig.desk.transport_up();
  rig.desk.hello(caps::kAll, 1, false, pr::kVersionMajor + 1);
  auto m = rig.desk.next();
  ASSERT_TRUE(m && std::holds_alternative<pr::Error>(m->body));
  EXPECT_EQ(std::get<pr::Error>(m->body).code, pr::ErrorCode::kVersion);
  EXPECT_EQ(rig.fx.resets.size(), 1u);
  EXPECT_FALSE(rig.core.desk_up());
}

TEST(ShimCoreDesk, PeerThatIsNotADeskIsRefused) {
  Rig rig;
  rig.desk.transport_up();
  rig.desk.hello(caps::kAll, 1, false, pr::kVersionMajor, pr::Role::kServer);
  EXPECT_EQ(rig.fx.resets.size(), 1u);
  EXPECT_FALSE(rig.core.desk_up());
}

TEST(ShimCoreDesk, ReplyWithUnknownIdIsIgnored) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  const uint32_t ha = rig.connect(a);
  a.send_transmit(ha, kSelect);
  const uint32_t id = rig.desk.expect(pr::Op::kTransmit);
  rig.desk.reply(id + 1000, ok_reply({0xDE, 0xAD, 0x90, 0x00}));
  EXPECT_TRUE(a.nothing_pending());
  EXPECT_TRUE(rig.fx.resets.empty());
  EXPECT_TRUE(rig.core.desk_up());
  rig.desk.reply(id, ok_reply(kSw9000));
  EXPECT_EQ(read_tx(a).data, kSw9000);
}

TEST(ShimCoreDesk, NothingBeforeHelloAndNoRequestsFromTheDesk) {
  Rig rig;
  rig.desk.transport_up();
  rig.desk.snapshot({card_in(kReaderA, 1)});  // before the hello exchange: ignored
  auto c = rig.client();
  EXPECT_TRUE(all_zero(c.readers_state()));
  rig.desk.hello(caps::kAll, 5);
  rig.desk.next();
  rig.desk.send(pr::Message{0, pr::Error{pr::ErrorCode::kLimit, "just saying"}});
  EXPECT_TRUE(rig.core.desk_up()) << "an Error is only logged";
  EXPECT_TRUE(rig.fx.resets.empty());
  pr::Request q;
  q.op = pr::Op::kPing;
  rig.desk.send(pr::Message{1, q});  // a desk never sends requests
  EXPECT_EQ(rig.fx.resets.size(), 1u);
  EXPECT_FALSE(rig.core.desk_up());
}

TEST(ShimCoreDesk, HelloIsRetriedUntilTheDeskAnswers) {
  Rig rig;
  const auto t0 = rig.now;
  auto first = rig.desk.transport_up();
  ASSERT_TRUE(rig.core.next_deadline().has_value());
  EXPECT_EQ(*rig.core.next_deadline(), t0 + 500ms);
  rig.core.tick(t0 + 499ms);
  EXPECT_TRUE(rig.desk.idle());
  rig.core.tick(t0 + 500ms);
  auto m = rig.desk.next();
  ASSERT_TRUE(m && std::holds_alternative<pr::Hello>(m->body));
  EXPECT_FALSE(std::get<pr::Hello>(m->body).reply);
  EXPECT_EQ(std::get<pr::Hello>(m->body).instance, first.instance);
  EXPECT_EQ(*rig.core.next_deadline(), t0 + 1000ms);
  rig.desk.hello(caps::kAll, 3);
  ASSERT_TRUE(rig.desk.next().has_value());  // hello reply
  EXPECT_TRUE(rig.core.desk_up());
  EXPECT_FALSE(rig.core.next_deadline().has_value()) << "established and idle: no timer";
  rig.core.tick(t0 + 10s);
  EXPECT_TRUE(rig.desk.idle());
}

TEST(ShimCoreDesk, LivenessProbeOnlyWhileRequestsAreOutstanding) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  const uint32_t ha = rig.connect(a);  // the desk's last frame arrives at rig.now
  const auto t = rig.now;
  EXPECT_FALSE(rig.core.next_deadline().has_value()) << "an idle link carries nothing";
  a.send_transmit(ha, kSelect);
  const uint32_t id = rig.desk.expect(pr::Op::kTransmit);
  ASSERT_TRUE(rig.core.next_deadline().has_value());
  EXPECT_EQ(*rig.core.next_deadline(), t + 5s);
  rig.core.tick(t + 4999ms);
  EXPECT_TRUE(rig.desk.idle());
  rig.core.tick(t + 5s);
  const uint32_t ping = rig.desk.expect(pr::Op::kPing);
  EXPECT_EQ(*rig.core.next_deadline(), t + 10s);
  rig.now = t + 6s;
  rig.desk.reply(ping, ok_reply());
  EXPECT_TRUE(rig.core.desk_up());
  EXPECT_EQ(*rig.core.next_deadline(), t + 11s) << "counted again from the desk's last byte";
  rig.desk.reply(id, ok_reply(kSw9000));
  EXPECT_EQ(read_tx(a).data, kSw9000);
  EXPECT_FALSE(rig.core.next_deadline().has_value());
}

TEST(ShimCoreDesk, UnansweredLivenessProbeLosesTheDesk) {
  Rig rig;
  rig.standard_desk();
  auto a = rig.client();
  const uint32_t ha = rig.connect(a);
  const auto t = rig.now;
  a.send_transmit(ha, kSelect);
  rig.desk.expect(pr::Op::kTransmit);
  rig.core.tick(t + 5s);
  rig.desk.expect(pr::Op::kPing);
  rig.core.tick(t + 9999ms);
  EXPECT_TRUE(rig.core.desk_up());
  EXPECT_TRUE(a.nothing_pending());
  rig.core.tick(t + 10s);
  EXPECT_FALSE(rig.core.desk_up());
  EXPECT_EQ(rig.fx.resets.size(), 1u);
  EXPECT_EQ(a.read<wire::TransmitStruct>().rv, sc::kEReaderUnavailable);
  EXPECT_TRUE(all_zero(a.readers_state()));
}

// ======================================================================================
// Per-call mode

TEST(ShimCorePerCall, OneRoundTripForLocalCalls) {
  auto config = kit_config();
  config.one_round_trip_per_call = true;
  Rig rig(config);
  rig.standard_desk();
  auto c = rig.raw_client();
  c.version(4, 4);
  EXPECT_TRUE(rig.desk.idle()) << "CMD_VERSION stays local";
  const auto rt0 = rig.core.stats().round_trips;

  c.send_establish(sc::kScopeSystem);
  EXPECT_TRUE(c.nothing_pending());
  pr::Request q;
  uint32_t id = rig.desk.expect(pr::Op::kEstablishContext, &q);
  EXPECT_EQ(q.code, sc::kScopeSystem);
  EXPECT_TRUE(rig.desk.idle());
  rig.desk.reply(id, ok_reply());
  auto e = c.read<wire::EstablishStruct>();
  EXPECT_EQ(e.rv, sc::kSuccess);
  EXPECT_NE(e.context, 0u);
  EXPECT_EQ(rig.core.stats().round_trips, rt0 + 1);

  c.send_header_only(Command::kGetReadersState);
  EXPECT_TRUE(c.nothing_pending());
  rig.answer(pr::Op::kPing);
  EXPECT_TRUE(rig.desk.idle());
  auto array = c.take(kArrayBytes);
  EXPECT_EQ(entry_name(entry(array, 0)), kReaderA);
  EXPECT_EQ(rig.core.stats().round_trips, rt0 + 2);

  c.send_header_only(Command::kWaitReaderStateChange);
  EXPECT_TRUE(c.nothing_pending());
  rig.answer(pr::Op::kPing);
  EXPECT_EQ(c.take(kArrayBytes), array);
  EXPECT_EQ(rig.core.stats().round_trips, rt0 + 3);
  rig.desk.snapshot({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  EXPECT_EQ(c.take_all(), signal_bytes(0)) << "registered once the ping came back";

  c.send_release(e.context);
  EXPECT_TRUE(c.nothing_pending());
  rig.answer(pr::Op::kPing);  // the round trip is charged first, then the release is done
  EXPECT_EQ(c.take_all(), as_bytes(wire::ReleaseStruct{e.context, sc::kSuccess}));
  rig.desk.expect(pr::Op::kReleaseContext);  // the desk context goes, nobody waits for it
  EXPECT_EQ(rig.core.stats().round_trips, rt0 + 4);
  EXPECT_TRUE(rig.desk.idle());
}

// ======================================================================================
// Optimizations (Optimizations::all(), desk with caps::kAll)

class ShimCoreOptimized : public ::testing::Test {
 protected:
  explicit ShimCoreOptimized(uint64_t desk_caps = caps::kAll) : rig(kit_config(true)) { rig.standard_desk(desk_caps); }
  // Deferred Begin: answered at once, nothing sent.
  void deferred_begin(PcscClient& c, uint32_t card) {
    const std::size_t before = rig.fx.desk.size();
    c.send_begin(card);
    EXPECT_EQ(c.take_all(), as_bytes(wire::BeginStruct{static_cast<int32_t>(card), sc::kSuccess}));
    EXPECT_EQ(rig.fx.desk.size(), before);
  }
  // A transmit the desk answers with |data| (request returned through |q|).
  V transmit(PcscClient& c, uint32_t card, const V& apdu, pr::Request* q = nullptr, pr::Reply r = ok_reply(kSw9000)) {
    c.send_transmit(card, apdu);
    const uint32_t id = rig.desk.expect(pr::Op::kTransmit, q);
    rig.desk.reply(id, std::move(r));
    return read_tx(c).data;
  }
  // A transaction with one card operation, then an EndTransaction the shim answers at once
  // and pipelines: returns the END's desk request id (not answered yet).
  uint32_t pipelined_end(PcscClient& c, uint32_t card) {
    deferred_begin(c, card);
    transmit(c, card, kSelect);
    c.send_end(card, sc::kLeaveCard);
    EXPECT_EQ(c.read<wire::EndStruct>().rv, sc::kSuccess);
    return rig.desk.expect(pr::Op::kEndTransaction);
  }
  Rig rig;
};

// A desk of an earlier version, without desk-ordering: the shim fences locally.
class ShimCoreOptimizedOldDesk : public ShimCoreOptimized {
 protected:
  ShimCoreOptimizedOldDesk() : ShimCoreOptimized(caps::kAll & ~caps::kDeskOrdering) {}
};

TEST_F(ShimCoreOptimized, PipelinedDisconnectAnsweredAtOnceAndStillSent) {
  auto a = rig.client();
  pr::Request cq;
  const uint32_t ha = rig.connect(a, kReaderA, sc::kShareShared, 0x77, kT1, 1, kState34, &cq);
  const auto rt = rig.core.stats().round_trips;
  a.send_disconnect(ha, sc::kLeaveCard);
  EXPECT_EQ(a.take_all(), as_bytes(wire::DisconnectStruct{static_cast<int32_t>(ha), sc::kLeaveCard, sc::kSuccess}));
  pr::Request q;
  const uint32_t id = rig.desk.expect(pr::Op::kDisconnect, &q);
  EXPECT_EQ(q.handle.value, 0x77u);
  EXPECT_EQ(q.disposition, sc::kLeaveCard);
  EXPECT_EQ(q.context, cq.context);
  EXPECT_EQ(rig.core.stats().round_trips, rt);
  EXPECT_EQ(rig.core.stats().pipelined, 1u);
  EXPECT_EQ(entry(a.readers_state(), 0).reader_sharing, 0);
  rig.desk.reply(id, ok_reply());
  EXPECT_TRUE(a.nothing_pending()) << "the desk's answer goes nowhere";
}

TEST_F(ShimCoreOptimized, PipelinedEndAnsweredAtOnceAndStillSent) {
  auto a = rig.client();
  const uint32_t ha = rig.connect(a, kReaderA, sc::kShareShared, 0x77);
  deferred_begin(a, ha);
  transmit(a, ha, kSelect);
  a.send_end(ha, sc::kLeaveCard);
  EXPECT_EQ(a.take_all(), as_bytes(wire::EndStruct{static_cast<int32_t>(ha), sc::kLeaveCard, sc::kSuccess}));
  pr::Request q;
  const uint32_t id = rig.desk.expect(pr::Op::kEndTransaction, &q);
  EXPECT_EQ(q.handle.value, 0x77u);
  EXPECT_EQ(q.disposition, sc::kLeaveCard);
  rig.desk.reply(id, ok_reply());
  EXPECT_TRUE(a.nothing_pending());
}

TEST_F(ShimCoreOptimizedOldDesk, OtherClientsCardOperationIsFencedBehindAPipelinedRequest) {
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b, kReaderA, sc::kShareShared, 0xB0B);
  const uint32_t end_id = pipelined_end(a, ha);
  b.send_transmit(hb, kSelect);
  EXPECT_TRUE(rig.desk.idle()) << "held until the pipelined END is done at the desk";
  EXPECT_TRUE(b.nothing_pending());
  rig.desk.reply(end_id, ok_reply());
  pr::Request q;
  const uint32_t id = rig.desk.expect(pr::Op::kTransmit, &q);
  EXPECT_EQ(q.handle.value, 0xB0Bu);
  EXPECT_EQ(q.data, kSelect);
  rig.desk.reply(id, ok_reply({0x61, 0x02}));
  EXPECT_EQ(read_tx(b).data, (V{0x61, 0x02}));
}

TEST_F(ShimCoreOptimizedOldDesk, FenceAlsoHoldsBehindAPipelinedDisconnect) {
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b);
  a.send_disconnect(ha, sc::kResetCard);
  EXPECT_EQ(a.read<wire::DisconnectStruct>().rv, sc::kSuccess);
  const uint32_t disc = rig.desk.expect(pr::Op::kDisconnect);
  b.send_get_attrib(hb, sc::kAttrVendorName);
  EXPECT_TRUE(rig.desk.idle());
  rig.desk.reply(disc, ok_reply());
  rig.desk.expect(pr::Op::kGetAttrib);
}

TEST_F(ShimCoreOptimized, OtherClientsCardOperationGoesAtOnceOrderedAfterThePipelinedRequest) {
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b, kReaderA, sc::kShareShared, 0xB0B);
  const uint32_t end_id = pipelined_end(a, ha);
  const auto rt = rig.core.stats().round_trips;
  b.send_transmit(hb, kSelect);
  pr::Request q;
  const uint32_t id = rig.desk.expect(pr::Op::kTransmit, &q);
  EXPECT_EQ(q.handle.value, 0xB0Bu);
  EXPECT_EQ(q.after, std::vector<uint32_t>{end_id}) << "the desk runs it after A's END";
  EXPECT_EQ(rig.core.stats().round_trips, rt + 1);
  rig.desk.reply(id, ok_reply({0x61, 0x02}));
  EXPECT_EQ(read_tx(b).data, (V{0x61, 0x02}));
  rig.desk.reply(end_id, ok_reply());
  // Once the END is done, nothing is waited for any more.
  b.send_transmit(hb, kSelect);
  rig.desk.expect(pr::Op::kTransmit, &q);
  EXPECT_TRUE(q.after.empty());
}

TEST_F(ShimCoreOptimized, OwnPipelinedRequestsAreNotWaitedFor) {
  auto a = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t ha2 = rig.connect(a);
  a.send_disconnect(ha, sc::kLeaveCard);
  a.take_all();
  rig.desk.expect(pr::Op::kDisconnect);
  pr::Request q;
  a.send_transmit(ha2, kSelect);  // same context: the desk runs its requests in order anyway
  rig.desk.expect(pr::Op::kTransmit, &q);
  EXPECT_TRUE(q.after.empty());
}

TEST_F(ShimCoreOptimized, ConnectBehindAPipelinedEndGoesAtOnceOrdered) {
  auto a = rig.client();
  auto c = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t end_id = pipelined_end(a, ha);
  c.send_connect(kReaderA);
  pr::Request q;
  const uint32_t id = rig.desk.expect(pr::Op::kConnect, &q);
  EXPECT_EQ(q.after, std::vector<uint32_t>{end_id});
  pr::Reply r = ok_reply({}, kT1);
  r.handle = pr::DeskHandle{0xC0C};
  rig.desk.reply(id, r);
  EXPECT_EQ(c.read<wire::ConnectStruct>().rv, sc::kSuccess);
}

TEST_F(ShimCoreOptimized, DeferredBeginIsCarriedByTheNextTransmit) {
  auto a = rig.client();
  const uint32_t ha = rig.connect(a);
  deferred_begin(a, ha);
  EXPECT_EQ(rig.core.stats().deferred_begins, 1u);
  pr::Request q;
  transmit(a, ha, kSelect, &q);
  EXPECT_TRUE(q.flags & rf::kBeginFirst);
  transmit(a, ha, kSelect, &q);
  EXPECT_FALSE(q.flags & rf::kBeginFirst) << "carried once";
}

TEST_F(ShimCoreOptimized, BeginThenEndLeaveSendsNothing) {
  auto a = rig.client();
  const uint32_t ha = rig.connect(a);
  const std::size_t before = rig.fx.desk.size();
  deferred_begin(a, ha);
  a.send_end(ha, sc::kLeaveCard);
  EXPECT_EQ(a.take_all(), as_bytes(wire::EndStruct{static_cast<int32_t>(ha), sc::kLeaveCard, sc::kSuccess}));
  EXPECT_EQ(rig.fx.desk.size(), before);
  pr::Request q;
  transmit(a, ha, kSelect, &q);
  EXPECT_FALSE(q.flags & rf::kBeginFirst);
}

TEST_F(ShimCoreOptimized, OtherClientGetsSharingViolationLocallyWhileATransactionIsDeferredOrHeld) {
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b);
  deferred_begin(a, ha);
  const std::size_t before = rig.fx.desk.size();
  b.send_begin(hb);
  EXPECT_EQ(b.take_all(), as_bytes(wire::BeginStruct{static_cast<int32_t>(hb), sc::kESharingViolation}));
  b.send_transmit(hb, kSelect);
  auto t = b.read<wire::TransmitStruct>();
  EXPECT_EQ(t.rv, sc::kESharingViolation);
  EXPECT_TRUE(b.nothing_pending());
  EXPECT_EQ(b.status(hb), sc::kESharingViolation);
  EXPECT_EQ(rig.fx.desk.size(), before);
  transmit(a, ha, kSelect);  // the transaction is now held at the desk
  b.send_begin(hb);
  EXPECT_EQ(b.read<wire::BeginStruct>().rv, sc::kESharingViolation);
  b.send_transmit(hb, kSelect);
  EXPECT_EQ(b.read<wire::TransmitStruct>().rv, sc::kESharingViolation);
  EXPECT_EQ(rig.fx.desk.size(), before + 1) << "only A's transmit went out";
  a.send_end(ha, sc::kLeaveCard);
  EXPECT_EQ(a.read<wire::EndStruct>().rv, sc::kSuccess);
  b.send_begin(hb);
  EXPECT_EQ(b.read<wire::BeginStruct>().rv, sc::kSuccess);
}

TEST_F(ShimCoreOptimized, ConnectIsParkedWhileATransactionIsDeferred) {
  auto a = rig.client();
  auto c = rig.client();
  const uint32_t ha = rig.connect(a);
  deferred_begin(a, ha);
  c.send_connect(kReaderA);
  EXPECT_TRUE(rig.desk.idle()) << "pcscd blocks a Connect while a transaction is held";
  EXPECT_TRUE(c.nothing_pending());
  a.send_end(ha, sc::kLeaveCard);
  EXPECT_EQ(a.read<wire::EndStruct>().rv, sc::kSuccess);
  pr::Request q;
  const uint32_t id = rig.desk.expect(pr::Op::kConnect, &q);
  EXPECT_EQ(q.reader, kReaderA);
  pr::Reply r = ok_reply({}, kT1);
  r.handle = pr::DeskHandle{0xC0C};
  rig.desk.reply(id, r);
  auto rep = c.read<wire::ConnectStruct>();
  EXPECT_EQ(rep.rv, sc::kSuccess);
  EXPECT_NE(rep.card, 0);
}

TEST_F(ShimCoreOptimizedOldDesk, ConnectIsParkedWhileATransactionIsHeldAndProceedsAfterEnd) {
  auto a = rig.client();
  auto c = rig.client();
  const uint32_t ha = rig.connect(a);
  deferred_begin(a, ha);
  transmit(a, ha, kSelect);
  c.send_connect(kReaderA);
  EXPECT_TRUE(rig.desk.idle());
  a.send_end(ha, sc::kLeaveCard);
  EXPECT_EQ(a.read<wire::EndStruct>().rv, sc::kSuccess);
  const uint32_t end_id = rig.desk.expect(pr::Op::kEndTransaction);
  EXPECT_TRUE(rig.desk.idle()) << "the Connect also waits behind the pipelined END";
  rig.desk.reply(end_id, ok_reply());
  const uint32_t id = rig.desk.expect(pr::Op::kConnect);
  pr::Reply r = ok_reply({}, kT1);
  r.handle = pr::DeskHandle{0xC0C};
  rig.desk.reply(id, r);
  EXPECT_EQ(c.read<wire::ConnectStruct>().rv, sc::kSuccess);
}

TEST_F(ShimCoreOptimized, CardRemovalClearsADeferredBegin) {
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b);
  deferred_begin(a, ha);
  EXPECT_EQ(b.status(hb), sc::kESharingViolation);
  rig.desk.snapshot({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  EXPECT_EQ(b.status(hb), sc::kWRemovedCard) << "no lingering SHARING_VIOLATION";
  rig.desk.snapshot({card_in(kReaderA, 3), empty_reader(kReaderB)});
  auto c = rig.client();
  c.send_connect(kReaderA);
  rig.desk.expect(pr::Op::kConnect);  // not parked
  // A's transaction is gone: its next operation carries no Begin.
  a.send_transmit(ha, kSelect);
  pr::Request q;
  rig.desk.expect(pr::Op::kTransmit, &q);
  EXPECT_FALSE(q.flags & rf::kBeginFirst);
}

TEST_F(ShimCoreOptimized, ClientDyingWithADeferredSharedTransactionResetsTheCard) {
  auto a = rig.client();
  auto b = rig.client();
  pr::Request cq;
  const uint32_t ha = rig.connect(a, kReaderA, sc::kShareShared, 0xAA, kT1, 1, kState34, &cq);
  const uint32_t hb = rig.connect(b);
  deferred_begin(a, ha);
  a.close();
  pr::Request q;
  const uint32_t disc = rig.desk.expect(pr::Op::kDisconnect, &q);
  EXPECT_EQ(q.handle.value, 0xAAu);
  EXPECT_EQ(q.disposition, sc::kResetCard) << "pcscd MSGCleanupClient: the lock holder is reset";
  EXPECT_EQ(q.context, cq.context);
  pr::Request rel;
  const uint32_t rel_id = rig.desk.expect(pr::Op::kReleaseContext, &rel);
  EXPECT_EQ(rel.context, cq.context);
  EXPECT_EQ(b.status(hb), sc::kWResetCard);
  EXPECT_EQ(entry(b.readers_state(), 0).card_protocol, 0u) << "cardProtocol 0 after the reset";
  rig.desk.reply(disc, ok_reply());
  rig.desk.reply(rel_id, ok_reply());
  EXPECT_TRUE(b.nothing_pending());
}

TEST_F(ShimCoreOptimized, ClientDyingWithoutATransactionResetsNothing) {
  auto a = rig.client();
  auto b = rig.client();
  rig.connect(a);
  const uint32_t hb = rig.connect(b);
  a.close();
  rig.desk.expect(pr::Op::kReleaseContext);
  EXPECT_TRUE(rig.desk.idle());
  EXPECT_EQ(b.status(hb), sc::kSuccess);
}

// pcscd: SCardDisconnect(RESET/UNPOWER) waits while another handle holds the transaction
// (winscard.c: while (hLockId != 0) sleep); the card is reset only after that handle's End.
TEST_F(ShimCoreOptimized, DisconnectResetWaitsForAnotherClientsTransaction) {
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b);
  deferred_begin(a, ha);
  transmit(a, ha, kSelect);  // the transaction is held at the desk
  b.send_disconnect(hb, sc::kResetCard);
  EXPECT_EQ(a.status(ha), sc::kSuccess) << "no reset can happen inside A's transaction";
  a.send_end(ha, sc::kLeaveCard);
  EXPECT_EQ(a.read<wire::EndStruct>().rv, sc::kSuccess);
  const std::size_t first = rig.fx.desk.size() - rig.desk.unread();
  drain_end_first(rig);
  const auto is_reset = [](const pr::Message& m) {
    const auto* q = std::get_if<pr::Request>(&m.body);
    return q && q->op == pr::Op::kDisconnect && q->disposition == sc::kResetCard;
  };
  const bool disconnect_sent =
      std::any_of(rig.fx.desk.begin() + static_cast<std::ptrdiff_t>(first), rig.fx.desk.end(), is_reset);
  EXPECT_TRUE(disconnect_sent);
  EXPECT_EQ(b.take_all(), as_bytes(wire::DisconnectStruct{static_cast<int32_t>(hb), sc::kResetCard, sc::kSuccess}));
  EXPECT_EQ(a.status(ha), sc::kWResetCard) << "after the End, the reset is seen";
}

TEST_F(ShimCoreOptimized, DisconnectResetDoesNotResetTheCardUnderADeferredTransaction) {
  auto a = rig.client();
  auto b = rig.client();
  const uint32_t ha = rig.connect(a);
  const uint32_t hb = rig.connect(b);
  deferred_begin(a, ha);
  b.send_disconnect(hb, sc::kResetCard);
  while (!rig.desk.idle()) {
    auto [id, q] = rig.desk.request();
    EXPECT_NE(static_cast<int>(q.op), static_cast<int>(pr::Op::kDisconnect))
        << "the reset would reach the card inside A's transaction (pcscd makes it wait)";
    rig.desk.reply(id, ok_reply());
  }
  EXPECT_EQ(a.status(ha), sc::kSuccess);
  pr::Request q;
  transmit(a, ha, kSelect, &q);
  EXPECT_TRUE(q.flags & rf::kBeginFirst);
  a.send_end(ha, sc::kLeaveCard);
  EXPECT_EQ(a.read<wire::EndStruct>().rv, sc::kSuccess);
  while (!rig.desk.idle()) {
    auto [id, r] = rig.desk.request();
    rig.desk.reply(id, ok_reply());
  }
  EXPECT_EQ(b.take_all(), as_bytes(wire::DisconnectStruct{static_cast<int32_t>(hb), sc::kResetCard, sc::kSuccess}));
  EXPECT_EQ(a.status(ha), sc::kWResetCard);
}

// ---- prefetched GET RESPONSE ----

class ShimCorePrefetch : public ShimCoreOptimized {
 protected:
  // SELECT answered 61 10 with the GET RESPONSE (Le 10) prefetched by the desk.
  uint32_t setup(PcscClient& a) {
    const uint32_t h = rig.connect(a);
    pr::Reply r = ok_reply({0x61, 0x10}, 1);
    r.prefetched.push_back(pr::Prefetched{kGetResponse10, cat(body_, kSw9000)});
    pr::Request q;
    EXPECT_EQ(transmit(a, h, kSelectAid, &q, r), (V{0x61, 0x10}));
    EXPECT_TRUE(q.flags & rf::kPrefetchGetResponse);
    desk_before_ = rig.fx.desk.size();
    return h;
  }
  const V kSelectAid = {0x00, 0xA4, 0x04, 0x00, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x03, 0x10, 0x10};
  const V kGetResponse10 = {0x00, 0xC0, 0x00, 0x00, 0x10};
  V body_ = {0x6F, 0x0E, 0x84, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x03, 0x10, 0x10, 0xA5, 0x03, 0x88, 0x01, 0x02};
  std::size_t desk_before_ = 0;
};

TEST_F(ShimCorePrefetch, ExactCommandServedWithoutTheDesk) {
  auto a = rig.client();
  const uint32_t h = setup(a);
  auto sent = a.send_transmit(h, kGetResponse10);
  wire::TransmitStruct want = sent;
  want.recv_pci_protocol = 1;
  want.recv_length = 18;
  want.rv = sc::kSuccess;
  EXPECT_EQ(a.take_all(), cat(as_bytes(want), cat(body_, kSw9000)));
  EXPECT_EQ(rig.fx.desk.size(), desk_before_);
  EXPECT_EQ(rig.core.stats().prefetch_hits, 1u);
  // Served once only.
  a.send_transmit(h, kGetResponse10);
  rig.desk.expect(pr::Op::kTransmit);
}

TEST_F(ShimCorePrefetch, OtherCommandDiscardsThePrediction) {
  auto a = rig.client();
  const uint32_t h = setup(a);
  const V read_binary = {0x00, 0xB0, 0x00, 0x00, 0x10};
  pr::Request q;
  transmit(a, h, read_binary, &q);
  EXPECT_EQ(q.data, read_binary);
  EXPECT_EQ(rig.core.stats().prefetch_discarded, 1u);
  EXPECT_EQ(rig.core.stats().prefetch_hits, 0u);
  a.send_transmit(h, kGetResponse10);
  rig.desk.expect(pr::Op::kTransmit, &q);
  EXPECT_EQ(q.data, kGetResponse10) << "no longer predicted";
}

TEST_F(ShimCorePrefetch, GetResponseWithSmallerLeIsServedPerIso) {
  auto a = rig.client();
  const uint32_t h = setup(a);
  a.send_transmit(h, {0x00, 0xC0, 0x00, 0x00, 0x08});
  auto first = read_tx(a);
  EXPECT_EQ(first.s.rv, sc::kSuccess);
  EXPECT_EQ(first.data, cat(V(body_.begin(), body_.begin() + 8), {0x61, 0x08}));
  a.send_transmit(h, {0x00, 0xC0, 0x00, 0x00, 0x08});
  auto second = read_tx(a);
  EXPECT_EQ(second.data, cat(V(body_.begin() + 8, body_.end()), kSw9000));
  EXPECT_EQ(rig.fx.desk.size(), desk_before_);
  EXPECT_EQ(rig.core.stats().prefetch_hits, 2u);
  EXPECT_TRUE(a.nothing_pending());
}

TEST_F(ShimCorePrefetch, GetResponseWithLe00GetsEverything) {
  auto a = rig.client();
  const uint32_t h = setup(a);
  a.send_transmit(h, {0x00, 0xC0, 0x00, 0x00, 0x00});
  auto r = read_tx(a);
  EXPECT_EQ(r.data, cat(body_, kSw9000));
  EXPECT_EQ(rig.fx.desk.size(), desk_before_);
}

// ---- attribute cache ----

TEST_F(ShimCoreOptimized, AttributeCacheServesStaticAttributesAndDropsTheAtrOnACardEvent) {
  auto a = rig.client();
  const uint32_t h = rig.connect(a);
  auto get = [&](uint32_t attr) {
    a.send_get_attrib(h, attr);
    return a.read<wire::GetSetStruct>();
  };
  const V vendor = {'A', 'C', 'M', 'E'};
  a.send_get_attrib(h, sc::kAttrVendorName);
  pr::Request q;
  uint32_t id = rig.desk.expect(pr::Op::kGetAttrib, &q);
  EXPECT_EQ(q.code, sc::kAttrVendorName);
  rig.desk.reply(id, ok_reply(vendor));
  wire::GetSetStruct want{};
  want.card = static_cast<int32_t>(h);
  want.attr_id = sc::kAttrVendorName;
  std::memcpy(want.attr, vendor.data(), vendor.size());
  want.attr_length = 4;
  want.rv = sc::kSuccess;
  EXPECT_EQ(a.take_all(), as_bytes(want));
  const std::size_t before = rig.fx.desk.size();
  a.send_get_attrib(h, sc::kAttrVendorName);
  EXPECT_EQ(a.take_all(), as_bytes(want)) << "served from the cache, byte for byte";
  EXPECT_EQ(rig.fx.desk.size(), before);
  EXPECT_EQ(rig.core.stats().attribute_cache_hits, 1u);

  a.send_get_attrib(h, sc::kAttrAtrString);
  rig.desk.reply(rig.desk.expect(pr::Op::kGetAttrib), ok_reply(kAtr));
  EXPECT_EQ(a.read<wire::GetSetStruct>().attr_length, 5u);
  EXPECT_EQ(get(sc::kAttrAtrString).attr_length, 5u);
  EXPECT_EQ(rig.fx.desk.size(), before + 1);

  // Card swapped; the handle reconnects.
  rig.desk.snapshot({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  rig.desk.snapshot({card_in(kReaderA, 3, kAtr2), empty_reader(kReaderB)});
  reconnect_at_desk(rig, a, h, sc::kLeaveCard, 3);
  const std::size_t after = rig.fx.desk.size();
  EXPECT_EQ(get(sc::kAttrVendorName).attr_length, 4u) << "the vendor is still cached";
  EXPECT_EQ(rig.fx.desk.size(), after);
  a.send_get_attrib(h, sc::kAttrAtrString);
  rig.desk.expect(pr::Op::kGetAttrib, &q);
  EXPECT_EQ(q.code, sc::kAttrAtrString) << "the ATR was dropped on the card event";
}

// ---- request flags ----

TEST_F(ShimCoreOptimized, ReadAheadOnlyInsideATransactionOrExclusive) {
  auto a = rig.client();
  auto x = rig.client();
  const uint32_t ha = rig.connect(a);
  pr::Request q;
  transmit(a, ha, kSelect, &q);
  EXPECT_EQ(q.flags, rf::kPrefetchGetResponse) << "shared, no transaction: no read-ahead";
  deferred_begin(a, ha);
  transmit(a, ha, kSelect, &q);
  EXPECT_EQ(q.flags, rf::kBeginFirst | rf::kPrefetchGetResponse | rf::kReadAhead);
  transmit(a, ha, kSelect, &q);
  EXPECT_EQ(q.flags, rf::kPrefetchGetResponse | rf::kReadAhead);
  a.send_end(ha, sc::kLeaveCard);
  a.take_all();
  rig.desk.reply(rig.desk.expect(pr::Op::kEndTransaction), ok_reply());
  transmit(a, ha, kSelect, &q);
  EXPECT_EQ(q.flags, rf::kPrefetchGetResponse);

  rig.desk.snapshot({card_in(kReaderA, 1), empty_reader(kReaderB), card_in(kReaderC, 1, kAtr2)});
  const uint32_t hx = rig.connect(x, kReaderC, sc::kShareExclusive);
  transmit(x, hx, kSelect, &q);
  EXPECT_EQ(q.flags, rf::kPrefetchGetResponse | rf::kReadAhead) << "exclusive access";
}

TEST(ShimCoreFlags, NothingWhenTheDeskDoesNotAnnounceTheCapabilities) {
  Rig rig(kit_config(true));
  rig.standard_desk(caps::kReaderPush);
  auto a = rig.client();
  const uint32_t ha = rig.connect(a);
  a.send_begin(ha);
  rig.answer(pr::Op::kBeginTransaction, ok_reply());  // not deferred
  EXPECT_EQ(a.read<wire::BeginStruct>().rv, sc::kSuccess);
  a.send_transmit(ha, kSelect);
  pr::Request q;
  rig.desk.reply(rig.desk.expect(pr::Op::kTransmit, &q), ok_reply(kSw9000));
  EXPECT_EQ(q.flags, 0u);
  read_tx(a);
  EXPECT_EQ(rig.core.stats().deferred_begins, 0u);
}

TEST(ShimCoreFlags, OnlyTheAnnouncedCapabilityIsUsed) {
  Rig rig(kit_config(true));
  rig.standard_desk(caps::kReaderPush | caps::kPrefetchGetResponse);
  auto a = rig.client();
  const uint32_t ha = rig.connect(a);
  begin_at_desk(rig, a, ha);
  a.send_transmit(ha, kSelect);
  pr::Request q;
  rig.desk.reply(rig.desk.expect(pr::Op::kTransmit, &q), ok_reply(kSw9000));
  EXPECT_EQ(q.flags, rf::kPrefetchGetResponse) << "no read-ahead without the capability, even in a transaction";
}

TEST(ShimCoreFlags, NothingWhenTheShimHasNoOptimizations) {
  Rig rig;  // Optimizations{}: none
  rig.standard_desk(caps::kAll);
  auto a = rig.client();
  const uint32_t ha = rig.connect(a);
  begin_at_desk(rig, a, ha);
  a.send_transmit(ha, kSelect);
  pr::Request q;
  rig.desk.reply(rig.desk.expect(pr::Op::kTransmit, &q), ok_reply(kSw9000));
  EXPECT_EQ(q.flags, 0u);
  read_tx(a);
  // END goes to the desk and is answered only after it (no pipelining).
  a.send_end(ha, sc::kLeaveCard);
  EXPECT_TRUE(a.nothing_pending());
  rig.answer(pr::Op::kEndTransaction, ok_reply());
  EXPECT_EQ(a.read<wire::EndStruct>().rv, sc::kSuccess);
  // No attribute cache.
  for (int i = 0; i < 2; ++i) {
    a.send_get_attrib(ha, sc::kAttrVendorName);
    rig.answer(pr::Op::kGetAttrib, ok_reply({'X'}));
    EXPECT_EQ(a.read<wire::GetSetStruct>().rv, sc::kSuccess);
  }
  EXPECT_EQ(rig.core.stats().attribute_cache_hits, 0u);
}

}  // namespace
