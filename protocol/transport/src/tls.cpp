#include "cardbridge/transport/tls.hpp"

#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <cstdlib>

#include <fmt/format.h>

#include "stream_impl.hpp"

namespace cardbridge::transport {

template class BasicByteStream<TlsSocket>;

namespace {
constexpr auto kHandshakeTimeout = std::chrono::seconds(10);

std::string subject_of(TlsSocket& s) {
  X509* cert = SSL_get_peer_certificate(s.native_handle());
  if (!cert) return "";
  char buf[512] = {};
  X509_NAME_oneline(X509_get_subject_name(cert), buf, sizeof buf - 1);
  X509_free(cert);
  return buf;
}
}  // namespace

void TlsConfig::fill_from_environment() {
  auto get = [](const char* name, std::string& field) {
    if (!field.empty()) return;
    if (const char* v = std::getenv(name)) field = v;
  };
  get("CARDBRIDGE_TLS_CERT", certificate);
  get("CARDBRIDGE_TLS_KEY", private_key);
  get("CARDBRIDGE_TLS_CA", ca);
  get("CARDBRIDGE_TLS_PEER_NAME", peer_name);
}

Result<TlsContext, std::string> make_tls_context(const TlsConfig& c, bool server) {
  if (!c.complete()) return unexpected(std::string("TLS needs a certificate, its key and a CA (mutual authentication)"));
  auto ctx = std::make_shared<asio::ssl::context>(server ? asio::ssl::context::tls_server : asio::ssl::context::tls_client);
  if (SSL_CTX_set_min_proto_version(ctx->native_handle(), TLS1_3_VERSION) != 1)
    return unexpected(std::string("this OpenSSL cannot do TLS 1.3"));
  boost::system::error_code ec;
  ctx->set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_compression, ec);
  ctx->use_certificate_chain_file(c.certificate, ec);
  if (ec) return unexpected(fmt::format("certificate {}: {}", c.certificate, ec.message()));
  ctx->use_private_key_file(c.private_key, asio::ssl::context::pem, ec);
  if (ec) return unexpected(fmt::format("private key {}: {}", c.private_key, ec.message()));
  if (SSL_CTX_check_private_key(ctx->native_handle()) != 1)
    return unexpected(std::string("the private key does not match the certificate"));
  ctx->load_verify_file(c.ca, ec);
  if (ec) return unexpected(fmt::format("CA {}: {}", c.ca, ec.message()));
  ctx->set_verify_mode(asio::ssl::verify_peer | asio::ssl::verify_fail_if_no_peer_cert, ec);
  if (ec) return unexpected(ec.message());
  return ctx;
}

void async_connect_tls(asio::io_context& io, const Endpoint& ep, TlsContext ctx, std::string peer_name,
                       std::function<void(std::shared_ptr<Stream>, std::string)> done) {
  Endpoint tcp = ep;
  tcp.kind = Endpoint::Kind::kTcp;
  async_connect(io, tcp, [&io, ctx, peer_name, done](std::optional<GenericSocket> sock, std::string err) {
    if (!sock) return done(nullptr, err);
    asio::ip::tcp::socket plain(io);
    boost::system::error_code ec;
    const auto local = sock->local_endpoint(ec);
    if (ec) return done(nullptr, ec.message());
    const bool v6 = local.protocol().family() == AF_INET6;
    const auto fd = sock->release(ec);
    if (ec) return done(nullptr, ec.message());
    plain.assign(v6 ? asio::ip::tcp::v6() : asio::ip::tcp::v4(), fd, ec);
    if (ec) return done(nullptr, ec.message());
    auto tls = std::make_shared<TlsSocket>(std::move(plain), *ctx);
    if (!peer_name.empty()) {
      tls->set_verify_callback(asio::ssl::host_name_verification(peer_name), ec);
      SSL_ctrl(tls->native_handle(), SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name,
               const_cast<char*>(peer_name.c_str()));  // SSL_set_tlsext_host_name, without its C cast
    }
    auto timer = std::make_shared<asio::steady_timer>(io, kHandshakeTimeout);
    timer->async_wait([tls](boost::system::error_code e) {
      if (!e) {
        boost::system::error_code ignored;
        tls->lowest_layer().close(ignored);
      }
    });
    tls->async_handshake(asio::ssl::stream_base::client, [tls, timer, ctx, done](boost::system::error_code hec) {
      timer->cancel();
      if (hec) return done(nullptr, "TLS handshake: " + hec.message());
      done(std::make_shared<TlsByteStream>(std::move(*tls)), "");
    });
  });
}

void async_accept_tls(GenericSocket tcp, TlsContext ctx,
                      std::function<void(std::shared_ptr<Stream>, std::string, std::string)> done) {
  auto& io = static_cast<asio::io_context&>(tcp.get_executor().context());
  asio::ip::tcp::socket plain(io);
  boost::system::error_code ec;
  const auto local = tcp.local_endpoint(ec);
  if (ec) return done(nullptr, "", ec.message());
  const bool v6 = local.protocol().family() == AF_INET6;
  const auto fd = tcp.release(ec);
  if (ec) return done(nullptr, "", ec.message());
  plain.assign(v6 ? asio::ip::tcp::v6() : asio::ip::tcp::v4(), fd, ec);
  if (ec) return done(nullptr, "", ec.message());
  auto tls = std::make_shared<TlsSocket>(std::move(plain), *ctx);
  auto timer = std::make_shared<asio::steady_timer>(io, kHandshakeTimeout);
  timer->async_wait([tls](boost::system::error_code e) {
    if (!e) {
      boost::system::error_code ignored;
      tls->lowest_layer().close(ignored);
    }
  });
  tls->async_handshake(asio::ssl::stream_base::server, [tls, timer, ctx, done](boost::system::error_code hec) {
    timer->cancel();
    if (hec) return done(nullptr, "", "TLS handshake: " + hec.message());
    auto subject = subject_of(*tls);
    done(std::make_shared<TlsByteStream>(std::move(*tls)), subject, "");
  });
}

}  // namespace cardbridge::transport
