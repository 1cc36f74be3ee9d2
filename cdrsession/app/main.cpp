// cdrsession: CardBridge for the user's session.
//   cdrsession start [--desk SPEC] [--until-pid PID]   start this session's shim (idempotent);
//                                                       prints the PCSCLITE_CSOCK_NAME export
//   cdrsession run   [...]                             the same, in the foreground (systemd)
//   cdrsession stop                                    stop this session's shim
//   cdrsession env                                     print the export line
//   cdrsession status [--json] [--all]                 desk, readers, counters, audit trail
//                                                       (--all: every session of the server; root)
//   cdrsession doctor [--json] [--pkcs11 | --pkcs11-module PATH] [--user NAME [--session KEY]]
//                                                       check the whole chain, name the broken link
//                                                       (and that the PKCS#11 module sees the card);
//                                                       exit 0 ok, 1 warning, 2 critical, 3 unknown
//   cdrsession enable|disable xrdp|systemd             (admin) opt a session type in or out
// Configuration: /etc/cardbridge/server.conf, sections [cdrsession] (this program's options),
// [doctor] and [status] (those subcommands'), and [shim], which the shim reads itself
// (cdrsession starts it with --config naming the same file).
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <syslog.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "cardbridge/config/config_file.hpp"
#include "cardbridge/journal/journal.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/session/control_client.hpp"
#include "cardbridge/session/discovery.hpp"
#include "cardbridge/session/doctor.hpp"
#include "cardbridge/session/session.hpp"
#include "cardbridge/session/supervisor.hpp"

namespace cs = cardbridge::session;

namespace {

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

std::string export_line(const cs::SessionPaths& p) {
  return fmt::format("PCSCLITE_CSOCK_NAME={}; export PCSCLITE_CSOCK_NAME", shell_quote(p.socket));
}

bool shim_answers(const cs::SessionPaths& p) {
  return static_cast<bool>(cs::control_request(p.control, {{"cmd", "status"}}, std::chrono::milliseconds(500)));
}

std::string start_error_line(const std::string& why) {
  return fmt::format("CARDBRIDGE_START_ERROR={}; export CARDBRIDGE_START_ERROR", shell_quote(why));
}

// Runs argv (no shell); its exit status, or -1 when it cannot be run.
int run_program(const std::vector<std::string>& argv) {
  pid_t pid = ::fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

// `cdrsession enable|disable xrdp|systemd`: the admin's explicit opt-in per session type.
//   xrdp:    the marker <etc>/enabled/xrdp that the xrdp session hook (profile.d) requires, and
//            [Channels] CBRIDGE=true in xrdp.ini (through cardbridge-xrdp-config, idempotent):
//            the package itself never edits xrdp's configuration.
//   systemd: the marker <etc>/enabled/systemd (the user unit's ConditionPathExists) and the unit
//            enabled for graphical sessions (systemctl --global).
int set_session_type(bool on, const std::string& kind, const std::string& etc, const std::string& xrdp_ini,
                     const std::string& xrdp_tool) {
  namespace fs = std::filesystem;
  const fs::path marker = fs::path(etc) / "enabled" / kind;
  std::error_code ec;
  if (on) {
    fs::create_directories(marker.parent_path(), ec);
    if (ec) {
      std::cerr << "cdrsession: cannot create " << marker.parent_path() << ": " << ec.message() << "\n";
      return 1;
    }
    if (!fs::exists(marker)) {
      std::ofstream m(marker);
      m << "# Created by `cdrsession enable " << kind << "`; `cdrsession disable " << kind << "` removes it.\n";
      if (!m) {
        std::cerr << "cdrsession: cannot write " << marker << "\n";
        return 1;
      }
      ::chmod(marker.c_str(), 0644);
    }
  } else {
    fs::remove(marker, ec);
    fs::remove(marker.parent_path(), ec);  // only when empty
    fs::remove(marker.parent_path().parent_path(), ec);
  }
  std::cout << fmt::format("CardBridge {} for {} sessions ({})\n", on ? "enabled" : "disabled", kind, marker.string());
  if (kind == "xrdp") {
    if (!fs::exists(xrdp_ini)) {
      std::cout << fmt::format("{} not found (xrdp not installed?): run this command again once xrdp is installed\n",
                               xrdp_ini);
      return 0;
    }
    const bool was = run_program({xrdp_tool, "check", xrdp_ini}) == 0;
    const int rc = run_program({xrdp_tool, on ? "enable" : "disable", xrdp_ini});
    if (rc != 0) {
      std::cerr << fmt::format("cdrsession: {} {} {} failed ({})\n", xrdp_tool, on ? "enable" : "disable", xrdp_ini, rc);
      return 1;
    }
    if (was != on) {
      std::cout << fmt::format("{}: CBRIDGE channel {}; restart xrdp for it to take effect (systemctl restart xrdp)\n",
                               xrdp_ini, on ? "allowed under [Channels]" : "entry removed");
    } else {
      std::cout << fmt::format("{}: CBRIDGE channel already {}\n", xrdp_ini, on ? "allowed" : "absent");
    }
  } else if (::access("/bin/systemctl", X_OK) == 0) {
    const int rc = run_program({"/bin/systemctl", "--global", on ? "enable" : "disable", "cardbridge-session.service"});
    if (rc != 0) {
      std::cerr << "cdrsession: systemctl --global " << (on ? "enable" : "disable") << " failed\n";
      return 1;
    }
  }
  return 0;
}

// A session start that fails must be seen where the admin looks, not only on a stderr that
// the session's start script may send nowhere: the system log (journald picks it up), with
// the user and session.
void log_start_failure(const cs::SessionPaths& p, const std::string& why) {
  const auto line = fmt::format("CardBridge session start failed (uid {}, session {}): {}", ::geteuid(), p.key,
                                cardbridge::log::printable(why));
  if (cardbridge::journal::available()) {
    // Structured, so that monitoring can select it: journalctl -t cdrsession CARDBRIDGE_EVENT=start-failed
    ::setenv("CARDBRIDGE_SESSION", p.key.c_str(), 1);  // (read by the sink: set it first)
    auto sink = cardbridge::journal::make_sink("cdrsession");
    spdlog::logger l("cdrsession.start", sink);
    l.error("{}", line);
    return;
  }
  ::openlog("cdrsession", LOG_PID, LOG_USER);
  ::syslog(LOG_ERR, "%s", line.c_str());
  ::closelog();
}

// `status --all` (root: every user's; others their own): one line block per session.
int status_all(bool json) {
  const auto shims = cs::find_shims();
  nlohmann::json doc = cs::json_head(cs::host_name(), cs::utc_timestamp());
  doc["sessions"] = nlohmann::json::array();
  int unanswered = 0;
  for (const auto& s : shims) {
    nlohmann::json e = {{"user", s.user}, {"uid", s.uid}, {"session", s.session}, {"pid", s.pid},
                        {"socket", s.socket}};
    auto st = cs::control_request(s.control, {{"cmd", "status"}}, std::chrono::seconds(2));
    if (st) {
      e["status"] = *st;
    } else {
      e["error"] = st.error().text;
      ++unanswered;
    }
    doc["sessions"].push_back(std::move(e));
  }
  if (json) {
    std::cout << doc.dump(1) << "\n";
  } else {
    std::cout << fmt::format("{} CardBridge session(s) on {}{}\n", shims.size(), cs::host_name(),
                             ::geteuid() == 0 ? "" : " (yours only: run as root to see every user's)");
    for (const auto& e : doc["sessions"]) {
      std::cout << fmt::format("{} (uid {}) session {}  shim pid {}\n", e.value("user", ""), e.value("uid", 0u),
                               e.value("session", ""), e.value("pid", 0));
      if (!e.contains("status")) {
        std::cout << fmt::format("  not answering: {}\n", e.value("error", ""));
        continue;
      }
      const auto& st = e["status"];
      const auto d = st.value("desk", nlohmann::json::object());
      std::cout << fmt::format("  desk     {} {} ({}){}\n", d.value("connected", false) ? "connected:" : "not connected",
                               cardbridge::log::printable(d.value("name", "")), st.value("desk_link", ""),
                               d.value("pcsc_service", "ok") == "ok" ? "" : ", desk PC/SC service: " + d.value("pcsc_service", ""));
      for (const auto& r : st.value("readers", nlohmann::json::array())) {
        std::cout << fmt::format("  reader   {}  {}  {}\n", cardbridge::log::printable(r.value("name", "")),
                                 r.value("state", ""), r.value("atr", ""));
      }
      std::cout << fmt::format("  programs {} connected, {} card handles\n", st.value("clients", 0), st.value("handles", 0));
    }
  }
  return unanswered ? cs::kExitWarning : cs::kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cdrsession: CardBridge in the user's session (shim lifecycle, status, doctor).\n"
               "Options can also be set in the admin's server.conf: [cdrsession] for these, [doctor] and "
               "[status] for those subcommands' (key = the long option without --)."};
  app.set_version_flag("--version", std::string("cdrsession ") + CARDBRIDGE_VERSION);
  app.require_subcommand(1);
  std::string level = "info";
  std::string log_target = "auto";
  app.add_option("--log-level", level, "trace, debug, info, warn, error")->capture_default_str();
  app.add_option("--log-target", log_target,
                 "auto (the journal when stderr is a journal stream; else stderr), journal, or stderr; a session "
                 "started in the background logs to the journal whenever journald runs")
      ->check(CLI::IsMember({"auto", "journal", "stderr"}))
      ->capture_default_str();
  cardbridge::config::add_config_file(
      app, cardbridge::config::server_dir() + "/" + cardbridge::config::kServerConf,
      {{"cdrsession", ""}, {"doctor", "doctor"}, {"status", "status"}}, {"shim"});

  std::string desk;
  std::string shim_path;
  std::string shim_level;
  int until_pid = 0;
  bool insecure_tcp = false;
  bool json = false;
  int pings = 20;
  cs::DoctorThresholds thresholds;
  std::string socket;

  auto add_start_options = [&](CLI::App* s) {
    s->add_option("--desk", desk, "desk link for the shim (default: detected: xrdp, relay socket, ...)");
    s->add_option("--until-pid", until_pid, "stop the shim when this process (the session leader) exits");
    s->add_option("--shim", shim_path, "path of cardbridge-shim");
    s->add_option("--shim-log-level", shim_level, "the shim's log level (default: server.conf [shim] log-level, else info)");
    s->add_flag("--insecure-tcp", insecure_tcp,
                "let the shim use a plain TCP desk link (unauthenticated: PINs cross in clear; tests and "
                "loopback relays only)");
  };
  auto* start = app.add_subcommand("start", "start this session's shim in the background (idempotent)");
  add_start_options(start);
  auto* run = app.add_subcommand("run", "run this session's shim in the foreground");
  add_start_options(run);
  auto* stop = app.add_subcommand("stop", "stop this session's shim");
  auto* env = app.add_subcommand("env", "print the shell line exporting PCSCLITE_CSOCK_NAME");
  auto* status = app.add_subcommand("status", "show the desk, readers, counters and audit trail");
  status->add_flag("--json", json, "machine-readable output");
  bool all = false;
  status->add_flag("--all", all, "every CardBridge session of this server (root; others see their own)");
  status->add_option("--socket", socket, "shim socket to ask (default: PCSCLITE_CSOCK_NAME, else this session's)");
  std::string kind;
  const std::string etc_dir = cardbridge::config::server_dir();
  std::string xrdp_ini = "/etc/xrdp/xrdp.ini";
  std::string xrdp_tool = "/usr/libexec/cardbridge/cardbridge-xrdp-config";
  auto add_admin_options = [&](CLI::App* s) {
    s->add_option("type", kind, "session type: xrdp or systemd")->required()->check(CLI::IsMember({"xrdp", "systemd"}));
    s->add_option("--xrdp-ini", xrdp_ini, "xrdp's configuration")->capture_default_str();
    s->add_option("--xrdp-config-tool", xrdp_tool, "the helper that edits xrdp.ini")->group("");
  };
  auto* enable = app.add_subcommand("enable", "(admin) start CardBridge in every session of this type; for xrdp, "
                                               "also allow the CBRIDGE channel in xrdp.ini");
  add_admin_options(enable);
  auto* disable = app.add_subcommand("disable", "(admin) undo `enable`");
  add_admin_options(disable);
  auto* doctor = app.add_subcommand("doctor", "check the whole chain and name the first broken link");
  doctor->add_flag("--json", json, "machine-readable output");
  doctor->add_option("--socket", socket, "shim socket to check (default: PCSCLITE_CSOCK_NAME, else this session's)");
  doctor->add_option("--pings", pings, "round trips for the latency probe")->capture_default_str();
  doctor->add_option("--slow-median-ms", thresholds.slow_median_ms, "median round trip above which the link is slow")
      ->capture_default_str();
  doctor->add_option("--slow-p99-ms", thresholds.slow_p99_ms, "p99 round trip above which the link is slow")
      ->capture_default_str();
  std::string for_user;
  std::string for_session;
  std::string atr_list = cs::kAtrListPath;
  doctor->add_option("--user", for_user,
                     "(root, for the helpdesk) check this user's session instead of this process's; the "
                     "environment check then looks at that user's programs");
  doctor->add_option("--session", for_session, "with --user: the session to check when the user has several");
  doctor->add_option("--atr-list", atr_list, "pcsc-tools' ATR list, to name cards CardBridge does not know")
      ->capture_default_str();
  bool pkcs11 = false;
  std::string pkcs11_module;
  doctor->add_flag("--pkcs11", pkcs11,
                   std::string("also check that the Cryptolib CPS (") + cs::kCryptolibModule +
                       ") loads and sees a token in the desk's card");
  doctor->add_option("--pkcs11-module", pkcs11_module,
                     "the same with another PKCS#11 module (the one the published application loads)");
  // Hidden: the doctor's probe, run in a child process (a crashing module cannot take the
  // doctor down). Prints one JSON document.
  auto* probe = app.add_subcommand("pkcs11-probe", "")->group("");
  std::string probe_module;
  probe->add_option("--module", probe_module)->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ConfigError& e) {
    // A mistake in server.conf: a session start must still say why it failed (the xrdp
    // hook exports the reason, the doctor reports it; the system log has it too).
    if (start->parsed()) {
      const std::string why = std::string("configuration: ") + e.what();
      log_start_failure(cs::detect(cs::process_env(), cs::file_exists(), ::geteuid()), why);
      std::cout << start_error_line(why) << "\n";
    }
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  const auto lvl = cardbridge::log::parse_level(level).value_or(spdlog::level::info);
  const auto log_to = *cardbridge::journal::parse_target(log_target);
  cardbridge::journal::init_logging(lvl, "cdrsession", log_to);
  auto log = cardbridge::log::get("cdrsession");
  const std::string config_file = cardbridge::config::file_read(app);
  auto paths = cs::detect(cs::process_env(), cs::file_exists(), ::geteuid());
  // The desk link: --desk, else what the session says (CARDBRIDGE_DESK, an xrdp session, a
  // relay socket); when it says nothing, a `desk` in server.conf [shim] decides (the shim reads it).
  bool pass_desk = true;
  if (!desk.empty()) {
    paths.desk_spec = desk;
  } else if (paths.type == cs::SessionType::kNone && !std::getenv("CARDBRIDGE_DESK") && !config_file.empty() &&
             cardbridge::config::section_has(config_file, "shim", "desk")) {
    pass_desk = false;
  }

  if (*env) {
    std::cout << export_line(paths) << "\n";
    return 0;
  }
  if (*enable || *disable) return set_session_type(static_cast<bool>(*enable), kind, etc_dir, xrdp_ini, xrdp_tool);

  if (*start || *run) {
    if (auto why = cs::prepare_session_dirs(paths, ::geteuid()); !why.empty()) {
      log->error("cannot prepare the session's private directory: {}", why);
      log_start_failure(paths, why);
      if (*start) std::cout << start_error_line(why) << "\n";
      return 1;
    }
    if (shim_answers(paths)) {
      log->info("session '{}' already has a shim on {}", paths.key, paths.socket);
      if (*start) std::cout << export_line(paths) << "\n";
      return 0;
    }
    cs::SupervisorOptions o;
    o.shim = shim_path.empty() ? cs::find_shim() : shim_path;
    o.shim_args = {"--socket", paths.socket};
    if (pass_desk) o.shim_args.insert(o.shim_args.end(), {"--desk", paths.desk_spec});
    // The shim reads the same server.conf ([shim]); what is given here wins over it.
    if (!config_file.empty()) o.shim_args.insert(o.shim_args.end(), {"--config", config_file});
    if (!shim_level.empty()) o.shim_args.insert(o.shim_args.end(), {"--log-level", shim_level});
    if (insecure_tcp) o.shim_args.push_back("--insecure-tcp");
    o.env = {{"CARDBRIDGE_SESSION", paths.key}};
    o.until_pid = until_pid;
    // A typo in server.conf's [shim] section is said here, where the admin looks, not only in
    // the log of a shim that never came up.
    if (auto why = cs::check_shim_options(o); !why.empty()) {
      log->error("{}", why);
      log_start_failure(paths, why);
      if (*start) std::cout << start_error_line(why) << "\n";
      return 1;
    }
    if (*run) return cs::run_supervisor(paths, o);

    // In the background (the xrdp hook): logs go to the journal when journald runs (they
    // outlive the session there), else to files in the session's directory.
    o.log_file = paths.dir + "/shim.log";
    const bool to_journal = log_to != cardbridge::journal::Target::kStderr && cardbridge::journal::available();
    pid_t pid = ::fork();
    if (pid < 0) {
      log->error("fork failed");
      log_start_failure(paths, "fork failed");
      std::cout << start_error_line("fork failed") << "\n";
      return 1;
    }
    if (pid == 0) {
      ::setsid();
      int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
      if (null >= 0) {
        ::dup2(null, 0);
        ::dup2(null, 1);
      }
      ::setenv("CARDBRIDGE_SESSION", paths.key.c_str(), 1);
      int own = to_journal ? cardbridge::journal::open_stream("cdrsession", LOG_INFO) : -1;
      if (own >= 0) {
        ::dup2(own, 2);
        ::close(own);
        ::setenv("JOURNAL_STREAM", cardbridge::journal::stream_variable(2).c_str(), 1);
        o.journal_fd = cardbridge::journal::open_stream("cardbridge-shim", LOG_INFO);
        if (o.journal_fd >= 0) ::fcntl(o.journal_fd, F_SETFD, FD_CLOEXEC);
      } else {
        int logfd = ::open((paths.dir + "/cdrsession.log").c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (logfd >= 0) ::dup2(logfd, 2);
        ::unsetenv("JOURNAL_STREAM");
      }
      cardbridge::journal::init_logging(lvl, "cdrsession", log_to);
      ::_exit(cs::run_supervisor(paths, o));
    }
    // Parent: report once the shim answers.
    for (int i = 0; i < 100; ++i) {
      if (shim_answers(paths)) {
        log->info("session '{}': shim serving {} (desk {})", paths.key, paths.socket, paths.desk_spec);
        std::cout << export_line(paths) << "\n";
        return 0;
      }
      int st = 0;
      if (::waitpid(pid, &st, WNOHANG) == pid) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    const auto why = to_journal ? fmt::format("the shim did not come up; see journalctl -t cardbridge-shim -t cdrsession "
                                              "CARDBRIDGE_SESSION={}", paths.key)
                                : fmt::format("the shim did not come up; see {}/shim.log and {}/cdrsession.log",
                                              paths.dir, paths.dir);
    log->error("{}", why);
    log_start_failure(paths, why);
    std::cout << start_error_line(why) << "\n";
    return 1;
  }

  if (*stop) {
    std::ifstream f(paths.pid_file);
    int pid = 0;
    if (!(f >> pid) || pid <= 0 || ::kill(pid, 0) != 0) {
      log->info("no shim running for session '{}'", paths.key);
      return 0;
    }
    ::kill(pid, SIGTERM);
    // The supervisor removes its pid file on its way out: a supervisor that has exited but is
    // not reaped yet (a zombie, until init gets to it) still answers kill(0).
    auto running = [&] { return ::kill(pid, 0) == 0 && ::access(paths.pid_file.c_str(), F_OK) == 0; };
    for (int i = 0; i < 100 && running(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(30));
    if (running()) {
      log->error("supervisor {} did not stop", pid);
      return 1;
    }
    log->info("session '{}': shim stopped", paths.key);
    return 0;
  }

  const char* csock = std::getenv("PCSCLITE_CSOCK_NAME");
  const std::string target = !socket.empty() ? socket : (csock && *csock ? csock : paths.socket);

  if (*status && all) return status_all(json);
  if (*status) {
    auto s = cs::control_request(target + ".ctl", {{"cmd", "status"}}, std::chrono::seconds(2));
    nlohmann::json head = cs::json_head(cs::host_name(), cs::utc_timestamp());
    if (!s) {
      if (json) {
        head.update(nlohmann::json{{"error", s.error().text}, {"socket", target}});
        std::cout << head.dump(1) << "\n";
      } else {
        std::cout << "no shim answers on " << target << ": " << s.error().text << "\n";
      }
      return cs::kExitUnknown;
    }
    auto a = cs::control_request(target + ".ctl", {{"cmd", "audit"}}, std::chrono::seconds(2));
    nlohmann::json doc = *s;
    doc.update(head);
    doc["audit"] = a ? a->value("events", nlohmann::json::array()) : nlohmann::json::array();
    if (json) {
      std::cout << doc.dump(1) << "\n";
      return 0;
    }
    const auto d = doc.value("desk", nlohmann::json::object());
    std::cout << fmt::format("shim     {} (pid {}) on {}\n", doc.value("software", ""), doc.value("pid", 0), target);
    std::cout << fmt::format("desk     {} {}\n", d.value("connected", false) ? "connected:" : "not connected",
                             cardbridge::log::printable(d.value("name", "")));
    if (d.value("pcsc_service", "ok") != "ok") {
      std::cout << fmt::format("         the desk's PC/SC service fails: {}\n", d.value("pcsc_service", ""));
    }
    for (const auto& r : doc.value("readers", nlohmann::json::array())) {
      std::cout << fmt::format("reader   {}  {}  {}\n", cardbridge::log::printable(r.value("name", "")),
                               r.value("state", ""), r.value("atr", ""));
    }
    const auto st = doc.value("stats", nlohmann::json::object());
    std::cout << fmt::format("traffic  {} requests from programs, {} desk round trips, {} bytes in / {} out\n",
                             st.value("client_requests", 0), st.value("round_trips", 0), st.value("desk_bytes_in", 0),
                             st.value("desk_bytes_out", 0));
    std::cout << "audit\n";
    for (const auto& e : doc["audit"]) {
      std::cout << fmt::format("  {}  {}{}\n", e.value("time", ""), cardbridge::log::printable(e.value("event", "")),
                               e.value("pid", 0) ? fmt::format(" (pid {})", e.value("pid", 0)) : "");
    }
    return 0;
  }

  if (*probe) {
    std::cout << cs::run_pkcs11_probe(probe_module).dump() << std::endl;
    std::_Exit(0);  // no atexit handlers: a module's own cleanup cannot crash the answer away
  }

  if (*doctor) {
    std::optional<std::string> module;
    if (!pkcs11_module.empty()) {
      module = pkcs11_module;
    } else if (pkcs11) {
      module = cs::kCryptolibModule;
    }
    char self[4096];
    const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
    const std::string self_path = n > 0 ? std::string(self, static_cast<std::size_t>(n)) : std::string(argv[0]);
    cs::DoctorFacts facts;
    if (!for_user.empty()) {
      // The helpdesk: root checks a user's session from outside it.
      auto fail = [&](const std::string& why) {
        if (json) {
          auto doc = cs::json_head(cs::host_name(), cs::utc_timestamp());
          doc.update(nlohmann::json{{"verdict", "unknown"}, {"exit_code", cs::kExitUnknown}, {"user", for_user},
                                    {"error", why}});
          std::cout << doc.dump(1) << "\n";
        } else {
          std::cout << "CardBridge doctor: cannot check " << cardbridge::log::printable(for_user) << ": " << why << "\n";
        }
        return cs::kExitUnknown;
      };
      if (::geteuid() != 0) return fail("--user needs root (the shims' control sockets admit their user and root)");
      auto uid = cs::uid_of(for_user);
      if (!uid) return fail("no such user");
      std::vector<cs::RunningShim> mine;
      for (auto& s : cs::find_shims()) {
        if (s.uid == *uid && (for_session.empty() || s.session == for_session)) mine.push_back(std::move(s));
      }
      if (mine.empty()) {
        // No shim: the chain is broken at its first link, which the report names.
        cs::RunningShim none;
        none.session = for_session.empty() ? "none" : for_session;
        none.socket = "";
        none.control = "";
        facts = cs::gather_for_user(for_user, *uid, none, pings, std::nullopt, self_path, atr_list);
      } else if (mine.size() > 1) {
        std::string keys;
        for (const auto& s : mine) keys += (keys.empty() ? "" : ", ") + s.session;
        return fail(fmt::format("{} sessions ({}): choose one with --session", mine.size(), keys));
      } else {
        facts = cs::gather_for_user(for_user, *uid, mine.front(), pings, module, self_path, atr_list);
      }
    } else {
      facts = cs::gather(socket.empty() ? std::nullopt : std::optional<std::string>(socket), pings, module, self_path,
                         atr_list);
    }
    auto report = cs::evaluate(facts, thresholds);
    if (json) {
      std::cout << cs::render_json(report, facts).dump(1) << "\n";
    } else {
      std::cout << cs::render_text(report, facts);
    }
    return report.exit_code;
  }
  return 0;
}
