// The PC/SC values a program sees, as pcsc-lite 1.9.9 defines them (PCSC/pcsclite.h,
// PCSC/reader.h), written out here rather than taken from the product's support/scard.hpp
// so that a wrong value there fails a test instead of hiding in it. Tests pull them in with
// `using namespace cardbridge::shim::kit::pcsc;`.
#pragma once

#include <cstdint>

namespace cardbridge::shim::kit::pcsc {

// Return values.
inline constexpr uint32_t kSuccess = 0x00000000;
inline constexpr uint32_t kFInternalError = 0x80100001;
inline constexpr uint32_t kECancelled = 0x80100002;
inline constexpr uint32_t kEInvalidHandle = 0x80100003;
inline constexpr uint32_t kENoMemory = 0x80100006;
inline constexpr uint32_t kEInsufficientBuffer = 0x80100008;
inline constexpr uint32_t kEUnknownReader = 0x80100009;
inline constexpr uint32_t kESharingViolation = 0x8010000B;
inline constexpr uint32_t kENoSmartcard = 0x8010000C;
inline constexpr uint32_t kEProtoMismatch = 0x8010000F;
inline constexpr uint32_t kEInvalidValue = 0x80100011;
inline constexpr uint32_t kENotTransacted = 0x80100016;
inline constexpr uint32_t kEReaderUnavailable = 0x80100017;
inline constexpr uint32_t kENoService = 0x8010001D;
inline constexpr uint32_t kEServiceStopped = 0x8010001E;
inline constexpr uint32_t kEUnsupportedFeature = 0x8010001F;
inline constexpr uint32_t kWResetCard = 0x80100068;
inline constexpr uint32_t kWRemovedCard = 0x80100069;

// dwScope.
inline constexpr uint32_t kScopeUser = 0, kScopeTerminal = 1, kScopeSystem = 2, kScopeGlobal = 3;
// dwShareMode.
inline constexpr uint32_t kShareExclusive = 1, kShareShared = 2, kShareDirect = 3;
// dwPreferredProtocols / dwActiveProtocol.
inline constexpr uint32_t kT0 = 0x0001, kT1 = 0x0002, kT0T1 = kT0 | kT1, kRaw = 0x0004, kT15 = 0x0008,
                          kAnyOld = 0x1000;  // pcsc-lite's legacy SCARD_PROTOCOL_ANY
// dwDisposition / dwInitialization.
inline constexpr uint32_t kLeaveCard = 0, kResetCard = 1, kUnpowerCard = 2, kEjectCard = 3;

// dwReaderState of the reader-state array (pcscd's SCARD_ABSENT ... SCARD_SPECIFIC).
inline constexpr uint32_t kReaderUnknown = 0x0001, kReaderAbsent = 0x0002, kReaderPresent = 0x0004,
                          kReaderSwallowed = 0x0008, kReaderPowered = 0x0010, kReaderNegotiable = 0x0020,
                          kReaderSpecific = 0x0040;
// A card present, powered, negotiable: what pcscd shows after the card answered (0x34).
inline constexpr uint32_t kReaderCardReady = kReaderPresent | kReaderPowered | kReaderNegotiable;

// SCARD_STATE_* (what the desk's SCardGetStatusChange reports, carried in ReaderInfo).
inline constexpr uint32_t kStateUnavailable = 0x0008, kStateEmpty = 0x0010, kStatePresent = 0x0020,
                          kStateMute = 0x0200;

// Attributes (SCARD_ATTR_VALUE(class, tag)).
inline constexpr uint32_t kAttrVendorName = 0x00010100;
inline constexpr uint32_t kAttrVendorIfdVersion = 0x00010102;
inline constexpr uint32_t kAttrAtrString = 0x00090303;

// SCARD_CTL_CODE(code) on Linux.
constexpr uint32_t ctl_code(uint32_t code) { return 0x42000000u + code; }

}  // namespace cardbridge::shim::kit::pcsc
