#include "cardbridge/desk_core/policy.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>

#include <fmt/format.h>

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

bool Policy::control_allowed(uint32_t code) const {
  if (within && !within->control_allowed(code)) return false;
  return !control_allow || control_allow->contains(code);
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

std::vector<std::string> Policy::parse_reader_filter(std::string_view text) {
  std::vector<std::string> out;
  for (auto p : split(text)) out.emplace_back(p);
  return out;
}

Result<std::optional<std::set<uint32_t>>, std::string> Policy::parse_control_allow(std::string_view text) {
  auto t = lower(trim(text));
  if (t.empty() || t == "all") return std::optional<std::set<uint32_t>>{};
  std::set<uint32_t> codes;
  if (t == "none") return std::optional<std::set<uint32_t>>{codes};
  for (auto part : split(t)) {
    int base = 10;
    if (part.starts_with("0x")) {
      part.remove_prefix(2);
      base = 16;
    }
    uint32_t v = 0;
    auto [p, ec] = std::from_chars(part.data(), part.data() + part.size(), v, base);
    if (ec != std::errc{} || p != part.data() + part.size() || part.empty())
      return unexpected(fmt::format("bad control code '{}'", part));
    codes.insert(v < 0x10000 ? scard::ctl_code(v) : v);
  }
  return std::optional<std::set<uint32_t>>{codes};
}

}  // namespace cardbridge::client
