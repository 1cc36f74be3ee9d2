// Fuzz target: protocol::FrameDecoder fed in random chunks, checked against a trivial
// reference parser of the concatenated stream.
//
// Input: [u8 limit selector] then repeated [u16 chunk length][chunk bytes].
//   limit selector 0 -> kDefaultMaxFrame, otherwise selector * 16 bytes.
#include <cstdint>
#include <optional>
#include <vector>

#include "cardbridge/protocol/framing.hpp"
#include "fuzz_util.hpp"

using cardbridge::fuzz::ByteReader;
namespace pr = cardbridge::protocol;

namespace {

struct Reference {
  std::vector<std::vector<uint8_t>> frames;
  std::optional<pr::FrameError> error;
  std::size_t leftover = 0;
};

Reference parse_reference(const std::vector<uint8_t>& s, std::size_t max) {
  Reference r;
  std::size_t pos = 0;
  while (s.size() - pos >= 4) {
    const std::size_t len = (std::size_t{s[pos]} << 24) | (std::size_t{s[pos + 1]} << 16) |
                            (std::size_t{s[pos + 2]} << 8) | s[pos + 3];
    if (len > max) {
      r.error = pr::FrameError::kTooLarge;
      return r;
    }
    if (len == 0) {
      r.error = pr::FrameError::kEmpty;
      return r;
    }
    if (s.size() - pos - 4 < len) break;
    r.frames.emplace_back(s.begin() + static_cast<std::ptrdiff_t>(pos + 4),
                          s.begin() + static_cast<std::ptrdiff_t>(pos + 4 + len));
    pos += 4 + len;
  }
  r.leftover = s.size() - pos;
  return r;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  ByteReader in({data, size});
  const uint8_t sel = in.u8();
  const std::size_t max = sel == 0 ? pr::kDefaultMaxFrame : std::size_t{sel} * 16;

  pr::FrameDecoder d(max);
  std::vector<uint8_t> fed;  // what the decoder accepted, for the reference
  std::vector<std::vector<uint8_t>> got;
  bool failed = false;
  while (!in.empty()) {
    auto chunk = in.bytes(in.u16() % 4096);
    const bool ok = d.feed(chunk);
    if (failed) {
      FUZZ_ASSERT(!ok);  // sticky
    } else {
      fed.insert(fed.end(), chunk.begin(), chunk.end());
    }
    failed = failed || !ok;
    FUZZ_ASSERT(ok == !d.failed());
    while (auto f = d.next()) {
      FUZZ_ASSERT(!f->empty() && f->size() <= max);
      got.push_back(std::move(*f));
    }
  }

  const Reference ref = parse_reference(fed, max);
  FUZZ_ASSERT(got == ref.frames);
  FUZZ_ASSERT(d.error() == ref.error);
  if (!ref.error) FUZZ_ASSERT(d.buffered() == ref.leftover);

  // frame() is the inverse of the decoder.
  for (const auto& f : got) {
    pr::FrameDecoder again(max);
    FUZZ_ASSERT(again.feed(pr::frame(f)));
    auto back = again.next();
    FUZZ_ASSERT(back && *back == f);
  }
  return 0;
}
