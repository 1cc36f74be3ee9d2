// The action language of the ShimCore fuzz target, shared with the seed generator.
//
// An input is: [u8 flags] then actions until the input ends. Each action starts with one
// byte that picks it (modulo kActionCount), followed by its arguments. All integers are
// little-endian; a truncated input reads zeros.
//
//   flags bit 0: ShimConfig::one_round_trip_per_call
//   flags bit 1: start with the desk link up, a desk Hello and a two-reader snapshot
//
//   kOpen                                        a new client connects
//   kClose       u8 client                       a client goes away
//   kClientBytes u8 client, u8 n, n bytes        raw bytes from a client
//   kRequest     u8 client, u8 command index, u8 fix flags, u8 pick, u16 n, n body bytes,
//                u16 m, m trailing bytes         a request built around the fuzz bytes
//                (see kRequestCommands / kFix* for how the fields are patched)
//   kReply       u8 pending pick, u8 rv pick, u32 handle, u32 protocol, u32 state,
//                u32 length, u16 n, n data bytes, u8 k, k ATR bytes, u8 p, p times
//                (u8 c, c bytes, u8 r, r bytes)  a Reply to a request the shim sent
//   kSnapshot    u8 count, count times (u8 name, u16 state, u16 events, u8 a, a ATR bytes)
//   kHello       u8 flags (bits 0-1 role, 2 reply, 3 wrong major), u32 caps, u8 instance
//   kDeskBytes   u16 n, n bytes                  raw bytes on the desk link (framing too)
//   kDeskPayload u16 n, n bytes                  one frame with an arbitrary payload
//   kDeskError   u8 code, u8 n, n text bytes
//   kDeskDown                                    the desk transport drops
//   kDeskUp                                      the desk transport comes (back) up
//   kTick        u16 milliseconds                time passes; timers run
//
// "client" picks among the open clients (index % count, in id order); "pick" and
// "pending pick" choose among the ids the harness has seen (contexts and cards in the
// shim's replies, request ids in its frames to the desk): 0 is the most recent one.
#pragma once

#include <array>
#include <cstdint>
#include <string>

namespace cardbridge::fuzz::shim_script {

enum Action : uint8_t {
  kOpen,
  kClose,
  kClientBytes,
  kRequest,
  kReply,
  kSnapshot,
  kHello,
  kDeskBytes,
  kDeskPayload,
  kDeskError,
  kDeskDown,
  kDeskUp,
  kTick,
  kActionCount
};

inline constexpr uint8_t kFlagOneRoundTrip = 1u << 0;
inline constexpr uint8_t kFlagDeskReady = 1u << 1;

// kRequest command index -> pcsc-lite opcode (every one, plus ones clients never send).
inline constexpr std::array<uint32_t, 26> kRequestCommands = {
    0x11, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0D, 0x0F,
    0x10, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x03, 0x0C, 0x0E, 0x00, 0x18, 0x09};

// kRequest fix flags: patch the body so that it gets past the shim's first checks.
inline constexpr uint8_t kFixHandle = 1u << 0;    // card/context field := a live id (pick)
inline constexpr uint8_t kFixReader = 1u << 1;    // CONNECT reader := a known reader (pick)
inline constexpr uint8_t kFixVersion = 1u << 2;   // VERSION := {4, 4 + pick % 3}
inline constexpr uint8_t kFixLength = 1u << 3;    // TRANSMIT/CONTROL send length := trailing size
inline constexpr uint8_t kFixHeader = 1u << 4;    // header size := the struct size

// Reader names used by kSnapshot (index % size) and kFixReader.
inline constexpr std::array<const char*, 6> kReaderNames = {
    "Virtual PCD 00 00", "Virtual PCD 00 01", "Gemalto PC Twin Reader 00 00",
    "Yubico YubiKey OTP+FIDO+CCID 01 00", "R", "Identiv uTrust 4701 F Dual Interface Reader 02 00"};

// kReply rv pick (index % size; the last entry means "use the handle field as rv").
inline constexpr std::array<uint32_t, 9> kReplyRvs = {0x00000000, 0x80100008, 0x8010000B, 0x80100069,
                                                      0x80100068, 0x8010000C, 0x80100017, 0x80100016,
                                                      0xFFFFFFFF};

}  // namespace cardbridge::fuzz::shim_script
