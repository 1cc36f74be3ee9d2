// A pcsc-lite client as seen on the wire (libpcsclite 1.9.9 = protocol 4.4, 2.3 = 4.5,
// 2.5 = 4.6), for ShimCore tests.
//
// Requests are written field by field (pcsc-protocol.md §2.3, x86-64 offsets), never with
// the structs of wire.hpp, so that a layout mistake there cannot hide itself. As the real
// client does, the 8-byte header and the fixed struct leave in two separate writes, and
// TRANSMIT/CONTROL data in a third (§2.1 [traced]). Replies have no header: they are
// parsed by offset, with the exact length the real client would read.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "fake_effects.hpp"

namespace cardbridge::shim::testkit {

namespace op {  // pcsc-lite opcodes (§2.2)
inline constexpr uint32_t kEstablish = 0x01, kRelease = 0x02, kListReaders = 0x03, kConnect = 0x04,
                          kReconnect = 0x05, kDisconnect = 0x06, kBegin = 0x07, kEnd = 0x08,
                          kTransmit = 0x09, kControl = 0x0A, kStatus = 0x0B, kCancel = 0x0D,
                          kGetAttrib = 0x0F, kSetAttrib = 0x10, kVersion = 0x11, kGetReadersState = 0x12,
                          kWait = 0x13, kStopWait = 0x14, kGetReaderEvents = 0x15, kStateSize = 0x16,
                          kStateArray = 0x17;
}  // namespace op

inline constexpr std::size_t kSlotBytes = 184;
inline constexpr std::size_t kArrayBytes = 16 * kSlotBytes;  // 2944

struct VersionReply {
  int32_t major = 0, minor = 0;
  uint32_t rv = 0;
};
struct EstablishReply {
  uint32_t scope = 0, context = 0, rv = 0;
};
struct ConnectReply {
  uint32_t context = 0;
  std::string reader;
  uint32_t share = 0, protocols = 0;
  int32_t card = 0;
  uint32_t active_protocol = 0, rv = 0;
};
struct ReconnectReply {
  int32_t card = 0;
  uint32_t share = 0, protocols = 0, initialization = 0, active_protocol = 0, rv = 0;
};
struct TransmitReply {
  int32_t card = 0;
  uint32_t send_pci_protocol = 0, send_pci_length = 0, send_length = 0;
  uint32_t recv_pci_protocol = 0, recv_pci_length = 0, recv_length = 0, rv = 0;
  Bytes data;
};
struct ControlReply {
  int32_t card = 0;
  uint32_t code = 0, send_length = 0, recv_length = 0, bytes_returned = 0, rv = 0;
  Bytes data;
};
struct GetSetReply {
  int32_t card = 0;
  uint32_t attr_id = 0;
  Bytes attr;  // the whole 264-byte field
  uint32_t length = 0, rv = 0;
};
struct ReaderStateView {
  std::string name;
  uint32_t event_counter = 0, reader_state = 0;
  int32_t sharing = 0;
  Bytes atr_field;  // all 33 bytes
  uint32_t atr_length = 0, protocol = 0;
  Bytes raw;  // the 184 bytes
  Bytes atr() const { return Bytes(atr_field.begin(), atr_field.begin() + std::min<uint32_t>(atr_length, 33)); }
};

inline std::vector<ReaderStateView> parse_array(const Bytes& a) {
  std::vector<ReaderStateView> out;
  EXPECT_EQ(a.size() % kSlotBytes, 0u) << "array size " << a.size();
  for (std::size_t off = 0; off + kSlotBytes <= a.size(); off += kSlotBytes) {
    ReaderStateView v;
    v.raw = slice(a, off, kSlotBytes);
    std::size_t n = 0;
    while (n < 128 && a[off + n] != 0) ++n;
    v.name.assign(reinterpret_cast<const char*>(a.data() + off), n);
    v.event_counter = rd32(a, off + 128);
    v.reader_state = rd32(a, off + 132);
    v.sharing = rdi32(a, off + 136);
    v.atr_field = slice(a, off + 140, 33);
    v.atr_length = rd32(a, off + 176);
    v.protocol = rd32(a, off + 180);
    out.push_back(std::move(v));
  }
  return out;
}

// The 184 bytes pcscd would write for a reader (§3.1), padding included.
inline Bytes slot_bytes(std::string_view name, uint32_t counter, uint32_t state, int32_t sharing,
                        const Bytes& atr, uint32_t protocol) {
  return Le()
      .text(name, 128)
      .u32(counter)
      .u32(state)
      .i32(sharing)
      .padded(atr, 33)
      .zeros(3)
      .u32(static_cast<uint32_t>(atr.size()))
      .u32(protocol);
}

class PcscClientSim {
 public:
  PcscClientSim(ShimCore& core, FakeEffects& fx, ClientId id, const Clock::time_point* now)
      : core_(&core), fx_(&fx), id_(id), now_(now) {}

  ClientId id() const { return id_; }
  uint32_t context = 0;  // from the last successful ESTABLISH
  int32_t minor = 4;

  void open() { core_->client_opened(id_, *now_); }
  void close() { core_->client_closed(id_, *now_); }
  bool closed() const { return fx_->was_closed(id_); }

  // ---- raw I/O ----
  // Header, then body, then trailing data: separate writes as libpcsclite does.
  void send(uint32_t command, const Bytes& body, const Bytes& trailing = {}) {
    send_header(static_cast<uint32_t>(body.size()), command);
    if (!body.empty()) core_->client_data(id_, body, *now_);
    if (!trailing.empty()) core_->client_data(id_, trailing, *now_);
  }
  void send_header(uint32_t size, uint32_t command) { core_->client_data(id_, Le().u32(size).u32(command).get(), *now_); }
  void send_raw(const Bytes& b) { core_->client_data(id_, b, *now_); }
  Bytes take() { return fx_->take(id_); }
  // Takes exactly what is pending and checks its length.
  Bytes take_exact(std::size_t n, const char* what) {
    Bytes b = take();
    EXPECT_EQ(b.size(), n) << what << ": reply length (client " << id_ << ")";
    return b;
  }
  bool nothing_pending() const { return fx_->pending_bytes(id_) == 0; }

  // ---- requests ----
  void send_version(int32_t major, int32_t minor_) {
    send(op::kVersion, Le().i32(major).i32(minor_).u32(0));
  }
  void send_establish(uint32_t scope) { send(op::kEstablish, Le().u32(scope).u32(0).u32(0)); }
  void send_release(uint32_t ctx) { send(op::kRelease, Le().u32(ctx).u32(0)); }
  void send_connect(uint32_t ctx, std::string_view reader, uint32_t share, uint32_t protocols) {
    send(op::kConnect, Le().u32(ctx).text(reader, 128).u32(share).u32(protocols).u32(0).u32(0).u32(0));
  }
  void send_reconnect(int32_t card, uint32_t share, uint32_t protocols, uint32_t init, uint32_t active_in = 0) {
    send(op::kReconnect, Le().i32(card).u32(share).u32(protocols).u32(init).u32(active_in).u32(0));
  }
  void send_disconnect(int32_t card, uint32_t disposition) {
    send(op::kDisconnect, Le().i32(card).u32(disposition).u32(0));
  }
  void send_begin(int32_t card) { send(op::kBegin, Le().i32(card).u32(0)); }
  void send_end(int32_t card, uint32_t disposition) { send(op::kEnd, Le().i32(card).u32(disposition).u32(0)); }
  // pioRecvPci == NULL: the client sends 3 (T0|T1) and 16 (§2.3).
  void send_transmit(int32_t card, uint32_t send_protocol, const Bytes& apdu, uint32_t recv_length,
                     uint32_t recv_pci_protocol = 3, uint32_t recv_pci_length = 16) {
    send(op::kTransmit,
         Le().i32(card).u32(send_protocol).u32(16).u32(static_cast<uint32_t>(apdu.size()))
             .u32(recv_pci_protocol).u32(recv_pci_length).u32(recv_length).u32(0),
         apdu);
  }
  void send_control(int32_t card, uint32_t code, const Bytes& data, uint32_t recv_length) {
    send(op::kControl,
         Le().i32(card).u32(code).u32(static_cast<uint32_t>(data.size())).u32(recv_length).u32(0).u32(0), data);
  }
  void send_status(int32_t card) { send(op::kStatus, Le().i32(card).u32(0)); }
  void send_cancel(uint32_t ctx) { send(op::kCancel, Le().u32(ctx).u32(0)); }
  // GET: cbAttrLen is always 264 and rv is pre-filled with SCARD_E_NO_SERVICE ([traced]).
  void send_get_attrib(int32_t card, uint32_t attr) {
    send(op::kGetAttrib, Le().i32(card).u32(attr).zeros(264).u32(264).u32(0x8010001D));
  }
  void send_set_attrib(int32_t card, uint32_t attr, const Bytes& value) {
    send(op::kSetAttrib,
         Le().i32(card).u32(attr).padded(value, 264).u32(static_cast<uint32_t>(value.size())).u32(0x8010001D));
  }
  void send_cmd(uint32_t command) { send(command, {}); }  // header-only commands

  // ---- replies ----
  VersionReply version_reply() {
    Bytes b = take_exact(12, "VERSION");
    return {rdi32(b, 0), rdi32(b, 4), rd32(b, 8)};
  }
  EstablishReply establish_reply() {
    Bytes b = take_exact(12, "ESTABLISH_CONTEXT");
    return {rd32(b, 0), rd32(b, 4), rd32(b, 8)};
  }
  // RELEASE_CONTEXT: the rv (checks that hContext is echoed).
  uint32_t release_reply(uint32_t ctx) {
    Bytes b = take_exact(8, "RELEASE_CONTEXT");
    EXPECT_EQ(rd32(b, 0), ctx) << "hContext echoed";
    return rd32(b, 4);
  }
  ConnectReply connect_reply() {
    Bytes b = take_exact(152, "CONNECT");
    ConnectReply r;
    r.context = rd32(b, 0);
    std::size_t n = 0;
    while (n < 128 && b.size() >= 132 && b[4 + n] != 0) ++n;
    if (b.size() >= 132) r.reader.assign(reinterpret_cast<const char*>(b.data() + 4), n);
    r.share = rd32(b, 132);
    r.protocols = rd32(b, 136);
    r.card = rdi32(b, 140);
    r.active_protocol = rd32(b, 144);
    r.rv = rd32(b, 148);
    return r;
  }
  ReconnectReply reconnect_reply() {
    Bytes b = take_exact(24, "RECONNECT");
    return {rdi32(b, 0), rd32(b, 4), rd32(b, 8), rd32(b, 12), rd32(b, 16), rd32(b, 20)};
  }
  // DISCONNECT / END_TRANSACTION: rv (12-byte struct; hCard and disposition echoed).
  uint32_t card_disp_reply(int32_t card, uint32_t disposition, const char* what) {
    Bytes b = take_exact(12, what);
    EXPECT_EQ(rdi32(b, 0), card) << what << ": hCard echoed";
    EXPECT_EQ(rd32(b, 4), disposition) << what << ": disposition echoed";
    return rd32(b, 8);
  }
  // BEGIN_TRANSACTION / STATUS / CANCEL: rv (8-byte struct; first field echoed).
  uint32_t rv8_reply(uint32_t first, const char* what) {
    Bytes b = take_exact(8, what);
    EXPECT_EQ(rd32(b, 0), first) << what << ": first field echoed";
    return rd32(b, 4);
  }
  // As the client reads it: 32 bytes, then recv_length bytes only if rv == 0. The whole
  // pending output must be exactly that, or the stream is out of step.
  TransmitReply transmit_reply() {
    Bytes b = take();
    TransmitReply r;
    if (b.size() < 32) {
      ADD_FAILURE() << "TRANSMIT reply of " << b.size() << " bytes";
      return r;
    }
    r.card = rdi32(b, 0);
    r.send_pci_protocol = rd32(b, 4);
    r.send_pci_length = rd32(b, 8);
    r.send_length = rd32(b, 12);
    r.recv_pci_protocol = rd32(b, 16);
    r.recv_pci_length = rd32(b, 20);
    r.recv_length = rd32(b, 24);
    r.rv = rd32(b, 28);
    const std::size_t expected = 32 + (r.rv == 0 ? r.recv_length : 0);
    EXPECT_EQ(b.size(), expected) << "TRANSMIT: struct + data only when rv == 0 (rv 0x" << std::hex << r.rv << ")";
    r.data.assign(b.begin() + 32, b.end());
    return r;
  }
  ControlReply control_reply() {
    Bytes b = take();
    ControlReply r;
    if (b.size() < 24) {
      ADD_FAILURE() << "CONTROL reply of " << b.size() << " bytes";
      return r;
    }
    r.card = rdi32(b, 0);
    r.code = rd32(b, 4);
    r.send_length = rd32(b, 8);
    r.recv_length = rd32(b, 12);
    r.bytes_returned = rd32(b, 16);
    r.rv = rd32(b, 20);
    const std::size_t expected = 24 + (r.rv == 0 ? r.bytes_returned : 0);
    EXPECT_EQ(b.size(), expected) << "CONTROL: struct + data only when rv == 0";
    r.data.assign(b.begin() + 24, b.end());
    return r;
  }
  GetSetReply getset_reply(const char* what) {
    Bytes b = take_exact(280, what);
    GetSetReply r;
    r.card = rdi32(b, 0);
    r.attr_id = rd32(b, 4);
    r.attr = slice(b, 8, 264);
    r.length = rd32(b, 272);
    r.rv = rd32(b, 276);
    return r;
  }
  // {timeOut, rv}: the STOP reply or the asynchronous event signal.
  std::optional<std::pair<uint32_t, uint32_t>> wait_struct() {
    Bytes b = take();
    if (b.empty()) return std::nullopt;
    EXPECT_EQ(b.size(), 8u) << "wait_reader_state_change";
    return std::make_pair(rd32(b, 0), rd32(b, 4));
  }

  // ---- whole calls answered locally ----
  VersionReply version(int32_t major, int32_t minor_) {
    send_version(major, minor_);
    auto r = version_reply();
    if (r.rv == 0) minor = minor_;
    return r;
  }
  EstablishReply establish(uint32_t scope = 2) {
    send_establish(scope);
    auto r = establish_reply();
    if (r.rv == 0) context = r.context;
    return r;
  }
  uint32_t release(uint32_t ctx) {
    send_release(ctx);
    return release_reply(ctx);
  }
  // CMD_GET_READERS_STATE (SCardListReaders, first half of SCardStatus).
  Bytes readers_state() {
    send_cmd(op::kGetReadersState);
    return take_exact(kArrayBytes, "CMD_GET_READERS_STATE");
  }
  uint32_t status(int32_t card) {
    send_status(card);
    return rv8_reply(static_cast<uint32_t>(card), "STATUS");
  }
  uint32_t cancel(uint32_t ctx) {
    send_cancel(ctx);
    return rv8_reply(ctx, "CANCEL");
  }
  std::pair<uint32_t, uint32_t> reader_events() {
    send_cmd(op::kGetReaderEvents);
    Bytes b = take_exact(8, "CMD_GET_READER_EVENTS");
    return {rd32(b, 0), rd32(b, 4)};
  }

 private:
  ShimCore* core_;
  FakeEffects* fx_;
  ClientId id_;
  const Clock::time_point* now_;
};

}  // namespace cardbridge::shim::testkit
