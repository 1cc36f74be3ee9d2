// Mutually authenticated TLS for desk links that do not ride an RDP channel (Citrix ICA
// farms, or any network between desk agent and shim). TLS 1.3 only, both ends present a
// certificate signed by the configured CA, no plaintext fallback. Optionally the client
// checks the server's name (subjectAltName/CN).
#pragma once

#include <memory>
#include <string>

#include <boost/asio/ssl.hpp>

#include "cardbridge/transport/stream.hpp"

namespace cardbridge::transport {

struct TlsConfig {
  std::string certificate;  // PEM chain of this end
  std::string private_key;  // PEM key of this end
  std::string ca;           // PEM CA(s) the peer's certificate must chain to
  std::string peer_name;    // client side: expected server name; empty = any name the CA signed

  bool complete() const { return !certificate.empty() && !private_key.empty() && !ca.empty(); }
  // Fills empty fields from CARDBRIDGE_TLS_CERT, CARDBRIDGE_TLS_KEY, CARDBRIDGE_TLS_CA,
  // CARDBRIDGE_TLS_PEER_NAME.
  void fill_from_environment();
};

using TlsSocket = asio::ssl::stream<asio::ip::tcp::socket>;
extern template class BasicByteStream<TlsSocket>;
using TlsByteStream = BasicByteStream<TlsSocket>;

using TlsContext = std::shared_ptr<asio::ssl::context>;
Result<TlsContext, std::string> make_tls_context(const TlsConfig& config, bool server);

// Connects and handshakes; |done| gets a started-to-be stream or an error text.
void async_connect_tls(asio::io_context& io, const Endpoint& ep, TlsContext ctx, std::string peer_name,
                       std::function<void(std::shared_ptr<Stream>, std::string)> done);

// Server side: handshakes on an accepted TCP socket. |done| gets the stream and the peer
// certificate's subject, or an error text.
void async_accept_tls(GenericSocket tcp, TlsContext ctx,
                      std::function<void(std::shared_ptr<Stream>, std::string subject, std::string error)> done);

}  // namespace cardbridge::transport
