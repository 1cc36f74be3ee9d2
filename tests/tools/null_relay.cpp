// cb-null-relay: the cheapest hop a relay can be, for the benchmark's floor (core-bench, part
// "unix": direct on the desk's pcscd vs through two of these vs through CardBridge).
//
//   cb-null-relay --listen PATH --connect PATH
//
// Listens on a UNIX stream socket; for every connection it accepts it opens one to --connect
// and copies bytes both ways, a thread per direction doing nothing but a blocking read() and a
// write() of what it read: no poll, no parsing, no copy beyond the kernel's, no logging. Two
// of them chained (program -> relay -> relay -> pcscd) have the hops CardBridge has (program
// -> shim -> desk agent -> pcscd) and none of its work, so their cost is what any design with
// a server process and a desk process pays. Benchmark tool only: it checks nothing and is not
// installed.
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include <CLI/CLI.hpp>

namespace {

int unix_socket(const std::string& path, bool listen) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return -1;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  const auto* sa = reinterpret_cast<const sockaddr*>(&addr);
  int rc;
  if (listen) {
    ::unlink(path.c_str());
    rc = ::bind(fd, sa, sizeof addr) == 0 ? ::listen(fd, 64) : -1;
  } else {
    rc = ::connect(fd, sa, sizeof addr);
  }
  if (rc != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Copies from |from| to |to| until either ends, then ends |to|'s writing half.
void copy(int from, int to) {
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(from, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    for (ssize_t done = 0; done < n;) {
      const ssize_t w = ::write(to, buf + done, static_cast<std::size_t>(n - done));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        ::shutdown(from, SHUT_RD);
        ::shutdown(to, SHUT_WR);
        return;
      }
      done += w;
    }
  }
  ::shutdown(to, SHUT_WR);
}

void serve(int client, const std::string& upstream_path) {
  const int upstream = unix_socket(upstream_path, false);
  if (upstream < 0) {
    std::fprintf(stderr, "cb-null-relay: cannot connect to %s: %s\n", upstream_path.c_str(), std::strerror(errno));
    ::close(client);
    return;
  }
  std::thread back(copy, upstream, client);
  copy(client, upstream);
  back.join();
  ::close(upstream);
  ::close(client);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cb-null-relay: copies a UNIX stream socket's bytes both ways, nothing else (benchmark floor)"};
  std::string listen_path, connect_path;
  app.add_option("--listen", listen_path, "UNIX socket to listen on")->required();
  app.add_option("--connect", connect_path, "UNIX socket each connection is relayed to")->required();
  CLI11_PARSE(app, argc, argv);
  std::signal(SIGPIPE, SIG_IGN);
  const int listener = unix_socket(listen_path, true);
  if (listener < 0) {
    std::fprintf(stderr, "cb-null-relay: cannot listen on %s: %s\n", listen_path.c_str(), std::strerror(errno));
    return 1;
  }
  ::chmod(listen_path.c_str(), 0666);  // like pcscd's socket: any local program may connect
  for (;;) {
    const int client = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (client < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      std::fprintf(stderr, "cb-null-relay: accept: %s\n", std::strerror(errno));
      return 1;
    }
    std::thread(serve, client, connect_path).detach();
  }
}
