#include "cardbridge/support/scard.hpp"

#include <fmt/format.h>

namespace cardbridge::scard {

std::string_view rv_name(uint32_t rv) {
  switch (rv) {
    case kSuccess: return "SCARD_S_SUCCESS";
    case kFInternalError: return "SCARD_F_INTERNAL_ERROR";
    case kECancelled: return "SCARD_E_CANCELLED";
    case kEInvalidHandle: return "SCARD_E_INVALID_HANDLE";
    case kEInvalidParameter: return "SCARD_E_INVALID_PARAMETER";
    case kEInvalidTarget: return "SCARD_E_INVALID_TARGET";
    case kENoMemory: return "SCARD_E_NO_MEMORY";
    case kFWaitedTooLong: return "SCARD_F_WAITED_TOO_LONG";
    case kEInsufficientBuffer: return "SCARD_E_INSUFFICIENT_BUFFER";
    case kEUnknownReader: return "SCARD_E_UNKNOWN_READER";
    case kETimeout: return "SCARD_E_TIMEOUT";
    case kESharingViolation: return "SCARD_E_SHARING_VIOLATION";
    case kENoSmartcard: return "SCARD_E_NO_SMARTCARD";
    case kEUnknownCard: return "SCARD_E_UNKNOWN_CARD";
    case kECantDispose: return "SCARD_E_CANT_DISPOSE";
    case kEProtoMismatch: return "SCARD_E_PROTO_MISMATCH";
    case kENotReady: return "SCARD_E_NOT_READY";
    case kEInvalidValue: return "SCARD_E_INVALID_VALUE";
    case kESystemCancelled: return "SCARD_E_SYSTEM_CANCELLED";
    case kFCommError: return "SCARD_F_COMM_ERROR";
    case kFUnknownError: return "SCARD_F_UNKNOWN_ERROR";
    case kEInvalidAtr: return "SCARD_E_INVALID_ATR";
    case kENotTransacted: return "SCARD_E_NOT_TRANSACTED";
    case kEReaderUnavailable: return "SCARD_E_READER_UNAVAILABLE";
    case kPShutdown: return "SCARD_P_SHUTDOWN";
    case kEPciTooSmall: return "SCARD_E_PCI_TOO_SMALL";
    case kEReaderUnsupported: return "SCARD_E_READER_UNSUPPORTED";
    case kEDuplicateReader: return "SCARD_E_DUPLICATE_READER";
    case kECardUnsupported: return "SCARD_E_CARD_UNSUPPORTED";
    case kENoService: return "SCARD_E_NO_SERVICE";
    case kEServiceStopped: return "SCARD_E_SERVICE_STOPPED";
    case kEUnsupportedFeature: return "SCARD_E_UNSUPPORTED_FEATURE";
    case kENoReadersAvailable: return "SCARD_E_NO_READERS_AVAILABLE";
    case kWUnsupportedCard: return "SCARD_W_UNSUPPORTED_CARD";
    case kWUnresponsiveCard: return "SCARD_W_UNRESPONSIVE_CARD";
    case kWUnpoweredCard: return "SCARD_W_UNPOWERED_CARD";
    case kWResetCard: return "SCARD_W_RESET_CARD";
    case kWRemovedCard: return "SCARD_W_REMOVED_CARD";
    case kWSecurityViolation: return "SCARD_W_SECURITY_VIOLATION";
    default: return "SCARD_?";
  }
}

std::string rv_text(uint32_t rv) { return fmt::format("{} (0x{:08X})", rv_name(rv), rv); }

std::string state_text(uint32_t s) {
  static constexpr struct {
    uint32_t bit;
    const char* name;
  } kBits[] = {{kStateIgnore, "IGNORE"},       {kStateChanged, "CHANGED"},
               {kStateUnknown, "UNKNOWN"},     {kStateUnavailable, "UNAVAILABLE"},
               {kStateEmpty, "EMPTY"},         {kStatePresent, "PRESENT"},
               {kStateAtrMatch, "ATRMATCH"},   {kStateExclusive, "EXCLUSIVE"},
               {kStateInUse, "INUSE"},         {kStateMute, "MUTE"},
               {kStateUnpowered, "UNPOWERED"}};
  std::string out;
  for (const auto& b : kBits) {
    if (s & b.bit) {
      if (!out.empty()) out += '|';
      out += b.name;
    }
  }
  if (out.empty()) out = "UNAWARE";
  if (s >> 16) out += fmt::format(" events={}", s >> 16);
  return out;
}

}  // namespace cardbridge::scard
