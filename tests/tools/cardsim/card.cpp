#include "card.hpp"

#include <openssl/rsa.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/x509.h>

#include <algorithm>
#include <optional>
#include <stdexcept>
#include <cstring>
#include <initializer_list>
#include <string>

namespace cardbridge::cardsim {

namespace {

constexpr uint16_t kMf = 0x3F00;
constexpr uint16_t kP15 = 0x5000;  // PKCS#15 application DF
constexpr uint16_t kCps2ter = 0x0001;
const Bytes kP15Aid = {0xE8, 0x28, 0xBD, 0x08, 0x0F, 0x80, 0x25, 0x00, 0x00, 0x01, 0xFF, 0x00, 0x10};

Bytes der_len(std::size_t n) {
  if (n < 0x80) return {static_cast<uint8_t>(n)};
  if (n < 0x100) return {0x81, static_cast<uint8_t>(n)};
  return {0x82, static_cast<uint8_t>(n >> 8), static_cast<uint8_t>(n & 0xFF)};
}

Bytes tlv(uint32_t tag, const Bytes& value) {
  Bytes out;
  if (tag > 0xFFFF) out.push_back(static_cast<uint8_t>(tag >> 16));
  if (tag > 0xFF) out.push_back(static_cast<uint8_t>((tag >> 8) & 0xFF));
  out.push_back(static_cast<uint8_t>(tag & 0xFF));
  auto l = der_len(value.size());
  out.insert(out.end(), l.begin(), l.end());
  out.insert(out.end(), value.begin(), value.end());
  return out;
}

Bytes text(std::string_view s) { return Bytes(s.begin(), s.end()); }

Bytes cat(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

Bytes fid_bytes(std::initializer_list<uint16_t> fids) {
  Bytes out;
  for (uint16_t f : fids) {
    out.push_back(static_cast<uint8_t>(f >> 8));
    out.push_back(static_cast<uint8_t>(f & 0xFF));
  }
  return out;
}

// Content followed by zero padding up to the allocated file size (as on IAS cards).
Bytes padded(Bytes content, std::size_t size) {
  if (content.size() > size) throw std::logic_error("cardsim: file content larger than its allocated size");
  content.resize(size, 0x00);
  return content;
}

Bytes path_obj(std::initializer_list<uint16_t> fids) { return tlv(0x30, tlv(0x04, fid_bytes(fids))); }

// PKCS#15 (ISO 7816-15) objects, DER. Every object is
//   SEQUENCE { CommonObjectAttributes, ClassAttributes, [1] { TypeAttributes } }
// CommonObjectFlags: private (bit 0), modifiable (bit 1).
enum ObjFlags : uint8_t { kPublic = 0, kPrivate = 0x80, kModifiable = 0x40 };

Bytes common_attrs(std::string_view label, uint8_t flags, std::optional<uint8_t> auth_id) {
  Bytes body = tlv(0x0C, text(label));
  if (flags == (kPrivate | kModifiable)) body = cat({body, tlv(0x03, {0x06, 0xC0})});
  if (flags == kPrivate) body = cat({body, tlv(0x03, {0x07, 0x80})});
  if (flags == kModifiable) body = cat({body, tlv(0x03, {0x06, 0x40})});
  if (auth_id) body = cat({body, tlv(0x04, {*auth_id})});
  return tlv(0x30, body);
}

Bytes p15_object(const Bytes& common, const Bytes& class_attrs, const Bytes& type_attrs) {
  return tlv(0x30, cat({common, tlv(0x30, class_attrs), tlv(0xA1, type_attrs)}));
}

// Identifier of a key and of its certificate: SHA-1 of the public key (as many cards do).
Bytes key_id(EVP_PKEY* key) {
  unsigned char* der = nullptr;
  const int len = i2d_PUBKEY(key, &der);
  Bytes id(EVP_MAX_MD_SIZE);
  unsigned int n = 0;
  EVP_Digest(der, static_cast<std::size_t>(len), id.data(), &n, EVP_sha1(), nullptr);
  OPENSSL_free(der);
  id.resize(n);
  return id;
}

// CPS4 applets: ChipDoc 80 25 00 00 01 FF 01 00, CPS2ter 80 25 00 00 01 FF 00 02, IDS
// A0 00 00 01 51 00 00 (card-cps4.c of the Cryptolib's public sources).
bool is_cps4_applet(const Bytes& aid) {
  static const Bytes kAids[] = {{0x80, 0x25, 0x00, 0x00, 0x01, 0xFF, 0x01, 0x00},
                                {0x80, 0x25, 0x00, 0x00, 0x01, 0xFF, 0x00, 0x02},
                                {0xA0, 0x00, 0x00, 0x01, 0x51, 0x00, 0x00}};
  for (const auto& a : kAids) {
    if (aid == a) return true;
  }
  return false;
}

// A DER INTEGER for a non-negative value below 0x10000 (a leading 00 when the top bit is set).
Bytes der_uint(unsigned v) {
  Bytes b;
  if (v > 0xFF) b.push_back(static_cast<uint8_t>(v >> 8));
  b.push_back(static_cast<uint8_t>(v & 0xFF));
  if (b[0] & 0x80) b.insert(b.begin(), 0x00);
  return tlv(0x02, b);
}

Bytes bcd_digits(std::string_view digits) {
  Bytes out;
  for (std::size_t i = 0; i + 1 < digits.size(); i += 2)
    out.push_back(static_cast<uint8_t>(((digits[i] - '0') << 4) | (digits[i + 1] - '0')));
  return out;
}

}  // namespace

Timing Timing::scaled(double f) const {
  Timing t = *this;
  for (double* v : {&t.per_byte_ms, &t.select_ms, &t.read_ms, &t.get_response_ms, &t.get_data_ms, &t.mse_ms,
                    &t.verify_ms, &t.rsa_ms, &t.other_ms})
    *v *= f;
  return t;
}

std::optional<Profile> Profile::named(std::string_view name) {
  // Fixed costs inside the ranges of cps-cards.md (5-15 ms per APDU, 20-50 ms per
  // VERIFY, 150-500 ms per RSA-2048 operation); CPS3 I/O ~1.1 ms per byte (no TA1).
  Timing cps3{1.1, 12, 6, 5, 10, 8, 35, 300, 10};
  if (name == "cps3" || name == "instant") {
    Profile p;
    p.name = std::string(name);
    p.personality = Personality::kCps3;
    p.atr = {0x3B, 0xAC, 0x00, 0x40, 0x2A, 0x00, 0x12, 0x25, 0x00, 0x64, 0x80, 0x00, 0x03, 0x10, 0x00, 0x90, 0x00};
    p.t0 = true;
    p.timing = name == "instant" ? cps3.scaled(0) : cps3;
    return p;
  }
  if (name == "cps4") {
    Profile p;
    p.name = "cps4";
    p.personality = Personality::kCps4;
    p.atr = {0x3B, 0x9B, 0x18, 0x80, 0x01, 0x00, 0x12, 0x25, 0x00, 0x64, 0x80, 0x04, 0x01, 0x00, 0x00, 0x90, 0x44};
    p.t0 = false;
    p.timing = cps3;
    p.timing.per_byte_ms = cps3.per_byte_ms / 12.0;  // TA1=0x18: ~12x faster I/O
    return p;
  }
  return std::nullopt;
}

CardSim::CardSim(Profile profile, CardContent content, std::string pin)
    : profile_(std::move(profile)), content_(std::move(content)), pin_(std::move(pin)) {
  build_filesystem();
  reset();
}

void CardSim::reset() {
  current_df_ = {kMf};
  current_ef_.reset();
  verified_ = false;
  se_key_.reset();
  se_alg_.reset();
  hash_alg_.reset();
  hash_.reset();
  pending_.clear();
  chain_ins_.reset();
  chain_data_.clear();
}

CardSim::Node& CardSim::add(std::vector<uint16_t> path, bool df, Bytes data, Bytes aid) {
  Node n;
  n.fid = path.back();
  n.df = df;
  n.data = std::move(data);
  n.aid = std::move(aid);
  n.path = path;
  return fs_[path] = std::move(n);
}

CardSim::Node* CardSim::find(const std::vector<uint16_t>& path) {
  auto it = fs_.find(path);
  return it == fs_.end() ? nullptr : &it->second;
}

CardSim::Node* CardSim::child(const std::vector<uint16_t>& dir, uint16_t fid) {
  auto p = dir;
  p.push_back(fid);
  return find(p);
}

void CardSim::build_filesystem() {
  const Bytes& sn = content_.serial;
  const Holder& h = content_.holder;
  const bool cps4 = profile_.personality == Personality::kCps4;
  add({kMf}, true);
  // EF.SN.ICC: 12 bytes, PAN 80 25 00 00 01 (ANS's issuer number, which the Cryptolib checks
  // at offset 2) + 10 BCD digits; the Cryptolib's serial is the digits after the issuer
  // number without the last byte.
  add({kMf, 0xD003}, false, cat({{0x5A, 0x0A, 0x80, 0x25, 0x00, 0x00, 0x01}, sn}));
  // EF_ACTUA: when the card's situation data were last updated. The Cryptolib compares it
  // with the copy in its disk cache to decide whether the cached situation files are still
  // valid: template EC, start date 81 and end date 82, BCD YYYYMMDDhhmmss
  // (SpecificationsInternes_PKCS11_CryptoLib_CPS3, "Gestion du cache"). An empty EF_ACTUA
  // makes the card "recognised but unusable" (CKR_VENDOR_DEFINED + 1).
  add({kMf, 0xD010}, false,
      content_.actua.empty()
          ? Bytes{}
          : padded(tlv(0xEC, cat({tlv(0x81, bcd_digits(content_.actua)),
                                  tlv(0x82, {0x20, 0x28, 0x01, 0x15, 0x07, 0x59, 0x59})})),
                   20));
  // EF.ATR (IAS ECC): category indicator, card service data, pre-issuing data (IC
  // manufacturer/type, OS and IAS ECC versions), card capabilities, and the IAS ECC I/O
  // buffer sizes (send, send with SM, receive, receive with SM: 255, 255, 231, 231).
  // OpenSC's IAS-ECC driver reads it first for a CPx card.
  add({kMf, 0x2F01}, false,
      cat({{0x80}, tlv(0x43, {0xB8}), tlv(0x46, {0x4F, 0x55, cps4 ? uint8_t{0x04} : uint8_t{0x03}, 0x10}),
           tlv(0x47, {0x94, 0x01, 0x00}),
           tlv(0xE0, {0x02, 0x02, 0x00, 0xFF, 0x02, 0x02, 0x00, 0xFF, 0x02, 0x02, 0x00, 0xE7, 0x02, 0x02, 0x00, 0xE7})}));
  // EF.DIR: one application template for the PKCS#15 application.
  add({kMf, 0x2F00}, false,
      padded(tlv(0x61, cat({tlv(0x4F, kP15Aid), tlv(0x50, text(cps4 ? "CPS4" : "CPS3")),
                            tlv(0x51, fid_bytes({kMf, kP15}))})),
             40));
  // CPS2ter-compatible area: contact-mode marker (the Cryptolib reads 7001 to tell contact
  // from contactless) and the business data (ASN.1, "données métier") the DODF points at.
  add({kMf, kCps2ter}, true);
  add({kMf, kCps2ter, 0x7001}, false, padded(tlv(0x70, text(cps4 ? "CPS4 contact" : "CPS3 contact")), 16));
  add({kMf, kCps2ter, 0xD001}, false,
      padded(tlv(0x70, cat({tlv(0x80, {0x03}), tlv(0x81, sn), tlv(0x82, text("20240115")),
                            tlv(0x83, text("20270115"))})),
             48));
  add({kMf, kCps2ter, 0xD002}, false,
      padded(tlv(0x70, cat({tlv(0x80, text(h.surname)), tlv(0x81, text(h.given_name)), tlv(0x82, text(h.title))})),
             64));
  add({kMf, kCps2ter, 0xD107}, false, padded(tlv(0x70, text("CPS_DATA (application data)")), 64));
  add({kMf, kCps2ter, 0xD110}, false,
      padded(tlv(0x70, cat({tlv(0x80, text(h.surname)), tlv(0x81, text(h.given_name)), tlv(0x82, text("10")),
                            tlv(0x83, text(h.title)), tlv(0x84, text("Medecine generale")),
                            tlv(0x85, text("RPPS " + h.id)),
                            tlv(0x86, text("Hopital simule de CardBridge, service des admissions"))})),
             420));
  const std::string rev = "revision " + std::to_string(content_.data_revision);
  for (uint16_t f = 0xD120; f <= 0xD123; ++f) {
    add({kMf, kCps2ter, f}, false,
        padded(tlv(0x71, cat({tlv(0x80, {static_cast<uint8_t>(f & 0x0F)}), tlv(0x81, text("Etablissement simule")),
                              tlv(0x82, text("75 PARIS")), tlv(0x83, text("FINESS 750000000")),
                              tlv(0x84, text("Mode d'exercice: salarie")), tlv(0x85, text(rev))})),
               272));
  }
  // PKCS#15 application.
  add({kMf, kP15}, true, {}, kP15Aid);
  add({kMf, kP15, 0x5031}, false,
      cat({tlv(0xA8, path_obj({kMf, kP15, 0x4401})), tlv(0xA0, path_obj({kMf, kP15, 0x4402})),
           tlv(0xA4, path_obj({kMf, kP15, 0x4403})), tlv(0xA7, path_obj({kMf, kP15, 0x4404}))}));
  // TokenInfo: version, serial number (the PAN), manufacturer, label, flags (loginRequired),
  // and the algorithms the card offers ([2] supportedAlgorithms: reference, PKCS#11
  // mechanism, parameters, operations, card algorithm reference). OpenSC's IAS-ECC driver
  // takes the MSE algorithm references from there; the Cryptolib has its own (02, 12, 42).
  auto algo = [](uint8_t ref, Bytes mech, Bytes ops, uint8_t card_ref) {
    return tlv(0x30, cat({tlv(0x02, {ref}), tlv(0x02, mech), tlv(0x05, {}), tlv(0x03, ops), der_uint(card_ref)}));
  };
  const Bytes sign_op = {0x06, 0x40}, decipher_op = {0x02, 0x04}, hash_op = {0x01, 0x02};
  add({kMf, kP15, 0x5032}, false,
      padded(tlv(0x30, cat({tlv(0x02, {0x00}), tlv(0x04, cat({{0x80, 0x25, 0x00, 0x00, 0x01}, sn})),
                            tlv(0x0C, text("ANS (simulated by CardBridge)")), tlv(0x80, text(token_label())),
                            tlv(0x03, {0x06, 0x40}),
                            tlv(0xA2, cat({algo(1, {0x01}, sign_op, 0x02),            // CKM_RSA_PKCS
                                           algo(2, {0x06}, sign_op, 0x12),            // CKM_SHA1_RSA_PKCS
                                           algo(3, {0x40}, sign_op, 0x42),            // CKM_SHA256_RSA_PKCS
                                           algo(4, {0x01}, decipher_op, 0x1A),        // CKM_RSA_PKCS
                                           algo(5, {0x02, 0x20}, hash_op, 0x10),      // CKM_SHA_1
                                           algo(6, {0x02, 0x50}, hash_op, 0x40)}))})),  // CKM_SHA256
             192));
  // AODF: the holder's PIN ("code porteur"): local, initialized, needs padding (bits 1, 4,
  // 5); ASCII digits, 4..8, stored on 8 bytes padded with FF; reference 01; no path (a PIN
  // path 3F00 makes the Cryptolib select it as an EF: 00 A4 02 0C 02 3F00).
  add({kMf, kP15, 0x4401}, false,
      padded(p15_object(common_attrs("Code porteur", kModifiable, std::nullopt), tlv(0x04, {CardSim::kPinRef}),
                        tlv(0x30, cat({tlv(0x03, {0x02, 0x4C}), tlv(0x0A, {0x01}), tlv(0x02, {0x04}),
                                       tlv(0x02, {0x08}), tlv(0x02, {0x08}), tlv(0x80, {CardSim::kPinRef}),
                                       tlv(0x04, {0xFF})}))),
             176));
  // PrKDF: two RSA-2048 keys protected by the PIN (authId 01). Authentication: decrypt,
  // sign, signRecover; signature: nonRepudiation. Access: sensitive, alwaysSensitive,
  // neverExtractable, local.
  auto key_object = [&](std::string_view label, EVP_PKEY* key, uint8_t ref, bool sign) {
    const Bytes usage = sign ? tlv(0x03, {0x06, 0x00, 0x40}) : tlv(0x03, {0x04, 0x70});
    return p15_object(common_attrs(label, kPrivate, CardSim::kPinRef),
                      cat({tlv(0x04, key_id(key)), usage, tlv(0x03, {0x03, 0xB8}), der_uint(ref)}),
                      tlv(0x30, cat({path_obj({kMf, kP15}), tlv(0x02, {0x08, 0x00})})));
  };
  add({kMf, kP15, 0x4402}, false,
      padded(cat({key_object("Cle d'authentification CPS", content_.key_auth.get(), auth_key_ref(), false),
                  key_object("Cle de signature CPS", content_.key_sign.get(), CardSim::kSignKeyRef, true)}),
             248));
  // CDF: the two certificates (public objects, same identifiers as their keys).
  auto cert_object = [&](std::string_view label, EVP_PKEY* key, uint16_t fid, std::size_t len) {
    return p15_object(common_attrs(label, kPublic, std::nullopt), tlv(0x04, key_id(key)),
                      tlv(0x30, tlv(0x30, cat({tlv(0x04, fid_bytes({kMf, kP15, fid})), tlv(0x02, {0x00}),
                                               tlv(0x80, {static_cast<uint8_t>(len >> 8),
                                                          static_cast<uint8_t>(len & 0xFF)})}))));
  };
  add({kMf, kP15, 0x4403}, false,
      padded(cat({cert_object("Certificat d'authentification CPS", content_.key_auth.get(), 0xC000,
                              content_.cert_auth.size()),
                  cert_object("Certificat de signature CPS", content_.key_sign.get(), 0xC001,
                              content_.cert_sign.size())}),
             216));
  // DODF: the business data ("objets métier") under the labels the Cryptolib documents
  // (SpecificationsExternes, "Labels des cartes CPS"), application "CPS"; the activities
  // (situations) need the PIN; CPS_DATA is the one modifiable object.
  auto data_object = [&](std::string_view label, uint16_t fid, uint8_t flags) {
    const bool priv = (flags & kPrivate) != 0;
    return p15_object(common_attrs(label, flags, priv ? std::optional<uint8_t>(CardSim::kPinRef) : std::nullopt),
                      tlv(0x0C, text("CPS")), path_obj({kMf, kCps2ter, fid}));
  };
  add({kMf, kP15, 0x4404}, false,
      padded(cat({data_object("CPS_ID_CARD", 0xD001, kPublic), data_object("CPS_NAME_PS", 0xD002, kPublic),
                  data_object("CPS_INFO_PS", 0xD110, kPublic), data_object("CPS_DATA", 0xD107, kModifiable),
                  data_object("CPS_ACTIVITY_01_PS", 0xD120, kPrivate),
                  data_object("CPS_ACTIVITY_02_PS", 0xD121, kPrivate),
                  data_object("CPS_ACTIVITY_03_PS", 0xD122, kPrivate),
                  data_object("CPS_ACTIVITY_04_PS", 0xD123, kPrivate)}),
             400));
  add({kMf, kP15, 0xC000}, false, content_.cert_auth);
  add({kMf, kP15, 0xC001}, false, content_.cert_sign);
}

std::string CardSim::token_label() const {
  return "CPS de " + content_.holder.given_name + " " + content_.holder.surname;
}

std::string CardSim::serial_digits() const {
  std::string out;
  static const char* d = "0123456789ABCDEF";
  for (uint8_t b : content_.serial) {
    out += d[b >> 4];
    out += d[b & 15];
  }
  return out;
}

std::map<std::string, Bytes> CardSim::files() const {
  std::map<std::string, Bytes> out;
  for (const auto& [path, n] : fs_) {
    if (n.df) continue;
    std::string p;
    char buf[8];
    for (uint16_t f : path) {
      std::snprintf(buf, sizeof buf, "%04X", f);
      p += buf;
    }
    out[p] = n.data;
  }
  return out;
}

std::map<std::string, std::size_t> CardSim::file_sizes() const {
  std::map<std::string, std::size_t> out;
  for (const auto& [path, data] : files()) out[path] = data.size();
  return out;
}

Bytes CardSim::fcp(const Node& n, uint8_t tag) const {
  Bytes body;
  if (n.df) {
    body = cat({tlv(0x82, {0x38}), tlv(0x83, fid_bytes({n.fid}))});
    if (!n.aid.empty()) body = cat({body, tlv(0x84, n.aid)});
  } else {
    const auto size = n.data.size();
    body = cat({tlv(0x80, {static_cast<uint8_t>(size >> 8), static_cast<uint8_t>(size & 0xFF)}), tlv(0x82, {0x01}),
                tlv(0x83, fid_bytes({n.fid}))});
  }
  // Life cycle: operational, activated. Security attributes as IAS ECC cards give them (A1
  // holding the compact form 8C: access mode byte 7B, then one condition per operation:
  // delete, terminate, activate, deactivate, update, read/create; 00 always, FF never).
  // OpenSC's IAS-ECC driver insists on them.
  const uint8_t update = n.df || n.fid != 0xD107 ? 0xFF : 0x00;  // CPS_DATA is writable
  const uint8_t last = n.df ? 0xFF : 0x00;                       // EF: read always; DF: create never
  body = cat({body, tlv(0x8A, {0x05}), tlv(0xA1, tlv(0x8C, {0x7B, 0xFF, 0xFF, 0xFF, 0xFF, update, last}))});
  return tlv(tag, body);
}

Answer CardSim::process(const Bytes& apdu) {
  Answer a;
  Command c;
  bool parsed = apdu.size() >= 4;
  if (parsed) {
    c.cla = apdu[0];
    c.ins = apdu[1];
    c.p1 = apdu[2];
    c.p2 = apdu[3];
    const std::size_t n = apdu.size();
    if (n == 5) {
      c.le = apdu[4] == 0 ? 256u : apdu[4];
    } else if (n > 5) {
      std::size_t lc = apdu[4], pos = 5;
      bool ext = false;
      if (lc == 0 && n >= 7) {  // extended length
        lc = (std::size_t{apdu[5]} << 8) | apdu[6];
        pos = 7;
        ext = true;
      }
      if (pos + lc > n) {
        parsed = false;
      } else {
        c.data.assign(apdu.begin() + static_cast<long>(pos), apdu.begin() + static_cast<long>(pos + lc));
        const std::size_t rest = n - pos - lc;
        if (rest == 1 && !ext) {
          c.le = apdu[n - 1] == 0 ? 256u : apdu[n - 1];
        } else if (rest == 2 && ext) {
          const uint32_t v = (uint32_t{apdu[n - 2]} << 8) | apdu[n - 1];
          c.le = v == 0 ? 65536u : v;
        } else if (rest != 0) {
          parsed = false;
        }
      }
    }
  }
  if (!parsed) {
    a = sw(0x6700, profile_.timing.other_ms, "wrong length");
  } else {
    if (c.ins != 0xC0) pending_.clear();
    if ((c.cla & 0x10) != 0) {
      // Command chaining: keep the data, answer 9000, process with the last part.
      if (chain_ins_ && *chain_ins_ != c.ins) chain_data_.clear();
      chain_ins_ = c.ins;
      chain_data_.insert(chain_data_.end(), c.data.begin(), c.data.end());
      a = sw(0x9000, profile_.timing.other_ms, "chained part");
    } else {
      if (chain_ins_) {
        if (*chain_ins_ == c.ins) c.data.insert(c.data.begin(), chain_data_.begin(), chain_data_.end());
        chain_ins_.reset();
        chain_data_.clear();
      }
      a = dispatch(c);
    }
  }
  a.card_ms += profile_.timing.per_byte_ms * static_cast<double>(apdu.size() + a.response.size());
  return a;
}

Answer CardSim::sw(uint16_t code, double fixed_ms, std::string note) {
  Answer a;
  a.response = {static_cast<uint8_t>(code >> 8), static_cast<uint8_t>(code & 0xFF)};
  a.card_ms = fixed_ms;
  a.note = std::move(note);
  return a;
}

Answer CardSim::with_data(Bytes data, const Command& c, double fixed_ms, std::string note) {
  if (profile_.t0) {
    // T=0: case 4 cannot return data in the same exchange; 61xx announces it.
    pending_ = std::move(data);
    const auto n = pending_.size();
    return sw(static_cast<uint16_t>(0x6100 | (n >= 256 ? 0 : n)), fixed_ms, note + " (61xx)");
  }
  if (c.le && *c.le < data.size()) data.resize(*c.le);
  Answer a;
  a.response = std::move(data);
  a.response.push_back(0x90);
  a.response.push_back(0x00);
  a.card_ms = fixed_ms;
  a.note = std::move(note);
  return a;
}

Answer CardSim::dispatch(const Command& c) {
  const uint8_t cla = c.cla & 0xEC;  // drop chaining and logical channel bits
  if (cla != 0x00 && cla != 0x80) return sw(0x6E00, profile_.timing.other_ms, "class not supported");
  switch (c.ins) {
    case 0xA4: return select(c);
    case 0xB0: return read_binary(c);
    case 0xC0: return get_response(c);
    case 0xCB: return get_data(c);
    case 0x20: return verify(c);
    case 0x22: return mse(c);
    case 0x88: return internal_authenticate(c);
    case 0x2A: return pso(c);
    case 0x84: return get_challenge(c);
    default: return sw(0x6D00, profile_.timing.other_ms, "INS not supported");
  }
}

Answer CardSim::select(const Command& c) {
  const double t = profile_.timing.select_ms;
  std::vector<uint16_t> fids;
  if (c.data.size() % 2 == 0) {
    for (std::size_t i = 0; i + 1 < c.data.size(); i += 2) fids.push_back(static_cast<uint16_t>((c.data[i] << 8) | c.data[i + 1]));
  }
  Node* target = nullptr;
  switch (c.p1) {
    case 0x00:  // MF, or a FID near the current DF
      if (c.data.empty() || (fids.size() == 1 && fids[0] == kMf)) {
        target = find({kMf});
      } else if (fids.size() == 1) {
        target = child(current_df_, fids[0]);
        if (!target && current_df_.size() > 1) {
          auto parent = current_df_;
          parent.pop_back();
          target = child(parent, fids[0]);
          if (!target && parent.back() == fids[0]) target = find(parent);
        }
        if (!target && current_df_.back() == fids[0]) target = find(current_df_);
      }
      break;
    case 0x01:  // child DF
    case 0x02:  // EF under the current DF
      if (fids.size() == 1 && fids[0] == kMf) {
        // The MF by its FID: both the Cryptolib (a PIN path 3F00) and OpenSC's IAS-ECC CPx
        // driver select it with P1 02 (00 A4 02 0C/04 02 3F00), which CPx cards accept.
        target = find({kMf});
        break;
      }
      if (fids.size() == 1) {
        target = child(current_df_, fids[0]);
        if (target && target->df != (c.p1 == 0x01)) target = nullptr;
      }
      break;
    case 0x03:  // parent DF
      if (current_df_.size() > 1) {
        auto parent = current_df_;
        parent.pop_back();
        target = find(parent);
      } else {
        target = find(current_df_);
      }
      break;
    case 0x04:  // DF name (AID), exact or partial (P2 occurrence bits ignored)
      if (profile_.personality == Personality::kCps4 && is_cps4_applet(c.data)) {
        // CPS4: the ChipDoc applet (and the auxiliary IDS / CPS2ter applets the driver selects
        // to re-select it) hold the whole file system here.
        target = find({kMf});
        break;
      }
      for (auto& [path, n] : fs_) {
        if (n.df && !n.aid.empty() && !c.data.empty() && c.data.size() <= n.aid.size() &&
            std::equal(c.data.begin(), c.data.end(), n.aid.begin())) {
          target = &n;
          break;
        }
      }
      break;
    case 0x08:    // path from the MF
    case 0x09: {  // path from the current DF (the Cryptolib starts it with 3F00 for CPS3)
      if (fids.empty()) break;
      std::vector<uint16_t> p;
      std::size_t i = 0;
      if (fids[0] == kMf) {
        p = {kMf};
        i = 1;
      } else {
        p = c.p1 == 0x08 ? std::vector<uint16_t>{kMf} : current_df_;
      }
      for (; i < fids.size(); ++i) p.push_back(fids[i]);
      target = find(p);
      break;
    }
    default:
      return sw(0x6A86, t, "SELECT: bad P1");
  }
  if (!target) return sw(0x6A82, t, "SELECT: file not found");
  if (target->df) {
    current_df_ = target->path;
    current_ef_.reset();
  } else {
    current_df_ = target->path;
    current_df_.pop_back();
    current_ef_ = target->path;
  }
  char note[48];
  std::snprintf(note, sizeof note, "SELECT %04X", target->fid);
  switch (c.p2 & 0x0C) {
    case 0x0C:
      return sw(0x9000, t, note);
    case 0x00:  // FCI: template 6F holding the FCP's data objects (ISO 7816-4 5.3.3;
                // OpenSC's process_fci reads them directly inside 6F)
      return with_data(fcp(*target, 0x6F), c, t, note);
    default:  // 04 FCP, 08 FMD (answered with the FCP)
      return with_data(fcp(*target), c, t, note);
  }
}

Answer CardSim::read_binary(const Command& c) {
  const double t = profile_.timing.read_ms;
  if (c.p1 & 0x80) return sw(0x6A81, t, "READ BINARY: SFI not supported");
  if (!current_ef_) return sw(0x6986, t, "READ BINARY: no EF selected");
  const Node* ef = find(*current_ef_);
  const std::size_t offset = (std::size_t{c.p1} << 8) | c.p2;
  const std::size_t le = c.le.value_or(256);
  char note[64];
  std::snprintf(note, sizeof note, "READ BINARY %04X off %zu le %zu", ef->fid, offset, le);
  if (offset >= ef->data.size()) return sw(0x6B00, t, note);
  const std::size_t n = std::min(le, ef->data.size() - offset);
  Answer a;
  a.response.assign(ef->data.begin() + static_cast<long>(offset), ef->data.begin() + static_cast<long>(offset + n));
  // Fewer bytes than Le: end of file reached before Le bytes (ISO 7816-4 6282).
  a.response.push_back(n < le ? 0x62 : 0x90);
  a.response.push_back(n < le ? 0x82 : 0x00);
  a.card_ms = t;
  a.note = note;
  return a;
}

Answer CardSim::get_response(const Command& c) {
  const double t = profile_.timing.get_response_ms;
  if (pending_.empty()) return sw(0x6985, t, "GET RESPONSE: nothing pending");
  const std::size_t le = c.le.value_or(256);
  if (le > pending_.size()) {
    // T=0: wrong Le, the exact length in SW2; the data stays available.
    return sw(static_cast<uint16_t>(0x6C00 | pending_.size()), t, "GET RESPONSE: wrong Le");
  }
  Answer a;
  a.response.assign(pending_.begin(), pending_.begin() + static_cast<long>(le));
  pending_.erase(pending_.begin(), pending_.begin() + static_cast<long>(le));
  const auto rest = pending_.size();
  a.response.push_back(rest ? 0x61 : 0x90);
  a.response.push_back(rest ? static_cast<uint8_t>(rest >= 256 ? 0 : rest) : 0x00);
  a.card_ms = t;
  a.note = "GET RESPONSE";
  return a;
}

Answer CardSim::get_data(const Command& c) {
  const double t = profile_.timing.get_data_ms;
  // IAS ECC GET DATA of a security data object (SDO):
  //   00 CB 3F FF Lc 4D L 70 L BF <class|80> <ref> L <tag list, each followed by 80>
  // e.g. the Cryptolib's PIN status 4D 08 70 06 BF 81 01 02 A0 80 (DOCP of PIN 01), OpenSC's
  // CPx driver 4D 09 70 07 BF 81 01 03 7F 41 80 (CHV data). The answer holds the requested
  // templates: 70 { BF <class> <ref> { ... } }.
  const Bytes& d = c.data;
  if (c.p1 != 0x3F || c.p2 != 0xFF || d.size() < 9 || d[0] != 0x4D || d[2] != 0x70 || d[4] != 0xBF)
    return sw(0x6A88, t, "GET DATA: referenced data not found");
  const uint8_t cls = d[5] & 0x7F;
  const uint8_t ref = d[6] & 0x3F;
  std::vector<uint32_t> wanted;
  for (std::size_t i = 8; i < d.size();) {
    uint32_t tag = d[i++];
    if ((tag & 0x1F) == 0x1F && i < d.size()) tag = (tag << 8) | d[i++];
    if (i < d.size() && d[i] == 0x80) ++i;  // "all of it"
    wanted.push_back(tag);
  }
  // Security conditions (compact form 8C: access mode byte + one SCB per operation; 00 =
  // always, FF = never, 1x = after user authentication with SE x). No secure messaging.
  Bytes body;
  if (cls == 0x01) {  // CHV: the PIN
    if (ref != kPinRef) return sw(0x6A88, t, "GET DATA: no such PIN");
    for (uint32_t tag : wanted) {
      if (tag == 0xA0) {
        // Tries first: the Cryptolib scans the answer for 9A/9B byte by byte.
        body = cat({body, tlv(0xA0, cat({tlv(0x9A, {kMaxTries}), tlv(0x9B, {tries_}), tlv(0x80, {0x08}),
                                         tlv(0xA1, tlv(0x8C, {0x7F, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x00}))}))});
      } else if (tag == 0x7F41) {
        body = cat({body, tlv(0x7F41, cat({tlv(0x80, {0x08}), tlv(0x81, {0x04})}))});
      }
    }
  } else if (cls == 0x10 || cls == 0x20) {  // RSA private / public key
    EVP_PKEY* key = (ref == (kSignKeyRef & 0x3F)) ? content_.key_sign.get()
                    : (ref == (auth_key_ref() & 0x3F)) ? content_.key_auth.get()
                                                         : nullptr;
    if (!key) return sw(0x6A88, t, "GET DATA: no such key");
    const bool sign_key = key == content_.key_sign.get();
    for (uint32_t tag : wanted) {
      if (tag == 0xA0) {
        // SCBs in mask order: PSO signature, internal authenticate, PSO decipher, generate,
        // (none), put data, get data. The card checks the PIN itself (6982 before VERIFY).
        // Size 80: the modulus in bytes (OpenSC checks 0x100).
        body = cat({body, tlv(0xA0, cat({tlv(0x80, {0x01, 0x00}), tlv(0x9E, {static_cast<uint8_t>(sign_key ? 1 : 0)}),
                                         tlv(0xA1, tlv(0x8C, {0x7F, 0x00, 0x00, static_cast<uint8_t>(sign_key ? 0xFF : 0x00),
                                                              0xFF, 0xFF, 0xFF, 0x00}))}))});
      } else if (tag == 0x7F49 || tag == 0x7F48) {
        BIGNUM* n = nullptr;
        BIGNUM* e = nullptr;
        EVP_PKEY_get_bn_param(key, "n", &n);
        EVP_PKEY_get_bn_param(key, "e", &e);
        Bytes nb(static_cast<std::size_t>(BN_num_bytes(n))), eb(static_cast<std::size_t>(BN_num_bytes(e)));
        BN_bn2bin(n, nb.data());
        BN_bn2bin(e, eb.data());
        BN_free(n);
        BN_free(e);
        if (tag == 0x7F49) body = cat({body, tlv(0x7F49, cat({tlv(0x81, nb), tlv(0x82, eb)}))});
        else body = cat({body, tlv(0x7F48, tlv(0x80, {0x01}))});
      }
    }
  } else {
    return sw(0x6A88, t, "GET DATA: SDO class not supported");
  }
  if (body.empty()) return sw(0x6A88, t, "GET DATA: referenced data not found");
  Bytes header = {0xBF, static_cast<uint8_t>(d[5]), static_cast<uint8_t>(d[6])};
  Bytes sdo = cat({header, der_len(body.size()), body});
  return with_data(tlv(0x70, sdo), c, t, "GET DATA SDO");
}

bool CardSim::pin_matches(const Bytes& given) const {
  // The PIN digits in ASCII, then padding (FF or 00) up to at most 8 bytes; unpadded too.
  if (given.size() < pin_.size() || given.size() > 8 || pin_.size() > 8) return false;
  for (std::size_t i = 0; i < given.size(); ++i) {
    if (i < pin_.size()) {
      if (given[i] != static_cast<uint8_t>(pin_[i])) return false;
    } else if (given[i] != 0xFF && given[i] != 0x00) {
      return false;
    }
  }
  return true;
}

Answer CardSim::verify(const Command& c) {
  const double t = profile_.timing.verify_ms;
  if (c.p1 != 0x00 || (c.p2 != 0x01 && c.p2 != 0x81)) return sw(0x6A88, profile_.timing.other_ms, "VERIFY: no such PIN");
  if (c.data.empty()) {  // PIN status (CPS4 style)
    if (tries_ == 0) return sw(0x6983, profile_.timing.other_ms, "VERIFY status: blocked");
    if (verified_) return sw(0x9000, profile_.timing.other_ms, "VERIFY status: verified");
    return sw(static_cast<uint16_t>(0x63C0 | tries_), profile_.timing.other_ms, "VERIFY status");
  }
  if (c.data.size() > 8) return sw(0x6700, t, "VERIFY: wrong length");
  if (tries_ == 0) return sw(0x6983, t, "VERIFY: blocked");
  if (pin_matches(c.data)) {
    tries_ = kMaxTries;
    verified_ = true;
    return sw(0x9000, t, "VERIFY ok");
  }
  verified_ = false;
  --tries_;
  if (tries_ == 0) return sw(0x6983, t, "VERIFY wrong, now blocked");
  return sw(static_cast<uint16_t>(0x63C0 | tries_), t, "VERIFY wrong");
}

Answer CardSim::mse(const Command& c) {
  const double t = profile_.timing.mse_ms;
  if (c.p1 == 0xF3) return sw(0x9000, t, "MSE RESTORE");
  if ((c.p1 & 0x0F) != 0x01) return sw(0x6A86, t, "MSE: bad P1");
  std::size_t pos = 0;
  std::optional<uint8_t> key, alg;
  while (pos + 2 <= c.data.size()) {
    const uint8_t tag = c.data[pos];
    const std::size_t len = c.data[pos + 1];
    if (pos + 2 + len > c.data.size()) return sw(0x6A80, t, "MSE: bad data");
    if (tag == 0x80 && len == 1) alg = c.data[pos + 2];
    if ((tag == 0x83 || tag == 0x84 || tag == 0x91) && len >= 1) key = c.data[pos + 2 + len - 1];
    if (tag == 0x91 && len == 2) alg = c.data[pos + 2];
    pos += 2 + len;
  }
  if (pos != c.data.size()) return sw(0x6A80, t, "MSE: bad data");
  if (c.p2 == 0xAA) {  // hash template: the algorithm of the next PSO HASH (IAS: 10 SHA-1, 40 SHA-256)
    hash_alg_ = alg && *alg == 0x10 ? HashAlg::kSha1 : HashAlg::kSha256;
    return sw(0x9000, t, "MSE SET HT");
  }
  se_key_ = key.value_or(auth_key_ref());
  se_alg_ = alg;
  return sw(0x9000, t, "MSE SET");
}

uint8_t CardSim::auth_key_ref() const {
  return profile_.personality == Personality::kCps4 ? kAuthKeyRefCps4 : kAuthKeyRefCps3;
}

EVP_PKEY* CardSim::selected_key() const {
  // Key references differ by card (CPS3 83/84 01 81; CPS4 91 02 alg ref|80): the low bits
  // name the key.
  if (se_key_ && (*se_key_ & 0x7F) == (kSignKeyRef & 0x7F)) return content_.key_sign.get();
  return content_.key_auth.get();
}

std::optional<Bytes> CardSim::rsa_private(const Bytes& in, bool pkcs1_type1) {
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(selected_key(), nullptr);
  if (!ctx) return std::nullopt;
  Bytes out(512);
  std::size_t len = out.size();
  bool ok = false;
  if (pkcs1_type1) {
    ok = EVP_PKEY_sign_init(ctx) == 1 && EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) == 1 &&
         EVP_PKEY_sign(ctx, out.data(), &len, in.data(), in.size()) == 1;
  } else {
    ok = EVP_PKEY_decrypt_init(ctx) == 1 && EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_NO_PADDING) == 1 &&
         EVP_PKEY_decrypt(ctx, out.data(), &len, in.data(), in.size()) == 1;
  }
  EVP_PKEY_CTX_free(ctx);
  if (!ok) return std::nullopt;
  out.resize(len);
  return out;
}

std::optional<Bytes> CardSim::rsa_pss(const Bytes& hash) {
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(selected_key(), nullptr);
  if (!ctx) return std::nullopt;
  const EVP_MD* md = hash.size() == 20 ? EVP_sha1() : EVP_sha256();
  Bytes out(512);
  std::size_t len = out.size();
  const bool ok = EVP_PKEY_sign_init(ctx) == 1 && EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PSS_PADDING) == 1 &&
                  EVP_PKEY_CTX_set_signature_md(ctx, md) == 1 && EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, md) == 1 &&
                  EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx, RSA_PSS_SALTLEN_DIGEST) == 1 &&
                  EVP_PKEY_sign(ctx, out.data(), &len, hash.data(), hash.size()) == 1;
  EVP_PKEY_CTX_free(ctx);
  if (!ok) return std::nullopt;
  out.resize(len);
  return out;
}

Answer CardSim::internal_authenticate(const Command& c) {
  const double t = profile_.timing.rsa_ms;
  if (!verified_) return sw(0x6982, profile_.timing.other_ms, "INTERNAL AUTHENTICATE: PIN not verified");
  if (c.data.empty() || c.data.size() > 245) return sw(0x6A80, profile_.timing.other_ms, "INTERNAL AUTHENTICATE: bad data");
  auto sig = rsa_private(c.data, true);
  if (!sig) return sw(0x6F00, t, "INTERNAL AUTHENTICATE: RSA failed");
  return with_data(std::move(*sig), c, t, "INTERNAL AUTHENTICATE (RSA-2048)");
}

Answer CardSim::pso(const Command& c) {
  const double t = profile_.timing.rsa_ms;
  if (c.p1 == 0x90 && c.p2 == 0xA0) return pso_hash(c);  // no PIN needed to hash
  if (!verified_) return sw(0x6982, profile_.timing.other_ms, "PSO: PIN not verified");
  if (c.p1 == 0x9E && c.p2 == 0x9A) {  // COMPUTE DIGITAL SIGNATURE
    Bytes input = c.data;
    if (input.empty()) {
      // IAS (CPS3): no data = sign the hash the card has just finished (PSO HASH).
      if (!hash_) return sw(0x6985, profile_.timing.other_ms, "PSO CDS: no hash");
      input = *hash_;
      hash_.reset();
    }
    if ((input.size() == 20 || input.size() == 32) && se_alg_ && (*se_alg_ & 0x04)) {
      // CPS4 RSA-PSS (MSE algorithm 0E SHA-1 / 2C SHA-256): the card pads the hash (salt
      // length = hash length, MGF1 with the same hash).
      auto sig = rsa_pss(input);
      if (!sig) return sw(0x6F00, t, "PSO CDS: RSA-PSS failed");
      return with_data(std::move(*sig), c, t, "PSO CDS (RSA-2048 PSS)");
    }
    if (input.size() == 20 || input.size() == 32) {
      // A bare hash (CPS3 after PSO HASH; CPS4 always): the card builds the DigestInfo.
      Bytes di = digest_info_prefix(input.size() == 20 ? HashAlg::kSha1 : HashAlg::kSha256);
      di.insert(di.end(), input.begin(), input.end());
      input = std::move(di);
    }
    if (input.size() > 245) return sw(0x6A80, profile_.timing.other_ms, "PSO CDS: bad data");
    auto sig = rsa_private(input, true);
    if (!sig) return sw(0x6F00, t, "PSO CDS: RSA failed");
    return with_data(std::move(*sig), c, t, "PSO CDS (RSA-2048)");
  }
  if (c.p1 == 0x80 && c.p2 == 0x86) {  // DECIPHER: [81 ||] 256-byte block (raw RSA)
    // CPS3 sends the padding indicator 81 first; the CPS4 (ChipDoc) driver sends the block
    // alone (it signs with the authentication key that way: the ChipDoc applet has no
    // INTERNAL AUTHENTICATE, the Cryptolib pads the DigestInfo and "deciphers" it).
    const bool indicator = c.data.size() == 257 && c.data[0] == 0x81;
    if (!indicator && c.data.size() != 256) return sw(0x6A80, profile_.timing.other_ms, "PSO DECIPHER: bad data");
    Bytes block(c.data.begin() + (indicator ? 1 : 0), c.data.end());
    auto plain = rsa_private(block, false);
    if (!plain) return sw(0x6A80, t, "PSO DECIPHER: RSA failed");
    return with_data(std::move(*plain), c, t, "PSO DECIPHER (RSA-2048)");
  }
  return sw(0x6A86, profile_.timing.other_ms, "PSO: bad P1-P2");
}

Answer CardSim::pso_hash(const Command& c) {
  // 90 L [intermediate state || 8-byte bit count] (L = 0: nothing hashed yet), 80 L <last
  // bytes>: the card finishes the hash and keeps it for the next PSO CDS.
  const double t = profile_.timing.other_ms;
  Bytes state, tail;
  uint64_t bits = 0;
  bool have_tail = false;
  std::size_t pos = 0;
  while (pos + 2 <= c.data.size()) {
    const uint8_t tag = c.data[pos];
    const std::size_t len = c.data[pos + 1];
    if (pos + 2 + len > c.data.size()) return sw(0x6A80, t, "PSO HASH: bad data");
    const auto v = c.data.begin() + static_cast<long>(pos + 2);
    if (tag == 0x90 && len >= 8) {
      state.assign(v, v + static_cast<long>(len - 8));
      for (std::size_t i = len - 8; i < len; ++i) bits = (bits << 8) | c.data[pos + 2 + i];
    } else if (tag == 0x80) {
      tail.assign(v, v + static_cast<long>(len));
      have_tail = true;
    }
    pos += 2 + len;
  }
  if (pos != c.data.size() || !have_tail) return sw(0x6A80, t, "PSO HASH: bad data");
  HashAlg alg = hash_alg_.value_or(HashAlg::kSha256);
  if (state.empty()) {
    hash_ = full_hash(alg, tail);
    return sw(0x9000, t, "PSO HASH");
  }
  alg = state.size() == 20 ? HashAlg::kSha1 : HashAlg::kSha256;
  // The bit count is that of the whole blocks already hashed, or of the whole message.
  if (bits % 512 != 0 && bits >= 8 * tail.size()) bits -= 8 * tail.size();
  auto h = finish_hash(alg, state, bits, tail);
  if (!h) return sw(0x6A80, t, "PSO HASH: bad intermediate state");
  hash_ = std::move(*h);
  return sw(0x9000, t, "PSO HASH (continued)");
}

Answer CardSim::get_challenge(const Command& c) {
  const std::size_t n = c.le.value_or(8);
  Answer a;
  for (std::size_t i = 0; i < n; ++i) {
    challenge_state_ ^= challenge_state_ << 13;
    challenge_state_ ^= challenge_state_ >> 7;
    challenge_state_ ^= challenge_state_ << 17;
    a.response.push_back(static_cast<uint8_t>(challenge_state_ & 0xFF));
  }
  a.response.push_back(0x90);
  a.response.push_back(0x00);
  a.card_ms = profile_.timing.other_ms;
  a.note = "GET CHALLENGE";
  return a;
}

}  // namespace cardbridge::cardsim
