#include "desk_server.hpp"

#include <sys/un.h>
#include <unistd.h>

#include "cardbridge/support/log.hpp"
#include "cardbridge/desk_runtime/janitor.hpp"

namespace cardbridge::client {

namespace {
log::Channel logger{"cardbridge.desk.server"};
}  // namespace

// One server connection and the desk runtime serving it.
//  * Plain socket: the runtime takes the socket over (DeskRuntime::serve_socket): its own
//    threads read requests, make the PC/SC calls and write the replies, with no hop through
//    this io_context.
//  * TLS: the stream belongs to the io_context thread; the runtime is fed from it and its
//    frames are posted back to it.
class DeskServer::Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(boost::asio::io_context& io, CardApi& api, DeskConfig cfg,
             std::function<void(std::shared_ptr<Connection>)> on_gone)
      : io_(io), timer_(io), on_gone_(std::move(on_gone)) {
    runtime_ = std::make_unique<DeskRuntime>(api, std::move(cfg), DeskRuntime::Io{});
  }

  void start_socket(int fd, PeerIdentity peer) {
    std::weak_ptr<Connection> weak = shared_from_this();
    runtime_->start();
    runtime_->serve_socket(fd, std::move(peer), [io_ptr = &io_, weak](const std::string& reason) {
      boost::asio::post(*io_ptr, [weak, reason] {
        if (auto c = weak.lock()) c->on_closed(reason);
      });
    });
  }

  void start_stream(std::shared_ptr<transport::Stream> stream) {
    stream_ = std::move(stream);
    auto self = shared_from_this();
    std::weak_ptr<Connection> weak = self;
    std::weak_ptr<transport::Stream> weak_stream = stream_;
    auto* io_ptr = &io_;
    runtime_->set_io([io_ptr, weak_stream](std::vector<uint8_t> frame) {
      boost::asio::post(*io_ptr, [weak_stream, f = std::move(frame)]() mutable {
        if (auto s = weak_stream.lock()) s->send(std::move(f));
      });
    }, [io_ptr, weak_stream](const std::string& reason) {
      boost::asio::post(*io_ptr, [weak_stream, reason] {
        if (auto s = weak_stream.lock()) s->close_after_flush(reason);
      });
    }, [io_ptr, weak](std::optional<TimePoint> when) {
      // Armed from the runtime's threads: the timer belongs to the io thread.
      boost::asio::post(*io_ptr, [weak, when] {
        if (auto c = weak.lock()) c->arm(when);
      });
    });
    runtime_->start();
    stream_->start([self](std::span<const uint8_t> data) {
                     if (self->runtime_) self->runtime_->receive(data);
                   },
                   [self](const std::string& reason) { self->on_closed(reason); });
    runtime_->transport_up(stream_->peer());
  }

  void stop() {
    if (stream_) stream_->close("desk agent stopping");
    finish();
  }

 private:
  void arm(std::optional<TimePoint> when) {
    if (!runtime_) return;
    if (!when) {
      timer_.cancel();
      return;
    }
    timer_.expires_at(*when);
    timer_.async_wait([weak = weak_from_this()](boost::system::error_code ec) {
      if (ec) return;
      if (auto c = weak.lock(); c && c->runtime_) c->runtime_->tick();
    });
  }

  void on_closed(const std::string& reason) {
    logger->info("server connection closed: {}", reason);
    finish();
  }

  void finish() {
    if (!runtime_) return;
    timer_.cancel();
    runtime_->transport_down();
    runtime_->detach_io();
    Janitor::instance().dispose(std::move(runtime_));  // stopping may wait for card calls: never here
    if (on_gone_) on_gone_(shared_from_this());
  }

  boost::asio::io_context& io_;
  std::shared_ptr<transport::Stream> stream_;
  std::unique_ptr<DeskRuntime> runtime_;
  boost::asio::steady_timer timer_;
  std::function<void(std::shared_ptr<Connection>)> on_gone_;
};

DeskServer::DeskServer(boost::asio::io_context& io, CardApi& api, DeskConfig config, transport::TlsContext tls)
    : io_(io), api_(api), config_(std::move(config)), tls_(std::move(tls)) {}

DeskServer::~DeskServer() { stop(); }

Result<bool, std::string> DeskServer::listen(const transport::Endpoint& ep) {
  auto a = transport::listen(io_, ep, 0600);
  if (!a) return unexpected(a.error());
  acceptor_.emplace(std::move(*a));
  logger->info("listening on {}", ep.to_string());
  accept();
  return true;
}

void DeskServer::accept() {
  acceptor_->async_accept([this](boost::system::error_code ec, transport::GenericSocket sock) {
    if (stopped_) return;
    if (ec) {
      if (ec == boost::asio::error::operation_aborted) return;
      // Out of descriptors: refuse the waiting server with the reserve (its link closes and it
      // retries later) instead of leaving its hello unanswered; said once per episode.
      const auto step = accept_failures_.failed(ec, acceptor_->native_handle());
      if (step.in_a_row == 1) {
        logger->error("accept failed: {}; {}not logged again until a connection is accepted", ec.message(),
                      step.refused ? "new server connections are refused meanwhile; " : "");
      }
      if (step.refused) return accept();
      auto t = std::make_shared<boost::asio::steady_timer>(io_, std::chrono::milliseconds(100));
      t->async_wait([this, t](boost::system::error_code) {
        if (!stopped_) accept();
      });
      return;
    }
    if (const auto failed = accept_failures_.accepted(); failed != 0) {
      logger->info("accepting server connections again ({} failed accepts before)", failed);
    }
    if (max_connections_ != 0 && connections_.size() >= max_connections_) {
      // Refused before any byte: the shim sees its link close and retries later.
      if (!at_connection_limit_) {
        logger->warn("server connection refused: {} connections already (--max-connections); "
                     "further refusals are not logged until one closes",
                     connections_.size());
      }
      at_connection_limit_ = true;
      boost::system::error_code ignored;
      sock.close(ignored);
      accept();
      return;
    }
    transport::set_low_latency(sock);
    if (tls_) {
      // Mutual TLS: the handshake fails unless the server presents a certificate of our CA.
      transport::async_accept_tls(std::move(sock), tls_, [this](std::shared_ptr<transport::Stream> s, PeerIdentity peer,
                                                               std::string error) {
        if (stopped_) return;
        if (!s) {
          logger->warn("TLS connection refused: {}", error);
          return;
        }
        logger->info("TLS handshake done with {} (authorisation next)", peer.describe());
        new_connection()->start_stream(std::move(s));
      });
    } else {
      auto peer = transport::peer_of(sock);
      logger->info("connection from {} (authorisation next)", peer.describe());
      boost::system::error_code ignored;
      const int fd = sock.release(ignored);
      if (fd >= 0) new_connection()->start_socket(fd, std::move(peer));
    }
    accept();
  });
}

std::shared_ptr<DeskServer::Connection> DeskServer::new_connection() {
  auto conn = std::make_shared<Connection>(io_, api_, config_, [this](std::shared_ptr<Connection> c) {
    connections_.erase(c);
    if (at_connection_limit_ && connections_.size() < max_connections_) {
      at_connection_limit_ = false;
      logger->info("server connections: room again ({} of {})", connections_.size(), max_connections_);
    }
  });
  connections_.insert(conn);
  return conn;
}

void DeskServer::stop() {
  if (stopped_) return;
  stopped_ = true;
  if (acceptor_) {
    boost::system::error_code ec;
    auto ep = acceptor_->local_endpoint(ec);
    acceptor_->close(ec);
    if (!ec && ep.protocol().family() == AF_UNIX) {
      // generic endpoint of a UNIX socket: path starts after sun_family
      const auto* sun = reinterpret_cast<const sockaddr_un*>(ep.data());
      if (sun->sun_path[0] != '\0') ::unlink(sun->sun_path);
    }
  }
  auto conns = connections_;
  for (auto& c : conns) c->stop();
  connections_.clear();
}

}  // namespace cardbridge::client
