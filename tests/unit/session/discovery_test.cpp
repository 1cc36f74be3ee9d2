// The helpdesk's view of a server (cdrsession/lib/include/cardbridge/session/discovery.hpp): a
// shim's socket, control socket and session from its command line and environment, as
// `cdrsession status --all` and `doctor --user` read them from /proc.
#include "cardbridge/session/discovery.hpp"

#include <gtest/gtest.h>

namespace cardbridge::session {
namespace {

TEST(Discovery, SocketControlAndSessionFromTheCommandLine) {
  const auto a = parse_shim_args({"cardbridge-shim", "--socket", "/run/user/1001/cardbridge/xrdp-10/pcscd.comm",
                                  "--desk", "xrdp", "--config", "/etc/cardbridge/server.conf"},
                                 {"CARDBRIDGE_SESSION=xrdp-10", "XDG_RUNTIME_DIR=/run/user/1001"}, 1001);
  EXPECT_EQ(a.socket, "/run/user/1001/cardbridge/xrdp-10/pcscd.comm");
  EXPECT_EQ(a.control, "/run/user/1001/cardbridge/xrdp-10/pcscd.comm.ctl");
  EXPECT_EQ(a.session, "xrdp-10");
}

TEST(Discovery, EqualsSpellingAndAnExplicitControlSocket) {
  const auto a = parse_shim_args({"cardbridge-shim", "--socket=/tmp/s/pcscd.comm", "--control=/tmp/s/ctl"}, {}, 5);
  EXPECT_EQ(a.socket, "/tmp/s/pcscd.comm");
  EXPECT_EQ(a.control, "/tmp/s/ctl");
  EXPECT_EQ(a.session, "s") << "without CARDBRIDGE_SESSION: the socket's directory";
}

TEST(Discovery, TheShimsDefaultSocket) {
  EXPECT_EQ(parse_shim_args({"cardbridge-shim"}, {"XDG_RUNTIME_DIR=/run/user/77"}, 77).socket,
            "/run/user/77/cardbridge/pcscd.comm");
  EXPECT_EQ(parse_shim_args({"cardbridge-shim"}, {}, 78).socket, "/run/user/78/cardbridge/pcscd.comm");
  // A trailing --socket with no value is not a socket.
  EXPECT_EQ(parse_shim_args({"cardbridge-shim", "--socket"}, {}, 79).socket, "/run/user/79/cardbridge/pcscd.comm");
}

TEST(Discovery, UidOf) {
  EXPECT_EQ(uid_of("root"), 0u);
  EXPECT_EQ(uid_of("no-such-user-cardbridge"), std::nullopt);
}

}  // namespace
}  // namespace cardbridge::session
