// ImageIndex: lookups over a card image (protocol::CardImage): the recorded answer to a
// SELECT, the content of a file, the FCP known for a file, a quiet way back to a file.
#pragma once

#include <map>
#include <optional>
#include <span>

#include "cardbridge/card_image/apdu.hpp"
#include "cardbridge/protocol/messages.hpp"

namespace cardbridge::card_image {

class ImageIndex {
 public:
  ImageIndex() = default;
  explicit ImageIndex(protocol::CardImage image);

  const protocol::CardImage& image() const { return image_; }
  bool empty() const { return image_.selects.empty() && image_.files.empty(); }
  // The recorded answer to exactly |command|.
  const protocol::ImageSelect* select(std::span<const uint8_t> command) const;
  // The whole content of |key|, when the image holds it.
  const Bytes* file(const Key& key) const;
  // A recorded SELECT of |key| answered 9000 without data (P2 0C): the cheapest way to make
  // the card's current file |key| again; else any recorded SELECT of |key| that selected it.
  const protocol::ImageSelect* way_to(const Key& key) const;
  // What the recorded answers say about |key| (its FCP), if any of them carries one.
  std::optional<FileInfo> info(const Key& key) const;

  // The FCP/FCI data in a recorded SELECT answer (its response, or what GET RESPONSE
  // fetched after 61xx); empty if none.
  static std::span<const uint8_t> fcp_data(const protocol::ImageSelect& s);

 private:
  protocol::CardImage image_;
  std::map<Bytes, std::size_t> selects_;
  std::map<Key, std::size_t> files_;
  std::map<Key, std::size_t> way_;   // key -> select index
  std::map<Key, FileInfo> info_;
};

}  // namespace cardbridge::card_image
