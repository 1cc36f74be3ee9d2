#include "cardbridge/session/doctor.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "cardbridge/session/cards.hpp"
#include "cardbridge/support/hex.hpp"
#include "cardbridge/support/log.hpp"

namespace cardbridge::session {

nlohmann::json json_head(const std::string& host, const std::string& timestamp) {
  return {{"schema_version", kJsonSchemaVersion}, {"timestamp", timestamp}, {"host", host}};
}

std::string utc_timestamp() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  struct tm tm {};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "unknown";
  return buf;
}

namespace {

std::string base_name(const std::string& path) {
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// The module's slot for a PC/SC reader: its description is the reader's name, or the start of
// it (PKCS#11 slot descriptions hold 64 characters).
const Pkcs11Slot* slot_for(const Pkcs11Facts& m, const std::string& reader) {
  for (const auto& s : m.slots) {
    if (s.description == reader) return &s;
  }
  for (const auto& s : m.slots) {
    if (s.description.size() >= 16 && reader.rfind(s.description, 0) == 0) return &s;
  }
  return nullptr;
}

Check pkcs11_check(const Pkcs11Facts& m, const nlohmann::json& readers) {
  Check c;
  c.id = "pkcs11";
  c.title = "PKCS#11 middleware";
  const std::string name = base_name(m.module);
  if (!m.exists) {
    c.result = CheckResult::kFail;
    c.detail = fmt::format("module missing: there is no PKCS#11 module at {}", m.module);
    c.advice = m.module == kCryptolibModule
                   ? fmt::format("install the Cryptolib CPS (ANS's CryptolibCPS package puts its module at {}), or "
                                 "name the module the published application loads with --pkcs11-module",
                                 kCryptolibModule)
                   : "check the path given with --pkcs11-module: it must be the module the published application "
                     "(browser) loads";
    return c;
  }
  if (!m.load_error.empty()) {
    c.result = CheckResult::kFail;
    c.detail = fmt::format("{} does not load: {}", name, m.load_error);
    c.advice = fmt::format("the browser cannot use it either: check its dependencies and architecture (ldd {}), "
                           "its configuration and that it runs for this user; reinstall it",
                           m.module);
    return c;
  }
  std::vector<std::string> with_card, all;
  for (const auto& rd : readers) {
    all.push_back(rd.value("name", ""));
    if (rd.value("card_present", false)) with_card.push_back(rd.value("name", ""));
  }
  auto list = [](const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "'" : ", '") + log::printable(x) + "'";
    return s.empty() ? std::string("none") : s;
  };
  std::vector<std::string> slots;
  for (const auto& s : m.slots) slots.push_back(s.description);
  std::string unrecognised;
  for (const auto& r : with_card) {
    const Pkcs11Slot* s = slot_for(m, r);
    if (!s) continue;
    if (s->token_present && s->token_error.empty()) {
      c.result = CheckResult::kOk;
      c.detail = fmt::format("{} sees token '{}' (serial {}) in '{}'", name, log::printable(s->token_label),
                             log::printable(s->token_serial), log::printable(r));
      return c;
    }
    if (unrecognised.empty()) {
      unrecognised = fmt::format("{} sees the card in '{}' but no token ({})", name, log::printable(r),
                                 s->token_present ? s->token_error : "slot reported empty");
    }
  }
  c.result = CheckResult::kFail;
  if (!unrecognised.empty()) {
    c.detail = "card not recognised: " + unrecognised;
    c.advice = "the module does not know this card: the Cryptolib reads CPS3/CPS4 (CPx) cards, a Vitale card "
               "has no PKCS#11 token; a blocked or damaged card shows the same (try it on a local PC with the "
               "same module)";
  } else {
    c.detail = fmt::format("reader not visible to the module: {} lists {} slot(s) ({}), not the desk's {}", name,
                           m.slots.size(), list(slots), list(with_card.empty() ? all : with_card));
    c.advice = "the module does not use the session's PC/SC service: it must load the system libpcsclite with "
               "PCSCLITE_CSOCK_NAME from the session (no bundled PC/SC library, no GALSS or CT-API reader "
               "configuration); check the module's reader settings";
  }
  return c;
}

Check make(std::string id, std::string title) {
  Check c;
  c.id = std::move(id);
  c.title = std::move(title);
  return c;
}

const char* mark(CheckResult r) {
  switch (r) {
    case CheckResult::kOk: return " ok ";
    case CheckResult::kWarn: return "WARN";
    case CheckResult::kFail: return "FAIL";
    case CheckResult::kSkipped: return " -- ";
  }
  return "?";
}

const char* result_name(CheckResult r) {
  switch (r) {
    case CheckResult::kOk: return "ok";
    case CheckResult::kWarn: return "warning";
    case CheckResult::kFail: return "failed";
    case CheckResult::kSkipped: return "skipped";
  }
  return "?";
}

}  // namespace

DoctorReport evaluate(const DoctorFacts& f, const DoctorThresholds& t) {
  DoctorReport r;
  bool blocked = false;  // after a failure, later checks cannot be made
  auto add = [&](Check c) {
    if (blocked) {
      c.result = CheckResult::kSkipped;
      c.detail = "not checked: an earlier link is broken";
      c.advice.clear();
    }
    if (c.result == CheckResult::kFail) blocked = true;
    r.checks.push_back(std::move(c));
  };

  // 0. The session's start (the xrdp hook exports CARDBRIDGE_START_ERROR when it failed).
  if (f.start_error) {
    Check c = make("start", "session start");
    c.cause = "start-failed";
    const bool shim_anyway = f.socket_exists && f.status.has_value();
    if (shim_anyway) {
      c.result = CheckResult::kOk;
      c.detail = fmt::format("the session's start failed ({}), but a shim answers now", log::printable(*f.start_error));
    } else {
      c.result = CheckResult::kFail;
      c.detail = fmt::format("CardBridge could not start at login: {}", log::printable(*f.start_error));
      c.advice = "fix what the message says (the system log has it too: journalctl -t cdrsession), then log in "
                 "again or run `cdrsession start` in the session";
    }
    add(std::move(c));
  }
  // 1. The environment of this process (for `--user`: of that user's programs).
  if (f.for_user) {
    Check c = make("environment", "PCSCLITE_CSOCK_NAME");
    const std::string who = log::printable(*f.for_user);
    if (f.user_programs_with_socket > 0) {
      c.result = CheckResult::kOk;
      c.detail = fmt::format("{} of {}'s {} programs have PCSCLITE_CSOCK_NAME={}", f.user_programs_with_socket, who,
                             f.user_programs, f.socket);
    } else {
      c.result = CheckResult::kWarn;
      c.cause = "no-program-with-socket";
      c.detail = fmt::format("none of {}'s {} programs has PCSCLITE_CSOCK_NAME={}", who, f.user_programs, f.socket);
      c.advice = "programs started before CardBridge, or through a wrapper that drops the environment (sudo, su, "
                 "env -i, setuid programs), use the server's own pcscd: have the user start the published "
                 "application again from the session; check its launcher";
    }
    add(std::move(c));
  } else {
    Check c = make("environment", "PCSCLITE_CSOCK_NAME");
    if (!f.csock_env || f.csock_env->empty()) {
      c.result = CheckResult::kFail;
      c.cause = "not-set";
      c.detail = "PCSCLITE_CSOCK_NAME is not set in this process: PC/SC programs started like this one use "
                 "the server's own pcscd, not the desk's readers";
      c.advice = "start the published application from the user's session where CardBridge exports "
                 "PCSCLITE_CSOCK_NAME (xrdp: the startwm.sh hook; systemd sessions: environment.d); "
                 "check wrappers (sudo, su, env -i, setuid programs) that drop the environment";
    } else {
      c.result = CheckResult::kOk;
      c.detail = fmt::format("PCSCLITE_CSOCK_NAME={} reaches this process", *f.csock_env);
      if (*f.csock_env != f.session.socket) c.detail += fmt::format(" (this session's default is {})", f.session.socket);
    }
    add(std::move(c));
  }
  // 2. A live shim on that socket.
  const bool foreign_socket = f.socket_exists && f.socket_owner != f.uid;
  {
    Check c = make("shim", "CardBridge shim");
    if (!f.socket_exists) {
      c.result = CheckResult::kFail;
      c.detail = f.socket.empty() && f.for_user
                     ? fmt::format("no CardBridge shim runs for {}", log::printable(*f.for_user))
                     : fmt::format("no socket at {}", f.socket);
      c.cause = "not-running";
      c.advice = "the session's shim is not running: run `cdrsession start` in the session (or check that "
                 "the session type is enabled: cdrsession enable xrdp|systemd), then see its log: "
                 "journalctl -t cdrsession -t cardbridge-shim (without journald: the logs in " + f.session.dir + ")";
    } else if (!f.socket_is_socket) {
      c.result = CheckResult::kFail;
      c.detail = fmt::format("{} exists but is not a socket", f.socket);
      c.advice = "remove it and run `cdrsession start`";
    } else if (foreign_socket) {
      c.result = CheckResult::kOk;  // exists; the user check below says whose
      c.detail = "a socket is there";
    } else if (!f.status) {
      c.result = CheckResult::kFail;
      c.detail = fmt::format("the shim does not answer on {}.ctl: {}", f.socket,
                             f.status_error ? f.status_error->text : "no answer");
      c.cause = "not-answering";
      c.advice = "the shim is stuck or dead with a stale socket: run `cdrsession stop; cdrsession start`";
    } else {
      c.result = CheckResult::kOk;
      c.detail = fmt::format("{} (pid {}) serves {}", f.status->value("software", "cardbridge-shim"),
                             f.status->value("pid", 0), f.socket);
    }
    add(std::move(c));
  }
  // 3. Owned by this user.
  {
    Check c = make("user", "owner");
    const unsigned shim_uid = f.status ? f.status->value("uid", f.socket_owner) : f.socket_owner;
    if (foreign_socket || (f.status && shim_uid != f.uid)) {
      c.result = CheckResult::kFail;
      c.cause = "another-users-shim";
      c.detail = fmt::format("the socket belongs to uid {}, this process runs as uid {}: it is another user's "
                             "shim, which refuses us",
                             foreign_socket ? f.socket_owner : shim_uid, f.uid);
      c.advice = "PCSCLITE_CSOCK_NAME points into another user's session: fix the published application's "
                 "environment so that it uses $XDG_RUNTIME_DIR of the user who runs it";
    } else {
      c.result = CheckResult::kOk;
      c.detail = fmt::format("socket and shim belong to uid {} (this user)", f.uid);
    }
    add(std::move(c));
  }
  // 4. The desk on the other side of the channel.
  const nlohmann::json empty = nlohmann::json::object();
  const auto& st = f.status ? *f.status : empty;
  const auto desk = st.value("desk", nlohmann::json::object());
  {
    Check c = make("channel", "desk link");
    if (!desk.value("connected", false)) {
      c.result = CheckResult::kFail;
      c.cause = "no-desk";
      c.detail = fmt::format("no desk is connected ({}; session type {})", st.value("desk_link", "?"),
                             type_name(f.session.type));
      c.advice = "the RDP client must load the CardBridge add-in (xfreerdp /vc:cardbridge, installed in "
                 "FreeRDP's add-in directory); on xrdp, xrdp.ini needs CBRIDGE=true under [Channels]; "
                 "without RDP, start cardbridge-desk at the desk";
      if (f.xrdp_channel_allowed && !*f.xrdp_channel_allowed) {
        c.detail += fmt::format("; {} does not allow the CBRIDGE channel ([Channels] CBRIDGE=true is missing)",
                                f.xrdp_ini);
        c.advice = "as root: `cdrsession enable xrdp` (adds CBRIDGE=true under [Channels] in xrdp.ini), then restart "
                   "xrdp; clients that use the dynamic channel (/dvc:cardbridge) do not need it";
        c.cause = "xrdp-channel-not-allowed";
      }
    } else {
      c.result = CheckResult::kOk;
      c.detail = fmt::format("desk '{}' connected over {} ({}; verified: {})", log::printable(desk.value("name", "")),
                             st.value("desk_link", "?"), log::printable(desk.value("software", "")),
                             log::printable(desk.value("identity", "?")));
      if (st.value("desk_link_insecure", false)) {
        // Works, but anyone who can reach that port can pose as the desk and read PINs.
        c.result = CheckResult::kWarn;
        c.detail += "; the link is plain TCP, neither encrypted nor authenticated (--insecure-tcp)";
        c.advice = "use the RDP channel, a unix: socket on the same machine, or tls: with a pinned desk "
                   "(docs/security.md)";
      }
    }
    add(std::move(c));
  }
  // 5. The desk's own PC/SC service (capability desk-service): without it the desk has no
  // reader to show, and plugging one in would not help.
  {
    Check c = make("desk-pcsc", "desk PC/SC service");
    const std::string service = desk.value("pcsc_service", "ok");
    if (desk.value("capabilities", "").find("desk-service") == std::string::npos) {
      c.result = CheckResult::kOk;
      c.detail = "not reported by this desk (a CardBridge desk without the desk-service capability)";
    } else if (service == "ok") {
      c.result = CheckResult::kOk;
      c.detail = "the desk's pcscd answers";
    } else {
      c.result = CheckResult::kFail;
      c.cause = "desk-no-pcsc-service";
      c.detail = fmt::format("the desk's PC/SC service is not running: the desk gets {} from its own pcscd",
                             log::printable(service));
      c.advice = "at the desk: install and start pcscd (apt install pcscd; systemctl enable --now pcscd.socket) and "
                 "the reader's driver (libccid); the readers then appear by themselves";
    }
    add(std::move(c));
  }
  // 6. Readers, 7. a card, 8. which card.
  const auto readers = st.value("readers", nlohmann::json::array());
  {
    Check c = make("readers", "readers");
    if (readers.empty()) {
      c.result = CheckResult::kFail;
      c.cause = "no-reader";
      c.detail = "the desk shows no reader";
      c.advice = "plug the reader in at the desk and check it there (pcsc_scan); a reader filter in the "
                 "add-in options (readers:...) may hide it";
    } else {
      c.result = CheckResult::kOk;
      std::string names;
      for (const auto& rd : readers) names += (names.empty() ? "" : ", ") + log::printable(rd.value("name", ""));
      c.detail = fmt::format("{}: {}", readers.size(), names);
    }
    add(std::move(c));
  }
  nlohmann::json cards = nlohmann::json::array();
  bool professional = false;
  bool patient = false;  // only patient (Vitale) cards
  std::string card_text;
  for (const auto& rd : readers) {
    if (!rd.value("card_present", false)) continue;
    auto atr = from_hex(rd.value("atr", "")).value_or(std::vector<uint8_t>{});
    auto id = identify_atr(atr);
    professional = professional || id.professional;
    if (id.professional) patient = false;
    if (id.kind == CardKind::kVitale1 || id.kind == CardKind::kVitale2) patient = patient || !professional;
    nlohmann::json card = {{"reader", rd.value("name", "")}, {"atr", rd.value("atr", "")}, {"kind", kind_name(id.kind)},
                           {"label", id.label}, {"professional", id.professional}};
    std::string label = id.label;
    if (id.kind == CardKind::kUnknown) {
      // Named from pcsc-tools' list when it knows the ATR.
      if (auto it = f.atr_list.find(rd.value("atr", "")); it != f.atr_list.end() && !it->second.empty()) {
        label = it->second.front();
        card["label"] = label;
        card["atr_list"] = it->second;
        label += " (pcsc-tools' ATR list)";
      }
    }
    cards.push_back(std::move(card));
    card_text += fmt::format("{}{} in '{}' (ATR {})", card_text.empty() ? "" : "; ", log::printable(label),
                             log::printable(rd.value("name", "")), rd.value("atr", ""));
  }
  {
    Check c = make("card", "card");
    if (cards.empty()) {
      c.result = CheckResult::kFail;
      c.cause = "no-card";
      c.detail = "no card in any reader";
      c.advice = "insert the CPS/CPE card at the desk";
    } else {
      c.result = CheckResult::kOk;
      c.detail = card_text;
    }
    add(std::move(c));
  }
  {
    Check c = make("card-type", "card type");
    if (!professional) {
      c.result = CheckResult::kWarn;
      c.cause = patient ? "patient-card" : "unknown-card";
      c.detail = "no CPx card (CPS3, CPS4, CPS2ter, CPE/CPF) recognised: " + card_text;
      c.advice = "CDR needs the staff member's CPx card; a Vitale card is the patient's";
    } else {
      c.result = CheckResult::kOk;
      c.detail = "a CPx card is present";
    }
    add(std::move(c));
  }
  // 8. Latency.
  {
    Check c = make("latency", "round trip");
    if (!f.ping || f.ping->contains("error")) {
      c.result = CheckResult::kWarn;
      c.cause = "not-measured";
      c.detail = f.ping ? f.ping->value("error", "") : "not measured";
      c.advice = "could not measure the desk round trip";
    } else {
      const double med = f.ping->value("median_us", 0.0) / 1000.0;
      const double p99 = f.ping->value("p99_us", 0.0) / 1000.0;
      c.detail = fmt::format("desk round trip median {:.2f} ms, p99 {:.2f} ms ({} probes)", med, p99,
                             f.ping->value("count", 0));
      if (med > t.slow_median_ms || p99 > t.slow_p99_ms) {
        c.result = CheckResult::kWarn;
        c.cause = "slow-link";
        c.advice = fmt::format("slow link (thresholds: median {:.0f} ms, p99 {:.0f} ms): a CPS login costs about "
                               "10 round trips; check the WAN path between server and desk",
                               t.slow_median_ms, t.slow_p99_ms);
      } else {
        c.result = CheckResult::kOk;
      }
    }
    add(std::move(c));
  }
  // 9. The PKCS#11 middleware, when asked for (last: a slow link does not hide it, nor does a
  // module problem hide the link's latency).
  if (f.pkcs11) add(pkcs11_check(*f.pkcs11, readers));

  for (const auto& c : r.checks) {
    if (c.result == CheckResult::kFail) {
      r.first_problem = c.id;
      break;
    }
  }
  if (r.first_problem.empty()) {
    for (const auto& c : r.checks) {
      if (c.result == CheckResult::kWarn) {
        r.first_problem = c.id;
        break;
      }
    }
  }
  const bool failed = std::any_of(r.checks.begin(), r.checks.end(),
                                  [](const Check& c) { return c.result == CheckResult::kFail; });
  r.verdict = failed ? "broken" : r.first_problem.empty() ? "healthy" : "degraded";
  r.exit_code = failed ? kExitCritical : r.first_problem.empty() ? kExitOk : kExitWarning;
  r.details = {{"desk", desk}, {"readers", readers}, {"cards", cards}, {"latency", f.ping ? *f.ping : nullptr}};
  if (f.pkcs11) {
    nlohmann::json slots = nlohmann::json::array();
    for (const auto& s : f.pkcs11->slots) {
      slots.push_back({{"description", s.description}, {"token_present", s.token_present}, {"token_label", s.token_label},
                       {"token_serial", s.token_serial}, {"token_error", s.token_error}});
    }
    r.details["pkcs11"] = {{"module", f.pkcs11->module}, {"exists", f.pkcs11->exists},
                           {"load_error", f.pkcs11->load_error}, {"slots", slots}};
  }
  return r;
}

std::string render_text(const DoctorReport& r, const DoctorFacts& f) {
  std::string out = f.for_user ? fmt::format("CardBridge doctor: user {}, session '{}' ({}), uid {}\n",
                                             log::printable(*f.for_user), f.session.key, type_name(f.session.type), f.uid)
                               : fmt::format("CardBridge doctor: session '{}' ({}), uid {}\n", f.session.key,
                                             type_name(f.session.type), f.uid);
  for (const auto& c : r.checks) {
    out += fmt::format("  [{}] {:<12} {}\n", mark(c.result), c.id, c.detail);
  }
  if (r.verdict == "healthy") {
    out += "Verdict: HEALTHY: PC/SC programs in this session use the desk's card through CardBridge.\n";
  } else {
    const auto& c = *std::find_if(r.checks.begin(), r.checks.end(), [&](const Check& x) { return x.id == r.first_problem; });
    out += fmt::format("Verdict: {}: {} ({}).\n  What to do: {}\n", r.verdict == "broken" ? "BROKEN" : "DEGRADED",
                       c.title, c.detail, c.advice);
  }
  return out;
}

nlohmann::json render_json(const DoctorReport& r, const DoctorFacts& f) {
  nlohmann::json checks = nlohmann::json::array();
  for (const auto& c : r.checks) {
    checks.push_back({{"id", c.id}, {"title", c.title}, {"result", result_name(c.result)}, {"detail", c.detail},
                      {"advice", c.advice}, {"cause", c.cause.empty() ? nlohmann::json(nullptr) : nlohmann::json(c.cause)}});
  }
  nlohmann::json doc = json_head(f.host, f.timestamp);
  doc.update(nlohmann::json{{"verdict", r.verdict},
          {"first_problem", r.first_problem.empty() ? nlohmann::json(nullptr) : nlohmann::json(r.first_problem)},
          {"exit_code", r.exit_code},
          {"session", {{"type", type_name(f.session.type)}, {"key", f.session.key}, {"uid", f.uid},
                       {"socket", f.socket}, {"pcsclite_csock_name", f.csock_env ? nlohmann::json(*f.csock_env) : nullptr}}},
          {"checks", checks},
          {"desk", r.details["desk"]},
          {"readers", r.details["readers"]},
          {"cards", r.details["cards"]},
          {"latency", r.details["latency"]},
          {"pkcs11", r.details.value("pkcs11", nlohmann::json(nullptr))}});
  if (f.for_user) doc["user"] = *f.for_user;
  return doc;
}

bool xrdp_ini_allows_channel(const std::string& text) {
  bool in_channels = false;
  bool allowed = false;
  std::istringstream in(text);
  std::string line;
  auto trim = [](std::string v) {
    const auto b = v.find_first_not_of(" \t\r");
    const auto e = v.find_last_not_of(" \t\r");
    return b == std::string::npos ? std::string() : v.substr(b, e - b + 1);
  };
  while (std::getline(in, line)) {
    line = trim(line);
    if (line.empty() || line[0] == ';' || line[0] == '#') continue;
    if (line[0] == '[') {
      in_channels = line == "[Channels]";
      continue;
    }
    const auto eq = line.find('=');
    if (!in_channels || eq == std::string::npos) continue;
    if (trim(line.substr(0, eq)) != "CBRIDGE") continue;
    auto v = trim(line.substr(eq + 1));
    std::transform(v.begin(), v.end(), v.begin(), [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
    allowed = v == "true" || v == "yes" || v == "1";  // xrdp's own boolean spellings
  }
  return allowed;
}

namespace {

// Socket, status and latency of the shim on f.socket, as seen by this process (root may ask
// any user's shim: the control socket admits root).
void probe_socket(DoctorFacts& f, int pings) {
  struct stat st {};
  if (::stat(f.socket.c_str(), &st) == 0) {
    f.socket_exists = true;
    f.socket_is_socket = S_ISSOCK(st.st_mode);
    f.socket_owner = st.st_uid;
  } else if (errno == EACCES) {
    // The path runs through a directory we may not search: another user's private runtime
    // directory (0700). The owner of the nearest directory we can see is whose socket it is.
    for (auto dir = std::filesystem::path(f.socket).parent_path(); !dir.empty() && dir != dir.root_path();
         dir = dir.parent_path()) {
      struct stat dst {};
      if (::stat(dir.c_str(), &dst) != 0) continue;
      if (dst.st_uid != f.uid) {
        f.socket_exists = true;
        f.socket_is_socket = true;  // cannot be seen from here; the user check says whose it is
        f.socket_owner = dst.st_uid;
      }
      break;
    }
  }
  if (f.socket_exists && f.socket_owner == f.uid) {
    auto s = control_request(f.socket + ".ctl", {{"cmd", "status"}}, std::chrono::seconds(2));
    if (s) {
      f.status = *s;
    } else {
      f.status_error = s.error();
    }
    if (f.status && f.status->value("desk", nlohmann::json::object()).value("connected", false)) {
      auto p = control_request(f.socket + ".ctl", {{"cmd", "ping"}, {"count", pings}}, std::chrono::seconds(10));
      f.ping = p ? *p : nlohmann::json{{"error", p.error().text}};
    }
  }
}

// The names pcsc-tools' list gives the cards our table does not know.
void name_unknown_cards(DoctorFacts& f, const std::string& atr_list) {
  if (!f.status) return;
  for (const auto& rd : f.status->value("readers", nlohmann::json::array())) {
    if (!rd.value("card_present", false)) continue;
    const std::string hex = rd.value("atr", "");
    auto atr = from_hex(hex).value_or(std::vector<uint8_t>{});
    if (atr.empty() || identify_atr(atr).kind != CardKind::kUnknown || f.atr_list.contains(hex)) continue;
    auto names = describe_from_atr_list(atr, atr_list);
    if (!names.empty()) f.atr_list[hex] = std::move(names);
  }
}

void read_xrdp_ini(DoctorFacts& f) {
  if (f.session.type != SessionType::kXrdp) return;
  std::ifstream ini(f.xrdp_ini);
  if (!ini) return;
  std::stringstream text;
  text << ini.rdbuf();
  f.xrdp_channel_allowed = xrdp_ini_allows_channel(text.str());
}

}  // namespace

DoctorFacts gather(const std::optional<std::string>& socket_override, int pings,
                   const std::optional<std::string>& pkcs11_module, const std::string& self,
                   const std::string& atr_list) {
  DoctorFacts f;
  f.host = host_name();
  f.timestamp = utc_timestamp();
  f.uid = ::geteuid();
  f.session = detect(process_env(), file_exists(), f.uid);
  if (const char* e = std::getenv("CARDBRIDGE_START_ERROR"); e && *e) f.start_error = e;
  read_xrdp_ini(f);
  if (const char* v = std::getenv("PCSCLITE_CSOCK_NAME")) f.csock_env = v;
  f.socket = socket_override ? *socket_override : (f.csock_env && !f.csock_env->empty() ? *f.csock_env : f.session.socket);
  probe_socket(f, pings);
  name_unknown_cards(f, atr_list);
  if (pkcs11_module) f.pkcs11 = probe_pkcs11(self, *pkcs11_module, f.socket, std::chrono::seconds(60));
  return f;
}

DoctorFacts gather_for_user(const std::string& user, unsigned uid, const RunningShim& shim, int pings,
                            const std::optional<std::string>& pkcs11_module, const std::string& self,
                            const std::string& atr_list) {
  DoctorFacts f;
  f.host = host_name();
  f.timestamp = utc_timestamp();
  f.for_user = user;
  f.uid = uid;
  f.socket = shim.socket;
  f.session.key = shim.session;
  f.session.dir = std::filesystem::path(shim.socket).parent_path().string();
  f.session.socket = shim.socket;
  f.session.control = shim.control;
  const auto programs = programs_of(uid, shim.socket);
  f.user_programs = programs.examined;
  f.user_programs_with_socket = programs.with_socket;
  if (!programs.start_errors.empty()) f.start_error = programs.start_errors.front();
  probe_socket(f, pings);
  // The session's kind, from the shim's desk link.
  const std::string link = f.status ? f.status->value("desk_link", "") : "";
  f.session.type = link.starts_with("xrdp")   ? SessionType::kXrdp
                   : link.starts_with("tls:") ? SessionType::kTlsDesk
                   : link.starts_with("unix:") ? SessionType::kFreerdpHost
                                               : SessionType::kNone;
  read_xrdp_ini(f);
  name_unknown_cards(f, atr_list);
  if (pkcs11_module) f.pkcs11 = probe_pkcs11(self, *pkcs11_module, f.socket, std::chrono::seconds(60), uid);
  return f;
}

}  // namespace cardbridge::session
