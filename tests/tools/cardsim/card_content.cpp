// Deterministic card content: an RSA-2048 key whose primes come from a seeded generator,
// and two self-signed X.509 certificates (~1.8 KB each, like the CPS authentication and
// signature certificates) signed with it. Same seed, same bytes.
#include <openssl/bn.h>
#include <openssl/conf.h>
#include <openssl/core_names.h>
#include <openssl/param_build.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <random>
#include <stdexcept>
#include <string>

#include "card.hpp"

namespace cardbridge::cardsim {

namespace {

struct BnFree {
  void operator()(BIGNUM* b) const { BN_clear_free(b); }
};
using Bn = std::unique_ptr<BIGNUM, BnFree>;
struct CtxFree {
  void operator()(BN_CTX* c) const { BN_CTX_free(c); }
};

Bn bn() {
  Bn b(BN_new());
  if (!b) throw std::runtime_error("BN_new");
  return b;
}

void check(int ok, const char* what) {
  if (ok != 1) throw std::runtime_error(std::string("OpenSSL: ") + what);
}

// A 1024-bit prime p with gcd(e, p-1) = 1, searched upwards from a seeded random start.
Bn seeded_prime(std::mt19937_64& rng, BN_CTX* ctx, const BIGNUM* e) {
  unsigned char raw[128];
  for (std::size_t i = 0; i < sizeof raw; i += 8) {
    uint64_t v = rng();
    for (std::size_t j = 0; j < 8; ++j) raw[i + j] = static_cast<unsigned char>(v >> (8 * j));
  }
  raw[0] |= 0xC0;   // top two bits: p*q has exactly 2048 bits
  raw[127] |= 0x01; // odd
  Bn p(BN_bin2bn(raw, sizeof raw, nullptr));
  Bn pm1 = bn(), g = bn();
  for (;;) {
    if (BN_check_prime(p.get(), ctx, nullptr) == 1) {
      check(BN_sub(pm1.get(), p.get(), BN_value_one()), "BN_sub");
      check(BN_gcd(g.get(), pm1.get(), e, ctx), "BN_gcd");
      if (BN_is_one(g.get())) return p;
    }
    check(BN_add_word(p.get(), 2), "BN_add_word");
  }
}

EvpKey seeded_rsa_key(uint64_t seed) {
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + 0x5EEDull);
  std::unique_ptr<BN_CTX, CtxFree> ctx(BN_CTX_new());
  Bn e = bn();
  check(BN_set_word(e.get(), 65537), "BN_set_word");
  Bn p = seeded_prime(rng, ctx.get(), e.get());
  Bn q = seeded_prime(rng, ctx.get(), e.get());
  if (BN_cmp(p.get(), q.get()) < 0) std::swap(p, q);
  Bn n = bn(), pm1 = bn(), qm1 = bn(), phi = bn(), d = bn(), dmp1 = bn(), dmq1 = bn(), iqmp = bn();
  check(BN_mul(n.get(), p.get(), q.get(), ctx.get()), "BN_mul");
  check(BN_sub(pm1.get(), p.get(), BN_value_one()), "BN_sub");
  check(BN_sub(qm1.get(), q.get(), BN_value_one()), "BN_sub");
  check(BN_mul(phi.get(), pm1.get(), qm1.get(), ctx.get()), "BN_mul");
  if (!BN_mod_inverse(d.get(), e.get(), phi.get(), ctx.get())) throw std::runtime_error("BN_mod_inverse d");
  check(BN_mod(dmp1.get(), d.get(), pm1.get(), ctx.get()), "BN_mod");
  check(BN_mod(dmq1.get(), d.get(), qm1.get(), ctx.get()), "BN_mod");
  if (!BN_mod_inverse(iqmp.get(), q.get(), p.get(), ctx.get())) throw std::runtime_error("BN_mod_inverse q");

  OSSL_PARAM_BLD* bld = OSSL_PARAM_BLD_new();
  check(OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, n.get()), "n");
  check(OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, e.get()), "e");
  check(OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_D, d.get()), "d");
  check(OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_FACTOR1, p.get()), "p");
  check(OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_FACTOR2, q.get()), "q");
  check(OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_EXPONENT1, dmp1.get()), "dmp1");
  check(OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_EXPONENT2, dmq1.get()), "dmq1");
  check(OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_COEFFICIENT1, iqmp.get()), "iqmp");
  OSSL_PARAM* params = OSSL_PARAM_BLD_to_param(bld);
  OSSL_PARAM_BLD_free(bld);
  EVP_PKEY_CTX* pctx = EVP_PKEY_CTX_new_from_name(nullptr, "RSA", nullptr);
  EVP_PKEY* key = nullptr;
  const bool ok = pctx && EVP_PKEY_fromdata_init(pctx) == 1 &&
                  EVP_PKEY_fromdata(pctx, &key, EVP_PKEY_KEYPAIR, params) == 1;
  EVP_PKEY_CTX_free(pctx);
  OSSL_PARAM_free(params);
  if (!ok) throw std::runtime_error("OpenSSL: EVP_PKEY_fromdata");
  return EvpKey(key);
}

void add_ext(X509* cert, EVP_PKEY* /*issuer_key*/, X509* issuer, int nid, const std::string& value) {
  // An empty config database: some extensions (certificatePolicies) insist on one.
  CONF* conf = NCONF_new(nullptr);
  X509V3_CTX v3;
  X509V3_set_ctx(&v3, issuer, cert, nullptr, nullptr, 0);
  X509V3_set_nconf(&v3, conf);
  X509_EXTENSION* ext = X509V3_EXT_nconf_nid(conf, &v3, nid, value.c_str());
  NCONF_free(conf);
  if (!ext) throw std::runtime_error("OpenSSL: extension " + value);
  X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
}

Bytes der_of(X509* cert) {
  int len = i2d_X509(cert, nullptr);
  if (len <= 0) throw std::runtime_error("OpenSSL: i2d_X509");
  Bytes out(static_cast<std::size_t>(len));
  unsigned char* p = out.data();
  i2d_X509(cert, &p);
  return out;
}

// The simulator's certification authority: a self-signed CA certificate over |ca_key|.
Bytes make_ca_cert(EVP_PKEY* ca_key) {
  X509* c = X509_new();
  X509_set_version(c, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(c), 0x0CA1);
  ASN1_TIME_set_string(X509_getm_notBefore(c), "20240101000000Z");
  ASN1_TIME_set_string(X509_getm_notAfter(c), "20340101000000Z");
  X509_NAME* name = X509_get_subject_name(c);
  auto add = [&](const char* field, const std::string& v) {
    X509_NAME_add_entry_by_txt(name, field, MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(v.c_str()), -1, -1,
                               0);
  };
  add("C", "FR");
  add("O", "CardBridge test PKI (not ANS)");
  add("CN", kCaName);
  X509_set_issuer_name(c, name);
  X509_set_pubkey(c, ca_key);
  add_ext(c, ca_key, c, NID_basic_constraints, "critical,CA:TRUE,pathlen:0");
  add_ext(c, ca_key, c, NID_key_usage, "critical,keyCertSign,cRLSign");
  add_ext(c, ca_key, c, NID_subject_key_identifier, "hash");
  if (X509_sign(c, ca_key, EVP_sha256()) <= 0) throw std::runtime_error("OpenSSL: X509_sign (CA)");
  Bytes der = der_of(c);
  X509_free(c);
  return der;
}

// A CPS-looking certificate of about |target| bytes for |key|, issued by the CA (a comment
// extension fills the difference).
Bytes make_cert(EVP_PKEY* key, EVP_PKEY* ca_key, X509* ca, long serial, bool signature_cert, const Holder& h,
                std::size_t target) {
  auto build = [&](std::size_t comment_len) {
    X509* c = X509_new();
    X509_set_version(c, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(c), serial);
    ASN1_TIME_set_string(X509_getm_notBefore(c), "20240115080000Z");
    ASN1_TIME_set_string(X509_getm_notAfter(c), "20270115075959Z");
    X509_NAME* name = X509_get_subject_name(c);
    auto add = [&](const char* field, const std::string& v) {
      X509_NAME_add_entry_by_txt(name, field, MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(v.c_str()), -1, -1, 0);
    };
    add("C", "FR");
    add("O", "CardBridge test card (not a real CPS)");
    add("OU", signature_cert ? "CPS simulator, signature" : "CPS simulator, authentication");
    add("title", h.title);
    add("SN", h.surname);
    add("GN", h.given_name);
    add("serialNumber", h.id);
    add("CN", h.given_name + " " + h.surname);
    X509_set_issuer_name(c, X509_get_subject_name(ca));
    X509_set_pubkey(c, key);
    add_ext(c, ca_key, ca, NID_basic_constraints, "critical,CA:FALSE");
    add_ext(c, ca_key, ca, NID_key_usage,
            signature_cert ? "critical,nonRepudiation" : "critical,digitalSignature,keyEncipherment");
    if (!signature_cert) add_ext(c, ca_key, ca, NID_ext_key_usage, "clientAuth,emailProtection");
    add_ext(c, ca_key, ca, NID_subject_key_identifier, "hash");
    add_ext(c, ca_key, ca, NID_authority_key_identifier, "keyid:always");
    add_ext(c, ca_key, ca, NID_certificate_policies,
            signature_cert ? "1.2.250.1.71.2.6.5.2,1.2.250.1.71.1.2.5" : "1.2.250.1.71.2.6.5.1,1.2.250.1.71.1.2.5");
    add_ext(c, ca_key, ca, NID_crl_distribution_points,
            "URI:http://crl.cardbridge.invalid/cps3/simulated-professional-ca-crl-1.crl,"
            "URI:ldap://ldap.cardbridge.invalid/cn=ac-simulee%2Cou=cardbridge%2Co=test%2Cc=FR"
            "?certificateRevocationList;binary");
    add_ext(c, ca_key, ca, NID_info_access,
            "OCSP;URI:http://ocsp.cardbridge.invalid/simulated,"
            "caIssuers;URI:http://pki.cardbridge.invalid/simulated-professional-ca.cer");
    add_ext(c, ca_key, ca, NID_subject_alt_name, "email:claire.dupont@test.cardbridge.invalid");
    if (comment_len > 0) add_ext(c, ca_key, ca, NID_netscape_comment, std::string(comment_len, 'x'));
    if (X509_sign(c, ca_key, EVP_sha256()) <= 0) throw std::runtime_error("OpenSSL: X509_sign");
    return c;
  };
  X509* base = build(0);
  const std::size_t base_len = der_of(base).size();
  X509_free(base);
  // ~10 bytes of extension framing; a few iterations settle the DER length.
  std::size_t comment = target > base_len + 16 ? target - base_len - 12 : 1;
  Bytes der;
  for (int i = 0; i < 4; ++i) {
    X509* c = build(comment);
    der = der_of(c);
    X509_free(c);
    if (der.size() == target) break;
    const long next = static_cast<long>(comment) + static_cast<long>(target) - static_cast<long>(der.size());
    comment = static_cast<std::size_t>(std::max(1L, next));
  }
  return der;
}

}  // namespace

CardContent make_content(uint64_t seed) {
  CardContent c;
  // Seeds of the three keys: distinct generators derived from the card's seed. The CA's
  // does not depend on the card (every simulated card has the same issuer).
  c.key_auth = seeded_rsa_key(seed);
  c.key_sign = seeded_rsa_key(seed ^ 0x5167A7u);
  c.ca_key = seeded_rsa_key(0xCA0CA0CA0ull);
  c.ca_cert = make_ca_cert(c.ca_key.get());
  std::mt19937_64 rng(seed ^ 0xC0FFEEull);
  const uint64_t number = 10000000000ull + rng() % 89999999999ull;  // RPPS-like 11 digits
  c.holder.id = "8" + std::to_string(number).substr(1);
  // EF.SN.ICC serial: 10 BCD digits (5 bytes), the last digit a check digit as on real cards.
  const uint64_t sn = rng() % 10000000000ull;
  char digits[11];
  std::snprintf(digits, sizeof digits, "%010llu", static_cast<unsigned long long>(sn));
  c.serial.clear();
  for (int i = 0; i < 10; i += 2) c.serial.push_back(static_cast<uint8_t>(((digits[i] - '0') << 4) | (digits[i + 1] - '0')));
  const unsigned char* p = c.ca_cert.data();
  X509* ca = d2i_X509(nullptr, &p, static_cast<long>(c.ca_cert.size()));
  if (!ca) throw std::runtime_error("OpenSSL: d2i_X509 (CA)");
  c.cert_auth = make_cert(c.key_auth.get(), c.ca_key.get(), ca, static_cast<long>(rng() % 0x7FFFFFFF) + 1, false,
                          c.holder, 1812);
  c.cert_sign = make_cert(c.key_sign.get(), c.ca_key.get(), ca, static_cast<long>(rng() % 0x7FFFFFFF) + 1, true,
                          c.holder, 1796);
  X509_free(ca);
  return c;
}

}  // namespace cardbridge::cardsim
