// Desk policy: which readers are exposed to the server and which control codes may be
// used. Pure functions, unit-tested.
//
// Policies nest: the admin's (desk.conf [desk]) encloses the one a connection asks for
// (xfreerdp /vc:cardbridge,readers:..., or cardbridge-desk's own options), so a connection can
// only narrow it -- a reader the admin hides stays hidden, a control code the admin forbids
// stays forbidden.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "cardbridge/support/result.hpp"

namespace cardbridge::client {

struct Policy {
  // A reader is exposed when the list is empty or one entry is a case-insensitive
  // substring of its name ("Gemalto", "CPS").
  std::vector<std::string> reader_filter;
  // Control codes: nullopt = all allowed; an empty set = none.
  std::optional<std::set<uint32_t>> control_allow;
  // Readers hidden whatever reader_filter says (case-insensitive substrings).
  std::vector<std::string> reader_deny;
  // The enclosing policy (the admin's), which readers and control codes must pass too.
  std::shared_ptr<const Policy> within;

  bool reader_allowed(std::string_view name) const;
  bool control_allowed(uint32_t code) const;
  // |connection| inside |admin|: what both allow.
  static Policy narrowed(Policy admin, Policy connection);

  // "Gemalto,Omnikey" ; "all" | "none" | "0x42000D48,3400" (a bare number n means SCARD_CTL_CODE(n)
  // when below 0x10000, else the raw code).
  static std::vector<std::string> parse_reader_filter(std::string_view text);
  static Result<std::optional<std::set<uint32_t>>, std::string> parse_control_allow(std::string_view text);
};

}  // namespace cardbridge::client
