// The virtual reader table: the desk's readers as pcscd's clients see them, in pcscd's
// 16-slot reader-state array. Pure data: no I/O, no clock.
//
// Slot rules follow pcscd (readerfactory.c): a new reader takes the first free slot, a
// reader keeps its slot while it exists, a removed reader's slot is zeroed.
#pragma once

#include <array>
#include <map>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cardbridge/protocol/messages.hpp"
#include "cardbridge/pcscd_wire/wire.hpp"

namespace cardbridge::shim {

struct ReaderSlot {
  std::string name;  // empty: unused
  uint32_t desk_state = 0;       // SCARD_STATE_* as pushed by the desk
  uint32_t event_count = 0;      // desk eventCounter
  std::vector<uint8_t> atr;
  // Learnt from the desk's answers (Connect/Reconnect/Status): daemon-level bits
  // (SCARD_PRESENT|SCARD_POWERED|...), valid until the next card event.
  std::optional<uint32_t> daemon_state;
  uint32_t card_protocol = 0;
  // Attribute answers (rv, bytes, length) cached per reader; card-dependent ones are
  // dropped on every card event.
  struct CachedAttribute {
    uint32_t rv = 0;
    std::vector<uint8_t> data;
    uint32_t length = 0;
  };
  std::map<uint32_t, CachedAttribute> attributes;
  // The desk's card image for the card (protocol::image_state), as last pushed.
  uint32_t desk_image = 0;
  bool used() const { return !name.empty(); }
};

struct SnapshotChanges {
  std::vector<std::pair<std::size_t, std::string>> removed;  // slot and name of readers that disappeared
  std::vector<std::size_t> added;         // slots that got a new reader
  std::vector<std::size_t> card_events;   // slots whose card was inserted/removed
  std::vector<std::size_t> image_voided;  // slots whose desk card image went back to none
  std::size_t dropped = 0;                // readers beyond the 16 slots
};

class ReaderTable {
 public:
  static constexpr std::size_t kSlots = wire::kLegacyReaderSlots;

  // Replaces the table's content with the desk's readers (matched by name).
  SnapshotChanges apply(const protocol::ReaderSnapshot& snapshot);
  // All readers vanish (desk gone). Returns the slots that were in use.
  std::vector<std::size_t> clear();

  std::optional<std::size_t> find(std::string_view name) const;
  const ReaderSlot& slot(std::size_t i) const { return slots_.at(i); }
  ReaderSlot& slot(std::size_t i) { return slots_.at(i); }
  std::size_t count() const;

  // pcsc-lite daemon-level state for a slot (what pcscd writes into readerState).
  static uint32_t daemon_state_from_desk(uint32_t desk_state, std::size_t atr_length);

  // The 16 x 184-byte array; |sharing| gives readerSharing per slot.
  std::vector<uint8_t> serialize(const std::array<int32_t, kSlots>& sharing) const;

 private:
  std::array<ReaderSlot, kSlots> slots_;
};

}  // namespace cardbridge::shim
