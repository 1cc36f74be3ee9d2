#include "cardbridge/shim_core/reader_table.hpp"

#include <algorithm>
#include <cstring>

namespace cardbridge::shim {

namespace sc = cardbridge::scard;

SnapshotChanges ReaderTable::apply(const protocol::ReaderSnapshot& snapshot) {
  SnapshotChanges changes;
  // Removed readers first, so that their slots can be reused by new ones.
  for (std::size_t i = 0; i < kSlots; ++i) {
    if (!slots_[i].used()) continue;
    bool still = std::any_of(snapshot.readers.begin(), snapshot.readers.end(),
                             [&](const auto& r) { return r.name == slots_[i].name; });
    if (!still) {
      changes.removed.emplace_back(i, slots_[i].name);
      slots_[i] = ReaderSlot{};
    }
  }
  for (const auto& r : snapshot.readers) {
    auto existing = find(r.name);
    std::size_t i;
    if (existing) {
      i = *existing;
      auto& s = slots_[i];
      const bool was_present = (s.desk_state & sc::kStatePresent) != 0;
      const bool is_present = (r.state & sc::kStatePresent) != 0;
      if (s.event_count != r.event_count || was_present != is_present || s.atr != r.atr) {
        changes.card_events.push_back(i);
        s.daemon_state.reset();
        s.card_protocol = 0;
        s.attributes.erase(sc::kAttrAtrString);  // the only card-dependent cached attribute
      }
    } else {
      auto free_slot = std::find_if(slots_.begin(), slots_.end(),
                                    [](const ReaderSlot& s) { return !s.used(); });
      if (free_slot == slots_.end()) {
        ++changes.dropped;
        continue;
      }
      i = static_cast<std::size_t>(free_slot - slots_.begin());
      slots_[i] = ReaderSlot{};
      slots_[i].name = r.name;
      changes.added.push_back(i);
    }
    auto& s = slots_[i];
    if (s.desk_image != protocol::image_state::kNone && r.image == protocol::image_state::kNone)
      changes.image_voided.push_back(i);
    s.desk_image = r.image;
    s.desk_state = r.state;
    s.event_count = r.event_count & 0xFFFF;
    s.atr = r.atr;
    if (!(s.desk_state & sc::kStatePresent)) {
      s.daemon_state.reset();
      s.card_protocol = 0;
    }
  }
  return changes;
}

std::vector<std::size_t> ReaderTable::clear() {
  std::vector<std::size_t> used;
  for (std::size_t i = 0; i < kSlots; ++i) {
    if (slots_[i].used()) used.push_back(i);
    slots_[i] = ReaderSlot{};
  }
  return used;
}

std::optional<std::size_t> ReaderTable::find(std::string_view name) const {
  if (name.empty()) return std::nullopt;
  for (std::size_t i = 0; i < kSlots; ++i) {
    if (slots_[i].name == name) return i;
  }
  return std::nullopt;
}

std::size_t ReaderTable::count() const {
  return static_cast<std::size_t>(
      std::count_if(slots_.begin(), slots_.end(), [](const auto& s) { return s.used(); }));
}

uint32_t ReaderTable::daemon_state_from_desk(uint32_t desk_state, std::size_t atr_length) {
  if (desk_state & (sc::kStateUnavailable | sc::kStateUnknown)) return sc::kReaderUnknown;
  if (desk_state & sc::kStatePresent) {
    if (desk_state & sc::kStateMute) return sc::kReaderPresent | sc::kReaderSwallowed;
    // A present card that pcscd powered up (it does so on insertion) has an ATR.
    if (atr_length == 0 || (desk_state & sc::kStateUnpowered)) return sc::kReaderPresent;
    return sc::kReaderPresent | sc::kReaderPowered | sc::kReaderNegotiable;
  }
  return sc::kReaderAbsent;
}

std::vector<uint8_t> ReaderTable::serialize(const std::array<int32_t, kSlots>& sharing) const {
  std::vector<uint8_t> out(wire::kLegacyArrayBytes, 0);
  for (std::size_t i = 0; i < kSlots; ++i) {
    const auto& s = slots_[i];
    if (!s.used()) continue;
    wire::ReaderState rs{};
    wire::copy_name(rs.name, s.name);
    rs.event_counter = s.event_count;
    rs.reader_state = s.daemon_state.value_or(daemon_state_from_desk(s.desk_state, s.atr.size()));
    rs.reader_sharing = sharing[i];
    const auto n = std::min(s.atr.size(), sizeof rs.atr);
    if (n != 0) std::memcpy(rs.atr, s.atr.data(), n);
    rs.atr_length = static_cast<uint32_t>(n);
    rs.card_protocol = s.card_protocol;
    std::memcpy(out.data() + i * sizeof(wire::ReaderState), &rs, sizeof rs);
  }
  return out;
}

}  // namespace cardbridge::shim
