#include "cardbridge/shim_core/virtual_card.hpp"

#include <algorithm>

namespace cardbridge::shim {

namespace ci = cardbridge::card_image;

namespace {

// GET RESPONSE from data waiting after a 61xx, as a T=0 card answers it (ISO 7816-4 5.1.3):
// Le at most what is left gives Le bytes, then 61xx for the rest or 9000. nullopt when Le
// asks for more than is left (the card's own answer, 6Cxx or other, is not in the image).
std::optional<VirtualCard::Bytes> serve_get_response(const VirtualCard::Bytes& pending, uint32_t le,
                                                     VirtualCard::Bytes* rest) {
  if (le > pending.size()) return std::nullopt;
  VirtualCard::Bytes out(pending.begin(), pending.begin() + static_cast<std::ptrdiff_t>(le));
  const std::size_t left = pending.size() - le;
  if (left == 0) {
    out.push_back(0x90);
    out.push_back(0x00);
  } else {
    out.push_back(0x61);
    out.push_back(static_cast<uint8_t>(left >= 256 ? 0 : left));
  }
  if (rest) rest->assign(pending.begin() + static_cast<std::ptrdiff_t>(le), pending.end());
  return out;
}

VirtualCard::Bytes data_of(const VirtualCard::Bytes& response) {
  return VirtualCard::Bytes(response.begin(), response.end() - 2);
}

}  // namespace

VirtualCard::VirtualCard(protocol::CardImage image) : index_(std::move(image)) {}

void VirtualCard::clear_pending() {
  for (auto& ch : channels_) {
    ch.pending.reset();
    ch.served.clear();
  }
}

void VirtualCard::card_reset() {
  for (auto& ch : channels_) ch = Channel{};
}

VirtualCard::Forward VirtualCard::prelude_for(const Channel& ch, bool to_pending) const {
  Forward f;
  if (!ch.view) return f;  // the program sees the card's own state
  if (to_pending) {
    // The card must hold the same GET RESPONSE data: the program's own SELECT again, and
    // the GET RESPONSEs answered here since.
    f.prelude.push_back(ch.view_select);
    f.prelude.insert(f.prelude.end(), ch.served.begin(), ch.served.end());
    return f;
  }
  if (ch.card == ch.view) return f;
  if (const auto* way = index_.way_to(*ch.view)) f.prelude.push_back(way->command);
  return f;
}

VirtualCard::Decision VirtualCard::transmit(std::span<const uint8_t> apdu, uint32_t send_protocol) {
  const auto channel = ci::channel_of(apdu.empty() ? 0 : apdu[0]);
  Channel& ch = channels_[channel.value_or(0)];
  auto forward = [&](bool to_pending = false) -> Decision {
    Forward f = prelude_for(ch, to_pending);
    if (!f.prelude.empty()) ++stats_.preludes;
    return f;
  };
  if (apdu.size() < 4 || send_protocol != index_.image().send_protocol) return forward();

  if (ci::is_get_response(apdu) && channel) {
    if (!ch.pending) return forward();  // the card's own 61xx, or none: the card answers
    Bytes rest;
    auto answer = serve_get_response(*ch.pending, *ci::short_le(apdu), &rest);
    if (!answer) return forward(/*to_pending=*/true);
    ch.served.emplace_back(apdu.begin(), apdu.end());
    if (rest.empty()) {
      ch.pending.reset();
      ch.served.clear();
    } else {
      ch.pending = std::move(rest);
    }
    ++stats_.local;
    return Local{std::move(*answer)};
  }

  if (ci::is_select(apdu)) {
    const auto* entry = index_.select(apdu);
    if (!entry) {
      // Not in the image. An absolute SELECT does not depend on the current file; a
      // relative one does: the card must first have the program's.
      return ci::select_key(apdu) ? Decision{Forward{}} : forward();
    }
    switch (ci::select_outcome(entry->response)) {
      case ci::SelectOutcome::kRefused:
        clear_pending();  // the command was answered: nothing waits for GET RESPONSE now
        ++stats_.local;
        return Local{entry->response};
      case ci::SelectOutcome::kSelected: {
        auto key = ci::select_key(apdu);
        if (!key || !channel) return forward();
        if (ci::more_data(entry->response) &&
            (entry->fetched.size() < 2 || ci::status_word(entry->fetched) != 0x9000))
          return forward();  // the FCP that follows is not in the image
        clear_pending();
        ch.view = *key;
        ch.view_select.assign(apdu.begin(), apdu.end());
        if (ci::more_data(entry->response)) ch.pending = data_of(entry->fetched);
        ++stats_.local;
        return Local{entry->response};
      }
      case ci::SelectOutcome::kUnclear:
        return forward();
    }
  }

  if (auto rb = ci::read_binary(apdu); rb && ch.view) {
    if (const Bytes* content = index_.file(*ch.view); content && rb->offset + rb->le <= content->size()) {
      clear_pending();
      Bytes out(content->begin() + rb->offset, content->begin() + rb->offset + rb->le);
      out.push_back(0x90);
      out.push_back(0x00);
      ++stats_.local;
      return Local{std::move(out)};
    }
  }
  return forward();
}

std::optional<std::vector<VirtualCard::Bytes>> VirtualCard::expected_answers(const std::vector<Bytes>& prelude) const {
  std::vector<Bytes> out;
  std::optional<Bytes> pending;
  for (const auto& cmd : prelude) {
    if (ci::is_get_response(cmd)) {
      if (!pending) return std::nullopt;
      Bytes rest;
      auto answer = serve_get_response(*pending, *ci::short_le(cmd), &rest);
      if (!answer) return std::nullopt;
      out.push_back(std::move(*answer));
      pending = std::move(rest);
      continue;
    }
    const auto* entry = index_.select(cmd);
    if (!entry) return std::nullopt;
    out.push_back(entry->response);
    pending.reset();
    if (ci::more_data(entry->response) && entry->fetched.size() >= 2) pending = data_of(entry->fetched);
  }
  return out;
}

bool VirtualCard::forwarded(std::span<const uint8_t> apdu, const std::vector<Bytes>& prelude,
                            const std::vector<Bytes>& prelude_answers, std::span<const uint8_t> response) {
  const auto channel = ci::channel_of(apdu.empty() ? 0 : apdu[0]);
  Channel& ch = channels_[channel.value_or(0)];
  if (!prelude.empty()) {
    auto expected = expected_answers(prelude);
    if (!expected || *expected != prelude_answers) return false;
    ch.card = ch.view;
  }
  clear_pending();
  if (ci::loses_track(apdu, response)) {
    if (apdu.size() >= 2 && apdu[1] == ci::kInsManageChannel) {
      card_reset();
    } else {
      ch = Channel{};  // a relative SELECT: the program sees the card's own current file
    }
    return true;
  }
  if (ci::is_select(apdu) && ci::select_outcome(response) == ci::SelectOutcome::kSelected) {
    if (auto key = ci::select_key(apdu); key && channel) {
      ch.view = *key;
      ch.card = *key;
      ch.view_select.assign(apdu.begin(), apdu.end());
    }
  }
  return true;
}

}  // namespace cardbridge::shim
