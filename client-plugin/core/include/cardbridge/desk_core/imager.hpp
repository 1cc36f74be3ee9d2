// Imager: one pass of the desk reading a card's image (docs/performance.md, "The card
// image"), as a sequence of PC/SC calls the desk core asks its edge to make on a lane of
// the imaging's own (its own PC/SC context and handle). Pure: no I/O, time passed in.
//
// A pass: EstablishContext, Connect (shared), Status (still the same card insertion?),
// then transactions, each short: a few of the plan's SELECTs (with the GET RESPONSE after
// a 61xx, T=0), or one public file (its SELECT again, then READ BINARY in the programs'
// chunk size), a pause between them so that a desk program waiting for the card gets it;
// last, the card's update marker read again (CPx: EF_ACTUA; a change means the card was
// updated while it was read: the pass starts over). Disconnect (LEAVE), ReleaseContext.
//
// It reads only what the plan names: files programs read that are public (their FCP's
// security attributes allow READ BINARY always, or programs read them before any PIN was
// presented), and never one whose FCP asks for a condition, nor on after a 6982.
//
// yield(): a program wants the card. The pass stops after the call in flight (ending its
// transaction, disconnecting); what was read completely stays.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "cardbridge/card_image/image.hpp"
#include "cardbridge/desk_core/image_store.hpp"
#include "cardbridge/desk_core/pcsc_call.hpp"

namespace cardbridge::client {

struct ImagerSettings {
  uint16_t default_chunk = 128;           // READ BINARY size when programs showed none
  std::size_t selects_per_transaction = 8;
  std::chrono::milliseconds gap{120};     // between transactions (pcsc-lite retries a busy Begin every 100 ms)
};

class Imager {
 public:
  enum class Outcome {
    kRunning,
    kComplete,     // everything the plan names is in the image
    kYielded,      // stopped for a program; the image holds what was finished
    kBusy,         // the card is held exclusively (or locked) by another desk program
    kFailed,       // a PC/SC error: try again later
    kCardChanged,  // another card, or the card changed while it was read: the image is void
  };
  struct Wait {
    protocol::TimePoint until;
  };
  struct Finished {};
  using Action = std::variant<PcscCall, Wait, Finished>;

  Imager(std::string reader, uint32_t event_count, Bytes atr, ImagePlan plan,
         std::optional<protocol::CardImage> start, ImagerSettings settings = {});

  // What to do now: a call to make, a pause, or nothing more (outcome()).
  Action next(protocol::TimePoint now);
  // The result of the call next() gave.
  void result(const CallResult& r, protocol::TimePoint now);
  void yield();
  bool yielding() const { return yield_; }
  // A handle to the card is open (between its Connect and its Disconnect).
  bool holds_card() const { return card_.has_value(); }

  Outcome outcome() const { return outcome_; }
  const std::string& reader() const { return reader_; }
  uint32_t event_count() const { return event_count_; }
  const Bytes& atr() const { return atr_; }
  uint64_t plan_version() const { return plan_.version; }
  // The image as far as it is read (only whole entries and whole files).
  const protocol::CardImage& image() const { return image_; }
  // APDUs sent so far (tests, logs).
  std::size_t apdus() const { return apdus_; }
  // Files of the plan the card refused to read without a condition (6982, 6985, 6986).
  const std::vector<ImageKey>& restricted() const { return restricted_; }

  // The file whose content is the card's own update marker, for cards that have one
  // (CPx: EF_ACTUA 3F00/D010, docs/cps-cards.md); nullopt otherwise.
  static std::optional<ImageKey> update_marker(const Bytes& atr, const protocol::CardImage& image);

 private:
  struct Item {
    enum class Kind { kSelect, kRead, kMarker } kind = Kind::kSelect;
    Bytes command;  // kSelect
    ImageKey key;   // kRead, kMarker
  };
  enum class Phase { kEstablish, kConnect, kStatus, kBetween, kBegin, kWork, kEnd, kDisconnect, kRelease, kDone };

  void plan_items();
  void start_transaction();
  // The next APDU of the transaction in progress, or nullopt when it is over.
  std::optional<Bytes> next_apdu();
  void apdu_done(const CallResult& r);
  void stop(Outcome o);  // leave: End if in a transaction, Disconnect, Release
  PcscCall transmit(Bytes command) const;
  void record_select(const Bytes& command, const Bytes& response, const Bytes& fetched);

  std::string reader_;
  uint32_t event_count_ = 0;
  Bytes atr_;
  ImagePlan plan_;
  ImagerSettings settings_;
  protocol::CardImage image_;
  card_image::ImageIndex index_;  // over image_, rebuilt when it grows
  std::deque<Item> items_;

  Phase phase_ = Phase::kEstablish;
  Outcome outcome_ = Outcome::kRunning;
  bool yield_ = false;
  std::optional<ScardContext> ctx_;
  std::optional<ScardHandle> card_;
  uint32_t protocol_ = 0;
  protocol::TimePoint not_before_{};

  // The transaction in progress: its items and where it is.
  std::vector<Item> txn_;
  std::size_t txn_item_ = 0;
  enum class Sub { kSelect, kGetResponse, kReselect, kRead } sub_ = Sub::kSelect;
  Bytes last_command_;
  Bytes select_answer_;
  Bytes file_;      // a file being read
  uint32_t file_size_ = 0;
  bool txn_failed_ = false;
  std::size_t apdus_ = 0;
  std::vector<ImageKey> restricted_;
};

}  // namespace cardbridge::client
