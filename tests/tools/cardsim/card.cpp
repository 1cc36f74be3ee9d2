#include "card.hpp"

#include <openssl/rsa.h>

#include <algorithm>
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
  if (content.size() < size) content.resize(size, 0x00);
  return content;
}

Bytes path_obj(std::initializer_list<uint16_t> fids) { return tlv(0x30, tlv(0x04, fid_bytes(fids))); }

// A PKCS#15-like object: common attributes (label, flags), class attributes (id) and
// type attributes.
Bytes p15_object(uint8_t tag, std::string_view label, const Bytes& id, const Bytes& type_attrs) {
  Bytes common = tlv(0x30, cat({tlv(0x0C, text(label)), tlv(0x03, {0x06, 0x40}), tlv(0x04, {0x01})}));
  Bytes klass = tlv(0x30, tlv(0x04, id));
  return tlv(tag, cat({common, klass, tlv(0xA1, tlv(0x30, type_attrs))}));
}

Bytes key_id(uint8_t n) {
  Bytes id(20);
  for (std::size_t i = 0; i < id.size(); ++i) id[i] = static_cast<uint8_t>(0x3Au + n * 17u + i * 7u);
  return id;
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
  add({kMf}, true);
  // EF.SN.ICC: 12 bytes, issuer 80 25 00 00 01 at offset 2 (what the Cryptolib checks).
  add({kMf, 0xD003}, false, cat({{0x5A, 0x0A, 0x80, 0x25, 0x00, 0x00, 0x01}, sn}));
  // EF_ACTUA: validity dates of the card's data (BCD), the middleware's cache check.
  add({kMf, 0xD010}, false,
      tlv(0xA0, cat({tlv(0x80, {0x20, 0x25, 0x01, 0x15, 0x08, 0x00, 0x00}),
                     tlv(0x81, {0x20, 0x28, 0x01, 0x15, 0x07, 0x59, 0x59})})));
  // EF.DIR: one application template for the PKCS#15 application.
  add({kMf, 0x2F00}, false,
      padded(tlv(0x61, cat({tlv(0x4F, kP15Aid), tlv(0x50, text("CPS3 PKCS15")), tlv(0x51, fid_bytes({kMf, kP15}))})),
             40));
  // CPS2ter-compatible area with business data ("situations", holder identity).
  add({kMf, kCps2ter}, true);
  add({kMf, kCps2ter, 0x7001}, false, padded(tlv(0x70, text("CPS3 contact")), 16));
  add({kMf, kCps2ter, 0xD110}, false,
      padded(tlv(0x70, cat({tlv(0x80, text("DUPONT")), tlv(0x81, text("CLAIRE")), tlv(0x82, text("10")),
                            tlv(0x83, text("Medecin")), tlv(0x84, text("Medecine generale")),
                            tlv(0x85, text("RPPS 8" + std::string(10, '0'))),
                            tlv(0x86, text("Hopital simule de CardBridge, service des admissions"))})),
             420));
  for (uint16_t f = 0xD120; f <= 0xD123; ++f) {
    add({kMf, kCps2ter, f}, false,
        padded(tlv(0x71, cat({tlv(0x80, {static_cast<uint8_t>(f & 0x0F)}), tlv(0x81, text("Etablissement simule")),
                              tlv(0x82, text("75 PARIS")), tlv(0x83, text("FINESS 750000000")),
                              tlv(0x84, text("Mode d'exercice: salarie"))})),
               272));
  }
  // PKCS#15 application.
  add({kMf, kP15}, true, {}, kP15Aid);
  add({kMf, kP15, 0x5031}, false,
      cat({tlv(0xA8, path_obj({kMf, kP15, 0x4401})), tlv(0xA0, path_obj({kMf, kP15, 0x4402})),
           tlv(0xA4, path_obj({kMf, kP15, 0x4403})), tlv(0xA7, path_obj({kMf, kP15, 0x4404}))}));
  add({kMf, kP15, 0x5032}, false,
      padded(tlv(0x30, cat({tlv(0x02, {0x01}), tlv(0x04, cat({{0x80, 0x25, 0x00}, sn})),
                            tlv(0x0C, text("ASIP-SANTE (simulated)")),
                            tlv(0x80, text("CPS3 Carte de Professionnel de Sante")), tlv(0x03, {0x06, 0x40}),
                            tlv(0x30, cat({tlv(0x02, {0x01}), tlv(0x02, {0x01}), tlv(0x05, {}),
                                           tlv(0x03, {0x00, 0x00}), tlv(0x02, {0x14})}))})),
             112));
  auto pin_object = [&](std::string_view label, uint8_t ref) {
    Bytes attrs = cat({tlv(0x03, {0x02, 0x0C, 0x10}), tlv(0x0A, {0x01}), tlv(0x02, {0x04}), tlv(0x02, {0x08}),
                       tlv(0x80, {ref}), tlv(0x04, {0xFF}), path_obj({kMf})});
    return p15_object(0x30, label, {ref}, attrs);
  };
  add({kMf, kP15, 0x4401}, false,
      padded(cat({pin_object("Code porteur CPS", 0x01), pin_object("Code porteur signature", 0x81)}), 176));
  auto key_object = [&](std::string_view label, uint8_t n, uint8_t ref, bool sign) {
    Bytes attrs = cat({path_obj({kMf, kP15}), tlv(0x02, {0x08, 0x00}), tlv(0x80, {ref}),
                       tlv(0x03, sign ? Bytes{0x06, 0x40} : Bytes{0x05, 0x20})});
    Bytes usage = cat({tlv(0x03, sign ? Bytes{0x06, 0x40} : Bytes{0x02, 0x22}), tlv(0x03, {0x03, 0xB8})});
    return tlv(0x30, cat({p15_object(0xA0, label, key_id(n), attrs), usage}));
  };
  add({kMf, kP15, 0x4402}, false,
      padded(cat({key_object("CPS_PRIV_AUT", 1, 0x81, false), key_object("CPS_PRIV_SIG", 2, 0x82, true)}), 248));
  auto cert_object = [&](std::string_view label, uint8_t n, uint16_t fid, std::size_t len) {
    Bytes attrs = cat({tlv(0x30, cat({tlv(0x04, fid_bytes({kMf, kP15, fid})), tlv(0x02, {0x00}),
                                      tlv(0x80, {static_cast<uint8_t>(len >> 8), static_cast<uint8_t>(len & 0xFF)})})),
                       tlv(0x01, {0x00})});
    return p15_object(0x30, label, key_id(n), attrs);
  };
  add({kMf, kP15, 0x4403}, false,
      padded(cat({cert_object("CPS_ID_CARD_AUT", 1, 0xC000, content_.cert_auth.size()),
                  cert_object("CPS_ID_CARD_SIG", 2, 0xC001, content_.cert_sign.size())}),
             216));
  auto data_object = [&](std::string_view label, uint16_t fid) {
    Bytes attrs = cat({tlv(0x0C, text("CPS_DATA")), tlv(0x06, {0x2A, 0x81, 0x7A, 0x01, 0x47, 0x02, 0x01}),
                       tlv(0x30, tlv(0x04, fid_bytes({kMf, kCps2ter, fid})))});
    return p15_object(0x30, label, {static_cast<uint8_t>(fid & 0xFF)}, attrs);
  };
  add({kMf, kP15, 0x4404}, false,
      padded(cat({data_object("CPS_INFO_PS", 0xD110), data_object("CPS_SITUATION_1", 0xD120),
                  data_object("CPS_SITUATION_2", 0xD121), data_object("CPS_SITUATION_3", 0xD122)}),
             336));
  add({kMf, kP15, 0xC000}, false, content_.cert_auth);
  add({kMf, kP15, 0xC001}, false, content_.cert_sign);
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

Bytes CardSim::fcp(const Node& n) const {
  Bytes body;
  if (n.df) {
    body = cat({tlv(0x82, {0x38}), tlv(0x83, fid_bytes({n.fid}))});
    if (!n.aid.empty()) body = cat({body, tlv(0x84, n.aid)});
  } else {
    const auto size = n.data.size();
    body = cat({tlv(0x80, {static_cast<uint8_t>(size >> 8), static_cast<uint8_t>(size & 0xFF)}), tlv(0x82, {0x01}),
                tlv(0x83, fid_bytes({n.fid}))});
  }
  body = cat({body, tlv(0x8A, {0x05}), tlv(0xA1, cat({tlv(0x8B, {0x01, 0x02, 0x03}), tlv(0x9C, {0x00, 0x10})}))});
  return tlv(0x62, body);
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
    case 0x00:  // FCI: the FCP inside a 6F template
      return with_data(tlv(0x6F, fcp(*target)), c, t, note);
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
  // CPS3 PIN status: 00 CB 3F FF 0A 4D 08 70 06 BF 81 <ref> 02 A0 80
  if (c.p1 == 0x3F && c.p2 == 0xFF && c.data.size() >= 7 && c.data[0] == 0x4D && c.data[4] == 0xBF &&
      c.data[5] == 0x81) {
    const uint8_t ref = c.data[6];
    if (ref != 0x01 && ref != 0x81) return sw(0x6A88, t, "GET DATA: no such PIN");
    Bytes info = tlv(0x70, tlv(0xBF8100u | ref, tlv(0xA0, cat({tlv(0x9A, {kMaxTries}), tlv(0x9B, {tries_}),
                                                                tlv(0x9C, {static_cast<uint8_t>(verified_ ? 1 : 0)})}))));
    return with_data(info, c, t, "GET DATA PIN status");
  }
  return sw(0x6A88, t, "GET DATA: referenced data not found");
}

bool CardSim::pin_matches(const Bytes& given) const {
  if (given.size() != 8 || pin_.size() > 8) return false;
  for (std::size_t i = 0; i < 8; ++i) {
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
  if (c.data.size() != 8) return sw(0x6700, t, "VERIFY: wrong length");
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
  std::optional<uint8_t> key;
  while (pos + 2 <= c.data.size()) {
    const uint8_t tag = c.data[pos];
    const std::size_t len = c.data[pos + 1];
    if (pos + 2 + len > c.data.size()) return sw(0x6A80, t, "MSE: bad data");
    if ((tag == 0x83 || tag == 0x84) && len >= 1) key = c.data[pos + 2 + len - 1];
    pos += 2 + len;
  }
  if (pos != c.data.size()) return sw(0x6A80, t, "MSE: bad data");
  se_key_ = key.value_or(0x81);
  return sw(0x9000, t, "MSE SET");
}

std::optional<Bytes> CardSim::rsa_private(const Bytes& in, bool pkcs1_type1) {
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(content_.key.get(), nullptr);
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
  if (!verified_) return sw(0x6982, profile_.timing.other_ms, "PSO: PIN not verified");
  if (c.p1 == 0x9E && c.p2 == 0x9A) {  // COMPUTE DIGITAL SIGNATURE over a DigestInfo
    if (c.data.empty() || c.data.size() > 245) return sw(0x6A80, profile_.timing.other_ms, "PSO CDS: bad data");
    auto sig = rsa_private(c.data, true);
    if (!sig) return sw(0x6F00, t, "PSO CDS: RSA failed");
    return with_data(std::move(*sig), c, t, "PSO CDS (RSA-2048)");
  }
  if (c.p1 == 0x80 && c.p2 == 0x86) {  // DECIPHER: 81 || 256-byte block (raw RSA)
    if (c.data.size() != 257 || c.data[0] != 0x81) return sw(0x6A80, profile_.timing.other_ms, "PSO DECIPHER: bad data");
    Bytes block(c.data.begin() + 1, c.data.end());
    auto plain = rsa_private(block, false);
    if (!plain) return sw(0x6A80, t, "PSO DECIPHER: RSA failed");
    return with_data(std::move(*plain), c, t, "PSO DECIPHER (RSA-2048)");
  }
  return sw(0x6A86, profile_.timing.other_ms, "PSO: bad P1-P2");
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
