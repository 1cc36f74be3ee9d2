#include "cardbridge/support/peer.hpp"

#include <algorithm>
#include <cctype>

#include <fmt/format.h>

namespace cardbridge {

namespace {
std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}
}  // namespace

PeerIdentity PeerIdentity::unix_user(uint32_t uid, int pid) {
  PeerIdentity p;
  p.kind = Kind::kUnixUser;
  p.uid = uid;
  p.pid = pid;
  return p;
}

PeerIdentity PeerIdentity::rdp_channel(std::string what) {
  PeerIdentity p;
  p.kind = Kind::kRdpChannel;
  p.address = std::move(what);
  return p;
}

PeerIdentity PeerIdentity::insecure_tcp(std::string address) {
  PeerIdentity p;
  p.kind = Kind::kInsecureTcp;
  p.address = std::move(address);
  return p;
}

std::string PeerIdentity::describe() const {
  switch (kind) {
    case Kind::kUnixUser:
      return pid != 0 ? fmt::format("uid {} pid {}", uid, pid) : fmt::format("uid {}", uid);
    case Kind::kTlsCertificate:
      return fmt::format("certificate CN={} sha256:{}{}", common_name, fingerprint,
                         address.empty() ? "" : " from " + address);
    case Kind::kRdpChannel:
      return fmt::format("RDP channel ({})", address);
    case Kind::kInsecureTcp:
      return fmt::format("UNAUTHENTICATED tcp {}", address);
    case Kind::kNone:
      break;
  }
  return "unidentified";
}

std::optional<std::string> normalize_fingerprint(std::string text) {
  text = lower(std::move(text));
  if (text.rfind("sha256:", 0) == 0) text.erase(0, 7);
  std::string out;
  for (char c : text) {
    if (c == ':' || c == ' ') continue;
    if (!std::isxdigit(static_cast<unsigned char>(c))) return std::nullopt;
    out.push_back(c);
  }
  if (out.size() != 64) return std::nullopt;
  return out;
}

std::optional<std::string> PeerPolicy::refusal(const PeerIdentity& peer) const {
  switch (peer.kind) {
    case PeerIdentity::Kind::kUnixUser:
      if (std::find(unix_uids.begin(), unix_uids.end(), peer.uid) != unix_uids.end()) return std::nullopt;
      return fmt::format("the socket's peer is uid {}, not one allowed here", peer.uid);
    case PeerIdentity::Kind::kTlsCertificate: {
      if (tls_names.empty() && tls_fingerprints.empty())
        return std::string("no TLS peer is pinned (a name or a fingerprint must be configured)");
      for (const auto& f : tls_fingerprints) {
        if (auto n = normalize_fingerprint(f); n && *n == lower(peer.fingerprint)) return std::nullopt;
      }
      for (const auto& want : tls_names) {
        const auto w = lower(want);
        if (lower(peer.common_name) == w) return std::nullopt;
        for (const auto& d : peer.dns_names) {
          if (lower(d) == w) return std::nullopt;
        }
      }
      return fmt::format("certificate CN={} sha256:{} is not among the allowed peers", peer.common_name,
                         peer.fingerprint);
    }
    case PeerIdentity::Kind::kRdpChannel:
      if (allow_rdp_channel) return std::nullopt;
      return std::string("an RDP channel is not allowed here");
    case PeerIdentity::Kind::kInsecureTcp:
      if (allow_insecure_tcp) return std::nullopt;
      return fmt::format("plain TCP ({}) proves nothing about the peer and is not allowed", peer.address);
    case PeerIdentity::Kind::kNone:
      break;
  }
  return std::string("the peer is not identified");
}

}  // namespace cardbridge
