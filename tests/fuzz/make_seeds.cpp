// Writes the seed corpora of the fuzz targets: a few valid inputs each.
//
//   cardbridge-fuzz-seeds OUTDIR    -> OUTDIR/<target>/<name>
//
// The checked-in tests/fuzz/corpus/ was produced by this program; rerun it after a change
// of a target's input format (see tests/fuzz/run-fuzzers --regen-seeds).
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/framing.hpp"
#include "cardbridge/protocol/version.hpp"
#include "fuzz_util.hpp"
#include "kit/bytes.hpp"
#include "kit/libpcsclite.hpp"
#include "shim_script.hpp"

namespace fs = std::filesystem;
namespace pr = cardbridge::protocol;
namespace pcsclite = cardbridge::shim::kit::pcsclite;
namespace cmd = cardbridge::shim::kit::pcsclite::cmd;
using cardbridge::shim::kit::Le;
namespace script = cardbridge::fuzz::shim_script;
using cardbridge::fuzz::ByteWriter;
using Bytes = std::vector<uint8_t>;

namespace {

fs::path g_out;

void write(const std::string& target, const std::string& name, const Bytes& data) {
  const fs::path dir = g_out / target;
  fs::create_directories(dir);
  std::ofstream f(dir / name, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  if (!f) {
    std::cerr << "cannot write " << (dir / name) << "\n";
    std::exit(1);
  }
}

// ---- protocol messages ----------------------------------------------------------------

std::vector<std::pair<std::string, pr::Message>> sample_messages() {
  std::vector<std::pair<std::string, pr::Message>> out;
  pr::Hello h;
  h.version_major = pr::kVersionMajor;
  h.version_minor = pr::kVersionMinor;
  h.capabilities = pr::caps::kAll;
  h.role = pr::Role::kDesk;
  h.software = "cardbridge-desk 0.1.0";
  h.peer_name = "thin-client";
  h.instance = 0x1122334455667788ull;
  out.emplace_back("hello", pr::Message{0, h});
  pr::ReaderSnapshot s{7,
                       {pr::ReaderInfo{"Virtual PCD 00 00", 0x20, 1, {0x3B, 0x80, 0x80, 0x01, 0x01}},
                        pr::ReaderInfo{"Virtual PCD 00 01", 0x10, 0, {}}}};
  out.emplace_back("snapshot", pr::Message{0, s});
  out.emplace_back("error", pr::Message{0, pr::Error{pr::ErrorCode::kVersion, "unsupported protocol version"}});
  pr::Request connect;
  connect.op = pr::Op::kConnect;
  connect.context = pr::ContextId{1};
  connect.reader = "Virtual PCD 00 00";
  connect.share_mode = 2;
  connect.protocols = 3;
  out.emplace_back("request-connect", pr::Message{1, connect});
  pr::Request transmit;
  transmit.op = pr::Op::kTransmit;
  transmit.context = pr::ContextId{1};
  transmit.handle = pr::DeskHandle{5};
  transmit.protocols = 2;
  transmit.data = {0x00, 0xA4, 0x04, 0x00, 0x02, 0x3F, 0x00};
  transmit.recv_length = 258;
  transmit.flags = pr::request_flags::kBeginFirst | pr::request_flags::kPrefetchGetResponse;
  out.emplace_back("request-transmit", pr::Message{2, transmit});
  pr::Reply reply;
  reply.rv = 0;
  reply.handle = pr::DeskHandle{5};
  reply.protocol = 2;
  reply.data = {0x6F, 0x10, 0x90, 0x00};
  reply.state = 0x00010034;
  reply.atr = {0x3B, 0x80, 0x80, 0x01, 0x01};
  reply.prefetched = {pr::Prefetched{{0x00, 0xC0, 0x00, 0x00, 0x10}, {0x01, 0x02, 0x90, 0x00}}};
  out.emplace_back("reply", pr::Message{2, reply});
  return out;
}

void frame_decoder_seeds() {
  Bytes stream;
  for (const auto& [name, m] : sample_messages()) {
    auto f = pr::encode_frame(m);
    stream.insert(stream.end(), f.begin(), f.end());
  }
  for (uint16_t chunk : {uint16_t{1}, uint16_t{7}, uint16_t{1600}, uint16_t{4095}}) {
    ByteWriter w;
    w.u8(0);  // default limit
    for (std::size_t pos = 0; pos < stream.size(); pos += chunk) {
      const std::size_t n = std::min<std::size_t>(chunk, stream.size() - pos);
      w.u16(static_cast<uint16_t>(n)).bytes(std::span(stream).subspan(pos, n));
    }
    write("frame_decoder", "stream-chunk" + std::to_string(chunk), w.data());
  }
  // A small limit, and a frame just above it after a good one.
  ByteWriter small;
  Bytes ok = pr::frame(Bytes(16, 0xAA));
  Bytes too_big = {0x00, 0x00, 0x00, 0x11};
  small.u8(1).u16(static_cast<uint16_t>(ok.size())).bytes(ok).u16(4).bytes(too_big);
  write("frame_decoder", "limit-16", small.data());
}

void codec_seeds() {
  for (const auto& [name, m] : sample_messages()) write("codec_decode", name, pr::encode(m));
}

// ---- pcscd wire (requests as libpcsclite 1.9.9 writes them: tests/unit/shim/kit) ----------

Bytes request(uint32_t c, const Bytes& body, const Bytes& trailing = {}) { return pcsclite::request(c, body, trailing); }

constexpr uint32_t kContext = 0x5a80a339;
constexpr uint32_t kCard = 0x4953d442;

// A 1.9.9 client's whole session (EstablishContext .. ReleaseContext).
Bytes client_session() {
  Bytes s;
  auto add = [&s](const Bytes& b) { s.insert(s.end(), b.begin(), b.end()); };
  add(request(cmd::kVersion, pcsclite::version(4, 4)));
  add(request(cmd::kEstablish, pcsclite::establish(2)));
  add(request(cmd::kGetReadersState, {}));
  add(request(cmd::kWait, {}));
  add(request(cmd::kStopWait, {}));
  add(request(cmd::kConnect, pcsclite::connect(kContext, "Virtual PCD 00 00", 2, 3)));
  add(request(cmd::kBegin, pcsclite::begin(kCard)));
  Bytes apdu = {0x00, 0xA4, 0x04, 0x00, 0x02, 0x3F, 0x00};
  add(request(cmd::kTransmit, pcsclite::transmit({kCard, 2, 16, 7, 3, 16, 300}), apdu));
  add(request(cmd::kControl, pcsclite::control(kCard, 0x42000D48, 1, 100), Bytes{0x02}));
  add(request(cmd::kGetAttrib, pcsclite::get_attrib(kCard, 0x00090303)));
  add(request(cmd::kSetAttrib, pcsclite::set_attrib(kCard, 0x00090303, Bytes{0x00})));
  add(request(cmd::kStatus, pcsclite::status(kCard)));
  add(request(cmd::kEnd, pcsclite::end(kCard, 0)));
  add(request(cmd::kReconnect, pcsclite::reconnect(kCard, 2, 3, 1, 2)));
  add(request(cmd::kDisconnect, pcsclite::disconnect(kCard, 2)));
  add(request(cmd::kRelease, pcsclite::release(kContext)));
  return s;
}

void pcscd_wire_seeds() {
  const Bytes session = client_session();
  for (uint8_t chunk : {uint8_t{0}, uint8_t{1}, uint8_t{8}, uint8_t{13}}) {
    ByteWriter w;
    w.u8(chunk).bytes(session);
    write("pcscd_wire", "session-chunk" + std::to_string(chunk), w.data());
  }
  ByteWriter cancel;
  cancel.u8(0).bytes(request(cmd::kCancel, pcsclite::cancel(kContext)));
  write("pcscd_wire", "cancel", cancel.data());
  ByteWriter v26;
  v26.u8(3)
      .bytes(request(cmd::kVersion, pcsclite::version(4, 6)))
      .bytes(request(cmd::kGetReaderEvents, {}))
      .bytes(request(cmd::kWait, {}))
      .bytes(request(cmd::kStateSize, {}))
      .bytes(request(cmd::kStateArray, {}));
  write("pcscd_wire", "protocol-4.6", v26.data());
}

// ---- ShimCore scripts -------------------------------------------------------------------

class Script {
 public:
  explicit Script(uint8_t flags) { w_.u8(flags); }
  Script& open() { return act(script::kOpen); }
  Script& close(uint8_t client) {
    act(script::kClose).w_.u8(client);
    return *this;
  }
  Script& req(uint8_t client, uint32_t command, uint8_t fix, uint8_t pick, const Bytes& body, const Bytes& trailing = {}) {
    uint8_t index = 0;
    while (script::kRequestCommands[index] != command) ++index;
    act(script::kRequest).w_.u8(client).u8(index).u8(fix).u8(pick);
    w_.u16(static_cast<uint16_t>(body.size())).bytes(body);
    w_.u16(static_cast<uint16_t>(trailing.size())).bytes(trailing);
    return *this;
  }
  // The usual patches: header size right, live handle, known reader, consistent lengths.
  Script& call(uint8_t client, uint32_t command, const Bytes& body, const Bytes& trailing = {}, uint8_t pick = 0) {
    return req(client, command,
               script::kFixHeader | script::kFixHandle | script::kFixReader | script::kFixVersion | script::kFixLength,
               pick, body, trailing);
  }
  Script& reply(uint8_t pending, uint8_t rv_pick, uint32_t handle, uint32_t protocol, uint32_t state,
                const Bytes& data = {}, const Bytes& atr = {}) {
    act(script::kReply).w_.u8(pending).u8(rv_pick).u32(handle).u32(protocol).u32(state).u32(0);
    w_.u16(static_cast<uint16_t>(data.size())).bytes(data).u8(static_cast<uint8_t>(atr.size())).bytes(atr).u8(0);
    return *this;
  }
  Script& snapshot(std::vector<std::tuple<uint8_t, uint16_t, uint16_t, Bytes>> readers) {
    act(script::kSnapshot).w_.u8(static_cast<uint8_t>(readers.size()));
    for (const auto& [name, state, events, atr] : readers) {
      w_.u8(name).u16(state).u16(events).u8(static_cast<uint8_t>(atr.size())).bytes(atr);
    }
    return *this;
  }
  Script& hello(uint8_t flags, uint32_t caps, uint8_t instance) {
    act(script::kHello).w_.u8(flags).u32(caps).u8(instance);
    return *this;
  }
  Script& desk_down() { return act(script::kDeskDown); }
  Script& desk_up() { return act(script::kDeskUp); }
  Script& tick(uint16_t ms) {
    act(script::kTick).w_.u16(ms);
    return *this;
  }
  Script& desk_payload(const Bytes& p) {
    act(script::kDeskPayload).w_.u16(static_cast<uint16_t>(p.size())).bytes(p);
    return *this;
  }
  const Bytes& data() const { return w_.data(); }

 private:
  Script& act(uint8_t a) {
    w_.u8(a);
    return *this;
  }
  ByteWriter w_;
};

const Bytes kAtr = {0x3B, 0x80, 0x80, 0x01, 0x01};

// VERSION + ESTABLISH for client |c| (minor 4 + pick % 3).
Script& hello_client(Script& s, uint8_t c, uint8_t minor_pick = 0) {
  return s.open()
      .call(c, 0x11, pcsclite::version(4, 4), {}, minor_pick)
      .call(c, 0x01, pcsclite::establish(2));
}

// CONNECT with no context and no reader (the script patches both in).
Bytes connect_body(uint32_t share = 2) { return pcsclite::connect(0, "", share, 3); }

void shim_core_seeds() {
  // 1. A whole card session: connect, transaction, transmit, control, attributes, status.
  {
    Script s(script::kFlagDeskReady);
    hello_client(s, 0);
    s.call(0, 0x12, {});
    s.call(0, 0x04, connect_body(), {}, 0).reply(0, 0, 5, 2, 0x00010034, {}, kAtr);
    s.call(0, 0x07, pcsclite::begin(0)).reply(0, 0, 0, 0, 0);
    s.call(0, 0x09, pcsclite::transmit({0, 2, 16, 0, 3, 16, 300}), {0x00, 0xA4, 0x04, 0x00, 0x02, 0x3F, 0x00})
        .reply(0, 0, 0, 2, 0, {0x6F, 0x00, 0x90, 0x00});
    s.call(0, 0x09, pcsclite::transmit({0, 2, 16, 0, 3, 16, 2}), {0x00, 0xB0, 0x00, 0x00, 0x00})
        .reply(0, 0, 0, 2, 0, Bytes(40, 0x11));  // longer than the client's buffer
    s.call(0, 0x0A, pcsclite::control(0, 0x42000D48, 0, 100), {}).reply(0, 0, 0, 0, 0, {0x01, 0x02});
    // GET/SET_ATTRIB of the ATR, rv left 0.
    s.call(0, 0x0F, Le().u32(0).u32(0x00090303).zeros(264).u32(264).u32(0)).reply(0, 0, 0, 0, 0, kAtr);
    s.call(0, 0x10, Le().u32(0).u32(0x00090303).zeros(264).u32(1).u32(0)).reply(0, 0, 0, 0, 0);
    s.call(0, 0x0B, pcsclite::status(0));
    s.call(0, 0x08, pcsclite::end(0, 1)).reply(0, 0, 0, 0, 0);
    s.call(0, 0x05, pcsclite::reconnect(0, 2, 3, 1, 2)).reply(0, 0, 0, 2, 0x00010034);
    s.call(0, 0x06, pcsclite::disconnect(0, 0)).reply(0, 0, 0, 0, 0);
    s.call(0, 0x02, pcsclite::release(0));
    write("shim_core", "card-session", s.data());
  }
  // 2. Event wait, card removal signal, cancel from a second connection.
  {
    Script s(script::kFlagDeskReady);
    hello_client(s, 0);
    s.call(0, 0x13, {});
    s.snapshot({{0, 0x10, 2, {}}, {1, 0x10, 0, {}}});  // card removed: signal
    s.call(0, 0x14, {});
    s.call(0, 0x13, {});
    s.open().call(1, 0x0D, pcsclite::cancel(0));
    s.close(1);
    s.call(0, 0x15, {});
    write("shim_core", "events-and-cancel", s.data());
  }
  // 3. Protocol 4.6 client: size + array, with a signal held back.
  {
    Script s(script::kFlagDeskReady);
    hello_client(s, 0, 2);
    s.call(0, 0x13, {});
    s.snapshot({{0, 0x20, 3, kAtr}});
    s.call(0, 0x16, {}).call(0, 0x17, {});
    s.call(0, 0x15, {});
    write("shim_core", "protocol-4.6", s.data());
  }
  // 4. Desk handshake by hand, then a desk restart while a call is in flight.
  {
    Script s(0);
    s.desk_up().tick(600).hello(1, static_cast<uint32_t>(pr::caps::kAll), 1);
    s.snapshot({{0, 0x20, 1, kAtr}, {2, 0x10, 0, {}}});
    hello_client(s, 0);
    s.call(0, 0x04, connect_body(1), {}, 0).reply(0, 0, 9, 1, 0);
    s.call(0, 0x09, pcsclite::transmit({0, 1, 16, 0, 3, 16, 258}), {0x00, 0x20, 0x00, 0x81, 0x02, 0x31, 0x32});
    s.hello(1, 0, 2);  // another instance: the desk restarted
    s.call(0, 0x0B, pcsclite::status(0));
    s.desk_down().desk_up().hello(1, 0, 3);
    s.call(0, 0x06, pcsclite::disconnect(0, 0));
    write("shim_core", "desk-restart", s.data());
  }
  // 5. Baseline mode (one round trip per call), exclusive connect, two clients.
  {
    Script s(script::kFlagDeskReady | script::kFlagOneRoundTrip);
    hello_client(s, 0);
    s.reply(0, 0, 0, 0, 0);
    s.call(0, 0x12, {}).reply(0, 0, 0, 0, 0);
    hello_client(s, 1);
    s.reply(0, 0, 0, 0, 0);
    s.call(0, 0x04, connect_body(1), {}, 1).reply(0, 0, 7, 2, 0);
    s.call(1, 0x04, connect_body(2), {}, 1).reply(0, 2, 0, 0, 0);
    s.call(0, 0x0B, pcsclite::status(0)).reply(0, 0, 0, 0, 0);
    s.close(0);
    write("shim_core", "baseline-two-clients", s.data());
  }
  // 6. Hostile client: a handle it does not own, a bad size, an unknown command.
  {
    Script s(script::kFlagDeskReady);
    hello_client(s, 0);
    s.req(0, 0x09, 0, 0, pcsclite::transmit({0x1234, 2, 16, 0, 3, 16, 258}));
    hello_client(s, 1);
    s.req(1, 0x01, 0, 0, Bytes(9, 0));
    hello_client(s, 2);
    s.req(2, 0x0C, script::kFixHeader, 0, {});
    s.desk_payload({0xFF, 0xFF});
    write("shim_core", "hostile", s.data());
  }
}

}  // namespace

// ---- desk_core: scripts of desk_core_fuzz.cpp's action language --------------------------

// A server request (desk_core_fuzz.cpp Harness::request(), field by field).
void desk_request(ByteWriter& w, uint8_t op, uint8_t flags, const Bytes& data, uint16_t recv_length) {
  w.u8(0);                        // action: a request
  w.u8(static_cast<uint8_t>(op - 1));
  w.u8(0);                        // context 1
  w.u8(0);                        // the most recent desk handle
  w.u8(1);                        // the first reader's name
  w.u8(1);                        // share mode 2 (shared)
  w.u8(3);                        // protocols T=0|T=1
  w.u8(0);                        // disposition
  w.u8(1);                        // control code: feature request
  w.u8(static_cast<uint8_t>(data.size())).bytes(data);
  w.u16(recv_length);
  w.u8(flags);
  w.u8(0);                        // recv protocol
  w.u8(0);                        // no "after" ids
  w.u8(0);                        // a fresh id
}
// The edge completes the oldest pending call with success, with the fields that call's
// result reads (desk_core_fuzz.cpp Harness::result_for()).
void desk_done(ByteWriter& w) { w.u8(3).u8(0).u8(0); }  // Establish, Begin, End, Disconnect, Release
void desk_done_connect(ByteWriter& w) { desk_done(w); w.u8(1); }                  // protocol T=1
void desk_done_status(ByteWriter& w) { desk_done(w); w.u8(0).u32(0x34).u8(0); }  // reader 0, no ATR
void desk_done_transmit(ByteWriter& w, const Bytes& data, uint8_t sw) {  // sw: 0 = 90 00, 1 = 61 10
  desk_done(w);
  w.u8(static_cast<uint8_t>(data.size())).bytes(data).u8(sw);
}

void desk_core_seeds() {
  const Bytes get_challenge = {0x00, 0x84, 0x00, 0x00, 0x08};
  const Bytes select = {0x00, 0xA4, 0x04, 0x00, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x03, 0x10, 0x10};
  const Bytes random8 = {1, 2, 3, 4, 5, 6, 7, 8};
  auto up = [](ByteWriter& w) { w.u8(6).u8(9).u8(1).u8(1).u8(1); };  // flags; transport up, hello
  auto connect = [](ByteWriter& w) {
    desk_request(w, 3, 0, {}, 0);
    desk_done(w);          // Establish
    desk_done_connect(w);  // Connect
    desk_done_status(w);   // the Status after it
  };
  {
    ByteWriter w;
    up(w);
    w.u8(7).u8(2).u16(0x22).u16(1).u8(11).bytes(Bytes(11, 0x3B)).u16(0x10).u16(0).u8(0);  // readers
    connect(w);
    desk_request(w, 8, 0, get_challenge, 258);  // Transmit
    desk_done_transmit(w, random8, 0);
    desk_request(w, 8, 2, select, 258);  // Transmit, prefetch GET RESPONSE
    desk_done_transmit(w, {}, 1);
    desk_done_transmit(w, Bytes(16, 0x6F), 0);
    desk_request(w, 5, 0, {}, 0);  // Disconnect
    desk_done(w);
    desk_request(w, 2, 0, {}, 0);  // ReleaseContext
    desk_done(w);
    write("desk_core", "login", w.data());
  }
  {
    ByteWriter w;
    up(w);
    connect(w);
    desk_request(w, 8, 1, get_challenge, 258);  // Transmit with a deferred Begin
    desk_done(w);
    desk_done_transmit(w, random8, 0);
    desk_request(w, 7, 0, {}, 0);   // EndTransaction
    desk_request(w, 13, 0, {}, 0);  // Ping
    w.u8(8).u16(6000);              // time passes
    w.u8(9).u8(0);                  // transport down
    desk_done(w);
    w.u8(11).u8(0x5D);              // shutdown
    write("desk_core", "transaction_then_link_lost", w.data());
  }
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " OUTDIR\n";
    return 2;
  }
  g_out = argv[1];
  frame_decoder_seeds();
  codec_seeds();
  pcscd_wire_seeds();
  shim_core_seeds();
  desk_core_seeds();
  return 0;
}
