// HandleTable: the card handles the shim has given out, and pcscd's rules about them:
// which handle holds a reader's transaction or exclusive access, which handles owe their
// program a W_RESET_CARD or W_REMOVED_CARD, which ones lost their reader (orphans), and
// the per-reader sharing count the reader-state array shows. Pure data and rules, no I/O.
//
// A handle lives in one desk session (its generation); when that session ends or the
// handle's reader goes away it becomes an orphan and answers like a handle on an unplugged
// reader until the program disconnects it.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <unordered_map>

#include "cardbridge/protocol/messages.hpp"
#include "cardbridge/shim_core/prefetch.hpp"
#include "cardbridge/shim_core/reader_table.hpp"

namespace cardbridge::shim {

using ClientId = uint64_t;

struct Handle {
  uint32_t card = 0;           // the hCard the program knows
  ClientId owner = 0;
  uint32_t context = 0;        // the program's hContext
  std::size_t slot = 0;        // reader slot
  uint64_t generation = 0;     // desk session the handle lives in (0: orphan)
  protocol::DeskHandle desk;   // the desk's id for it
  uint32_t share_mode = 0;
  uint32_t protocol = 0;
  uint32_t event_baseline = 0;   // reader event counter when (re)connected
  bool baseline_present = true;  // a card was in the reader then
  bool reset_pending = false;    // the card was reset by someone else: W_RESET_CARD owed
  uint32_t lock_count = 0;       // transaction nesting held (as answered to the program)
  bool begin_pending = false;    // a deferred Begin not yet carried to the desk
  PrefetchQueue prefetch;        // speculative answers of the desk, in predicted order

  // An exclusive connection counts as one lock that End never releases.
  uint32_t lock_floor() const;
};

class HandleTable {
 public:
  static constexpr std::size_t kSlots = ReaderTable::kSlots;

  explicit HandleTable(const ReaderTable& readers) : readers_(readers) {}

  // The desk session handles must belong to (0: none, every handle is an orphan).
  void set_live_generation(uint64_t generation) { live_ = generation; }
  uint64_t live_generation() const { return live_; }

  Handle* find(uint32_t card);
  const Handle* find(uint32_t card) const;
  Handle& add(Handle h);
  void erase(uint32_t card);
  std::size_t size() const { return handles_.size(); }
  template <typename F>
  void for_each(F&& f) {
    for (auto& [card, h] : handles_) f(h);
  }

  bool is_orphan(const Handle& h) const { return live_ == 0 || h.generation != live_; }
  // pcscd marks every handle of a reader REMOVED when the card is taken out (not when one
  // is inserted): the event counter counts both, so from a present card any change is a
  // removal, from an empty reader it takes two events (in, out).
  bool removed_since(const Handle& h) const;
  // The handle's reference point for removal: the reader's state as the desk's SCardStatus
  // reported it in a Connect/Reconnect answer (event counter << 16 | state), or 0 when that
  // is unknown (the reader table's current view is used).
  void set_baseline(Handle& h, uint32_t desk_status_state) const;

  // Another live handle of the reader holds (or has deferred) a transaction or exclusive access.
  bool locked_by_other(const Handle& h) const;
  // pcscd would find nothing to report for |h|: live, no reset or removal pending, no
  // other handle holding the reader.
  bool predicted_clean(const Handle& h) const;
  // A live handle holds a transaction on |slot| beyond its exclusive floor (pcscd makes
  // Connect wait for it).
  bool transaction_on_slot(std::size_t slot) const;
  bool exclusive_on_slot(std::size_t slot) const;

  // The card in |slot| was reset: every live handle there owes W_RESET_CARD, except
  // |except_card| unless |include_caller| (EndTransaction with RESET includes its caller).
  void mark_reset(std::size_t slot, uint32_t except_card, bool include_caller);
  // The card in |slot| was removed: transactions end there (pcscd clears the lock),
  // deferred ones included, and speculative answers are void.
  void card_removed(std::size_t slot);
  // The reader of |slot| went away, or the whole desk: handles become orphans.
  void orphan_slot(std::size_t slot);
  void orphan_all();
  // Speculative answers of other handles of the reader are void once the card state may
  // have changed. Returns how many were dropped.
  std::size_t drop_prefetch_on_slot(std::size_t slot, uint32_t except_card);

  // Live handles per slot (pcscd's readerSharing before the exclusive rule), and which
  // slots have an exclusive holder.
  struct Sharing {
    std::array<int32_t, kSlots> count{};
    std::array<bool, kSlots> exclusive{};
  };
  Sharing sharing() const;

 private:
  const ReaderTable& readers_;
  uint64_t live_ = 0;
  std::unordered_map<uint32_t, Handle> handles_;
};

}  // namespace cardbridge::shim
