// Desk policy: which readers are exposed to the server and which control codes may be
// used. Pure functions, unit-tested.
#pragma once

#include <cstdint>
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

  bool reader_allowed(std::string_view name) const;
  bool control_allowed(uint32_t code) const;

  // "Gemalto,Omnikey" ; "all" | "none" | "0x42000D48,3400" (a bare number n means SCARD_CTL_CODE(n)
  // when below 0x10000, else the raw code).
  static std::vector<std::string> parse_reader_filter(std::string_view text);
  static Result<std::optional<std::set<uint32_t>>, std::string> parse_control_allow(std::string_view text);
};

}  // namespace cardbridge::client
