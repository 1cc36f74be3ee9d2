#include <fmt/format.h>

#include "cardbridge/shim_core/shim_core.hpp"
#include "cardbridge/support/hex.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/scard.hpp"

namespace cardbridge::shim {

namespace sc = cardbridge::scard;

const char* AuditRecord::event_name() const {
  switch (kind) {
    case Kind::kDeskConnected: return "desk-connected";
    case Kind::kDeskDisconnected: return "desk-disconnected";
    case Kind::kReaderAdded: return "reader-added";
    case Kind::kReaderRemoved: return "reader-removed";
    case Kind::kCardInserted: return "card-inserted";
    case Kind::kCardRemoved: return "card-removed";
    case Kind::kCardConnected: return "card-connected";
  }
  return "unknown";
}

const char* AuditRecord::share_text() const {
  return share_mode == sc::kShareExclusive ? "exclusive" : share_mode == sc::kShareDirect ? "direct" : "shared";
}

std::string AuditRecord::text() const {
  const auto name = log::printable(reader);
  switch (kind) {
    case Kind::kDeskConnected:
      return fmt::format("desk connected: declared-name='{}' software='{}' identity='{}'", log::printable(desk_name),
                         log::printable(desk_software), log::printable(desk_identity));
    case Kind::kDeskDisconnected:
      return fmt::format("desk disconnected: declared-name='{}' reason='{}'", log::printable(desk_name),
                         log::printable(reason));
    case Kind::kReaderAdded:
      return card_present ? fmt::format("reader added: reader='{}' card present atr={}", name, to_hex(atr, false))
                          : fmt::format("reader added: reader='{}' no card", name);
    case Kind::kReaderRemoved: return fmt::format("reader removed: reader='{}'", name);
    case Kind::kCardInserted: return fmt::format("card inserted: reader='{}' atr={}", name, to_hex(atr, false));
    case Kind::kCardRemoved: return fmt::format("card removed: reader='{}'", name);
    case Kind::kCardConnected:
      return fmt::format("card connected: reader='{}' atr={} share={}", name, to_hex(atr, false), share_text());
  }
  return "unknown audit event";
}

}  // namespace cardbridge::shim
