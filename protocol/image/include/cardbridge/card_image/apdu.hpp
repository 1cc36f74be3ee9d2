// The ISO 7816-4 rules the card image rests on, shared by the desk (which learns and reads
// the image) and the shim (which answers from it). Pure functions on APDU bytes.
//
// The image's model of a card (docs/performance.md, "The card image"):
//  * each logical channel has a current file;
//  * an *absolute* SELECT names its target whatever the current file is: by DF name (P1 04),
//    by path from the MF (P1 08), or by a path that starts with the MF's own identifier 3F00
//    (P1 00/02 with 3F00 alone, P1 09 with a path that starts with 3F00; ISO 7816-4 reserves
//    3F00 for the MF). select_key() gives its target a name; a relative SELECT has none;
//  * a SELECT the card refuses (6Axx, 6Exx, ...) leaves the current file as it was;
//  * READ BINARY, GET RESPONSE, GET DATA, VERIFY, MSE, PSO, GET CHALLENGE, INTERNAL /
//    EXTERNAL / GENERAL AUTHENTICATE change no file; anything else may (may_modify()).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace cardbridge::card_image {

using Bytes = std::vector<uint8_t>;
// A file's name in the image: the channel, then 'A' + DF name, or 'P' + the FIDs of its
// path from the MF (3F00 first). Binary.
using Key = std::string;

inline constexpr uint8_t kInsSelect = 0xA4;
inline constexpr uint8_t kInsReadBinary = 0xB0;
inline constexpr uint8_t kInsGetResponse = 0xC0;
inline constexpr uint8_t kInsManageChannel = 0x70;

// SW1 SW2 of a response (0 when shorter than 2 bytes).
uint16_t status_word(std::span<const uint8_t> response);
// 9000 or 61xx (data waits for GET RESPONSE).
bool success(std::span<const uint8_t> response);
bool more_data(std::span<const uint8_t> response);  // 61xx
bool is_9000(std::span<const uint8_t> response);    // exactly 9000

// The logical channel of an interindustry class byte (0..19); nullopt for a proprietary
// class (bit 8 set), whose meaning is the card's own.
std::optional<uint8_t> channel_of(uint8_t cla);

bool is_select(std::span<const uint8_t> apdu);
// GET RESPONSE: CLA C0 00 00 Le (short).
bool is_get_response(std::span<const uint8_t> apdu);
// The Le of a short case-2 command (00 = 256), or nullopt.
std::optional<uint32_t> short_le(std::span<const uint8_t> apdu);

struct ReadBinary {
  uint8_t channel = 0;
  uint32_t offset = 0;
  uint32_t le = 0;  // 1..256
};
// A short READ BINARY in offset mode (P1 bit 8 clear) of an interindustry class.
std::optional<ReadBinary> read_binary(std::span<const uint8_t> apdu);

// The file an absolute SELECT names (see above), or nullopt: a relative SELECT, another
// occurrence than the first, a proprietary class, an extended or malformed command.
std::optional<Key> select_key(std::span<const uint8_t> apdu);
// The channel a key belongs to.
uint8_t key_channel(const Key& key);
// "A:E828BD08..." / "P:3F00/5000/5031" (for logs and tests; names no card data).
std::string key_text(const Key& key);

// What a SELECT's answer did to the current file.
enum class SelectOutcome {
  kSelected,  // 9000 or 61xx: the target is now current
  kRefused,   // not executed or not found (67xx, 68xx, 69xx, 6Axx, 6B00, 6Cxx, 6Dxx, 6Exx): nothing changed
  kUnclear,   // a warning (62xx, 63xx) or anything else: the image does not guess
};
SelectOutcome select_outcome(std::span<const uint8_t> response);

// A command that may change what the card's files hold (or its PINs): not one of the
// read-only instructions listed above. The image is dropped when one reaches the card.
bool may_modify(std::span<const uint8_t> apdu);
// A command after which the image cannot name the current file of any channel:
// MANAGE CHANNEL, a relative SELECT, a SELECT with an unclear answer.
bool loses_track(std::span<const uint8_t> apdu, std::span<const uint8_t> response);
// A command that changes the card's security status: VERIFY with data, EXTERNAL / MUTUAL /
// GENERAL AUTHENTICATE, answered 9000. (What a program reads after one may need it.)
bool raises_security(std::span<const uint8_t> apdu, std::span<const uint8_t> response);

// What an FCP (62) or FCI (6F) says about a file.
enum class ReadAccess {
  kUnknown,     // no compact security attributes
  kAlways,      // READ BINARY needs no condition (compact form, SC byte 00)
  kRestricted,  // a PIN or another condition, or never
};
struct FileInfo {
  bool transparent_ef = false;   // file descriptor byte: a transparent EF
  std::optional<uint32_t> size;  // tag 80: data bytes
  ReadAccess read = ReadAccess::kUnknown;
};
// |data|: the response data (without SW). nullopt when it is no FCP/FCI template.
std::optional<FileInfo> parse_fcp(std::span<const uint8_t> data);

// One BER-TLV element of |d| at |pos| (tags of up to three bytes, lengths up to 0x82 form):
// its tag and value, |pos| moved past it; false when malformed (|pos| then meaningless).
bool next_tlv(std::span<const uint8_t> d, std::size_t& pos, uint32_t& tag, std::span<const uint8_t>& value);

}  // namespace cardbridge::card_image
