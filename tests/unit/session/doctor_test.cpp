// cdrsession doctor (cdrsession/lib/include/cardbridge/session/doctor.hpp): evaluate() for the healthy chain and for each
// broken link, in order, with the documented exit codes; render_text() and render_json().
#include "cardbridge/session/doctor.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

namespace cardbridge::session {
namespace {

using nlohmann::json;

constexpr unsigned kUid = 1000;
const char* kCps3 = "3BAC00402A001225006480000310009000";
const char* kVicc = "3B951381018073FF01000B";
const char* kVitale2 = "3B751300004509EA9000";
const std::vector<std::string> kOrder = {"environment", "shim",      "user",    "channel", "desk-pcsc",
                                         "readers",     "card",      "card-type", "latency"};

SessionPaths session_paths() {
  return detect(
      [](const std::string& n) -> std::optional<std::string> {
        if (n == "XDG_RUNTIME_DIR") return std::string("/run/user/1000");
        if (n == "XRDP_SESSION") return std::string("1");
        if (n == "DISPLAY") return std::string(":10");
        return std::nullopt;
      },
      [](const std::string&) { return false; }, kUid);
}

json reader(const std::string& name, const char* atr) {
  return {{"name", name},
          {"state", atr ? "present" : "empty"},
          {"card_present", atr != nullptr},
          {"atr", atr ? atr : ""},
          {"event_count", 1}};
}

DoctorFacts healthy() {
  DoctorFacts f;
  f.session = session_paths();
  f.uid = kUid;
  f.csock_env = f.session.socket;
  f.socket = f.session.socket;
  f.socket_exists = true;
  f.socket_is_socket = true;
  f.socket_owner = kUid;
  f.status = json{{"software", "cardbridge-shim 0.1.0"},
                  {"pid", 4321},
                  {"uid", kUid},
                  {"socket", f.session.socket},
                  {"desk_link", "xrdp:static"},
                  {"desk", {{"connected", true}, {"name", "ACCUEIL-07"}, {"software", "cardbridge-client"}}},
                  {"readers", json::array({reader("Desk A Reader 00 00", kCps3), reader("Desk A Reader 00 01", nullptr)})}};
  f.ping = json{{"median_us", 850.0}, {"p99_us", 1500.0}, {"count", 20}};
  return f;
}

const Check& check(const DoctorReport& r, const std::string& id) {
  auto it = std::find_if(r.checks.begin(), r.checks.end(), [&](const Check& c) { return c.id == id; });
  if (it == r.checks.end()) throw std::runtime_error("no check " + id);
  return *it;
}

std::vector<std::string> ids(const DoctorReport& r) {
  std::vector<std::string> out;
  for (const auto& c : r.checks) out.push_back(c.id);
  return out;
}

// Every check before |id| ok, |id| with |result|, every later one skipped (after a failure).
void expect_broken_at(const DoctorReport& r, const std::string& id, int exit_code) {
  EXPECT_EQ(ids(r), kOrder);
  EXPECT_EQ(r.verdict, "broken");
  EXPECT_EQ(r.first_problem, id);
  EXPECT_EQ(r.exit_code, exit_code);
  bool after = false;
  for (const auto& c : r.checks) {
    SCOPED_TRACE(c.id);
    if (c.id == id) {
      EXPECT_EQ(c.result, CheckResult::kFail);
      EXPECT_FALSE(c.detail.empty());
      EXPECT_FALSE(c.advice.empty()) << "a failed check must say what to do";
      after = true;
    } else if (after) {
      EXPECT_EQ(c.result, CheckResult::kSkipped);
      EXPECT_TRUE(c.advice.empty());
    } else {
      EXPECT_EQ(c.result, CheckResult::kOk) << c.detail;
    }
  }
}

bool contains(const std::string& hay, const std::string& needle) { return hay.find(needle) != std::string::npos; }

// ---- exit codes -------------------------------------------------------------------------------

TEST(DoctorExitCodes, MonitoringConvention) {
  // The Nagios/Icinga plugin convention, documented in docs/admin-guide.md.
  EXPECT_EQ(kExitOk, 0);
  EXPECT_EQ(kExitWarning, 1);
  EXPECT_EQ(kExitCritical, 2);
  EXPECT_EQ(kExitUnknown, 3);
}

// ---- verdicts -----------------------------------------------------------------------------------

TEST(DoctorEvaluate, Healthy) {
  const auto f = healthy();
  const auto r = evaluate(f);
  EXPECT_EQ(ids(r), kOrder);
  EXPECT_EQ(r.verdict, "healthy");
  EXPECT_EQ(r.first_problem, "");
  EXPECT_EQ(r.exit_code, 0);
  for (const auto& c : r.checks) {
    SCOPED_TRACE(c.id);
    EXPECT_EQ(c.result, CheckResult::kOk) << c.detail;
    EXPECT_TRUE(c.advice.empty());
  }
  EXPECT_TRUE(contains(check(r, "channel").detail, "ACCUEIL-07"));
  EXPECT_TRUE(contains(check(r, "readers").detail, "Desk A Reader 00 00"));
  EXPECT_TRUE(contains(check(r, "card").detail, "CPS3"));
  EXPECT_TRUE(contains(check(r, "latency").detail, "median 0.85 ms"));  // 850 us
  EXPECT_TRUE(contains(check(r, "latency").detail, "p99 1.50 ms"));
  ASSERT_EQ(r.details["cards"].size(), 1u);
  EXPECT_EQ(r.details["cards"][0]["kind"], "cps3");
  EXPECT_EQ(r.details["cards"][0]["label"], "CPS3");
  EXPECT_EQ(r.details["cards"][0]["reader"], "Desk A Reader 00 00");
  EXPECT_EQ(r.details["cards"][0]["atr"], kCps3);
  EXPECT_EQ(r.details["cards"][0]["professional"], true);
  EXPECT_EQ(r.details["desk"]["name"], "ACCUEIL-07");
}

TEST(DoctorEvaluate, EnvironmentNotSet) {
  auto f = healthy();
  f.csock_env.reset();
  auto r = evaluate(f);
  expect_broken_at(r, "environment", kExitCritical);
  EXPECT_TRUE(contains(check(r, "environment").detail, "not set"));
  EXPECT_TRUE(contains(check(r, "shim").detail, "not checked"));
  f.csock_env = "";  // set but empty: the same for libpcsclite
  r = evaluate(f);
  expect_broken_at(r, "environment", kExitCritical);
}

TEST(DoctorEvaluate, EnvironmentPointingElsewhereIsReportedButAccepted) {
  auto f = healthy();
  f.csock_env = "/run/user/1000/cardbridge/other/pcscd.comm";
  f.socket = *f.csock_env;
  const auto r = evaluate(f);
  EXPECT_EQ(r.verdict, "healthy");
  EXPECT_TRUE(contains(check(r, "environment").detail, "/run/user/1000/cardbridge/other/pcscd.comm"));
  EXPECT_TRUE(contains(check(r, "environment").detail, f.session.socket)) << "the session's default is named";
}

TEST(DoctorEvaluate, NoShim) {
  auto f = healthy();
  f.socket_exists = false;
  f.socket_is_socket = false;
  f.status.reset();
  f.ping.reset();
  auto r = evaluate(f);
  expect_broken_at(r, "shim", kExitCritical);
  EXPECT_TRUE(contains(check(r, "shim").detail, f.socket));
  EXPECT_TRUE(contains(check(r, "shim").advice, "cdrsession start"));
}

TEST(DoctorEvaluate, NotASocket) {
  auto f = healthy();
  f.socket_is_socket = false;
  f.status.reset();
  const auto r = evaluate(f);
  expect_broken_at(r, "shim", kExitCritical);
  EXPECT_TRUE(contains(check(r, "shim").detail, "not a socket"));
}

TEST(DoctorEvaluate, StaleSocketWithoutAnswer) {
  auto f = healthy();
  f.status.reset();
  f.ping.reset();
  f.status_error = ControlError{ControlError::kRefused, "connect: Connection refused"};
  const auto r = evaluate(f);
  expect_broken_at(r, "shim", kExitCritical);
  EXPECT_TRUE(contains(check(r, "shim").detail, "Connection refused"));
  EXPECT_TRUE(contains(check(r, "shim").advice, "cdrsession stop"));
}

TEST(DoctorEvaluate, WrongUserBySocketOwner) {
  auto f = healthy();
  f.socket_owner = 1001;  // gather() does not ask another user's shim
  f.status.reset();
  f.ping.reset();
  const auto r = evaluate(f);
  expect_broken_at(r, "user", kExitCritical);
  EXPECT_TRUE(contains(check(r, "user").detail, "1001"));
  EXPECT_TRUE(contains(check(r, "user").detail, "1000"));
}

TEST(DoctorEvaluate, WrongUserByTheShimsOwnWord) {
  auto f = healthy();
  (*f.status)["uid"] = 0;  // socket ours, but the shim behind it runs as someone else
  const auto r = evaluate(f);
  expect_broken_at(r, "user", kExitCritical);
}

TEST(DoctorEvaluate, NoChannel) {
  auto f = healthy();
  (*f.status)["desk"] = {{"connected", false}, {"name", ""}, {"software", ""}};
  f.ping.reset();
  const auto r = evaluate(f);
  expect_broken_at(r, "channel", kExitCritical);
  EXPECT_TRUE(contains(check(r, "channel").detail, "xrdp:static")) << "names the desk link";
  EXPECT_TRUE(contains(check(r, "channel").detail, "xrdp")) << "names the session type";
  EXPECT_TRUE(contains(check(r, "channel").advice, "CBRIDGE"));
}

TEST(DoctorEvaluate, NoReader) {
  auto f = healthy();
  (*f.status)["readers"] = json::array();
  const auto r = evaluate(f);
  expect_broken_at(r, "readers", kExitCritical);
  EXPECT_TRUE(r.details["readers"].empty());
}

TEST(DoctorEvaluate, NoCard) {
  auto f = healthy();
  (*f.status)["readers"] = json::array({reader("Desk A Reader 00 00", nullptr), reader("Desk A Reader 00 01", nullptr)});
  const auto r = evaluate(f);
  expect_broken_at(r, "card", kExitCritical);
  EXPECT_TRUE(r.details["cards"].empty());
  EXPECT_TRUE(contains(check(r, "readers").detail, "2: Desk A Reader 00 00, Desk A Reader 00 01"));
}

TEST(DoctorEvaluate, UnknownCardIsAWarning) {
  auto f = healthy();
  (*f.status)["readers"] = json::array({reader("Desk A Reader 00 00", kVicc)});
  const auto r = evaluate(f);
  EXPECT_EQ(r.verdict, "degraded");
  EXPECT_EQ(r.first_problem, "card-type");
  EXPECT_EQ(r.exit_code, kExitWarning);
  EXPECT_EQ(check(r, "card").result, CheckResult::kOk);
  EXPECT_EQ(check(r, "card-type").result, CheckResult::kWarn);
  EXPECT_FALSE(check(r, "card-type").advice.empty());
  EXPECT_EQ(check(r, "latency").result, CheckResult::kOk) << "a warning does not stop the later checks";
  EXPECT_TRUE(contains(check(r, "card").detail, "unknown card"));
  EXPECT_TRUE(contains(check(r, "card").detail, kVicc));
  EXPECT_EQ(r.details["cards"][0]["kind"], "unknown");
  EXPECT_EQ(r.details["cards"][0]["professional"], false);
}

TEST(DoctorEvaluate, VitaleAloneIsNotACpxCard) {
  auto f = healthy();
  (*f.status)["readers"] = json::array({reader("Bi-slot 00 00", kVitale2)});
  const auto r = evaluate(f);
  EXPECT_EQ(r.exit_code, kExitWarning);
  EXPECT_EQ(r.details["cards"][0]["kind"], "vitale2");
  EXPECT_TRUE(contains(check(r, "card-type").advice, "Vitale"));
}

TEST(DoctorEvaluate, CpsNextToAVitaleIsHealthy) {
  auto f = healthy();
  (*f.status)["readers"] =
      json::array({reader("Bi-slot 00 00", kVitale2), reader("Bi-slot 00 01", kCps3)});
  const auto r = evaluate(f);
  EXPECT_EQ(r.verdict, "healthy");
  EXPECT_EQ(r.exit_code, 0);
  ASSERT_EQ(r.details["cards"].size(), 2u);
  EXPECT_EQ(r.details["cards"][0]["kind"], "vitale2");
  EXPECT_EQ(r.details["cards"][1]["kind"], "cps3");
}

TEST(DoctorEvaluate, SlowLinkByMedian) {
  auto f = healthy();
  f.ping = json{{"median_us", 82000.0}, {"p99_us", 95000.0}, {"count", 20}};
  const auto r = evaluate(f);
  EXPECT_EQ(r.verdict, "degraded");
  EXPECT_EQ(r.first_problem, "latency");
  EXPECT_EQ(r.exit_code, kExitWarning);
  EXPECT_EQ(check(r, "latency").result, CheckResult::kWarn);
  EXPECT_TRUE(contains(check(r, "latency").detail, "median 82.00 ms"));
  EXPECT_TRUE(contains(check(r, "latency").detail, "p99 95.00 ms"));
  EXPECT_TRUE(contains(check(r, "latency").advice, "50 ms"));
}

TEST(DoctorEvaluate, SlowLinkByTail) {
  auto f = healthy();
  f.ping = json{{"median_us", 2000.0}, {"p99_us", 250000.0}, {"count", 100}};
  EXPECT_EQ(evaluate(f).exit_code, kExitWarning);
  f.ping = json{{"median_us", 50000.0}, {"p99_us", 200000.0}, {"count", 100}};  // at the limits: still ok
  EXPECT_EQ(evaluate(f).exit_code, 0);
}

TEST(DoctorEvaluate, ThresholdsAreConfigurable) {
  auto f = healthy();
  f.ping = json{{"median_us", 20000.0}, {"p99_us", 30000.0}, {"count", 20}};
  EXPECT_EQ(evaluate(f).exit_code, 0);
  DoctorThresholds strict;
  strict.slow_median_ms = 10;
  const auto r = evaluate(f, strict);
  EXPECT_EQ(r.exit_code, kExitWarning);
  EXPECT_TRUE(contains(check(r, "latency").advice, "median 10 ms"));
  DoctorThresholds tail;
  tail.slow_p99_ms = 25;
  EXPECT_EQ(evaluate(f, tail).exit_code, kExitWarning);
}

TEST(DoctorEvaluate, FirstWarningWins) {
  auto f = healthy();
  (*f.status)["readers"] = json::array({reader("Desk A Reader 00 00", kVicc)});
  f.ping = json{{"median_us", 82000.0}, {"p99_us", 95000.0}, {"count", 20}};
  const auto r = evaluate(f);
  EXPECT_EQ(r.first_problem, "card-type");
  EXPECT_EQ(r.exit_code, kExitWarning);
  EXPECT_EQ(check(r, "latency").result, CheckResult::kWarn);
}

TEST(DoctorEvaluate, UnmeasuredLatencyIsAWarningWithTheReason) {
  auto f = healthy();
  f.ping = json{{"error", "desk not connected"}, {"count", 3}};
  auto r = evaluate(f);
  EXPECT_EQ(check(r, "latency").result, CheckResult::kWarn);
  EXPECT_TRUE(contains(check(r, "latency").detail, "desk not connected"));
  EXPECT_EQ(r.verdict, "degraded");
}

// ---- rendering -----------------------------------------------------------------------------------

TEST(DoctorRenderText, Healthy) {
  const auto f = healthy();
  const auto text = render_text(evaluate(f), f);
  EXPECT_TRUE(contains(text, "session 'xrdp-10' (xrdp), uid 1000")) << text;
  for (const auto& id : kOrder) EXPECT_TRUE(contains(text, "[ ok ] " + id)) << id << "\n" << text;
  EXPECT_TRUE(contains(text, "Verdict: HEALTHY")) << text;
  EXPECT_TRUE(contains(text, "ACCUEIL-07")) << text;
  EXPECT_TRUE(contains(text, "CPS3 in 'Desk A Reader 00 00' (ATR " + std::string(kCps3) + ")")) << text;
  EXPECT_FALSE(contains(text, "What to do")) << text;
}

TEST(DoctorRenderText, BrokenNamesTheLinkAndWhatToDo) {
  struct Case {
    const char* id;
    std::function<void(DoctorFacts&)> breakit;
    const char* verdict;
  };
  const std::vector<Case> cases = {
      {"environment", [](DoctorFacts& f) { f.csock_env.reset(); }, "BROKEN"},
      {"shim", [](DoctorFacts& f) { f.socket_exists = false; f.status.reset(); }, "BROKEN"},
      {"user", [](DoctorFacts& f) { f.socket_owner = 1001; f.status.reset(); }, "BROKEN"},
      {"channel", [](DoctorFacts& f) { (*f.status)["desk"]["connected"] = false; }, "BROKEN"},
      {"readers", [](DoctorFacts& f) { (*f.status)["readers"] = json::array(); }, "BROKEN"},
      {"card", [](DoctorFacts& f) { (*f.status)["readers"] = json::array({reader("R 00 00", nullptr)}); }, "BROKEN"},
      {"card-type", [](DoctorFacts& f) { (*f.status)["readers"] = json::array({reader("R 00 00", kVicc)}); },
       "DEGRADED"},
      {"latency", [](DoctorFacts& f) { f.ping = json{{"median_us", 90000.0}, {"p99_us", 99000.0}, {"count", 5}}; },
       "DEGRADED"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.id);
    auto f = healthy();
    c.breakit(f);
    const auto r = evaluate(f);
    const auto text = render_text(r, f);
    const auto& bad = check(r, c.id);
    EXPECT_TRUE(contains(text, std::string("Verdict: ") + c.verdict + ": " + bad.title)) << text;
    EXPECT_TRUE(contains(text, "What to do: " + bad.advice)) << text;
    EXPECT_TRUE(contains(text, std::string(r.verdict == "broken" ? "[FAIL] " : "[WARN] ") + c.id)) << text;
    if (r.verdict == "broken" && std::string(c.id) != "latency") {
      EXPECT_TRUE(contains(text, "[ -- ] latency")) << text;
    }
  }
}

TEST(DoctorRenderText, PeerTextIsEscaped) {
  auto f = healthy();
  (*f.status)["desk"]["name"] = "EVIL\x1b]0;pwned\x07\nVerdict: HEALTHY";
  (*f.status)["readers"][0]["name"] = "R\x1b[2J 00 00";
  const auto text = render_text(evaluate(f), f);
  EXPECT_FALSE(contains(text, "\x1b")) << "terminal escapes from the desk reach the admin's terminal";
  // Only the real verdict line starts a line with "Verdict:".
  std::size_t lines = 0;
  for (std::size_t pos = 0; (pos = text.find("\nVerdict:", pos)) != std::string::npos; ++pos) ++lines;
  EXPECT_EQ(lines, 1u) << text;
}

TEST(DoctorRenderJson, Healthy) {
  const auto f = healthy();
  const auto j = render_json(evaluate(f), f);
  EXPECT_EQ(j["verdict"], "healthy");
  EXPECT_TRUE(j["first_problem"].is_null());
  EXPECT_EQ(j["exit_code"], 0);
  EXPECT_EQ(j["session"]["type"], "xrdp");
  EXPECT_EQ(j["session"]["key"], "xrdp-10");
  EXPECT_EQ(j["session"]["uid"], kUid);
  EXPECT_EQ(j["session"]["socket"], f.socket);
  EXPECT_EQ(j["session"]["pcsclite_csock_name"], f.session.socket);
  ASSERT_EQ(j["checks"].size(), kOrder.size());
  for (std::size_t i = 0; i < kOrder.size(); ++i) {
    EXPECT_EQ(j["checks"][i]["id"], kOrder[i]);
    EXPECT_EQ(j["checks"][i]["result"], "ok");
    EXPECT_EQ(j["checks"][i]["advice"], "");
    EXPECT_FALSE(j["checks"][i]["title"].get<std::string>().empty());
  }
  EXPECT_EQ(j["desk"]["name"], "ACCUEIL-07");
  EXPECT_EQ(j["desk"]["connected"], true);
  ASSERT_EQ(j["readers"].size(), 2u);
  ASSERT_EQ(j["cards"].size(), 1u);
  EXPECT_EQ(j["cards"][0]["kind"], "cps3");
  EXPECT_EQ(j["latency"]["median_us"], 850.0);
  EXPECT_EQ(j["latency"]["p99_us"], 1500.0);
  // Round trip through text: what a monitoring script parses.
  EXPECT_EQ(json::parse(j.dump(1)), j);
}

TEST(DoctorRenderJson, Broken) {
  auto f = healthy();
  f.csock_env.reset();
  const auto j = render_json(evaluate(f), f);
  EXPECT_EQ(j["verdict"], "broken");
  EXPECT_EQ(j["first_problem"], "environment");
  EXPECT_EQ(j["exit_code"], 2);
  EXPECT_TRUE(j["session"]["pcsclite_csock_name"].is_null());
  EXPECT_EQ(j["checks"][0]["result"], "failed");
  EXPECT_FALSE(j["checks"][0]["advice"].get<std::string>().empty());
  for (std::size_t i = 1; i < kOrder.size(); ++i) EXPECT_EQ(j["checks"][i]["result"], "skipped");
}

TEST(DoctorRenderJson, DegradedAndWarnings) {
  auto f = healthy();
  f.ping = json{{"median_us", 82000.0}, {"p99_us", 95000.0}, {"count", 20}};
  const auto j = render_json(evaluate(f), f);
  EXPECT_EQ(j["verdict"], "degraded");
  EXPECT_EQ(j["first_problem"], "latency");
  EXPECT_EQ(j["exit_code"], kExitWarning);
  EXPECT_EQ(j["checks"][8]["result"], "warning");
  EXPECT_EQ(j["latency"]["median_us"], 82000.0);
}

TEST(DoctorRenderJson, NoShimHasNullLatencyAndEmptyLists) {
  auto f = healthy();
  f.socket_exists = false;
  f.status.reset();
  f.ping.reset();
  const auto j = render_json(evaluate(f), f);
  EXPECT_EQ(j["exit_code"], kExitCritical);
  EXPECT_TRUE(j["latency"].is_null());
  EXPECT_TRUE(j["readers"].empty());
  EXPECT_TRUE(j["cards"].empty());
}

// ---- issue 10: the helpdesk's doctor -------------------------------------------------------------

TEST(DoctorEvaluate, DeskWithoutPcscServiceIsNamedAsSuch) {
  auto f = healthy();
  (*f.status)["desk"]["capabilities"] = "reader-push,desk-service";
  (*f.status)["desk"]["pcsc_service"] = "SCARD_E_NO_SERVICE";
  (*f.status)["readers"] = json::array();
  const auto r = evaluate(f);
  expect_broken_at(r, "desk-pcsc", kExitCritical);
  EXPECT_EQ(check(r, "desk-pcsc").cause, "desk-no-pcsc-service");
  EXPECT_TRUE(contains(check(r, "desk-pcsc").detail, "SCARD_E_NO_SERVICE"));
  EXPECT_TRUE(contains(check(r, "desk-pcsc").advice, "pcscd"));
  EXPECT_FALSE(contains(check(r, "desk-pcsc").advice, "plug the reader"));
  EXPECT_EQ(check(r, "readers").result, CheckResult::kSkipped) << "no 'plug the reader in' for a missing pcscd";
}

TEST(DoctorEvaluate, DeskPcscServiceOkWhenAnnouncedAndAnswering) {
  auto f = healthy();
  (*f.status)["desk"]["capabilities"] = "reader-push,desk-service";
  (*f.status)["desk"]["pcsc_service"] = "ok";
  EXPECT_EQ(evaluate(f).exit_code, kExitOk);
  // An older desk (no desk-service capability) says nothing: no verdict on its pcscd.
  (*f.status)["desk"]["capabilities"] = "reader-push";
  (*f.status)["desk"]["pcsc_service"] = "SCARD_E_NO_SERVICE";
  EXPECT_EQ(check(evaluate(f), "desk-pcsc").result, CheckResult::kOk);
}

TEST(DoctorEvaluate, MissingXrdpChannelEntryHasItsCause) {
  auto f = healthy();
  (*f.status)["desk"] = {{"connected", false}, {"name", ""}, {"software", ""}};
  f.ping.reset();
  f.xrdp_channel_allowed = false;
  const auto r = evaluate(f);
  expect_broken_at(r, "channel", kExitCritical);
  EXPECT_EQ(check(r, "channel").cause, "xrdp-channel-not-allowed");
  EXPECT_TRUE(contains(check(r, "channel").advice, "cdrsession enable xrdp"));
  f.xrdp_channel_allowed = true;
  EXPECT_EQ(check(evaluate(f), "channel").cause, "no-desk");
}

TEST(DoctorEvaluate, CausesOfWarnings) {
  auto f = healthy();
  (*f.status)["readers"] = json::array({reader("Desk A Reader 00 00", kVicc)});
  EXPECT_EQ(check(evaluate(f), "card-type").cause, "unknown-card");
  (*f.status)["readers"] = json::array({reader("Desk A Reader 00 00", kVitale2)});
  EXPECT_EQ(check(evaluate(f), "card-type").cause, "patient-card");
  f = healthy();
  f.ping = json{{"median_us", 82000.0}, {"p99_us", 95000.0}, {"count", 20}};
  EXPECT_EQ(check(evaluate(f), "latency").cause, "slow-link");
}

TEST(DoctorEvaluate, UnknownCardNamedFromPcscToolsList) {
  auto f = healthy();
  (*f.status)["readers"] = json::array({reader("Desk A Reader 00 00", kVicc)});
  f.atr_list[kVicc] = {"Virtual smart card (vsmartcard)", "second line"};
  const auto r = evaluate(f);
  EXPECT_EQ(r.exit_code, kExitWarning) << "still not a CPx card";
  EXPECT_TRUE(contains(check(r, "card").detail, "Virtual smart card (vsmartcard) (pcsc-tools' ATR list)"));
  EXPECT_EQ(r.details["cards"][0]["label"], "Virtual smart card (vsmartcard)");
  EXPECT_EQ(r.details["cards"][0]["atr_list"].size(), 2u);
  EXPECT_EQ(r.details["cards"][0]["kind"], "unknown");
}

TEST(DoctorEvaluate, FailedStartIsNamedFirst) {
  auto f = healthy();
  f.start_error = "cannot create a private directory /run/user/1000/cardbridge/xrdp-10";
  f.socket_exists = false;
  f.status.reset();
  f.ping.reset();
  const auto r = evaluate(f);
  EXPECT_EQ(r.first_problem, "start");
  EXPECT_EQ(r.exit_code, kExitCritical);
  EXPECT_EQ(check(r, "start").result, CheckResult::kFail);
  EXPECT_EQ(check(r, "start").cause, "start-failed");
  EXPECT_TRUE(contains(check(r, "start").detail, "cannot create a private directory"));
}

TEST(DoctorEvaluate, ForUserLooksAtTheUsersPrograms) {
  auto f = healthy();
  f.csock_env.reset();  // root's own environment does not matter
  f.for_user = "alice";
  f.user_programs = 7;
  f.user_programs_with_socket = 3;
  auto r = evaluate(f);
  EXPECT_EQ(r.exit_code, kExitOk);
  EXPECT_TRUE(contains(check(r, "environment").detail, "3 of alice's 7 programs"));
  f.user_programs_with_socket = 0;
  r = evaluate(f);
  EXPECT_EQ(check(r, "environment").result, CheckResult::kWarn);
  EXPECT_EQ(check(r, "environment").cause, "no-program-with-socket");
  EXPECT_EQ(r.exit_code, kExitWarning);
  EXPECT_TRUE(contains(render_text(r, f), "user alice"));
  EXPECT_EQ(render_json(r, f)["user"], "alice");
}

TEST(DoctorRenderJson, HeadHasSchemaVersionTimestampAndHost) {
  auto f = healthy();
  f.host = "ts-01.hospital.local";
  f.timestamp = "2026-12-05T06:40:00Z";
  const auto j = render_json(evaluate(f), f);
  EXPECT_EQ(j["schema_version"], kJsonSchemaVersion);
  EXPECT_EQ(j["host"], "ts-01.hospital.local");
  EXPECT_EQ(j["timestamp"], "2026-12-05T06:40:00Z");
  EXPECT_TRUE(j["checks"][0].contains("cause"));
  EXPECT_TRUE(j["checks"][0]["cause"].is_null());
}

TEST(DoctorJson, UtcTimestampIsIso8601) {
  const std::string t = utc_timestamp();
  ASSERT_EQ(t.size(), 20u) << t;
  EXPECT_EQ(t[4], '-');
  EXPECT_EQ(t[10], 'T');
  EXPECT_EQ(t.back(), 'Z');
  EXPECT_FALSE(host_name().empty());
}

}  // namespace
}  // namespace cardbridge::session
