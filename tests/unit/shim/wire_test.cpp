// pcsc-lite client <-> pcscd IPC codec (server-shim/pcscd_wire).
//
// Requests are written out byte by byte as libpcsclite 1.9.9 sends them on x86-64
// (docs: pcsc-protocol.md §2), not built with the structs under test, so that a layout
// mistake in wire.hpp cannot hide itself. The header and the body are fed separately, as
// the real client does two send() calls ([traced] in §2.1).
#include "cardbridge/pcscd_wire/wire.hpp"

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "cardbridge/support/hex.hpp"
#include "kit/bytes.hpp"

namespace cardbridge::shim::wire {
namespace {

using Bytes = kit::Bytes;
using kit::Le;

Bytes header(uint32_t size, uint32_t command) { return Le().u32(size).u32(command); }

// Feeds |hdr| then |body| (then |trailing|), checking that nothing is decoded early.
DecodedRequest decode_two_sends(const Bytes& hdr, const Bytes& body, const Bytes& trailing = {}) {
  RequestDecoder d;
  d.feed(hdr);
  EXPECT_FALSE(d.next().has_value()) << "decoded from the header alone";
  d.feed(body);
  if (!trailing.empty()) {
    EXPECT_FALSE(d.next().has_value()) << "decoded before the trailing data arrived";
    d.feed(trailing);
  }
  auto r = d.next();
  EXPECT_TRUE(r.has_value());
  if (!r) return DecodedRequest{Command::kVersion, HeaderOnly{Command::kVersion}};
  EXPECT_TRUE(r->ok()) << r->error().what;
  EXPECT_EQ(d.buffered(), 0u);
  EXPECT_FALSE(d.next().has_value());
  if (!r->ok()) return DecodedRequest{Command::kVersion, HeaderOnly{Command::kVersion}};
  return std::move(*r).value();
}

// Feeds |stream| whole; expects a (sticky) error.
void expect_error(const Bytes& stream, const std::string& what_contains = "") {
  RequestDecoder d;
  d.feed(stream);
  auto r = d.next();
  ASSERT_TRUE(r.has_value()) << "no verdict for " << to_hex(stream);
  ASSERT_FALSE(r->ok()) << "accepted " << to_hex(stream);
  EXPECT_FALSE(r->error().what.empty());
  if (!what_contains.empty()) {
    EXPECT_NE(r->error().what.find(what_contains), std::string::npos) << r->error().what;
  }
  // Sticky: more bytes, even a valid request, do not revive the decoder.
  d.feed(Le().hex("0c000000 11000000 04000000 04000000 00000000"));
  for (int i = 0; i < 3; ++i) {
    auto again = d.next();
    ASSERT_TRUE(again.has_value());
    EXPECT_FALSE(again->ok());
  }
}

constexpr uint32_t kTracedContext = 0x5a80a339;  // "39a3805a" in the trace
constexpr uint32_t kTracedCard = 0x4953d442;
constexpr char kReader[] = "Virtual PCD 00 00";

// ---- one test per command -------------------------------------------------------------

TEST(WireRequest, VersionTraced) {
  auto r = decode_two_sends(Le().hex("0c000000 11000000"), Le().hex("04000000 04000000 00000000"));
  EXPECT_EQ(r.command, Command::kVersion);
  const auto& v = std::get<VersionStruct>(r.body);
  EXPECT_EQ(v.major, 4);
  EXPECT_EQ(v.minor, 4);
  EXPECT_EQ(v.rv, 0u);
}

TEST(WireRequest, EstablishContext) {
  auto r = decode_two_sends(header(12, 0x01), Le().u32(scard::kScopeSystem).u32(0).u32(0));
  EXPECT_EQ(r.command, Command::kEstablishContext);
  const auto& e = std::get<EstablishStruct>(r.body);
  EXPECT_EQ(e.scope, 2u);
  EXPECT_EQ(e.context, 0u);
}

TEST(WireRequest, ReleaseContext) {
  auto r = decode_two_sends(Le().hex("08000000 02000000"), Le().hex("39a3805a 00000000"));
  EXPECT_EQ(r.command, Command::kReleaseContext);
  EXPECT_EQ(std::get<ReleaseStruct>(r.body).context, kTracedContext);
}

TEST(WireRequest, ConnectTraced) {
  Bytes body = Le().u32(kTracedContext).text(kReader, 128).u32(2).u32(3).u32(0).u32(0).u32(0);
  ASSERT_EQ(body.size(), 152u);
  auto r = decode_two_sends(Le().hex("98000000 04000000"), body);
  EXPECT_EQ(r.command, Command::kConnect);
  const auto& c = std::get<ConnectStruct>(r.body);
  EXPECT_EQ(c.context, kTracedContext);
  EXPECT_EQ(read_name(c.reader), kReader);
  EXPECT_EQ(c.share_mode, scard::kShareShared);
  EXPECT_EQ(c.preferred_protocols, scard::kProtocolT0 | scard::kProtocolT1);
  EXPECT_EQ(c.card, 0);
}

TEST(WireRequest, ConnectReaderByte127ForcedToNul) {
  Bytes body = Le().u32(1).text(std::string(128, 'A'), 128).u32(1).u32(2).u32(0).u32(0).u32(0);
  auto r = decode_two_sends(header(152, 0x04), body);
  const auto& c = std::get<ConnectStruct>(r.body);
  EXPECT_EQ(c.reader[127], '\0');
  EXPECT_EQ(c.reader[126], 'A');
  EXPECT_EQ(read_name(c.reader), std::string(127, 'A'));
  EXPECT_EQ(c.share_mode, 1u);  // the fields after the name are untouched
  EXPECT_EQ(c.preferred_protocols, 2u);
}

TEST(WireRequest, Reconnect) {
  auto r = decode_two_sends(Le().hex("18000000 05000000"),
                            Le().u32(kTracedCard).u32(2).u32(3).u32(scard::kResetCard).u32(2).u32(0));
  EXPECT_EQ(r.command, Command::kReconnect);
  const auto& s = std::get<ReconnectStruct>(r.body);
  EXPECT_EQ(static_cast<uint32_t>(s.card), kTracedCard);
  EXPECT_EQ(s.share_mode, 2u);
  EXPECT_EQ(s.preferred_protocols, 3u);
  EXPECT_EQ(s.initialization, 1u);
  EXPECT_EQ(s.active_protocol, 2u);
}

TEST(WireRequest, Disconnect) {
  auto r = decode_two_sends(Le().hex("0c000000 06000000"), Le().u32(kTracedCard).u32(scard::kUnpowerCard).u32(0));
  EXPECT_EQ(r.command, Command::kDisconnect);
  const auto& s = std::get<DisconnectStruct>(r.body);
  EXPECT_EQ(static_cast<uint32_t>(s.card), kTracedCard);
  EXPECT_EQ(s.disposition, 2u);
}

TEST(WireRequest, BeginTransaction) {
  auto r = decode_two_sends(Le().hex("08000000 07000000"), Le().u32(kTracedCard).u32(0));
  EXPECT_EQ(r.command, Command::kBeginTransaction);
  EXPECT_EQ(static_cast<uint32_t>(std::get<BeginStruct>(r.body).card), kTracedCard);
}

TEST(WireRequest, EndTransaction) {
  auto r = decode_two_sends(Le().hex("0c000000 08000000"), Le().u32(kTracedCard).u32(scard::kResetCard).u32(0));
  EXPECT_EQ(r.command, Command::kEndTransaction);
  const auto& s = std::get<EndStruct>(r.body);
  EXPECT_EQ(static_cast<uint32_t>(s.card), kTracedCard);
  EXPECT_EQ(s.disposition, 1u);
}

TEST(WireRequest, TransmitTraced) {
  // §2.3 [traced]: header, 32-byte struct, then the 7 APDU bytes (three sends).
  Bytes hdr = Le().hex("20000000 09000000");
  Bytes fixed = Le().u32(kTracedCard).hex("02000000 10000000 07000000 00000000 00000000 2c010000 00000000");
  ASSERT_EQ(fixed.size(), 32u);
  Bytes apdu = Le().hex("00a4 0400 023f00");
  auto r = decode_two_sends(hdr, fixed, apdu);
  EXPECT_EQ(r.command, Command::kTransmit);
  const auto& t = std::get<TransmitRequest>(r.body);
  EXPECT_EQ(static_cast<uint32_t>(t.fixed.card), kTracedCard);
  EXPECT_EQ(t.fixed.send_pci_protocol, 2u);
  EXPECT_EQ(t.fixed.send_pci_length, 16u);
  EXPECT_EQ(t.fixed.send_length, 7u);
  EXPECT_EQ(t.fixed.recv_length, 300u);
  EXPECT_EQ(t.apdu, (Bytes{0x00, 0xA4, 0x04, 0x00, 0x02, 0x3F, 0x00}));
}

TEST(WireRequest, TransmitStructAndApduInOneSend) {
  Bytes body = Le().u32(7).u32(1).u32(16).u32(5).u32(3).u32(16).u32(258).u32(0).hex("00 B0 00 00 00");
  auto r = decode_two_sends(header(32, 0x09), body);
  const auto& t = std::get<TransmitRequest>(r.body);
  EXPECT_EQ(t.apdu, (Bytes{0x00, 0xB0, 0x00, 0x00, 0x00}));
  EXPECT_EQ(t.fixed.recv_pci_protocol, 3u);
}

TEST(WireRequest, TransmitEmptyApdu) {
  auto r = decode_two_sends(header(32, 0x09), Le().u32(7).u32(1).u32(16).u32(0).u32(3).u32(16).u32(258).u32(0));
  EXPECT_TRUE(std::get<TransmitRequest>(r.body).apdu.empty());
}

TEST(WireRequest, TransmitMaximalExtendedApdu) {
  Bytes apdu(scard::kMaxBufferSizeExtended, 0x5A);
  auto r = decode_two_sends(header(32, 0x09), Le().u32(7).u32(2).u32(16).u32(65548).u32(3).u32(16).u32(65548).u32(0),
                            apdu);
  EXPECT_EQ(std::get<TransmitRequest>(r.body).apdu.size(), 65548u);
}

TEST(WireRequest, ControlTracedWithoutData) {
  // [traced]: code 0x42000D48, send 0, recv 100.
  auto r = decode_two_sends(Le().hex("18000000 0a000000"),
                            Le().u32(kTracedCard).u32(0x42000D48).u32(0).u32(100).u32(0).u32(0));
  EXPECT_EQ(r.command, Command::kControl);
  const auto& c = std::get<ControlRequest>(r.body);
  EXPECT_EQ(c.fixed.control_code, 0x42000D48u);
  EXPECT_EQ(c.fixed.recv_length, 100u);
  EXPECT_TRUE(c.data.empty());
}

TEST(WireRequest, ControlWithData) {
  // testpcsc step 9: SCardControl(SCARD_CTL_CODE(1), {0x02}).
  auto r = decode_two_sends(header(24, 0x0A), Le().u32(kTracedCard).u32(scard::ctl_code(1)).u32(1).u32(100).u32(0).u32(0),
                            Bytes{0x02});
  const auto& c = std::get<ControlRequest>(r.body);
  EXPECT_EQ(c.fixed.control_code, 0x42000001u);
  EXPECT_EQ(c.data, Bytes{0x02});
}

TEST(WireRequest, Status) {
  auto r = decode_two_sends(Le().hex("08000000 0b000000"), Le().u32(kTracedCard).u32(0));
  EXPECT_EQ(r.command, Command::kStatus);
  EXPECT_EQ(static_cast<uint32_t>(std::get<StatusStruct>(r.body).card), kTracedCard);
}

TEST(WireRequest, CancelTraced) {
  auto r = decode_two_sends(Le().hex("08000000 0d000000"), Le().hex("39a3805a 00000000"));
  EXPECT_EQ(r.command, Command::kCancel);
  EXPECT_EQ(static_cast<uint32_t>(std::get<CancelStruct>(r.body).context), kTracedContext);
}

TEST(WireRequest, GetAttrib) {
  // The client sends cbAttrLen = 264 and pre-fills rv with SCARD_E_NO_SERVICE [traced].
  Bytes body = Le().u32(kTracedCard).u32(scard::kAttrAtrString).zeros(264).u32(264).u32(0x8010001D);
  ASSERT_EQ(body.size(), 280u);
  auto r = decode_two_sends(Le().hex("18010000 0f000000"), body);
  EXPECT_EQ(r.command, Command::kGetAttrib);
  const auto& g = std::get<GetSetStruct>(r.body);
  EXPECT_EQ(static_cast<uint32_t>(g.card), kTracedCard);
  EXPECT_EQ(g.attr_id, 0x00090303u);
  EXPECT_EQ(g.attr_length, 264u);
  EXPECT_EQ(g.rv, 0x8010001Du);
}

TEST(WireRequest, SetAttrib) {
  Bytes attr(264, 0);
  attr[0] = 0xAB;
  attr[263] = 0xCD;
  auto r = decode_two_sends(Le().hex("18010000 10000000"),
                            Le().u32(kTracedCard).u32(scard::kAttrAtrString).bytes(attr).u32(264).u32(0x8010001D));
  EXPECT_EQ(r.command, Command::kSetAttrib);
  const auto& g = std::get<GetSetStruct>(r.body);
  EXPECT_EQ(g.attr[0], 0xAB);
  EXPECT_EQ(g.attr[263], 0xCD);
  EXPECT_EQ(g.attr_length, 264u);
}

TEST(WireRequest, HeaderOnlyCommandsIgnoreSize) {
  for (uint32_t cmd = 0x12; cmd <= 0x17; ++cmd) {
    for (uint32_t size : {0u, 8u, 2944u, 0xFFFFFFFFu}) {
      SCOPED_TRACE(testing::Message() << std::hex << cmd << " size " << size);
      RequestDecoder d;
      // The header, immediately followed by a VERSION request: |size| must not make the
      // decoder skip or wait for body bytes.
      d.feed(header(size, cmd));
      auto r = d.next();
      ASSERT_TRUE(r.has_value());
      ASSERT_TRUE(r->ok()) << r->error().what;
      EXPECT_EQ(static_cast<uint32_t>(r->value().command), cmd);
      ASSERT_TRUE(std::holds_alternative<HeaderOnly>(r->value().body));
      EXPECT_EQ(static_cast<uint32_t>(std::get<HeaderOnly>(r->value().body).command), cmd);
      EXPECT_EQ(d.buffered(), 0u);
      d.feed(Le().hex("0c000000 11000000 04000000 05000000 00000000"));
      auto v = d.next();
      ASSERT_TRUE(v.has_value());
      ASSERT_TRUE(v->ok());
      EXPECT_EQ(std::get<VersionStruct>(v->value().body).minor, 5);
    }
  }
}

TEST(WireRequest, GetStatusChangeSequence) {
  // SCardGetStatusChange(timeout 0) on 1.9.9: 13 then 14, back to back.
  RequestDecoder d;
  d.feed(Le().hex("00000000 13000000 00000000 14000000"));
  auto a = d.next();
  auto b = d.next();
  ASSERT_TRUE(a && a->ok() && b && b->ok());
  EXPECT_EQ(a->value().command, Command::kWaitReaderStateChange);
  EXPECT_EQ(b->value().command, Command::kStopWaitingReaderStateChange);
  EXPECT_FALSE(d.next().has_value());
}

// ---- errors (pcscd closes the connection) ---------------------------------------------

TEST(WireError, WrongBodySize) {
  expect_error(Le().u32(8).u32(0x01).zeros(8), "body size");
  expect_error(Le().u32(16).u32(0x01).zeros(16), "body size");
  expect_error(Le().u32(151).u32(0x04).zeros(151));
  expect_error(Le().u32(153).u32(0x04).zeros(153));
  expect_error(Le().u32(0).u32(0x11));
  // The APDU is not part of |size|: a client that counted it is refused.
  expect_error(Le().u32(32 + 7).u32(0x09).zeros(39));
  expect_error(Le().u32(279).u32(0x0F).zeros(279));
  expect_error(Le().u32(0xFFFFFFFF).u32(0x10));
}

TEST(WireError, WrongBodySizeIsDetectedFromTheHeaderAlone) {
  RequestDecoder d;
  d.feed(Le().u32(1000).u32(0x01));
  auto r = d.next();
  ASSERT_TRUE(r.has_value());
  EXPECT_FALSE(r->ok());
}

TEST(WireError, UnknownOpcode) {
  for (uint32_t cmd : {0x00u, 0x18u, 0x19u, 0x100u, 0x80000001u, 0xFFFFFFFFu}) {
    SCOPED_TRACE(cmd);
    expect_error(Le().u32(0).u32(cmd), "unsupported command");
    expect_error(Le().u32(12).u32(cmd).zeros(12), "unsupported command");
  }
}

TEST(WireError, CommandsRealClientsNeverSend) {
  for (uint32_t cmd : {0x03u, 0x0Cu, 0x0Eu}) {
    SCOPED_TRACE(cmd);
    expect_error(Le().u32(0).u32(cmd));
    expect_error(Le().u32(8).u32(cmd).zeros(8));
  }
}

TEST(WireError, TransmitSendLengthAboveExtended) {
  // 65549: refused from the struct alone, before any APDU byte is buffered.
  expect_error(Le().u32(32).u32(0x09).u32(7).u32(2).u32(16).u32(65549).u32(3).u32(16).u32(258).u32(0), "send length");
  expect_error(Le().u32(32).u32(0x09).u32(7).u32(2).u32(16).u32(0xFFFFFFFF).u32(3).u32(16).u32(258).u32(0));
}

TEST(WireError, ControlSendLengthAboveExtended) {
  expect_error(Le().u32(24).u32(0x0A).u32(7).u32(0x42000001).u32(65549).u32(100).u32(0).u32(0), "send length");
  expect_error(Le().u32(24).u32(0x0A).u32(7).u32(0x42000001).u32(0x80000000).u32(100).u32(0).u32(0));
}

TEST(WireError, AttribLengthAbove264) {
  for (uint32_t cmd : {0x0Fu, 0x10u}) {
    for (uint32_t len : {265u, 0x10000u, 0xFFFFFFFFu}) {
      SCOPED_TRACE(testing::Message() << cmd << " " << len);
      expect_error(Le().u32(280).u32(cmd).u32(7).u32(0x00090303).zeros(264).u32(len).u32(0), "attribute length");
    }
  }
}

TEST(WireError, ErrorAfterGoodRequestsKeepsTheGoodOnes) {
  RequestDecoder d;
  d.feed(Le().hex("0c000000 11000000 04000000 04000000 00000000").hex("00000000 03000000"));
  auto a = d.next();
  ASSERT_TRUE(a && a->ok());
  EXPECT_EQ(a->value().command, Command::kVersion);
  auto b = d.next();
  ASSERT_TRUE(b.has_value());
  EXPECT_FALSE(b->ok());
}

TEST(WireError, NoVerdictOnPartialHeader) {
  RequestDecoder d;
  d.feed(Le().hex("00000000 030000"));  // 7 bytes of an invalid header
  EXPECT_FALSE(d.next().has_value());
  d.feed(Bytes{0x00});
  auto r = d.next();
  ASSERT_TRUE(r.has_value());
  EXPECT_FALSE(r->ok());
}

// ---- reassembly ------------------------------------------------------------------------

// A realistic session: every command, header-only ones included.
Bytes session_stream() {
  Le s;
  s.hex("0c000000 11000000 04000000 04000000 00000000");                 // VERSION
  s.u32(12).u32(0x01).u32(2).u32(0).u32(0);                                // ESTABLISH
  s.hex("00000000 12000000");                                             // GET_READERS_STATE
  s.u32(152).u32(0x04).u32(kTracedContext).text(kReader, 128).u32(2).u32(3).u32(0).u32(0).u32(0);
  s.u32(8).u32(0x07).u32(kTracedCard).u32(0);                              // BEGIN
  s.hex("20000000 09000000").u32(kTracedCard).hex("02000000 10000000 07000000 00000000 00000000 2c010000 00000000");
  s.hex("00a4 0400 023f00");                                              // TRANSMIT + APDU
  s.u32(24).u32(0x0A).u32(kTracedCard).u32(0x42000D48).u32(3).u32(100).u32(0).u32(0).hex("010203");
  s.u32(280).u32(0x0F).u32(kTracedCard).u32(0x00090303).zeros(264).u32(264).u32(0x8010001D);
  s.u32(280).u32(0x10).u32(kTracedCard).u32(0x00090303).zeros(264).u32(1).u32(0x8010001D);
  s.u32(8).u32(0x0B).u32(kTracedCard).u32(0);                              // STATUS
  s.u32(12).u32(0x08).u32(kTracedCard).u32(0).u32(0);                      // END
  s.hex("00000000 13000000 00000000 14000000 00000000 15000000 00000000 16000000 00000000 17000000");
  s.u32(24).u32(0x05).u32(kTracedCard).u32(2).u32(3).u32(1).u32(2).u32(0);  // RECONNECT
  s.u32(12).u32(0x06).u32(kTracedCard).u32(0).u32(0);                      // DISCONNECT
  s.u32(8).u32(0x0D).u32(kTracedContext).u32(0);                           // CANCEL
  s.u32(8).u32(0x02).u32(kTracedContext).u32(0);                           // RELEASE
  return s;
}
constexpr std::size_t kSessionRequests = 20;

// Re-encodes a decoded request exactly as a client would have sent it.
Bytes reencode(const DecodedRequest& r) {
  return std::visit(
      [&](const auto& b) -> Bytes {
        using T = std::decay_t<decltype(b)>;
        if constexpr (std::is_same_v<T, HeaderOnly>) {
          return encode_request(r.command, {});
        } else if constexpr (std::is_same_v<T, TransmitRequest>) {
          return encode_request(r.command, bytes_of(b.fixed), b.apdu);
        } else if constexpr (std::is_same_v<T, ControlRequest>) {
          return encode_request(r.command, bytes_of(b.fixed), b.data);
        } else {
          return encode_request(r.command, bytes_of(b));
        }
      },
      r.body);
}

Bytes decode_in_pieces(const Bytes& stream, const std::vector<std::size_t>& cuts, std::size_t* count) {
  RequestDecoder d;
  Bytes out;
  *count = 0;
  std::size_t prev = 0;
  auto push = [&](std::size_t end) {
    d.feed(std::span<const uint8_t>(stream.data() + prev, end - prev));
    prev = end;
    while (auto r = d.next()) {
      EXPECT_TRUE(r->ok()) << r->error().what;
      if (!r->ok()) return;
      auto again = reencode(r->value());
      out.insert(out.end(), again.begin(), again.end());
      ++*count;
    }
  };
  for (auto c : cuts) push(c);
  push(stream.size());
  EXPECT_EQ(d.buffered(), 0u);
  return out;
}

TEST(WireReassembly, WholeSessionInOneFeed) {
  const Bytes stream = session_stream();
  std::size_t n = 0;
  EXPECT_EQ(decode_in_pieces(stream, {}, &n), stream);
  EXPECT_EQ(n, kSessionRequests);
}

TEST(WireReassembly, SplitAtEveryByteBoundary) {
  const Bytes stream = session_stream();
  for (std::size_t k = 0; k <= stream.size(); ++k) {
    SCOPED_TRACE(k);
    std::size_t n = 0;
    ASSERT_EQ(decode_in_pieces(stream, {k}, &n), stream);
    ASSERT_EQ(n, kSessionRequests);
  }
}

TEST(WireReassembly, OneByteAtATime) {
  const Bytes stream = session_stream();
  std::vector<std::size_t> cuts;
  for (std::size_t k = 1; k < stream.size(); ++k) cuts.push_back(k);
  std::size_t n = 0;
  EXPECT_EQ(decode_in_pieces(stream, cuts, &n), stream);
  EXPECT_EQ(n, kSessionRequests);
}

TEST(WireReassembly, EveryPairOfCutsInATransmit) {
  const Bytes stream = Le().hex("20000000 09000000").u32(kTracedCard)
                          .hex("02000000 10000000 07000000 00000000 00000000 2c010000 00000000 00a40400023f00")
                          .hex("00000000 12000000");
  for (std::size_t a = 0; a <= stream.size(); ++a) {
    for (std::size_t b = a; b <= stream.size(); ++b) {
      std::size_t n = 0;
      ASSERT_EQ(decode_in_pieces(stream, {a, b}, &n), stream) << a << "," << b;
      ASSERT_EQ(n, 2u);
    }
  }
}

// ---- replies and layout ---------------------------------------------------------------

TEST(WireReply, ConnectReplyBytes) {
  ConnectStruct r{};
  r.context = kTracedContext;
  copy_name(r.reader, kReader);
  r.share_mode = 2;
  r.preferred_protocols = 3;
  r.card = static_cast<int32_t>(kTracedCard);
  r.active_protocol = 2;
  r.rv = 0;
  Bytes expected = Le().hex("39a3805a").text(kReader, 128).hex("02000000 03000000 42d45349 02000000 00000000");
  ASSERT_EQ(expected.size(), 152u);
  EXPECT_EQ(to_hex(bytes_of(r)), to_hex(expected));
}

TEST(WireReply, TransmitReplyBytesTraced) {
  // [traced] reply: `… 01000000 00000000 02000000 00000000` + `90 00`.
  TransmitStruct r{};
  r.card = static_cast<int32_t>(kTracedCard);
  r.send_pci_protocol = 2;
  r.send_pci_length = 16;
  r.send_length = 7;
  r.recv_pci_protocol = 1;
  r.recv_pci_length = 0;
  r.recv_length = 2;
  r.rv = 0;
  Bytes response = {0x90, 0x00};
  Bytes expected = Le().hex("42d45349 02000000 10000000 07000000 01000000 00000000 02000000 00000000 9000");
  EXPECT_EQ(to_hex(bytes_of(r, response)), to_hex(expected));
  r.rv = scard::kEInsufficientBuffer;
  r.recv_length = 300;
  EXPECT_EQ(to_hex(bytes_of(r)),
            to_hex(Le().hex("42d45349 02000000 10000000 07000000 01000000 00000000 2c010000 08001080")));
}

TEST(WireReply, GetAttribReplyBytes) {
  GetSetStruct r{};
  r.card = static_cast<int32_t>(kTracedCard);
  r.attr_id = scard::kAttrAtrString;
  const Bytes atr = {0x3B, 0x80, 0x80, 0x01, 0x01};
  std::memcpy(r.attr, atr.data(), atr.size());
  r.attr_length = 5;
  r.rv = 0;
  Bytes expected = Le().hex("42d45349 03030900").bytes(atr).zeros(264 - 5).hex("05000000 00000000");
  ASSERT_EQ(expected.size(), 280u);
  EXPECT_EQ(to_hex(bytes_of(r)), to_hex(expected));
}

TEST(WireReply, SmallRepliesBytes) {
  EXPECT_EQ(bytes_of(VersionStruct{4, 4, 0}), Le().hex("04000000 04000000 00000000").get());
  EXPECT_EQ(bytes_of(EstablishStruct{2, kTracedContext, 0}), Le().hex("02000000 39a3805a 00000000").get());
  EXPECT_EQ(bytes_of(CancelStruct{static_cast<int32_t>(kTracedContext), 0}), Le().hex("39a3805a 00000000").get());
  // The event signal for a cancelled wait [traced]: `00000000 02001080`.
  EXPECT_EQ(bytes_of(WaitReaderStateChange{0, scard::kECancelled}), Le().hex("00000000 02001080").get());
  EXPECT_EQ(bytes_of(GetReaderEvents{3, 0}), Le().hex("03000000 00000000").get());
  EXPECT_EQ(bytes_of(ReconnectStruct{7, 2, 3, 1, 2, 0x8010000B}),
            Le().u32(7).u32(2).u32(3).u32(1).u32(2).u32(0x8010000B).get());
  EXPECT_EQ(bytes_of(ControlStruct{7, 0x42000D48, 0, 100, 4, 0}, Bytes{1, 2, 3, 4}),
            Le().u32(7).u32(0x42000D48).u32(0).u32(100).u32(4).u32(0).hex("01020304").get());
}

TEST(WireReply, ReaderStateBytes) {
  ReaderState rs{};
  copy_name(rs.name, kReader);
  rs.event_counter = 1;
  rs.reader_state = 0x34;
  rs.reader_sharing = -1;
  const Bytes atr = {0x3B, 0x80, 0x80, 0x01, 0x01};
  std::memcpy(rs.atr, atr.data(), atr.size());
  rs.atr_length = 5;
  rs.card_protocol = 2;
  Bytes expected = Le().text(kReader, 128).u32(1).u32(0x34).u32(0xFFFFFFFF).bytes(atr).zeros(33 - 5 + 3).u32(5).u32(2);
  ASSERT_EQ(expected.size(), 184u);
  EXPECT_EQ(to_hex(bytes_of(rs)), to_hex(expected));
}

// ---- helpers ----------------------------------------------------------------------------

TEST(WireNames, CopyNamePadsAndCuts) {
  char field[scard::kMaxReaderName];
  std::memset(field, 'x', sizeof field);
  copy_name(field, "abc");
  EXPECT_EQ(std::string(field, 4), std::string("abc\0", 4));
  for (std::size_t i = 3; i < sizeof field; ++i) EXPECT_EQ(field[i], '\0') << i;
  copy_name(field, std::string(200, 'n'));
  EXPECT_EQ(field[126], 'n');
  EXPECT_EQ(field[127], '\0');
  EXPECT_EQ(read_name(field), std::string(127, 'n'));
}

TEST(WireNames, ReadNameStopsAtNulAndAtByte127) {
  char field[scard::kMaxReaderName];
  std::memset(field, 'y', sizeof field);  // no NUL at all
  EXPECT_EQ(read_name(field), std::string(127, 'y'));
  field[5] = '\0';
  EXPECT_EQ(read_name(field), "yyyyy");
  field[0] = '\0';
  EXPECT_EQ(read_name(field), "");
}

TEST(WireEncode, EncodeRequestLayout) {
  Bytes body = {1, 2, 3, 4, 5, 6, 7, 8};
  Bytes trailing = {0xAA};
  EXPECT_EQ(encode_request(Command::kStatus, body, trailing), Le().hex("08000000 0b000000 0102030405060708 aa").get());
  EXPECT_EQ(encode_request(Command::kGetReadersState, {}), Le().hex("00000000 12000000").get());
}

TEST(WireNames, CommandNames) {
  EXPECT_STREQ(command_name(0x09), "TRANSMIT");
  EXPECT_STREQ(command_name(0x11), "CMD_VERSION");
  EXPECT_STREQ(command_name(0x17), "CMD_GET_READERS_STATE_ARRAY");
  EXPECT_STREQ(command_name(0x18), "UNKNOWN");
  EXPECT_STREQ(command_name(0), "UNKNOWN");
  for (uint32_t c = 1; c <= 0x17; ++c) EXPECT_STRNE(command_name(c), "UNKNOWN") << c;
}

TEST(WireLayout, ProtocolConstants) {
  EXPECT_EQ(kProtocolMajor, 4);
  EXPECT_EQ(kMinorLowest, 4);
  EXPECT_EQ(kMinorHighest, 6);
  EXPECT_EQ(kLegacyArrayBytes, 2944u);
}

}  // namespace
}  // namespace cardbridge::shim::wire
