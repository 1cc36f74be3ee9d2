// Helpers shared by the fuzz targets and the seed generator (tests/fuzz only).
//
// ByteReader reads a fuzz input front to back and returns zeros once it is exhausted, so
// every input is a valid program. ByteWriter is its mirror, used to write seeds.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string_view>
#include <vector>

namespace cardbridge::fuzz {

// A violated invariant: report and abort (libFuzzer records the input as a crash).
[[noreturn]] inline void invariant_failed(const char* what, const char* file, int line) {
  std::fprintf(stderr, "fuzz invariant violated: %s (%s:%d)\n", what, file, line);
  std::abort();
}
#define FUZZ_ASSERT(cond)                                                          \
  do {                                                                             \
    if (!(cond)) ::cardbridge::fuzz::invariant_failed(#cond, __FILE__, __LINE__); \
  } while (0)

class ByteReader {
 public:
  explicit ByteReader(std::span<const uint8_t> data) : data_(data) {}
  bool empty() const { return pos_ >= data_.size(); }
  std::size_t remaining() const { return data_.size() - pos_; }
  uint8_t u8() { return empty() ? 0 : data_[pos_++]; }
  uint16_t u16() { return static_cast<uint16_t>(u8() | (u8() << 8)); }
  uint32_t u32() { return static_cast<uint32_t>(u16() | (uint32_t{u16()} << 16)); }
  // Up to |n| bytes (fewer at the end of the input).
  std::vector<uint8_t> bytes(std::size_t n) {
    n = std::min(n, remaining());
    std::vector<uint8_t> out(data_.begin() + static_cast<std::ptrdiff_t>(pos_),
                             data_.begin() + static_cast<std::ptrdiff_t>(pos_ + n));
    pos_ += n;
    return out;
  }
  std::vector<uint8_t> rest() { return bytes(remaining()); }

 private:
  std::span<const uint8_t> data_;
  std::size_t pos_ = 0;
};

class ByteWriter {
 public:
  ByteWriter& u8(uint8_t v) {
    out_.push_back(v);
    return *this;
  }
  ByteWriter& u16(uint16_t v) { return u8(static_cast<uint8_t>(v)).u8(static_cast<uint8_t>(v >> 8)); }
  ByteWriter& u32(uint32_t v) { return u16(static_cast<uint16_t>(v)).u16(static_cast<uint16_t>(v >> 16)); }
  ByteWriter& bytes(std::span<const uint8_t> b) {
    out_.insert(out_.end(), b.begin(), b.end());
    return *this;
  }
  ByteWriter& text(std::string_view s) {
    out_.insert(out_.end(), s.begin(), s.end());
    return *this;
  }
  const std::vector<uint8_t>& data() const { return out_; }

 private:
  std::vector<uint8_t> out_;
};

}  // namespace cardbridge::fuzz
