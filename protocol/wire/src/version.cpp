#include "cardbridge/protocol/version.hpp"

#include <algorithm>

namespace cardbridge::protocol {

Hello local_hello(Role role, uint64_t capabilities) {
  Hello h;
  h.version_major = kVersionMajor;
  h.version_minor = kVersionMinor;
  h.capabilities = capabilities;
  h.role = role;
  return h;
}

std::optional<Negotiated> negotiate(const Hello& local, const Hello& remote) {
  if (local.version_major != remote.version_major) return std::nullopt;
  return Negotiated{std::min(local.version_minor, remote.version_minor),
                    local.capabilities & remote.capabilities};
}

std::string capabilities_text(uint64_t c) {
  static constexpr std::pair<uint64_t, const char*> kNames[] = {
      {caps::kReaderPush, "reader-push"},
      {caps::kDeferredBegin, "deferred-begin"},
      {caps::kPrefetchGetResponse, "prefetch-get-response"},
      {caps::kReadAhead, "read-ahead"},
      {caps::kDeskOrdering, "desk-ordering"},
      {caps::kDeskService, "desk-service"},
      {caps::kCardImage, "card-image"}};
  std::string out;
  for (auto [bit, name] : kNames) {
    if (c & bit) {
      if (!out.empty()) out += ',';
      out += name;
    }
  }
  return out.empty() ? "none" : out;
}

}  // namespace cardbridge::protocol
