#include "cardbridge/card_image/apdu.hpp"

#include <bit>

#include <fmt/format.h>

namespace cardbridge::card_image {

namespace {

constexpr uint16_t kMf = 0x3F00;

// The data field of a short APDU (cases 1 to 4); nullopt for an extended or malformed one.
std::optional<std::span<const uint8_t>> short_data(std::span<const uint8_t> apdu) {
  if (apdu.size() < 4) return std::nullopt;
  if (apdu.size() <= 5) return std::span<const uint8_t>{};
  const std::size_t lc = apdu[4];
  if (lc == 0) return std::nullopt;  // extended length
  if (apdu.size() != 5 + lc && apdu.size() != 6 + lc) return std::nullopt;
  return apdu.subspan(5, lc);
}

std::vector<uint16_t> fids(std::span<const uint8_t> data) {
  std::vector<uint16_t> out;
  for (std::size_t i = 0; i + 1 < data.size(); i += 2) out.push_back(static_cast<uint16_t>((data[i] << 8) | data[i + 1]));
  return out;
}

// ISO 7816-4 compact security attributes (tag 8C): an access mode byte, then one security
// condition byte per bit set in b7..b1, in that order; b1 is READ (BINARY/RECORD) for an EF.
ReadAccess compact_read_access(std::span<const uint8_t> v) {
  if (v.empty() || (v[0] & 0x80)) return ReadAccess::kUnknown;
  const uint8_t am = v[0];
  if (v.size() != 1 + static_cast<std::size_t>(std::popcount(static_cast<unsigned>(am & 0x7F))))
    return ReadAccess::kUnknown;
  if (!(am & 0x01)) return ReadAccess::kRestricted;  // no condition given for reading: not public
  return v.back() == 0x00 ? ReadAccess::kAlways : ReadAccess::kRestricted;
}

void scan_fcp(std::span<const uint8_t> content, FileInfo& info, int depth) {
  std::size_t pos = 0;
  uint32_t tag = 0;
  std::span<const uint8_t> v;
  while (pos < content.size() && next_tlv(content, pos, tag, v)) {
    switch (tag) {
      case 0x80:
        if (!v.empty() && v.size() <= 4) {
          uint32_t n = 0;
          for (uint8_t b : v) n = (n << 8) | b;
          info.size = n;
        }
        break;
      case 0x82:
        // File descriptor byte: not a DF (b6-b4 = 111), working or internal EF, transparent.
        if (!v.empty()) info.transparent_ef = (v[0] & 0x38) != 0x38 && (v[0] & 0x07) == 0x01;
        break;
      case 0x8C: {
        const ReadAccess a = compact_read_access(v);
        if (a != ReadAccess::kUnknown) info.read = info.read == ReadAccess::kRestricted ? info.read : a;
        break;
      }
      case 0x62:  // an FCP inside an FCI
      case 0xA0:  // security attribute templates (IAS ECC wraps the compact form in A1)
      case 0xA1:
        if (depth < 2) scan_fcp(v, info, depth + 1);
        break;
      default:
        break;
    }
  }
}

}  // namespace

uint16_t status_word(std::span<const uint8_t> r) {
  if (r.size() < 2) return 0;
  return static_cast<uint16_t>((r[r.size() - 2] << 8) | r.back());
}

bool is_9000(std::span<const uint8_t> r) { return status_word(r) == 0x9000; }

bool success(std::span<const uint8_t> r) {
  const uint16_t sw = status_word(r);
  return sw == 0x9000 || (sw >> 8) == 0x61;
}

bool more_data(std::span<const uint8_t> r) { return r.size() == 2 && r[0] == 0x61; }

std::optional<uint8_t> channel_of(uint8_t cla) {
  if (cla & 0x80) return std::nullopt;
  if (cla & 0x40) return static_cast<uint8_t>(4 + (cla & 0x0F));
  return static_cast<uint8_t>(cla & 0x03);
}

bool is_select(std::span<const uint8_t> apdu) { return apdu.size() >= 4 && apdu[1] == kInsSelect; }

bool is_get_response(std::span<const uint8_t> apdu) {
  return apdu.size() == 5 && apdu[1] == kInsGetResponse && apdu[2] == 0 && apdu[3] == 0 && channel_of(apdu[0]);
}

std::optional<uint32_t> short_le(std::span<const uint8_t> apdu) {
  if (apdu.size() != 5) return std::nullopt;
  return apdu[4] == 0 ? 256u : apdu[4];
}

std::optional<ReadBinary> read_binary(std::span<const uint8_t> c) {
  if (c.size() != 5 || c[1] != kInsReadBinary || (c[2] & 0x80)) return std::nullopt;
  auto ch = channel_of(c[0]);
  if (!ch) return std::nullopt;
  return ReadBinary{*ch, (uint32_t{c[2]} << 8) | c[3], c[4] == 0 ? 256u : c[4]};
}

std::optional<Key> select_key(std::span<const uint8_t> apdu) {
  if (!is_select(apdu)) return std::nullopt;
  auto ch = channel_of(apdu[0]);
  if (!ch || (apdu[0] & 0x10)) return std::nullopt;  // proprietary class, or chaining
  if ((apdu[3] & 0x03) != 0) return std::nullopt;   // not the first occurrence
  auto data = short_data(apdu);
  if (!data) return std::nullopt;
  const uint8_t p1 = apdu[2];
  Key key(1, static_cast<char>(*ch));
  auto path = [&](const std::vector<uint16_t>& fs) -> std::optional<Key> {
    if (fs.empty() || fs.front() != kMf || fs.size() > 8) return std::nullopt;
    for (std::size_t i = 0; i < fs.size(); ++i) {
      // 3FFF (current DF), FFFF (reserved) and 3F00 inside the path name no fixed file.
      if (fs[i] == 0x3FFF || fs[i] == 0xFFFF || (i > 0 && fs[i] == kMf)) return std::nullopt;
    }
    key += 'P';
    for (uint16_t f : fs) {
      key += static_cast<char>(f >> 8);
      key += static_cast<char>(f & 0xFF);
    }
    return key;
  };
  switch (p1) {
    case 0x04:
      if (data->empty() || data->size() > 16) return std::nullopt;
      key += 'A';
      key.append(data->begin(), data->end());
      return key;
    case 0x08: {
      if (data->empty() || data->size() % 2) return std::nullopt;
      auto fs = fids(*data);
      fs.insert(fs.begin(), kMf);
      return path(fs);
    }
    case 0x09:
      if (data->size() < 2 || data->size() % 2) return std::nullopt;
      return path(fids(*data));
    case 0x00:
      if (data->empty()) return path({kMf});
      [[fallthrough]];
    case 0x02:
      if (data->size() != 2) return std::nullopt;
      return path(fids(*data));
    default:
      return std::nullopt;
  }
}

uint8_t key_channel(const Key& key) { return key.empty() ? 0 : static_cast<uint8_t>(key[0]); }

std::string key_text(const Key& key) {
  if (key.size() < 2) return "?";
  std::string out = fmt::format("{}{}:", key[1] == 'A' ? "A" : "P", key[0] != 0 ? fmt::format("@{}", +key[0]) : "");
  for (std::size_t i = 2; i < key.size(); ++i) {
    if (key[1] == 'P' && i > 2 && i % 2 == 0) out += '/';
    out += fmt::format("{:02X}", static_cast<uint8_t>(key[i]));
  }
  return out;
}

SelectOutcome select_outcome(std::span<const uint8_t> r) {
  const uint16_t sw = status_word(r);
  if (sw == 0x9000 || (sw >> 8) == 0x61) return SelectOutcome::kSelected;
  if (r.size() != 2) return SelectOutcome::kUnclear;  // data with an error: not what a card does
  switch (sw >> 8) {
    case 0x67: case 0x68: case 0x69: case 0x6A: case 0x6C: case 0x6D: case 0x6E:
      return SelectOutcome::kRefused;
    case 0x6B:
      return sw == 0x6B00 ? SelectOutcome::kRefused : SelectOutcome::kUnclear;
    default:
      return SelectOutcome::kUnclear;
  }
}

bool may_modify(std::span<const uint8_t> apdu) {
  if (apdu.size() < 4) return false;  // not a command a card executes
  switch (apdu[1]) {
    case 0xA4:  // SELECT
    case 0xB0:  // READ BINARY
    case 0xB1:
    case 0xB2:  // READ RECORD
    case 0xB3:
    case 0xC0:  // GET RESPONSE
    case 0xCA:  // GET DATA
    case 0xCB:
    case 0x20:  // VERIFY
    case 0x22:  // MANAGE SECURITY ENVIRONMENT
    case 0x2A:  // PERFORM SECURITY OPERATION
    case 0x84:  // GET CHALLENGE
    case 0x88:  // INTERNAL AUTHENTICATE
    case 0x82:  // EXTERNAL / MUTUAL AUTHENTICATE
    case 0x86:  // GENERAL AUTHENTICATE
    case 0x87:
    case 0x70:  // MANAGE CHANNEL
      return false;
    default:
      return true;
  }
}

bool loses_track(std::span<const uint8_t> apdu, std::span<const uint8_t> response) {
  if (apdu.size() < 4) return false;
  if (apdu[1] == kInsManageChannel) return true;
  if (!is_select(apdu)) return false;
  const auto outcome = select_outcome(response);
  if (outcome == SelectOutcome::kRefused) return false;
  return outcome == SelectOutcome::kUnclear || !select_key(apdu);
}

bool raises_security(std::span<const uint8_t> apdu, std::span<const uint8_t> response) {
  if (apdu.size() < 4 || status_word(response) != 0x9000) return false;
  switch (apdu[1]) {
    case 0x20:
      return apdu.size() > 5;  // VERIFY with a PIN (an empty one only asks the status)
    case 0x82:
    case 0x86:
    case 0x87:
      return true;
    default:
      return false;
  }
}

std::optional<FileInfo> parse_fcp(std::span<const uint8_t> data) {
  std::size_t pos = 0;
  uint32_t tag = 0;
  std::span<const uint8_t> outer;
  if (!next_tlv(data, pos, tag, outer) || (tag != 0x62 && tag != 0x6F)) return std::nullopt;
  FileInfo info;
  scan_fcp(outer, info, 0);
  return info;
}

bool next_tlv(std::span<const uint8_t> d, std::size_t& pos, uint32_t& tag, std::span<const uint8_t>& value) {
  if (pos >= d.size()) return false;
  tag = d[pos++];
  if ((tag & 0x1F) == 0x1F) {
    if (pos >= d.size()) return false;
    tag = (tag << 8) | d[pos++];
    if (tag & 0x80) {
      if (pos >= d.size()) return false;
      tag = (tag << 8) | d[pos++];
    }
  }
  if (pos >= d.size()) return false;
  std::size_t len = d[pos++];
  if (len == 0x81) {
    if (pos >= d.size()) return false;
    len = d[pos++];
  } else if (len == 0x82) {
    if (pos + 1 >= d.size()) return false;
    len = (std::size_t{d[pos]} << 8) | d[pos + 1];
    pos += 2;
  } else if (len > 0x82) {
    return false;
  }
  if (d.size() - pos < len) return false;
  value = d.subspan(pos, len);
  pos += len;
  return true;
}

}  // namespace cardbridge::card_image
