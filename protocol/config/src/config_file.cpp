#include "cardbridge/config/config_file.hpp"

#include <cstdlib>
#include <fstream>
#include <utility>

#include <fmt/format.h>

namespace cardbridge::config {

std::string system_dir() { return CARDBRIDGE_ETC_DIR; }

std::string server_dir() {
  const char* e = std::getenv("CARDBRIDGE_ETC");
  return e && *e ? std::string(e) : system_dir();
}

namespace {

std::string join(const std::vector<std::string>& v, const char* sep) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : sep) + s;
  return out;
}

// CLI11's TOML/INI reader, with this program's sections mapped onto its app and every key
// checked against the options (CLI11's own check would name neither file nor section).
class SectionReader : public CLI::ConfigBase {
 public:
  SectionReader(const CLI::App* app, SectionMap sections, std::set<std::string> foreign)
      : app_(app), sections_(std::move(sections)), foreign_(std::move(foreign)) {}

  void set_option(const CLI::Option* opt) { option_ = opt; }

  std::vector<CLI::ConfigItem> from_config(std::istream& input) const override {
    const std::string file = path();
    std::vector<CLI::ConfigItem> out;
    for (auto& item : CLI::ConfigBase::from_config(input)) {
      // Section open/close markers: they would make CLI11 run subcommands' callbacks.
      if (item.name == "++" || item.name == "--") continue;
      if (item.parents.empty()) {
        throw CLI::ConfigError(fmt::format("{}: '{}' is outside any section: put it under one of [{}]", file,
                                           item.name, known()));
      }
      const std::string section = item.parents.front();
      if (foreign_.contains(section)) continue;
      auto target = sections_.find(section);
      if (target == sections_.end()) {
        throw CLI::ConfigError(fmt::format("{}: unknown section [{}] (known: [{}])", file, section, known()));
      }
      const CLI::App* part = app_;
      if (!target->second.empty()) {
        part = nullptr;
        for (const CLI::App* sub : app_->get_subcommands([](const CLI::App*) { return true; })) {
          if (sub->get_name() == target->second) part = sub;
        }
      }
      const CLI::Option* opt =
          part && item.parents.size() == 1 ? part->get_option_no_throw("--" + item.name) : nullptr;
      if (!opt) {
        const std::string key = join(std::vector<std::string>(item.parents.begin() + 1, item.parents.end()), ".");
        throw CLI::ConfigError(fmt::format("{} [{}]: unknown key '{}'", file, section,
                                           key.empty() ? item.name : key + "." + item.name));
      }
      if (!opt->get_configurable()) {
        throw CLI::ConfigError(fmt::format("{} [{}]: '{}' can only be given on the command line", file, section,
                                           item.name));
      }
      // `disable = pipeline, defer-begin` for an option that takes one comma-separated string:
      // the list as it would be written on the command line.
      if (item.inputs.size() > 1 && opt->get_items_expected_max() == 1) item.inputs = {join(item.inputs, ",")};
      item.parents.clear();
      if (!target->second.empty()) item.parents.push_back(target->second);
      out.push_back(std::move(item));
    }
    return out;
  }

 private:
  std::string path() const {
    if (!option_) return "configuration file";
    return option_->count() > 0 ? option_->results().front() : option_->get_default_str();
  }
  std::string known() const {
    std::vector<std::string> names;
    for (const auto& [name, _] : sections_) names.push_back(name);
    return join(names, "], [");
  }

  const CLI::App* app_;
  SectionMap sections_;
  std::set<std::string> foreign_;
  const CLI::Option* option_ = nullptr;
};

}  // namespace

CLI::Option* add_config_file(CLI::App& app, const std::string& default_path, SectionMap sections,
                             std::set<std::string> foreign) {
  auto reader = std::make_shared<SectionReader>(&app, std::move(sections), std::move(foreign));
  app.config_formatter(reader);
  CLI::Option* opt = app.set_config("--config", default_path,
                                    "the admin's configuration file (a missing default file is no configuration)");
  reader->set_option(opt);
  return opt;
}

bool section_has(const std::string& path, const std::string& section, const std::string& key) {
  std::ifstream in(path);
  if (!in) return false;
  try {
    for (const auto& item : CLI::ConfigBase().from_config(in)) {
      if (item.parents.size() == 1 && item.parents.front() == section && item.name == key) return true;
    }
  } catch (const CLI::Error&) {
  }
  return false;
}

std::string file_read(const CLI::App& app) {
  const CLI::Option* opt = app.get_config_ptr();
  return opt && opt->count() > 0 ? opt->results().front() : std::string();
}

}  // namespace cardbridge::config
