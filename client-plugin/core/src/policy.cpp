#include "cardbridge/desk_core/policy.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "cardbridge/support/scard.hpp"

namespace cardbridge::client {

namespace {

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

std::vector<std::string_view> split(std::string_view text) {
  std::vector<std::string_view> out;
  while (!text.empty()) {
    auto comma = text.find(',');
    auto part = trim(text.substr(0, comma));
    if (!part.empty()) out.push_back(part);
    if (comma == std::string_view::npos) break;
    text.remove_prefix(comma + 1);
  }
  return out;
}

}  // namespace

bool Policy::reader_allowed(std::string_view name) const {
  if (within && !within->reader_allowed(name)) return false;
  const auto n = lower(name);
  auto matches = [&](const std::string& f) { return n.find(lower(f)) != std::string::npos; };
  if (std::any_of(reader_deny.begin(), reader_deny.end(), matches)) return false;
  if (reader_filter.empty()) return true;
  return std::any_of(reader_filter.begin(), reader_filter.end(), matches);
}

Policy Policy::narrowed(Policy admin, Policy connection) {
  if (connection.within) {  // already nested: nest its outermost policy in |admin|
    Policy outer = narrowed(std::move(admin), *connection.within);
    connection.within = std::make_shared<const Policy>(std::move(outer));
    return connection;
  }
  connection.within = std::make_shared<const Policy>(std::move(admin));
  return connection;
}

namespace {

Result<uint32_t, std::string> parse_number(std::string_view part) {
  const std::string_view original = part;
  int base = 10;
  if (part.starts_with("0x")) {
    part.remove_prefix(2);
    base = 16;
  }
  uint32_t v = 0;
  auto [p, ec] = std::from_chars(part.data(), part.data() + part.size(), v, base);
  if (part.empty() || ec != std::errc{} || p != part.data() + part.size())
    return unexpected(fmt::format("bad number '{}'", original));
  return v;
}

}  // namespace

ControlVerdict Policy::control_verdict(uint32_t code, const std::vector<ReaderFeature>* announced) const {
  if (within) {
    // Both must allow: a refusal by either wins, then a need for the reader's features.
    const auto outer = within->control_verdict(code, announced);
    const auto inner = own_control_verdict(code, announced);
    if (outer == ControlVerdict::kRefused || inner == ControlVerdict::kRefused) return ControlVerdict::kRefused;
    if (outer == ControlVerdict::kNeedsFeatures || inner == ControlVerdict::kNeedsFeatures)
      return ControlVerdict::kNeedsFeatures;
    return ControlVerdict::kAllowed;
  }
  return own_control_verdict(code, announced);
}

ControlVerdict Policy::own_control_verdict(uint32_t code, const std::vector<ReaderFeature>* announced) const {
  const ControlAllow& c = control_allow;
  if (c.all || c.codes.contains(code)) return ControlVerdict::kAllowed;
  // The two codes with a fixed meaning are decided by name alone, whatever a reader announces.
  if (code == kGetFeatureRequest) return c.pinpad ? ControlVerdict::kAllowed : ControlVerdict::kRefused;
  if (code == kCcidEscape) return c.escape ? ControlVerdict::kAllowed : ControlVerdict::kRefused;
  if (!c.pinpad && !c.escape) return ControlVerdict::kRefused;
  if (!announced) return ControlVerdict::kNeedsFeatures;
  for (const auto& f : *announced) {
    if (f.code != code) continue;
    if (c.pinpad && feature::is_pinpad(f.tag)) return ControlVerdict::kAllowed;
    if (c.escape && f.tag == feature::kCcidEscCommand) return ControlVerdict::kAllowed;
  }
  return ControlVerdict::kRefused;
}

bool Policy::set_attrib_allowed(uint32_t attribute) const {
  if (within && !within->set_attrib_allowed(attribute)) return false;
  return set_attrib_allow.all || set_attrib_allow.attributes.contains(attribute);
}

std::vector<std::string> Policy::parse_reader_filter(std::string_view text) {
  std::vector<std::string> out;
  for (auto p : split(text)) out.emplace_back(p);
  return out;
}

Result<ControlAllow, std::string> Policy::parse_control_allow(std::string_view text) {
  const auto t = lower(trim(text));
  ControlAllow out;
  if (t.empty()) return out;  // the default: pinpad
  out.pinpad = false;
  const auto parts = split(t);
  bool none = false;
  for (auto part : parts) {
    if (part == "all") {
      out.all = true;
    } else if (part == "pinpad") {
      out.pinpad = true;
    } else if (part == "escape") {
      out.escape = true;
    } else if (part == "none") {
      none = true;
    } else {
      auto v = parse_number(part);
      if (!v) return unexpected(fmt::format("bad control code '{}' (expected pinpad, escape, all, none or numbers)", part));
      out.codes.insert(*v < 0x10000 ? scard::ctl_code(*v) : *v);
    }
  }
  if (none && parts.size() > 1) return unexpected(std::string("'none' cannot be combined with other entries"));
  if (parts.empty()) return unexpected(fmt::format("bad control code list '{}'", text));
  return out;
}

Result<SetAttribAllow, std::string> Policy::parse_set_attrib_allow(std::string_view text) {
  const auto t = lower(trim(text));
  SetAttribAllow out;
  if (t.empty() || t == "none") return out;
  for (auto part : split(t)) {
    if (part == "all") {
      out.all = true;
      continue;
    }
    auto v = parse_number(part);
    if (!v) return unexpected(fmt::format("bad attribute '{}' (expected none, all or attribute ids)", part));
    out.attributes.insert(*v);
  }
  return out;
}

std::string Policy::describe(const ControlAllow& c) {
  std::vector<std::string> parts;
  if (c.all) parts.emplace_back("all");
  if (c.pinpad) parts.emplace_back("pinpad");
  if (c.escape) parts.emplace_back("escape");
  for (uint32_t code : c.codes) parts.push_back(fmt::format("0x{:08X}", code));
  return parts.empty() ? "none" : fmt::format("{}", fmt::join(parts, ","));
}

std::string Policy::describe(const SetAttribAllow& s) {
  if (s.all) return "all";
  if (s.attributes.empty()) return "none";
  std::vector<std::string> parts;
  for (uint32_t a : s.attributes) parts.push_back(fmt::format("0x{:08X}", a));
  return fmt::format("{}", fmt::join(parts, ","));
}

namespace feature {

bool is_pinpad(uint8_t tag) {
  switch (tag) {
    case kVerifyPinStart:
    case kVerifyPinFinish:
    case kModifyPinStart:
    case kModifyPinFinish:
    case kGetKeyPressed:
    case kVerifyPinDirect:
    case kModifyPinDirect:
    case kIfdPinProperties:
    case kAbort:
    case kVerifyPinDirectAppId:
    case kModifyPinDirectAppId:
    case kGetTlvProperties:
      return true;
    default:
      return false;
  }
}

std::vector<ReaderFeature> parse_features(std::span<const uint8_t> answer) {
  std::vector<ReaderFeature> out;
  std::size_t i = 0;
  while (i + 2 <= answer.size()) {
    const uint8_t tag = answer[i];
    const std::size_t len = answer[i + 1];
    i += 2;
    if (len > answer.size() - i) break;
    if (len == 4) {
      const uint32_t code = static_cast<uint32_t>(answer[i]) << 24 | static_cast<uint32_t>(answer[i + 1]) << 16 |
                            static_cast<uint32_t>(answer[i + 2]) << 8 | answer[i + 3];
      out.push_back(ReaderFeature{tag, code});
    }
    i += len;
  }
  return out;
}

}  // namespace feature

}  // namespace cardbridge::client
