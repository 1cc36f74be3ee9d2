#include "cardbridge/protocol/codec.hpp"

#include <algorithm>
#include <optional>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "cardbridge/protocol/framing.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/redact.hpp"
#include "cardbridge/v1/cardbridge.pb.h"

namespace cardbridge::protocol {
namespace pb = ::cardbridge::v1;

const char* op_name(Op op) {
  switch (op) {
    case Op::kUnspecified: return "unspecified";
    case Op::kEstablishContext: return "establish-context";
    case Op::kReleaseContext: return "release-context";
    case Op::kConnect: return "connect";
    case Op::kReconnect: return "reconnect";
    case Op::kDisconnect: return "disconnect";
    case Op::kBeginTransaction: return "begin-transaction";
    case Op::kEndTransaction: return "end-transaction";
    case Op::kTransmit: return "transmit";
    case Op::kControl: return "control";
    case Op::kGetAttrib: return "get-attrib";
    case Op::kSetAttrib: return "set-attrib";
    case Op::kStatus: return "status";
    case Op::kPing: return "ping";
  }
  return "?";
}

namespace {

Bytes to_bytes(const std::string& s) { return Bytes(s.begin(), s.end()); }
std::string to_string(const Bytes& b) { return std::string(b.begin(), b.end()); }

// ---- encode ----

void fill(pb::Hello& out, const Hello& h) {
  out.set_version_major(h.version_major);
  out.set_version_minor(h.version_minor);
  out.set_capabilities(h.capabilities);
  out.set_role(static_cast<pb::Hello_Role>(h.role));
  out.set_software(h.software);
  out.set_peer_name(h.peer_name);
  out.set_instance(h.instance);
  out.set_reply(h.reply);
}

void fill(pb::ReaderSnapshot& out, const ReaderSnapshot& s) {
  out.set_sequence(s.sequence);
  out.set_service_rv(s.service_rv);
  for (const auto& r : s.readers) {
    auto* pr = out.add_readers();
    pr->set_name(r.name);
    pr->set_state(r.state);
    pr->set_event_count(r.event_count);
    pr->set_atr(to_string(r.atr));
    pr->set_image(r.image);
  }
}

void fill(pb::Error& out, const Error& e) {
  out.set_code(static_cast<uint32_t>(e.code));
  out.set_message(e.message);
}

void fill(pb::Request& out, const Request& r) {
  out.set_op(static_cast<pb::Request_Op>(r.op));
  out.set_context(r.context.value);
  out.set_handle(r.handle.value);
  out.set_reader(r.reader);
  out.set_share_mode(r.share_mode);
  out.set_protocols(r.protocols);
  out.set_disposition(r.disposition);
  out.set_code(r.code);
  out.set_data(to_string(r.data));
  out.set_recv_length(r.recv_length);
  out.set_flags(r.flags);
  out.set_recv_protocol(r.recv_protocol);
  for (uint32_t a : r.after) out.add_after(a);
  for (const auto& c : r.prelude) out.add_prelude(to_string(c));
}

void fill(pb::CardImage& out, const CardImage& im) {
  out.set_event_count(im.event_count);
  out.set_complete(im.complete);
  out.set_send_protocol(im.send_protocol);
  out.set_recv_protocol(im.recv_protocol);
  for (const auto& s : im.selects) {
    auto* ps = out.add_selects();
    ps->set_command(to_string(s.command));
    ps->set_response(to_string(s.response));
    ps->set_fetched(to_string(s.fetched));
  }
  for (const auto& f : im.files) {
    auto* pf = out.add_files();
    pf->set_key(to_string(f.key));
    pf->set_content(to_string(f.content));
  }
}

void fill(pb::Reply& out, const Reply& r) {
  out.set_rv(r.rv);
  out.set_handle(r.handle.value);
  out.set_protocol(r.protocol);
  out.set_data(to_string(r.data));
  out.set_length(r.length);
  out.set_reader(r.reader);
  out.set_state(r.state);
  out.set_atr(to_string(r.atr));
  for (const auto& p : r.prefetched) {
    auto* pp = out.add_prefetched();
    pp->set_command(to_string(p.command));
    pp->set_response(to_string(p.response));
  }
  out.set_begin_rv(r.begin_rv);
  out.set_card_protocol(r.card_protocol);
  if (r.image) fill(*out.mutable_image(), *r.image);
  for (const auto& a : r.prelude_answers) out.add_prelude_answers(to_string(a));
}

// ---- decode ----

using R = Result<Body, DecodeError>;

DecodeError bad(std::string what) { return DecodeError{std::move(what)}; }

bool name_ok(const std::string& s) {
  return s.size() <= kMaxReaderNameBytes && s.find('\0') == std::string::npos;
}

R from(const pb::Hello& h) {
  if (h.software().size() > kMaxTextBytes || h.peer_name().size() > kMaxTextBytes)
    return unexpected(bad("hello: text field too long"));
  if (h.role() != pb::Hello::ROLE_DESK && h.role() != pb::Hello::ROLE_SERVER)
    return unexpected(bad("hello: unknown role"));
  Hello out;
  out.version_major = h.version_major();
  out.version_minor = h.version_minor();
  out.capabilities = h.capabilities();
  out.role = static_cast<Role>(h.role());
  out.software = h.software();
  out.peer_name = h.peer_name();
  out.instance = h.instance();
  out.reply = h.reply();
  return Body{std::move(out)};
}

R from(const pb::ReaderSnapshot& s) {
  if (static_cast<std::size_t>(s.readers_size()) > kMaxReaders)
    return unexpected(bad("reader snapshot: too many readers"));
  ReaderSnapshot out;
  out.sequence = s.sequence();
  out.service_rv = s.service_rv();
  for (const auto& r : s.readers()) {
    if (r.name().empty() || !name_ok(r.name()))
      return unexpected(bad("reader snapshot: bad reader name"));
    if (r.atr().size() > kMaxAtrBytes) return unexpected(bad("reader snapshot: ATR too long"));
    if (r.event_count() > 0xFFFF) return unexpected(bad("reader snapshot: event count > 16 bits"));
    if (r.state() & 0xFFFF0000u) return unexpected(bad("reader snapshot: state has counter bits"));
    if (r.image() > image_state::kMax) return unexpected(bad("reader snapshot: unknown image state"));
    for (const auto& other : out.readers) {
      if (other.name == r.name()) return unexpected(bad("reader snapshot: duplicate reader name"));
    }
    out.readers.push_back(ReaderInfo{r.name(), r.state(), r.event_count(), to_bytes(r.atr()), r.image()});
  }
  return Body{std::move(out)};
}

R from(const pb::Error& e) {
  if (e.message().size() > kMaxTextBytes) return unexpected(bad("error: message too long"));
  return Body{Error{static_cast<ErrorCode>(e.code()), e.message()}};
}

R from(const pb::Request& r) {
  auto op = static_cast<uint32_t>(r.op());
  if (op == 0 || op > kMaxOp) return unexpected(bad(fmt::format("request: unknown op {}", op)));
  if (!name_ok(r.reader())) return unexpected(bad("request: bad reader name"));
  if (r.data().size() > kMaxDataBytes) return unexpected(bad("request: data too long"));
  if (r.recv_length() > kMaxDataBytes) return unexpected(bad("request: receive length too large"));
  if (static_cast<std::size_t>(r.after_size()) > kMaxAfter) return unexpected(bad("request: too many ordering ids"));
  if (static_cast<std::size_t>(r.prelude_size()) > kMaxPrelude) return unexpected(bad("request: prelude too long"));
  for (const auto& c : r.prelude()) {
    if (c.size() < 4 || c.size() > kMaxShortApduBytes) return unexpected(bad("request: bad prelude command"));
  }
  Request out;
  out.op = static_cast<Op>(op);
  out.context = ContextId{r.context()};
  out.handle = DeskHandle{r.handle()};
  out.reader = r.reader();
  out.share_mode = r.share_mode();
  out.protocols = r.protocols();
  out.disposition = r.disposition();
  out.code = r.code();
  out.data = to_bytes(r.data());
  out.recv_length = r.recv_length();
  out.flags = r.flags();
  out.recv_protocol = r.recv_protocol();
  out.after.assign(r.after().begin(), r.after().end());
  for (const auto& c : r.prelude()) out.prelude.push_back(to_bytes(c));
  return Body{std::move(out)};
}

// The card image: every count and size bounded (it is held in memory until the card goes).
Result<CardImage, DecodeError> from(const pb::CardImage& im) {
  if (static_cast<std::size_t>(im.selects_size()) > kMaxImageSelects) return unexpected(bad("image: too many selects"));
  if (static_cast<std::size_t>(im.files_size()) > kMaxImageFiles) return unexpected(bad("image: too many files"));
  if (im.event_count() > 0xFFFF) return unexpected(bad("image: event count > 16 bits"));
  CardImage out;
  out.event_count = im.event_count();
  out.complete = im.complete();
  out.send_protocol = im.send_protocol();
  out.recv_protocol = im.recv_protocol();
  std::size_t total = 0;
  for (const auto& s : im.selects()) {
    if (s.command().size() < 4 || s.command().size() > kMaxShortApduBytes || s.response().size() < 2 ||
        s.response().size() > kMaxShortResponseBytes || s.fetched().size() > kMaxShortResponseBytes ||
        s.fetched().size() == 1)
      return unexpected(bad("image: bad select entry"));
    Bytes command = to_bytes(s.command());
    for (const auto& other : out.selects) {
      if (other.command == command) return unexpected(bad("image: duplicate select"));
    }
    total += s.command().size() + s.response().size() + s.fetched().size();
    out.selects.push_back(ImageSelect{std::move(command), to_bytes(s.response()), to_bytes(s.fetched())});
  }
  for (const auto& f : im.files()) {
    if (f.key().empty() || f.key().size() > kMaxImageKeyBytes || f.content().size() > kMaxImageFileBytes)
      return unexpected(bad("image: bad file entry"));
    Bytes key = to_bytes(f.key());
    for (const auto& other : out.files) {
      if (other.key == key) return unexpected(bad("image: duplicate file"));
    }
    total += f.key().size() + f.content().size();
    out.files.push_back(ImageFile{std::move(key), to_bytes(f.content())});
  }
  if (total > kMaxImageBytes) return unexpected(bad("image: too large"));
  return out;
}

R from(const pb::Reply& r) {
  if (r.data().size() > kMaxDataBytes) return unexpected(bad("reply: data too long"));
  if (!name_ok(r.reader())) return unexpected(bad("reply: bad reader name"));
  if (r.atr().size() > kMaxAtrBytes) return unexpected(bad("reply: ATR too long"));
  if (static_cast<std::size_t>(r.prefetched_size()) > kMaxPrefetched)
    return unexpected(bad("reply: too many prefetched answers"));
  Reply out;
  out.rv = r.rv();
  out.handle = DeskHandle{r.handle()};
  out.protocol = r.protocol();
  out.data = to_bytes(r.data());
  out.length = r.length();
  out.reader = r.reader();
  out.state = r.state();
  out.atr = to_bytes(r.atr());
  for (const auto& p : r.prefetched()) {
    if (p.command().size() > kMaxDataBytes || p.response().size() > kMaxDataBytes)
      return unexpected(bad("reply: prefetched answer too long"));
    out.prefetched.push_back(Prefetched{to_bytes(p.command()), to_bytes(p.response())});
  }
  out.begin_rv = r.begin_rv();
  out.card_protocol = r.card_protocol();
  if (r.has_image()) {
    auto image = from(r.image());
    if (!image) return unexpected(image.error());
    out.image = std::move(*image);
  }
  if (static_cast<std::size_t>(r.prelude_answers_size()) > kMaxPrelude)
    return unexpected(bad("reply: too many prelude answers"));
  for (const auto& a : r.prelude_answers()) {
    if (a.size() > kMaxShortResponseBytes) return unexpected(bad("reply: prelude answer too long"));
    out.prelude_answers.push_back(to_bytes(a));
  }
  return Body{std::move(out)};
}

// ---- bounds on repeated fields, before parsing ----
//
// The protobuf parser allocates one element per occurrence of a repeated field before
// from() can count them: an empty ReaderInfo costs 2 bytes on the wire and ~100 bytes
// parsed, so a 512 KiB frame of them would be ~25 MiB before being refused. This scan
// walks the wire format (tags and lengths only, nothing allocated) and counts the
// repeated fields of the bodies we decode, across every occurrence of a body (protobuf
// merges repeated occurrences of a message field): ReaderSnapshot.readers, Reply.prefetched
// and Request.after (packed or not). Anything it cannot walk is refused as the parser would.

class WireScanner {
 public:
  explicit WireScanner(std::span<const uint8_t> bytes) : b_(bytes) {}
  bool done() const { return pos_ >= b_.size(); }

  bool varint(uint64_t& v) {
    v = 0;
    for (unsigned shift = 0; shift < 64; shift += 7) {
      if (pos_ >= b_.size()) return false;
      const uint8_t c = b_[pos_++];
      v |= static_cast<uint64_t>(c & 0x7F) << shift;
      if ((c & 0x80) == 0) return true;
    }
    return false;  // more than 10 bytes
  }
  // The next field: its number, wire type and, for length-delimited fields, its bytes.
  // Every other field is skipped. False: truncated or not protobuf (groups included).
  bool field(uint32_t& number, uint32_t& type, std::span<const uint8_t>& delimited) {
    uint64_t tag = 0;
    if (!varint(tag) || (tag >> 3) == 0 || (tag >> 3) > 0x1FFFFFFF) return false;
    number = static_cast<uint32_t>(tag >> 3);
    type = static_cast<uint32_t>(tag & 7);
    uint64_t v = 0;
    switch (type) {
      case 0: return varint(v);
      case 1: return skip(8);
      case 5: return skip(4);
      case 2:
        if (!varint(v) || v > b_.size() - pos_) return false;
        delimited = b_.subspan(pos_, static_cast<std::size_t>(v));
        pos_ += static_cast<std::size_t>(v);
        return true;
      default: return false;
    }
  }

 private:
  bool skip(std::size_t n) {
    if (n > b_.size() - pos_) return false;
    pos_ += n;
    return true;
  }
  std::span<const uint8_t> b_;
  std::size_t pos_ = 0;
};

struct RepeatedCounts {
  std::size_t readers = 0;
  std::size_t prefetched = 0;
  std::size_t after = 0;
};

enum class Counted { kSnapshot, kRequest, kReply };

// Counts |body|'s repeated fields into |n|. False: not walkable.
bool count_repeated(std::span<const uint8_t> body, Counted kind, RepeatedCounts& n) {
  WireScanner w(body);
  while (!w.done()) {
    uint32_t number = 0, type = 0;
    std::span<const uint8_t> inner;
    if (!w.field(number, type, inner)) return false;
    if (kind == Counted::kSnapshot && number == 2 && type == 2) ++n.readers;
    if (kind == Counted::kReply && number == 9 && type == 2) ++n.prefetched;
    if (kind == Counted::kRequest && number == 13) {
      if (type == 0) ++n.after;
      if (type == 2) {  // packed: one varint per element, each ending with a byte below 0x80
        for (uint8_t c : inner) n.after += (c & 0x80) == 0;
      }
    }
    if (n.readers > kMaxReaders || n.prefetched > kMaxPrefetched || n.after > kMaxAfter) return true;
  }
  return true;
}

// nullopt when |payload| may be parsed; else why not.
std::optional<std::string> repeated_fields_over_limits(std::span<const uint8_t> payload) {
  RepeatedCounts n;
  WireScanner w(payload);
  while (!w.done()) {
    uint32_t number = 0, type = 0;
    std::span<const uint8_t> inner;
    if (!w.field(number, type, inner)) return "not a valid cardbridge.v1 envelope";
    if (type != 2) continue;
    bool ok = true;
    if (number == 3) ok = count_repeated(inner, Counted::kSnapshot, n);
    if (number == 5) ok = count_repeated(inner, Counted::kRequest, n);
    if (number == 6) ok = count_repeated(inner, Counted::kReply, n);
    if (!ok) return "not a valid cardbridge.v1 envelope";
    if (n.readers > kMaxReaders) return "reader snapshot: too many readers";
    if (n.prefetched > kMaxPrefetched) return "reply: too many prefetched answers";
    if (n.after > kMaxAfter) return "request: too many ordering ids";
  }
  return std::nullopt;
}

}  // namespace

std::vector<uint8_t> encode(const Message& m) {
  pb::Envelope env;
  env.set_id(m.id);
  std::visit(
      [&env](const auto& b) {
        using T = std::decay_t<decltype(b)>;
        if constexpr (std::is_same_v<T, Hello>) fill(*env.mutable_hello(), b);
        if constexpr (std::is_same_v<T, ReaderSnapshot>) fill(*env.mutable_readers(), b);
        if constexpr (std::is_same_v<T, Error>) fill(*env.mutable_error(), b);
        if constexpr (std::is_same_v<T, Request>) fill(*env.mutable_request(), b);
        if constexpr (std::is_same_v<T, Reply>) fill(*env.mutable_reply(), b);
      },
      m.body);
  std::vector<uint8_t> out(env.ByteSizeLong());
  env.SerializeWithCachedSizesToArray(out.data());
  return out;
}

std::vector<uint8_t> encode_frame(const Message& m) {
  auto payload = encode(m);
  return frame(payload);
}

Result<Message, DecodeError> decode(std::span<const uint8_t> payload) {
  if (payload.size() > kDefaultMaxFrame) return unexpected(bad("message too large"));
  if (auto why = repeated_fields_over_limits(payload)) return unexpected(bad(std::move(*why)));
  pb::Envelope env;
  if (!env.ParseFromArray(payload.data(), static_cast<int>(payload.size())))
    return unexpected(bad("not a valid cardbridge.v1 envelope"));
  R body = [&]() -> R {
    switch (env.body_case()) {
      case pb::Envelope::kHello: return from(env.hello());
      case pb::Envelope::kReaders: return from(env.readers());
      case pb::Envelope::kError: return from(env.error());
      case pb::Envelope::kRequest: return from(env.request());
      case pb::Envelope::kReply: return from(env.reply());
      case pb::Envelope::BODY_NOT_SET: break;
    }
    return unexpected(bad("envelope without a known body"));
  }();
  if (!body) return unexpected(body.error());
  const bool needs_id = std::holds_alternative<Request>(*body) || std::holds_alternative<Reply>(*body);
  if (needs_id && env.id() == 0) return unexpected(bad("request or reply without an id"));
  return Message{env.id(), std::move(*body)};
}

std::string describe(const Message& m) {
  return std::visit(
      [&m](const auto& b) -> std::string {
        using T = std::decay_t<decltype(b)>;
        if constexpr (std::is_same_v<T, Hello>) {
          return fmt::format("hello{} v{}.{} role={} caps=0x{:x} software='{}' peer='{}'",
                             b.reply ? "-reply" : "", b.version_major, b.version_minor,
                             static_cast<int>(b.role), b.capabilities, log::printable(b.software),
                             log::printable(b.peer_name));
        } else if constexpr (std::is_same_v<T, ReaderSnapshot>) {
          return b.service_rv ? fmt::format("readers seq={} count={} service_rv=0x{:08X}", b.sequence, b.readers.size(), b.service_rv)
                              : fmt::format("readers seq={} count={}", b.sequence, b.readers.size());
        } else if constexpr (std::is_same_v<T, Error>) {
          return fmt::format("error {} '{}'", static_cast<uint32_t>(b.code), log::printable(b.message));
        } else if constexpr (std::is_same_v<T, Request>) {
          // The length of a PIN-bearing APDU or of a control buffer (PIN-pad structures)
          // would tell a PIN's length: not shown. A prelude is counted, never described.
          const bool hide = (b.op == Op::kTransmit && redact::apdu_carries_pin(b.data)) || b.op == Op::kControl;
          return fmt::format("request #{} {} ctx={} handle={} len={} flags=0x{:x}{}{}", m.id, op_name(b.op),
                             b.context.value, b.handle.value, hide ? std::string("hidden") : std::to_string(b.data.size()), b.flags,
                             b.after.empty() ? std::string{} : fmt::format(" after={}", fmt::join(b.after, ",")),
                             b.prelude.empty() ? std::string{} : fmt::format(" prelude={}", b.prelude.size()));
        } else {
          // The image's content is never described: only how much of it there is.
          return fmt::format("reply #{} rv=0x{:08X} len={}{}", m.id, b.rv, b.data.size(),
                             b.image ? fmt::format(" image={}+{}{}", b.image->selects.size(), b.image->files.size(),
                                                   b.image->complete ? "" : " partial")
                                     : std::string{});
        }
      },
      m.body);
}

}  // namespace cardbridge::protocol
