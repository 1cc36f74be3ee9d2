// cdrsession: CardBridge for the user's session.
//   cdrsession start [--desk SPEC] [--until-pid PID]   start this session's shim (idempotent);
//                                                       prints the PCSCLITE_CSOCK_NAME export
//   cdrsession run   [...]                             the same, in the foreground (systemd)
//   cdrsession stop                                    stop this session's shim
//   cdrsession env                                     print the export line
//   cdrsession status [--json]                         desk, readers, counters, audit trail
//   cdrsession doctor [--json] [--pkcs11 | --pkcs11-module PATH]
//                                                       check the whole chain, name the broken link
//                                                       (and that the PKCS#11 module sees the card)
//   cdrsession enable|disable xrdp|systemd             (admin) opt a session type in or out
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

#include "cardbridge/support/log.hpp"
#include "cardbridge/session/control_client.hpp"
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
  ::openlog("cdrsession", LOG_PID, LOG_USER);
  ::syslog(LOG_ERR, "CardBridge session start failed (uid %u, session %s): %s", ::geteuid(), p.key.c_str(),
           cardbridge::log::printable(why).c_str());
  ::closelog();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cdrsession: CardBridge in the user's session (shim lifecycle, status, doctor)"};
  app.set_version_flag("--version", std::string("cdrsession ") + CARDBRIDGE_VERSION);
  app.require_subcommand(1);
  std::string level = "info";
  app.add_option("--log-level", level, "trace, debug, info, warn, error")->capture_default_str();

  std::string desk;
  std::string shim_path;
  std::string shim_level = "info";
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
    s->add_option("--shim-log-level", shim_level, "the shim's log level")->capture_default_str();
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
  status->add_option("--socket", socket, "shim socket to ask (default: PCSCLITE_CSOCK_NAME, else this session's)");
  std::string kind;
  std::string etc_dir = std::getenv("CARDBRIDGE_ETC") ? std::getenv("CARDBRIDGE_ETC") : "/etc/cardbridge";
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
  CLI11_PARSE(app, argc, argv);

  cardbridge::log::init(cardbridge::log::parse_level(level).value_or(spdlog::level::info), "cdrsession");
  auto log = cardbridge::log::get("cdrsession");
  auto paths = cs::detect(cs::process_env(), cs::file_exists(), ::geteuid());
  if (!desk.empty()) paths.desk_spec = desk;

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
    o.shim_args = {"--socket", paths.socket, "--desk", paths.desk_spec, "--log-level", shim_level};
    if (insecure_tcp) o.shim_args.push_back("--insecure-tcp");
    o.until_pid = until_pid;
    if (*run) return cs::run_supervisor(paths, o);

    o.log_file = paths.dir + "/shim.log";
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
      int logfd = ::open((paths.dir + "/cdrsession.log").c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
      if (null >= 0) {
        ::dup2(null, 0);
        ::dup2(null, 1);
      }
      if (logfd >= 0) ::dup2(logfd, 2);
      cardbridge::log::init(cardbridge::log::parse_level(level).value_or(spdlog::level::info), "cdrsession");
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
    const auto why = fmt::format("the shim did not come up; see {}/shim.log and {}/cdrsession.log", paths.dir, paths.dir);
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

  if (*status) {
    auto s = cs::control_request(target + ".ctl", {{"cmd", "status"}}, std::chrono::seconds(2));
    if (!s) {
      if (json) {
        std::cout << nlohmann::json{{"error", s.error().text}, {"socket", target}}.dump(1) << "\n";
      } else {
        std::cout << "no shim answers on " << target << ": " << s.error().text << "\n";
      }
      return 3;
    }
    auto a = cs::control_request(target + ".ctl", {{"cmd", "audit"}}, std::chrono::seconds(2));
    nlohmann::json doc = *s;
    doc["audit"] = a ? a->value("events", nlohmann::json::array()) : nlohmann::json::array();
    if (json) {
      std::cout << doc.dump(1) << "\n";
      return 0;
    }
    const auto d = doc.value("desk", nlohmann::json::object());
    std::cout << fmt::format("shim     {} (pid {}) on {}\n", doc.value("software", ""), doc.value("pid", 0), target);
    std::cout << fmt::format("desk     {} {}\n", d.value("connected", false) ? "connected:" : "not connected",
                             cardbridge::log::printable(d.value("name", "")));
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
    auto facts = cs::gather(socket.empty() ? std::nullopt : std::optional<std::string>(socket), pings, module,
                            self_path);
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
