// cardbridge-desk: the standalone desk agent. Serves the desk's PC/SC readers (through
// the local pcscd, honouring PCSCLITE_CSOCK_NAME) to CardBridge server shims.
// Configuration: /etc/cardbridge/desk.conf, [agent] for this program's options (same names
// as on the command line) and [desk] for the admin's desk policy, which this program's own
// --readers, --deny-readers and --allow-control can only narrow.
#include <sys/un.h>
#include <unistd.h>

#include <iostream>

#include <CLI/CLI.hpp>

#include "desk_server.hpp"
#include "cardbridge/config/config_file.hpp"
#include "cardbridge/desk_config/desk_settings.hpp"
#include "cardbridge/journal/audit.hpp"
#include "cardbridge/journal/journal.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/redact.hpp"
#include "cardbridge/desk_core/policy.hpp"
#include "cardbridge/desk_pcsc/pcsc_card_api.hpp"
#include "cardbridge/desk_runtime/context_budget.hpp"
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
  std::string controls = "pinpad";
  std::string set_attribs = "none";
  bool log_card_data = false;
  std::size_t max_connections = 64;
  std::size_t max_contexts = cb::client::kDefaultContextBudget;
  std::string deny_readers;
  std::string log_target = "auto";
  bool insecure_tcp = false;
  bool no_card_image = false;
  std::vector<std::string> allowed_servers;
  cb::config::add_config_file(app, cb::client::desk_conf_path(), {{"agent", ""}}, {"desk"});
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
  app.add_option("--log-target", log_target,
                 "auto (the journal when stderr is a journal stream, as in the systemd unit; else stderr), "
                 "journal, or stderr")
      ->check(CLI::IsMember({"auto", "journal", "stderr"}))
      ->capture_default_str();
  app.add_option("--name", name, "desk name shown on the server (doctor, audit log); desk.conf [desk] name wins")
      ->capture_default_str();
  app.add_option("--readers", readers,
                 "only expose readers whose name contains one of these (comma-separated; within desk.conf's)");
  app.add_option("--deny-readers", deny_readers, "never expose readers whose name contains one of these");
  app.add_option("--allow-control", controls,
                 "control codes programs may use, comma-separated: pinpad (feature discovery and the "
                 "PIN-pad codes the reader announces), escape (reader escape commands), all, none, "
                 "numbers (n = SCARD_CTL_CODE(n), 0x... = raw); within desk.conf's allow-control")
      ->capture_default_str();
  app.add_option("--allow-set-attrib", set_attribs,
                 "attributes programs may set with SCardSetAttrib: none, all, or attribute ids (0x...)")
      ->capture_default_str();
  app.add_option("--max-connections", max_connections,
                 "server connections served at once (each: two threads and a PC/SC context); more are "
                 "refused")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  app.add_option("--max-contexts", max_contexts,
                 "PC/SC contexts this agent holds at the desk's pcscd, all connections together (pcscd "
                 "serves 200 for every program of the desk); more are refused with SCARD_E_NO_MEMORY")
      ->check(CLI::Range(1, 190))
      ->capture_default_str();
  app.add_flag("--unsafe-log-card-data", log_card_data,
               "diagnostics only: log what the card answers to SELECT/READ BINARY/GET DATA... at debug "
               "level (personal data: the card holder's identity). PINs are never logged");
  app.add_flag("--no-card-image", no_card_image,
               "never read a card's public files ahead of a login (the card image, docs/admin-guide.md)");
  app.add_flag("--insecure-tcp,--insecure-remote-tcp", insecure_tcp,
               "allow plain TCP (tests only: no encryption, and anyone who can reach the port can use the "
               "card; prefer unix:PATH on one machine, tls:HOST:PORT across a network)");
  CLI11_PARSE(app, argc, argv);

  auto lvl = cb::log::parse_level(level);
  if (!lvl) {
    std::cerr << "cardbridge-desk: unknown log level '" << level << "'\n";
    return 2;
  }
  cb::journal::init_logging(*lvl, "cardbridge-desk", *cb::journal::parse_target(log_target));
  cb::audit::set_identifier("cardbridge-desk");
  auto log = cb::log::get("cardbridge.desk");

  // The admin's policy (desk.conf [desk]) encloses this program's own options.
  const std::string conf = cb::config::file_read(app);
  cb::client::DeskSettings admin;
  if (!conf.empty()) {
    auto s = cb::client::load_desk_settings(conf);
    if (!s) {
      std::cerr << "cardbridge-desk: " << s.error() << "\n";
      return 2;
    }
    admin = *s;
  }
  auto admin_policy = cb::client::admin_policy(admin);
  if (!admin_policy) {
    std::cerr << "cardbridge-desk: " << admin_policy.error() << "\n";
    return 2;
  }
  if (!admin.name.empty()) {
    if (app.count("--name") && name != admin.name)
      log->warn("{} sets the desk name '{}': --name '{}' ignored", admin.file, admin.name, name);
    name = admin.name;
  }

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
  auto own = cb::client::connection_policy({readers}, {deny_readers}, controls, set_attribs);
  if (!own) {
    std::cerr << "cardbridge-desk: " << own.error() << "\n";
    return 2;
  }
  cb::redact::set_card_data_logging(log_card_data);

  cb::client::DeskConfig cfg;
  cfg.desk_name = name;
  cfg.software = "cardbridge-desk";
  cfg.capabilities = cb::protocol::caps::kAll;
  cfg.link = ep->to_string();
  cfg.policy = cb::client::Policy::narrowed(*admin_policy, *own);
  cfg.card_image = !no_card_image && admin.card_image;  // desk.conf [desk] card-image = off wins
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
  // Every context of every connection comes out of one budget: the desk's own programs keep
  // their share of pcscd's contexts whatever the servers do.
  cb::client::ContextBudget context_budget(max_contexts);
  cb::client::BudgetedCardApi card_api(cb::client::process_pcsc_card_api(), context_budget);
  cb::client::DeskServer server(io, card_api, cfg, tls_ctx);
  server.set_max_connections(max_connections);
  if (auto ok = server.listen(*ep); !ok) {
    log->critical("{}", ok.error());
    return 1;
  }
  if (ep->kind == cb::transport::Endpoint::Kind::kTcp) {
    log->warn("INSECURE: plain TCP on {}: card traffic is neither encrypted nor authenticated (--insecure-tcp)",
              ep->to_string());
  }
  log->info("cardbridge-desk {} started as '{}'{} (control codes: {}; set-attrib: {}; at most {} connections, {} "
            "PC/SC contexts)",
            CARDBRIDGE_VERSION, name, conf.empty() ? std::string() : " (policy within " + conf + ")",
            cb::client::Policy::describe(own->control_allow), cb::client::Policy::describe(own->set_attrib_allow),
            max_connections, max_contexts);
  if (log_card_data) log->warn("--unsafe-log-card-data: card answers (personal data) are logged at debug level");
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
