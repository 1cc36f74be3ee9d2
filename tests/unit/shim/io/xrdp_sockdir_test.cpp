// Which xrdp socket-directory entries the shim trusts (issue 9: user B's
// `touch /tmp/.xrdp/xrdpapi_77` redirected user A's `--desk rdp`).
#include "cardbridge/shim_io/xrdp_channel.hpp"

#include <gtest/gtest.h>

namespace cardbridge::shim {
namespace {

constexpr uid_t kMe = 1000;
constexpr uid_t kOther = 1001;

struct stat dir(uid_t owner, mode_t mode) {
  struct stat s {};
  s.st_uid = owner;
  s.st_mode = S_IFDIR | mode;
  return s;
}
struct stat sock(uid_t owner) {
  struct stat s {};
  s.st_uid = owner;
  s.st_mode = S_IFSOCK | 0660;
  return s;
}

TEST(XrdpSockdir, ChansrvsSocketInXrdpsDirectoriesIsTrusted) {
  EXPECT_TRUE(xrdp_socket_trusted(dir(0, 01777), sock(kMe), kMe)) << "/tmp/.xrdp, chansrv as the session user";
  EXPECT_TRUE(xrdp_socket_trusted(dir(0, 03777), sock(kMe), kMe));
  EXPECT_TRUE(xrdp_socket_trusted(dir(0, 0755), sock(0), kMe)) << "/run/xrdp/sockdir, root's";
  EXPECT_TRUE(xrdp_socket_trusted(dir(kMe, 0700), sock(kMe), kMe));
}

TEST(XrdpSockdir, AnotherUsersFileIsRefused) {
  EXPECT_FALSE(xrdp_socket_trusted(dir(0, 01777), sock(kOther), kMe));
  struct stat file = sock(kOther);
  file.st_mode = S_IFREG | 0644;  // touch
  EXPECT_FALSE(xrdp_socket_trusted(dir(0, 01777), file, kMe));
}

TEST(XrdpSockdir, ADirectoryOthersCanReplaceEntriesInIsRefused) {
  EXPECT_FALSE(xrdp_socket_trusted(dir(0, 0777), sock(kMe), kMe)) << "world-writable without the sticky bit";
  EXPECT_FALSE(xrdp_socket_trusted(dir(0, 0775), sock(kMe), kMe)) << "group-writable without the sticky bit";
  EXPECT_FALSE(xrdp_socket_trusted(dir(kOther, 0700), sock(kMe), kMe)) << "another user's directory";
  struct stat not_dir = dir(0, 01777);
  not_dir.st_mode = S_IFREG | 01777;
  EXPECT_FALSE(xrdp_socket_trusted(not_dir, sock(kMe), kMe));
}

TEST(XrdpSockdir, ASymbolicLinkIsRefused) {
  struct stat link = sock(kMe);
  link.st_mode = S_IFLNK | 0777;
  EXPECT_FALSE(xrdp_socket_trusted(dir(0, 01777), link, kMe));
}

}  // namespace
}  // namespace cardbridge::shim
