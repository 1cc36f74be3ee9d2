// Protocol version and capability negotiation (pcsc-lite-style backward window).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "cardbridge/protocol/messages.hpp"

namespace cardbridge::protocol {

inline constexpr uint32_t kVersionMajor = 1;
// Minor 1: the capabilities desk-service (bit 5) and card-image (bit 6) exist. The minor is
// informational (logged at connection); what a link uses is still the capability intersection,
// so a 1.0 peer simply never gets either.
inline constexpr uint32_t kVersionMinor = 1;

// Capability bits. An optimisation is used only when both ends announce it.
namespace caps {
inline constexpr uint64_t kReaderPush = 1u << 0;           // desk pushes ReaderSnapshot
inline constexpr uint64_t kDeferredBegin = 1u << 1;        // Request flag kBeginFirst
inline constexpr uint64_t kPrefetchGetResponse = 1u << 2;  // Request flag kPrefetchGetResponse
inline constexpr uint64_t kReadAhead = 1u << 3;            // Request flag kReadAhead
// Request.after: the desk keeps the server's order across contexts, so the server need
// not wait for another context's pipelined request before sending a card operation.
inline constexpr uint64_t kDeskOrdering = 1u << 4;
// ReaderSnapshot.service_rv: the desk says when its own PC/SC service fails (no pcscd), so
// that the server can tell "no reader" from "no PC/SC service at the desk".
inline constexpr uint64_t kDeskService = 1u << 5;
// The card image: ReaderInfo.image, Request flag kWantImage and Reply.image on Connect,
// Request.prelude and Reply.prelude_answers on Transmit (docs/protocol.md).
inline constexpr uint64_t kCardImage = 1u << 6;
inline constexpr uint64_t kAll = kReaderPush | kDeferredBegin | kPrefetchGetResponse | kReadAhead | kDeskOrdering |
                                 kDeskService | kCardImage;
}  // namespace caps

struct Negotiated {
  uint32_t minor = 0;
  uint64_t capabilities = 0;
};

// Our side of the hello exchange: this build's protocol version, |role| and |capabilities|
// (the caller adds its names and instance).
Hello local_hello(Role role, uint64_t capabilities);

// Same major required; minor = min of both; capabilities = intersection.
std::optional<Negotiated> negotiate(const Hello& local, const Hello& remote);

std::string capabilities_text(uint64_t caps);

}  // namespace cardbridge::protocol
