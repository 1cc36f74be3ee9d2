#include "cardbridge/desk_config/desk_settings.hpp"

#include <fmt/format.h>

#include "cardbridge/config/config_file.hpp"

namespace cardbridge::client {

std::string desk_conf_path() { return config::system_dir() + "/" + config::kDeskConf; }

Result<DeskSettings, std::string> load_desk_settings(const std::string& path) {
  DeskSettings s;
  CLI::App app{"desk.conf [desk]"};
  app.add_option("--name", s.name);
  app.add_option("--readers", s.readers)->delimiter(',');
  app.add_option("--deny-readers", s.deny_readers)->delimiter(',');
  app.add_option("--allow-control", s.allow_control);
  std::string image = "on";
  app.add_option("--card-image", image)->check(CLI::IsMember({"on", "off"}));
  config::add_config_file(app, path, {{"desk", ""}}, {"agent"});
  try {
    app.parse(std::vector<std::string>{});
  } catch (const CLI::ParseError& e) {
    return unexpected(std::string(e.what()));
  }
  s.file = config::file_read(app);
  s.card_image = image == "on";
  auto trim_all = [](std::vector<std::string>& v) {
    std::vector<std::string> out;
    for (auto& x : v) {
      auto b = x.find_first_not_of(" \t");
      auto e = x.find_last_not_of(" \t");
      if (b != std::string::npos) out.push_back(x.substr(b, e - b + 1));
    }
    v = std::move(out);
  };
  trim_all(s.readers);
  trim_all(s.deny_readers);
  return s;
}

std::string addin_list(std::string value) {
  for (char& c : value) {
    if (c == '+' || c == ';' || c == '|') c = ',';
  }
  return value;
}

// The admin's layer restricts only what desk.conf sets: a key it leaves out allows everything,
// and the connection's own policy (least privilege by default: control codes "pinpad",
// SET_ATTRIB "none") decides within it.
Result<Policy, std::string> admin_policy(const DeskSettings& s) {
  Policy p;
  for (const auto& r : s.readers) {
    for (auto& part : Policy::parse_reader_filter(r)) p.reader_filter.push_back(std::move(part));
  }
  for (const auto& r : s.deny_readers) {
    for (auto& part : Policy::parse_reader_filter(r)) p.reader_deny.push_back(std::move(part));
  }
  p.control_allow = ControlAllow{.all = true};
  p.set_attrib_allow = SetAttribAllow{.all = true};
  if (!s.allow_control.empty()) {
    auto allow = Policy::parse_control_allow(s.allow_control);
    if (!allow) return unexpected(fmt::format("{} [desk]: allow-control: {}", s.file, allow.error()));
    p.control_allow = *allow;
  }
  return p;
}

Result<Policy, std::string> connection_policy(const std::vector<std::string>& readers,
                                              const std::vector<std::string>& deny_readers,
                                              const std::string& allow_control, const std::string& allow_set_attrib) {
  Policy p;  // least privilege where nothing is said (Policy's defaults)
  for (const auto& r : readers) {
    for (auto& part : Policy::parse_reader_filter(r)) p.reader_filter.push_back(std::move(part));
  }
  for (const auto& r : deny_readers) {
    for (auto& part : Policy::parse_reader_filter(r)) p.reader_deny.push_back(std::move(part));
  }
  if (!allow_control.empty()) {
    auto allow = Policy::parse_control_allow(allow_control);
    if (!allow) return unexpected(fmt::format("allow-control: {}", allow.error()));
    p.control_allow = *allow;
  }
  if (!allow_set_attrib.empty()) {
    auto allow = Policy::parse_set_attrib_allow(allow_set_attrib);
    if (!allow) return unexpected(fmt::format("allow-set-attrib: {}", allow.error()));
    p.set_attrib_allow = *allow;
  }
  return p;
}

}  // namespace cardbridge::client
