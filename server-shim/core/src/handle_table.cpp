#include "cardbridge/shim_core/handle_table.hpp"

#include "cardbridge/support/check.hpp"
#include "cardbridge/support/scard.hpp"

namespace cardbridge::shim {

namespace sc = cardbridge::scard;

uint32_t Handle::lock_floor() const { return share_mode == sc::kShareExclusive ? 1 : 0; }

Handle* HandleTable::find(uint32_t card) {
  auto it = handles_.find(card);
  return it == handles_.end() ? nullptr : &it->second;
}

const Handle* HandleTable::find(uint32_t card) const {
  auto it = handles_.find(card);
  return it == handles_.end() ? nullptr : &it->second;
}

Handle& HandleTable::add(Handle h) {
  auto [it, inserted] = handles_.emplace(h.card, std::move(h));
  CARDBRIDGE_CHECK(inserted);
  return it->second;
}

void HandleTable::erase(uint32_t card) { handles_.erase(card); }

bool HandleTable::removed_since(const Handle& h) const {
  const uint32_t delta = (readers_.slot(h.slot).event_count - h.event_baseline) & 0xFFFF;
  return h.baseline_present ? delta != 0 : delta >= 2;
}

void HandleTable::set_baseline(Handle& h, uint32_t desk_status_state) const {
  const auto& slot = readers_.slot(h.slot);
  if (desk_status_state != 0) {
    h.event_baseline = (desk_status_state >> 16) & 0xFFFF;
    h.baseline_present = (desk_status_state & sc::kReaderPresent) != 0;
  } else {
    h.event_baseline = slot.event_count;
    h.baseline_present = (slot.desk_state & sc::kStatePresent) != 0;
  }
}

bool HandleTable::locked_by_other(const Handle& h) const {
  for (const auto& [card, other] : handles_) {
    if (card != h.card && other.slot == h.slot && !is_orphan(other) && (other.lock_count > 0 || other.begin_pending))
      return true;
  }
  return false;
}

bool HandleTable::predicted_clean(const Handle& h) const {
  return !is_orphan(h) && !h.reset_pending && !removed_since(h) && !locked_by_other(h);
}

bool HandleTable::transaction_on_slot(std::size_t slot) const {
  for (const auto& [card, h] : handles_) {
    if (h.slot == slot && !is_orphan(h) && (h.lock_count > h.lock_floor() || h.begin_pending)) return true;
  }
  return false;
}

bool HandleTable::exclusive_on_slot(std::size_t slot) const {
  for (const auto& [card, h] : handles_) {
    if (h.slot == slot && !is_orphan(h) && h.share_mode == sc::kShareExclusive) return true;
  }
  return false;
}

void HandleTable::mark_reset(std::size_t slot, uint32_t except_card, bool include_caller) {
  for (auto& [card, h] : handles_) {
    if (h.slot != slot || is_orphan(h)) continue;
    if (card == except_card && !include_caller) continue;
    h.reset_pending = true;
  }
}

void HandleTable::card_removed(std::size_t slot) {
  for (auto& [card, h] : handles_) {
    if (h.slot == slot && !is_orphan(h) && removed_since(h)) {
      h.lock_count = 0;
      h.begin_pending = false;
      h.prefetch.clear();
    }
  }
}

void HandleTable::orphan_slot(std::size_t slot) {
  for (auto& [card, h] : handles_) {
    if (h.slot == slot && !is_orphan(h)) h.generation = 0;
  }
}

void HandleTable::orphan_all() {
  for (auto& [card, h] : handles_) h.generation = 0;
}

std::size_t HandleTable::drop_prefetch_on_slot(std::size_t slot, uint32_t except_card) {
  std::size_t dropped = 0;
  for (auto& [card, h] : handles_) {
    if (h.slot != slot || card == except_card || h.prefetch.empty()) continue;
    dropped += h.prefetch.size();
    h.prefetch.clear();
  }
  return dropped;
}

HandleTable::Sharing HandleTable::sharing() const {
  Sharing s;
  for (const auto& [card, h] : handles_) {
    if (is_orphan(h)) continue;
    if (h.share_mode == sc::kShareExclusive) s.exclusive[h.slot] = true;
    ++s.count[h.slot];
  }
  return s;
}

}  // namespace cardbridge::shim
