#include "session.hpp"

#include <sys/stat.h>

#include <cstdlib>
#include <string_view>

#include <fmt/format.h>

namespace cardbridge::session {

const char* type_name(SessionType t) {
  switch (t) {
    case SessionType::kXrdp: return "xrdp";
    case SessionType::kFreerdpHost: return "freerdp-host";
    case SessionType::kTlsDesk: return "tls";
    case SessionType::kNone: return "none";
  }
  return "none";
}

namespace {

std::optional<int> display_number(const std::string& display) {
  auto colon = display.rfind(':');
  if (colon == std::string::npos) return std::nullopt;
  int n = 0;
  bool digits = false;
  for (std::size_t i = colon + 1; i < display.size() && display[i] != '.'; ++i) {
    if (display[i] < '0' || display[i] > '9') return std::nullopt;
    n = n * 10 + (display[i] - '0');
    digits = true;
  }
  if (!digits) return std::nullopt;
  return n;
}

bool safe_key(std::string_view k) {
  if (k.empty() || k.size() > 64) return false;
  for (char c : k) {
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_'))
      return false;
  }
  return true;
}

}  // namespace

SessionPaths detect(const Env& env, const Exists& exists, unsigned uid) {
  SessionPaths p;
  auto rt = env("XDG_RUNTIME_DIR");
  p.runtime_dir = rt && !rt->empty() ? *rt : fmt::format("/run/user/{}", uid);
  p.relay_socket = p.runtime_dir + "/cardbridge/desk.sock";
  p.display = env("DISPLAY").value_or("");

  const auto dn = display_number(p.display);
  bool xrdp = env("XRDP_SESSION").has_value();
  if (!xrdp && dn) {
    for (const char* d : {"/run/xrdp/sockdir", "/var/run/xrdp/sockdir"}) {
      if (exists(fmt::format("{}/xrdpapi_{}", d, *dn))) xrdp = true;
    }
  }
  auto explicit_desk = env("CARDBRIDGE_DESK");
  if (explicit_desk && explicit_desk->starts_with("tls:")) {
    p.type = SessionType::kTlsDesk;
    p.desk_spec = *explicit_desk;
  } else if (xrdp) {
    p.type = SessionType::kXrdp;
    p.desk_spec = "xrdp";
  } else if (exists(p.relay_socket)) {
    p.type = SessionType::kFreerdpHost;
    p.desk_spec = "unix:" + p.relay_socket;
  } else {
    p.type = SessionType::kNone;
    p.desk_spec = "unix:" + p.relay_socket;  // a host may still bring the relay up later
  }
  if (explicit_desk && !explicit_desk->empty() && p.type != SessionType::kTlsDesk) p.desk_spec = *explicit_desk;

  if (auto k = env("CARDBRIDGE_SESSION"); k && safe_key(*k)) {
    p.key = *k;
  } else if (xrdp && dn) {
    p.key = fmt::format("xrdp-{}", *dn);
  } else if (auto sid = env("XDG_SESSION_ID"); sid && safe_key(*sid)) {
    p.key = "s" + *sid;
  } else {
    p.key = "default";
  }
  p.dir = p.runtime_dir + "/cardbridge/" + p.key;
  p.socket = p.dir + "/pcscd.comm";
  p.control = p.socket + ".ctl";
  p.pid_file = p.dir + "/cdrsession.pid";
  return p;
}

Env process_env() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (!v) return std::nullopt;
    return std::string(v);
  };
}

Exists file_exists() {
  return [](const std::string& path) {
    struct stat st {};
    return ::lstat(path.c_str(), &st) == 0;
  };
}

}  // namespace cardbridge::session
