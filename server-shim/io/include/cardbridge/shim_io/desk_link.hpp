// The shim's link to the desk: a byte transport (stream socket today; RDP channels and
// TLS plug in behind the same interface). The link reconnects by itself with backoff;
// its owner sees up/bytes/down events on the io_context thread.
#pragma once

#include <chrono>
#include <optional>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "cardbridge/transport/endpoint.hpp"
#include "cardbridge/transport/stream.hpp"
#include "cardbridge/transport/tls.hpp"

namespace cardbridge::shim {

class DeskLink {
 public:
  struct Events {
    std::function<void(PeerIdentity)> up;  // the transport's verified peer
    std::function<void(std::span<const uint8_t>)> bytes;
    std::function<void(const std::string& reason)> down;
  };
  virtual ~DeskLink() = default;
  virtual void start(Events events) = 0;
  virtual void send(std::vector<uint8_t> bytes) = 0;
  // Drops the current connection (the peer misbehaved) and reconnects later.
  virtual void reset(const std::string& reason) = 0;
  virtual void stop() = 0;
  virtual std::string describe() const = 0;
};

// How a StreamDeskLink obtains its byte stream: connect to an endpoint, or open an RDP
// virtual channel whose server end is a socket (xrdp). Calls |done| with a socket or an
// error text, possibly synchronously.
using Connector = std::function<void(std::function<void(std::shared_ptr<transport::Stream>, std::string)> done)>;

// Polled while a connection is up: a non-empty answer (the reason) drops the connection as if
// the peer had closed it. For transports that cannot tell that the far end left (xrdp keeps a
// channel's socket open after the RDP client disconnected).
using HealthCheck = std::function<std::string()>;

// A desk link over a stream: a desk agent (or relay) on unix:PATH or tcp:HOST:PORT, a
// desk agent behind mutually authenticated TLS (tls_connector), or an xrdp virtual channel. Reconnects with exponential backoff (100 ms doubling to 2 s)
// whenever the connection is lost or cannot be made; the backoff starts again from 100 ms
// only once a connection has carried bytes from the desk (a peer that accepts and hangs up
// at once must not make us reconnect ten times a second).
class StreamDeskLink : public DeskLink, public std::enable_shared_from_this<StreamDeskLink> {
 public:
  StreamDeskLink(boost::asio::io_context& io, transport::Endpoint ep);
  StreamDeskLink(boost::asio::io_context& io, std::string description, Connector connector,
                 HealthCheck health = {}, std::chrono::milliseconds health_every = std::chrono::milliseconds{500});
  // tls:HOST:PORT with this end's certificate (mutual TLS 1.3).
  static Connector tls_connector(boost::asio::io_context& io, transport::Endpoint ep, transport::TlsContext ctx,
                                 std::string peer_name);
  void start(Events events) override;
  void send(std::vector<uint8_t> bytes) override;
  void reset(const std::string& reason) override;
  void stop() override;
  std::string describe() const override { return description_; }

 private:
  void connect();
  void schedule_retry();
  void arm_health();

  boost::asio::io_context& io_;
  std::string description_;
  Connector connector_;
  Events events_;
  std::shared_ptr<transport::Stream> stream_;
  boost::asio::steady_timer retry_;
  HealthCheck health_;
  std::chrono::milliseconds health_every_;
  boost::asio::steady_timer health_timer_;
  std::chrono::milliseconds backoff_{100};
  bool stopped_ = false;
  bool warned_ = false;
};

}  // namespace cardbridge::shim
