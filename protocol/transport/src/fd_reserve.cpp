#include "cardbridge/transport/fd_reserve.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

namespace cardbridge::transport {

namespace {
int open_reserve() { return ::open("/dev/null", O_RDONLY | O_CLOEXEC); }
}  // namespace

FdReserve::FdReserve() : fd_(open_reserve()) {}

FdReserve::~FdReserve() {
  if (fd_ >= 0) ::close(fd_);
}

bool FdReserve::is_exhaustion(const boost::system::error_code& ec) {
  return ec.category() == boost::system::system_category() && (ec.value() == EMFILE || ec.value() == ENFILE);
}

bool FdReserve::refuse_one(int listen_fd) {
  if (fd_ < 0) fd_ = open_reserve();  // a descriptor freed since: take the reserve back first
  if (fd_ < 0) return false;
  ::close(fd_);
  fd_ = -1;
  // The listener is non-blocking (Asio): nothing pending gives EAGAIN, not a wait.
  const int conn = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  if (conn >= 0) ::close(conn);
  fd_ = open_reserve();
  return conn >= 0;
}

}  // namespace cardbridge::transport
