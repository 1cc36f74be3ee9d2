// cdrsession doctor: checks the chain a published application depends on, in order, and
// names the first broken link with what to do about it. evaluate() is pure (facts in,
// report out); gather() collects the facts from the running system.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cardbridge/session/control_client.hpp"
#include "cardbridge/session/doctor_pkcs11.hpp"
#include "cardbridge/session/session.hpp"

namespace cardbridge::session {

struct DoctorFacts {
  SessionPaths session;
  unsigned uid = 0;
  std::optional<std::string> csock_env;  // PCSCLITE_CSOCK_NAME as this process sees it
  std::string socket;                    // the socket checked (env, else the session's)
  bool socket_exists = false;
  bool socket_is_socket = false;
  unsigned socket_owner = 0;
  std::optional<nlohmann::json> status;  // the shim's status document
  std::optional<ControlError> status_error;
  std::optional<nlohmann::json> ping;    // {"median_us","p99_us","count"} or {"error"}
  // CARDBRIDGE_START_ERROR: why the session hook's `cdrsession start` failed (it exports this).
  std::optional<std::string> start_error;
  // xrdp sessions: whether xrdp.ini allows the static channel ([Channels] CBRIDGE=true);
  // nullopt when not an xrdp session or the file cannot be read.
  std::optional<bool> xrdp_channel_allowed;
  std::string xrdp_ini = "/etc/xrdp/xrdp.ini";
  std::optional<Pkcs11Facts> pkcs11;     // only when asked for (--pkcs11, --pkcs11-module)
};

// [Channels] CBRIDGE=true in an xrdp.ini text (what `cdrsession enable xrdp` sets).
bool xrdp_ini_allows_channel(const std::string& ini_text);

struct DoctorThresholds {
  double slow_median_ms = 50.0;
  double slow_p99_ms = 200.0;
};

enum class CheckResult { kOk, kWarn, kFail, kSkipped };

struct Check {
  std::string id;      // environment, shim, user, channel, readers, card, card-type, pkcs11, latency
  std::string title;
  CheckResult result = CheckResult::kSkipped;
  std::string detail;
  std::string advice;  // empty when ok
};

struct DoctorReport {
  std::vector<Check> checks;
  std::string verdict;          // "healthy", "degraded" (warnings only), "broken"
  std::string first_problem;    // id of the first failed (else warned) check; empty if healthy
  int exit_code = 0;
  nlohmann::json details;       // desk, readers, cards, latency
};

// Exit codes (documented in docs/admin-guide.md): 0 healthy, 2 session start or environment, 3 no shim,
// 4 wrong user, 5 no channel, 6 no reader, 7 no card, 8 unknown card, 9 slow link,
// 10 PKCS#11 middleware (docs/middleware.md).
int exit_code_for(const std::string& check_id);

DoctorReport evaluate(const DoctorFacts& facts, const DoctorThresholds& thresholds = {});
std::string render_text(const DoctorReport& r, const DoctorFacts& facts);
nlohmann::json render_json(const DoctorReport& r, const DoctorFacts& facts);

// |pkcs11_module|: also load that PKCS#11 module (in a child process, "|self| pkcs11-probe")
// and check that it sees a token in the desk's card.
DoctorFacts gather(const std::optional<std::string>& socket_override, int pings,
                   const std::optional<std::string>& pkcs11_module = std::nullopt,
                   const std::string& self = "/proc/self/exe");

}  // namespace cardbridge::session
