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
  std::string runtime_dir;   // $XDG_RUNTIME_DIR or /run/user/<uid>
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

}  // namespace cardbridge::session
