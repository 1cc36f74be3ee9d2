// What libpcsclite 1.9.9 puts on the wire, written from the protocol facts
// (/work/shared/docs/pcsc-protocol.md, cited as §n; x86-64 offsets checked there with
// offsetof) and never from the shim's pcscd_wire/ code, so that a layout mistake there
// cannot hide itself in a test. No GoogleTest here: the fuzzer's seed maker uses it too.
//
// A request is an 8-byte header {size of the fixed struct, command} and the struct; for
// TRANSMIT and CONTROL the data follows the struct and is not counted in the header (§2.1).
// Replies have no header: the fixed struct comes back with the out-fields filled.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "kit/bytes.hpp"

namespace cardbridge::shim::kit::pcsclite {

// Opcodes (§2.2).
namespace cmd {
inline constexpr uint32_t kEstablish = 0x01, kRelease = 0x02, kListReaders = 0x03, kConnect = 0x04,
                          kReconnect = 0x05, kDisconnect = 0x06, kBegin = 0x07, kEnd = 0x08, kTransmit = 0x09,
                          kControl = 0x0A, kStatus = 0x0B, kGetStatusChange = 0x0C, kCancel = 0x0D,
                          kCancelTransaction = 0x0E, kGetAttrib = 0x0F, kSetAttrib = 0x10, kVersion = 0x11,
                          kGetReadersState = 0x12, kWait = 0x13, kStopWait = 0x14, kGetReaderEvents = 0x15,
                          kStateSize = 0x16, kStateArray = 0x17;
}  // namespace cmd

// Fixed struct sizes (§2.3) and field sizes.
inline constexpr std::size_t kHeaderSize = 8;
inline constexpr std::size_t kVersionSize = 12, kEstablishSize = 12, kReleaseSize = 8, kConnectSize = 152,
                             kReconnectSize = 24, kDisconnectSize = 12, kBeginSize = 8, kEndSize = 12,
                             kTransmitSize = 32, kControlSize = 24, kStatusSize = 8, kCancelSize = 8,
                             kGetSetSize = 280, kWaitSize = 8, kReaderEventsSize = 8;
inline constexpr std::size_t kReaderNameField = 128;  // MAX_READERNAME
inline constexpr std::size_t kAttrField = 264;        // MAX_BUFFER_SIZE
inline constexpr std::size_t kAtrField = 33;          // MAX_ATR_SIZE
// The reader-state array (§3.1): 16 slots of 184 bytes (protocol 4.4/4.5; 4.6 announces the
// slot count with CMD_GET_READERS_STATE_SIZE and sends the same array).
inline constexpr std::size_t kSlotSize = 184;
inline constexpr std::size_t kSlots = 16;
inline constexpr std::size_t kArraySize = kSlots * kSlotSize;  // 2944
inline constexpr uint32_t kMaxBufferSizeExtended = 65548;
// The rv libpcsclite pre-fills in GET/SET_ATTRIB requests (SCARD_E_NO_SERVICE) [traced].
inline constexpr uint32_t kPrefilledAttribRv = 0x8010001D;

// The fixed struct a command carries (0 for the header-only commands and unknown ones).
constexpr std::size_t body_size(uint32_t command) {
  switch (command) {
    case cmd::kEstablish: return kEstablishSize;
    case cmd::kRelease: return kReleaseSize;
    case cmd::kConnect: return kConnectSize;
    case cmd::kReconnect: return kReconnectSize;
    case cmd::kDisconnect: return kDisconnectSize;
    case cmd::kBegin: return kBeginSize;
    case cmd::kEnd: return kEndSize;
    case cmd::kTransmit: return kTransmitSize;
    case cmd::kControl: return kControlSize;
    case cmd::kStatus: return kStatusSize;
    case cmd::kCancel: return kCancelSize;
    case cmd::kGetAttrib:
    case cmd::kSetAttrib: return kGetSetSize;
    case cmd::kVersion: return kVersionSize;
    default: return 0;
  }
}
// Commands whose struct starts with an hCard, or with an hContext.
constexpr bool starts_with_card(uint32_t c) {
  return c == cmd::kReconnect || c == cmd::kDisconnect || c == cmd::kBegin || c == cmd::kEnd ||
         c == cmd::kTransmit || c == cmd::kControl || c == cmd::kStatus || c == cmd::kGetAttrib ||
         c == cmd::kSetAttrib;
}
constexpr bool starts_with_context(uint32_t c) {
  return c == cmd::kRelease || c == cmd::kConnect || c == cmd::kCancel;
}

inline Bytes header(uint32_t size, uint32_t command) { return Le().u32(size).u32(command); }
// A whole request as one byte string (libpcsclite writes the three parts separately).
inline Bytes request(uint32_t command, std::span<const uint8_t> body, std::span<const uint8_t> trailing = {}) {
  return Le().u32(static_cast<uint32_t>(body.size())).u32(command).bytes(body).bytes(trailing);
}

// ---- request structs, as the client fills them (out-fields zero unless said) ----

inline Bytes version(int32_t major, int32_t minor) { return Le().i32(major).i32(minor).u32(0); }
inline Bytes establish(uint32_t scope) { return Le().u32(scope).u32(0).u32(0); }
inline Bytes release(uint32_t context) { return Le().u32(context).u32(0); }
inline Bytes connect(uint32_t context, std::string_view reader, uint32_t share, uint32_t protocols) {
  return Le().u32(context).text(reader, kReaderNameField).u32(share).u32(protocols).u32(0).u32(0).u32(0);
}
// |active_in|: what the client leaves in dwActiveProtocol (the daemon overwrites it).
inline Bytes reconnect(uint32_t card, uint32_t share, uint32_t protocols, uint32_t init, uint32_t active_in = 0) {
  return Le().u32(card).u32(share).u32(protocols).u32(init).u32(active_in).u32(0);
}
inline Bytes disconnect(uint32_t card, uint32_t disposition) { return Le().u32(card).u32(disposition).u32(0); }
inline Bytes begin(uint32_t card) { return Le().u32(card).u32(0); }
inline Bytes end(uint32_t card, uint32_t disposition) { return Le().u32(card).u32(disposition).u32(0); }
// The fixed part of SCardTransmit; the APDU follows it. With pioRecvPci == NULL the client
// sends T0|T1 (3) and 16 as the receive PCI (§2.3).
struct TransmitFields {
  uint32_t card = 0;
  uint32_t send_protocol = 2;  // T1
  uint32_t send_pci_length = 16;
  uint32_t send_length = 0;
  uint32_t recv_pci_protocol = 3;
  uint32_t recv_pci_length = 16;
  uint32_t recv_length = 258;
};
inline Bytes transmit(const TransmitFields& t) {
  return Le()
      .u32(t.card)
      .u32(t.send_protocol)
      .u32(t.send_pci_length)
      .u32(t.send_length)
      .u32(t.recv_pci_protocol)
      .u32(t.recv_pci_length)
      .u32(t.recv_length)
      .u32(0);
}
// The fixed part of SCardControl; the data follows it.
inline Bytes control(uint32_t card, uint32_t code, uint32_t send_length, uint32_t recv_length) {
  return Le().u32(card).u32(code).u32(send_length).u32(recv_length).u32(0).u32(0);
}
inline Bytes status(uint32_t card) { return Le().u32(card).u32(0); }
inline Bytes cancel(uint32_t context) { return Le().u32(context).u32(0); }
// SCardGetAttrib: pbAttr zeros, cbAttrLen always 264, rv pre-filled [traced].
inline Bytes get_attrib(uint32_t card, uint32_t attr) {
  return Le().u32(card).u32(attr).zeros(kAttrField).u32(kAttrField).u32(kPrefilledAttribRv);
}
inline Bytes set_attrib(uint32_t card, uint32_t attr, std::span<const uint8_t> value) {
  return Le()
      .u32(card)
      .u32(attr)
      .padded(value, kAttrField)
      .u32(static_cast<uint32_t>(value.size()))
      .u32(kPrefilledAttribRv);
}

}  // namespace cardbridge::shim::kit::pcsclite
