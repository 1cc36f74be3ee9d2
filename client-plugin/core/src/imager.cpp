#include "cardbridge/desk_core/imager.hpp"

#include <algorithm>

#include "cardbridge/support/scard.hpp"

namespace cardbridge::client {

namespace sc = cardbridge::scard;
namespace ci = cardbridge::card_image;
namespace pr = cardbridge::protocol;

namespace {

constexpr uint32_t kAnswerCapacity = 258;  // 256 data bytes and the status word

uint8_t class_for_channel(uint8_t ch) {
  return ch < 4 ? ch : static_cast<uint8_t>(0x40 | (ch - 4));
}

// GET RESPONSE after |select| was answered 61 |sw2| (as programs send it).
Bytes get_response(const Bytes& select, uint8_t sw2) {
  const uint8_t ch = ci::channel_of(select.empty() ? 0 : select[0]).value_or(0);
  return Bytes{class_for_channel(ch), ci::kInsGetResponse, 0x00, 0x00, sw2};
}

// A refusal that does not depend on the card's current file: the class or the instruction
// is not supported at all.
bool refusal_is_stateless(const Bytes& response) {
  const uint16_t sw = ci::status_word(response);
  return response.size() == 2 && (sw == 0x6E00 || sw == 0x6D00);
}

}  // namespace

Imager::Imager(std::string reader, uint32_t event_count, Bytes atr, ImagePlan plan,
               std::optional<pr::CardImage> start, ImagerSettings settings)
    : reader_(std::move(reader)), event_count_(event_count), atr_(std::move(atr)), plan_(std::move(plan)),
      settings_(settings) {
  if (start) image_ = std::move(*start);
  image_.event_count = event_count_;
  image_.complete = false;
  index_ = ci::ImageIndex(image_);
  plan_items();
}

void Imager::plan_items() {
  for (const auto& cmd : plan_.selects) {
    if (!index_.select(cmd)) items_.push_back(Item{Item::Kind::kSelect, cmd, {}});
  }
  for (const auto& r : plan_.reads) {
    if (!index_.file(r.key)) items_.push_back(Item{Item::Kind::kRead, {}, r.key});
  }
  // Something will be read: the update marker is read again at the end.
  if (!items_.empty()) items_.push_back(Item{Item::Kind::kMarker, {}, {}});
}

std::optional<ImageKey> Imager::update_marker(const Bytes& atr, const pr::CardImage& image) {
  // CPx cards (CPS3, CPS4: historical bytes 12 25 00 64 80, docs/cps-cards.md) keep the
  // date of their last update in EF_ACTUA, 3F00/D010: the Cryptolib checks its disk cache
  // against it, the image does the same.
  static const Bytes kCpx = {0x12, 0x25, 0x00, 0x64, 0x80};
  if (std::search(atr.begin(), atr.end(), kCpx.begin(), kCpx.end()) == atr.end()) return std::nullopt;
  for (const auto& f : image.files) {
    const ImageKey key(f.key.begin(), f.key.end());
    if (key.size() == 6 && key[1] == 'P' && key.substr(2) == std::string("\x3F\x00\xD0\x10", 4)) return key;
  }
  return std::nullopt;
}

PcscCall Imager::transmit(Bytes command) const {
  return call::Transmit{*card_, protocol_, std::move(command), protocol_, kAnswerCapacity};
}

Imager::Action Imager::next(pr::TimePoint now) {
  for (;;) {
    switch (phase_) {
      case Phase::kEstablish:
        return call::Establish{};
      case Phase::kConnect:
        return call::Connect{*ctx_, reader_, sc::kShareShared, sc::kProtocolT0 | sc::kProtocolT1};
      case Phase::kStatus:
        return call::Status{*card_};
      case Phase::kBetween:
        if (yield_) {
          stop(Outcome::kYielded);
          continue;
        }
        if (!items_.empty() && items_.front().kind == Item::Kind::kMarker && !update_marker(atr_, image_)) {
          items_.pop_front();  // no marker on this card (or not read): nothing to check
          continue;
        }
        if (items_.empty()) {
          image_.complete = true;
          stop(Outcome::kComplete);
          continue;
        }
        if (now < not_before_) return Wait{not_before_};
        start_transaction();
        phase_ = Phase::kBegin;
        return call::Begin{*card_};
      case Phase::kBegin:
        return call::Begin{*card_};
      case Phase::kWork:
        if (auto apdu = next_apdu()) {
          last_command_ = *apdu;
          return transmit(std::move(*apdu));
        }
        phase_ = Phase::kEnd;
        continue;
      case Phase::kEnd:
        return call::End{*card_, sc::kLeaveCard};
      case Phase::kDisconnect:
        if (!card_) {
          phase_ = Phase::kRelease;
          continue;
        }
        return call::Disconnect{*card_, sc::kLeaveCard};
      case Phase::kRelease:
        if (!ctx_) {
          phase_ = Phase::kDone;
          continue;
        }
        return call::Release{*ctx_};
      case Phase::kDone:
        return Finished{};
    }
  }
}

void Imager::stop(Outcome o) {
  if (outcome_ == Outcome::kRunning) outcome_ = o;
  if (phase_ == Phase::kWork || phase_ == Phase::kEnd) {
    phase_ = Phase::kEnd;  // End comes first; then Disconnect
  } else if (card_) {
    phase_ = Phase::kDisconnect;
  } else if (ctx_) {
    phase_ = Phase::kRelease;
  } else {
    phase_ = Phase::kDone;
  }
}

void Imager::yield() { yield_ = true; }

void Imager::start_transaction() {
  txn_.clear();
  txn_item_ = 0;
  txn_failed_ = false;
  if (items_.front().kind == Item::Kind::kSelect) {
    while (!items_.empty() && items_.front().kind == Item::Kind::kSelect &&
           txn_.size() < settings_.selects_per_transaction) {
      txn_.push_back(std::move(items_.front()));
      items_.pop_front();
    }
  } else {
    txn_.push_back(std::move(items_.front()));
    items_.pop_front();
  }
  sub_ = txn_.front().kind == Item::Kind::kSelect ? Sub::kSelect : Sub::kReselect;
}

std::optional<Bytes> Imager::next_apdu() {
  while (!yield_ && txn_item_ < txn_.size()) {
    const Item& item = txn_[txn_item_];
    switch (sub_) {
      case Sub::kSelect:
        return item.command;
      case Sub::kGetResponse:
        return get_response(item.command, static_cast<uint8_t>(ci::status_word(select_answer_) & 0xFF));
      case Sub::kReselect: {
        ImageKey key = item.key;
        if (item.kind == Item::Kind::kMarker) key = update_marker(atr_, image_).value_or(ImageKey{});
        const auto* way = index_.way_to(key);
        const auto info = index_.info(key);
        const bool readable = info && info->transparent_ef && info->size && *info->size > 0 &&
                              *info->size <= kMaxImagedFile && info->read != ci::ReadAccess::kRestricted;
        if (!way || !readable) {  // no way back to it, or not a file the image may hold
          ++txn_item_;
          if (txn_item_ < txn_.size()) sub_ = txn_[txn_item_].kind == Item::Kind::kSelect ? Sub::kSelect : Sub::kReselect;
          continue;
        }
        file_.clear();
        file_size_ = *info->size;
        return way->command;
      }
      case Sub::kRead: {
        ImageKey key = item.kind == Item::Kind::kMarker ? update_marker(atr_, image_).value_or(ImageKey{}) : item.key;
        const uint32_t chunk = plan_.chunk != 0 ? plan_.chunk : settings_.default_chunk;
        const auto offset = static_cast<uint32_t>(file_.size());
        const uint32_t n = std::min(chunk, file_size_ - offset);
        return Bytes{class_for_channel(ci::key_channel(key)), ci::kInsReadBinary, static_cast<uint8_t>(offset >> 8),
                     static_cast<uint8_t>(offset & 0xFF), static_cast<uint8_t>(n == 256 ? 0 : n)};
      }
    }
  }
  return std::nullopt;
}

void Imager::record_select(const Bytes& command, const Bytes& response, const Bytes& fetched) {
  switch (ci::select_outcome(response)) {
    case ci::SelectOutcome::kSelected:
      if (!ci::select_key(command)) return;  // a target the image cannot name
      if (ci::more_data(response) && (fetched.size() < 2 || ci::status_word(fetched) != 0x9000)) return;
      break;
    case ci::SelectOutcome::kRefused:
      if (!ci::select_key(command) && !refusal_is_stateless(response)) return;
      break;
    case ci::SelectOutcome::kUnclear:
      return;
  }
  image_.selects.push_back(pr::ImageSelect{command, response, ci::more_data(response) ? fetched : Bytes{}});
  index_ = ci::ImageIndex(image_);
}

void Imager::apdu_done(const CallResult& r) {
  ++apdus_;
  if (r.rv != sc::kSuccess) {
    txn_failed_ = true;
    stop(r.rv == sc::kWRemovedCard || r.rv == sc::kENoSmartcard ? Outcome::kCardChanged : Outcome::kFailed);
    return;
  }
  if (image_.recv_protocol == 0) image_.recv_protocol = r.protocol;
  const Bytes& resp = r.data;
  Item& item = txn_[txn_item_];
  auto next_item = [&] {
    ++txn_item_;
    if (txn_item_ < txn_.size()) sub_ = txn_[txn_item_].kind == Item::Kind::kSelect ? Sub::kSelect : Sub::kReselect;
  };
  switch (sub_) {
    case Sub::kSelect:
      if (ci::more_data(resp) && ci::select_outcome(resp) == ci::SelectOutcome::kSelected) {
        select_answer_ = resp;
        sub_ = Sub::kGetResponse;
        return;
      }
      record_select(item.command, resp, {});
      return next_item();
    case Sub::kGetResponse:
      record_select(item.command, select_answer_, resp);
      return next_item();
    case Sub::kReselect: {
      const auto* recorded = index_.select(last_command_);
      if (!recorded || recorded->response != resp) {
        // The SELECT the image recorded is not answered the same way: not the same card.
        txn_failed_ = true;
        stop(Outcome::kCardChanged);
        return;
      }
      sub_ = Sub::kRead;
      return;
    }
    case Sub::kRead: {
      const uint32_t asked = last_command_[4] == 0 ? 256u : last_command_[4];
      if (resp.size() != asked + 2 || ci::status_word(resp) != 0x9000) {
        const uint16_t sw = ci::status_word(resp);
        if (sw == 0x6982 || sw == 0x6985 || sw == 0x6986) {
          // Not readable without a condition after all: never try it again.
          if (item.kind == Item::Kind::kRead) restricted_.push_back(item.key);
        }
        return next_item();
      }
      file_.insert(file_.end(), resp.begin(), resp.end() - 2);
      if (file_.size() < file_size_) return;
      if (item.kind == Item::Kind::kRead) {
        image_.files.push_back(pr::ImageFile{Bytes(item.key.begin(), item.key.end()), file_});
        index_ = ci::ImageIndex(image_);
      } else {
        const auto key = update_marker(atr_, image_);
        const Bytes* held = key ? index_.file(*key) : nullptr;
        if (!held || *held != file_) {
          // The card was updated while it was being read.
          txn_failed_ = true;
          stop(Outcome::kCardChanged);
          return;
        }
      }
      return next_item();
    }
  }
}

void Imager::result(const CallResult& r, pr::TimePoint now) {
  switch (phase_) {
    case Phase::kEstablish:
      if (r.rv != sc::kSuccess) {
        outcome_ = Outcome::kFailed;
        phase_ = Phase::kDone;
        return;
      }
      ctx_ = r.ctx;
      phase_ = Phase::kConnect;
      if (yield_) stop(Outcome::kYielded);
      return;
    case Phase::kConnect:
      if (r.rv != sc::kSuccess) {
        const bool busy = r.rv == sc::kESharingViolation;
        const bool gone = r.rv == sc::kENoSmartcard || r.rv == sc::kWRemovedCard || r.rv == sc::kEUnknownReader;
        stop(busy ? Outcome::kBusy : gone ? Outcome::kCardChanged : Outcome::kFailed);
        return;
      }
      card_ = r.card;
      protocol_ = r.protocol;
      phase_ = Phase::kStatus;
      if (yield_) stop(Outcome::kYielded);
      return;
    case Phase::kStatus:
      if (r.rv != sc::kSuccess || ((r.state >> 16) & 0xFFFF) != event_count_ || r.atr != atr_) {
        stop(r.rv == sc::kSuccess || r.rv == sc::kWRemovedCard ? Outcome::kCardChanged : Outcome::kFailed);
        return;
      }
      if (image_.send_protocol != 0 && image_.send_protocol != protocol_) {
        image_ = pr::CardImage{};  // answers of another protocol: start over
        image_.event_count = event_count_;
        index_ = ci::ImageIndex(image_);
        items_.clear();
        plan_items();
      }
      image_.send_protocol = protocol_;
      phase_ = Phase::kBetween;
      return;
    case Phase::kBegin:
      if (r.rv != sc::kSuccess) {
        // Put the transaction's items back: a later pass does them.
        for (auto it = txn_.rbegin(); it != txn_.rend(); ++it) items_.push_front(std::move(*it));
        txn_.clear();
        stop(r.rv == sc::kESharingViolation ? Outcome::kBusy
             : r.rv == sc::kWRemovedCard    ? Outcome::kCardChanged
                                            : Outcome::kFailed);
        return;
      }
      phase_ = Phase::kWork;
      return;
    case Phase::kWork:
      apdu_done(r);
      return;
    case Phase::kEnd:
      not_before_ = now + settings_.gap;
      if (outcome_ != Outcome::kRunning) {
        phase_ = card_ ? Phase::kDisconnect : ctx_ ? Phase::kRelease : Phase::kDone;
      } else {
        phase_ = Phase::kBetween;  // the next transaction, or the end of the pass (yield)
      }
      return;
    case Phase::kDisconnect:
      card_.reset();
      phase_ = ctx_ ? Phase::kRelease : Phase::kDone;
      return;
    case Phase::kRelease:
      ctx_.reset();
      phase_ = Phase::kDone;
      return;
    case Phase::kBetween:
    case Phase::kDone:
      return;
  }
}

}  // namespace cardbridge::client
