// ImageStore: what the desk knows for its card images (docs/performance.md, "The card
// image"), shared by every server link of the desk (one process):
//
//  * per card type (ATR), the *plan*: what programs were seen to do on cards of that type —
//    the absolute SELECTs they sent (and the ones the card refuses whatever the state: a
//    class or instruction it does not know), in the order first seen, and the public files
//    they read (with their size and the chunk size they read them in). Learned from the
//    programs' own traffic, never from the image; holds no card data (commands, file
//    names and sizes only);
//  * per reader, the *image* of the card in it: the card's answers to the plan's SELECTs
//    and the content of its public files, for one insertion (the reader's event counter).
//    Held in memory only; never logged.
//
// Thread-safe (one mutex): each link's DeskCore runs under its own runtime's lock.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "cardbridge/card_image/apdu.hpp"
#include "cardbridge/protocol/link_session.hpp"
#include "cardbridge/protocol/messages.hpp"

namespace cardbridge::client {

using ImageKey = card_image::Key;

struct ImagePlan {
  std::vector<std::vector<uint8_t>> selects;  // in the order programs first sent them
  struct Read {
    ImageKey key;
    uint32_t size = 0;
  };
  std::vector<Read> reads;  // public files programs read, in order
  uint16_t chunk = 0;       // the largest READ BINARY Le programs used (0: none seen)
  uint64_t version = 0;     // +1 whenever something is added

  bool empty() const { return selects.empty(); }
  const Read* read(const ImageKey& key) const;
};

// Bounds: a plan and an image are held for as long as the desk runs.
inline constexpr std::size_t kMaxPlanSelects = 128;
inline constexpr std::size_t kMaxPlanReads = 48;
inline constexpr std::size_t kMaxPlanTypes = 16;
inline constexpr uint32_t kMaxImagedFile = 16 * 1024;

class ImageStore {
 public:
  // ---- learning (from programs' traffic) ----
  void learn_select(const std::vector<uint8_t>& atr, std::span<const uint8_t> command);
  void learn_read(const std::vector<uint8_t>& atr, const ImageKey& key, uint32_t size, uint32_t le);
  // A file the card would not let the desk read (6982...): not public after all.
  void forget_read(const std::vector<uint8_t>& atr, const ImageKey& key);
  ImagePlan plan(const std::vector<uint8_t>& atr) const;

  // ---- images ----
  struct Held {
    uint32_t event_count = 0;
    std::vector<uint8_t> atr;
    protocol::CardImage image;
    uint64_t plan_version = 0;  // the plan version the image was completed for
    bool complete = false;
    protocol::TimePoint checked{};  // when its update marker last matched the card
  };
  // The image of the card inserted as |event_count| in |reader| (nullopt: none).
  std::optional<Held> image(const std::string& reader, uint32_t event_count) const;
  // protocol::image_state of |reader|'s card (event counter |event_count|).
  uint32_t state(const std::string& reader, uint32_t event_count) const;
  // Replaces what is held for |reader| (the imaging's progress, or its end).
  void put(const std::string& reader, Held held);
  // The card in |reader| changed or may have: its image is void. True when one was held.
  bool void_image(const std::string& reader);
  // Called when a reader's card event counter moved: an image of another insertion goes.
  void card_event(const std::string& reader, uint32_t event_count);
  void mark_checked(const std::string& reader, protocol::TimePoint when);

  // ---- one imager per reader across links ----
  bool claim(const std::string& reader, const void* owner);
  void release(const std::string& reader, const void* owner);

  // ---- programs of every link (the imaging yields to all of them) ----
  // A program of some link asked for |reader|'s card: bumps its activity counter.
  void program_activity(const std::string& reader);
  uint64_t activity(const std::string& reader) const;
  // Whether link |owner| has programs holding or waiting for |reader|'s card.
  void set_busy(const std::string& reader, const void* owner, bool busy);
  bool busy_elsewhere(const std::string& reader, const void* owner) const;
  // Link |owner| is gone: none of its programs hold anything.
  void forget_owner(const void* owner);

  // A store for the whole process (the desk agent's links, the add-in's channels).
  static std::shared_ptr<ImageStore> process();

 private:
  mutable std::mutex mu_;
  std::map<std::vector<uint8_t>, ImagePlan> plans_;
  std::map<std::string, Held> images_;
  std::map<std::string, const void*> claims_;
  std::map<std::string, uint64_t> activity_;
  std::map<std::string, std::set<const void*>> busy_;
};

}  // namespace cardbridge::client
