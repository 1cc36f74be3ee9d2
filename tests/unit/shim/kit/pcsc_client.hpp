// PcscClient: one pcsc-lite client connection as ShimCore sees it, behaving like
// libpcsclite (1.9.9 = protocol 4.4, 2.3 = 4.5, 2.5 = 4.6).
//
// Requests are encoded field by field (libpcsclite.hpp) and sent as the library sends them:
// the 8-byte header, the struct and, for TRANSMIT/CONTROL, the data in separate writes
// (§2.1 [traced]); once the shim has closed the connection nothing more is sent. Replies
// are read from the client's in-order stream with the exact length the library reads and
// decoded by offset, never with the shim's structs. A typed reply reader (*_reply()) also
// checks that nothing follows the reply: one request, one answer, so a stream out of step
// fails the test that put it out of step. take() / take_all() read raw bytes.
//
// send_*() only send; the answer (local, or once the desk answered) is read afterwards.
// The whole-call helpers (version(), establish(), status(), scard_status(), ...) do a
// local exchange in one go.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "cardbridge/shim_core/shim_core.hpp"
#include "kit/bytes.hpp"
#include "kit/libpcsclite.hpp"
#include "kit/pcsc_values.hpp"
#include "kit/recording_effects.hpp"

namespace cardbridge::shim::kit {

namespace cmd = pcsclite::cmd;
using pcsclite::kArraySize;
using pcsclite::kSlotSize;

// ---- replies, as the client reads them ----
struct VersionReply {
  int32_t major = 0, minor = 0;
  uint32_t rv = 0;
};
struct EstablishReply {
  uint32_t scope = 0, context = 0, rv = 0;
};
// The 8-byte replies: RELEASE_CONTEXT and CANCEL {hContext, rv}; BEGIN_TRANSACTION and
// STATUS {hCard, rv}; CMD_GET_READER_EVENTS {readerEvents, rv}; the event signal and the
// STOP reply {timeOut, rv}.
struct PairReply {
  uint32_t first = 0, rv = 0;
  friend bool operator==(const PairReply&, const PairReply&) = default;
  friend std::ostream& operator<<(std::ostream& o, const PairReply& r) {
    return o << "{0x" << std::hex << r.first << ", rv 0x" << r.rv << std::dec << "}";
  }
};
// DISCONNECT and END_TRANSACTION {hCard, dwDisposition, rv}.
struct DispositionReply {
  uint32_t card = 0, disposition = 0, rv = 0;
  friend bool operator==(const DispositionReply&, const DispositionReply&) = default;
  friend std::ostream& operator<<(std::ostream& o, const DispositionReply& r) {
    return o << "{card 0x" << std::hex << r.card << ", disposition " << r.disposition << ", rv 0x" << r.rv
             << std::dec << "}";
  }
};
struct ConnectReply {
  uint32_t context = 0;
  std::string reader;
  uint32_t share = 0, protocols = 0, card = 0, active_protocol = 0, rv = 0;
};
struct ReconnectReply {
  uint32_t card = 0, share = 0, protocols = 0, initialization = 0, active_protocol = 0, rv = 0;
};
struct TransmitReply {
  uint32_t card = 0, send_protocol = 0, send_pci_length = 0, send_length = 0;
  uint32_t recv_pci_protocol = 0, recv_pci_length = 0, recv_length = 0, rv = 0;
  Bytes data;  // recv_length bytes, only with rv == 0
};
struct ControlReply {
  uint32_t card = 0, code = 0, send_length = 0, recv_length = 0, bytes_returned = 0, rv = 0;
  Bytes data;  // bytes_returned bytes, only with rv == 0
};
struct GetSetReply {
  uint32_t card = 0, attr_id = 0;
  Bytes attr;  // the whole 264-byte field
  uint32_t length = 0, rv = 0;
};

// ---- the reader-state array (§3.1) ----
struct ReaderStateView {
  std::string name;
  uint32_t event_counter = 0, reader_state = 0;
  int32_t sharing = 0;
  Bytes atr_field;  // all 33 bytes
  uint32_t atr_length = 0, protocol = 0;
  Bytes raw;  // the 184 bytes
  Bytes atr() const { return slice(atr_field, 0, atr_length); }
};
inline ReaderStateView parse_slot(std::span<const uint8_t> s) {
  ReaderStateView v;
  v.raw = slice(s, 0, kSlotSize);
  const std::size_t n = std::min<std::size_t>(pcsclite::kReaderNameField, s.size());
  std::size_t len = 0;
  while (len < n && s[len] != 0) ++len;
  v.name.assign(reinterpret_cast<const char*>(s.data()), len);
  v.event_counter = le32(s, 128);
  v.reader_state = le32(s, 132);
  v.sharing = le32s(s, 136);
  v.atr_field = slice(s, 140, pcsclite::kAtrField);
  v.atr_length = le32(s, 176);
  v.protocol = le32(s, 180);
  return v;
}
// The 184 bytes of slot |i|.
inline Bytes slot_of(std::span<const uint8_t> array, std::size_t i) { return slice(array, i * kSlotSize, kSlotSize); }
inline ReaderStateView entry(std::span<const uint8_t> array, std::size_t i) { return parse_slot(slot_of(array, i)); }
inline std::vector<ReaderStateView> parse_array(std::span<const uint8_t> a) {
  EXPECT_EQ(a.size() % kSlotSize, 0u) << "array of " << a.size() << " bytes";
  std::vector<ReaderStateView> out;
  for (std::size_t i = 0; (i + 1) * kSlotSize <= a.size(); ++i) out.push_back(entry(a, i));
  return out;
}
// The 184 bytes pcscd writes for a reader, padding included (§3.1).
inline Bytes expected_slot(std::string_view name, uint32_t counter, uint32_t state, int32_t sharing,
                           std::span<const uint8_t> atr, uint32_t protocol) {
  return Le()
      .text(name, pcsclite::kReaderNameField)
      .u32(counter)
      .u32(state)
      .i32(sharing)
      .padded(atr, pcsclite::kAtrField)
      .zeros(3)
      .u32(static_cast<uint32_t>(atr.size()))
      .u32(protocol);
}
// The event signal / STOP reply {timeOut 0, rv}.
inline Bytes signal_bytes(uint32_t rv) { return Le().u32(0).u32(rv); }

class PcscClient {
 public:
  PcscClient(ShimCore& core, RecordingEffects& fx, ClientId id, const TimePoint& now)
      : core_(&core), fx_(&fx), id_(id), now_(&now) {}

  ClientId id() const { return id_; }
  uint32_t context() const { return context_; }  // from the last successful ESTABLISH
  int32_t minor() const { return minor_; }       // from the last successful CMD_VERSION

  // ---- the connection ----
  void open() {
    fx_->client_opened(id_);
    core_->client_opened(id_, *now_);
  }
  // The client goes away (EOF); nothing may reach it afterwards.
  void close() {
    fx_->client_gone(id_);
    core_->client_closed(id_, *now_);
  }
  bool closed_by_shim() const { return fx_->closed_by_core(id_); }

  // ---- raw bytes ----
  void send_raw(std::span<const uint8_t> b) {
    if (!closed_by_shim()) core_->client_data(id_, b, *now_);
  }
  void send_header(uint32_t size, uint32_t command) { send_raw(pcsclite::header(size, command)); }
  // Header, struct, trailing data: three writes, as libpcsclite does.
  void send(uint32_t command, std::span<const uint8_t> body, std::span<const uint8_t> trailing = {}) {
    send_header(static_cast<uint32_t>(body.size()), command);
    if (!body.empty()) send_raw(body);
    if (!trailing.empty()) send_raw(trailing);
  }
  void send_cmd(uint32_t command) { send(command, {}); }  // the header-only commands

  std::size_t available() const { return fx_->available(id_); }
  bool nothing_pending() const { return available() == 0; }
  // Exactly |n| bytes (a failure, and zeros for the missing ones, if fewer arrived).
  Bytes take(std::size_t n) {
    Bytes b = fx_->consume(id_, n);
    if (b.size() < n) {
      ADD_FAILURE() << "client " << id_ << ": wanted " << n << " reply bytes, got " << b.size();
      b.resize(n, 0);
    }
    return b;
  }
  Bytes take_all() { return fx_->consume(id_, available()); }

  // ---- requests ----
  void send_version(int32_t major, int32_t minor) {
    asked_minor_ = minor;
    send(cmd::kVersion, pcsclite::version(major, minor));
  }
  void send_establish(uint32_t scope) { send(cmd::kEstablish, pcsclite::establish(scope)); }
  void send_release(uint32_t ctx) { send(cmd::kRelease, pcsclite::release(ctx)); }
  void send_connect(uint32_t ctx, std::string_view reader, uint32_t share, uint32_t protocols) {
    send(cmd::kConnect, pcsclite::connect(ctx, reader, share, protocols));
  }
  // On this connection's context.
  void send_connect(std::string_view reader, uint32_t share = pcsc::kShareShared, uint32_t protocols = pcsc::kT0T1) {
    send_connect(context_, reader, share, protocols);
  }
  void send_reconnect(uint32_t card, uint32_t share, uint32_t protocols, uint32_t init, uint32_t active_in = 0) {
    send(cmd::kReconnect, pcsclite::reconnect(card, share, protocols, init, active_in));
  }
  void send_disconnect(uint32_t card, uint32_t disposition) {
    send(cmd::kDisconnect, pcsclite::disconnect(card, disposition));
  }
  void send_begin(uint32_t card) { send(cmd::kBegin, pcsclite::begin(card)); }
  void send_end(uint32_t card, uint32_t disposition) { send(cmd::kEnd, pcsclite::end(card, disposition)); }
  // SCardTransmit with pioRecvPci == NULL; returns the fixed fields sent.
  pcsclite::TransmitFields send_transmit(uint32_t card, std::span<const uint8_t> apdu, uint32_t recv_length = 258,
                                         uint32_t send_protocol = pcsc::kT1) {
    pcsclite::TransmitFields t;
    t.card = card;
    t.send_protocol = send_protocol;
    t.send_length = static_cast<uint32_t>(apdu.size());
    t.recv_length = recv_length;
    send(cmd::kTransmit, pcsclite::transmit(t), apdu);
    return t;
  }
  void send_control(uint32_t card, uint32_t code, std::span<const uint8_t> data, uint32_t recv_length) {
    send(cmd::kControl, pcsclite::control(card, code, static_cast<uint32_t>(data.size()), recv_length), data);
  }
  void send_status(uint32_t card) { send(cmd::kStatus, pcsclite::status(card)); }
  void send_cancel(uint32_t ctx) { send(cmd::kCancel, pcsclite::cancel(ctx)); }
  void send_get_attrib(uint32_t card, uint32_t attr) { send(cmd::kGetAttrib, pcsclite::get_attrib(card, attr)); }
  void send_set_attrib(uint32_t card, uint32_t attr, std::span<const uint8_t> value) {
    send(cmd::kSetAttrib, pcsclite::set_attrib(card, attr, value));
  }

  // ---- replies ----
  // A successful answer makes the version asked the connection's (minor()).
  VersionReply version_reply() {
    Bytes b = reply(pcsclite::kVersionSize, "VERSION");
    VersionReply r{le32s(b, 0), le32s(b, 4), le32(b, 8)};
    if (r.rv == pcsc::kSuccess) minor_ = asked_minor_;
    return r;
  }
  // A successful answer makes its hContext the connection's (context()).
  EstablishReply establish_reply() {
    Bytes b = reply(pcsclite::kEstablishSize, "ESTABLISH_CONTEXT");
    EstablishReply r{le32(b, 0), le32(b, 4), le32(b, 8)};
    if (r.rv == pcsc::kSuccess) context_ = r.context;
    return r;
  }
  PairReply release_reply() { return pair_reply("RELEASE_CONTEXT"); }
  PairReply cancel_reply() { return pair_reply("CANCEL"); }
  PairReply begin_reply() { return pair_reply("BEGIN_TRANSACTION"); }
  PairReply status_reply() { return pair_reply("STATUS"); }
  DispositionReply disconnect_reply() { return disposition_reply("DISCONNECT"); }
  DispositionReply end_reply() { return disposition_reply("END_TRANSACTION"); }
  ConnectReply connect_reply() {
    Bytes b = reply(pcsclite::kConnectSize, "CONNECT");
    ConnectReply r;
    r.context = le32(b, 0);
    std::size_t n = 0;
    while (n < pcsclite::kReaderNameField && b[4 + n] != 0) ++n;
    r.reader.assign(reinterpret_cast<const char*>(b.data() + 4), n);
    r.share = le32(b, 132);
    r.protocols = le32(b, 136);
    r.card = le32(b, 140);
    r.active_protocol = le32(b, 144);
    r.rv = le32(b, 148);
    if (r.rv == pcsc::kSuccess) readers_[r.card] = r.reader;  // the library keeps it for SCardStatus
    return r;
  }
  ReconnectReply reconnect_reply() {
    Bytes b = reply(pcsclite::kReconnectSize, "RECONNECT");
    return {le32(b, 0), le32(b, 4), le32(b, 8), le32(b, 12), le32(b, 16), le32(b, 20)};
  }
  // The struct, then recv_length bytes only if rv == 0 (as the client reads it).
  TransmitReply transmit_reply() {
    Bytes b = take(pcsclite::kTransmitSize);
    TransmitReply r{le32(b, 0), le32(b, 4), le32(b, 8), le32(b, 12), le32(b, 16), le32(b, 20), le32(b, 24),
                    le32(b, 28), {}};
    if (r.rv == pcsc::kSuccess) r.data = take(r.recv_length);
    expect_end_of_reply("TRANSMIT");
    return r;
  }
  // The struct, then bytes_returned bytes only if rv == 0.
  ControlReply control_reply() {
    Bytes b = take(pcsclite::kControlSize);
    ControlReply r{le32(b, 0), le32(b, 4), le32(b, 8), le32(b, 12), le32(b, 16), le32(b, 20), {}};
    if (r.rv == pcsc::kSuccess) r.data = take(r.bytes_returned);
    expect_end_of_reply("CONTROL");
    return r;
  }
  GetSetReply get_attrib_reply() { return getset_reply("GET_ATTRIB"); }
  GetSetReply set_attrib_reply() { return getset_reply("SET_ATTRIB"); }
  // The event signal or the STOP reply: {timeOut, rv}.
  PairReply signal() { return pair_reply("event signal"); }

  // ---- whole local exchanges ----
  VersionReply version(int32_t major, int32_t minor) {
    send_version(major, minor);
    return version_reply();
  }
  EstablishReply establish(uint32_t scope = pcsc::kScopeSystem) {
    send_establish(scope);
    return establish_reply();
  }
  // SCARD_RELEASE_CONTEXT answered locally; returns rv (checks the echoed hContext).
  uint32_t release(uint32_t ctx) {
    send_release(ctx);
    return echoed_rv(release_reply(), ctx, "RELEASE_CONTEXT");
  }
  // SCARD_CANCEL; returns rv (checks the echoed hContext).
  uint32_t cancel(uint32_t ctx) {
    send_cancel(ctx);
    return echoed_rv(cancel_reply(), ctx, "CANCEL");
  }
  // SCARD_STATUS alone (the daemon's part of SCardStatus); returns rv (checks the echo).
  uint32_t status(uint32_t card) {
    send_status(card);
    return echoed_rv(status_reply(), card, "STATUS");
  }
  // SCardStatus as libpcsclite 1.9.9 does it: CMD_GET_READERS_STATE, look the handle's
  // reader up by name (missing: SCARD_E_READER_UNAVAILABLE and SCARD_STATUS is not sent),
  // then SCARD_STATUS. Returns rv.
  uint32_t scard_status(uint32_t card) {
    const Bytes array = readers_state();
    const auto known = readers_.find(card);
    bool found = false;
    for (std::size_t i = 0; i < pcsclite::kSlots && known != readers_.end(); ++i) {
      if (entry(array, i).name == known->second) found = true;
    }
    if (!found) return pcsc::kEReaderUnavailable;
    return status(card);
  }
  // CMD_GET_READERS_STATE (protocol 4.4/4.5): the 2944-byte array.
  Bytes readers_state() {
    send_cmd(cmd::kGetReadersState);
    return reply(kArraySize, "CMD_GET_READERS_STATE");
  }
  // CMD_WAIT_READER_STATE_CHANGE (4.4/4.5): registers for a change and gets the array at once.
  Bytes wait_for_change() {
    send_cmd(cmd::kWait);
    return reply(kArraySize, "CMD_WAIT_READER_STATE_CHANGE");
  }
  // CMD_GET_READERS_STATE_SIZE (4.6): the slot count.
  int32_t state_size() {
    send_cmd(cmd::kStateSize);
    return le32s(reply(4, "CMD_GET_READERS_STATE_SIZE"), 0);
  }
  // CMD_GET_READERS_STATE_ARRAY (4.6): the array; a held event signal may follow it.
  Bytes state_array() {
    send_cmd(cmd::kStateArray);
    return take(kArraySize);
  }
  // CMD_GET_READER_EVENTS (4.5+): {readerEvents, rv}.
  PairReply reader_events() {
    send_cmd(cmd::kGetReaderEvents);
    return pair_reply("CMD_GET_READER_EVENTS");
  }

 private:
  // Exactly the |n| bytes of a reply, and nothing after them.
  Bytes reply(std::size_t n, const char* what) {
    Bytes b = take(n);
    expect_end_of_reply(what);
    return b;
  }
  void expect_end_of_reply(const char* what) {
    EXPECT_EQ(available(), 0u) << what << ": bytes after the reply (client " << id_ << "): the stream is out of step";
  }
  // The rv of an 8-byte reply whose first field echoes |sent|.
  static uint32_t echoed_rv(const PairReply& r, uint32_t sent, const char* what) {
    EXPECT_EQ(r.first, sent) << what << ": the handle is echoed";
    return r.rv;
  }
  PairReply pair_reply(const char* what) {
    Bytes b = reply(8, what);
    return {le32(b, 0), le32(b, 4)};
  }
  DispositionReply disposition_reply(const char* what) {
    Bytes b = reply(12, what);
    return {le32(b, 0), le32(b, 4), le32(b, 8)};
  }
  GetSetReply getset_reply(const char* what) {
    Bytes b = reply(pcsclite::kGetSetSize, what);
    return {le32(b, 0), le32(b, 4), slice(b, 8, pcsclite::kAttrField), le32(b, 272), le32(b, 276)};
  }

  ShimCore* core_;
  RecordingEffects* fx_;
  ClientId id_;
  const TimePoint* now_;
  uint32_t context_ = 0;
  int32_t minor_ = 0;
  int32_t asked_minor_ = 0;
  std::map<uint32_t, std::string> readers_;  // hCard -> reader name, from CONNECT replies
};

}  // namespace cardbridge::shim::kit
