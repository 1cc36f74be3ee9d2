// cardbridge.v1 codec: every message round-trips; decode() refuses everything a hostile or
// broken peer could send, and ignores fields it does not know (forward compatibility).
//
// Invalid inputs are built two ways: through encode() (which does not validate) where the
// domain types can express them, and with a tiny hand-written protobuf writer where they
// cannot (unknown enum values, unknown fields). The writer follows the wire format spec
// (varint = 0, length-delimited = 2) and the field numbers of cardbridge.proto.
#include "cardbridge/protocol/codec.hpp"

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "cardbridge/protocol/framing.hpp"
#include "cardbridge/support/hex.hpp"
#include "alloc_count.hpp"

namespace cardbridge::protocol {
namespace {

// ---- a minimal protobuf writer --------------------------------------------------------

class Pb {
 public:
  Pb& varint(uint32_t field, uint64_t v) {
    put_varint((uint64_t{field} << 3) | 0);
    put_varint(v);
    return *this;
  }
  Pb& bytes(uint32_t field, std::string_view s) {
    put_varint((uint64_t{field} << 3) | 2);
    put_varint(s.size());
    out_.insert(out_.end(), s.begin(), s.end());
    return *this;
  }
  Pb& bytes(uint32_t field, const std::vector<uint8_t>& b) {
    return bytes(field, std::string_view(reinterpret_cast<const char*>(b.data()), b.size()));
  }
  Pb& message(uint32_t field, const Pb& m) { return bytes(field, m.out_); }
  Pb& fixed32(uint32_t field, uint32_t v) {
    put_varint((uint64_t{field} << 3) | 5);
    for (int i = 0; i < 4; ++i) out_.push_back(static_cast<uint8_t>(v >> (8 * i)));
    return *this;
  }
  const std::vector<uint8_t>& data() const { return out_; }

 private:
  void put_varint(uint64_t v) {
    while (v >= 0x80) {
      out_.push_back(static_cast<uint8_t>(v | 0x80));
      v >>= 7;
    }
    out_.push_back(static_cast<uint8_t>(v));
  }
  std::vector<uint8_t> out_;
};

// Envelope field numbers.
constexpr uint32_t kEnvId = 1, kEnvHello = 2, kEnvReaders = 3, kEnvError = 4, kEnvRequest = 5,
                   kEnvReply = 6;

Pb envelope(uint32_t id, uint32_t body_field, const Pb& body) {
  Pb e;
  if (id != 0) e.varint(kEnvId, id);
  e.message(body_field, body);
  return e;
}

// ---- helpers --------------------------------------------------------------------------

Bytes seq(std::size_t n, uint8_t start = 0) {
  Bytes b(n);
  for (std::size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(start + i);
  return b;
}

Message roundtrip(const Message& m) {
  auto bytes = encode(m);
  auto back = decode(bytes);
  EXPECT_TRUE(back.ok()) << (back.ok() ? "" : back.error().what);
  if (!back.ok()) return {};
  return *back;
}

void expect_rejected(std::span<const uint8_t> bytes, const std::string& why = "") {
  auto r = decode(bytes);
  EXPECT_FALSE(r.ok()) << "accepted: " << why << " " << to_hex(bytes.first(std::min<std::size_t>(bytes.size(), 64)));
  if (!r.ok()) {
    EXPECT_FALSE(r.error().what.empty());
  }
}

void expect_rejected(const Message& m, const std::string& why = "") {
  auto bytes = encode(m);
  expect_rejected(bytes, why);
}

Hello full_hello() {
  Hello h;
  h.version_major = 1;
  h.version_minor = 7;
  h.capabilities = 0x8000000000000005ull;
  h.role = Role::kDesk;
  h.software = "cardbridge-desk 0.1.0";
  h.peer_name = "thin-client-42";
  h.instance = 0xFEDCBA9876543210ull;
  h.reply = true;
  return h;
}

Request full_request(Op op) {
  Request r;
  r.op = op;
  r.context = ContextId{0xFFFFFFFF};
  r.handle = DeskHandle{12345};
  r.reader = "Virtual PCD 00 00";
  r.share_mode = 2;
  r.protocols = 3;
  r.disposition = 1;
  r.code = 0x42000D48;
  r.data = seq(300);
  r.recv_length = 65548;
  r.flags = 7;
  r.recv_protocol = 2;
  r.after = {3, 0xFFFFFFFF};
  return r;
}

Reply full_reply() {
  Reply r;
  r.rv = 0x80100008;
  r.handle = DeskHandle{99};
  r.protocol = 2;
  r.data = seq(258, 3);
  r.length = 1000;
  r.reader = "Reader \xC3\xA9 01";
  r.state = 0x00030034;
  r.atr = seq(33, 0x3B);
  r.prefetched = {Prefetched{{0x00, 0xC0, 0x00, 0x00, 0x10}, seq(18)},
                  Prefetched{{0x00, 0xB0, 0x00, 0x10, 0x00}, {0x90, 0x00}}};
  r.begin_rv = 0x8010000B;
  return r;
}

// ---- round trips ----------------------------------------------------------------------

TEST(CodecRoundTrip, Hello) {
  Message m{0, full_hello()};
  EXPECT_EQ(roundtrip(m), m);
  Hello server;
  server.role = Role::kServer;
  Message m2{0, server};
  EXPECT_EQ(roundtrip(m2), m2);
}

TEST(CodecRoundTrip, HelloWithIdIsKept) {
  Message m{77, full_hello()};
  EXPECT_EQ(roundtrip(m), m);
}

TEST(CodecRoundTrip, ReaderSnapshot) {
  ReaderSnapshot s;
  s.sequence = 0xFFFFFFFFFFFFFFFFull;
  s.readers.push_back(ReaderInfo{"Virtual PCD 00 00", 0x0022, 1, {0x3B, 0x80, 0x80, 0x01, 0x01}});
  s.readers.push_back(ReaderInfo{"Virtual PCD 00 01", 0x0010, 0xFFFF, {}});
  s.readers.push_back(ReaderInfo{std::string(127, 'x'), 0xFFFF, 0, seq(33)});
  s.readers.push_back(ReaderInfo{"\xFF\xFE binary name", 0, 0, {}});
  Message m{0, s};
  EXPECT_EQ(roundtrip(m), m);
}

TEST(CodecRoundTrip, EmptyReaderSnapshot) {
  Message m{0, ReaderSnapshot{5, {}}};
  EXPECT_EQ(roundtrip(m), m);
}

// A desk without its PC/SC service (capability desk-service): no reader, and why.
TEST(CodecRoundTrip, ReaderSnapshotWithServiceError) {
  ReaderSnapshot s;
  s.sequence = 3;
  s.service_rv = 0x8010001D;  // SCARD_E_NO_SERVICE
  Message m{0, s};
  EXPECT_EQ(roundtrip(m), m);
}

// ReaderSnapshot.service_rv is field 3, as cardbridge.proto and docs/protocol.md say; a peer
// that does not know it (an older desk) sends nothing and means "the service answers".
TEST(CodecDecode, ServiceRvIsSnapshotField3) {
  Pb snap;
  snap.varint(1, 7).varint(3, 0x8010001D);
  auto m = decode(envelope(0, kEnvReaders, snap).data());
  ASSERT_TRUE(m.ok()) << m.error().what;
  const auto& got = std::get<ReaderSnapshot>(m->body);
  EXPECT_EQ(got.sequence, 7u);
  EXPECT_EQ(got.service_rv, 0x8010001Du);
  Pb old;
  old.varint(1, 8);
  auto m2 = decode(envelope(0, kEnvReaders, old).data());
  ASSERT_TRUE(m2.ok()) << m2.error().what;
  EXPECT_EQ(std::get<ReaderSnapshot>(m2->body).service_rv, 0u);
}

TEST(CodecRoundTrip, ReaderSnapshotAtLimits) {
  ReaderSnapshot s;
  for (std::size_t i = 0; i < kMaxReaders; ++i) s.readers.push_back(ReaderInfo{"R" + std::to_string(i), 0x10, 0, {}});
  Message m{0, s};
  EXPECT_EQ(roundtrip(m), m);
}

TEST(CodecRoundTrip, Error) {
  for (auto code : {ErrorCode::kUnspecified, ErrorCode::kMalformed, ErrorCode::kVersion,
                    ErrorCode::kUnexpected, ErrorCode::kLimit, ErrorCode::kShutdown}) {
    Message m{0, Error{code, "something went wrong"}};
    EXPECT_EQ(roundtrip(m), m);
  }
  Message text_limit{0, Error{ErrorCode::kLimit, std::string(kMaxTextBytes, 'e')}};
  EXPECT_EQ(roundtrip(text_limit), text_limit);
}

TEST(CodecRoundTrip, RequestEveryOp) {
  for (uint8_t op = 1; op <= kMaxOp; ++op) {
    SCOPED_TRACE(op_name(static_cast<Op>(op)));
    Message m{op + 1000u, full_request(static_cast<Op>(op))};
    EXPECT_EQ(roundtrip(m), m);
    Request minimal;
    minimal.op = static_cast<Op>(op);
    Message m2{1, minimal};
    EXPECT_EQ(roundtrip(m2), m2);
  }
}

TEST(CodecRoundTrip, RequestWithMaximalData) {
  Request r = full_request(Op::kTransmit);
  r.data = seq(kMaxDataBytes);
  r.reader = std::string(kMaxReaderNameBytes, 'n');
  Message m{0xFFFFFFFF, r};
  EXPECT_EQ(roundtrip(m), m);
}

TEST(CodecRoundTrip, RequestWithOrderingIdsAtTheLimit) {
  Request r = full_request(Op::kConnect);
  r.after.clear();
  for (uint32_t i = 0; i < kMaxAfter; ++i) r.after.push_back(0xFFFFFF00u + i);
  Message m{7, r};
  EXPECT_EQ(roundtrip(m), m);
}

TEST(CodecRoundTrip, Reply) {
  Message m{42, full_reply()};
  EXPECT_EQ(roundtrip(m), m);
  Message empty{1, Reply{}};
  EXPECT_EQ(roundtrip(empty), empty);
}

TEST(CodecRoundTrip, ReplyAtLimits) {
  Reply r;
  r.data = seq(kMaxDataBytes);
  r.atr = seq(kMaxAtrBytes);
  r.reader = std::string(kMaxReaderNameBytes, 'r');
  for (std::size_t i = 0; i < kMaxPrefetched; ++i) r.prefetched.push_back(Prefetched{{0x00, 0xC0, 0x00, 0x00}, {0x90, 0x00}});
  Message m{3, r};
  EXPECT_EQ(roundtrip(m), m);
}

TEST(CodecRoundTrip, ReplyWithMaximalPrefetchedEntry) {
  Reply r;
  r.prefetched = {Prefetched{seq(kMaxDataBytes), seq(kMaxDataBytes, 1)}};
  Message m{3, r};
  EXPECT_EQ(roundtrip(m), m);
}

TEST(CodecEncode, EncodeFrameIsFrameOfEncode) {
  Message m{9, full_request(Op::kControl)};
  auto payload = encode(m);
  EXPECT_EQ(encode_frame(m), frame(payload));
  FrameDecoder d;
  ASSERT_TRUE(d.feed(encode_frame(m)));
  auto f = d.next();
  ASSERT_TRUE(f.has_value());
  auto back = decode(*f);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, m);
}

TEST(CodecEncode, MatchesHandWrittenWireBytes) {
  // Pins the wire contract: field numbers and types of Envelope/Request.
  Request r;
  r.op = Op::kTransmit;
  r.context = ContextId{3};
  r.handle = DeskHandle{4};
  r.data = {0x00, 0xA4};
  r.recv_length = 258;
  Message m{5, r};
  Pb req;
  req.varint(1, 8).varint(2, 3).varint(3, 4).bytes(9, Bytes{0x00, 0xA4}).varint(10, 258);
  EXPECT_EQ(to_hex(encode(m)), to_hex(envelope(5, kEnvRequest, req).data()));
}

TEST(CodecDecode, HandWrittenHelloDecodes) {
  Pb h;
  h.varint(1, 1).varint(2, 0).varint(3, 0xF).varint(4, 1).bytes(5, "desk").bytes(6, "tc").varint(7, 9).varint(8, 1);
  auto r = decode(envelope(0, kEnvHello, h).data());
  ASSERT_TRUE(r.ok()) << r.error().what;
  const auto* hello = std::get_if<Hello>(&r->body);
  ASSERT_NE(hello, nullptr);
  EXPECT_EQ(hello->version_major, 1u);
  EXPECT_EQ(hello->capabilities, 0xFu);
  EXPECT_EQ(hello->role, Role::kDesk);
  EXPECT_EQ(hello->software, "desk");
  EXPECT_EQ(hello->peer_name, "tc");
  EXPECT_EQ(hello->instance, 9u);
  EXPECT_TRUE(hello->reply);
}

// ---- rejections -----------------------------------------------------------------------

TEST(CodecReject, Garbage) {
  expect_rejected(Bytes{0xFF, 0xFF, 0xFF, 0xFF}, "invalid tags");
  expect_rejected(Bytes{0x08}, "truncated varint");
  expect_rejected(Bytes{0x2A, 0x05, 0x01}, "length past the end");
  expect_rejected(Bytes{0x07}, "wire type 7");
  expect_rejected(Bytes{0x00, 0x00}, "field number 0");
  std::vector<uint8_t> noise(1000);
  for (std::size_t i = 0; i < noise.size(); ++i) noise[i] = static_cast<uint8_t>(i * 97 + 13);
  expect_rejected(noise, "noise");
}

TEST(CodecReject, EmptyEnvelope) {
  expect_rejected(Bytes{}, "empty payload");
  expect_rejected(Pb().varint(kEnvId, 5).data(), "id only");
}

TEST(CodecReject, EveryProperPrefixOfARequestIsRejected) {
  // id (field 1) is serialised first and the body is one length-delimited field after it,
  // so every proper prefix is either truncated or has no body.
  for (const Message& m : {Message{7, full_request(Op::kTransmit)}, Message{1, full_reply()}}) {
    auto bytes = encode(m);
    ASSERT_TRUE(decode(bytes).ok());
    for (std::size_t n = 0; n < bytes.size(); ++n) {
      SCOPED_TRACE(n);
      expect_rejected(std::span<const uint8_t>(bytes).first(n), "prefix");
    }
  }
}

TEST(CodecReject, TruncatedInsideNestedMessage) {
  auto bytes = encode(Message{0, ReaderSnapshot{1, {ReaderInfo{"R", 0x10, 1, {0x3B}}}}});
  bytes.pop_back();
  expect_rejected(bytes, "truncated snapshot");
}

TEST(CodecReject, RequestOrReplyWithIdZero) {
  expect_rejected(Message{0, full_request(Op::kPing)}, "request id 0");
  expect_rejected(Message{0, full_reply()}, "reply id 0");
  // The other bodies are unsolicited and legitimately carry 0.
  EXPECT_TRUE(decode(encode(Message{0, Error{ErrorCode::kShutdown, "bye"}})).ok());
  EXPECT_TRUE(decode(encode(Message{0, ReaderSnapshot{}})).ok());
}

TEST(CodecReject, UnknownOp) {
  for (uint64_t op : {uint64_t{0}, uint64_t{kMaxOp} + 1, uint64_t{200}, uint64_t{0x7FFFFFFF},
                      uint64_t{0xFFFFFFFFFFFFFFFF} /* -1 as int32 enum */}) {
    SCOPED_TRACE(op);
    Pb req;
    req.varint(1, op).varint(2, 1);
    expect_rejected(envelope(3, kEnvRequest, req).data(), "op");
  }
  Pb ok;
  ok.varint(1, kMaxOp);
  EXPECT_TRUE(decode(envelope(3, kEnvRequest, ok).data()).ok());
}

TEST(CodecReject, UnspecifiedOpViaEncode) {
  Request r;
  expect_rejected(Message{1, r}, "op unspecified");
}

TEST(CodecReject, OversizedData) {
  Request r = full_request(Op::kTransmit);
  r.data = seq(kMaxDataBytes + 1);  // 65549
  ASSERT_EQ(r.data.size(), 65549u);
  expect_rejected(Message{1, r}, "request data 65549");
  Reply p;
  p.data = seq(kMaxDataBytes + 1);
  expect_rejected(Message{1, p}, "reply data 65549");
}

TEST(CodecReject, OversizedReceiveLength) {
  Request r = full_request(Op::kTransmit);
  r.recv_length = kMaxDataBytes + 1;
  expect_rejected(Message{1, r}, "recv_length");
  r.recv_length = 0xFFFFFFFF;
  expect_rejected(Message{1, r}, "recv_length max");
}

TEST(CodecReject, OversizedPrefetchedEntry) {
  Reply a;
  a.prefetched = {Prefetched{seq(kMaxDataBytes + 1), {0x90, 0x00}}};
  expect_rejected(Message{1, a}, "prefetched command");
  Reply b;
  b.prefetched = {Prefetched{{0x00}, seq(kMaxDataBytes + 1)}};
  expect_rejected(Message{1, b}, "prefetched response");
}

TEST(CodecReject, WholeMessageAboveFrameLimit) {
  // A payload larger than any frame we accept is refused without parsing.
  Bytes big = Pb().bytes(99, std::string(kDefaultMaxFrame, 'x')).data();
  ASSERT_GT(big.size(), kDefaultMaxFrame);
  expect_rejected(big, "too large");
}

TEST(CodecReject, ReaderNameTooLong) {
  const std::string long_name(kMaxReaderNameBytes + 1, 'n');  // 128
  ASSERT_EQ(long_name.size(), 128u);
  expect_rejected(Message{0, ReaderSnapshot{1, {ReaderInfo{long_name, 0x10, 0, {}}}}}, "snapshot name 128");
  Request r = full_request(Op::kConnect);
  r.reader = long_name;
  expect_rejected(Message{1, r}, "request reader 128");
  Reply p;
  p.reader = long_name;
  expect_rejected(Message{1, p}, "reply reader 128");
}

TEST(CodecReject, ReaderNameWithNul) {
  const std::string nul_name("Reader\0Evil", 11);
  expect_rejected(Message{0, ReaderSnapshot{1, {ReaderInfo{nul_name, 0x10, 0, {}}}}}, "snapshot NUL");
  Request r = full_request(Op::kConnect);
  r.reader = nul_name;
  expect_rejected(Message{1, r}, "request NUL");
  Reply p;
  p.reader = std::string("\0", 1);
  expect_rejected(Message{1, p}, "reply NUL");
}

TEST(CodecReject, EmptyReaderNameInSnapshot) {
  expect_rejected(Message{0, ReaderSnapshot{1, {ReaderInfo{"", 0x10, 0, {}}}}}, "empty name");
}

TEST(CodecReject, AtrTooLong) {
  expect_rejected(Message{0, ReaderSnapshot{1, {ReaderInfo{"R", 0x20, 1, seq(34)}}}}, "snapshot ATR 34");
  Reply p;
  p.atr = seq(34);
  expect_rejected(Message{1, p}, "reply ATR 34");
}

TEST(CodecReject, TooManyReaders) {
  ReaderSnapshot s;
  for (std::size_t i = 0; i < kMaxReaders + 1; ++i) s.readers.push_back(ReaderInfo{"R" + std::to_string(i), 0x10, 0, {}});
  ASSERT_EQ(s.readers.size(), 65u);
  expect_rejected(Message{0, s}, "65 readers");
}

TEST(CodecReject, DuplicateReaderNames) {
  ReaderSnapshot s{1, {ReaderInfo{"A", 0x10, 0, {}}, ReaderInfo{"B", 0x10, 0, {}}, ReaderInfo{"A", 0x20, 1, {0x3B}}}};
  expect_rejected(Message{0, s}, "duplicate");
}

TEST(CodecReject, EventCountAbove16Bits) {
  EXPECT_TRUE(decode(encode(Message{0, ReaderSnapshot{1, {ReaderInfo{"R", 0x10, 0xFFFF, {}}}}})).ok());
  expect_rejected(Message{0, ReaderSnapshot{1, {ReaderInfo{"R", 0x10, 0x10000, {}}}}}, "event_count");
}

TEST(CodecReject, StateWithHighBits) {
  EXPECT_TRUE(decode(encode(Message{0, ReaderSnapshot{1, {ReaderInfo{"R", 0xFFFF, 0, {}}}}})).ok());
  expect_rejected(Message{0, ReaderSnapshot{1, {ReaderInfo{"R", 0x00010020, 0, {}}}}}, "state counter bits");
  expect_rejected(Message{0, ReaderSnapshot{1, {ReaderInfo{"R", 0x80000000, 0, {}}}}}, "state top bit");
}

TEST(CodecReject, UnknownHelloRole) {
  for (uint64_t role : {0ull, 3ull, 0xFFFFFFFFFFFFFFFFull}) {
    SCOPED_TRACE(role);
    Pb h;
    h.varint(1, 1).varint(4, role);
    expect_rejected(envelope(0, kEnvHello, h).data(), "role");
  }
  Hello unspecified = full_hello();
  unspecified.role = Role::kUnspecified;
  expect_rejected(Message{0, unspecified}, "role unspecified");
}

TEST(CodecReject, HelloTextTooLong) {
  Hello h = full_hello();
  h.software = std::string(kMaxTextBytes + 1, 's');
  expect_rejected(Message{0, h}, "software");
  h = full_hello();
  h.peer_name = std::string(kMaxTextBytes + 1, 'p');
  expect_rejected(Message{0, h}, "peer_name");
  h = full_hello();
  h.software = std::string(kMaxTextBytes, 's');
  h.peer_name = std::string(kMaxTextBytes, 'p');
  EXPECT_TRUE(decode(encode(Message{0, h})).ok());
}

TEST(CodecReject, ErrorMessageTooLong) {
  expect_rejected(Message{0, Error{ErrorCode::kLimit, std::string(kMaxTextBytes + 1, 'e')}}, "error text");
}

TEST(CodecReject, TooManyPrefetched) {
  Reply r;
  for (std::size_t i = 0; i < kMaxPrefetched + 1; ++i) r.prefetched.push_back(Prefetched{{0x00}, {0x90, 0x00}});
  ASSERT_EQ(r.prefetched.size(), 65u);
  expect_rejected(Message{1, r}, "65 prefetched");
}

TEST(CodecReject, TooManyOrderingIds) {
  Request r = full_request(Op::kTransmit);
  r.after.assign(kMaxAfter + 1, 5);
  expect_rejected(Message{1, r}, "65 ordering ids");
}

// Repeated fields are counted on the wire before the parser allocates an element for each
// (codec.cpp, repeated_fields_over_limits): a frame-sized run of empty entries is refused
// for the price of reading it, not of ~50 bytes of parsed object per 2 wire bytes.

Pb empty_entries(uint32_t field, std::size_t n) {
  Pb m;
  for (std::size_t i = 0; i < n; ++i) m.bytes(field, "");
  return m;
}

TEST(CodecRepeatedBounds, AFrameOfEmptyReaderEntriesIsRefusedWithoutAllocatingThem) {
  const auto bytes = envelope(0, kEnvReaders, empty_entries(2, 250'000)).data();
  ASSERT_GT(bytes.size(), 490'000u);
  ASSERT_LE(bytes.size(), kDefaultMaxFrame);
  alloc_count::Scope counting;
  auto r = decode(bytes);
  const std::size_t allocated = counting.bytes();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().what, "reader snapshot: too many readers");
  EXPECT_LT(allocated, 64u * 1024) << "decode allocated " << allocated << " bytes for a refused frame of "
                                   << bytes.size();
}

TEST(CodecRepeatedBounds, AFrameOfEmptyPrefetchedEntriesIsRefusedWithoutAllocatingThem) {
  const auto bytes = envelope(3, kEnvReply, empty_entries(9, 250'000)).data();
  alloc_count::Scope counting;
  auto r = decode(bytes);
  const std::size_t allocated = counting.bytes();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().what, "reply: too many prefetched answers");
  EXPECT_LT(allocated, 64u * 1024) << allocated;
}

TEST(CodecRepeatedBounds, PackedAndUnpackedOrderingIdsAreCountedBeforeParsing) {
  // Packed (proto3's encoding): 400 000 one-byte varints in one field.
  Pb packed;
  packed.varint(1, 8).bytes(13, std::string(400'000, '\x05'));
  const auto bytes = envelope(2, kEnvRequest, packed).data();
  {
    alloc_count::Scope counting;
    auto r = decode(bytes);
    const std::size_t allocated = counting.bytes();
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().what, "request: too many ordering ids");
    EXPECT_LT(allocated, 64u * 1024) << allocated;
  }
  // Unpacked (a legal encoding too), one past the limit; and exactly at it, accepted.
  Pb unpacked;
  unpacked.varint(1, 8);
  for (std::size_t i = 0; i <= kMaxAfter; ++i) unpacked.varint(13, i + 1);
  expect_rejected(envelope(2, kEnvRequest, unpacked).data(), "65 unpacked ordering ids");
  Pb at_limit;
  at_limit.varint(1, 8);
  for (std::size_t i = 0; i < kMaxAfter; ++i) at_limit.varint(13, i + 1);
  auto ok = decode(envelope(2, kEnvRequest, at_limit).data());
  ASSERT_TRUE(ok.ok()) << ok.error().what;
  EXPECT_EQ(std::get<Request>(ok->body).after.size(), kMaxAfter);
}

TEST(CodecRepeatedBounds, CountsAddUpAcrossRepeatedBodies) {
  // Protobuf merges a message field that occurs twice: 2 x 40 readers are 80 readers.
  Pb twice;
  for (int part = 0; part < 2; ++part) {
    Pb snap;
    for (int i = 0; i < 40; ++i) {
      Pb info;
      info.bytes(1, "R" + std::to_string(part * 100 + i)).varint(2, 0x10);
      snap.message(2, info);
    }
    twice.message(kEnvReaders, snap);
  }
  auto r = decode(twice.data());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().what, "reader snapshot: too many readers");
}

TEST(CodecRepeatedBounds, UnwalkableWireFormatIsRefused) {
  // A group (wire type 3), never produced by proto3, and a length past the end.
  std::vector<uint8_t> group{0x0B, 0x0C};
  expect_rejected(group, "group");
  std::vector<uint8_t> overlong{0x1A, 0x7F, 0x12, 0x00};
  expect_rejected(overlong, "length past the end");
  // Limits hold at the boundary: 64 readers, 64 prefetched answers decode.
  ReaderSnapshot s;
  for (std::size_t i = 0; i < kMaxReaders; ++i) s.readers.push_back(ReaderInfo{"R" + std::to_string(i), 0x10, 0, {}});
  EXPECT_TRUE(decode(encode(Message{0, s})).ok());
  Reply rep;
  for (std::size_t i = 0; i < kMaxPrefetched; ++i) rep.prefetched.push_back(Prefetched{{0x00}, {0x90, 0x00}});
  EXPECT_TRUE(decode(encode(Message{1, rep})).ok());
}

// ---- forward compatibility ------------------------------------------------------------

TEST(CodecForwardCompat, UnknownVarintFieldInEnvelopeIgnored) {
  Message m{11, full_request(Op::kTransmit)};
  auto bytes = encode(m);
  auto extra = Pb().varint(99, 12345).data();  // field 99, varint
  ASSERT_EQ(extra[0], 0x98);  // (99 << 3) | 0 = 792 = 0x98 0x06
  ASSERT_EQ(extra[1], 0x06);
  bytes.insert(bytes.end(), extra.begin(), extra.end());
  auto r = decode(bytes);
  ASSERT_TRUE(r.ok()) << r.error().what;
  EXPECT_EQ(*r, m);
}

TEST(CodecForwardCompat, UnknownFieldsOfEveryWireTypeIgnored) {
  Message m{0, full_hello()};
  auto bytes = encode(m);
  Pb extra;
  extra.varint(99, 1).bytes(100, "future").fixed32(101, 0xDEADBEEF).varint(536870911, 7);
  bytes.insert(bytes.end(), extra.data().begin(), extra.data().end());
  auto r = decode(bytes);
  ASSERT_TRUE(r.ok()) << r.error().what;
  EXPECT_EQ(*r, m);
}

TEST(CodecForwardCompat, UnknownFieldsInsideNestedMessagesIgnored) {
  Pb info;
  info.bytes(1, "Reader A").varint(2, 0x20).varint(3, 4).bytes(4, Bytes{0x3B, 0x00}).varint(99, 1);
  Pb snap;
  snap.varint(1, 8).message(2, info).bytes(77, "new stuff");
  auto r = decode(envelope(0, kEnvReaders, snap).data());
  ASSERT_TRUE(r.ok()) << r.error().what;
  Message expected{0, ReaderSnapshot{8, {ReaderInfo{"Reader A", 0x20, 4, {0x3B, 0x00}}}}};
  EXPECT_EQ(*r, expected);

  Pb req;
  req.varint(1, 13).varint(99, 5).bytes(98, "x");
  auto r2 = decode(envelope(4, kEnvRequest, req).data());
  ASSERT_TRUE(r2.ok()) << r2.error().what;
  Request ping;
  ping.op = Op::kPing;
  EXPECT_EQ(*r2, (Message{4, ping}));

  Pb pre;
  pre.bytes(1, Bytes{0x00, 0xC0}).bytes(2, Bytes{0x90, 0x00}).varint(99, 3);
  Pb rep;
  rep.varint(1, 0).message(9, pre).varint(99, 1);
  auto r3 = decode(envelope(6, kEnvReply, rep).data());
  ASSERT_TRUE(r3.ok()) << r3.error().what;
  Reply expected_reply;
  expected_reply.prefetched = {Prefetched{{0x00, 0xC0}, {0x90, 0x00}}};
  EXPECT_EQ(*r3, (Message{6, expected_reply}));
}

TEST(CodecForwardCompat, UnknownFieldInErrorIgnored) {
  Pb err;
  err.varint(1, 5).bytes(2, "bye").varint(99, 1);
  auto r = decode(envelope(0, kEnvError, err).data());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, (Message{0, Error{ErrorCode::kShutdown, "bye"}}));
}

TEST(CodecForwardCompat, UnknownErrorCodeIsPassedThrough) {
  Pb err;
  err.varint(1, 1000).bytes(2, "new code");
  auto r = decode(envelope(0, kEnvError, err).data());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(static_cast<uint32_t>(std::get<Error>(r->body).code), 1000u);
}

TEST(CodecForwardCompat, UnknownBodyFieldIsNotABody) {
  // A future body type (a new oneof member) is an unknown field: no known body remains.
  Pb e;
  e.varint(kEnvId, 1).message(50, Pb().varint(1, 1));
  expect_rejected(e.data(), "unknown body");
}

// ---- describe -------------------------------------------------------------------------

TEST(CodecDescribe, NeverShowsApduBytes) {
  Request r;
  r.op = Op::kTransmit;
  r.data = {0x00, 0x20, 0x00, 0x81, 0x08, 0x31, 0x32, 0x33, 0x34, 0xFF, 0xFF, 0xFF, 0xFF};
  std::string d = describe(Message{5, r});
  EXPECT_NE(d.find("transmit"), std::string::npos) << d;
  EXPECT_NE(d.find("len=hidden"), std::string::npos) << "a VERIFY's length tells the PIN's: " << d;
  EXPECT_EQ(d.find("13"), std::string::npos) << d;
  EXPECT_EQ(d.find("31"), std::string::npos) << d;
  EXPECT_EQ(d.find("1234"), std::string::npos) << d;

  Request select;
  select.op = Op::kTransmit;
  select.data = {0x00, 0xA4, 0x04, 0x00, 0x02, 0x3F, 0x00};
  EXPECT_NE(describe(Message{6, select}).find("len=7"), std::string::npos) << "other APDUs keep their length";

  Request pinpad;
  pinpad.op = Op::kControl;
  pinpad.code = 0x42330006;
  pinpad.data = seq(19);
  std::string dc = describe(Message{7, pinpad});
  EXPECT_NE(dc.find("len=hidden"), std::string::npos) << "a PIN-pad structure's length is not shown: " << dc;

  Reply p;
  p.data = {0x31, 0x32, 0x33, 0x34, 0x90, 0x00};
  std::string dr = describe(Message{5, p});
  EXPECT_NE(dr.find("len=6"), std::string::npos) << dr;
  EXPECT_EQ(dr.find("31"), std::string::npos) << dr;
}

TEST(CodecDescribe, NamesEveryBody) {
  EXPECT_NE(describe(Message{0, full_hello()}).find("hello"), std::string::npos);
  EXPECT_NE(describe(Message{0, ReaderSnapshot{3, {}}}).find("readers"), std::string::npos);
  EXPECT_NE(describe(Message{0, Error{ErrorCode::kLimit, "x"}}).find("error"), std::string::npos);
  EXPECT_NE(describe(Message{1, Reply{}}).find("reply"), std::string::npos);
}

TEST(CodecDescribe, ShowsOrderingIds) {
  Request r;
  r.op = Op::kConnect;
  EXPECT_EQ(describe(Message{9, r}).find("after"), std::string::npos);
  r.after = {4, 7};
  EXPECT_NE(describe(Message{9, r}).find(" after=4,7"), std::string::npos) << describe(Message{9, r});
}

// ---- the card image (capability card-image) -------------------------------------------

CardImage small_image() {
  CardImage im;
  im.event_count = 0xFFFF;
  im.complete = true;
  im.send_protocol = 1;
  im.recv_protocol = 1;
  im.selects = {ImageSelect{{0x00, 0xA4, 0x09, 0x04, 0x04, 0x3F, 0x00, 0xD0, 0x03}, {0x61, 0x10}, seq(18)},
                ImageSelect{{0x00, 0xA4, 0x09, 0x04, 0x02, 0x3F, 0x01}, {0x6A, 0x82}, {}}};
  im.files = {ImageFile{{0x00, 'P', 0x3F, 0x00, 0xD0, 0x03}, seq(12)}};
  return im;
}

TEST(CodecRoundTrip, ReplyWithCardImageAndPreludeAnswers) {
  Reply r = full_reply();
  r.image = small_image();
  r.prelude_answers = {{0x90, 0x00}, seq(258)};
  Message m{8, r};
  EXPECT_EQ(roundtrip(m), m);
  // An empty image is still an image (the desk had one, with nothing in it yet).
  r.image = CardImage{};
  Message m2{9, r};
  EXPECT_EQ(roundtrip(m2), m2);
}

TEST(CodecRoundTrip, RequestWithPreludeAndSnapshotWithImageState) {
  Request q = full_request(Op::kTransmit);
  for (std::size_t i = 0; i < kMaxPrelude; ++i) q.prelude.push_back(seq(4 + i));
  Message m{10, q};
  EXPECT_EQ(roundtrip(m), m);
  ReaderSnapshot s;
  s.readers = {ReaderInfo{"A", 0x20, 3, seq(4), image_state::kPartial},
               ReaderInfo{"B", 0x20, 4, seq(4), image_state::kComplete}};
  Message m2{0, s};
  EXPECT_EQ(roundtrip(m2), m2);
}

TEST(CodecReject, CardImageOutOfBounds) {
  Request q = full_request(Op::kTransmit);
  q.prelude.assign(kMaxPrelude + 1, Bytes{0x00, 0xA4, 0x00, 0x0C});
  expect_rejected(Message{1, q}, "prelude too long");
  q.prelude = {Bytes{0x00, 0xA4, 0x00}};
  expect_rejected(Message{1, q}, "prelude command shorter than a header");
  q.prelude = {seq(kMaxShortApduBytes + 1)};
  expect_rejected(Message{1, q}, "prelude command longer than a short APDU");

  ReaderSnapshot s;
  s.readers = {ReaderInfo{"A", 0x20, 3, seq(4), image_state::kMax + 1}};
  expect_rejected(Message{0, s}, "unknown image state");

  auto with = [](CardImage im) {
    Reply r;
    r.image = std::move(im);
    return Message{2, r};
  };
  CardImage im = small_image();
  im.selects.push_back(im.selects.front());
  expect_rejected(with(im), "duplicate select");
  im = small_image();
  im.files.push_back(im.files.front());
  expect_rejected(with(im), "duplicate file");
  im = small_image();
  im.selects[0].response = {0x90};
  expect_rejected(with(im), "response without a status word");
  im = small_image();
  im.files[0].content = seq(kMaxImageFileBytes + 1);
  expect_rejected(with(im), "file too large");
  im = small_image();
  im.files.clear();
  for (std::size_t i = 0; i < kMaxImageFiles + 1; ++i)
    im.files.push_back(ImageFile{{0x00, 'P', 0x3F, 0x00, static_cast<uint8_t>(i)}, {}});
  expect_rejected(with(im), "too many files");
  im = small_image();
  im.files.clear();
  for (std::size_t i = 0; i * 30000 < kMaxImageBytes + 30000; ++i)
    im.files.push_back(ImageFile{{0x00, 'P', 0x3F, 0x00, static_cast<uint8_t>(i)}, seq(30000)});
  expect_rejected(with(im), "image larger than its bound");
  im = small_image();
  im.event_count = 0x10000;
  expect_rejected(with(im), "event count over 16 bits");
}

TEST(CodecDescribe, NeverShowsTheCardImage) {
  Reply r;
  r.image = small_image();
  r.image->files[0].content = Bytes(12, 0xAB);
  const std::string text = describe(Message{5, r});
  EXPECT_NE(text.find("image=2+1"), std::string::npos) << text;
  EXPECT_EQ(text.find("AB"), std::string::npos) << text;
  EXPECT_EQ(text.find("ab"), std::string::npos) << text;
}

TEST(CodecOpName, EveryOpHasADistinctName) {
  std::set<std::string> names;
  for (uint8_t op = 0; op <= kMaxOp; ++op) names.insert(op_name(static_cast<Op>(op)));
  EXPECT_EQ(names.size(), kMaxOp + 1u);
  EXPECT_STREQ(op_name(Op::kTransmit), "transmit");
}

}  // namespace
}  // namespace cardbridge::protocol
