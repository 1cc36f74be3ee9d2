// The helpdesk's view of a server: every running cardbridge-shim and whose session it serves,
// found in /proc (root sees every user's; others their own). Used by `cdrsession status --all`
// and `cdrsession doctor --user NAME`.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace cardbridge::session {

struct RunningShim {
  int pid = 0;
  unsigned uid = 0;
  std::string user;     // login name ("" if unknown)
  std::string session;  // its CARDBRIDGE_SESSION, else the name of its socket's directory
  std::string socket;   // the pcsc-lite socket it serves (--socket, else its default)
  std::string control;  // its control socket (--control, else <socket>.ctl)
};

// Every shim process readable here, by user then session.
std::vector<RunningShim> find_shims(const std::string& proc = "/proc");

// What the programs of |uid| carry in their environment (root reads /proc/PID/environ):
// how many point PCSCLITE_CSOCK_NAME at |socket|, and the CARDBRIDGE_START_ERROR values
// (a failed session start) found among them.
struct ProgramsView {
  int examined = 0;     // processes of |uid| whose environment could be read
  int with_socket = 0;  // of which with PCSCLITE_CSOCK_NAME=|socket|
  std::vector<std::string> start_errors;
};
ProgramsView programs_of(unsigned uid, const std::string& socket, const std::string& proc = "/proc");

// Pure helpers (unit-tested): the shim's socket, control socket and session from its argv and
// environment ("KEY=value" entries).
struct ShimArgs {
  std::string socket;
  std::string control;
  std::string session;
};
ShimArgs parse_shim_args(const std::vector<std::string>& argv, const std::vector<std::string>& environ, unsigned uid);

// The uid of login |name|, nullopt when there is no such user.
std::optional<unsigned> uid_of(const std::string& name);

}  // namespace cardbridge::session
