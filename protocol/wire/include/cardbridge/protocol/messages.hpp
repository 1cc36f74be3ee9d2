// Domain view of the desk <-> server messages (cardbridge.v1). The generated protobuf
// types never leave protocol/: codec.hpp converts between the two.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

namespace cardbridge::protocol {

using Bytes = std::vector<uint8_t>;

// Server-chosen id of a PC/SC context on the desk (one per server-side context).
struct ContextId {
  uint32_t value = 0;
  friend bool operator==(ContextId, ContextId) = default;
  friend auto operator<=>(ContextId, ContextId) = default;
};
// Desk-chosen id of a card handle (never a raw SCARDHANDLE).
struct DeskHandle {
  uint32_t value = 0;
  friend bool operator==(DeskHandle, DeskHandle) = default;
  friend auto operator<=>(DeskHandle, DeskHandle) = default;
};

enum class Role : uint8_t { kUnspecified = 0, kDesk = 1, kServer = 2 };

struct Hello {
  uint32_t version_major = 0;
  uint32_t version_minor = 0;
  uint64_t capabilities = 0;
  Role role = Role::kUnspecified;
  std::string software;
  std::string peer_name;
  uint64_t instance = 0;
  bool reply = false;
  friend bool operator==(const Hello&, const Hello&) = default;
};

struct ReaderInfo {
  std::string name;
  uint32_t state = 0;        // SCARD_STATE_* (without CHANGED/IGNORE and the counter bits)
  uint32_t event_count = 0;  // 0..0xFFFF
  Bytes atr;
  // The desk's card image for the card (capability card-image; ImageState values).
  uint32_t image = 0;
  friend bool operator==(const ReaderInfo&, const ReaderInfo&) = default;
};

// ReaderInfo.image: what the desk holds of the card's public files.
namespace image_state {
inline constexpr uint32_t kNone = 0;      // nothing (or it was voided: copies must go)
inline constexpr uint32_t kPartial = 1;   // being read; what is there is valid
inline constexpr uint32_t kComplete = 2;  // every file programs were seen to read
inline constexpr uint32_t kMax = 2;
}  // namespace image_state

struct ReaderSnapshot {
  uint64_t sequence = 0;
  std::vector<ReaderInfo> readers;
  // 0: the desk's PC/SC service answers; else the error it fails with (SCARD_E_NO_SERVICE).
  // Capability desk-service.
  uint32_t service_rv = 0;
  friend bool operator==(const ReaderSnapshot&, const ReaderSnapshot&) = default;
};

enum class ErrorCode : uint32_t {
  kUnspecified = 0,
  kMalformed = 1,        // a frame or message could not be decoded
  kVersion = 2,          // no common protocol version
  kUnexpected = 3,       // a valid message at the wrong time
  kLimit = 4,            // a size or count limit was exceeded
  kShutdown = 5,         // the sender is going away
};

struct Error {
  ErrorCode code = ErrorCode::kUnspecified;
  std::string message;
  friend bool operator==(const Error&, const Error&) = default;
};

enum class Op : uint8_t {
  kUnspecified = 0,
  kEstablishContext = 1,
  kReleaseContext = 2,
  kConnect = 3,
  kReconnect = 4,
  kDisconnect = 5,
  kBeginTransaction = 6,
  kEndTransaction = 7,
  kTransmit = 8,
  kControl = 9,
  kGetAttrib = 10,
  kSetAttrib = 11,
  kStatus = 12,
  kPing = 13,
};
inline constexpr uint8_t kMaxOp = 13;
const char* op_name(Op op);

// Request flags (each gated by a capability; see version.hpp).
namespace request_flags {
// Perform SCardBeginTransaction on the handle before the operation (deferred Begin).
inline constexpr uint32_t kBeginFirst = 1u << 0;
// Transmit: the desk may answer a 61xx with a speculative GET RESPONSE.
inline constexpr uint32_t kPrefetchGetResponse = 1u << 1;
// Transmit: the desk may read ahead after a READ BINARY, bounded by |recv_length| chunks.
inline constexpr uint32_t kReadAhead = 1u << 2;
// Connect: attach the card's image to the reply (capability card-image).
inline constexpr uint32_t kWantImage = 1u << 3;
}  // namespace request_flags

struct Request {
  Op op = Op::kUnspecified;
  ContextId context;
  DeskHandle handle;
  std::string reader;
  uint32_t share_mode = 0;
  uint32_t protocols = 0;
  uint32_t disposition = 0;
  uint32_t code = 0;
  Bytes data;
  uint32_t recv_length = 0;
  uint32_t flags = 0;
  uint32_t recv_protocol = 0;
  // Earlier requests (of other contexts) the desk finishes before starting this one
  // (capability kDeskOrdering; at most kMaxAfter ids).
  std::vector<uint32_t> after;
  // Transmit: commands the desk sends first (capability card-image; at most kMaxPrelude).
  std::vector<Bytes> prelude;
  friend bool operator==(const Request&, const Request&) = default;
};

struct Prefetched {
  Bytes command;
  Bytes response;
  friend bool operator==(const Prefetched&, const Prefetched&) = default;
};

// The card image (capability card-image, docs/protocol.md): the card's answers to the
// absolute SELECTs programs send and the content of the public files they read.
struct ImageSelect {
  Bytes command;
  Bytes response;  // data + SW
  Bytes fetched;   // after 61xx: the answer to GET RESPONSE Le = SW2 (data + SW)
  friend bool operator==(const ImageSelect&, const ImageSelect&) = default;
};
struct ImageFile {
  Bytes key;  // card_image::select_key()
  Bytes content;
  friend bool operator==(const ImageFile&, const ImageFile&) = default;
};
struct CardImage {
  uint32_t event_count = 0;
  bool complete = false;
  uint32_t send_protocol = 0;
  uint32_t recv_protocol = 0;
  std::vector<ImageSelect> selects;
  std::vector<ImageFile> files;
  friend bool operator==(const CardImage&, const CardImage&) = default;
};

struct Reply {
  uint32_t rv = 0;
  DeskHandle handle;
  uint32_t protocol = 0;
  Bytes data;
  uint32_t length = 0;
  std::string reader;
  uint32_t state = 0;
  Bytes atr;
  std::vector<Prefetched> prefetched;
  uint32_t begin_rv = 0;
  uint32_t card_protocol = 0;
  std::optional<CardImage> image;     // Connect with kWantImage
  std::vector<Bytes> prelude_answers;  // Transmit with a prelude
  friend bool operator==(const Reply&, const Reply&) = default;
};

using Body = std::variant<Hello, ReaderSnapshot, Error, Request, Reply>;

struct Message {
  uint32_t id = 0;
  Body body;
  friend bool operator==(const Message&, const Message&) = default;
};

}  // namespace cardbridge::protocol
