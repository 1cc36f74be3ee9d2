#include "cardbridge/card_image/image.hpp"

namespace cardbridge::card_image {

namespace pr = cardbridge::protocol;

ImageIndex::ImageIndex(pr::CardImage image) : image_(std::move(image)) {
  for (std::size_t i = 0; i < image_.selects.size(); ++i) {
    const auto& s = image_.selects[i];
    selects_.emplace(s.command, i);
    auto key = select_key(s.command);
    if (!key || select_outcome(s.response) != SelectOutcome::kSelected) continue;
    const bool quiet = s.response.size() == 2 && status_word(s.response) == 0x9000;
    auto w = way_.find(*key);
    if (w == way_.end()) {
      way_.emplace(*key, i);
    } else if (quiet) {
      const auto& current = image_.selects[w->second];
      if (!(current.response.size() == 2 && status_word(current.response) == 0x9000)) w->second = i;
    }
    if (!info_.contains(*key)) {
      if (auto fi = parse_fcp(fcp_data(s))) info_.emplace(*key, *fi);
    }
  }
  for (std::size_t i = 0; i < image_.files.size(); ++i) {
    const auto& f = image_.files[i];
    files_.emplace(Key(f.key.begin(), f.key.end()), i);
  }
}

std::span<const uint8_t> ImageIndex::fcp_data(const pr::ImageSelect& s) {
  const auto& r = more_data(s.response) ? s.fetched : s.response;
  if (r.size() <= 2 || status_word(r) != 0x9000) return {};
  return std::span<const uint8_t>(r.data(), r.size() - 2);
}

const pr::ImageSelect* ImageIndex::select(std::span<const uint8_t> command) const {
  auto it = selects_.find(Bytes(command.begin(), command.end()));
  return it == selects_.end() ? nullptr : &image_.selects[it->second];
}

const Bytes* ImageIndex::file(const Key& key) const {
  auto it = files_.find(key);
  return it == files_.end() ? nullptr : &image_.files[it->second].content;
}

const pr::ImageSelect* ImageIndex::way_to(const Key& key) const {
  auto it = way_.find(key);
  return it == way_.end() ? nullptr : &image_.selects[it->second];
}

std::optional<FileInfo> ImageIndex::info(const Key& key) const {
  auto it = info_.find(key);
  if (it == info_.end()) return std::nullopt;
  return it->second;
}

}  // namespace cardbridge::card_image
