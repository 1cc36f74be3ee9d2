// What pcscd answers a card operation, given the outcome of the real PC/SC call (here: at
// the desk). One builder per command whose answer is more than the request struct with its
// rv filled in; each follows pcscd 1.9.9's winscard_svc.c byte for byte.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "cardbridge/pcscd_wire/wire.hpp"

namespace cardbridge::shim::wire {

// The outcome of a call that returns bytes (Transmit, Control, GetAttrib).
struct CallOutcome {
  uint32_t rv = 0;
  std::span<const uint8_t> data;  // when rv == 0
  uint32_t length = 0;            // the needed length when rv is SCARD_E_INSUFFICIENT_BUFFER
  uint32_t recv_protocol = 0;     // Transmit: the receive PCI the driver set (also on errors)
};

// TRANSMIT: the struct, then the response only when rv == 0. More data than the program's
// buffer is SCARD_E_INSUFFICIENT_BUFFER with the needed length (and no data: its stream
// would fall out of step).
std::vector<uint8_t> transmit_reply(const TransmitStruct& request, const CallOutcome& out);
// CONTROL: likewise, with bytes_returned.
std::vector<uint8_t> control_reply(const ControlStruct& request, const CallOutcome& out);
// GET_ATTRIB: the value inside the fixed 264-byte field; a longer value is
// SCARD_E_INSUFFICIENT_BUFFER with its length.
GetSetStruct get_attrib_reply(const GetSetStruct& request, const CallOutcome& out);

// The request struct with |rv| filled in (the reply of every other command).
template <typename S>
S with_rv(S s, uint32_t rv) {
  s.rv = rv;
  return s;
}

}  // namespace cardbridge::shim::wire
