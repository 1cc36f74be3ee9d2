// ReaderTable: pcscd's 16-slot reader-state array built from the desk's snapshots.
#include "cardbridge/shim_core/reader_table.hpp"

#include <bit>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace cardbridge::shim {
namespace {

static_assert(std::endian::native == std::endian::little);

namespace sc = cardbridge::scard;
using protocol::ReaderInfo;
using protocol::ReaderSnapshot;
using Bytes = std::vector<uint8_t>;
using Slots = std::vector<std::size_t>;

const Bytes kAtr = {0x3B, 0x80, 0x80, 0x01, 0x01};

ReaderInfo empty_reader(std::string name, uint32_t events = 0) {
  return ReaderInfo{std::move(name), sc::kStateEmpty, events, {}};
}
ReaderInfo card_reader(std::string name, uint32_t events = 1, Bytes atr = kAtr) {
  return ReaderInfo{std::move(name), sc::kStatePresent, events, std::move(atr)};
}
ReaderSnapshot snap(std::vector<ReaderInfo> readers) {
  static uint64_t seq = 0;
  return ReaderSnapshot{++seq, std::move(readers)};
}

uint32_t u32_at(const Bytes& b, std::size_t off) {
  uint32_t v;
  std::memcpy(&v, b.data() + off, 4);
  return v;
}

// ---- slots --------------------------------------------------------------------------------

TEST(ReaderTableSlots, NewReadersTakeFirstFreeSlots) {
  ReaderTable t;
  auto ch = t.apply(snap({empty_reader("A"), card_reader("B"), empty_reader("C")}));
  EXPECT_EQ(ch.added, (Slots{0, 1, 2}));
  EXPECT_TRUE(ch.removed.empty());
  EXPECT_TRUE(ch.card_events.empty());
  EXPECT_EQ(ch.dropped, 0u);
  EXPECT_EQ(t.count(), 3u);
  EXPECT_EQ(t.slot(0).name, "A");
  EXPECT_EQ(t.slot(1).name, "B");
  EXPECT_EQ(t.slot(2).name, "C");
  EXPECT_FALSE(t.slot(3).used());
  EXPECT_EQ(t.find("B"), 1u);
  EXPECT_FALSE(t.find("D").has_value());
  EXPECT_FALSE(t.find("").has_value());
}

TEST(ReaderTableSlots, SlotsAreStableWhateverTheSnapshotOrder) {
  ReaderTable t;
  t.apply(snap({empty_reader("A"), empty_reader("B"), empty_reader("C")}));
  auto ch = t.apply(snap({empty_reader("C"), empty_reader("A"), empty_reader("B")}));
  EXPECT_TRUE(ch.added.empty());
  EXPECT_TRUE(ch.removed.empty());
  EXPECT_TRUE(ch.card_events.empty());
  EXPECT_EQ(t.find("A"), 0u);
  EXPECT_EQ(t.find("B"), 1u);
  EXPECT_EQ(t.find("C"), 2u);
}

TEST(ReaderTableSlots, RemovedReaderSlotIsZeroedAndOthersStay) {
  ReaderTable t;
  t.apply(snap({empty_reader("A"), card_reader("B"), empty_reader("C")}));
  auto ch = t.apply(snap({empty_reader("A"), empty_reader("C")}));
  ASSERT_EQ(ch.removed.size(), 1u);
  EXPECT_EQ(ch.removed[0].first, 1u);
  EXPECT_TRUE(ch.added.empty());
  EXPECT_FALSE(t.slot(1).used());
  EXPECT_TRUE(t.slot(1).atr.empty());
  EXPECT_EQ(t.slot(1).event_count, 0u);
  EXPECT_EQ(t.find("C"), 2u);
  EXPECT_EQ(t.count(), 2u);
}

TEST(ReaderTableSlots, RemovedSlotIsReusedByTheNextNewReader) {
  ReaderTable t;
  t.apply(snap({empty_reader("A"), empty_reader("B"), empty_reader("C")}));
  t.apply(snap({empty_reader("A"), empty_reader("C")}));
  auto ch = t.apply(snap({empty_reader("A"), empty_reader("C"), empty_reader("D"), empty_reader("E")}));
  EXPECT_EQ(ch.added, (Slots{1, 3}));
  EXPECT_EQ(t.find("D"), 1u);
  EXPECT_EQ(t.find("E"), 3u);
}

TEST(ReaderTableSlots, RemoveAndAddInOneSnapshotReusesTheSlot) {
  // Removals are processed first, so a replacement reader takes the freed slot.
  ReaderTable t;
  t.apply(snap({empty_reader("A"), empty_reader("B")}));
  auto ch = t.apply(snap({empty_reader("B"), empty_reader("Z")}));
  ASSERT_EQ(ch.removed.size(), 1u);
  EXPECT_EQ(ch.removed[0].first, 0u);
  EXPECT_EQ(ch.added, (Slots{0}));
  EXPECT_EQ(t.find("Z"), 0u);
  EXPECT_EQ(t.find("B"), 1u);
}

TEST(ReaderTableSlots, SameNameReaddedIsANewReader) {
  ReaderTable t;
  t.apply(snap({card_reader("A", 5)}));
  t.apply(snap({}));
  auto ch = t.apply(snap({card_reader("A", 5)}));
  EXPECT_EQ(ch.added, (Slots{0}));
  EXPECT_TRUE(ch.card_events.empty());  // a new reader, not a card event
}

TEST(ReaderTableSlots, MoreThanSixteenReadersAreDropped) {
  ReaderTable t;
  std::vector<ReaderInfo> readers;
  for (int i = 0; i < 20; ++i) readers.push_back(empty_reader("R" + std::to_string(i)));
  auto ch = t.apply(snap(readers));
  EXPECT_EQ(ch.added.size(), 16u);
  EXPECT_EQ(ch.dropped, 4u);
  EXPECT_EQ(t.count(), 16u);
  for (std::size_t i = 0; i < 16; ++i) EXPECT_EQ(t.slot(i).name, "R" + std::to_string(i));
  EXPECT_FALSE(t.find("R16").has_value());

  // Same snapshot again: still 4 dropped, nothing else changes.
  auto again = t.apply(snap(readers));
  EXPECT_EQ(again.dropped, 4u);
  EXPECT_TRUE(again.added.empty());
  EXPECT_TRUE(again.removed.empty());

  // Free one slot: a dropped reader gets in.
  readers.erase(readers.begin() + 3);
  auto third = t.apply(snap(readers));
  ASSERT_EQ(third.removed.size(), 1u);
  EXPECT_EQ(third.removed[0].first, 3u);
  EXPECT_EQ(third.added, (Slots{3}));
  EXPECT_EQ(t.slot(3).name, "R16");
  EXPECT_EQ(third.dropped, 3u);
}

TEST(ReaderTableSlots, ExactlySixteenFit) {
  ReaderTable t;
  std::vector<ReaderInfo> readers;
  for (int i = 0; i < 16; ++i) readers.push_back(empty_reader("R" + std::to_string(i)));
  auto ch = t.apply(snap(readers));
  EXPECT_EQ(ch.dropped, 0u);
  EXPECT_EQ(t.count(), 16u);
}

TEST(ReaderTableSlots, ClearReturnsUsedSlots) {
  ReaderTable t;
  t.apply(snap({empty_reader("A"), empty_reader("B"), empty_reader("C")}));
  t.apply(snap({empty_reader("A"), empty_reader("C")}));
  EXPECT_EQ(t.clear(), (Slots{0, 2}));
  EXPECT_EQ(t.count(), 0u);
  EXPECT_TRUE(t.clear().empty());
  std::array<int32_t, ReaderTable::kSlots> sharing{};
  EXPECT_EQ(t.serialize(sharing), Bytes(2944, 0));
}

// ---- change reporting ----------------------------------------------------------------------

TEST(ReaderTableChanges, IdenticalSnapshotReportsNothing) {
  ReaderTable t;
  t.apply(snap({card_reader("A", 3), empty_reader("B", 2)}));
  auto ch = t.apply(snap({card_reader("A", 3), empty_reader("B", 2)}));
  EXPECT_TRUE(ch.added.empty());
  EXPECT_TRUE(ch.removed.empty());
  EXPECT_TRUE(ch.card_events.empty());
  EXPECT_EQ(ch.dropped, 0u);
}

TEST(ReaderTableChanges, CardInsertion) {
  ReaderTable t;
  t.apply(snap({empty_reader("A", 0), empty_reader("B", 0)}));
  auto ch = t.apply(snap({empty_reader("A", 0), card_reader("B", 1)}));
  EXPECT_EQ(ch.card_events, (Slots{1}));
  EXPECT_EQ(t.slot(1).event_count, 1u);
  EXPECT_EQ(t.slot(1).atr, kAtr);
  EXPECT_EQ(t.slot(1).desk_state, sc::kStatePresent);
}

TEST(ReaderTableChanges, CardRemoval) {
  ReaderTable t;
  t.apply(snap({card_reader("A", 1)}));
  auto ch = t.apply(snap({empty_reader("A", 2)}));
  EXPECT_EQ(ch.card_events, (Slots{0}));
  EXPECT_TRUE(t.slot(0).atr.empty());
}

TEST(ReaderTableChanges, PresenceFlipWithoutCounterIsAnEvent) {
  // A desk whose PC/SC does not count events still reports presence changes.
  ReaderTable t;
  t.apply(snap({empty_reader("A", 0)}));
  auto ch = t.apply(snap({card_reader("A", 0)}));
  EXPECT_EQ(ch.card_events, (Slots{0}));
}

TEST(ReaderTableChanges, FastSwapSeenOnlyThroughTheCounter) {
  // Card removed and another inserted between two snapshots: still present, counter +2.
  ReaderTable t;
  t.apply(snap({card_reader("A", 1)}));
  auto ch = t.apply(snap({card_reader("A", 3)}));
  EXPECT_EQ(ch.card_events, (Slots{0}));
}

TEST(ReaderTableChanges, AtrChangeIsAnEvent) {
  ReaderTable t;
  t.apply(snap({card_reader("A", 1)}));
  auto ch = t.apply(snap({card_reader("A", 1, {0x3B, 0x00})}));
  EXPECT_EQ(ch.card_events, (Slots{0}));
}

TEST(ReaderTableChanges, OtherStateBitsAreNotCardEvents) {
  ReaderTable t;
  t.apply(snap({card_reader("A", 1)}));
  auto ch = t.apply(snap({ReaderInfo{"A", sc::kStatePresent | sc::kStateInUse, 1, kAtr}}));
  EXPECT_TRUE(ch.card_events.empty());
  EXPECT_EQ(t.slot(0).desk_state, sc::kStatePresent | sc::kStateInUse);
}

TEST(ReaderTableChanges, CardEventForgetsLearntCardState) {
  ReaderTable t;
  t.apply(snap({card_reader("A", 1)}));
  t.slot(0).daemon_state = sc::kReaderPresent | sc::kReaderPowered | sc::kReaderNegotiable | sc::kReaderSpecific;
  t.slot(0).card_protocol = sc::kProtocolT1;
  // No event: what was learnt stays.
  t.apply(snap({card_reader("A", 1)}));
  EXPECT_TRUE(t.slot(0).daemon_state.has_value());
  EXPECT_EQ(t.slot(0).card_protocol, sc::kProtocolT1);
  // Card swapped: forgotten.
  auto ch = t.apply(snap({card_reader("A", 3)}));
  EXPECT_EQ(ch.card_events, (Slots{0}));
  EXPECT_FALSE(t.slot(0).daemon_state.has_value());
  EXPECT_EQ(t.slot(0).card_protocol, 0u);
}

TEST(ReaderTableChanges, CardAbsentForgetsLearntCardState) {
  ReaderTable t;
  t.apply(snap({card_reader("A", 1)}));
  t.slot(0).daemon_state = 0x34;
  t.slot(0).card_protocol = 2;
  t.apply(snap({empty_reader("A", 2)}));
  EXPECT_FALSE(t.slot(0).daemon_state.has_value());
  EXPECT_EQ(t.slot(0).card_protocol, 0u);
}

TEST(ReaderTableChanges, EventCounterIsSixteenBits) {
  ReaderTable t;
  t.apply(snap({card_reader("A", 0x1FFFF)}));
  EXPECT_EQ(t.slot(0).event_count, 0xFFFFu);
}

TEST(ReaderTableChanges, EverythingAtOnce) {
  ReaderTable t;
  t.apply(snap({empty_reader("A"), card_reader("B", 1), empty_reader("C")}));
  auto ch = t.apply(snap({card_reader("A", 1), empty_reader("C"), empty_reader("D")}));
  ASSERT_EQ(ch.removed.size(), 1u);
  EXPECT_EQ(ch.removed[0].first, 1u);
  EXPECT_EQ(ch.added, (Slots{1}));  // D reuses B's slot
  EXPECT_EQ(ch.card_events, (Slots{0}));
  EXPECT_EQ(t.slot(1).name, "D");
}

// ---- daemon state -------------------------------------------------------------------------

TEST(ReaderTableDaemonState, MappingAsPcscdWritesIt) {
  using T = ReaderTable;
  EXPECT_EQ(T::daemon_state_from_desk(sc::kStateEmpty, 0), 0x02u);
  EXPECT_EQ(T::daemon_state_from_desk(sc::kStatePresent, 5), 0x34u);
  EXPECT_EQ(T::daemon_state_from_desk(sc::kStatePresent | sc::kStateMute, 0), 0x0Cu);
  EXPECT_EQ(T::daemon_state_from_desk(sc::kStatePresent | sc::kStateMute, 5), 0x0Cu);
  EXPECT_EQ(T::daemon_state_from_desk(sc::kStateUnavailable, 0), 0x01u);
  EXPECT_EQ(T::daemon_state_from_desk(sc::kStateUnknown, 0), 0x01u);
  EXPECT_EQ(T::daemon_state_from_desk(sc::kStateUnavailable | sc::kStatePresent, 5), 0x01u);
}

TEST(ReaderTableDaemonState, PresentButNotPowered) {
  using T = ReaderTable;
  EXPECT_EQ(T::daemon_state_from_desk(sc::kStatePresent, 0), sc::kReaderPresent);
  EXPECT_EQ(T::daemon_state_from_desk(sc::kStatePresent | sc::kStateUnpowered, 5), sc::kReaderPresent);
}

TEST(ReaderTableDaemonState, IrrelevantBitsDoNotMatter) {
  using T = ReaderTable;
  EXPECT_EQ(T::daemon_state_from_desk(sc::kStatePresent | sc::kStateInUse | sc::kStateChanged, 5), 0x34u);
  EXPECT_EQ(T::daemon_state_from_desk(sc::kStatePresent | sc::kStateExclusive, 5), 0x34u);
  EXPECT_EQ(T::daemon_state_from_desk(sc::kStateEmpty | sc::kStateChanged, 0), 0x02u);
  EXPECT_EQ(T::daemon_state_from_desk(0, 0), 0x02u);
}

// ---- serialize ------------------------------------------------------------------------------

TEST(ReaderTableSerialize, ByteLayout) {
  ReaderTable t;
  t.apply(snap({card_reader("Virtual PCD 00 00", 1), empty_reader("Virtual PCD 00 01", 7)}));
  std::array<int32_t, ReaderTable::kSlots> sharing{};
  sharing[0] = -1;
  sharing[1] = 0;
  sharing[5] = 9;  // unused slot: ignored
  Bytes b = t.serialize(sharing);
  ASSERT_EQ(b.size(), 2944u);

  // Slot 0 at offset 0 (traced layout, pcsc-protocol.md §3.1).
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(b.data())), "Virtual PCD 00 00");
  for (std::size_t i = 17; i < 128; ++i) ASSERT_EQ(b[i], 0) << i;
  EXPECT_EQ(u32_at(b, 128), 1u);        // eventCounter
  EXPECT_EQ(u32_at(b, 132), 0x34u);     // readerState
  EXPECT_EQ(u32_at(b, 136), 0xFFFFFFFFu);  // readerSharing -1
  EXPECT_EQ(Bytes(b.begin() + 140, b.begin() + 145), kAtr);
  for (std::size_t i = 145; i < 176; ++i) ASSERT_EQ(b[i], 0) << i;  // rest of ATR + padding
  EXPECT_EQ(u32_at(b, 176), 5u);        // cardAtrLength
  EXPECT_EQ(u32_at(b, 180), 0u);        // cardProtocol

  // Slot 1 at offset 184.
  const std::size_t s1 = 184;
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(b.data() + s1)), "Virtual PCD 00 01");
  EXPECT_EQ(u32_at(b, s1 + 128), 7u);
  EXPECT_EQ(u32_at(b, s1 + 132), 0x02u);
  EXPECT_EQ(u32_at(b, s1 + 136), 0u);
  EXPECT_EQ(u32_at(b, s1 + 176), 0u);

  // Slots 2..15 are all zero, including slot 5 whose sharing value was non-zero.
  for (std::size_t i = 2 * 184; i < 2944; ++i) ASSERT_EQ(b[i], 0) << i;
}

TEST(ReaderTableSerialize, LearntStateAndProtocolWin) {
  ReaderTable t;
  t.apply(snap({card_reader("A", 1)}));
  t.slot(0).daemon_state = sc::kReaderPresent | sc::kReaderPowered | sc::kReaderNegotiable | sc::kReaderSpecific;
  t.slot(0).card_protocol = sc::kProtocolT1;
  std::array<int32_t, ReaderTable::kSlots> sharing{};
  sharing[0] = 2;
  Bytes b = t.serialize(sharing);
  EXPECT_EQ(u32_at(b, 132), 0x74u);
  EXPECT_EQ(u32_at(b, 136), 2u);
  EXPECT_EQ(u32_at(b, 180), 2u);
}

TEST(ReaderTableSerialize, SlotOffsetsFollowSlotNumbers) {
  ReaderTable t;
  t.apply(snap({empty_reader("A"), empty_reader("B"), empty_reader("C")}));
  t.apply(snap({empty_reader("C")}));  // only slot 2 left
  std::array<int32_t, ReaderTable::kSlots> sharing{};
  Bytes b = t.serialize(sharing);
  EXPECT_EQ(b[0], 0);
  EXPECT_EQ(b[184], 0);
  EXPECT_EQ(b[2 * 184], 'C');
  EXPECT_EQ(u32_at(b, 2 * 184 + 132), 0x02u);
}

TEST(ReaderTableSerialize, LongestNameAndAtr) {
  ReaderTable t;
  const std::string name(127, 'N');
  Bytes atr(33);
  for (std::size_t i = 0; i < atr.size(); ++i) atr[i] = static_cast<uint8_t>(0xA0 + i);
  t.apply(snap({card_reader(name, 1, atr)}));
  std::array<int32_t, ReaderTable::kSlots> sharing{};
  Bytes b = t.serialize(sharing);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(b.data()), 127), name);
  EXPECT_EQ(b[127], 0);  // always NUL-terminated
  EXPECT_EQ(Bytes(b.begin() + 140, b.begin() + 173), atr);
  EXPECT_EQ(b[173], 0);  // padding untouched
  EXPECT_EQ(u32_at(b, 176), 33u);
}

TEST(ReaderTableSerialize, FullTable) {
  ReaderTable t;
  std::vector<ReaderInfo> readers;
  for (int i = 0; i < 16; ++i) readers.push_back(card_reader("R" + std::to_string(i), static_cast<uint32_t>(i)));
  t.apply(snap(readers));
  std::array<int32_t, ReaderTable::kSlots> sharing{};
  for (std::size_t i = 0; i < sharing.size(); ++i) sharing[i] = static_cast<int32_t>(i);
  Bytes b = t.serialize(sharing);
  for (std::size_t i = 0; i < 16; ++i) {
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(b.data() + i * 184)), "R" + std::to_string(i));
    EXPECT_EQ(u32_at(b, i * 184 + 128), i);
    EXPECT_EQ(u32_at(b, i * 184 + 136), i);
  }
}

}  // namespace
}  // namespace cardbridge::shim
