// Where a session's CardBridge pieces live, and what kind of session this is.
// Pure: the environment and the file system are passed in, so that every rule is unit-
// tested.
//
// Layout (per user session, in the user's runtime directory, never under $HOME):
//   $XDG_RUNTIME_DIR/cardbridge/<session-key>/pcscd.comm      the shim's pcsc-lite socket
//   $XDG_RUNTIME_DIR/cardbridge/<session-key>/pcscd.comm.ctl  its control socket
//   $XDG_RUNTIME_DIR/cardbridge/<session-key>/cdrsession.pid  the supervisor
//   $XDG_RUNTIME_DIR/cardbridge/desk.sock                     relay socket of a FreeRDP-based host
// <session-key> is "xrdp-<display>" in an xrdp session, "s<XDG_SESSION_ID>" in a logind
// session, else "default".
//
// The runtime directory is $XDG_RUNTIME_DIR, else /run/user/<uid> (logind's), else -- on hosts
// where no logind session exists (containers, xrdp PAM stacks without pam_systemd) --
// /run/cardbridge/<uid>, below the root-owned sticky directory that cardbridge-server's
// tmpfiles.d entry creates. Never $HOME (it may be a network share).
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>

namespace cardbridge::session {

enum class SessionType { kXrdp, kFreerdpHost, kTlsDesk, kNone };
const char* type_name(SessionType t);  // "xrdp", "freerdp-host", "tls", "none"

using Env = std::function<std::optional<std::string>(const std::string&)>;
using Exists = std::function<bool(const std::string&)>;

struct SessionPaths {
  SessionType type = SessionType::kNone;
  std::string key;
  std::string runtime_dir;   // $XDG_RUNTIME_DIR, /run/user/<uid> or /run/cardbridge/<uid>
  bool runtime_fallback = false;  // runtime_dir is /run/cardbridge/<uid> (no logind directory)
  std::string dir;           // runtime_dir/cardbridge/<key>
  std::string socket;        // dir/pcscd.comm
  std::string control;       // dir/pcscd.comm.ctl
  std::string pid_file;      // dir/cdrsession.pid
  std::string relay_socket;  // runtime_dir/cardbridge/desk.sock
  std::string desk_spec;     // what `cardbridge-shim --desk` should get for this session
  std::string display;       // DISPLAY, when set
};

SessionPaths detect(const Env& env, const Exists& exists, unsigned uid);

// The real environment and file system.
Env process_env();
Exists file_exists();

// Base of the runtime directories of users without a logind one (see above).
inline constexpr const char* kFallbackRuntimeBase = "/run/cardbridge";

// Creates (0700) and checks the session's directories -- the runtime directory when it is
// CardBridge's fallback, <runtime>/cardbridge and <runtime>/cardbridge/<key> -- refusing any
// that is not a real directory owned by |uid| (a symlink, another user's, or one that others
// may write to), and a fallback base that is not root's and sticky. Returns "" when all is
// well, else what is wrong, in words an admin can act on.
std::string prepare_session_dirs(const SessionPaths& p, unsigned uid);

}  // namespace cardbridge::session
