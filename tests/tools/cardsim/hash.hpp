// The last step of a hash computed partly by the host (IAS ECC "PSO HASH"): the host sends
// the intermediate state of SHA-1/SHA-256 after the whole blocks it hashed, the number of
// bits hashed so far and the remaining (< 64) bytes; the card finishes the hash. Plain
// FIPS 180-4 compression functions: OpenSSL does not expose a way to resume from a state.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace cardbridge::cardsim {

enum class HashAlg { kSha1, kSha256 };

// state: 20 (SHA-1) or 32 (SHA-256) bytes, the chaining words big-endian; bits_done: the
// message length hashed into |state|, a multiple of 512; tail: the rest of the message.
// nullopt when the sizes do not fit the algorithm.
std::optional<std::vector<uint8_t>> finish_hash(HashAlg alg, const std::vector<uint8_t>& state, uint64_t bits_done,
                                                const std::vector<uint8_t>& tail);

// The whole hash of a message (what finish_hash gives from the initial state).
std::vector<uint8_t> full_hash(HashAlg alg, const std::vector<uint8_t>& message);

// DER DigestInfo prefix of the algorithm (PKCS#1 v1.5 signature input = prefix || hash).
std::vector<uint8_t> digest_info_prefix(HashAlg alg);

}  // namespace cardbridge::cardsim
