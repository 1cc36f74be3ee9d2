// CardSim: a CPS-like smart card (ISO 7816-4), pure APDU in -> APDU out plus the time the
// real card would have needed. No I/O, no clocks: the vpcd link (main.cpp) sleeps.
//
// What it models (docs: /work/shared/docs/cps-cards.md, tests/tools/cardsim/README.md):
//  * file system: MF 3F00 with EF.SN.ICC (D003), EF_ACTUA (D010), EF.DIR (2F00), a
//    CPS2ter-style DF 0001 with two business-data EFs, and the PKCS#15 DF 5000 (AID
//    E8 28 BD 08 0F 80 25 00 00 01 FF 00 10) with ODF, TokenInfo, AODF, PrKDF, CDF, DODF
//    and two ~1.8 KB X.509 certificates;
//  * SELECT (P1 00/01/02/03/04/08/09, P2 00 FCI / 04 FCP / 0C none), READ BINARY honouring
//    Le and the file size (6282 past the end, 6B00 beyond it), GET DATA (PIN status SDO),
//    VERIFY with a retry counter, MSE SET, INTERNAL AUTHENTICATE, PSO (CDS, DECIPHER),
//    command chaining (CLA bit 0x10), GET CHALLENGE;
//  * T=0 (CPS3 personality): every case-4 command that yields data answers 61xx and the
//    data comes with GET RESPONSE; T=1 (CPS4): data comes directly.
// Thread: one thread uses a CardSim at a time.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <openssl/evp.h>

#include "hash.hpp"

namespace cardbridge::cardsim {

using Bytes = std::vector<uint8_t>;

// Card time per APDU: a fixed cost by instruction plus the wire time of every byte.
struct Timing {
  double per_byte_ms = 0;
  double select_ms = 0;
  double read_ms = 0;
  double get_response_ms = 0;
  double get_data_ms = 0;
  double mse_ms = 0;
  double verify_ms = 0;
  double rsa_ms = 0;
  double other_ms = 0;
  Timing scaled(double f) const;
};

enum class Personality { kCps3, kCps4 };

struct Profile {
  std::string name;
  Personality personality = Personality::kCps3;
  Bytes atr;
  bool t0 = true;  // case-4 answers as 61xx + GET RESPONSE
  Timing timing;
  // cps3, cps4, instant (the CPS3 card with no delays); nullopt for an unknown name.
  static std::optional<Profile> named(std::string_view name);
};

struct Answer {
  Bytes response;       // data + SW1 SW2
  double card_ms = 0;   // how long the real card would take
  std::string note;     // short description for the log (never contains a PIN)
};

struct EvpKeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using EvpKey = std::unique_ptr<EVP_PKEY, EvpKeyFree>;

// The card holder, as written in the certificates and the business-data files.
struct Holder {
  std::string id;                  // RPPS-like 11 digits (certificate serialNumber)
  std::string given_name = "CLAIRE";
  std::string surname = "DUPONT";
  std::string title = "Medecin";
};

// Subject CN of the simulator's certification authority (issuer of every card's certificates).
inline constexpr const char* kCaName = "AC SIMULEE CARDBRIDGE (TEST)";

// Everything generated at start-up from the seed (deterministic for a given seed), plus the
// options that change the card's files.
struct CardContent {
  EvpKey key_auth;         // RSA-2048, authentication key (TLS client authentication)
  EvpKey key_sign;         // RSA-2048, signature (non-repudiation) key
  EvpKey ca_key;           // the simulator's CA (same for every seed)
  Bytes cert_auth;         // DER, 1812 bytes, issued by the CA
  Bytes cert_sign;         // DER, 1796 bytes, issued by the CA
  Bytes ca_cert;           // DER, self-signed
  Bytes serial;            // 5 bytes of BCD digits, part of EF.SN.ICC
  Holder holder;
  // EF_ACTUA start date, 14 digits YYYYMMDDhhmmss (BCD in the file); "" = an empty
  // EF_ACTUA (what the Cryptolib calls a bad EF_ACTUA).
  std::string actua = "20250115080000";
  // Revision of the situation (activity) data: changes their content, as a card update does.
  unsigned data_revision = 1;
};
CardContent make_content(uint64_t seed);

class CardSim {
 public:
  static constexpr uint8_t kMaxTries = 3;
  static constexpr uint8_t kPinRef = 0x01;      // the PIN ("code porteur"); 0x81 is accepted as an alias
  static constexpr uint8_t kAuthKeyRefCps3 = 0x81;  // authentication key (keyReference in the PrKDF)
  static constexpr uint8_t kAuthKeyRefCps4 = 0x20;  // CPS4: what the Cryptolib expects (CPS4_AUTH_PRIV_KEY_ID)
  static constexpr uint8_t kSignKeyRef = 0x82;      // signature key

  CardSim(Profile profile, CardContent content, std::string pin);

  const Bytes& atr() const { return profile_.atr; }
  const Profile& profile() const { return profile_; }
  // Power off, power on, reset: the card forgets its volatile state (PIN status, current
  // file, security environment, pending GET RESPONSE data, chaining).
  void reset();
  Answer process(const Bytes& apdu);
  // Sizes of the EFs, for the README and tests: path (hex) -> size.
  std::map<std::string, std::size_t> file_sizes() const;
  // Contents of the EFs: path (hex) -> bytes.
  std::map<std::string, Bytes> files() const;
  // TokenInfo label, and the serial digits of EF.SN.ICC (after the issuer number).
  std::string token_label() const;
  std::string serial_digits() const;
  const CardContent& content() const { return content_; }

 private:
  struct Node {
    uint16_t fid = 0;
    bool df = false;
    Bytes aid;     // DFs with a name
    Bytes data;    // EFs
    std::vector<uint16_t> path;  // from the MF, MF included
  };
  struct Command {
    uint8_t cla = 0, ins = 0, p1 = 0, p2 = 0;
    Bytes data;
    std::optional<uint32_t> le;  // 1..65536
  };

  void build_filesystem();
  Node& add(std::vector<uint16_t> path, bool df, Bytes data = {}, Bytes aid = {});
  Node* find(const std::vector<uint16_t>& path);
  Node* child(const std::vector<uint16_t>& dir, uint16_t fid);
  Bytes fcp(const Node& n, uint8_t tag = 0x62) const;  // 62 FCP, 6F FCI

  Answer dispatch(const Command& c);
  Answer select(const Command& c);
  Answer read_binary(const Command& c);
  Answer get_response(const Command& c);
  Answer get_data(const Command& c);
  Answer verify(const Command& c);
  Answer mse(const Command& c);
  Answer internal_authenticate(const Command& c);
  Answer pso(const Command& c);
  Answer pso_hash(const Command& c);
  Answer get_challenge(const Command& c);
  // Data for a case-4 command: directly (T=1) or as 61xx with data kept for GET RESPONSE.
  Answer with_data(Bytes data, const Command& c, double fixed_ms, std::string note);
  Answer sw(uint16_t sw, double fixed_ms, std::string note);
  // RSA with the key that MSE SET selected (the authentication key by default).
  std::optional<Bytes> rsa_private(const Bytes& in, bool pkcs1_type1);
  std::optional<Bytes> rsa_pss(const Bytes& hash);
  uint8_t auth_key_ref() const;
  EVP_PKEY* selected_key() const;
  bool pin_matches(const Bytes& given) const;

  Profile profile_;
  CardContent content_;
  std::string pin_;
  std::map<std::vector<uint16_t>, Node> fs_;
  std::vector<uint16_t> current_df_;
  std::optional<std::vector<uint16_t>> current_ef_;
  bool verified_ = false;
  uint8_t tries_ = kMaxTries;
  std::optional<uint8_t> se_key_;   // MSE SET key reference
  std::optional<uint8_t> se_alg_;   // MSE SET algorithm (CPS4 tag 91: bit 04 = RSA-PSS)
  std::optional<HashAlg> hash_alg_; // MSE SET hash template (P2 AA) algorithm
  std::optional<Bytes> hash_;       // PSO HASH result, signed by the next PSO CDS without data
  Bytes pending_;                   // data waiting for GET RESPONSE (T=0)
  std::optional<uint8_t> chain_ins_;
  Bytes chain_data_;
  uint64_t challenge_state_ = 0x9E3779B97F4A7C15ull;
};

}  // namespace cardbridge::cardsim
