// PcscCall: one call of the desk's PC/SC API, as the desk core asks its edge to make it,
// and CallResult, what came back. run_call() makes the call on a CardApi: the one piece of
// the desk's request handling that blocks, and the whole of what the edge's lane threads do.
#pragma once

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "cardbridge/desk_core/card_api.hpp"

namespace cardbridge::client {

using Bytes = std::vector<uint8_t>;

namespace call {
struct Establish {};
struct Release {
  ScardContext ctx = 0;
};
struct Connect {
  ScardContext ctx = 0;
  std::string reader;
  uint32_t share_mode = 0;
  uint32_t protocols = 0;
};
struct Reconnect {
  ScardHandle card = 0;
  uint32_t share_mode = 0;
  uint32_t protocols = 0;
  uint32_t initialization = 0;
};
struct Disconnect {
  ScardHandle card = 0;
  uint32_t disposition = 0;
};
struct Begin {
  ScardHandle card = 0;
};
struct End {
  ScardHandle card = 0;
  uint32_t disposition = 0;
};
struct Transmit {
  ScardHandle card = 0;
  uint32_t send_protocol = 0;
  Bytes command;
  uint32_t recv_protocol = 0;
  uint32_t recv_capacity = 0;
};
struct Control {
  ScardHandle card = 0;
  uint32_t code = 0;
  Bytes data;
  uint32_t recv_capacity = 0;
};
struct GetAttrib {
  ScardHandle card = 0;
  uint32_t attr = 0;
  uint32_t capacity = 0;
};
struct SetAttrib {
  ScardHandle card = 0;
  uint32_t attr = 0;
  Bytes value;
};
struct Status {
  ScardHandle card = 0;
};
}  // namespace call

using PcscCall = std::variant<call::Establish, call::Release, call::Connect, call::Reconnect, call::Disconnect,
                              call::Begin, call::End, call::Transmit, call::Control, call::GetAttrib,
                              call::SetAttrib, call::Status>;

struct CallResult {
  uint32_t rv = 0;
  ScardContext ctx = 0;    // Establish
  ScardHandle card = 0;    // Connect
  uint32_t protocol = 0;   // Connect, Reconnect: active; Transmit: receive PCI; Status: protocol
  Bytes data;              // Transmit, Control, GetAttrib: when rv == 0
  uint32_t length = 0;     // Transmit, Control, GetAttrib: returned or needed length
  std::string reader;      // Status
  uint32_t state = 0;      // Status: event counter << 16 | reader state
  Bytes atr;               // Status
};

const char* call_name(const PcscCall& c);

// Makes |c| on |api|. Never throws: an exception from the API becomes
// SCARD_F_INTERNAL_ERROR (and is logged).
CallResult run_call(CardApi& api, const PcscCall& c) noexcept;

}  // namespace cardbridge::client
