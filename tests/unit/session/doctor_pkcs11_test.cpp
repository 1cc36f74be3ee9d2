// cdrsession doctor, the PKCS#11 middleware check (cdrsession/lib/src/doctor.cpp pkcs11_check,
// doctor_pkcs11.hpp): its verdicts in plain words - module missing, module that does not load,
// reader not visible to the module, card not recognised - and the probe's JSON parsing.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cardbridge/session/doctor.hpp"

namespace cardbridge::session {
namespace {

using nlohmann::json;

constexpr unsigned kUid = 1000;
const char* kCps3 = "3BAC00402A001225006480000310009000";
const char* kReader = "Gemalto PC Twin Reader (4BA86842) 00 00";

json reader(const std::string& name, const char* atr) {
  return {{"name", name}, {"state", atr ? "present" : "empty"}, {"card_present", atr != nullptr},
          {"atr", atr ? atr : ""}, {"event_count", 1}};
}

DoctorFacts facts_with(Pkcs11Facts m) {
  DoctorFacts f;
  f.session = detect(
      [](const std::string& n) -> std::optional<std::string> {
        if (n == "XDG_RUNTIME_DIR") return std::string("/run/user/1000");
        return std::nullopt;
      },
      [](const std::string&) { return false; }, kUid);
  f.uid = kUid;
  f.csock_env = f.session.socket;
  f.socket = f.session.socket;
  f.socket_exists = f.socket_is_socket = true;
  f.socket_owner = kUid;
  f.status = json{{"software", "cardbridge-shim 0.1.0"}, {"pid", 1}, {"uid", kUid}, {"desk_link", "xrdp:static"},
                  {"desk", {{"connected", true}, {"name", "ACCUEIL-07"}, {"software", "cardbridge-client"}}},
                  {"readers", json::array({reader(kReader, kCps3), reader("Gemalto PC Twin Reader (4BA86842) 00 01",
                                                                           nullptr)})}};
  f.ping = json{{"median_us", 900.0}, {"p99_us", 1500.0}, {"count", 20}};
  f.pkcs11 = std::move(m);
  return f;
}

Pkcs11Facts loaded(std::vector<Pkcs11Slot> slots, const std::string& module = kCryptolibModule) {
  Pkcs11Facts m;
  m.module = module;
  m.exists = true;
  m.slots = std::move(slots);
  return m;
}

Pkcs11Slot slot(const std::string& desc, bool token, const std::string& label = "", const std::string& error = "") {
  Pkcs11Slot s;
  s.description = desc;
  s.token_present = token;
  s.token_label = label;
  s.token_serial = label.empty() ? "" : "10670571";
  s.token_error = error;
  return s;
}

const Check& check(const DoctorReport& r, const std::string& id) {
  auto it = std::find_if(r.checks.begin(), r.checks.end(), [&](const Check& c) { return c.id == id; });
  if (it == r.checks.end()) throw std::runtime_error("no check " + id);
  return *it;
}

TEST(DoctorPkcs11, NotAskedNoCheck) {
  auto f = facts_with(loaded({}));
  f.pkcs11.reset();
  auto r = evaluate(f);
  EXPECT_TRUE(std::none_of(r.checks.begin(), r.checks.end(), [](const Check& c) { return c.id == "pkcs11"; }));
  EXPECT_EQ(r.verdict, "healthy");
}

TEST(DoctorPkcs11, TokenInTheDesksCardIsHealthy) {
  auto f = facts_with(loaded({slot(kReader, true, "CPS de CLAIRE DUPONT"), slot("Gemalto PC Twin Reader (4BA86842) 00 01", false)}));
  auto r = evaluate(f);
  EXPECT_EQ(r.verdict, "healthy");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.checks.back().id, "pkcs11");  // after the latency check
  const auto& c = check(r, "pkcs11");
  EXPECT_EQ(c.result, CheckResult::kOk);
  EXPECT_NE(c.detail.find("libcps3_pkcs11_lux.so sees token 'CPS de CLAIRE DUPONT' (serial 10670571)"), std::string::npos)
      << c.detail;
  EXPECT_NE(c.detail.find(kReader), std::string::npos);
}

TEST(DoctorPkcs11, CutSlotDescriptionStillMatches) {
  // PKCS#11 slot descriptions hold 64 characters: a longer reader name arrives cut.
  const std::string longname = "Identiv uTrust 3700 F CL Reader [CCID Interface] (55041911206154) 00 00";
  auto f = facts_with(loaded({slot(longname.substr(0, 64), true, "CPS de CLAIRE DUPONT")}));
  (*f.status)["readers"] = json::array({reader(longname, kCps3)});
  auto r = evaluate(f);
  EXPECT_EQ(check(r, "pkcs11").result, CheckResult::kOk) << check(r, "pkcs11").detail;
}

TEST(DoctorPkcs11, ModuleMissingDefaultPathSaysInstallTheCryptolib) {
  Pkcs11Facts m;
  m.module = kCryptolibModule;
  auto r = evaluate(facts_with(m));
  EXPECT_EQ(r.verdict, "broken");
  EXPECT_EQ(r.first_problem, "pkcs11");
  EXPECT_EQ(r.exit_code, kExitCritical);
  const auto& c = check(r, "pkcs11");
  EXPECT_EQ(c.result, CheckResult::kFail);
  EXPECT_EQ(c.detail, std::string("module missing: there is no PKCS#11 module at ") + kCryptolibModule);
  EXPECT_NE(c.advice.find("install the Cryptolib CPS"), std::string::npos) << c.advice;
  // The checks before it were made: only the middleware is wrong.
  for (const auto& x : r.checks) {
    if (x.id != "pkcs11") {
      EXPECT_EQ(x.result, CheckResult::kOk) << x.id;
    }
  }
}

TEST(DoctorPkcs11, ModuleMissingOtherPathPointsAtTheOption) {
  Pkcs11Facts m;
  m.module = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so.typo";
  const auto& c = check(evaluate(facts_with(m)), "pkcs11");
  EXPECT_NE(c.advice.find("--pkcs11-module"), std::string::npos) << c.advice;
  EXPECT_EQ(c.advice.find("install the Cryptolib"), std::string::npos);
}

TEST(DoctorPkcs11, ModuleThatDoesNotLoad) {
  auto m = loaded({});
  m.load_error = "dlopen: libfoo.so.1: cannot open shared object file";
  auto r = evaluate(facts_with(m));
  const auto& c = check(r, "pkcs11");
  EXPECT_EQ(r.first_problem, "pkcs11");
  EXPECT_EQ(c.result, CheckResult::kFail);
  EXPECT_EQ(c.detail, "libcps3_pkcs11_lux.so does not load: dlopen: libfoo.so.1: cannot open shared object file");
  EXPECT_NE(c.advice.find("ldd"), std::string::npos);
}

TEST(DoctorPkcs11, ReaderNotVisibleToTheModule) {
  // The module lists readers of another PC/SC service (or none): the session's never reaches it.
  auto r = evaluate(facts_with(loaded({slot("Local SCM Reader 00 00", false)})));
  const auto& c = check(r, "pkcs11");
  EXPECT_EQ(c.result, CheckResult::kFail);
  EXPECT_NE(c.detail.find("reader not visible to the module"), std::string::npos) << c.detail;
  EXPECT_NE(c.detail.find("1 slot(s) ('Local SCM Reader 00 00')"), std::string::npos) << c.detail;
  EXPECT_NE(c.detail.find(kReader), std::string::npos);
  EXPECT_NE(c.advice.find("PCSCLITE_CSOCK_NAME"), std::string::npos);

  const auto& none = check(evaluate(facts_with(loaded({}))), "pkcs11");
  EXPECT_NE(none.detail.find("lists 0 slot(s) (none)"), std::string::npos) << none.detail;
}

TEST(DoctorPkcs11, CardNotRecognised) {
  auto r = evaluate(facts_with(loaded({slot(kReader, true, "", "CKR_TOKEN_NOT_RECOGNIZED")})));
  const auto& c = check(r, "pkcs11");
  EXPECT_EQ(c.result, CheckResult::kFail);
  EXPECT_EQ(c.detail, std::string("card not recognised: libcps3_pkcs11_lux.so sees the card in '") + kReader +
                          "' but no token (CKR_TOKEN_NOT_RECOGNIZED)");
  EXPECT_NE(c.advice.find("CPS3/CPS4"), std::string::npos);
  // A slot the module calls empty although the desk shows a card: not recognised either.
  const auto& empty = check(evaluate(facts_with(loaded({slot(kReader, false)}))), "pkcs11");
  EXPECT_NE(empty.detail.find("no token (slot reported empty)"), std::string::npos) << empty.detail;
}

TEST(DoctorPkcs11, SkippedAfterAnEarlierFailure) {
  auto f = facts_with(loaded({slot(kReader, true, "CPS de CLAIRE DUPONT")}));
  (*f.status)["desk"]["connected"] = false;
  auto r = evaluate(f);
  EXPECT_EQ(r.first_problem, "channel");
  EXPECT_EQ(check(r, "pkcs11").result, CheckResult::kSkipped);
}

TEST(DoctorPkcs11, TextAndJson) {
  auto f = facts_with(loaded({slot(kReader, true, "", "CKR_TOKEN_NOT_RECOGNIZED")}));
  auto r = evaluate(f);
  const auto text = render_text(r, f);
  EXPECT_NE(text.find("[FAIL] pkcs11"), std::string::npos) << text;
  EXPECT_NE(text.find("Verdict: BROKEN: PKCS#11 middleware (card not recognised"), std::string::npos) << text;
  const auto j = render_json(r, f);
  EXPECT_EQ(j["first_problem"], "pkcs11");
  EXPECT_EQ(j["exit_code"], kExitCritical);
  EXPECT_EQ(j["pkcs11"]["module"], kCryptolibModule);
  EXPECT_EQ(j["pkcs11"]["slots"][0]["token_error"], "CKR_TOKEN_NOT_RECOGNIZED");
}

TEST(DoctorPkcs11, ParseProbe) {
  auto m = parse_pkcs11_probe("/m.so", json{{"module", "/m.so"},
                                            {"slots", json::array({{{"description", "R 00 00"}, {"token_present", true},
                                                                    {"token_label", "CPS"}, {"token_serial", "1"}},
                                                                   {{"description", "R 00 01"}, {"token_present", false}}})}});
  EXPECT_TRUE(m.exists);
  EXPECT_TRUE(m.load_error.empty());
  ASSERT_EQ(m.slots.size(), 2u);
  EXPECT_EQ(m.slots[0].token_label, "CPS");
  EXPECT_FALSE(m.slots[1].token_present);
  EXPECT_EQ(parse_pkcs11_probe("/m.so", json{{"load_error", "C_Initialize: CKR_GENERAL_ERROR"}}).load_error,
            "C_Initialize: CKR_GENERAL_ERROR");
  EXPECT_FALSE(parse_pkcs11_probe("/m.so", json::array()).load_error.empty());
  EXPECT_FALSE(parse_pkcs11_probe("/m.so", json{{"module", "/m.so"}}).load_error.empty());  // no slot list
  EXPECT_EQ(ckr_name(0xE1), "CKR_TOKEN_NOT_RECOGNIZED");
  EXPECT_EQ(ckr_name(0x80000001UL), "CKR_VENDOR_DEFINED+1");
  EXPECT_EQ(ckr_name(0x123), "0x00000123");
}

TEST(DoctorPkcs11, ProbeOfAMissingModuleDoesNotStartAChild) {
  auto m = probe_pkcs11("/nonexistent/cdrsession", "/nonexistent/module.so", "/tmp/x", std::chrono::seconds(1));
  EXPECT_FALSE(m.exists);
  EXPECT_EQ(m.module, "/nonexistent/module.so");
}

TEST(DoctorPkcs11, ProbeInProcessReportsALoadError) {
  // run_pkcs11_probe itself (what the child runs): a file that is not a shared object.
  auto j = run_pkcs11_probe("/etc/hostname");
  ASSERT_TRUE(j.contains("load_error"));
  EXPECT_NE(j["load_error"].get<std::string>().find("dlopen"), std::string::npos);
}

}  // namespace
}  // namespace cardbridge::session
