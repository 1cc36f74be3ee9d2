#include "cardbridge/desk_core/desk_audit.hpp"

#include <fmt/format.h>

#include "cardbridge/support/hex.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/scard.hpp"

namespace cardbridge::client {

namespace sc = cardbridge::scard;

const char* DeskAudit::event_name() const {
  switch (kind) {
    case Kind::kServerConnected: return "server-connected";
    case Kind::kServerDisconnected: return "server-disconnected";
    case Kind::kCardConnected: return "card-connected";
    case Kind::kReaderRefused: return "reader-refused";
    case Kind::kControlRefused: return "control-refused";
  }
  return "unknown";
}

std::string DeskAudit::text() const {
  const auto srv = log::printable(server);
  const auto rd = log::printable(reader);
  switch (kind) {
    case Kind::kServerConnected: return fmt::format("server connected: name='{}'", srv);
    case Kind::kServerDisconnected: return fmt::format("server disconnected: name='{}' reason='{}'", srv, reason);
    case Kind::kCardConnected:
      return fmt::format("card connected: server='{}' reader='{}' atr={} share={}", srv, rd, to_hex(atr, false),
                         share_mode == sc::kShareExclusive ? "exclusive"
                         : share_mode == sc::kShareDirect  ? "direct"
                                                           : "shared");
    case Kind::kReaderRefused:
      return fmt::format("reader refused by the desk's policy: server='{}' reader='{}'", srv, rd);
    case Kind::kControlRefused:
      return fmt::format("control code refused by the desk's policy: server='{}' code=0x{:08X}", srv, code);
  }
  return "unknown desk audit event";
}

}  // namespace cardbridge::client
