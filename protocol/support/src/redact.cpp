#include "cardbridge/support/redact.hpp"

#include <atomic>

#include <fmt/format.h>

#include "cardbridge/support/hex.hpp"

namespace cardbridge::redact {
namespace {

std::atomic<bool> g_card_data{false};

struct ParsedCommand {
  bool has_header = false;
  uint8_t cla = 0, ins = 0, p1 = 0, p2 = 0;
  std::size_t lc = 0;
  std::span<const uint8_t> data;  // the bytes after the header that may hold secrets
  bool well_formed = false;
};

// ISO 7816-3 cases 1, 2S, 3S, 4S, 2E, 3E, 4E. Anything else: whole tail is "data".
ParsedCommand parse(std::span<const uint8_t> a) {
  ParsedCommand p;
  if (a.size() < 4) return p;
  p.has_header = true;
  p.cla = a[0];
  p.ins = a[1];
  p.p1 = a[2];
  p.p2 = a[3];
  auto tail = a.subspan(4);
  if (tail.empty() || tail.size() == 1) {  // case 1, 2S
    p.well_formed = true;
    return p;
  }
  if (tail[0] != 0) {  // short Lc
    std::size_t lc = tail[0];
    if (tail.size() == 1 + lc || tail.size() == 2 + lc) {
      p.lc = lc;
      p.data = tail.subspan(1, lc);
      p.well_formed = true;
      return p;
    }
  } else if (tail.size() == 3) {  // case 2E
    p.well_formed = true;
    return p;
  } else if (tail.size() >= 3) {
    std::size_t lc = (std::size_t{tail[1]} << 8) | tail[2];
    if (lc != 0 && (tail.size() == 3 + lc || tail.size() == 5 + lc)) {
      p.lc = lc;
      p.data = tail.subspan(3, lc);
      p.well_formed = true;
      return p;
    }
  }
  p.lc = tail.size();
  p.data = tail;
  return p;
}

bool interindustry_plain(uint8_t cla) {
  if (cla & 0x80) return false;                  // proprietary class (or 0xFF reader pseudo-APDU)
  if ((cla & 0x40) == 0) return ((cla >> 2) & 0x03) == 0;  // first interindustry: SM bits b4-b3
  return (cla & 0x20) == 0;                      // further interindustry: SM bit b6
}

bool ins_allowed(uint8_t ins) {
  switch (ins) {
    case 0xA4:  // SELECT
    case 0xB0: case 0xB1:  // READ BINARY
    case 0xB2: case 0xB3:  // READ RECORD
    case 0xC0:  // GET RESPONSE
    case 0xCA: case 0xCB:  // GET DATA
    case 0x84:  // GET CHALLENGE
    case 0x70:  // MANAGE CHANNEL
      return true;
    default:
      return false;
  }
}

}  // namespace

bool apdu_body_loggable(std::span<const uint8_t> command) {
  auto p = parse(command);
  return p.has_header && p.well_formed && interindustry_plain(p.cla) && ins_allowed(p.ins);
}

bool apdu_carries_pin(std::span<const uint8_t> command) {
  if (command.size() < 2) return false;
  switch (command[1]) {
    case 0x20: case 0x21:  // VERIFY
    case 0x24: case 0x25:  // CHANGE REFERENCE DATA
    case 0x26: case 0x27:  // DISABLE VERIFICATION REQUIREMENT
    case 0x28: case 0x29:  // ENABLE VERIFICATION REQUIREMENT
    case 0x2C: case 0x2D:  // RESET RETRY COUNTER
      return true;
    default:
      return false;
  }
}

void set_card_data_logging(bool on) { g_card_data.store(on, std::memory_order_relaxed); }
bool card_data_logging() { return g_card_data.load(std::memory_order_relaxed); }

std::string command(std::span<const uint8_t> apdu) {
  auto p = parse(apdu);
  if (!p.has_header) return fmt::format("<{} bytes, no APDU header>", apdu.size());
  std::string out = fmt::format("{:02X} {:02X} {:02X} {:02X}", p.cla, p.ins, p.p1, p.p2);
  // A PIN's length is a secret too: nothing after the header but the fact that data followed.
  if (apdu_carries_pin(apdu)) return apdu.size() > 4 ? out + " <PIN redacted>" : out;
  if (p.lc == 0) {
    if (apdu.size() > 4) out += fmt::format(" Le");
    return out;
  }
  out += fmt::format(" Lc={}", p.lc);
  if (apdu_body_loggable(apdu)) {
    out += fmt::format(" [{}]", to_hex(p.data));
  } else {
    out += fmt::format(" <{} bytes redacted>", p.data.size());
  }
  return out;
}

std::string response(std::span<const uint8_t> command_apdu, std::span<const uint8_t> rsp) {
  if (rsp.size() < 2) return fmt::format("<{} bytes, no status word>", rsp.size());
  std::string out = fmt::format("SW={:02X}{:02X}", rsp[rsp.size() - 2], rsp[rsp.size() - 1]);
  auto data = rsp.first(rsp.size() - 2);
  if (data.empty()) return out;
  // GET RESPONSE continues the previous command, which may have been a secret one (the
  // deciphered key of a PSO: DECIPHER arrives that way under T=0): never show its data.
  if (card_data_logging() && apdu_body_loggable(command_apdu) && command_apdu[1] != 0xC0) {
    out += fmt::format(" [{}]", to_hex(data));
  } else {
    out += fmt::format(" <{} bytes redacted>", data.size());
  }
  return out;
}

std::string control(uint32_t code, std::span<const uint8_t> buffer) {
  return buffer.empty() ? fmt::format("ctl 0x{:08X}", code) : fmt::format("ctl 0x{:08X} <buffer redacted>", code);
}

}  // namespace cardbridge::redact
