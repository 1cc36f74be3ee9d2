// The pcsc-lite client <-> pcscd IPC, as libpcsclite 1.9.9 .. 2.5.1 speaks it
// (winscard_msg.h; facts in docs/pcsc-lite-wire.md). This is an external ABI: every struct
// is pinned with static_asserts. Native byte order (the peer is on the same host).
//
// Pure code: RequestDecoder turns a client's byte stream into typed requests and the
// encode_* functions produce reply bytes. No I/O, no state beyond the decoder's buffer.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "cardbridge/support/result.hpp"
#include "cardbridge/support/scard.hpp"

namespace cardbridge::shim::wire {

enum class Command : uint32_t {
  kEstablishContext = 0x01,
  kReleaseContext = 0x02,
  kListReaders = 0x03,  // never sent by clients; pcscd closes the connection
  kConnect = 0x04,
  kReconnect = 0x05,
  kDisconnect = 0x06,
  kBeginTransaction = 0x07,
  kEndTransaction = 0x08,
  kTransmit = 0x09,
  kControl = 0x0A,
  kStatus = 0x0B,
  kGetStatusChange = 0x0C,  // unused by clients
  kCancel = 0x0D,
  kCancelTransaction = 0x0E,  // unused by clients
  kGetAttrib = 0x0F,
  kSetAttrib = 0x10,
  kVersion = 0x11,
  kGetReadersState = 0x12,
  kWaitReaderStateChange = 0x13,
  kStopWaitingReaderStateChange = 0x14,
  kGetReaderEvents = 0x15,       // protocol 4.5+
  kGetReadersStateSize = 0x16,   // protocol 4.6
  kGetReadersStateArray = 0x17,  // protocol 4.6
};
const char* command_name(uint32_t command);

inline constexpr int32_t kProtocolMajor = 4;
inline constexpr int32_t kMinorLowest = 4;   // pcsc-lite 1.8.24
inline constexpr int32_t kMinorHighest = 6;  // pcsc-lite 2.5

// ---- the fixed structs, byte for byte (x86-64 and every LP64/ILP32 Linux ABI) ----
#pragma pack(push, 4)
struct Header {
  uint32_t size;
  uint32_t command;
};
struct VersionStruct {
  int32_t major;
  int32_t minor;
  uint32_t rv;
};
struct EstablishStruct {
  uint32_t scope;
  uint32_t context;
  uint32_t rv;
};
struct ReleaseStruct {
  uint32_t context;
  uint32_t rv;
};
struct ConnectStruct {
  uint32_t context;
  char reader[scard::kMaxReaderName];
  uint32_t share_mode;
  uint32_t preferred_protocols;
  int32_t card;
  uint32_t active_protocol;
  uint32_t rv;
};
struct ReconnectStruct {
  int32_t card;
  uint32_t share_mode;
  uint32_t preferred_protocols;
  uint32_t initialization;
  uint32_t active_protocol;
  uint32_t rv;
};
struct DisconnectStruct {
  int32_t card;
  uint32_t disposition;
  uint32_t rv;
};
struct BeginStruct {
  int32_t card;
  uint32_t rv;
};
struct EndStruct {
  int32_t card;
  uint32_t disposition;
  uint32_t rv;
};
struct CancelStruct {
  int32_t context;
  uint32_t rv;
};
struct StatusStruct {
  int32_t card;
  uint32_t rv;
};
struct TransmitStruct {
  int32_t card;
  uint32_t send_pci_protocol;
  uint32_t send_pci_length;
  uint32_t send_length;
  uint32_t recv_pci_protocol;
  uint32_t recv_pci_length;
  uint32_t recv_length;
  uint32_t rv;
};
struct ControlStruct {
  int32_t card;
  uint32_t control_code;
  uint32_t send_length;
  uint32_t recv_length;
  uint32_t bytes_returned;
  uint32_t rv;
};
struct GetSetStruct {
  int32_t card;
  uint32_t attr_id;
  uint8_t attr[scard::kMaxBufferSize];
  uint32_t attr_length;
  uint32_t rv;
};
struct WaitReaderStateChange {
  uint32_t timeout;
  uint32_t rv;
};
struct GetReaderEvents {
  uint32_t reader_events;
  uint32_t rv;
};
struct ReaderState {  // pubReaderStatesList / pubReaderState
  char name[scard::kMaxReaderName];
  uint32_t event_counter;
  uint32_t reader_state;
  int32_t reader_sharing;
  uint8_t atr[scard::kMaxAtrSize];
  uint32_t atr_length;
  uint32_t card_protocol;
};
#pragma pack(pop)

static_assert(sizeof(Header) == 8);
static_assert(sizeof(VersionStruct) == 12);
static_assert(sizeof(EstablishStruct) == 12);
static_assert(sizeof(ReleaseStruct) == 8);
static_assert(sizeof(ConnectStruct) == 152);
static_assert(offsetof(ConnectStruct, share_mode) == 132);
static_assert(offsetof(ConnectStruct, rv) == 148);
static_assert(sizeof(ReconnectStruct) == 24);
static_assert(sizeof(DisconnectStruct) == 12);
static_assert(sizeof(BeginStruct) == 8);
static_assert(sizeof(EndStruct) == 12);
static_assert(sizeof(CancelStruct) == 8);
static_assert(sizeof(StatusStruct) == 8);
static_assert(sizeof(TransmitStruct) == 32);
static_assert(sizeof(ControlStruct) == 24);
static_assert(sizeof(GetSetStruct) == 280);
static_assert(offsetof(GetSetStruct, attr_length) == 272);
static_assert(sizeof(WaitReaderStateChange) == 8);
static_assert(sizeof(GetReaderEvents) == 8);
static_assert(sizeof(ReaderState) == 184);
static_assert(offsetof(ReaderState, event_counter) == 128);
static_assert(offsetof(ReaderState, reader_sharing) == 136);
static_assert(offsetof(ReaderState, atr) == 140);
static_assert(offsetof(ReaderState, atr_length) == 176);
static_assert(offsetof(ReaderState, card_protocol) == 180);

inline constexpr std::size_t kLegacyReaderSlots = scard::kMaxReadersContexts;  // 16
inline constexpr std::size_t kLegacyArrayBytes = kLegacyReaderSlots * sizeof(ReaderState);  // 2944
static_assert(kLegacyArrayBytes == 2944);

// ---- decoded requests ----
struct TransmitRequest {
  TransmitStruct fixed;
  std::vector<uint8_t> apdu;
};
struct ControlRequest {
  ControlStruct fixed;
  std::vector<uint8_t> data;
};
struct HeaderOnly {
  Command command;
};

using Request = std::variant<VersionStruct, EstablishStruct, ReleaseStruct, ConnectStruct,
                             ReconnectStruct, DisconnectStruct, BeginStruct, EndStruct,
                             CancelStruct, StatusStruct, TransmitRequest, ControlRequest,
                             GetSetStruct, HeaderOnly>;
// GET_ATTRIB and SET_ATTRIB share GetSetStruct; |set| tells them apart.
struct DecodedRequest {
  Command command;
  Request body;
};

struct WireError {
  std::string what;
};

// Reassembles requests from a client's byte stream. Mirrors pcscd 1.9.9's strictness:
// a body size different from the struct size, an unknown or unused command, or an
// oversized buffer is an error (pcscd closes the connection; so do we).
class RequestDecoder {
 public:
  void feed(std::span<const uint8_t> bytes);
  // nullopt: need more bytes. An error is sticky.
  std::optional<Result<DecodedRequest, WireError>> next();
  std::size_t buffered() const { return buf_.size() - pos_; }

 private:
  std::vector<uint8_t> buf_;
  std::size_t pos_ = 0;
  std::optional<WireError> error_;
};

// ---- replies ----
template <typename T>
std::vector<uint8_t> bytes_of(const T& s) {
  const auto* p = reinterpret_cast<const uint8_t*>(&s);
  return std::vector<uint8_t>(p, p + sizeof(T));
}
// Struct followed by |data| (TRANSMIT/CONTROL replies when rv == 0).
template <typename T>
std::vector<uint8_t> bytes_of(const T& s, std::span<const uint8_t> data) {
  auto out = bytes_of(s);
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

// Writes a NUL-padded reader name (cut at 127 bytes) into a fixed field.
void copy_name(char (&dst)[scard::kMaxReaderName], std::string_view name);
// The name in a fixed field (up to the first NUL; byte 127 is forced to NUL like pcscd).
std::string read_name(const char (&src)[scard::kMaxReaderName]);

// Builds a request as a 1.9.9 client would send it (tests and fuzz seeds).
std::vector<uint8_t> encode_request(Command c, std::span<const uint8_t> body,
                                    std::span<const uint8_t> trailing = {});

}  // namespace cardbridge::shim::wire
