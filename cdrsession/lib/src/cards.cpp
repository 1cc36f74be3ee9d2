#include "cardbridge/session/cards.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <fstream>
#include <optional>
#include <regex>
#include <string_view>
#include <vector>

#include "cardbridge/support/hex.hpp"

namespace cardbridge::session {

namespace {

// Patterns in pcsc-tools' smartcard_list.txt syntax: ".." matches any byte.
struct Pattern {
  std::string_view atr;
  CardKind kind;
  std::string_view label;
  bool professional;
};

constexpr Pattern kPatterns[] = {
    {"3B AC 00 40 2A 00 12 25 00 64 80 00 03 10 00 90 00", CardKind::kCps3, "CPS3", true},
    {"3B 8F 80 01 00 31 B8 64 04 B0 EC C1 73 94 01 80 82 90 00 0E", CardKind::kCps3Contactless,
     "CPS3 (contactless)", true},
    {"3B 9B 18 80 01 00 12 25 00 64 80 04 01 00 00 90 44", CardKind::kCps4, "CPS4", true},
    {"3B DC 18 FF 00 00 12 25 00 64 80 00 04 01 00 90 00", CardKind::kCps4, "CPS4 (T=0)", true},
    {"3B AC 00 40 2A 00 12 25 00 64 80 82 02 12 00 90 00", CardKind::kCps2ter, "CPS2ter", true},
    {"3B 75 13 00 00 .. 09 EA 90 00", CardKind::kVitale2, "Vitale 2 (patient card)", false},
    // Vitale 1 as pcsc-tools lists it ("3F 65 25 00 2[2C] 09 [F6]9 90 00", "3F 65 25 00 52 09 6A
    // 90 00", "3F 65 25 00 A[34] 09 6A 90 00"): bank, telephone and other cards share the 3F 65 25
    // prefix (3F 65 25 08 43 04 6C 90 00 is a CB Visa card).
    {"3F 65 25 00 22 09 F9 90 00", CardKind::kVitale1, "Vitale 1 (patient card)", false},
    {"3F 65 25 00 22 09 69 90 00", CardKind::kVitale1, "Vitale 1 (patient card)", false},
    {"3F 65 25 00 2C 09 F9 90 00", CardKind::kVitale1, "Vitale 1 (patient card)", false},
    {"3F 65 25 00 2C 09 69 90 00", CardKind::kVitale1, "Vitale 1 (patient card)", false},
    {"3F 65 25 00 52 09 6A 90 00", CardKind::kVitale1, "Vitale 1 (patient card)", false},
    {"3F 65 25 00 A3 09 6A 90 00", CardKind::kVitale1, "Vitale 1 (patient card)", false},
    {"3F 65 25 00 A4 09 6A 90 00", CardKind::kVitale1, "Vitale 1 (patient card)", false},
};

bool matches(std::string_view pattern, std::span<const uint8_t> atr) {
  std::vector<int> bytes;  // -1: any
  for (std::size_t i = 0; i + 1 < pattern.size() + 1; i += 3) {
    auto tok = pattern.substr(i, 2);
    if (tok == "..") {
      bytes.push_back(-1);
    } else {
      auto b = from_hex(tok);
      bytes.push_back(b && b->size() == 1 ? (*b)[0] : -2);
    }
  }
  if (bytes.size() != atr.size()) return false;
  for (std::size_t i = 0; i < atr.size(); ++i) {
    if (bytes[i] != -1 && bytes[i] != atr[i]) return false;
  }
  return true;
}

// The ANS/ASIP historical bytes "12 25 00 64 80" mark the CPx family in every generation.
bool has_cpx_marker(std::span<const uint8_t> atr) {
  constexpr std::array<uint8_t, 5> kMarker{0x12, 0x25, 0x00, 0x64, 0x80};
  if (atr.size() < kMarker.size()) return false;
  for (std::size_t i = 0; i + kMarker.size() <= atr.size(); ++i) {
    if (std::equal(kMarker.begin(), kMarker.end(), atr.begin() + static_cast<std::ptrdiff_t>(i))) return true;
  }
  return false;
}

}  // namespace

CardIdentity identify_atr(std::span<const uint8_t> atr) {
  for (const auto& p : kPatterns) {
    if (matches(p.atr, atr)) return CardIdentity{p.kind, std::string(p.label), p.professional};
  }
  if (has_cpx_marker(atr)) return CardIdentity{CardKind::kCpxFamily, "CPx family card (CPS/CPE/CPF)", true};
  return CardIdentity{CardKind::kUnknown, "unknown card", false};
}

namespace {

// The ATR as pcsc-tools writes it: upper-case hex bytes separated by spaces.
std::string spaced_hex(std::span<const uint8_t> atr) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (auto b : atr) {
    if (!out.empty()) out.push_back(' ');
    out.push_back(kHex[b >> 4]);
    out.push_back(kHex[b & 0x0F]);
  }
  return out;
}

// The whole ATR matches |pattern|: most patterns are hex with "." wildcards (compared
// directly); the others are regular expressions ("[0-9]", "(..)*", ".*").
bool atr_list_match(const std::string& pattern, const std::string& atr) {
  const bool simple = std::all_of(pattern.begin(), pattern.end(), [](char c) {
    return c == ' ' || c == '.' || (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F') || (c >= 'a' && c <= 'f');
  });
  if (simple) {
    if (pattern.size() != atr.size()) return false;
    for (std::size_t i = 0; i < atr.size(); ++i) {
      const char p = static_cast<char>(std::toupper(static_cast<unsigned char>(pattern[i])));
      if (p != '.' && p != atr[i]) return false;
    }
    return true;
  }
  try {
    return std::regex_match(atr, std::regex(pattern, std::regex::ECMAScript | std::regex::icase));
  } catch (const std::regex_error&) {
    return false;  // a pattern std::regex cannot read: skip it
  }
}

}  // namespace

std::vector<std::string> describe_from_atr_list(std::span<const uint8_t> atr, std::istream& list) {
  const std::string target = spaced_hex(atr);
  std::vector<std::string> found;
  bool in_match = false;
  std::string line;
  while (std::getline(list, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line[0] == '#') {
      if (in_match && line.empty()) break;  // the end of the matching entry
      continue;
    }
    if (line[0] == '\t') {
      if (in_match) found.push_back(line.substr(line.find_first_not_of('\t')));
      continue;
    }
    if (in_match) break;
    in_match = atr_list_match(line, target);
  }
  return found;
}

std::vector<std::string> describe_from_atr_list(std::span<const uint8_t> atr, const std::string& path) {
  std::ifstream f(path);
  if (!f) return {};
  return describe_from_atr_list(atr, f);
}

const char* kind_name(CardKind k) {
  switch (k) {
    case CardKind::kCps3: return "cps3";
    case CardKind::kCps3Contactless: return "cps3-contactless";
    case CardKind::kCps4: return "cps4";
    case CardKind::kCps2ter: return "cps2ter";
    case CardKind::kCpxFamily: return "cpx-family";
    case CardKind::kVitale1: return "vitale1";
    case CardKind::kVitale2: return "vitale2";
    case CardKind::kUnknown: return "unknown";
  }
  return "unknown";
}

}  // namespace cardbridge::session
