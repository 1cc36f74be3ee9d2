#include "cardbridge/transport/tls.hpp"

#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>

#include <fmt/format.h>

#include "stream_impl.hpp"

namespace cardbridge::transport {


template <>
PeerIdentity BasicByteStream<TlsSocket>::peer() const {
  return peer_;  // what the handshake verified (finish_handshake)
}

template class BasicByteStream<TlsSocket>;

namespace {
constexpr auto kHandshakeTimeout = std::chrono::seconds(10);

struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
using X509Ptr = std::unique_ptr<X509, X509Free>;

PeerIdentity identity_of(X509* cert, std::string address) {
  PeerIdentity p;
  p.kind = PeerIdentity::Kind::kTlsCertificate;
  p.address = std::move(address);
  char cn[256] = {};
  if (X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn, sizeof cn - 1) > 0) p.common_name = cn;
  if (auto* sans = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr))) {
    for (int i = 0; i < sk_GENERAL_NAME_num(sans); ++i) {
      const GENERAL_NAME* n = sk_GENERAL_NAME_value(sans, i);
      if (n->type != GEN_DNS) continue;
      const auto* s = n->d.dNSName;
      p.dns_names.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                               static_cast<std::size_t>(ASN1_STRING_length(s)));
    }
    GENERAL_NAMES_free(sans);
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (X509_digest(cert, EVP_sha256(), md, &n) == 1) {
    static constexpr char kDigits[] = "0123456789abcdef";
    for (unsigned i = 0; i < n; ++i) {
      p.fingerprint.push_back(kDigits[md[i] >> 4]);
      p.fingerprint.push_back(kDigits[md[i] & 0x0F]);
    }
  }
  return p;
}

// The peer's certificate must say what it is for: serverAuth for a desk (we are its TLS
// client), clientAuth for a server (we are its TLS server). A certificate without the
// extension is refused too: "any purpose" is not a CardBridge role.
std::optional<std::string> role_problem(X509* cert, bool peer_is_server) {
  const uint32_t want = peer_is_server ? XKU_SSL_SERVER : XKU_SSL_CLIENT;
  if (!(X509_get_extension_flags(cert) & EXFLAG_XKUSAGE))
    return std::string("the certificate has no extended key usage (") + (peer_is_server ? "serverAuth" : "clientAuth") +
           " required)";
  if (!(X509_get_extended_key_usage(cert) & want))
    return std::string("the certificate's extended key usage lacks ") + (peer_is_server ? "serverAuth" : "clientAuth");
  return std::nullopt;
}

// Why a handshake failed, with the certificate check's own reason when that was it (OpenSSL's
// chain verification also refuses a certificate whose extended key usage names another role:
// "unsupported certificate purpose").
std::string handshake_error(TlsSocket& tls, const boost::system::error_code& ec) {
  const long verify = SSL_get_verify_result(tls.native_handle());
  if (verify != X509_V_OK)
    return fmt::format("TLS handshake: {} ({})", ec.message(), X509_verify_cert_error_string(verify));
  return "TLS handshake: " + ec.message();
}

// After a successful handshake (chain verified against the CA): the role check and the identity.
void finish_handshake(const std::shared_ptr<TlsSocket>& tls, bool peer_is_server, const TlsDone& done) {
  X509Ptr cert(SSL_get_peer_certificate(tls->native_handle()));
  if (!cert) return done(nullptr, {}, "the peer presented no certificate");
  if (auto why = role_problem(cert.get(), peer_is_server)) {
    boost::system::error_code ignored;
    tls->lowest_layer().close(ignored);
    return done(nullptr, {}, *why);
  }
  boost::system::error_code ec;
  const auto remote = tls->lowest_layer().remote_endpoint(ec);
  auto who = identity_of(cert.get(), ec ? std::string{} : fmt::format("{}:{}", remote.address().to_string(), remote.port()));
  auto stream = std::make_shared<TlsByteStream>(std::move(*tls));
  stream->set_peer(who);
  done(std::move(stream), std::move(who), "");
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

// A private key is one process owner's secret: a key other users can read (a shared server key
// for every session, a group-readable file) would let any of them be this end of the link.
static std::optional<std::string> key_file_problem(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;  // the load below says why
  if (st.st_uid != ::geteuid())
    return fmt::format("private key {} belongs to uid {}, not to this process's user (uid {})", path, st.st_uid,
                       ::geteuid());
  if (st.st_mode & (S_IRWXG | S_IRWXO))
    return fmt::format("private key {} is accessible to other users (mode {:04o}): chmod 600 it, one key per user "
                       "(docs/security.md)",
                       path, st.st_mode & 07777);
  return std::nullopt;
}

Result<TlsContext, std::string> make_tls_context(const TlsConfig& c, bool server) {
  if (!c.complete()) return unexpected(std::string("TLS needs a certificate, its key and a CA (mutual authentication)"));
  if (auto why = key_file_problem(c.private_key)) return unexpected(*why);
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

PeerIdentity identity_of_certificate(const std::vector<uint8_t>& der, std::string address) {
  const unsigned char* p = der.data();
  X509Ptr cert(d2i_X509(nullptr, &p, static_cast<long>(der.size())));
  if (!cert) return {};
  return identity_of(cert.get(), std::move(address));
}

// Both ends: TLS over an established TCP connection, the handshake bounded by
// kHandshakeTimeout, then the peer's role check and identity (finish_handshake). The client
// names the desk it expects in SNI (|peer_name|, may be empty).
static void handshake(asio::io_context& io, GenericSocket tcp, TlsContext ctx, bool we_are_client,
                      const std::string& peer_name, TlsDone done) {
  asio::ip::tcp::socket plain(io);
  boost::system::error_code ec;
  const auto local = tcp.local_endpoint(ec);
  if (ec) return done(nullptr, {}, ec.message());
  const bool v6 = local.protocol().family() == AF_INET6;
  const auto fd = tcp.release(ec);
  if (ec) return done(nullptr, {}, ec.message());
  plain.assign(v6 ? asio::ip::tcp::v6() : asio::ip::tcp::v4(), fd, ec);
  if (ec) return done(nullptr, {}, ec.message());
  auto tls = std::make_shared<TlsSocket>(std::move(plain), *ctx);
  if (we_are_client && !peer_name.empty()) {
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
  const auto type = we_are_client ? asio::ssl::stream_base::client : asio::ssl::stream_base::server;
  tls->async_handshake(type, [tls, timer, ctx, we_are_client, done](boost::system::error_code hec) {
    timer->cancel();
    if (hec) return done(nullptr, {}, handshake_error(*tls, hec));
    finish_handshake(tls, /*peer_is_server=*/we_are_client, done);
  });
}

void async_connect_tls(asio::io_context& io, const Endpoint& ep, TlsContext ctx, std::string peer_name, TlsDone done) {
  Endpoint tcp = ep;
  tcp.kind = Endpoint::Kind::kTcp;
  async_connect(io, tcp, [&io, ctx, peer_name, done](std::optional<GenericSocket> sock, std::string err) {
    if (!sock) return done(nullptr, {}, err);
    handshake(io, std::move(*sock), ctx, /*we_are_client=*/true, peer_name, done);
  });
}

void async_accept_tls(GenericSocket tcp, TlsContext ctx, TlsDone done) {
  auto& io = static_cast<asio::io_context&>(tcp.get_executor().context());
  handshake(io, std::move(tcp), std::move(ctx), /*we_are_client=*/false, {}, std::move(done));
}

}  // namespace cardbridge::transport
