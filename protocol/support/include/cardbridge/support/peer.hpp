// Who is at the other end of a desk link, as the transport established it before the first
// byte of CardBridge's protocol (PeerIdentity), and who may be (PeerPolicy). Every link is
// authorised here, in one place, by the link session (protocol::LinkSession) of both ends
// (docs/security.md): a UNIX socket's peer uid (SO_PEERCRED), a TLS peer's verified
// certificate (its names and fingerprint; chain and EKU are checked by the TLS layer), an
// RDP channel (the RDP connection authenticated the other end), or plain TCP, which proves
// nothing and is refused unless the admin allowed it by name.
//
// What a peer *declares* (the name in its hello) is never an identity: audit lines keep the
// two apart.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace cardbridge {

struct PeerIdentity {
  enum class Kind { kNone, kUnixUser, kTlsCertificate, kRdpChannel, kInsecureTcp };
  Kind kind = Kind::kNone;
  uint32_t uid = 0;                 // kUnixUser
  int pid = 0;                      // kUnixUser (0: unknown)
  std::string common_name;          // kTlsCertificate: the subject's CN
  std::vector<std::string> dns_names;  // kTlsCertificate: subjectAltName DNS entries
  std::string fingerprint;          // kTlsCertificate: SHA-256 of the certificate (lower-case hex)
  std::string address;              // kTlsCertificate, kInsecureTcp: the remote address

  static PeerIdentity unix_user(uint32_t uid, int pid);
  static PeerIdentity rdp_channel(std::string what);  // |what| goes into address ("xrdp static")
  static PeerIdentity insecure_tcp(std::string address);

  // One line for logs and the audit trail: "uid 1001 pid 4242", "certificate CN=desk-07
  // sha256:3f0a...", "RDP channel (xrdp static)", "UNAUTHENTICATED tcp 127.0.0.1:7000".
  std::string describe() const;
};

struct PeerPolicy {
  // UNIX sockets: the uids that may be the peer (the owner's and root, as a rule).
  std::vector<uint32_t> unix_uids;
  // TLS: the certificate must carry one of these names (CN or a subjectAltName DNS entry,
  // compared without case) or have one of these SHA-256 fingerprints (hex, colons allowed).
  // Both empty: no certificate is accepted (a TLS link must be pinned).
  std::vector<std::string> tls_names;
  std::vector<std::string> tls_fingerprints;
  bool allow_rdp_channel = false;
  bool allow_insecure_tcp = false;  // only with the admin's loudly named option

  // nullopt: authorised; else why not, for the log.
  std::optional<std::string> refusal(const PeerIdentity& peer) const;
};

// "sha256:AB:CD..." / "abcd..." -> "abcd..." (lower case, no separators); nullopt if not 64 hex digits.
std::optional<std::string> normalize_fingerprint(std::string text);

}  // namespace cardbridge
