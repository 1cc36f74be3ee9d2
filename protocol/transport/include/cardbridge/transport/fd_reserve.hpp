// A listener at its file-descriptor limit (EMFILE/ENFILE) cannot accept the connection that
// waits in its backlog, and so cannot even refuse it: the peer waits for an answer that never
// comes while the listener retries. FdReserve keeps one descriptor in reserve (/dev/null) so
// that the listener can, at the limit, give it up, accept the waiting connection and close it
// at once (the peer sees the refusal pcscd gives when it cannot serve a client), then take the
// reserve back.
#pragma once

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

}  // namespace cardbridge::transport
