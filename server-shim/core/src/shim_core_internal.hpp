// ShimCore's private types, shared by its translation units (shim_core.cpp, card_calls.cpp).
#pragma once

#include <optional>
#include <set>

#include "cardbridge/support/scard.hpp"
#include "cardbridge/shim_core/shim_core.hpp"

namespace cardbridge::shim {

namespace internal {
// Error a handle gets once its reader is gone (desk lost, reader unplugged, roaming):
// pcscd no longer finds the handle in any reader (RFReaderInfoById -> INVALID_VALUE).
inline constexpr uint32_t kOrphanRv = scard::kEInvalidValue;
// A call in flight when the desk disappears fails like an I/O on an unplugged reader.
inline constexpr uint32_t kLostInFlightRv = scard::kEReaderUnavailable;
// pcscd 1.9.9 limits (pcscd.h): card handles per context.
inline constexpr std::size_t kMaxHandlesPerContext = 200;
}  // namespace internal

// One pcsc-lite client connection (one program context).
struct ShimCore::Client {
  ClientId id = 0;
  wire::RequestDecoder decoder;
  int32_t minor = wire::kMinorLowest;
  uint32_t context = 0;              // hContext (0: none)
  protocol::ContextId desk_ctx;      // the desk's context for it (0: not created yet)
  uint64_t desk_ctx_generation = 0;  // desk session the context belongs to
  std::set<uint32_t> handles;
  bool registered = false;           // waiting for reader events
  bool hold_signal = false;          // protocol 4.6: WAIT answered, ARRAY not yet
  std::optional<uint32_t> held_signal;
  // A call in progress: the desk request id, or 0 while it is held here (parked behind
  // another handle's transaction, or fenced behind another client's pipelined request).
  // No further request of the client is read meanwhile.
  std::optional<uint32_t> waiting;
  PendingCall call;
  bool charged = false;  // per-call mode: the next request's round trip is paid
};

// A card operation held until other clients' pipelined requests on its reader are done.
struct ShimCore::Fenced {
  ClientId client = 0;
  protocol::Request request;
  PendingCall call;
  std::size_t slot = 0;
};

// Answers a call that ends here: the request struct back with |rv|.
template <typename S>
void ShimCore::answer(Client& c, S s, uint32_t rv) {
  s.rv = rv;
  send(c, wire::bytes_of(s));
}

}  // namespace cardbridge::shim
