// The standalone desk agent's server: accepts server shims (or relays) on a UNIX or
// loopback TCP socket and gives each connection its own DeskRuntime.
#pragma once

#include <functional>
#include <memory>
#include <set>

#include "cardbridge/transport/fd_reserve.hpp"
#include "cardbridge/transport/stream.hpp"
#include "cardbridge/transport/tls.hpp"
#include "cardbridge/desk_core/card_api.hpp"
#include "cardbridge/desk_runtime/desk_runtime.hpp"

namespace cardbridge::client {

class DeskServer {
 public:
  // |tls|: when set, every accepted connection must complete a mutual TLS handshake.
  DeskServer(boost::asio::io_context& io, CardApi& api, DeskConfig config, transport::TlsContext tls = nullptr);
  ~DeskServer();
  Result<bool, std::string> listen(const transport::Endpoint& ep);
  void stop();
  // At most |n| server connections at once (each costs two threads, a reader monitor's
  // PC/SC context and a lane per server context): past it, a new connection is closed at
  // once, with one warning per episode. 0: no limit.
  void set_max_connections(std::size_t n) { max_connections_ = n; }

 private:
  class Connection;
  void accept();
  std::shared_ptr<Connection> new_connection();

  boost::asio::io_context& io_;
  CardApi& api_;
  DeskConfig config_;
  transport::TlsContext tls_;
  std::optional<transport::GenericAcceptor> acceptor_;
  transport::AcceptFailures accept_failures_;  // refuses a server at the fd limit rather than leave it waiting
  std::set<std::shared_ptr<Connection>> connections_;
  bool stopped_ = false;
  std::size_t max_connections_ = 0;
  bool at_connection_limit_ = false;  // refusing since the last warning
};

}  // namespace cardbridge::client
