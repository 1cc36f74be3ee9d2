// cardbridge-shim: serves the pcsc-lite daemon protocol on a per-session socket and
// forwards card operations to the desk.
#include <unistd.h>

#include <cstdlib>
#include <iostream>

#include <CLI/CLI.hpp>

#include "cardbridge/config/config_file.hpp"
#include "cardbridge/journal/audit.hpp"
#include "cardbridge/journal/journal.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/redact.hpp"
#include "cardbridge/shim_io/control_server.hpp"
#include "cardbridge/shim_io/shim_service.hpp"
#include "cardbridge/shim_io/xrdp_channel.hpp"

namespace {

std::string default_socket_path() {
  if (const char* rt = std::getenv("XDG_RUNTIME_DIR"); rt && *rt) {
    return std::string(rt) + "/cardbridge/pcscd.comm";
  }
  return "/run/user/" + std::to_string(::geteuid()) + "/cardbridge/pcscd.comm";
}

std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "unknown";
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  namespace cb = cardbridge;
  CLI::App app{
      "cardbridge-shim: makes a desk's smart-card readers appear to the PC/SC programs of "
      "this session.\nPrograms find it through PCSCLITE_CSOCK_NAME=<socket>.\nEvery option can also be set "
      "in the [shim] section of the admin's server.conf (key = the long option without --)."};
  app.set_version_flag("--version", std::string("cardbridge-shim ") + CARDBRIDGE_VERSION);
  std::string socket_path = default_socket_path();
  std::string desk_spec;
  std::string level = "info";
  std::string mode = "optimized";
  std::string disabled;
  std::string control_path;
  std::string log_target = "auto";
  bool insecure_tcp = false;
  std::vector<std::string> peer_fingerprints;
  cb::transport::TlsConfig tls;
  // /etc/cardbridge/server.conf [shim] (cardbridge/config/config_file.hpp); [cdrsession] and
  // [doctor] are cdrsession's.
  cb::config::add_config_file(app, cb::config::server_dir() + "/" + cb::config::kServerConf, {{"shim", ""}},
                              {"cdrsession", "doctor", "status"});
  app.add_option("--socket", socket_path, "pcsc-lite socket to serve (its directory is created 0700)")
      ->capture_default_str();
  app.add_option("--desk", desk_spec,
                 "where the desk is: unix:PATH or tcp:HOST:PORT (desk agent or RDP host relay), "
                 "xrdp (the CBRIDGE channel of this xrdp session: static or dynamic, whichever the "
                 "client opened; xrdp:static or xrdp:dynamic to insist on one), or rdp "
                 "(xrdp when this is an xrdp session, else the relay socket "
                 "$XDG_RUNTIME_DIR/cardbridge/desk.sock)")
      ->required();
  app.add_option("--tls-cert", tls.certificate, "tls: desk link: this server's certificate (or $CARDBRIDGE_TLS_CERT)");
  app.add_option("--tls-key", tls.private_key, "tls: its private key (or $CARDBRIDGE_TLS_KEY)");
  app.add_option("--tls-ca", tls.ca, "tls: CA that signed the desks' certificates (or $CARDBRIDGE_TLS_CA)");
  app.add_option("--tls-peer-name", tls.peer_name,
                 "tls: the desk's certificate name (CN or DNS name; or $CARDBRIDGE_TLS_PEER_NAME)");
  app.add_option("--tls-peer-fingerprint", peer_fingerprints,
                 "tls: the desk's certificate SHA-256 fingerprint (sha256:HEX); with tls: a name or a "
                 "fingerprint is required (any certificate the CA signed is not enough)")
      ->delimiter(',');
  app.add_flag("--insecure-tcp", insecure_tcp,
               "allow a plain TCP desk link (tests only: whoever listens on that port gets the card "
               "traffic, PINs included)");
  app.add_option("--control", control_path,
                 "control socket for cdrsession status/doctor (default: <socket>.ctl)");
  app.add_option("--log-level", level, "trace, debug, info, warn, error, critical or off")
      ->capture_default_str();
  app.add_option("--log-target", log_target,
                 "auto (the journal when stderr is a journal stream, as in a systemd unit or a session "
                 "cdrsession started; else stderr), journal, or stderr")
      ->check(CLI::IsMember({"auto", "journal", "stderr"}))
      ->capture_default_str();
  app.add_option("--mode", mode,
                 "optimized (default) or per-call (one desk round trip per PC/SC call, "
                 "for comparison with other redirectors)")
      ->check(CLI::IsMember({"optimized", "per-call"}))
      ->capture_default_str();
  app.add_option("--disable", disabled,
                 "switch off optimisations (comma-separated): pipeline, defer-begin, "
                 "prefetch-get-response, read-ahead, cache-attributes, card-image");
  bool log_card_data = false;
  app.add_flag("--unsafe-log-card-data", log_card_data,
               "diagnostics only: log what the card answers to SELECT/READ BINARY/GET DATA... at debug "
               "level (personal data: the card holder's identity). PINs are never logged");
  bool check_only = false;
  app.add_flag("--check-config", check_only,
               "check the options and the configuration file, then exit (0: accepted; otherwise what is "
               "wrong, on stderr); cdrsession does this before it starts a session's shim")
      ->configurable(false);
  CLI11_PARSE(app, argc, argv);

  auto lvl = cb::log::parse_level(level);
  if (!lvl) {
    std::cerr << "cardbridge-shim: unknown log level '" << level << "'\n";
    return 2;
  }
  const auto target = cb::journal::init_logging(*lvl, "cardbridge-shim", *cb::journal::parse_target(log_target));
  cb::audit::set_identifier("cardbridge-shim");
  auto log = cb::log::get("cardbridge.shim");
  cb::redact::set_card_data_logging(log_card_data);
  if (log_card_data) log->warn("--unsafe-log-card-data: card answers (personal data) are logged at debug level");
  const std::string config_file = cb::config::file_read(app);

  boost::asio::io_context io;
  std::shared_ptr<cb::shim::DeskLink> link;
  std::string link_text;
  if (desk_spec == "rdp" && cb::shim::in_xrdp_session()) desk_spec = "xrdp";
  if (desk_spec == "rdp") {
    const char* rt = std::getenv("XDG_RUNTIME_DIR");
    desk_spec = "unix:" + (rt && *rt ? std::string(rt) : "/run/user/" + std::to_string(::geteuid())) +
                "/cardbridge/desk.sock";
  }
  if (desk_spec == "xrdp" || desk_spec == "xrdp:static" || desk_spec == "xrdp:dynamic") {
    cb::shim::XrdpOptions xo;
    // Plain "xrdp" (and "rdp" in an xrdp session): whichever channel the client opened.
    xo.kind = desk_spec == "xrdp:static"    ? cb::shim::XrdpChannelKind::kStatic
              : desk_spec == "xrdp:dynamic" ? cb::shim::XrdpChannelKind::kDynamic
                                            : cb::shim::XrdpChannelKind::kEither;
    link_text = cb::shim::describe(xo);
    link = std::make_shared<cb::shim::StreamDeskLink>(io, link_text, cb::shim::xrdp_connector(io, xo),
                                                      cb::shim::xrdp_client_gone);
  } else {
    auto ep = cb::transport::Endpoint::parse(desk_spec);
    if (!ep) {
      std::cerr << "cardbridge-shim: --desk: " << ep.error() << "\n";
      return 2;
    }
    link_text = ep->to_string();
    if (ep->kind == cb::transport::Endpoint::Kind::kTcp && !insecure_tcp) {
      std::cerr << "cardbridge-shim: a plain TCP desk link authenticates no one (another user listening on "
                   "that port would receive the PINs): use unix:PATH, tls:HOST:PORT with a pinned desk, or "
                   "--insecure-tcp for tests\n";
      return 2;
    }
    if (ep->kind == cb::transport::Endpoint::Kind::kTls) {
      tls.fill_from_environment();
      for (const auto& f : peer_fingerprints) {
        if (!cb::normalize_fingerprint(f)) {
          std::cerr << "cardbridge-shim: --tls-peer-fingerprint " << f << ": not a SHA-256 fingerprint (64 hex digits)\n";
          return 2;
        }
      }
      if (tls.peer_name.empty() && peer_fingerprints.empty()) {
        std::cerr << "cardbridge-shim: tls: needs the desk's identity: --tls-peer-name or --tls-peer-fingerprint\n";
        return 2;
      }
      auto ctx = cb::transport::make_tls_context(tls, /*server=*/false);
      if (!ctx) {
        std::cerr << "cardbridge-shim: " << ctx.error() << "\n";
        return 2;
      }
      link = std::make_shared<cb::shim::StreamDeskLink>(
          io, link_text, cb::shim::StreamDeskLink::tls_connector(io, *ep, *ctx, tls.peer_name));
    } else {
      link = std::make_shared<cb::shim::StreamDeskLink>(io, *ep);
    }
  }

  cb::shim::ServiceConfig cfg;
  cfg.socket_path = socket_path;
  cfg.desk_link = link_text;
  if (const char* key = std::getenv("CARDBRIDGE_SESSION"); key && *key) cfg.session = cb::log::printable(key);
  cfg.core.server_name = host_name();
  cfg.core.capabilities = mode == "per-call" ? cb::protocol::caps::kReaderPush : cb::protocol::caps::kAll;
  cfg.core.one_round_trip_per_call = mode == "per-call";
  if (mode == "optimized") cfg.core.optimizations = cb::shim::Optimizations::all();
  if (auto err = cfg.core.optimizations.disable(disabled); !err.empty()) {
    std::cerr << "cardbridge-shim: --disable: " << err << "\n";
    return 2;
  }
  if (check_only) {
    std::cout << "cardbridge-shim: options accepted (desk " << link_text
              << (config_file.empty() ? "" : ", configuration " + config_file) << ")\n";
    return 0;
  }
  // Who may be the desk (checked before the first byte): over a UNIX socket this session's
  // user or root (a desk agent or the RDP host's relay); the session's xrdp channel; over TLS
  // the pinned desk; plain TCP only with --insecure-tcp.
  cfg.core.desk_policy.unix_uids = {static_cast<uint32_t>(::geteuid()), 0};
  cfg.core.desk_policy.allow_rdp_channel = true;
  if (!tls.peer_name.empty()) cfg.core.desk_policy.tls_names.push_back(tls.peer_name);
  cfg.core.desk_policy.tls_fingerprints = peer_fingerprints;
  cfg.core.desk_policy.allow_insecure_tcp = insecure_tcp;
  if (insecure_tcp) {
    log->warn("INSECURE: a plain TCP desk link is allowed (--insecure-tcp): card traffic, PINs included, is "
              "neither encrypted nor authenticated");
  }
  cb::shim::ShimService service(io, cfg, link);
  if (auto ok = service.start(); !ok) {
    log->critical("{}", ok.error());
    return 1;
  }
  if (control_path.empty()) control_path = socket_path + ".ctl";
  nlohmann::json info = {{"software", std::string("cardbridge-shim ") + CARDBRIDGE_VERSION},
                         {"pid", ::getpid()},
                         {"uid", ::geteuid()},
                         {"socket", socket_path},
                         {"desk_link", link_text},
                         {"desk_link_insecure", insecure_tcp},
                         {"mode", mode},
                         {"disabled", disabled},
                         {"config", config_file},
                         {"session", cfg.session},
                         {"log_target", cb::journal::target_name(target)}};
  cb::shim::ControlServer control(io, service.core(), info, [&service] {
    nlohmann::json events = nlohmann::json::array();
    for (const auto& e : service.audit_events()) {
      events.push_back({{"time", e.time}, {"pid", e.pid}, {"exe", e.exe}, {"event", e.event}});
    }
    return events;
  });
  if (auto ok = control.start(control_path); !ok) {
    log->critical("control socket: {}", ok.error());
    return 1;
  }
  log->info("cardbridge-shim {} started (desk {}, mode {}{}{})", CARDBRIDGE_VERSION, link_text, mode,
            disabled.empty() ? "" : ", disabled: " + disabled,
            config_file.empty() ? "" : ", configuration " + config_file);

  boost::asio::signal_set signals(io, SIGINT, SIGTERM);
  signals.async_wait([&](boost::system::error_code ec, int sig) {
    if (ec) return;
    log->info("signal {}: stopping", sig);
    control.stop();
    service.stop();
    io.stop();
  });
  ::signal(SIGPIPE, SIG_IGN);
  io.run();
  return 0;
}
