// A listener at its file-descriptor limit (EMFILE/ENFILE) cannot accept the connection that
// waits in its backlog, and so cannot even refuse it: the peer waits for an answer that never
// comes while the listener retries. FdReserve keeps one descriptor in reserve (/dev/null) so
// that the listener can, at the limit, give it up, accept the waiting connection and close it
// at once (the peer sees the refusal pcscd gives when it cannot serve a client), then take the
// reserve back.
#pragma once

#include <cstddef>

#include <boost/system/error_code.hpp>

namespace cardbridge::transport {

class FdReserve {
 public:
  FdReserve();
  ~FdReserve();
  FdReserve(const FdReserve&) = delete;
  FdReserve& operator=(const FdReserve&) = delete;

  // Whether |ec| (from an accept) says the process or the system is out of descriptors.
  static bool is_exhaustion(const boost::system::error_code& ec);

  // Accepts and closes one pending connection of |listen_fd| using the reserve. True if a
  // connection was refused that way; false if none was pending or the reserve is gone.
  bool refuse_one(int listen_fd);

 private:
  int fd_ = -1;
};

// A listener's run of failed accepts (an "episode"), for the listeners of the shim and the
// desk agent: each failure is counted, and one for want of descriptors refuses the waiting
// connection with the reserve. The caller logs the first failure of an episode and its end.
class AcceptFailures {
 public:
  struct Step {
    std::size_t in_a_row = 0;  // 1: the episode starts (log it)
    bool refused = false;      // a waiting connection was closed with the reserve: accept again at once
  };
  Step failed(const boost::system::error_code& ec, int listen_fd) {
    ++in_a_row_;
    return {in_a_row_, FdReserve::is_exhaustion(ec) && reserve_.refuse_one(listen_fd)};
  }
  // After a successful accept: how many failed before it (0: no episode), and the count reset.
  std::size_t accepted() {
    const std::size_t n = in_a_row_;
    in_a_row_ = 0;
    return n;
  }

 private:
  FdReserve reserve_;
  std::size_t in_a_row_ = 0;
};

}  // namespace cardbridge::transport
