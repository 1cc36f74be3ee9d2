// ShimCore: the reader-state array (pcsc-protocol.md §3.1), the event wait of every
// protocol version (4.4/4.5: WAIT answers the array; 4.6: WAIT, SIZE, ARRAY; §2.3, §2.6, §4),
// CMD_GET_READER_EVENTS, and SCARD_CANCEL of a waiting context (§1.2, §5.5).
#include <cstdint>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/shim_core_test.hpp"

namespace cardbridge::shim::core_test {
namespace {

// =====================================================================================
// The array

TEST(ShimCoreArray, AllZeroUntilTheDeskPushesReaders) {
  Rig r;
  auto c = r.client(4);
  auto c6 = r.client(6);
  auto expect_empty = [&](const char* when) {
    EXPECT_EQ(c.readers_state(), kZeroArray) << when;
    EXPECT_EQ(c6.state_size(), 16) << when;
    EXPECT_EQ(c6.state_array(), kZeroArray) << when;
    EXPECT_TRUE(c6.nothing_pending()) << when;
  };
  expect_empty("no desk");
  r.desk.connect_transport();
  expect_empty("transport up, hello sent, the desk silent");
  r.desk.hello(/*reply=*/false);
  EXPECT_TRUE(r.core.desk_up());
  expect_empty("desk session, no snapshot yet");
}

TEST(ShimCoreArray, EncodesNamesCountersStateBitsAndAtr) {
  Rig r;
  r.desk_up({empty_reader("Alpha Reader 00 00", 0), card_in("Beta Reader 01 00", 3),
             pr::ReaderInfo{"Mute Reader 00 00", kStatePresent | kStateMute, 3, {}},
             pr::ReaderInfo{"Broken Reader 00 00", kStateUnavailable, 7, {}}});
  auto a = r.array();
  ASSERT_EQ(a.size(), kArraySize);
  // EMPTY -> SCARD_ABSENT 0x02; PRESENT with an ATR -> PRESENT|POWERED|NEGOTIABLE 0x34;
  // PRESENT|MUTE -> PRESENT|SWALLOWED 0x0C; UNAVAILABLE -> SCARD_UNKNOWN 0x01.
  EXPECT_EQ(slot_of(a, 0), expected_slot("Alpha Reader 00 00", 0, 0x02, 0, {}, 0));
  EXPECT_EQ(slot_of(a, 1), expected_slot("Beta Reader 01 00", 3, 0x34, 0, kAtr, 0));
  EXPECT_EQ(slot_of(a, 2), expected_slot("Mute Reader 00 00", 3, 0x0C, 0, {}, 0));
  EXPECT_EQ(slot_of(a, 3), expected_slot("Broken Reader 00 00", 7, 0x01, 0, {}, 0));
  EXPECT_EQ(slice(a, 4 * kSlotSize, kArraySize), Bytes(kArraySize - 4 * kSlotSize, 0));
  // The card goes: counter and state follow, the ATR is cleared.
  r.desk.push({empty_reader("Alpha Reader 00 00", 0), empty_reader("Beta Reader 01 00", 4)});
  a = r.array();
  EXPECT_EQ(slot_of(a, 1), expected_slot("Beta Reader 01 00", 4, 0x02, 0, {}, 0));
}

TEST(ShimCoreArray, ReadersKeepTheirSlotAndNewOnesTakeTheFirstFreeSlot) {
  {
    Rig r;
    r.desk_up({empty_reader("A 00 00"), empty_reader("B 00 00"), empty_reader("C 00 00")});
    auto names = [&] {
      std::vector<std::string> out;
      for (const auto& s : r.readers()) out.push_back(s.name);
      out.resize(5);
      return out;
    };
    using V = std::vector<std::string>;
    EXPECT_EQ(names(), (V{"A 00 00", "B 00 00", "C 00 00", "", ""}));
    r.desk.push({empty_reader("A 00 00"), empty_reader("C 00 00")});  // B unplugged
    EXPECT_EQ(names(), (V{"A 00 00", "", "C 00 00", "", ""}));
    EXPECT_EQ(slot_of(r.array(), 1), Bytes(kSlotSize, 0)) << "a removed reader's slot is zeroed";
    r.desk.push({empty_reader("D 00 00"), empty_reader("A 00 00"), empty_reader("C 00 00")});  // D plugged
    EXPECT_EQ(names(), (V{"A 00 00", "D 00 00", "C 00 00", "", ""}));
    // Order in the snapshot and card events do not move anybody.
    r.desk.push({card_in("C 00 00", 1), empty_reader("A 00 00"), empty_reader("D 00 00"), empty_reader("E 00 00")});
    EXPECT_EQ(names(), (V{"A 00 00", "D 00 00", "C 00 00", "E 00 00", ""}));
    auto slots = r.readers();
    EXPECT_EQ(slots[2].reader_state, 0x34u);
    EXPECT_EQ(slots[2].atr(), kAtr);
  }
  {
    Rig r(kStandardDesk);
    auto c = r.client();
    r.desk.push({empty_reader(kReaderB)});  // A unplugged
    auto array = c.readers_state();
    EXPECT_TRUE(all_zero(slot_of(array, 0))) << "a removed reader's slot is emptied";
    EXPECT_EQ(entry(array, 1).name, kReaderB) << "the other reader keeps its slot";
    r.desk.push({empty_reader(kReaderB), card_in(kReaderC, 1, kAtr2)});
    array = c.readers_state();
    EXPECT_EQ(entry(array, 0).name, kReaderC) << "a new reader takes the first free slot";
    EXPECT_EQ(entry(array, 1).name, kReaderB);
    r.desk.push({card_in(kReaderA, 1), card_in(kReaderC, 1, kAtr2), empty_reader(kReaderB)});
    array = c.readers_state();
    EXPECT_EQ(entry(array, 0).name, kReaderC);
    EXPECT_EQ(entry(array, 1).name, kReaderB);
    EXPECT_EQ(entry(array, 2).name, kReaderA);
  }
}

// §3.1: "pcscd fills cardProtocol when the first Connect negotiates the protocol, and resets
// it to 0 on reset, power-down or removal." SCardEndTransaction(RESET/UNPOWER) resets the
// card in pcscd (winscard.c@1.9.9: "the protocol is unset after a power on").
TEST(ShimCoreArray, CardProtocolIsZeroAfterAResetByDisconnectOrEndTransaction) {
  {
    Rig r(kStandardDesk);
    auto [c, card] = r.connected_client();
    auto c2 = r.client();
    r.connect(c2);
    ASSERT_EQ(r.readers()[0].protocol, kT1);
    c.send_disconnect(card, kResetCard);
    r.desk.serve();
    EXPECT_EQ(c.disconnect_reply(), (DispositionReply{card, kResetCard, kSuccess}));
    EXPECT_EQ(r.readers()[0].protocol, 0u) << "after DISCONNECT(RESET)";
  }
  {
    Rig r(kStandardDesk);
    auto [c, card] = r.connected_client();
    ASSERT_EQ(r.readers()[0].protocol, kT1);
    r.begin_at_desk(c, card);
    r.end_at_desk(c, card, kResetCard);
    auto slot = r.readers()[0];
    EXPECT_EQ(slot.protocol, 0u) << "after END_TRANSACTION(RESET)";
    EXPECT_EQ(slot.reader_state, 0x34u);
    EXPECT_EQ(slot.sharing, 1);
  }
}

// =====================================================================================
// The event wait, protocol 4.4/4.5 (§2.3 0x13/0x14, §2.6)

TEST(ShimCoreEvents, WaitAnswersTheArrayAndAChangeSignalsEveryWaiterOnce) {
  Rig r;
  r.desk_up({empty_reader(kReaderA)});
  auto a = r.client(4);
  auto b = r.client(5);
  auto idle = r.client(4);
  const Bytes before = idle.readers_state();
  EXPECT_EQ(before, r.array());
  EXPECT_EQ(a.wait_for_change(), before) << "4.4: WAIT registers and answers the current array, nothing else";
  EXPECT_EQ(b.wait_for_change(), before) << "4.5 likewise";
  EXPECT_TRUE(a.nothing_pending());

  r.desk.push({card_in(kReaderA, 1)});  // card inserted
  EXPECT_EQ(a.take_all(), signal_bytes(kSuccess));
  EXPECT_EQ(b.take_all(), signal_bytes(kSuccess));
  EXPECT_TRUE(idle.nothing_pending());
  // The array was updated before the signal: the re-WAIT shows the card.
  auto e = entry(a.wait_for_change(), 0);
  EXPECT_EQ(e.reader_state, 0x34u);
  EXPECT_EQ(e.event_counter, 1u);
  // b was unregistered by its signal: the next change signals a only.
  r.desk.push({empty_reader(kReaderA, 2)});
  EXPECT_EQ(a.take_all(), signal_bytes(kSuccess));
  EXPECT_TRUE(b.nothing_pending());
  EXPECT_TRUE(idle.nothing_pending());
  // Nobody is registered any more.
  r.desk.push({card_in(kReaderA, 3)});
  EXPECT_TRUE(a.nothing_pending());
  EXPECT_TRUE(b.nothing_pending());
  // STOP after the signal: nothing (the client reads the signal as its answer).
  a.send_cmd(cmd::kStopWait);
  EXPECT_TRUE(a.nothing_pending());
  EXPECT_FALSE(a.closed_by_shim());
}

TEST(ShimCoreEvents, StopWhileRegisteredRepliesZeroZero) {
  Rig r(kStandardDesk);
  auto c = r.client(4);
  r.wait(c);
  c.send_cmd(cmd::kStopWait);
  EXPECT_EQ(c.take_all(), signal_bytes(kSuccess)) << "{timeOut 0, rv 0}";
  r.desk.push({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  EXPECT_TRUE(c.nothing_pending()) << "unregistered by STOP";
}

TEST(ShimCoreEvents, StopAfterTheSignalSendsNothingAndTheStreamStaysInStep) {
  Rig r;
  r.desk_up({empty_reader(kReaderA)});
  auto c = r.client(4);
  r.wait(c);
  r.desk.push({card_in(kReaderA, 1)});
  EXPECT_EQ(c.take_all(), signal_bytes(kSuccess));
  c.send_cmd(cmd::kStopWait);
  EXPECT_TRUE(c.nothing_pending()) << "the signal already sent is read as the STOP reply";
  // In step: the next request gets exactly its own answer.
  EXPECT_EQ(c.readers_state().size(), kArraySize);
}

TEST(ShimCoreEvents, ASnapshotThatChangesNothingSendsNoSignal) {
  Rig r(kStandardDesk);
  auto c = r.client(4);
  r.wait(c);
  r.desk.push({card_in(kReaderA, 1), empty_reader(kReaderB)});  // same content, new sequence
  r.desk.push({empty_reader(kReaderB), card_in(kReaderA, 1)});  // other order
  EXPECT_TRUE(c.nothing_pending());
  c.send_cmd(cmd::kStopWait);
  EXPECT_EQ(c.take_all(), signal_bytes(kSuccess)) << "still registered";
}

// =====================================================================================
// Protocol 4.5: CMD_GET_READER_EVENTS (§2.3, §4)

TEST(ShimCoreEvents, ReaderEventsStartAtOneAndCountReaderAddRemoveNotCards) {
  {
    Rig r;
    auto c = r.client(5);
    EXPECT_EQ(c.reader_events(), (PairReply{1, kSuccess}));
    r.desk.connect(pr::caps::kAll);
    EXPECT_EQ(c.reader_events().first, 1u) << "no reader yet";
    r.desk.push({empty_reader(kReaderA)});
    const uint32_t one_reader = c.reader_events().first;
    EXPECT_EQ(one_reader, 2u) << "+1 for the reader added";
    r.desk.push({card_in(kReaderA, 1)});
    r.desk.push({empty_reader(kReaderA, 2)});
    EXPECT_EQ(c.reader_events(), (PairReply{one_reader, kSuccess})) << "card insert/remove does not count";
    r.desk.push({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
    const uint32_t two_readers = c.reader_events().first;
    EXPECT_GT(two_readers, one_reader) << "reader added";
    r.desk.push({empty_reader(kReaderB)});
    const uint32_t removed = c.reader_events().first;
    EXPECT_GT(removed, two_readers) << "reader removed";
    EXPECT_NE(removed, 0u);
    EXPECT_EQ(c.reader_events(), (PairReply{removed, kSuccess}));
    // A 4.5 client still gets the array with WAIT.
    EXPECT_EQ(c.wait_for_change().size(), kArraySize);
  }
  {
    // Two readers in the desk's first snapshot.
    Rig r;
    auto c = r.client(5);
    const auto e0 = c.reader_events();
    EXPECT_EQ(e0.rv, kSuccess);
    EXPECT_NE(e0.first, 0u);
    r.standard_desk();
    EXPECT_NE(c.reader_events().first, e0.first) << "readers were added";
  }
}

// =====================================================================================
// Protocol 4.6: WAIT without data, 0x16/0x17 (§2.3, §4 "What the shim should do" 3)

TEST(ShimCoreEvents, Protocol46WaitSendsNothingSizeIs16AndTheArrayIs16Slots) {
  Rig r(kStandardDesk);
  auto legacy = r.client(4);
  const Bytes array = legacy.readers_state();
  auto c = r.client(6);
  c.send_cmd(cmd::kWait);
  EXPECT_TRUE(c.nothing_pending()) << "4.6: WAIT only registers";
  EXPECT_EQ(c.state_size(), 16);
  EXPECT_EQ(c.state_array(), array) << "16 x 184 bytes";
  EXPECT_EQ(array, r.array());
  EXPECT_TRUE(c.nothing_pending());
  r.desk.push({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  EXPECT_EQ(c.take_all(), signal_bytes(kSuccess));
}

TEST(ShimCoreEvents, Protocol46SignalBetweenWaitAndArrayIsHeldUntilRightAfterTheArray) {
  Rig r;
  r.desk_up({empty_reader(kReaderA)});
  auto c = r.client(6);
  c.send_cmd(cmd::kWait);
  r.desk.push({card_in(kReaderA, 1)});  // the change falls between WAIT and SIZE
  EXPECT_TRUE(c.nothing_pending()) << "the signal would be read as the array size";
  c.send_cmd(cmd::kStateSize);
  EXPECT_EQ(c.take_all(), Bytes(Le().i32(16))) << "exactly the size, no signal yet";
  c.send_cmd(cmd::kStateArray);
  Bytes out = c.take_all();
  ASSERT_EQ(out.size(), kArraySize + 8) << "the array, then the held signal, once";
  const Bytes array = slice(out, 0, kArraySize);
  EXPECT_EQ(array, r.array()) << "the array is the new one";
  EXPECT_EQ(entry(array, 0).event_counter, 1u);
  EXPECT_EQ(entry(array, 0).reader_state, 0x34u);
  EXPECT_EQ(slice(out, kArraySize, 8), signal_bytes(kSuccess));
  // Delivered means unregistered.
  r.desk.push({empty_reader(kReaderA, 2)});
  EXPECT_TRUE(c.nothing_pending());
}

// =====================================================================================
// SCARD_CANCEL, on its own connection (§1.2, §2.3, §5.5)

TEST(ShimCoreCancel, CancelOfAWaitingContextSignalsTheTargetAndSucceeds) {
  Rig r;
  r.desk_up({empty_reader(kReaderA)});
  auto target = r.client(4);
  r.wait(target);
  auto canceller = r.raw_client();  // SCardCancel: a new socket, only SCARD_CANCEL [traced]
  canceller.send_cancel(target.context());
  EXPECT_EQ(canceller.take_all(), Bytes(Le().u32(target.context()).u32(kSuccess)));
  EXPECT_EQ(target.take_all(), signal_bytes(kECancelled));  // [traced] 00000000 02001080
  EXPECT_FALSE(canceller.closed_by_shim());
  canceller.close();
  // Unregistered: a later change sends nothing more.
  r.desk.push({card_in(kReaderA, 1)});
  EXPECT_TRUE(target.nothing_pending());
  // The target's stream is in step.
  EXPECT_EQ(target.readers_state().size(), kArraySize);
}

TEST(ShimCoreCancel, TargetsNotWaitingAndUnknownContexts) {
  Rig r(kStandardDesk);
  auto t44 = r.client(4);
  auto t45 = r.client(5);
  auto t46 = r.client(6);
  auto canceller = r.raw_client();
  EXPECT_EQ(canceller.cancel(t44.context()), kEInvalidHandle) << "pcscd 1.9.9";
  EXPECT_EQ(canceller.cancel(t45.context()), kSuccess) << "pcscd 2.0.1+";
  EXPECT_EQ(canceller.cancel(t46.context()), kSuccess);
  // Each from a connection of its own, as SCardCancel does it.
  EXPECT_EQ(r.raw_client().cancel(t44.context()), kEInvalidHandle);
  EXPECT_EQ(r.raw_client().cancel(t45.context()), kSuccess);
  EXPECT_EQ(r.raw_client().cancel(t46.context()), kSuccess);
  // Unknown contexts.
  const uint32_t unknown = (t44.context() ^ t45.context() ^ t46.context()) | 1u;
  canceller.send_cancel(unknown);
  EXPECT_EQ(canceller.take_all(), Bytes(Le().u32(unknown).u32(kEInvalidHandle)));
  EXPECT_EQ(canceller.cancel(t44.context() ^ 0x1234), kEInvalidHandle);
  EXPECT_EQ(r.raw_client().cancel(0), kEInvalidHandle);
  EXPECT_TRUE(t44.nothing_pending());
  EXPECT_TRUE(t45.nothing_pending());
  EXPECT_TRUE(t46.nothing_pending());
  // STOP after a WAIT that was not cancelled still gets its {0, 0}.
  r.wait(t45);
  t45.send_cmd(cmd::kStopWait);
  EXPECT_EQ(t45.take_all(), signal_bytes(kSuccess));
  // A 4.4 target that was already signalled is no longer waiting either.
  r.wait(t44);
  r.desk.push({empty_reader(kReaderA, 2), empty_reader(kReaderB)});
  EXPECT_EQ(t44.take_all(), signal_bytes(kSuccess));
  EXPECT_EQ(canceller.cancel(t44.context()), kEInvalidHandle);
  EXPECT_TRUE(t44.nothing_pending());
}

TEST(ShimCoreCancel, CancelOfA46WaiterBeforeItsArrayComesAfterTheArray) {
  Rig r;
  r.desk_up({empty_reader(kReaderA)});
  auto t = r.client(6);
  t.send_cmd(cmd::kWait);
  EXPECT_EQ(r.raw_client().cancel(t.context()), kSuccess);
  EXPECT_TRUE(t.nothing_pending());
  EXPECT_EQ(t.state_size(), 16);
  t.send_cmd(cmd::kStateArray);
  Bytes out = t.take_all();
  ASSERT_EQ(out.size(), kArraySize + 8);
  EXPECT_EQ(slice(out, kArraySize, 8), signal_bytes(kECancelled));
}

}  // namespace
}  // namespace cardbridge::shim::core_test
