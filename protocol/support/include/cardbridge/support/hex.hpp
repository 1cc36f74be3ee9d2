#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace cardbridge {

// "3B 8F 80 01" (upper case, space separated).
std::string to_hex(std::span<const uint8_t> bytes, bool spaced = true);
// Accepts upper/lower case, optional spaces/colons; nullopt on odd length or bad digit.
std::optional<std::vector<uint8_t>> from_hex(std::string_view text);

}  // namespace cardbridge
