// PC/SC constants as pcsc-lite defines them (pcsclite.h / winscard.h, 1.9.9 .. 2.5.1).
//
// The shim impersonates pcscd and must not link libpcsclite, and the wire protocol is
// independent of any PC/SC implementation, so the values live here. The desk backend,
// which does link libpcsclite, static_asserts that they agree with the system headers.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace cardbridge::scard {

// Return values (LONG in the API, 32-bit on every wire we speak).
inline constexpr uint32_t kSuccess = 0x00000000;
inline constexpr uint32_t kFInternalError = 0x80100001;
inline constexpr uint32_t kECancelled = 0x80100002;
inline constexpr uint32_t kEInvalidHandle = 0x80100003;
inline constexpr uint32_t kEInvalidParameter = 0x80100004;
inline constexpr uint32_t kEInvalidTarget = 0x80100005;
inline constexpr uint32_t kENoMemory = 0x80100006;
inline constexpr uint32_t kFWaitedTooLong = 0x80100007;
inline constexpr uint32_t kEInsufficientBuffer = 0x80100008;
inline constexpr uint32_t kEUnknownReader = 0x80100009;
inline constexpr uint32_t kETimeout = 0x8010000A;
inline constexpr uint32_t kESharingViolation = 0x8010000B;
inline constexpr uint32_t kENoSmartcard = 0x8010000C;
inline constexpr uint32_t kEUnknownCard = 0x8010000D;
inline constexpr uint32_t kECantDispose = 0x8010000E;
inline constexpr uint32_t kEProtoMismatch = 0x8010000F;
inline constexpr uint32_t kENotReady = 0x80100010;
inline constexpr uint32_t kEInvalidValue = 0x80100011;
inline constexpr uint32_t kESystemCancelled = 0x80100012;
inline constexpr uint32_t kFCommError = 0x80100013;
inline constexpr uint32_t kFUnknownError = 0x80100014;
inline constexpr uint32_t kEInvalidAtr = 0x80100015;
inline constexpr uint32_t kENotTransacted = 0x80100016;
inline constexpr uint32_t kEReaderUnavailable = 0x80100017;
inline constexpr uint32_t kPShutdown = 0x80100018;
inline constexpr uint32_t kEPciTooSmall = 0x80100019;
inline constexpr uint32_t kEReaderUnsupported = 0x8010001A;
inline constexpr uint32_t kEDuplicateReader = 0x8010001B;
inline constexpr uint32_t kECardUnsupported = 0x8010001C;
inline constexpr uint32_t kENoService = 0x8010001D;
inline constexpr uint32_t kEServiceStopped = 0x8010001E;
inline constexpr uint32_t kEUnsupportedFeature = 0x8010001F;
inline constexpr uint32_t kENoReadersAvailable = 0x8010002E;
inline constexpr uint32_t kWUnsupportedCard = 0x80100065;
inline constexpr uint32_t kWUnresponsiveCard = 0x80100066;
inline constexpr uint32_t kWUnpoweredCard = 0x80100067;
inline constexpr uint32_t kWResetCard = 0x80100068;
inline constexpr uint32_t kWRemovedCard = 0x80100069;
inline constexpr uint32_t kWSecurityViolation = 0x8010006A;

// Share modes.
inline constexpr uint32_t kShareExclusive = 1;
inline constexpr uint32_t kShareShared = 2;
inline constexpr uint32_t kShareDirect = 3;

// Protocols (bit mask).
inline constexpr uint32_t kProtocolUndefined = 0;
inline constexpr uint32_t kProtocolT0 = 0x0001;
inline constexpr uint32_t kProtocolT1 = 0x0002;
inline constexpr uint32_t kProtocolRaw = 0x0004;
inline constexpr uint32_t kProtocolT15 = 0x0008;
inline constexpr uint32_t kProtocolAny = kProtocolT0 | kProtocolT1;
inline constexpr uint32_t kProtocolAnyOld = 0x1000;  // pcsc-lite's legacy SCARD_PROTOCOL_ANY

// Dispositions.
inline constexpr uint32_t kLeaveCard = 0;
inline constexpr uint32_t kResetCard = 1;
inline constexpr uint32_t kUnpowerCard = 2;
inline constexpr uint32_t kEjectCard = 3;

// Scopes.
inline constexpr uint32_t kScopeUser = 0;
inline constexpr uint32_t kScopeTerminal = 1;
inline constexpr uint32_t kScopeSystem = 2;
inline constexpr uint32_t kScopeGlobal = 3;

// API-level reader state flags (SCARD_STATE_*), as SCardGetStatusChange reports them.
inline constexpr uint32_t kStateUnaware = 0x0000;
inline constexpr uint32_t kStateIgnore = 0x0001;
inline constexpr uint32_t kStateChanged = 0x0002;
inline constexpr uint32_t kStateUnknown = 0x0004;
inline constexpr uint32_t kStateUnavailable = 0x0008;
inline constexpr uint32_t kStateEmpty = 0x0010;
inline constexpr uint32_t kStatePresent = 0x0020;
inline constexpr uint32_t kStateAtrMatch = 0x0040;
inline constexpr uint32_t kStateExclusive = 0x0080;
inline constexpr uint32_t kStateInUse = 0x0100;
inline constexpr uint32_t kStateMute = 0x0200;
inline constexpr uint32_t kStateUnpowered = 0x0400;

// Daemon-level reader state bits (pcsc-lite SCARD_UNKNOWN .. SCARD_SPECIFIC), used in the
// shared reader-state array that pcscd hands to its clients.
inline constexpr uint32_t kReaderUnknown = 0x0001;
inline constexpr uint32_t kReaderAbsent = 0x0002;
inline constexpr uint32_t kReaderPresent = 0x0004;
inline constexpr uint32_t kReaderSwallowed = 0x0008;
inline constexpr uint32_t kReaderPowered = 0x0010;
inline constexpr uint32_t kReaderNegotiable = 0x0020;
inline constexpr uint32_t kReaderSpecific = 0x0040;

// Sizes.
inline constexpr std::size_t kMaxReaderName = 128;
inline constexpr std::size_t kMaxAtrSize = 33;
inline constexpr std::size_t kMaxBufferSize = 264;
inline constexpr std::size_t kMaxBufferSizeExtended = 4 + 3 + (1 << 16) + 3 + 2;  // 65548
inline constexpr std::size_t kMaxReadersContexts = 16;

// Attributes used by the cache and by tests.
inline constexpr uint32_t kAttrVendorName = 0x00010100;
inline constexpr uint32_t kAttrVendorIfdType = 0x00010101;
inline constexpr uint32_t kAttrVendorIfdVersion = 0x00010102;
inline constexpr uint32_t kAttrVendorIfdSerialNo = 0x00010103;
inline constexpr uint32_t kAttrChannelId = 0x00020110;
inline constexpr uint32_t kAttrMaxInput = 0x0007A007;
inline constexpr uint32_t kAttrAtrString = 0x00090303;
inline constexpr uint32_t kAttrDeviceFriendlyName = 0x7FFF0003;
inline constexpr uint32_t kAttrDeviceSystemName = 0x7FFF0004;

// pcsc-lite SCARD_CTL_CODE(code) = 0x42000000 + code.
constexpr uint32_t ctl_code(uint32_t code) { return 0x42000000u + code; }

// "SCARD_E_TIMEOUT (0x8010000A)": name and number, as pcsc-lite's rv2text logs them.
std::string_view rv_name(uint32_t rv);
std::string rv_text(uint32_t rv);

// Flags of SCARD_STATE_* as "PRESENT|INUSE".
std::string state_text(uint32_t api_state);

}  // namespace cardbridge::scard
