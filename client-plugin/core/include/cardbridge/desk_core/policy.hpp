// Desk policy: which readers are exposed to the server, which control codes and which
// SET_ATTRIB attributes may be used. Pure functions, unit-tested.
//
// Least privilege by default (docs/security.md):
//  * control codes: feature discovery (CM_IOCTL_GET_FEATURE_REQUEST) and the PIN-pad codes
//    the reader itself announces in its feature list (verify and modify PIN, their
//    start/finish variants and properties): what a PKCS#11 middleware needs for a PIN pad.
//    Reader escape commands (IOCTL_CCID_ESCAPE, FEATURE_CCID_ESC_COMMAND), MCT, PACE,
//    keypad and display access, and every other code are opt-in (--allow-control);
//  * SET_ATTRIB: refused unless opted in (--allow-set-attrib).
// A refused call gets SCARD_E_UNSUPPORTED_FEATURE, what pcscd answers for a code or an
// attribute the reader's driver does not support.
//
// Policies nest: the admin's (desk.conf [desk]) encloses the one a connection asks for
// (xfreerdp /vc:cardbridge,readers:..., or cardbridge-desk's own options), so a connection can
// only narrow it -- a reader the admin hides stays hidden, a control code or an attribute the
// admin forbids stays forbidden.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cardbridge/support/result.hpp"

namespace cardbridge::client {

// One entry of a reader's answer to CM_IOCTL_GET_FEATURE_REQUEST (PC/SC part 10: tag,
// length 4, the control code big-endian).
struct ReaderFeature {
  uint8_t tag = 0;
  uint32_t code = 0;
  friend bool operator==(const ReaderFeature&, const ReaderFeature&) = default;
};

// Which control codes programs may use.
struct ControlAllow {
  bool all = false;     // every code ("all": escape commands included)
  bool pinpad = true;   // discovery + the PIN-pad codes the reader announces ("pinpad")
  bool escape = false;  // IOCTL_CCID_ESCAPE and the escape code the reader announces ("escape")
  std::set<uint32_t> codes;  // these too (numbers)
  friend bool operator==(const ControlAllow&, const ControlAllow&) = default;
};

// Which attributes SCardSetAttrib may set at the desk.
struct SetAttribAllow {
  bool all = false;
  std::set<uint32_t> attributes;
  friend bool operator==(const SetAttribAllow&, const SetAttribAllow&) = default;
};

enum class ControlVerdict {
  kAllowed,
  kRefused,
  kNeedsFeatures,  // allowed if the reader announces it: ask the reader for its features first
};

struct Policy {
  // A reader is exposed when the list is empty or one entry is a case-insensitive
  // substring of its name ("Gemalto", "CPS").
  std::vector<std::string> reader_filter;
  ControlAllow control_allow;
  SetAttribAllow set_attrib_allow;
  // Readers hidden whatever reader_filter says (case-insensitive substrings).
  std::vector<std::string> reader_deny;
  // The enclosing policy (the admin's), which readers, control codes and attributes must pass too.
  std::shared_ptr<const Policy> within;

  bool reader_allowed(std::string_view name) const;
  // |announced|: the reader's feature list when known (nullptr: not known yet).
  ControlVerdict control_verdict(uint32_t code, const std::vector<ReaderFeature>* announced) const;
  bool set_attrib_allowed(uint32_t attribute) const;
  // |connection| inside |admin|: what both allow.
  static Policy narrowed(Policy admin, Policy connection);

 private:
  ControlVerdict own_control_verdict(uint32_t code, const std::vector<ReaderFeature>* announced) const;

 public:

  // "Gemalto,Omnikey"
  static std::vector<std::string> parse_reader_filter(std::string_view text);
  // Comma-separated: "pinpad" (the default), "escape", "all", "none", and numbers (a bare
  // number n means SCARD_CTL_CODE(n) when below 0x10000, else the raw code; 0x... is hex).
  // "none" alone: no code at all; "" is the default, "pinpad".
  static Result<ControlAllow, std::string> parse_control_allow(std::string_view text);
  // "none" (the default, also ""), "all", or attribute ids (decimal or 0x...).
  static Result<SetAttribAllow, std::string> parse_set_attrib_allow(std::string_view text);
  // A human-readable form of a rule, for logs ("pinpad,escape,0x42000DAD").
  static std::string describe(const ControlAllow& c);
  static std::string describe(const SetAttribAllow& s);
};

// PC/SC part 10 (pcsc-lite reader.h).
namespace feature {
inline constexpr uint8_t kVerifyPinStart = 0x01;
inline constexpr uint8_t kVerifyPinFinish = 0x02;
inline constexpr uint8_t kModifyPinStart = 0x03;
inline constexpr uint8_t kModifyPinFinish = 0x04;
inline constexpr uint8_t kGetKeyPressed = 0x05;
inline constexpr uint8_t kVerifyPinDirect = 0x06;
inline constexpr uint8_t kModifyPinDirect = 0x07;
inline constexpr uint8_t kMctReaderDirect = 0x08;
inline constexpr uint8_t kMctUniversal = 0x09;
inline constexpr uint8_t kIfdPinProperties = 0x0A;
inline constexpr uint8_t kAbort = 0x0B;
inline constexpr uint8_t kSetSpeMessage = 0x0C;
inline constexpr uint8_t kVerifyPinDirectAppId = 0x0D;
inline constexpr uint8_t kModifyPinDirectAppId = 0x0E;
inline constexpr uint8_t kWriteDisplay = 0x0F;
inline constexpr uint8_t kGetKey = 0x10;
inline constexpr uint8_t kIfdDisplayProperties = 0x11;
inline constexpr uint8_t kGetTlvProperties = 0x12;
inline constexpr uint8_t kCcidEscCommand = 0x13;
inline constexpr uint8_t kExecutePace = 0x20;

// The features "pinpad" lets through: PIN verification and modification on the reader's
// keypad (the PIN never leaves the reader), the key-pressed poll and abort of the
// start/finish variants, and the PIN pad's properties. Not GET_KEY (it returns the keys
// typed: a PIN read in clear), not display, MCT, escape or PACE.
bool is_pinpad(uint8_t tag);

// Parses a feature list; malformed entries (length other than 4) are skipped, a truncated
// tail ends the list.
std::vector<ReaderFeature> parse_features(std::span<const uint8_t> answer);
}  // namespace feature

// CM_IOCTL_GET_FEATURE_REQUEST = SCARD_CTL_CODE(3400); IOCTL_CCID_ESCAPE = SCARD_CTL_CODE(3500).
inline constexpr uint32_t kGetFeatureRequest = 0x42000000u + 3400u;
inline constexpr uint32_t kCcidEscape = 0x42000000u + 3500u;

}  // namespace cardbridge::client
