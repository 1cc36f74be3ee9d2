#include "channel_session.hpp"

#include <algorithm>

#include "cardbridge/desk_config/desk_settings.hpp"
#include "cardbridge/desk_pcsc/pcsc_card_api.hpp"
#include "cardbridge/journal/audit.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/redact.hpp"
#include "cardbridge/desk_pcsc/pcsc_card_api.hpp"
#include "wlog_sink.hpp"

namespace cardbridge::client {

namespace {
log::Channel logger{"cardbridge.addin"};
}  // namespace

AddinOptions AddinOptions::parse(int argc, char** argv, std::string* error) {
  AddinOptions o;
  // argv[0] is the add-in name ("cardbridge").
  for (int i = 1; i < argc; ++i) {
    if (!argv[i]) continue;
    std::string arg = argv[i];
    auto sep = arg.find_first_of(":=");
    std::string key = arg.substr(0, sep);
    std::string value = sep == std::string::npos ? "" : arg.substr(sep + 1);
    if (key == "log-level") {
      o.log_level = value;
    } else if (key == "readers") {
      // FreeRDP splits add-in arguments on ',': lists use '+' (or ';', '|': quoted in a shell).
      o.readers = addin_list(value);
    } else if (key == "deny-readers") {
      o.deny_readers = addin_list(value);
    } else if (key == "allow-control") {
      o.allow_control = addin_list(value);
    } else if (key == "allow-set-attrib") {
      o.allow_set_attrib = addin_list(value);
    } else if (key == "unsafe-log-card-data") {
      o.log_card_data = true;
    } else if (key == "name") {
      o.name = value;
    } else if (key == "image" && (value == "on" || value == "off")) {
      o.card_image = value == "on";
    } else if (error) {
      *error += "unknown option '" + arg + "'; ";
    }
  }
  return o;
}

void init_addin_logging(const std::string& level) {
  init_wlog_logging(level);
  audit::set_identifier("cardbridge-client");
}

namespace {

// Nothing: what a broken policy file or option leaves exposed (fail closed).
Policy nothing() {
  Policy p;
  p.reader_deny = {""};  // every name contains ""
  p.control_allow = ControlAllow{.pinpad = false};
  return p;
}

}  // namespace

// The admin's policy (desk.conf [desk]) encloses the connection's options.
ChannelSession::ChannelSession(const AddinOptions& options, std::string default_name, Writer writer, std::string link)
    : writer_(std::move(writer)) {
  DeskConfig cfg;
  cfg.desk_name = options.name.empty() ? std::move(default_name) : options.name;
  cfg.software = "cardbridge-client";
  cfg.capabilities = protocol::caps::kAll;
  cfg.server_policy.allow_rdp_channel = true;
  cfg.card_image = options.card_image.value_or(true);
  cfg.link = std::move(link);
  Policy admin = nothing();
  if (auto settings = load_desk_settings(desk_conf_path()); !settings) {
    logger->error("{}: exposing no reader until it is fixed", settings.error());
    cfg.card_image = false;
  } else if (auto p = admin_policy(*settings); !p) {
    logger->error("{}: exposing no reader until it is fixed", p.error());
    cfg.card_image = false;
  } else {
    admin = *p;
    if (!settings->card_image) {
      if (options.card_image.value_or(false))
        logger->warn("{} sets card-image = off: image:on ignored", settings->file);
      cfg.card_image = false;
    }
    if (!settings->name.empty()) {
      if (!options.name.empty() && options.name != settings->name)
        logger->warn("{} sets the desk name '{}': name:{} ignored", settings->file, settings->name,
                     log::printable(options.name));
      cfg.desk_name = settings->name;
    }
    if (!settings->file.empty()) logger->info("desk policy from {}", settings->file);
  }
  auto own = connection_policy({options.readers}, {options.deny_readers}, options.allow_control,
                               options.allow_set_attrib);
  if (!own) {
    logger->error("{}; no control code allowed, no attribute may be set", own.error());
    own = connection_policy({options.readers}, {options.deny_readers}, "none", "none");
  }
  redact::set_card_data_logging(options.log_card_data);
  if (options.log_card_data) logger->warn("unsafe-log-card-data: card answers (personal data) are logged at debug level");
  logger->info("desk policy: control codes {}; set-attrib {}", Policy::describe(own->control_allow),
               Policy::describe(own->set_attrib_allow));
  cfg.policy = Policy::narrowed(std::move(admin), *own);
  DeskRuntime::Io io;
  io.send = [this](std::vector<uint8_t> frame) {
    if (!writer_(std::move(frame))) logger->warn("channel write failed");
  };
  io.close_link = [](const std::string& reason) {
    // A virtual channel cannot be re-opened from our side: the runtime ignores the channel
    // until the server says hello again on a reopened one.
    logger->error("server link unusable: {}", reason);
  };
  io.arm_timer = [this](std::optional<TimePoint> when) {
    if (timer_) timer_->arm(when);
  };
  timer_ = std::make_unique<TimerThread>([this] {
    if (runtime_) runtime_->tick();
  });
  runtime_ = std::make_unique<DeskRuntime>(process_pcsc_card_api(), std::move(cfg), std::move(io));
  runtime_->start();
}

ChannelSession::~ChannelSession() { shutdown(); }

void ChannelSession::opened() {
  // The RDP connection authenticated the server (and the user logged in to it): the channel
  // belongs to that session.
  if (runtime_) runtime_->transport_up(PeerIdentity::rdp_channel("RDP client channel"));
}

void ChannelSession::feed(const uint8_t* data, std::size_t n) {
  if (runtime_) runtime_->receive(std::span<const uint8_t>(data, n));
}

void ChannelSession::closed() {
  if (runtime_) runtime_->transport_down();
}

// Never waits for a card: the runtime is stopped and destroyed by the Janitor, cut off
// from this session first (it outlives it).
void ChannelSession::shutdown() {
  if (!runtime_) return;
  runtime_->transport_down();
  runtime_->detach_io();
  timer_.reset();
  Janitor::instance().dispose(std::move(runtime_));
}

}  // namespace cardbridge::client
