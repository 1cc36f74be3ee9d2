// Card identification by ATR, for the doctor and the audit trail. A table lookup: the
// ATR says which card family is inserted, not whether the card is valid.
#pragma once

#include <cstdint>
#include <istream>
#include <span>
#include <string>
#include <vector>

namespace cardbridge::session {

enum class CardKind {
  kCps3,           // CPS3 contact (IAS-ECC, CPS2ter-compatible)
  kCps3Contactless,
  kCps4,           // CPS4 (NXP ChipDoc)
  kCps2ter,        // older CPS generation
  kCpxFamily,      // ASIP/ANS CPx family (CPS/CPE/CPF/CPA), version not in the table
  kVitale1,
  kVitale2,
  kUnknown,
};

struct CardIdentity {
  CardKind kind = CardKind::kUnknown;
  std::string label;       // "CPS3", "Vitale 2 (patient card)"...
  bool professional = false;  // a CPx card CDR can use
};

CardIdentity identify_atr(std::span<const uint8_t> atr);
const char* kind_name(CardKind k);  // "cps3", "vitale2", "unknown"...

// pcsc-tools' ATR list (package pcsc-tools): ATR patterns (regular expressions over the ATR
// as "3B 95 13 ..."), each followed by tab-indented descriptions. Used to name the cards our
// own table does not know.
inline constexpr const char* kAtrListPath = "/usr/share/pcsc/smartcard_list.txt";
// The descriptions of the first pattern that matches |atr| (empty: no match, or no list).
std::vector<std::string> describe_from_atr_list(std::span<const uint8_t> atr, std::istream& list);
std::vector<std::string> describe_from_atr_list(std::span<const uint8_t> atr, const std::string& path = kAtrListPath);

}  // namespace cardbridge::session
