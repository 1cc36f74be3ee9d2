#include "cardbridge/transport/endpoint.hpp"

#include <charconv>

#include <fmt/format.h>

namespace cardbridge::transport {

Result<Endpoint, std::string> Endpoint::parse(std::string_view text) {
  Endpoint ep;
  if (text.starts_with("unix:")) {
    ep.kind = Kind::kUnix;
    ep.path = std::string(text.substr(5));
    if (ep.path.empty()) return unexpected(std::string("unix: needs a path"));
    if (ep.path.size() > 107) return unexpected(std::string("unix socket path longer than 107 bytes"));
    return ep;
  }
  if (text.starts_with("tcp:") || text.starts_with("tls:")) {
    const bool tls = text.starts_with("tls:");
    auto rest = text.substr(4);
    auto colon = rest.rfind(':');
    if (colon == std::string_view::npos || colon == 0)
      return unexpected(std::string(tls ? "tls: needs HOST:PORT" : "tcp: needs HOST:PORT"));
    ep.kind = tls ? Kind::kTls : Kind::kTcp;
    ep.host = std::string(rest.substr(0, colon));
    if (ep.host.size() >= 2 && ep.host.front() == '[' && ep.host.back() == ']')
      ep.host = ep.host.substr(1, ep.host.size() - 2);
    if (ep.host.empty() || ep.host.find_first_of("[]") != std::string::npos)
      return unexpected(fmt::format("bad TCP host in '{}'", text));
    auto port_text = rest.substr(colon + 1);
    unsigned port = 0;
    auto [p, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (ec != std::errc{} || p != port_text.data() + port_text.size() || port > 65535)
      return unexpected(fmt::format("bad TCP port '{}'", port_text));
    ep.port = static_cast<uint16_t>(port);
    return ep;
  }
  return unexpected(fmt::format("'{}': expected unix:PATH, tcp:HOST:PORT or tls:HOST:PORT", text));
}

std::string Endpoint::to_string() const {
  if (kind == Kind::kUnix) return "unix:" + path;
  const char* scheme = kind == Kind::kTls ? "tls" : "tcp";
  if (host.find(':') != std::string::npos) return fmt::format("{}:[{}]:{}", scheme, host, port);
  return fmt::format("{}:{}:{}", scheme, host, port);
}

}  // namespace cardbridge::transport
