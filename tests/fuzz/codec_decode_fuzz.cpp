// Fuzz target: protocol::decode() on arbitrary payloads (what a desk or server peer sends).
//
// Oracle: decode never crashes; what it accepts respects the documented limits; and a
// decoded message survives encode -> decode unchanged (the domain view loses nothing the
// codec promised to keep).
#include <cstdint>
#include <string>
#include <variant>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/support/log.hpp"
#include "fuzz_util.hpp"

namespace pr = cardbridge::protocol;

namespace {

bool name_ok(const std::string& s) {
  return s.size() <= pr::kMaxReaderNameBytes && s.find('\0') == std::string::npos;
}

void check_limits(const pr::Message& m) {
  if (const auto* h = std::get_if<pr::Hello>(&m.body)) {
    FUZZ_ASSERT(h->role == pr::Role::kDesk || h->role == pr::Role::kServer);
    FUZZ_ASSERT(h->software.size() <= pr::kMaxTextBytes && h->peer_name.size() <= pr::kMaxTextBytes);
  } else if (const auto* s = std::get_if<pr::ReaderSnapshot>(&m.body)) {
    FUZZ_ASSERT(s->readers.size() <= pr::kMaxReaders);
    for (std::size_t i = 0; i < s->readers.size(); ++i) {
      const auto& r = s->readers[i];
      FUZZ_ASSERT(!r.name.empty() && name_ok(r.name));
      FUZZ_ASSERT(r.atr.size() <= pr::kMaxAtrBytes);
      FUZZ_ASSERT(r.event_count <= 0xFFFF && (r.state >> 16) == 0);
      for (std::size_t j = 0; j < i; ++j) FUZZ_ASSERT(s->readers[j].name != r.name);
    }
  } else if (const auto* e = std::get_if<pr::Error>(&m.body)) {
    FUZZ_ASSERT(e->message.size() <= pr::kMaxTextBytes);
  } else if (const auto* q = std::get_if<pr::Request>(&m.body)) {
    FUZZ_ASSERT(m.id != 0);
    FUZZ_ASSERT(q->op != pr::Op::kUnspecified && static_cast<uint8_t>(q->op) <= pr::kMaxOp);
    FUZZ_ASSERT(name_ok(q->reader));
    FUZZ_ASSERT(q->data.size() <= pr::kMaxDataBytes && q->recv_length <= pr::kMaxDataBytes);
  } else if (const auto* p = std::get_if<pr::Reply>(&m.body)) {
    FUZZ_ASSERT(m.id != 0);
    FUZZ_ASSERT(name_ok(p->reader));
    FUZZ_ASSERT(p->data.size() <= pr::kMaxDataBytes && p->atr.size() <= pr::kMaxAtrBytes);
    FUZZ_ASSERT(p->prefetched.size() <= pr::kMaxPrefetched);
    for (const auto& f : p->prefetched) {
      FUZZ_ASSERT(f.command.size() <= pr::kMaxDataBytes && f.response.size() <= pr::kMaxDataBytes);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  cardbridge::log::init(spdlog::level::off, "fuzz");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  auto m = pr::decode({data, size});
  if (!m) {
    FUZZ_ASSERT(!m.error().what.empty());
    return 0;
  }
  check_limits(*m);
  (void)pr::describe(*m);
  const auto bytes = pr::encode(*m);
  auto again = pr::decode(bytes);
  FUZZ_ASSERT(again.ok());
  FUZZ_ASSERT(*again == *m);
  FUZZ_ASSERT(pr::encode(*again) == bytes);  // canonical from then on
  return 0;
}
