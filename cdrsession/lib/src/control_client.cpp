#include "cardbridge/session/control_client.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

namespace cardbridge::session {

Result<nlohmann::json, ControlError> control_request(const std::string& path, const nlohmann::json& request,
                                                     std::chrono::milliseconds timeout) {
  using R = Result<nlohmann::json, ControlError>;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return R(unexpected(ControlError{ControlError::kRefused, std::strerror(errno)}));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return R(unexpected(ControlError{ControlError::kNoSocket, "path too long"}));
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    const int e = errno;
    return R(unexpected(ControlError{e == ENOENT ? ControlError::kNoSocket : ControlError::kRefused,
                                     fmt::format("{}: {}", path, std::strerror(e))}));
  }
  const std::string line = request.dump() + "\n";
  if (::send(fd, line.data(), line.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(line.size())) {
    // A shim of another uid closes at once (SO_PEERCRED): the close may beat our request.
    if (errno == EPIPE || errno == ECONNRESET)
      return R(unexpected(ControlError{ControlError::kRefused, "the shim closed the connection (another user's shim?)"}));
    return R(unexpected(ControlError{ControlError::kRefused, fmt::format("send failed: {}", std::strerror(errno))}));
  }
  std::string answer;
  char buf[4096];
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return R(unexpected(ControlError{ControlError::kTimeout, "no answer in time"}));
    pollfd p{fd, POLLIN, 0};
    int n = ::poll(&p, 1, static_cast<int>(left.count()));
    if (n == 0) return R(unexpected(ControlError{ControlError::kTimeout, "no answer in time"}));
    if (n < 0 && errno == EINTR) continue;
    ssize_t got = ::recv(fd, buf, sizeof buf, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    answer.append(buf, static_cast<std::size_t>(got));
    if (answer.size() > (1u << 20)) return R(unexpected(ControlError{ControlError::kBadAnswer, "answer too large"}));
    if (answer.find('\n') != std::string::npos) break;
  }
  if (answer.empty()) {
    // The shim closes at once on peers of another uid (SO_PEERCRED).
    return R(unexpected(ControlError{ControlError::kRefused, "the shim closed the connection (another user's shim?)"}));
  }
  auto j = nlohmann::json::parse(answer, nullptr, false);
  if (j.is_discarded()) return R(unexpected(ControlError{ControlError::kBadAnswer, "not JSON"}));
  return j;
}

}  // namespace cardbridge::session
