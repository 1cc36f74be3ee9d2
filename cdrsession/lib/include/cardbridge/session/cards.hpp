// Card identification by ATR, for the doctor and the audit trail. A table lookup: the
// ATR says which card family is inserted, not whether the card is valid.
#pragma once

#include <cstdint>
#include <span>
#include <string>

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

}  // namespace cardbridge::session
