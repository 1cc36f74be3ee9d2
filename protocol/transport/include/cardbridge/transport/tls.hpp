// Mutually authenticated TLS for desk links that do not ride an RDP channel (Citrix ICA
// farms, or any network between desk agent and shim). TLS 1.3 only, no plaintext fallback.
// Both ends present a certificate that chains to the configured CA and carries the
// extended key usage of its role: the desk (TLS server) serverAuth, the server's shim or
// link helper (TLS client) clientAuth, so that a web server's certificate from the same CA
// cannot pose as a CardBridge server. Which peer is *allowed* (a pinned name or
// fingerprint) is the link session's decision (PeerPolicy), made on the PeerIdentity this
// layer extracts from the verified certificate.
#pragma once

#include <memory>
#include <string>

#include <boost/asio/ssl.hpp>

#include "cardbridge/support/peer.hpp"
#include "cardbridge/transport/stream.hpp"

namespace cardbridge::transport {

struct TlsConfig {
  std::string certificate;  // PEM chain of this end
  std::string private_key;  // PEM key of this end
  std::string ca;           // PEM CA(s) the peer's certificate must chain to
  std::string peer_name;    // client side: the desk's name (also sent as SNI)

  bool complete() const { return !certificate.empty() && !private_key.empty() && !ca.empty(); }
  // Fills empty fields from CARDBRIDGE_TLS_CERT, CARDBRIDGE_TLS_KEY, CARDBRIDGE_TLS_CA,
  // CARDBRIDGE_TLS_PEER_NAME.
  void fill_from_environment();
};

using TlsSocket = asio::ssl::stream<asio::ip::tcp::socket>;
template <>
PeerIdentity BasicByteStream<TlsSocket>::peer() const;
extern template class BasicByteStream<TlsSocket>;
using TlsByteStream = BasicByteStream<TlsSocket>;

using TlsContext = std::shared_ptr<asio::ssl::context>;
Result<TlsContext, std::string> make_tls_context(const TlsConfig& config, bool server);

// Connects and handshakes; |done| gets a started-to-be stream and the verified peer (its
// certificate's names and fingerprint), or an error text.
using TlsDone = std::function<void(std::shared_ptr<Stream>, PeerIdentity, std::string error)>;
void async_connect_tls(asio::io_context& io, const Endpoint& ep, TlsContext ctx, std::string peer_name, TlsDone done);

// Server side: handshakes on an accepted TCP socket.
void async_accept_tls(GenericSocket tcp, TlsContext ctx, TlsDone done);

// The identity in a DER certificate (CN, DNS names, SHA-256 fingerprint); for tests too.
PeerIdentity identity_of_certificate(const std::vector<uint8_t>& der, std::string address);

}  // namespace cardbridge::transport
