// Session type detection and the per-session paths (cdrsession/lib/include/cardbridge/session/session.hpp): xrdp (by
// XRDP_SESSION or by the chansrv socket of DISPLAY), a FreeRDP-based host (its relay socket),
// a TLS desk (CARDBRIDGE_DESK=tls:...), none; the session key and its validation.
#include "cardbridge/session/session.hpp"

#include <gtest/gtest.h>

#include <map>
#include <set>
#include <string>
#include <vector>

namespace cardbridge::session {
namespace {

constexpr unsigned kUid = 1234;
const std::string kRt = "/run/user/1234";

struct World {
  std::map<std::string, std::string> env;
  std::set<std::string> files;
  std::vector<std::string> asked;  // paths detect() looked at

  SessionPaths detect_now(unsigned uid = kUid) {
    return detect(
        [this](const std::string& n) -> std::optional<std::string> {
          auto it = env.find(n);
          if (it == env.end()) return std::nullopt;
          return it->second;
        },
        [this](const std::string& p) {
          asked.push_back(p);
          return files.count(p) > 0;
        },
        uid);
  }
};

World base() {
  World w;
  w.env["XDG_RUNTIME_DIR"] = kRt;
  return w;
}

void expect_layout(const SessionPaths& p, const std::string& rt, const std::string& key) {
  EXPECT_EQ(p.key, key);
  EXPECT_EQ(p.runtime_dir, rt);
  EXPECT_EQ(p.dir, rt + "/cardbridge/" + key);
  EXPECT_EQ(p.socket, rt + "/cardbridge/" + key + "/pcscd.comm");
  EXPECT_EQ(p.control, rt + "/cardbridge/" + key + "/pcscd.comm.ctl");
  EXPECT_EQ(p.pid_file, rt + "/cardbridge/" + key + "/cdrsession.pid");
  EXPECT_EQ(p.relay_socket, rt + "/cardbridge/desk.sock");
}

// ---- session types ------------------------------------------------------------------------

TEST(SessionDetect, XrdpByEnvironment) {
  auto w = base();
  w.env["XRDP_SESSION"] = "1";
  w.env["DISPLAY"] = ":10";
  const auto p = w.detect_now();
  EXPECT_EQ(p.type, SessionType::kXrdp);
  EXPECT_STREQ(type_name(p.type), "xrdp");
  EXPECT_EQ(p.desk_spec, "xrdp");
  EXPECT_EQ(p.display, ":10");
  expect_layout(p, kRt, "xrdp-10");
}

TEST(SessionDetect, XrdpByChansrvSocketOfThisDisplay) {
  for (const char* sockdir : {"/run/xrdp/sockdir", "/var/run/xrdp/sockdir"}) {
    SCOPED_TRACE(sockdir);
    auto w = base();
    w.env["DISPLAY"] = ":11.0";  // screen number ignored
    w.files.insert(std::string(sockdir) + "/xrdpapi_11");
    const auto p = w.detect_now();
    EXPECT_EQ(p.type, SessionType::kXrdp);
    EXPECT_EQ(p.desk_spec, "xrdp");
    expect_layout(p, kRt, "xrdp-11");
  }
}

TEST(SessionDetect, ChansrvSocketOfAnotherDisplayIsNotThisSession) {
  auto w = base();
  w.env["DISPLAY"] = ":11";
  w.files.insert("/run/xrdp/sockdir/xrdpapi_12");
  w.files.insert("/run/xrdp/sockdir/xrdpapi_1");
  w.files.insert("/run/xrdp/sockdir/xrdpapi_110");
  EXPECT_EQ(w.detect_now().type, SessionType::kNone);
}

TEST(SessionDetect, DisplayWithHostName) {
  auto w = base();
  w.env["DISPLAY"] = "localhost:7";
  w.files.insert("/run/xrdp/sockdir/xrdpapi_7");
  const auto p = w.detect_now();
  EXPECT_EQ(p.type, SessionType::kXrdp);
  EXPECT_EQ(p.key, "xrdp-7");
}

TEST(SessionDetect, MalformedDisplayGivesNoDisplayKey) {
  for (const char* d : {":", ":x", "10", ":1x", ""}) {
    SCOPED_TRACE(d);
    auto w = base();
    w.env["DISPLAY"] = d;
    w.files.insert("/run/xrdp/sockdir/xrdpapi_1");
    w.files.insert("/run/xrdp/sockdir/xrdpapi_10");
    EXPECT_EQ(w.detect_now().type, SessionType::kNone);
    // XRDP_SESSION alone still says xrdp, but without a display number the key is not xrdp-N.
    w.env["XRDP_SESSION"] = "1";
    const auto p = w.detect_now();
    EXPECT_EQ(p.type, SessionType::kXrdp);
    EXPECT_EQ(p.key, "default");
  }
}

TEST(SessionDetect, FreerdpHostByRelaySocket) {
  auto w = base();
  w.env["DISPLAY"] = ":3";
  w.files.insert(kRt + "/cardbridge/desk.sock");
  const auto p = w.detect_now();
  EXPECT_EQ(p.type, SessionType::kFreerdpHost);
  EXPECT_STREQ(type_name(p.type), "freerdp-host");
  EXPECT_EQ(p.desk_spec, "unix:" + kRt + "/cardbridge/desk.sock");
  expect_layout(p, kRt, "default");
}

TEST(SessionDetect, XrdpWinsOverARelaySocket) {
  auto w = base();
  w.env["XRDP_SESSION"] = "1";
  w.env["DISPLAY"] = ":12";
  w.files.insert(kRt + "/cardbridge/desk.sock");
  EXPECT_EQ(w.detect_now().type, SessionType::kXrdp);
}

TEST(SessionDetect, TlsDeskByCardbridgeDesk) {
  auto w = base();
  w.env["CARDBRIDGE_DESK"] = "tls:desk-12.hospital.example:4433";
  const auto p = w.detect_now();
  EXPECT_EQ(p.type, SessionType::kTlsDesk);
  EXPECT_STREQ(type_name(p.type), "tls");
  EXPECT_EQ(p.desk_spec, "tls:desk-12.hospital.example:4433");
  expect_layout(p, kRt, "default");

  // Also inside an xrdp session (a farm whose RDP channel is not used): the explicit desk wins
  // the type; the key still follows the display.
  w.env["XRDP_SESSION"] = "1";
  w.env["DISPLAY"] = ":14";
  const auto q = w.detect_now();
  EXPECT_EQ(q.type, SessionType::kTlsDesk);
  EXPECT_EQ(q.desk_spec, "tls:desk-12.hospital.example:4433");
  EXPECT_EQ(q.key, "xrdp-14");
}

TEST(SessionDetect, OtherExplicitDeskOverridesTheLinkNotTheType) {
  auto w = base();
  w.env["CARDBRIDGE_DESK"] = "tcp:127.0.0.1:7000";
  auto p = w.detect_now();
  EXPECT_EQ(p.type, SessionType::kNone);
  EXPECT_EQ(p.desk_spec, "tcp:127.0.0.1:7000");
  w.files.insert(kRt + "/cardbridge/desk.sock");
  p = w.detect_now();
  EXPECT_EQ(p.type, SessionType::kFreerdpHost);
  EXPECT_EQ(p.desk_spec, "tcp:127.0.0.1:7000");
  // An empty CARDBRIDGE_DESK is ignored.
  w.env["CARDBRIDGE_DESK"] = "";
  EXPECT_EQ(w.detect_now().desk_spec, "unix:" + kRt + "/cardbridge/desk.sock");
}

TEST(SessionDetect, NoneStillPointsAtTheRelay) {
  auto w = base();
  const auto p = w.detect_now();
  EXPECT_EQ(p.type, SessionType::kNone);
  EXPECT_STREQ(type_name(p.type), "none");
  EXPECT_EQ(p.desk_spec, "unix:" + kRt + "/cardbridge/desk.sock");
  EXPECT_EQ(p.display, "");
  expect_layout(p, kRt, "default");
}

TEST(SessionDetect, RuntimeDirFallsBackToRunUser) {
  World w;  // no XDG_RUNTIME_DIR
  auto p = w.detect_now(1001);
  expect_layout(p, "/run/user/1001", "default");
  w.env["XDG_RUNTIME_DIR"] = "";
  p = w.detect_now(1001);
  expect_layout(p, "/run/user/1001", "default");
  // The relay is looked for in the fallback directory too.
  w.files.insert("/run/user/1001/cardbridge/desk.sock");
  EXPECT_EQ(w.detect_now(1001).type, SessionType::kFreerdpHost);
}

// ---- session keys ---------------------------------------------------------------------------

TEST(SessionKey, LogindSession) {
  auto w = base();
  w.env["XDG_SESSION_ID"] = "c7";
  expect_layout(w.detect_now(), kRt, "sc7");
}

TEST(SessionKey, XrdpDisplayWinsOverLogindSession) {
  auto w = base();
  w.env["XDG_SESSION_ID"] = "42";
  w.env["XRDP_SESSION"] = "1";
  w.env["DISPLAY"] = ":10";
  EXPECT_EQ(w.detect_now().key, "xrdp-10");
}

TEST(SessionKey, ExplicitKeyWins) {
  auto w = base();
  w.env["XDG_SESSION_ID"] = "42";
  w.env["XRDP_SESSION"] = "1";
  w.env["DISPLAY"] = ":10";
  w.env["CARDBRIDGE_SESSION"] = "default";  // what the systemd user unit sets
  expect_layout(w.detect_now(), kRt, "default");
  w.env["CARDBRIDGE_SESSION"] = "Desk_2-b";
  EXPECT_EQ(w.detect_now().key, "Desk_2-b");
}

TEST(SessionKey, UnsafeKeysAreIgnored) {
  const std::string sixty_four(64, 'k');
  for (const std::string& bad : std::vector<std::string>{"", "..", "../../etc", "a/b", "/abs", "a b", "a.b", "ké", "a\nb", "$(id)", "a;b",
                                std::string(65, 'k'), std::string("a\0b", 3)}) {
    SCOPED_TRACE(bad);
    auto w = base();
    w.env["CARDBRIDGE_SESSION"] = bad;
    auto p = w.detect_now();
    EXPECT_EQ(p.key, "default");
    w.env["XDG_SESSION_ID"] = bad;
    p = w.detect_now();
    EXPECT_EQ(p.key, "default");
    // Whatever the input, the session directory stays one level below runtime_dir/cardbridge.
    EXPECT_EQ(p.dir.rfind(kRt + "/cardbridge/", 0), 0u);
    EXPECT_EQ(p.dir.find('/', kRt.size() + 12), std::string::npos) << p.dir;
    // A bad explicit key falls back to the next rule, not to "default" blindly.
    w.env["XDG_SESSION_ID"] = "9";
    EXPECT_EQ(w.detect_now().key, "s9");
  }
  auto w = base();
  w.env["CARDBRIDGE_SESSION"] = sixty_four;
  EXPECT_EQ(w.detect_now().key, sixty_four);
}

TEST(SessionTypeNames, All) {
  EXPECT_STREQ(type_name(SessionType::kXrdp), "xrdp");
  EXPECT_STREQ(type_name(SessionType::kFreerdpHost), "freerdp-host");
  EXPECT_STREQ(type_name(SessionType::kTlsDesk), "tls");
  EXPECT_STREQ(type_name(SessionType::kNone), "none");
}

}  // namespace
}  // namespace cardbridge::session
