#include "cardbridge/pcscd_wire/replies.hpp"

#include <algorithm>
#include <cstring>

namespace cardbridge::shim::wire {

namespace sc = cardbridge::scard;

std::vector<uint8_t> transmit_reply(const TransmitStruct& request, const CallOutcome& out) {
  TransmitStruct r = request;
  r.rv = out.rv;
  if (out.rv == sc::kSuccess) {
    r.recv_length = static_cast<uint32_t>(out.data.size());
    if (out.data.size() > request.recv_length) {
      r.rv = sc::kEInsufficientBuffer;
    } else {
      r.recv_pci_protocol = out.recv_protocol;
    }
  } else {
    r.recv_length = out.length;
    r.recv_pci_protocol = out.recv_protocol;  // pcscd returns the driver's receive PCI on errors too
  }
  return r.rv == sc::kSuccess ? bytes_of(r, out.data) : bytes_of(r);
}

std::vector<uint8_t> control_reply(const ControlStruct& request, const CallOutcome& out) {
  ControlStruct r = request;
  r.rv = out.rv;
  if (out.rv == sc::kSuccess && out.data.size() > request.recv_length) {
    r.rv = sc::kEInsufficientBuffer;
    r.bytes_returned = static_cast<uint32_t>(out.data.size());
  } else {
    r.bytes_returned = out.rv == sc::kSuccess ? static_cast<uint32_t>(out.data.size()) : out.length;
  }
  return r.rv == sc::kSuccess ? bytes_of(r, out.data) : bytes_of(r);
}

GetSetStruct get_attrib_reply(const GetSetStruct& request, const CallOutcome& out) {
  GetSetStruct r = request;
  r.rv = out.rv;
  std::memset(r.attr, 0, sizeof r.attr);
  if (out.rv == sc::kSuccess) {
    const auto n = std::min(out.data.size(), sizeof r.attr);
    if (n != 0) std::memcpy(r.attr, out.data.data(), n);
    r.attr_length = static_cast<uint32_t>(out.data.size());
    if (out.data.size() > sizeof r.attr) r.rv = sc::kEInsufficientBuffer;
  } else {
    r.attr_length = out.length;
  }
  return r;
}

}  // namespace cardbridge::shim::wire
