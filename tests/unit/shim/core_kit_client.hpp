// core_kit: a pcsc-lite client connection, emitting requests the way libpcsclite 1.9.9
// does (winscard_clnt.c / winscard_msg.c): an 8-byte header {size of the fixed struct,
// command} in one write, the struct in a second write and, for TRANSMIT/CONTROL, the
// data in a third. Replies carry no header; the reader takes exactly the number of
// bytes the command's reply has, from the client's in-order stream.
//
// send_*() only send; the reply (local or after the fake desk answered) is read with
// read<T>() / take(). A few helpers do a whole local exchange (version, establish,
// array, status as the library does it: 0x12 first, then 0x0B).
#pragma once

#include <cstdint>
#include <cstring>
#include <map>
#include <span>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/shim_core.hpp"
#include "core_kit_effects.hpp"
#include "pcscd_wire/wire.hpp"

namespace core_kit {

namespace wire = cardbridge::shim::wire;
namespace sc = cardbridge::scard;
using wire::Command;

inline constexpr std::size_t kArrayBytes = wire::kLegacyArrayBytes;  // 2944

template <typename T>
std::vector<uint8_t> as_bytes(const T& s) {
  return wire::bytes_of(s);
}

// A reader-state array entry (slot i) from raw array bytes.
inline wire::ReaderState entry(const std::vector<uint8_t>& array, std::size_t slot) {
  wire::ReaderState rs{};
  if (array.size() >= (slot + 1) * sizeof rs) std::memcpy(&rs, array.data() + slot * sizeof rs, sizeof rs);
  return rs;
}
inline std::string entry_name(const wire::ReaderState& rs) { return std::string(rs.name, strnlen(rs.name, sizeof rs.name)); }

class PcscClient {
 public:
  PcscClient(shim::ShimCore& core, FakeEffects& fx, shim::ClientId id, const shim::Clock::time_point* now)
      : core_(&core), fx_(&fx), id_(id), now_(now) {}

  shim::ClientId id() const { return id_; }
  uint32_t context() const { return context_; }
  int32_t minor() const { return minor_; }

  // ---- connection ----
  void open() { core_->client_opened(id_, *now_); }
  void close() {  // the client went away (EOF)
    fx_->client_gone(id_);
    core_->client_closed(id_, *now_);
  }
  bool closed_by_shim() const { return fx_->is_closed(id_); }

  // ---- raw bytes ----
  void send_raw(std::span<const uint8_t> bytes) { core_->client_data(id_, bytes, *now_); }
  // One request as libpcsclite writes it: header, struct, trailing data (separate writes).
  void request(Command cmd, std::span<const uint8_t> body = {}, std::span<const uint8_t> trailing = {}) {
    wire::Header h{static_cast<uint32_t>(body.size()), static_cast<uint32_t>(cmd)};
    send_raw(as_bytes(h));
    if (!body.empty() && !closed_by_shim()) send_raw(body);
    if (!trailing.empty() && !closed_by_shim()) send_raw(trailing);
  }
  template <typename T>
  void request_struct(Command cmd, const T& s, std::span<const uint8_t> trailing = {}) {
    auto body = as_bytes(s);
    request(cmd, body, trailing);
  }

  // ---- what the shim sent back ----
  std::size_t available() { return fx_->stream(id_).available(); }
  bool nothing_pending() { return available() == 0; }
  std::vector<uint8_t> take(std::size_t n) {
    auto& s = fx_->stream(id_);
    if (s.available() < n) {
      ADD_FAILURE() << "client " << id_ << ": wanted " << n << " reply bytes, have " << s.available();
      std::vector<uint8_t> out(s.bytes.begin() + static_cast<std::ptrdiff_t>(s.consumed), s.bytes.end());
      out.resize(n, 0);
      s.consumed = s.bytes.size();
      return out;
    }
    std::vector<uint8_t> out(s.bytes.begin() + static_cast<std::ptrdiff_t>(s.consumed),
                             s.bytes.begin() + static_cast<std::ptrdiff_t>(s.consumed + n));
    s.consumed += n;
    return out;
  }
  std::vector<uint8_t> take_all() { return take(available()); }
  template <typename T>
  T read() {
    auto b = take(sizeof(T));
    T t{};
    std::memcpy(&t, b.data(), sizeof(T));
    return t;
  }

  // ---- requests (send only) ----
  void send_version(int32_t major, int32_t minor) { request_struct(Command::kVersion, wire::VersionStruct{major, minor, 0}); }
  void send_establish(uint32_t scope) { request_struct(Command::kEstablishContext, wire::EstablishStruct{scope, 0, 0}); }
  void send_release(uint32_t ctx) { request_struct(Command::kReleaseContext, wire::ReleaseStruct{ctx, 0}); }
  void send_connect(uint32_t ctx, const std::string& reader, uint32_t share, uint32_t protocols) {
    wire::ConnectStruct s{};
    s.context = ctx;
    wire::copy_name(s.reader, reader);
    s.share_mode = share;
    s.preferred_protocols = protocols;
    request_struct(Command::kConnect, s);
  }
  void send_connect(const std::string& reader, uint32_t share = sc::kShareShared,
                    uint32_t protocols = sc::kProtocolT0 | sc::kProtocolT1) {
    send_connect(context_, reader, share, protocols);
  }
  void send_reconnect(uint32_t card, uint32_t share, uint32_t protocols, uint32_t init, uint32_t active = 0) {
    request_struct(Command::kReconnect,
                   wire::ReconnectStruct{static_cast<int32_t>(card), share, protocols, init, active, 0});
  }
  void send_disconnect(uint32_t card, uint32_t disposition) {
    request_struct(Command::kDisconnect, wire::DisconnectStruct{static_cast<int32_t>(card), disposition, 0});
  }
  void send_begin(uint32_t card) { request_struct(Command::kBeginTransaction, wire::BeginStruct{static_cast<int32_t>(card), 0}); }
  void send_end(uint32_t card, uint32_t disposition) {
    request_struct(Command::kEndTransaction, wire::EndStruct{static_cast<int32_t>(card), disposition, 0});
  }
  // SCardTransmit with pioRecvPci == NULL (libpcsclite then sends T0|T1, 16).
  wire::TransmitStruct send_transmit(uint32_t card, const std::vector<uint8_t>& apdu, uint32_t recv_buffer = 258,
                                     uint32_t send_protocol = sc::kProtocolT1) {
    wire::TransmitStruct s{};
    s.card = static_cast<int32_t>(card);
    s.send_pci_protocol = send_protocol;
    s.send_pci_length = 16;
    s.send_length = static_cast<uint32_t>(apdu.size());
    s.recv_pci_protocol = sc::kProtocolT0 | sc::kProtocolT1;
    s.recv_pci_length = 16;
    s.recv_length = recv_buffer;
    s.rv = 0;
    request_struct(Command::kTransmit, s, apdu);
    return s;
  }
  void send_control(uint32_t card, uint32_t code, std::span<const uint8_t> data, uint32_t recv_buffer) {
    wire::ControlStruct s{static_cast<int32_t>(card), code, static_cast<uint32_t>(data.size()), recv_buffer, 0, 0};
    request_struct(Command::kControl, s, data);
  }
  void send_status(uint32_t card) { request_struct(Command::kStatus, wire::StatusStruct{static_cast<int32_t>(card), 0}); }
  void send_cancel(uint32_t ctx) { request_struct(Command::kCancel, wire::CancelStruct{static_cast<int32_t>(ctx), 0}); }
  // SCardGetAttrib: pbAttr zeros, cbAttrLen always 264, rv pre-filled with SCARD_E_NO_SERVICE.
  void send_get_attrib(uint32_t card, uint32_t attr) {
    wire::GetSetStruct s{};
    s.card = static_cast<int32_t>(card);
    s.attr_id = attr;
    s.attr_length = sc::kMaxBufferSize;
    s.rv = sc::kENoService;
    request_struct(Command::kGetAttrib, s);
  }
  void send_header_only(Command cmd) { request(cmd); }

  // ---- whole local exchanges ----
  wire::VersionStruct version(int32_t major, int32_t minor) {
    send_version(major, minor);
    auto r = read<wire::VersionStruct>();
    if (r.rv == 0) minor_ = minor;
    return r;
  }
  wire::EstablishStruct establish(uint32_t scope = sc::kScopeSystem) {
    send_establish(scope);
    auto r = read<wire::EstablishStruct>();
    if (r.rv == 0) context_ = r.context;
    return r;
  }
  // SCardEstablishContext: CMD_VERSION then ESTABLISH on a fresh connection.
  void start(int32_t minor = 4) {
    open();
    auto v = version(4, minor);
    EXPECT_EQ(v.rv, 0u);
    auto e = establish();
    EXPECT_EQ(e.rv, 0u);
  }
  // CMD_GET_READERS_STATE (protocol 4.4/4.5).
  std::vector<uint8_t> readers_state() {
    send_header_only(Command::kGetReadersState);
    return take(kArrayBytes);
  }
  // CMD_WAIT_READER_STATE_CHANGE (protocol 4.4/4.5): registers for a change signal and
  // gets the reader array at once.
  std::vector<uint8_t> wait_for_change() {
    send_header_only(Command::kWaitReaderStateChange);
    return take(kArrayBytes);
  }
  // Remembers the reader a handle was connected to (libpcsclite keeps it for Status).
  void remember(uint32_t card, const std::string& reader) { names_[card] = reader; }
  // SCardStatus as libpcsclite 1.9.9 does it: 0x12, look the reader up by name (missing:
  // SCARD_E_READER_UNAVAILABLE, 0x0B not sent), then 0x0B; returns the rv.
  uint32_t status(uint32_t card) {
    auto array = readers_state();
    const std::string& want = names_[card];
    bool found = false;
    for (std::size_t i = 0; i < wire::kLegacyReaderSlots; ++i) {
      if (!want.empty() && entry_name(entry(array, i)) == want) found = true;
    }
    if (!found) return sc::kEReaderUnavailable;
    send_status(card);
    auto r = read<wire::StatusStruct>();
    EXPECT_EQ(static_cast<uint32_t>(r.card), card);
    return r.rv;
  }

 private:
  shim::ShimCore* core_;
  FakeEffects* fx_;
  shim::ClientId id_;
  const shim::Clock::time_point* now_;
  uint32_t context_ = 0;
  int32_t minor_ = 0;
  std::map<uint32_t, std::string> names_;
};

}  // namespace core_kit
