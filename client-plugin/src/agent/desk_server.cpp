#include "agent/desk_server.hpp"

#include <sys/un.h>
#include <unistd.h>

#include <thread>

#include "cardbridge/protocol/framing.hpp"
#include "cardbridge/support/log.hpp"

namespace cardbridge::client {

namespace {
std::shared_ptr<spdlog::logger> logger() {
  static auto l = log::get("cardbridge.desk.server");
  return l;
}
}  // namespace

// One server connection: bytes <-> frames <-> DeskEngine. Engine output arrives on
// engine threads and is posted to the io_context thread that owns the socket.
class DeskServer::Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(boost::asio::io_context& io, std::shared_ptr<transport::Stream> stream, CardApi& api, EngineConfig cfg,
             std::function<void(std::shared_ptr<Connection>)> on_gone)
      : io_(io), stream_(std::move(stream)), on_gone_(std::move(on_gone)) {
    std::weak_ptr<transport::Stream> weak_stream = stream_;
    auto* io_ptr = &io_;
    EngineIo eio;
    eio.send_frame = [io_ptr, weak_stream](std::vector<uint8_t> frame) {
      boost::asio::post(*io_ptr, [weak_stream, f = std::move(frame)]() mutable {
        if (auto s = weak_stream.lock()) s->send(std::move(f));
      });
    };
    eio.close_link = [io_ptr, weak_stream](const std::string& reason) {
      boost::asio::post(*io_ptr, [weak_stream, reason] {
        if (auto s = weak_stream.lock()) s->close_after_flush(reason);
      });
    };
    engine_ = std::make_unique<DeskEngine>(api, std::move(cfg), std::move(eio));
  }

  void start() {
    auto self = shared_from_this();
    engine_->start();
    stream_->start([self](std::span<const uint8_t> data) { self->on_data(data); },
                   [self](const std::string& reason) { self->on_closed(reason); });
    engine_->transport_up();
  }

  void stop() {
    stream_->close("desk agent stopping");
    finish();
  }

 private:
  void on_data(std::span<const uint8_t> data) {
    if (!frames_.feed(data)) {
      logger()->error("server sent a bad frame ({}); closing the connection",
                      protocol::to_string(*frames_.error()));
      stream_->close("bad frame");
      on_closed("bad frame");
      return;
    }
    while (auto f = frames_.next()) engine_->on_frame(*f);
  }

  void on_closed(const std::string& reason) {
    logger()->info("server connection closed: {}", reason);
    finish();
  }

  void finish() {
    if (!engine_) return;
    engine_->transport_down();
    // stop() may wait for card calls in progress: never on the io thread.
    std::thread([e = std::move(engine_)]() mutable { e->stop(); }).detach();
    if (on_gone_) on_gone_(shared_from_this());
  }

  boost::asio::io_context& io_;
  std::shared_ptr<transport::Stream> stream_;
  std::unique_ptr<DeskEngine> engine_;
  protocol::FrameDecoder frames_;
  std::function<void(std::shared_ptr<Connection>)> on_gone_;
};

DeskServer::DeskServer(boost::asio::io_context& io, CardApi& api, EngineConfig config, transport::TlsContext tls)
    : io_(io), api_(api), config_(std::move(config)), tls_(std::move(tls)) {}

DeskServer::~DeskServer() { stop(); }

Result<bool, std::string> DeskServer::listen(const transport::Endpoint& ep) {
  auto a = transport::listen(io_, ep, 0600);
  if (!a) return unexpected(a.error());
  acceptor_.emplace(std::move(*a));
  logger()->info("listening on {}", ep.to_string());
  accept();
  return true;
}

void DeskServer::accept() {
  acceptor_->async_accept([this](boost::system::error_code ec, transport::GenericSocket sock) {
    if (stopped_) return;
    if (ec) {
      if (ec == boost::asio::error::operation_aborted) return;
      logger()->error("accept failed: {}", ec.message());
      auto t = std::make_shared<boost::asio::steady_timer>(io_, std::chrono::milliseconds(100));
      t->async_wait([this, t](boost::system::error_code) {
        if (!stopped_) accept();
      });
      return;
    }
    transport::set_low_latency(sock);
    if (tls_) {
      // Mutual TLS: the handshake fails unless the server presents a certificate of our CA.
      transport::async_accept_tls(std::move(sock), tls_, [this](std::shared_ptr<transport::Stream> s, std::string subject,
                                                               std::string error) {
        if (stopped_) return;
        if (!s) {
          logger()->warn("TLS connection refused: {}", error);
          return;
        }
        logger()->info("server connected over TLS ({})", log::printable(subject));
        add_connection(std::move(s));
      });
    } else {
      logger()->info("server connected");
      add_connection(std::make_shared<transport::ByteStream>(std::move(sock)));
    }
    accept();
  });
}

void DeskServer::add_connection(std::shared_ptr<transport::Stream> stream) {
  auto conn = std::make_shared<Connection>(io_, std::move(stream), api_, config_,
                                           [this](std::shared_ptr<Connection> c) { connections_.erase(c); });
  connections_.insert(conn);
  conn->start();
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
