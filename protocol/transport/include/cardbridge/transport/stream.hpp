// Asio plumbing shared by the desk agent and the shim: a byte stream over a UNIX or TCP
// socket with one read loop and a write queue (one async_write outstanding), and helpers
// to connect and listen on an Endpoint. Single-threaded: every call happens on the
// io_context thread that runs the stream.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>  // before Boost.Asio 1.74, whose awaitable.hpp misses it under C++20
#include <vector>

#include <boost/asio.hpp>

#include "cardbridge/support/peer.hpp"
#include "cardbridge/transport/endpoint.hpp"

namespace cardbridge::transport {

namespace asio = boost::asio;
using GenericSocket = asio::generic::stream_protocol::socket;
using GenericAcceptor = asio::basic_socket_acceptor<asio::generic::stream_protocol>;

// A byte stream with one read loop and a write queue (one async_write outstanding).
// Single-threaded: every call happens on the io_context thread that runs the stream.
class Stream {
 public:
  using DataHandler = std::function<void(std::span<const uint8_t>)>;
  using CloseHandler = std::function<void(const std::string& reason)>;
  virtual ~Stream() = default;
  // Starts reading. |on_close| runs once, when the peer closes or on an error; never after
  // close() (the owner's own decision).
  virtual void start(DataHandler on_data, CloseHandler on_close) = 0;
  virtual void send(std::vector<uint8_t> bytes) = 0;
  // Closes now (pending writes are dropped). The handlers given to start() never run again
  // and are released (soon after, from the io_context: close() may be called from one).
  virtual void close(const std::string& reason = "closed locally") = 0;
  // Closes once the queued writes are on the wire.
  virtual void close_after_flush(const std::string& reason) = 0;
  virtual bool is_open() const = 0;
  virtual std::size_t queued_bytes() const = 0;
  // Who is at the other end, as far as this transport can tell: a UNIX socket's peer
  // credentials, a TLS peer's verified certificate, an RDP channel; plain TCP proves nothing.
  virtual PeerIdentity peer() const = 0;
};

// Stream over an Asio stream socket type S (a UNIX/TCP socket, or a TLS stream).
template <typename S>
class BasicByteStream final : public Stream, public std::enable_shared_from_this<BasicByteStream<S>> {
 public:
  explicit BasicByteStream(S socket);
  ~BasicByteStream() override;

  void start(DataHandler on_data, CloseHandler on_close) override;
  void send(std::vector<uint8_t> bytes) override;
  void close(const std::string& reason = "closed locally") override;
  void close_after_flush(const std::string& reason) override;
  bool is_open() const override { return open_; }
  std::size_t queued_bytes() const override { return queued_bytes_; }
  PeerIdentity peer() const override;
  // TLS: the identity the handshake verified (plain sockets compute theirs).
  void set_peer(PeerIdentity p) { peer_ = std::move(p); }
  S& socket() { return socket_; }

 private:
  void do_read();
  void do_write();
  void finish(const std::string& reason);
  void release_handlers();  // destroys the handlers from the io_context (we may be in one)

  S socket_;
  std::vector<uint8_t> read_buf_;
  std::deque<std::vector<uint8_t>> writes_;
  std::size_t queued_bytes_ = 0;
  bool writing_ = false;
  bool open_ = true;
  bool close_when_flushed_ = false;
  std::string close_reason_;
  DataHandler on_data_;
  CloseHandler on_close_;
  PeerIdentity peer_;
};

template <>
PeerIdentity BasicByteStream<GenericSocket>::peer() const;
extern template class BasicByteStream<GenericSocket>;
using ByteStream = BasicByteStream<GenericSocket>;

// Connects to |ep|; on success |done| gets a socket, on failure an error text.
void async_connect(asio::io_context& io, const Endpoint& ep,
                   std::function<void(std::optional<GenericSocket>, std::string)> done);

// Binds a listening socket. UNIX: removes a stale socket file first (refuses if a live
// process answers on it) and applies |unix_mode| to the socket file.
Result<GenericAcceptor, std::string> listen(asio::io_context& io, const Endpoint& ep,
                                            unsigned unix_mode = 0600);

// Sets TCP_NODELAY on TCP sockets (no-op on UNIX sockets).
void set_low_latency(GenericSocket& s);

// Peer credentials of a connected UNIX socket; nullopt for TCP or on error.
struct PeerCred {
  int pid = 0;
  unsigned uid = 0;
  unsigned gid = 0;
};
std::optional<PeerCred> peer_credentials(GenericSocket& s);
// A plain socket's peer: a UNIX peer's credentials, else the TCP address (which proves nothing).
PeerIdentity peer_of(GenericSocket& s);

}  // namespace cardbridge::transport
