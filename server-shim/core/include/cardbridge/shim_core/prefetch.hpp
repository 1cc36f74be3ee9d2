// PrefetchQueue: the desk's speculative answers for one handle (docs/performance.md), and
// the rule for serving them. After a command, the desk may have sent the card the commands
// the program is predicted to send next (GET RESPONSE after 61xx, the next READ BINARY
// chunks) and shipped their answers with the reply. An answer is served only to exactly
// the predicted command, in order, with the same send protocol, while nothing can have
// changed the card in between (the caller checks that); anything else voids the queue.
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <vector>

#include "cardbridge/protocol/messages.hpp"

namespace cardbridge::shim {

class PrefetchQueue {
 public:
  struct Answer {
    std::vector<uint8_t> response;  // data + SW
    uint32_t recv_protocol = 0;     // the receive PCI the desk's driver reported
  };

  void assign(const std::vector<protocol::Prefetched>& answers, uint32_t send_protocol, uint32_t recv_protocol);
  // The answer to |apdu| sent with |send_protocol|, if it is the next predicted command.
  // A GET RESPONSE asking for another length than the desk fetched is served as the card
  // would answer it (ISO 7816-4 5.1.3: Le below the available length gives the first Le
  // bytes and 61xx for the rest).
  std::optional<Answer> take(std::span<const uint8_t> apdu, uint32_t send_protocol);
  void clear() { queue_.clear(); }
  bool empty() const { return queue_.empty(); }
  std::size_t size() const { return queue_.size(); }

 private:
  void adapt_get_response(std::span<const uint8_t> apdu);

  std::deque<protocol::Prefetched> queue_;
  uint32_t send_protocol_ = 0;
  uint32_t recv_protocol_ = 0;
};

}  // namespace cardbridge::shim
