// cardbridge-desk: the standalone desk agent. Serves the desk's PC/SC readers (through
// the local pcscd, honouring PCSCLITE_CSOCK_NAME) to CardBridge server shims.
#include <sys/un.h>
#include <unistd.h>

#include <iostream>

#include <CLI/CLI.hpp>

#include "desk_server.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/desk_pcsc/pcsc_card_api.hpp"
#include "cardbridge/desk_runtime/janitor.hpp"

namespace {

std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "desk";
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  namespace cb = cardbridge;
  CLI::App app{"cardbridge-desk: shares this desk's smart-card readers with CardBridge server shims."};
  app.set_version_flag("--version", std::string("cardbridge-desk ") + CARDBRIDGE_VERSION);
  std::string listen_spec;
  std::string level = "info";
  std::string name = host_name();
  std::string readers;
  std::string controls = "all";
  bool insecure_tcp = false;
  std::vector<std::string> allowed_servers;
  cb::transport::TlsConfig tls;
  app.add_option("--listen", listen_spec,
                 "where shims connect: unix:PATH, tcp:127.0.0.1:PORT, or tls:HOST:PORT (mutual TLS 1.3)")
      ->required();
  app.add_option("--tls-cert", tls.certificate, "tls: this desk's certificate (PEM; or $CARDBRIDGE_TLS_CERT)");
  app.add_option("--tls-key", tls.private_key, "tls: its private key (PEM; or $CARDBRIDGE_TLS_KEY)");
  app.add_option("--tls-ca", tls.ca, "tls: CA that signed the servers' certificates (PEM; or $CARDBRIDGE_TLS_CA)");
  app.add_option("--tls-allow-server", allowed_servers,
                 "tls: a server allowed to use this desk: its certificate's name (CN or DNS name) or its "
                 "SHA-256 fingerprint (sha256:HEX); repeat or separate with commas. Required with tls:")
      ->delimiter(',');
  app.add_option("--log-level", level, "trace, debug, info, warn, error, critical or off")->capture_default_str();
  app.add_option("--name", name, "desk name shown on the server (doctor, audit log)")->capture_default_str();
  app.add_option("--readers", readers, "only expose readers whose name contains one of these (comma-separated)");
  app.add_option("--allow-control", controls,
                 "control codes programs may use: all, none, or a list (n = SCARD_CTL_CODE(n), 0x... = raw)")
      ->capture_default_str();
  app.add_flag("--insecure-tcp,--insecure-remote-tcp", insecure_tcp,
               "allow plain TCP (tests only: no encryption, and anyone who can reach the port can use the "
               "card; prefer unix:PATH on one machine, tls:HOST:PORT across a network)");
  CLI11_PARSE(app, argc, argv);

  auto lvl = cb::log::parse_level(level);
  if (!lvl) {
    std::cerr << "cardbridge-desk: unknown log level '" << level << "'\n";
    return 2;
  }
  cb::log::init(*lvl, "cardbridge-desk");
  auto log = cb::log::get("cardbridge.desk");

  auto ep = cb::transport::Endpoint::parse(listen_spec);
  if (!ep) {
    std::cerr << "cardbridge-desk: --listen: " << ep.error() << "\n";
    return 2;
  }
  if (ep->kind == cb::transport::Endpoint::Kind::kTcp && !insecure_tcp) {
    std::cerr << "cardbridge-desk: plain TCP authenticates no one (any local user, or anyone who reaches the "
                 "port, could use the card): use unix:PATH on one machine, tls:HOST:PORT across a network, or "
                 "--insecure-tcp for tests\n";
    return 2;
  }
  cb::transport::TlsContext tls_ctx;
  if (ep->kind == cb::transport::Endpoint::Kind::kTls) {
    tls.fill_from_environment();
    auto ctx = cb::transport::make_tls_context(tls, /*server=*/true);
    if (!ctx) {
      std::cerr << "cardbridge-desk: " << ctx.error() << "\n";
      return 2;
    }
    tls_ctx = *ctx;
    if (allowed_servers.empty()) {
      std::cerr << "cardbridge-desk: tls: needs --tls-allow-server (the servers allowed to use this desk: any "
                 "certificate the CA signed is not enough)\n";
      return 2;
    }
  }
  auto allow = cb::client::Policy::parse_control_allow(controls);
  if (!allow) {
    std::cerr << "cardbridge-desk: --allow-control: " << allow.error() << "\n";
    return 2;
  }

  cb::client::DeskConfig cfg;
  cfg.desk_name = name;
  cfg.software = "cardbridge-desk";
  cfg.capabilities = cb::protocol::caps::kAll;
  cfg.policy.reader_filter = cb::client::Policy::parse_reader_filter(readers);
  cfg.policy.control_allow = *allow;
  // Who may be the server: over a UNIX socket this agent's user or root; over TLS the
  // allowed servers; plain TCP only with --insecure-tcp.
  cfg.server_policy.unix_uids = {static_cast<uint32_t>(::geteuid()), 0};
  for (const auto& a : allowed_servers) {
    if (a.rfind("sha256:", 0) == 0 && !cb::normalize_fingerprint(a)) {
      std::cerr << "cardbridge-desk: --tls-allow-server " << a << ": not a SHA-256 fingerprint (64 hex digits)\n";
      return 2;
    }
    if (cb::normalize_fingerprint(a)) {
      cfg.server_policy.tls_fingerprints.push_back(a);
    } else {
      cfg.server_policy.tls_names.push_back(a);
    }
  }
  cfg.server_policy.allow_insecure_tcp = insecure_tcp;

  boost::asio::io_context io;
  cb::client::DeskServer server(io, cb::client::process_pcsc_card_api(), cfg, tls_ctx);
  if (auto ok = server.listen(*ep); !ok) {
    log->critical("{}", ok.error());
    return 1;
  }
  if (ep->kind == cb::transport::Endpoint::Kind::kTcp) {
    log->warn("INSECURE: plain TCP on {}: card traffic is neither encrypted nor authenticated (--insecure-tcp)",
              ep->to_string());
  }
  log->info("cardbridge-desk {} started as '{}'", CARDBRIDGE_VERSION, name);
  boost::asio::signal_set signals(io, SIGINT, SIGTERM);
  signals.async_wait([&](boost::system::error_code ec, int sig) {
    if (ec) return;
    log->info("signal {}: stopping", sig);
    server.stop();
    io.stop();
  });
  ::signal(SIGPIPE, SIG_IGN);
  io.run();
  // Every connection's runtime releases its PC/SC contexts (the Janitor waits for calls in
  // flight). One still blocked in the desk's pcscd after the grace time (a Connect behind
  // another desk program's transaction) ends with the process.
  if (!cb::client::Janitor::instance().drain(std::chrono::seconds(3))) {
    log->warn("a desk PC/SC call is still blocked; exiting anyway");
    spdlog::shutdown();
    std::_Exit(0);
  }
  return 0;
}
