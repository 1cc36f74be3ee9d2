#include "cardbridge/desk_core/image_store.hpp"

#include <algorithm>
#include <iterator>
#include <memory>

namespace cardbridge::client {

namespace ci = cardbridge::card_image;
namespace pr = cardbridge::protocol;

const ImagePlan::Read* ImagePlan::read(const ImageKey& key) const {
  auto it = std::find_if(reads.begin(), reads.end(), [&](const Read& r) { return r.key == key; });
  return it == reads.end() ? nullptr : &*it;
}

void ImageStore::learn_select(const std::vector<uint8_t>& atr, std::span<const uint8_t> command) {
  std::lock_guard lock(mu_);
  if (!plans_.contains(atr) && plans_.size() >= kMaxPlanTypes) return;
  auto& plan = plans_[atr];
  const std::vector<uint8_t> c(command.begin(), command.end());
  if (std::find(plan.selects.begin(), plan.selects.end(), c) != plan.selects.end()) return;
  if (plan.selects.size() >= kMaxPlanSelects) return;
  plan.selects.push_back(c);
  ++plan.version;
}

void ImageStore::learn_read(const std::vector<uint8_t>& atr, const ImageKey& key, uint32_t size, uint32_t le) {
  std::lock_guard lock(mu_);
  auto it = plans_.find(atr);
  if (it == plans_.end() || size == 0 || size > kMaxImagedFile) return;
  auto& plan = it->second;
  if (le > plan.chunk && le <= 256) plan.chunk = static_cast<uint16_t>(le);
  auto r = std::find_if(plan.reads.begin(), plan.reads.end(), [&](const auto& x) { return x.key == key; });
  if (r != plan.reads.end()) {
    r->size = size;  // sizes differ from card to card (certificates): the last one seen
    return;
  }
  if (plan.reads.size() >= kMaxPlanReads) return;
  plan.reads.push_back(ImagePlan::Read{key, size});
  ++plan.version;
}

void ImageStore::forget_read(const std::vector<uint8_t>& atr, const ImageKey& key) {
  std::lock_guard lock(mu_);
  auto it = plans_.find(atr);
  if (it == plans_.end()) return;
  auto& reads = it->second.reads;
  std::erase_if(reads, [&](const auto& r) { return r.key == key; });
}

ImagePlan ImageStore::plan(const std::vector<uint8_t>& atr) const {
  std::lock_guard lock(mu_);
  auto it = plans_.find(atr);
  return it == plans_.end() ? ImagePlan{} : it->second;
}

std::optional<ImageStore::Held> ImageStore::image(const std::string& reader, uint32_t event_count) const {
  std::lock_guard lock(mu_);
  auto it = images_.find(reader);
  if (it == images_.end() || it->second.event_count != event_count) return std::nullopt;
  return it->second;
}

uint32_t ImageStore::state(const std::string& reader, uint32_t event_count) const {
  std::lock_guard lock(mu_);
  auto it = images_.find(reader);
  if (it == images_.end() || it->second.event_count != event_count) return pr::image_state::kNone;
  const auto& h = it->second;
  if (h.image.selects.empty() && h.image.files.empty()) return pr::image_state::kNone;
  auto p = plans_.find(h.atr);
  const bool covers = h.complete && (p == plans_.end() || p->second.version <= h.plan_version);
  return covers ? pr::image_state::kComplete : pr::image_state::kPartial;
}

void ImageStore::put(const std::string& reader, Held held) {
  std::lock_guard lock(mu_);
  images_[reader] = std::move(held);
}

bool ImageStore::void_image(const std::string& reader) {
  std::lock_guard lock(mu_);
  return images_.erase(reader) > 0;
}

void ImageStore::card_event(const std::string& reader, uint32_t event_count) {
  std::lock_guard lock(mu_);
  auto it = images_.find(reader);
  if (it != images_.end() && it->second.event_count != event_count) images_.erase(it);
}

void ImageStore::mark_checked(const std::string& reader, pr::TimePoint when) {
  std::lock_guard lock(mu_);
  if (auto it = images_.find(reader); it != images_.end()) it->second.checked = when;
}

bool ImageStore::claim(const std::string& reader, const void* owner) {
  std::lock_guard lock(mu_);
  auto [it, fresh] = claims_.emplace(reader, owner);
  return fresh || it->second == owner;
}

void ImageStore::release(const std::string& reader, const void* owner) {
  std::lock_guard lock(mu_);
  if (auto it = claims_.find(reader); it != claims_.end() && it->second == owner) claims_.erase(it);
}

void ImageStore::program_activity(const std::string& reader) {
  std::lock_guard lock(mu_);
  ++activity_[reader];
}

uint64_t ImageStore::activity(const std::string& reader) const {
  std::lock_guard lock(mu_);
  auto it = activity_.find(reader);
  return it == activity_.end() ? 0 : it->second;
}

void ImageStore::set_busy(const std::string& reader, const void* owner, bool busy) {
  std::lock_guard lock(mu_);
  if (busy) {
    busy_[reader].insert(owner);
  } else if (auto it = busy_.find(reader); it != busy_.end()) {
    it->second.erase(owner);
    if (it->second.empty()) busy_.erase(it);
  }
}

bool ImageStore::busy_elsewhere(const std::string& reader, const void* owner) const {
  std::lock_guard lock(mu_);
  auto it = busy_.find(reader);
  if (it == busy_.end()) return false;
  return it->second.size() > (it->second.contains(owner) ? 1u : 0u);
}

void ImageStore::forget_owner(const void* owner) {
  std::lock_guard lock(mu_);
  for (auto it = busy_.begin(); it != busy_.end();) {
    it->second.erase(owner);
    it = it->second.empty() ? busy_.erase(it) : std::next(it);
  }
  std::erase_if(claims_, [&](const auto& c) { return c.second == owner; });
}

std::shared_ptr<ImageStore> ImageStore::process() {
  static const auto store = std::make_shared<ImageStore>();
  return store;
}

}  // namespace cardbridge::client
