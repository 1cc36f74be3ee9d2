#include "cardbridge/transport/stream.hpp"
#include "stream_impl.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <fmt/format.h>

namespace cardbridge::transport {

PeerIdentity peer_of(GenericSocket& s) {
  if (auto cred = peer_credentials(s)) return PeerIdentity::unix_user(cred->uid, cred->pid);
  boost::system::error_code ec;
  const auto remote = s.remote_endpoint(ec);
  if (ec) return {};
  char host[128] = {};
  unsigned port = 0;
  if (remote.protocol().family() == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(remote.data());
    ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    port = ntohs(in->sin_port);
  } else if (remote.protocol().family() == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(remote.data());
    ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    port = ntohs(in6->sin6_port);
  }
  return PeerIdentity::insecure_tcp(fmt::format("{}:{}", host, port));
}

template <>
PeerIdentity BasicByteStream<GenericSocket>::peer() const {
  if (peer_.kind != PeerIdentity::Kind::kNone) return peer_;
  return peer_of(const_cast<GenericSocket&>(socket_));
}

template class BasicByteStream<GenericSocket>;

void set_low_latency(GenericSocket& s) {
  boost::system::error_code ec;
  const auto local = s.local_endpoint(ec);
  if (ec) return;
  if (local.protocol().family() == AF_INET || local.protocol().family() == AF_INET6) {
    int one = 1;
    ::setsockopt(s.native_handle(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
}

std::optional<PeerCred> peer_credentials(GenericSocket& s) {
  struct ucred cred {};
  socklen_t len = sizeof cred;
  if (::getsockopt(s.native_handle(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return std::nullopt;
  boost::system::error_code ec;
  if (s.local_endpoint(ec).protocol().family() != AF_UNIX || ec) return std::nullopt;
  return PeerCred{cred.pid, cred.uid, cred.gid};
}

void async_connect(asio::io_context& io, const Endpoint& ep,
                   std::function<void(std::optional<GenericSocket>, std::string)> done) {
  if (ep.kind == Endpoint::Kind::kUnix) {
    auto sock = std::make_shared<asio::local::stream_protocol::socket>(io);
    sock->async_connect(asio::local::stream_protocol::endpoint(ep.path),
                        [sock, done, &io](boost::system::error_code ec) {
                          if (ec) return done(std::nullopt, ec.message());
                          GenericSocket g(io);
                          g.assign(asio::generic::stream_protocol(AF_UNIX, 0), sock->release());
                          done(std::move(g), "");
                        });
    return;
  }
  auto resolver = std::make_shared<asio::ip::tcp::resolver>(io);
  resolver->async_resolve(
      ep.host, std::to_string(ep.port),
      [resolver, done, &io](boost::system::error_code ec, asio::ip::tcp::resolver::results_type results) {
        if (ec) return done(std::nullopt, ec.message());
        auto sock = std::make_shared<asio::ip::tcp::socket>(io);
        asio::async_connect(*sock, results,
                            [sock, done, &io](boost::system::error_code ec2, const asio::ip::tcp::endpoint& e) {
                              if (ec2) return done(std::nullopt, ec2.message());
                              GenericSocket g(io);
                              g.assign(asio::generic::stream_protocol(e.protocol().family(), IPPROTO_TCP),
                                       sock->release());
                              set_low_latency(g);
                              done(std::move(g), "");
                            });
      });
}

Result<GenericAcceptor, std::string> listen(asio::io_context& io, const Endpoint& ep,
                                            unsigned unix_mode) {
  boost::system::error_code ec;
  if (ep.kind == Endpoint::Kind::kUnix) {
    struct stat st {};
    if (::lstat(ep.path.c_str(), &st) == 0) {
      if (!S_ISSOCK(st.st_mode)) return unexpected(fmt::format("{} exists and is not a socket", ep.path));
      // A live server answers: refuse to steal its socket. Otherwise it is stale.
      asio::local::stream_protocol::socket probe(io);
      probe.connect(asio::local::stream_protocol::endpoint(ep.path), ec);
      if (!ec) return unexpected(fmt::format("{} is in use by a running server", ep.path));
      ::unlink(ep.path.c_str());
    }
    asio::local::stream_protocol::acceptor a(io);
    asio::local::stream_protocol::endpoint lep(ep.path);
    a.open(lep.protocol(), ec);
    if (!ec) a.bind(lep, ec);
    if (ec) return unexpected(fmt::format("cannot bind {}: {}", ep.path, ec.message()));
    ::chmod(ep.path.c_str(), unix_mode);
    a.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) return unexpected(fmt::format("cannot listen on {}: {}", ep.path, ec.message()));
    GenericAcceptor g(io);
    g.assign(asio::generic::stream_protocol(AF_UNIX, 0), a.release());
    return g;
  }
  // tcp: and tls: both listen on TCP; TLS is layered on accepted sockets (tls.hpp).
  asio::ip::tcp::resolver resolver(io);
  auto results = resolver.resolve(ep.host, std::to_string(ep.port), ec);
  if (ec || results.empty()) return unexpected(fmt::format("cannot resolve {}: {}", ep.host, ec.message()));
  auto tep = results.begin()->endpoint();
  asio::ip::tcp::acceptor a(io);
  a.open(tep.protocol(), ec);
  if (!ec) a.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) a.bind(tep, ec);
  if (!ec) a.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return unexpected(fmt::format("cannot listen on {}: {}", ep.to_string(), ec.message()));
  GenericAcceptor g(io);
  g.assign(asio::generic::stream_protocol(tep.protocol().family(), IPPROTO_TCP), a.release());
  return g;
}

}  // namespace cardbridge::transport
