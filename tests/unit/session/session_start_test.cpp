// Sessions start everywhere or say why (issue 10, section 1): the runtime directory where logind
// gives none (/run/cardbridge/<uid>), the checks made before anything is created there, the
// doctor naming a failed start, and the doctor naming a missing xrdp channel entry.
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>

#include "cardbridge/session/doctor.hpp"
#include "cardbridge/session/session.hpp"

namespace cardbridge::session {
namespace {

namespace fs = std::filesystem;

SessionPaths detect_with(std::map<std::string, std::string> env, std::set<std::string> files, unsigned uid) {
  return detect(
      [&](const std::string& n) -> std::optional<std::string> {
        auto it = env.find(n);
        if (it == env.end()) return std::nullopt;
        return it->second;
      },
      [&](const std::string& p) { return files.count(p) > 0; }, uid);
}

TEST(RuntimeDir, XdgRuntimeDirWins) {
  auto p = detect_with({{"XDG_RUNTIME_DIR", "/run/user/1001"}}, {"/run/cardbridge"}, 1001);
  EXPECT_EQ(p.runtime_dir, "/run/user/1001");
  EXPECT_FALSE(p.runtime_fallback);
}

TEST(RuntimeDir, LogindDirectoryWithoutTheVariable) {
  auto p = detect_with({}, {"/run/user/1001", "/run/cardbridge"}, 1001);
  EXPECT_EQ(p.runtime_dir, "/run/user/1001");
  EXPECT_FALSE(p.runtime_fallback);
}

TEST(RuntimeDir, NoLogindFallsBackBelowRunCardbridge) {
  auto p = detect_with({{"XRDP_SESSION", "1"}, {"DISPLAY", ":77"}}, {"/run/cardbridge"}, 1001);
  EXPECT_TRUE(p.runtime_fallback);
  EXPECT_EQ(p.runtime_dir, "/run/cardbridge/1001");
  EXPECT_EQ(p.dir, "/run/cardbridge/1001/cardbridge/xrdp-77");
  EXPECT_EQ(p.socket, "/run/cardbridge/1001/cardbridge/xrdp-77/pcscd.comm");
  EXPECT_EQ(p.desk_spec, "xrdp");
}

TEST(RuntimeDir, NeitherKeepsTheLogindPathAndPrepareSaysWhy) {
  auto p = detect_with({}, {}, 4242);
  EXPECT_FALSE(p.runtime_fallback);
  EXPECT_EQ(p.runtime_dir, "/run/user/4242");
  // A runtime directory whose parent is missing cannot be made, by root either.
  p.runtime_dir = "/nonexistent-cardbridge-test/run/user/4242";
  p.dir = p.runtime_dir + "/cardbridge/default";
  const auto why = prepare_session_dirs(p, 4242);
  EXPECT_NE(why.find(p.runtime_dir), std::string::npos) << why;
  EXPECT_NE(why.find("pam_systemd"), std::string::npos) << why;
}

class PrepareDirs : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cb-prepare-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    root_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(root_, ec);
  }
  SessionPaths paths() { return detect_with({{"XDG_RUNTIME_DIR", root_}}, {}, ::geteuid()); }
  static unsigned mode(const std::string& p) {
    struct stat st {};
    EXPECT_EQ(::lstat(p.c_str(), &st), 0) << p;
    return st.st_mode & 07777;
  }
  std::string root_;
};

TEST_F(PrepareDirs, CreatesPrivateDirectories) {
  auto p = paths();
  EXPECT_EQ(prepare_session_dirs(p, ::geteuid()), "");
  EXPECT_EQ(mode(root_ + "/cardbridge"), 0700u);
  EXPECT_EQ(mode(p.dir), 0700u);
  EXPECT_EQ(prepare_session_dirs(p, ::geteuid()), "") << "idempotent";
}

TEST_F(PrepareDirs, TightensALooseDirectoryOfOurs) {
  ASSERT_EQ(::mkdir((root_ + "/cardbridge").c_str(), 0777), 0);
  ::chmod((root_ + "/cardbridge").c_str(), 0777);
  EXPECT_EQ(prepare_session_dirs(paths(), ::geteuid()), "");
  EXPECT_EQ(mode(root_ + "/cardbridge"), 0700u);
}

TEST_F(PrepareDirs, RefusesASymlink) {
  ASSERT_EQ(::mkdir((root_ + "/elsewhere").c_str(), 0700), 0);
  ASSERT_EQ(::symlink((root_ + "/elsewhere").c_str(), (root_ + "/cardbridge").c_str()), 0);
  const auto why = prepare_session_dirs(paths(), ::geteuid());
  EXPECT_NE(why.find("symbolic link"), std::string::npos) << why;
  EXPECT_FALSE(fs::exists(root_ + "/elsewhere/default")) << "nothing created through the link";
}

TEST_F(PrepareDirs, RefusesAnotherUsersDirectory) {
  const auto why = prepare_session_dirs(paths(), ::geteuid() + 1);
  EXPECT_NE(why.find("belongs to uid"), std::string::npos) << why;
}

// ---- the doctor ---------------------------------------------------------------------------

DoctorFacts no_shim_in_xrdp() {
  DoctorFacts f;
  f.session = detect_with({{"XRDP_SESSION", "1"}, {"DISPLAY", ":77"}}, {"/run/cardbridge"}, 1001);
  f.uid = 1001;
  f.socket = f.session.socket;
  return f;
}

TEST(DoctorStart, AFailedStartIsTheFirstProblem) {
  auto f = no_shim_in_xrdp();
  f.start_error = "/run/cardbridge must belong to root and be sticky (mode 1733)";
  auto r = evaluate(f);
  ASSERT_FALSE(r.checks.empty());
  EXPECT_EQ(r.checks.front().id, "start");
  EXPECT_EQ(r.first_problem, "start");
  EXPECT_EQ(r.exit_code, kExitCritical);
  EXPECT_EQ(r.verdict, "broken");
  EXPECT_NE(r.checks.front().detail.find("must belong to root"), std::string::npos) << r.checks.front().detail;
  const auto text = render_text(r, f);
  EXPECT_NE(text.find("could not start at login"), std::string::npos) << text;
  EXPECT_NE(text.find("journalctl -t cdrsession"), std::string::npos) << text;
}

TEST(DoctorStart, NoStartErrorNoStartCheck) {
  auto r = evaluate(no_shim_in_xrdp());
  ASSERT_FALSE(r.checks.empty());
  EXPECT_EQ(r.checks.front().id, "environment");
}

TEST(DoctorStart, AShimThatAnswersNowMakesAnOldErrorHarmless) {
  auto f = no_shim_in_xrdp();
  f.start_error = "the shim did not come up";
  f.csock_env = f.socket;
  f.socket_exists = f.socket_is_socket = true;
  f.socket_owner = 1001;
  f.status = nlohmann::json{{"uid", 1001}, {"pid", 7}, {"desk_link", "xrdp"}, {"desk", {{"connected", false}}}};
  auto r = evaluate(f);
  EXPECT_EQ(r.checks.front().id, "start");
  EXPECT_EQ(r.checks.front().result, CheckResult::kOk);
  EXPECT_EQ(r.first_problem, "channel");
}

TEST(DoctorXrdpChannel, MissingEntryIsNamed) {
  auto f = no_shim_in_xrdp();
  f.csock_env = f.socket;
  f.socket_exists = f.socket_is_socket = true;
  f.socket_owner = 1001;
  f.status = nlohmann::json{{"uid", 1001}, {"pid", 7}, {"desk_link", "xrdp"}, {"desk", {{"connected", false}}}};
  f.xrdp_channel_allowed = false;
  auto r = evaluate(f);
  EXPECT_EQ(r.first_problem, "channel");
  EXPECT_EQ(r.exit_code, kExitCritical);
  const auto& c = r.checks[3];
  ASSERT_EQ(c.id, "channel");
  EXPECT_NE(c.detail.find("[Channels] CBRIDGE=true is missing"), std::string::npos) << c.detail;
  EXPECT_NE(c.advice.find("cdrsession enable xrdp"), std::string::npos) << c.advice;

  f.xrdp_channel_allowed = true;
  r = evaluate(f);
  EXPECT_EQ(r.checks[3].detail.find("is missing"), std::string::npos) << r.checks[3].detail;
}

TEST(DoctorXrdpChannel, IniParsing) {
  EXPECT_TRUE(xrdp_ini_allows_channel("[Globals]\nport=3389\n[Channels]\nrdpdr=true\nCBRIDGE=true\n"));
  EXPECT_TRUE(xrdp_ini_allows_channel("[Channels]\n  CBRIDGE = yes \r\n[Logging]\n"));
  EXPECT_FALSE(xrdp_ini_allows_channel("[Channels]\n; CBRIDGE=true\n#CBRIDGE=true\n"));
  EXPECT_FALSE(xrdp_ini_allows_channel("[Channels]\nCBRIDGE=false\n"));
  EXPECT_FALSE(xrdp_ini_allows_channel("[Globals]\nCBRIDGE=true\n[Channels]\nrdpdr=true\n"));
  EXPECT_FALSE(xrdp_ini_allows_channel(""));
}

}  // namespace
}  // namespace cardbridge::session
