#include "channel_session.hpp"

#include <algorithm>

#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/desk_pcsc/pcsc_card_api.hpp"

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
      // FreeRDP splits add-in arguments on ',', so reader filters use ';' or '|'.
      std::replace(value.begin(), value.end(), ';', ',');
      std::replace(value.begin(), value.end(), '|', ',');
      o.readers = value;
    } else if (key == "allow-control") {
      std::replace(value.begin(), value.end(), ';', ',');
      std::replace(value.begin(), value.end(), '|', ',');
      o.allow_control = value;
    } else if (key == "name") {
      o.name = value;
    } else if (error) {
      *error += "unknown option '" + arg + "'; ";
    }
  }
  return o;
}

void init_addin_logging(const std::string& level) {
  static std::once_flag once;
  std::call_once(once, [&] {
    auto lvl = log::parse_level(level).value_or(spdlog::level::info);
    log::init(lvl, "cardbridge-client");
  });
}

ChannelSession::ChannelSession(const AddinOptions& options, std::string default_name, Writer writer)
    : writer_(std::move(writer)) {
  DeskConfig cfg;
  cfg.desk_name = options.name.empty() ? std::move(default_name) : options.name;
  cfg.software = "cardbridge-client";
  cfg.capabilities = protocol::caps::kAll;
  cfg.server_policy.allow_rdp_channel = true;
  cfg.policy.reader_filter = Policy::parse_reader_filter(options.readers);
  if (auto allow = Policy::parse_control_allow(options.allow_control)) {
    cfg.policy.control_allow = *allow;
  } else {
    logger->error("allow-control: {}; no control code allowed", allow.error());
    cfg.policy.control_allow = std::set<uint32_t>{};
  }
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
