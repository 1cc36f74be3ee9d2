#include "cardbridge/pcscd_wire/wire.hpp"

#include <cstring>

#include <fmt/format.h>

namespace cardbridge::shim::wire {

const char* command_name(uint32_t command) {
  switch (static_cast<Command>(command)) {
    case Command::kEstablishContext: return "ESTABLISH_CONTEXT";
    case Command::kReleaseContext: return "RELEASE_CONTEXT";
    case Command::kListReaders: return "LIST_READERS";
    case Command::kConnect: return "CONNECT";
    case Command::kReconnect: return "RECONNECT";
    case Command::kDisconnect: return "DISCONNECT";
    case Command::kBeginTransaction: return "BEGIN_TRANSACTION";
    case Command::kEndTransaction: return "END_TRANSACTION";
    case Command::kTransmit: return "TRANSMIT";
    case Command::kControl: return "CONTROL";
    case Command::kStatus: return "STATUS";
    case Command::kGetStatusChange: return "GET_STATUS_CHANGE";
    case Command::kCancel: return "CANCEL";
    case Command::kCancelTransaction: return "CANCEL_TRANSACTION";
    case Command::kGetAttrib: return "GET_ATTRIB";
    case Command::kSetAttrib: return "SET_ATTRIB";
    case Command::kVersion: return "CMD_VERSION";
    case Command::kGetReadersState: return "CMD_GET_READERS_STATE";
    case Command::kWaitReaderStateChange: return "CMD_WAIT_READER_STATE_CHANGE";
    case Command::kStopWaitingReaderStateChange: return "CMD_STOP_WAITING_READER_STATE_CHANGE";
    case Command::kGetReaderEvents: return "CMD_GET_READER_EVENTS";
    case Command::kGetReadersStateSize: return "CMD_GET_READERS_STATE_SIZE";
    case Command::kGetReadersStateArray: return "CMD_GET_READERS_STATE_ARRAY";
  }
  return "UNKNOWN";
}

namespace {

// Size of the fixed struct for commands with a body; 0 for header-only commands;
// nullopt for commands we refuse (unknown, or never sent by a real client).
std::optional<std::size_t> body_size(uint32_t command) {
  switch (static_cast<Command>(command)) {
    case Command::kEstablishContext: return sizeof(EstablishStruct);
    case Command::kReleaseContext: return sizeof(ReleaseStruct);
    case Command::kConnect: return sizeof(ConnectStruct);
    case Command::kReconnect: return sizeof(ReconnectStruct);
    case Command::kDisconnect: return sizeof(DisconnectStruct);
    case Command::kBeginTransaction: return sizeof(BeginStruct);
    case Command::kEndTransaction: return sizeof(EndStruct);
    case Command::kTransmit: return sizeof(TransmitStruct);
    case Command::kControl: return sizeof(ControlStruct);
    case Command::kStatus: return sizeof(StatusStruct);
    case Command::kCancel: return sizeof(CancelStruct);
    case Command::kGetAttrib: return sizeof(GetSetStruct);
    case Command::kSetAttrib: return sizeof(GetSetStruct);
    case Command::kVersion: return sizeof(VersionStruct);
    case Command::kGetReadersState:
    case Command::kWaitReaderStateChange:
    case Command::kStopWaitingReaderStateChange:
    case Command::kGetReaderEvents:
    case Command::kGetReadersStateSize:
    case Command::kGetReadersStateArray:
      return 0;
    case Command::kListReaders:
    case Command::kGetStatusChange:
    case Command::kCancelTransaction:
      return std::nullopt;
  }
  return std::nullopt;
}

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace

void RequestDecoder::feed(std::span<const uint8_t> bytes) {
  if (error_) return;
  if (pos_ > 0 && pos_ == buf_.size()) {
    buf_.clear();
    pos_ = 0;
  }
  buf_.insert(buf_.end(), bytes.begin(), bytes.end());
}

std::optional<Result<DecodedRequest, WireError>> RequestDecoder::next() {
  using R = Result<DecodedRequest, WireError>;
  if (error_) return R(unexpected(*error_));
  const std::size_t avail = buf_.size() - pos_;
  if (avail < sizeof(Header)) return std::nullopt;
  const uint8_t* p = buf_.data() + pos_;
  const auto header = load<Header>(p);
  const auto expected = body_size(header.command);
  auto fail = [this](std::string what) {
    error_ = WireError{std::move(what)};
    return std::optional<R>(R(unexpected(*error_)));
  };
  if (!expected) {
    return fail(fmt::format("unsupported command 0x{:02X} ({})", header.command,
                            command_name(header.command)));
  }
  const auto command = static_cast<Command>(header.command);
  if (*expected == 0) {  // header only: pcscd does not look at |size|
    pos_ += sizeof(Header);
    return R(DecodedRequest{command, HeaderOnly{command}});
  }
  if (header.size != *expected) {
    return fail(fmt::format("{}: body size {} instead of {}", command_name(header.command),
                            header.size, *expected));
  }
  if (avail < sizeof(Header) + *expected) return std::nullopt;
  const uint8_t* body = p + sizeof(Header);
  std::size_t consumed = sizeof(Header) + *expected;

  auto done = [&](Request r) {
    pos_ += consumed;
    if (pos_ == buf_.size()) {
      buf_.clear();
      pos_ = 0;
    }
    return std::optional<R>(R(DecodedRequest{command, std::move(r)}));
  };

  switch (command) {
    case Command::kEstablishContext: return done(load<EstablishStruct>(body));
    case Command::kReleaseContext: return done(load<ReleaseStruct>(body));
    case Command::kConnect: {
      auto s = load<ConnectStruct>(body);
      s.reader[scard::kMaxReaderName - 1] = '\0';  // as pcscd does
      return done(s);
    }
    case Command::kReconnect: return done(load<ReconnectStruct>(body));
    case Command::kDisconnect: return done(load<DisconnectStruct>(body));
    case Command::kBeginTransaction: return done(load<BeginStruct>(body));
    case Command::kEndTransaction: return done(load<EndStruct>(body));
    case Command::kStatus: return done(load<StatusStruct>(body));
    case Command::kCancel: return done(load<CancelStruct>(body));
    case Command::kVersion: return done(load<VersionStruct>(body));
    case Command::kGetAttrib:
    case Command::kSetAttrib: {
      auto s = load<GetSetStruct>(body);
      if (s.attr_length > scard::kMaxBufferSize) {
        return fail(fmt::format("{}: attribute length {} above {}", command_name(header.command),
                                s.attr_length, scard::kMaxBufferSize));
      }
      return done(s);
    }
    case Command::kTransmit: {
      auto s = load<TransmitStruct>(body);
      if (s.send_length > scard::kMaxBufferSizeExtended) {
        return fail(fmt::format("TRANSMIT: send length {} above {}", s.send_length,
                                scard::kMaxBufferSizeExtended));
      }
      if (avail < consumed + s.send_length) return std::nullopt;
      const uint8_t* data = body + sizeof(TransmitStruct);
      TransmitRequest t{s, std::vector<uint8_t>(data, data + s.send_length)};
      consumed += s.send_length;
      return done(std::move(t));
    }
    case Command::kControl: {
      auto s = load<ControlStruct>(body);
      if (s.send_length > scard::kMaxBufferSizeExtended) {
        return fail(fmt::format("CONTROL: send length {} above {}", s.send_length,
                                scard::kMaxBufferSizeExtended));
      }
      if (avail < consumed + s.send_length) return std::nullopt;
      const uint8_t* data = body + sizeof(ControlStruct);
      ControlRequest c{s, std::vector<uint8_t>(data, data + s.send_length)};
      consumed += s.send_length;
      return done(std::move(c));
    }
    default: break;
  }
  return fail("internal: unhandled command");
}

void copy_name(char (&dst)[scard::kMaxReaderName], std::string_view name) {
  std::memset(dst, 0, sizeof dst);
  if (!name.empty()) std::memcpy(dst, name.data(), std::min(name.size(), sizeof dst - 1));
}

std::string read_name(const char (&src)[scard::kMaxReaderName]) {
  return std::string(src, strnlen(src, sizeof src - 1));
}

std::vector<uint8_t> encode_request(Command c, std::span<const uint8_t> body,
                                    std::span<const uint8_t> trailing) {
  Header h{static_cast<uint32_t>(body.size()), static_cast<uint32_t>(c)};
  auto out = bytes_of(h);
  out.insert(out.end(), body.begin(), body.end());
  out.insert(out.end(), trailing.begin(), trailing.end());
  return out;
}

}  // namespace cardbridge::shim::wire
