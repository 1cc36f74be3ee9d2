// `cdrsession run`: keeps one cardbridge-shim alive for the session (restarting it with
// backoff if it dies) until the session ends: SIGTERM/SIGINT/SIGHUP, or the exit of the
// session's leader process given with --until-pid (pidfd), then stops it cleanly.
#pragma once

#include <string>
#include <vector>

#include "cardbridge/session/session.hpp"

namespace cardbridge::session {

struct SupervisorOptions {
  std::string shim;                 // path of cardbridge-shim
  std::vector<std::string> shim_args;
  int until_pid = 0;                // 0: none
  std::string log_file;             // shim stderr goes here ("" = inherit)
  // When >= 0: the shim's stderr is this journal stream (journal::open_stream), announced to
  // it in JOURNAL_STREAM so that it logs journald-native; log_file is then unused.
  int journal_fd = -1;
  // Set in the shim's environment (the session key for its log and audit fields).
  std::vector<std::pair<std::string, std::string>> env;
};

int run_supervisor(const SessionPaths& paths, const SupervisorOptions& options);

// Runs the shim once with the options it would be started with plus --check-config (it parses
// its command line and server.conf, checks them and exits): "" when it accepts them, else what
// it said (its first lines, at most 300 characters), so that a typo in server.conf's [shim]
// section is named at the session's start instead of as "the shim did not come up".
std::string check_shim_options(const SupervisorOptions& options);

// Locates cardbridge-shim: next to this executable, in the build tree, or on PATH.
std::string find_shim();

}  // namespace cardbridge::session
