// cdrsession doctor: checks the chain a published application depends on, in order, and
// names the first broken link with what to do about it. evaluate() is pure (facts in,
// report out); gather() collects the facts from the running system.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cardbridge/session/cards.hpp"
#include "cardbridge/session/control_client.hpp"
#include "cardbridge/session/discovery.hpp"
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
  // The names pcsc-tools' ATR list gives the cards our table does not know (ATR hex ->
  // descriptions).
  std::map<std::string, std::vector<std::string>> atr_list;
  // `doctor --user NAME` (root, for the helpdesk): the user checked, and what that user's
  // programs carry in their environment (instead of this process's).
  std::optional<std::string> for_user;
  int user_programs = 0;              // the user's processes whose environment was read
  int user_programs_with_socket = 0;  // of which with PCSCLITE_CSOCK_NAME = the socket
  // For the JSON document: where and when.
  std::string host;
  std::string timestamp;  // ISO 8601, UTC
};

// [Channels] CBRIDGE=true in an xrdp.ini text (what `cdrsession enable xrdp` sets).
bool xrdp_ini_allows_channel(const std::string& ini_text);

struct DoctorThresholds {
  double slow_median_ms = 50.0;
  double slow_p99_ms = 200.0;
};

enum class CheckResult { kOk, kWarn, kFail, kSkipped };

struct Check {
  // start, environment, shim, user, channel, desk-pcsc, readers, card, card-type, latency, pkcs11
  std::string id;
  std::string title;
  CheckResult result = CheckResult::kSkipped;
  std::string detail;
  std::string advice;  // empty when ok
  // A finer reason for a failure or warning, for monitoring: "xrdp-channel-not-allowed",
  // "desk-no-pcsc-service", "unknown-card", "slow-link", ... (empty when none).
  std::string cause;
};

struct DoctorReport {
  std::vector<Check> checks;
  std::string verdict;          // "healthy", "degraded" (warnings only), "broken"
  std::string first_problem;    // id of the first failed (else warned) check; empty if healthy
  int exit_code = 0;
  nlohmann::json details;       // desk, readers, cards, latency
};

// Exit codes (docs/admin-guide.md), as monitoring systems read them (the Nagios/Icinga plugin
// convention): 0 healthy, 1 degraded (a warning: unknown card, slow link), 2 broken (a check
// failed), 3 unknown (the doctor could not check: no such user, several sessions, not root,
// bad arguments). The check that decided it is in the JSON (`first_problem`, `checks[]`).
inline constexpr int kExitOk = 0;
inline constexpr int kExitWarning = 1;
inline constexpr int kExitCritical = 2;
inline constexpr int kExitUnknown = 3;

// The JSON documents' schema (doctor, status): bumped when a field changes meaning or goes.
inline constexpr int kJsonSchemaVersion = 1;
// {"schema_version", "timestamp" (UTC, ISO 8601), "host"}: the head of every JSON document.
nlohmann::json json_head(const std::string& host, const std::string& timestamp);
std::string utc_timestamp();
std::string host_name();

DoctorReport evaluate(const DoctorFacts& facts, const DoctorThresholds& thresholds = {});
std::string render_text(const DoctorReport& r, const DoctorFacts& facts);
nlohmann::json render_json(const DoctorReport& r, const DoctorFacts& facts);

// |pkcs11_module|: also load that PKCS#11 module (in a child process, "|self| pkcs11-probe")
// and check that it sees a token in the desk's card.
DoctorFacts gather(const std::optional<std::string>& socket_override, int pings,
                   const std::optional<std::string>& pkcs11_module = std::nullopt,
                   const std::string& self = "/proc/self/exe", const std::string& atr_list = kAtrListPath);
// `doctor --user NAME` (root): the facts of |shim|, the shim of |user| (|uid|), with the
// environment of that user's programs in place of this process's. The PKCS#11 probe runs as
// the user.
DoctorFacts gather_for_user(const std::string& user, unsigned uid, const RunningShim& shim, int pings,
                            const std::optional<std::string>& pkcs11_module = std::nullopt,
                            const std::string& self = "/proc/self/exe", const std::string& atr_list = kAtrListPath);

}  // namespace cardbridge::session
