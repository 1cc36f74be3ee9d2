// VirtualCard: the card of one reader as the shim answers it from the desk's card image
// (docs/performance.md, "The card image"). Pure data and rules, no I/O.
//
// It keeps, per logical channel, the current file as the session's programs see it (their
// SELECTs answered from the image move it) and as the real card has it (known only after a
// command went to the card). A command it can answer byte for byte from the image —
// an absolute SELECT the desk recorded, the GET RESPONSE after its 61xx, a READ BINARY
// inside a file the image holds — is answered here. Any other command goes to the card,
// preceded by the SELECT that makes the card's current file the one the program expects
// (the prelude), in the same round trip.
//
// The image is only as good as the card it was read from: the shim drops the VirtualCard
// on every card event, on any command that may modify the card (card_image::may_modify),
// when the desk voids its image, and when a prelude is not answered as the image says.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <variant>
#include <vector>

#include "cardbridge/card_image/image.hpp"

namespace cardbridge::shim {

class VirtualCard {
 public:
  using Bytes = std::vector<uint8_t>;
  static constexpr std::size_t kChannels = 20;

  explicit VirtualCard(protocol::CardImage image);

  // The answer, from the image.
  struct Local {
    Bytes response;  // data + SW
  };
  // To the card, after |prelude| (possibly none).
  struct Forward {
    std::vector<Bytes> prelude;
  };
  using Decision = std::variant<Local, Forward>;

  // What to do with |apdu|, sent with |send_protocol|. A Local answer is final: the
  // program's view moves as the card's would have.
  Decision transmit(std::span<const uint8_t> apdu, uint32_t send_protocol);
  // The card answered |apdu| with |response| after |prelude|, whose answers are
  // |prelude_answers|. False when those answers are not the image's: the image does not
  // describe this card (the caller drops it and asks the card again without a prelude).
  bool forwarded(std::span<const uint8_t> apdu, const std::vector<Bytes>& prelude,
                 const std::vector<Bytes>& prelude_answers, std::span<const uint8_t> response);
  // The card was reset or powered down, or may have been used by someone else (no handle of
  // the session left): every channel's current file is the card's own again.
  void card_reset();

  const card_image::ImageIndex& index() const { return index_; }
  uint32_t recv_protocol() const { return index_.image().recv_protocol; }
  bool complete() const { return index_.image().complete; }
  uint32_t event_count() const { return index_.image().event_count; }

  struct Stats {
    uint64_t local = 0;      // commands answered from the image
    uint64_t preludes = 0;   // commands sent with a prelude
  };
  const Stats& stats() const { return stats_; }

 private:
  struct Channel {
    // The current file as the program sees it; nullopt: the card's own (whatever the real
    // card has: nothing was answered locally since the card last decided it).
    std::optional<card_image::Key> view;
    Bytes view_select;                     // the SELECT that made |view| current (answered here)
    std::optional<card_image::Key> card;   // the real card's current file, when known
    std::optional<Bytes> pending;          // GET RESPONSE data of a 61xx answered here
    std::vector<Bytes> served;             // GET RESPONSEs answered from |pending| so far
  };

  Forward prelude_for(const Channel& ch, bool to_pending) const;
  // What the card answers |prelude| if the image is right (nullopt: unknown).
  std::optional<std::vector<Bytes>> expected_answers(const std::vector<Bytes>& prelude) const;
  void clear_pending();

  card_image::ImageIndex index_;
  std::array<Channel, kChannels> channels_;
  Stats stats_;
};

}  // namespace cardbridge::shim
