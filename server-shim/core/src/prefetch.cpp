#include "cardbridge/shim_core/prefetch.hpp"

#include <algorithm>

namespace cardbridge::shim {

namespace pr = cardbridge::protocol;

void PrefetchQueue::assign(const std::vector<pr::Prefetched>& answers, uint32_t send_protocol, uint32_t recv_protocol) {
  queue_.assign(answers.begin(), answers.end());
  send_protocol_ = send_protocol;
  recv_protocol_ = recv_protocol;
}

std::optional<PrefetchQueue::Answer> PrefetchQueue::take(std::span<const uint8_t> apdu, uint32_t send_protocol) {
  if (queue_.empty() || send_protocol != send_protocol_) return std::nullopt;
  adapt_get_response(apdu);
  auto& next = queue_.front();
  if (!std::equal(next.command.begin(), next.command.end(), apdu.begin(), apdu.end())) return std::nullopt;
  Answer a{std::move(next.response), recv_protocol_};
  queue_.pop_front();
  return a;
}

// The desk fetched GET RESPONSE with Le = SW2 (what ISO 7816 and OpenSC-based middleware
// send). A program asking with another Le gets what the card would have answered: Le below
// what is available, the first Le bytes and 61xx for the rest; Le 00 or at least what is
// available, everything with 9000. The front entry is rewritten accordingly.
void PrefetchQueue::adapt_get_response(std::span<const uint8_t> apdu) {
  auto& next = queue_.front();
  const auto& cmd = next.command;
  if (apdu.size() != 5 || cmd.size() != 5 || std::equal(apdu.begin(), apdu.end(), cmd.begin())) return;
  if (apdu[0] != cmd[0] || apdu[1] != 0xC0 || cmd[1] != 0xC0 || apdu[2] != 0 || apdu[3] != 0) return;
  const auto& resp = next.response;
  if (resp.size() < 2 || resp[resp.size() - 2] != 0x90 || resp.back() != 0x00) return;
  const std::size_t n = resp.size() - 2;
  const std::size_t le = apdu[4] == 0 ? 256 : apdu[4];
  if (le >= n) {
    next.command.assign(apdu.begin(), apdu.end());  // the whole answer, 9000
    return;
  }
  pr::Prefetched first;
  first.command.assign(apdu.begin(), apdu.end());
  first.response.assign(resp.begin(), resp.begin() + static_cast<std::ptrdiff_t>(le));
  const std::size_t rest = n - le;
  first.response.push_back(0x61);
  first.response.push_back(static_cast<uint8_t>(rest >= 256 ? 0 : rest));
  pr::Prefetched second;
  second.command = {cmd[0], 0xC0, 0x00, 0x00, static_cast<uint8_t>(rest >= 256 ? 0 : rest)};
  second.response.assign(resp.begin() + static_cast<std::ptrdiff_t>(le), resp.end());
  queue_.pop_front();
  queue_.push_front(std::move(second));
  queue_.push_front(std::move(first));
}

}  // namespace cardbridge::shim
