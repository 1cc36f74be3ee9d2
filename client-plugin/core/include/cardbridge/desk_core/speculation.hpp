// Speculation rules of the desk (pure functions): which command a program will send
// next, so that the desk can send it to the card at once and ship the answer with the
// reply that precedes it. The shim serves a speculative answer only when the program
// sends exactly the predicted command (docs/performance.md).
//
//  * GET RESPONSE after 61xx (ISO 7816-4 §5.3.4 / 7816-3 T=0): 00 C0 00 00 <SW2>.
//  * READ BINARY read-ahead: after a READ BINARY (offset mode) returning a full chunk, the
//    next chunks of the same size up to the file size from the last SELECT's FCP. Never
//    after a SELECT alone: real middleware SELECTs files it does not read (a warm Cryptolib
//    checks its cache that way; measured with its login traces: 12 to 25 wasted reads per
//    login), and a CPS3 card spends ~0.26 s on each 231-byte read it was not asked for.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace cardbridge::client {

using Apdu = std::vector<uint8_t>;

// What the desk remembers about the card traffic of one handle.
struct CardTrack {
  bool last_was_select = false;    // the previous command was a SELECT (FCP may follow in GET RESPONSE)
  std::optional<uint32_t> ef_size; // size of the currently selected EF, from its FCP
  uint16_t chunk = 0;              // Le of the program's last READ BINARY that was not a file's tail (0: unknown)
  uint8_t read_cla = 0x00;
};

struct ReadBinary {
  uint8_t cla = 0;
  uint32_t offset = 0;
  uint32_t le = 0;  // 1..256
};

inline constexpr std::size_t kMaxSpeculativeReads = 16;
inline constexpr std::size_t kMaxSpeculativeBytes = 8192;

// File size (tag 80, else 81) in an FCP (62) or FCI (6F) template; nullopt if absent.
std::optional<uint32_t> fcp_file_size(std::span<const uint8_t> response_data);
// A short READ BINARY in offset mode (P1 bit 8 clear); nullopt for anything else.
std::optional<ReadBinary> parse_read_binary(std::span<const uint8_t> command);
// The GET RESPONSE a program sends after |command| was answered 61 |sw2|.
Apdu get_response_for(std::span<const uint8_t> command, uint8_t sw2);
// READ BINARY commands for [offset, size) in |chunk|-byte pieces (bounded); none while the
// chunk size is unknown (0).
std::vector<Apdu> predict_reads(uint8_t cla, uint32_t offset, uint32_t size, uint16_t chunk);
// Updates |t| after |command| got |response| (data+SW). Only the program's own READ
// BINARYs teach the chunk size (|from_program|), and a file's tail read does not.
void observe(CardTrack& t, std::span<const uint8_t> command, std::span<const uint8_t> response,
             bool from_program = true);

}  // namespace cardbridge::client
