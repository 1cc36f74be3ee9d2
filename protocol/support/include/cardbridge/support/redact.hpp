// Redaction of card traffic for logs. Security rule: PIN-bearing or key-bearing APDUs and
// every control (IOCTL) buffer are never printed, at any log level, and neither is the
// length of a PIN; card data (what the card answers: a READ BINARY answer is the holder's
// identity, personal data) is not printed either unless the process was started with an
// explicit diagnostic option (set_card_data_logging).
//
// Policy: a command APDU's header (CLA INS P1 P2) is always printable. A command that
// carries a PIN (VERIFY, CHANGE REFERENCE DATA, RESET RETRY COUNTER, ENABLE/DISABLE
// VERIFICATION REQUIREMENT, odd-INS variants, any class) shows its header and
// "<PIN redacted>": neither its bytes nor its length (Lc). Other commands show Lc; their
// data is printed only when the instruction is on a short allow-list of instructions that
// carry no secrets (SELECT, READ BINARY/RECORD, GET RESPONSE, GET DATA, GET CHALLENGE,
// MANAGE CHANNEL) and the command is not secure-messaging protected. Response data is
// shown as "<n bytes redacted>", except, with card-data logging on, the answers of those
// allow-listed commands (GET RESPONSE never: it carries the output of the previous
// command, which may be secret). Control buffers show neither bytes nor length (PIN-pad
// structures). This is an allow-list on purpose: unknown instructions are redacted.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include <fmt/format.h>

namespace cardbridge::redact {

// True when the command's data (and its response data) may be logged.
bool apdu_body_loggable(std::span<const uint8_t> command);
// True for VERIFY, CHANGE REFERENCE DATA, RESET RETRY COUNTER (and odd-INS variants):
// the APDUs whose data is a PIN. Used by the audit counters and tests.
bool apdu_carries_pin(std::span<const uint8_t> command);

// Card data in logs (the answers of allow-listed commands): off unless a program's
// diagnostic option (--unsafe-log-card-data) turns it on. Process-wide.
void set_card_data_logging(bool on);
bool card_data_logging();

// "00 A4 04 00 Lc=7 [A0 00 00 ...]", "00 2A 9E 9A Lc=35 <35 bytes redacted>" or
// "00 20 00 01 <PIN redacted>".
std::string command(std::span<const uint8_t> apdu);
// Response of |command_apdu|: "SW=9000 <n bytes redacted>", or with card-data logging on
// and an allow-listed command, "SW=9000 [data]".
std::string response(std::span<const uint8_t> command_apdu, std::span<const uint8_t> response);
// Control buffers are always redacted, length included: "ctl 0x42000D48 <buffer redacted>".
std::string control(uint32_t code, std::span<const uint8_t> buffer);

// The same, formatted only when a log line is actually written (spdlog checks the level
// before formatting its arguments): logger->debug("transmit {}", redact::Command{apdu}).
// The spans must stay valid for the duration of the log call.
struct Command {
  std::span<const uint8_t> apdu;
};
struct Response {
  std::span<const uint8_t> command_apdu;
  std::span<const uint8_t> response;
};
struct Control {
  uint32_t code = 0;
  std::span<const uint8_t> buffer;
};

}  // namespace cardbridge::redact

template <>
struct fmt::formatter<cardbridge::redact::Command> : fmt::formatter<std::string_view> {
  auto format(const cardbridge::redact::Command& c, format_context& ctx) const {
    return fmt::formatter<std::string_view>::format(cardbridge::redact::command(c.apdu), ctx);
  }
};
template <>
struct fmt::formatter<cardbridge::redact::Response> : fmt::formatter<std::string_view> {
  auto format(const cardbridge::redact::Response& r, format_context& ctx) const {
    return fmt::formatter<std::string_view>::format(cardbridge::redact::response(r.command_apdu, r.response), ctx);
  }
};
template <>
struct fmt::formatter<cardbridge::redact::Control> : fmt::formatter<std::string_view> {
  auto format(const cardbridge::redact::Control& c, format_context& ctx) const {
    return fmt::formatter<std::string_view>::format(cardbridge::redact::control(c.code, c.buffer), ctx);
  }
};
