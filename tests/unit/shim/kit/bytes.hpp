// Byte helpers of the shim test kit: a little-endian builder and readers, written out field
// by field so that tests describe the pcsc-lite wire without the shim's own structs
// (pcscd_wire/wire.hpp is the code under test). No GoogleTest here: the fuzzer uses it too.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace cardbridge::shim::kit {

static_assert(std::endian::native == std::endian::little,
              "the pcsc-lite wire is native-endian; these layouts are written for little-endian hosts");

using Bytes = std::vector<uint8_t>;

// Builds a byte string field by field: Le().u32(12).u32(0x11).get(). A literal that does
// not fit its field or is not hex is a mistake in the test: it throws (GoogleTest reports
// the exception as the test's failure).
class Le {
 public:
  Le& u32(uint32_t v) {
    for (int i = 0; i < 4; ++i) v_.push_back(static_cast<uint8_t>(v >> (8 * i)));
    return *this;
  }
  Le& i32(int32_t v) { return u32(static_cast<uint32_t>(v)); }
  Le& bytes(std::span<const uint8_t> b) {
    v_.insert(v_.end(), b.begin(), b.end());
    return *this;
  }
  Le& zeros(std::size_t n) {
    v_.insert(v_.end(), n, 0);
    return *this;
  }
  // |s| in a NUL-padded char field of |field| bytes.
  Le& text(std::string_view s, std::size_t field) {
    if (s.size() > field) throw std::length_error("Le::text: " + std::string(s) + " does not fit its field");
    v_.insert(v_.end(), s.begin(), s.end());
    v_.insert(v_.end(), field - s.size(), 0);
    return *this;
  }
  // |b| in a zero-padded field of |field| bytes.
  Le& padded(std::span<const uint8_t> b, std::size_t field) {
    if (b.size() > field) throw std::length_error("Le::padded: the bytes do not fit their field");
    v_.insert(v_.end(), b.begin(), b.end());
    v_.insert(v_.end(), field - b.size(), 0);
    return *this;
  }
  // Hex digits as bytes, in the order written ("0c000000 11000000"); spaces are ignored.
  Le& hex(std::string_view h) {
    auto digit = [&h](char c) -> uint8_t {
      if (c >= '0' && c <= '9') return static_cast<uint8_t>(c - '0');
      if (c >= 'a' && c <= 'f') return static_cast<uint8_t>(c - 'a' + 10);
      if (c >= 'A' && c <= 'F') return static_cast<uint8_t>(c - 'A' + 10);
      throw std::invalid_argument("Le::hex: not hex: " + std::string(h));
    };
    std::string digits;
    for (char c : h) {
      if (c != ' ') digits += c;
    }
    if (digits.size() % 2 != 0) throw std::invalid_argument("Le::hex: odd digit count: " + std::string(h));
    for (std::size_t i = 0; i < digits.size(); i += 2) {
      v_.push_back(static_cast<uint8_t>(digit(digits[i]) << 4 | digit(digits[i + 1])));
    }
    return *this;
  }
  const Bytes& get() const { return v_; }
  operator Bytes() const { return v_; }                        // NOLINT(google-explicit-constructor)
  operator std::span<const uint8_t>() const { return v_; }    // NOLINT(google-explicit-constructor)
  std::size_t size() const { return v_.size(); }

 private:
  Bytes v_;
};

// The little-endian u32 at |off|; bytes past the end read as zero (callers check lengths).
inline uint32_t le32(std::span<const uint8_t> b, std::size_t off) {
  uint32_t v = 0;
  for (std::size_t i = 0; i < 4; ++i) {
    if (off + i < b.size()) v |= static_cast<uint32_t>(b[off + i]) << (8 * i);
  }
  return v;
}
inline int32_t le32s(std::span<const uint8_t> b, std::size_t off) { return static_cast<int32_t>(le32(b, off)); }
// Writes |v| at |off| if it fits.
inline void put_le32(Bytes& b, std::size_t off, uint32_t v) {
  if (off + 4 > b.size()) return;
  for (std::size_t i = 0; i < 4; ++i) b[off + i] = static_cast<uint8_t>(v >> (8 * i));
}
// Up to |n| bytes from |off| (fewer at the end).
inline Bytes slice(std::span<const uint8_t> b, std::size_t off, std::size_t n) {
  if (off >= b.size()) return {};
  n = std::min(n, b.size() - off);
  return Bytes(b.begin() + static_cast<std::ptrdiff_t>(off), b.begin() + static_cast<std::ptrdiff_t>(off + n));
}
inline Bytes cat(Bytes a, std::span<const uint8_t> b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}
inline bool all_zero(std::span<const uint8_t> b) {
  return std::all_of(b.begin(), b.end(), [](uint8_t v) { return v == 0; });
}
inline std::string hex(std::span<const uint8_t> b) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s;
  for (uint8_t v : b) {
    s += kDigits[v >> 4];
    s += kDigits[v & 0xF];
  }
  return s;
}

}  // namespace cardbridge::shim::kit
