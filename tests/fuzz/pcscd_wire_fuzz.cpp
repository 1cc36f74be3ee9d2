// Fuzz target: shim::wire::RequestDecoder, the parser of every byte a local pcsc-lite
// client (or anything else that reaches the socket) sends.
//
// Input: [u8 chunk size (0: all at once)][client byte stream].
// Oracle: the decoder never crashes; chunked and whole-stream decoding agree exactly; the
// decoded requests re-encode to the bytes they came from (except the fields the decoder
// deliberately rewrites: |size| of header-only commands, CONNECT's byte 127); the
// documented limits hold; an error is sticky.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_util.hpp"
#include "cardbridge/pcscd_wire/wire.hpp"

using cardbridge::fuzz::ByteReader;
namespace wire = cardbridge::shim::wire;
namespace sc = cardbridge::scard;

namespace {

std::vector<uint8_t> reencode(const wire::DecodedRequest& r) {
  return std::visit(
      [&](const auto& b) -> std::vector<uint8_t> {
        using T = std::decay_t<decltype(b)>;
        if constexpr (std::is_same_v<T, wire::HeaderOnly>) {
          FUZZ_ASSERT(b.command == r.command);
          return wire::encode_request(r.command, {});
        } else if constexpr (std::is_same_v<T, wire::TransmitRequest>) {
          FUZZ_ASSERT(b.fixed.send_length <= sc::kMaxBufferSizeExtended);
          FUZZ_ASSERT(b.apdu.size() == b.fixed.send_length);
          return wire::encode_request(r.command, wire::bytes_of(b.fixed), b.apdu);
        } else if constexpr (std::is_same_v<T, wire::ControlRequest>) {
          FUZZ_ASSERT(b.fixed.send_length <= sc::kMaxBufferSizeExtended);
          FUZZ_ASSERT(b.data.size() == b.fixed.send_length);
          return wire::encode_request(r.command, wire::bytes_of(b.fixed), b.data);
        } else {
          if constexpr (std::is_same_v<T, wire::GetSetStruct>) {
            FUZZ_ASSERT(b.attr_length <= sc::kMaxBufferSize);
          }
          if constexpr (std::is_same_v<T, wire::ConnectStruct>) {
            FUZZ_ASSERT(b.reader[sc::kMaxReaderName - 1] == '\0');
            FUZZ_ASSERT(wire::read_name(b.reader).size() < sc::kMaxReaderName);
          }
          return wire::encode_request(r.command, wire::bytes_of(b));
        }
      },
      r.body);
}

struct Outcome {
  std::vector<std::vector<uint8_t>> requests;  // re-encoded
  bool error = false;
  std::size_t buffered = 0;
};

Outcome run(const std::vector<uint8_t>& stream, std::size_t chunk) {
  Outcome o;
  wire::RequestDecoder d;
  std::size_t pos = 0;
  do {
    const std::size_t n = chunk == 0 ? stream.size() : std::min(chunk, stream.size() - pos);
    d.feed(std::span<const uint8_t>(stream.data() + pos, n));
    pos += n;
    while (!o.error) {
      auto r = d.next();
      if (!r) break;
      if (!r->ok()) {
        FUZZ_ASSERT(!r->error().what.empty());
        o.error = true;
        break;
      }
      o.requests.push_back(reencode(r->value()));
    }
  } while (pos < stream.size());
  if (o.error) {
    auto again = d.next();
    FUZZ_ASSERT(again && !again->ok());  // sticky
  } else {
    o.buffered = d.buffered();
  }
  return o;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  ByteReader in({data, size});
  const std::size_t chunk = in.u8();
  const std::vector<uint8_t> stream = in.rest();

  const Outcome whole = run(stream, 0);
  const Outcome pieces = run(stream, chunk);
  FUZZ_ASSERT(whole.requests == pieces.requests);
  FUZZ_ASSERT(whole.error == pieces.error);
  FUZZ_ASSERT(whole.buffered == pieces.buffered);

  // Without an error, the requests plus what is still buffered make up the whole stream;
  // they re-encode to the input except where the decoder normalises on purpose.
  if (!whole.error) {
    std::size_t total = whole.buffered;
    for (const auto& r : whole.requests) total += r.size();
    FUZZ_ASSERT(total == stream.size());
    std::size_t pos = 0;
    for (const auto& r : whole.requests) {
      uint32_t cmd;
      std::memcpy(&cmd, stream.data() + pos + 4, 4);
      const bool header_only = cmd >= 0x12 && cmd <= 0x17;
      const bool connect = cmd == 0x04;
      for (std::size_t i = 0; i < r.size(); ++i) {
        if (header_only && i < 4) continue;  // |size| is ignored and re-encoded as 0
        if (connect && i == 8 + 4 + 127) continue;  // reader byte 127 forced to NUL
        FUZZ_ASSERT(r[i] == stream[pos + i]);
      }
      pos += r.size();
    }
  }
  return 0;
}
