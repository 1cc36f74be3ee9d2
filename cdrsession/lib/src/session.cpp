#include "cardbridge/session/session.hpp"

#include <sys/stat.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
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
  const std::string logind_dir = fmt::format("/run/user/{}", uid);
  if (rt && !rt->empty()) {
    p.runtime_dir = *rt;
  } else if (!exists(logind_dir) && exists(kFallbackRuntimeBase)) {
    p.runtime_dir = fmt::format("{}/{}", kFallbackRuntimeBase, uid);
    p.runtime_fallback = true;
  } else {
    p.runtime_dir = logind_dir;
  }
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

namespace {

std::string check_private_dir(const std::string& path, unsigned uid) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return fmt::format("{}: {}", path, std::strerror(errno));
  if (S_ISLNK(st.st_mode)) return fmt::format("{} is a symbolic link: refusing it", path);
  if (!S_ISDIR(st.st_mode)) return fmt::format("{} is not a directory", path);
  if (st.st_uid != uid)
    return fmt::format("{} belongs to uid {}, not to this user (uid {}): remove it", path, st.st_uid, uid);
  if ((st.st_mode & 077) != 0 && ::chmod(path.c_str(), 0700) != 0)
    return fmt::format("{} is open to other users and cannot be made private: {}", path, std::strerror(errno));
  return {};
}

std::string make_private_dir(const std::string& path, unsigned uid) {
  if (::mkdir(path.c_str(), 0700) != 0 && errno != EEXIST)
    return fmt::format("cannot create {}: {}", path, std::strerror(errno));
  return check_private_dir(path, uid);
}

}  // namespace

std::string prepare_session_dirs(const SessionPaths& p, unsigned uid) {
  if (p.runtime_fallback) {
    struct stat st {};
    if (::lstat(kFallbackRuntimeBase, &st) != 0 || !S_ISDIR(st.st_mode))
      return fmt::format("{} is missing (cardbridge-server's tmpfiles.d entry creates it: "
                         "systemd-tmpfiles --create cardbridge-server.conf)", kFallbackRuntimeBase);
    if (st.st_uid != 0 || ((st.st_mode & S_IWOTH) && !(st.st_mode & S_ISVTX)))
      return fmt::format("{} must belong to root and be sticky (mode 1733)", kFallbackRuntimeBase);
    if (auto e = make_private_dir(p.runtime_dir, uid); !e.empty()) return e;
  } else {
    struct stat st {};
    if (::lstat(p.runtime_dir.c_str(), &st) != 0) {
      if (errno != ENOENT) return fmt::format("{}: {}", p.runtime_dir, std::strerror(errno));
      // XDG_RUNTIME_DIR names a directory that is not there: create it (not its parents).
      if (auto e = make_private_dir(p.runtime_dir, uid); !e.empty())
        return fmt::format("no runtime directory: {} (no logind session? xrdp's PAM stack may lack "
                           "pam_systemd; CardBridge falls back to {} when that exists)",
                           e, kFallbackRuntimeBase);
    } else if (auto e = check_private_dir(p.runtime_dir, uid); !e.empty()) {
      return e;
    }
  }
  if (auto e = make_private_dir(p.runtime_dir + "/cardbridge", uid); !e.empty()) return e;
  return make_private_dir(p.dir, uid);
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
