// Logging where the admin looks, and that outlives the session: journald when it runs.
//
// Every log line becomes one journal entry with
//   MESSAGE             the text (peer-supplied text already made printable by the caller)
//   PRIORITY            syslog level: trace/debug 7, info 6, warn 4, error 3, critical 2
//   SYSLOG_IDENTIFIER   the program (cardbridge-shim, cdrsession, cardbridge-desk)
//   CARDBRIDGE_COMPONENT  the logger's name (cardbridge.shim.io, cardbridge.desk, ...)
//   CARDBRIDGE_SESSION    the session key, when the process serves one (CARDBRIDGE_SESSION)
// and journald's own trusted fields (_PID, _UID, _EXE, _SYSTEMD_UNIT, ...). Without journald,
// or when asked, the lines go to stderr as text with a timestamp.
//
//   journalctl -t cardbridge-shim -p warning      the shims' warnings and errors
//   journalctl CARDBRIDGE_SESSION=xrdp-10         one session's lines
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include <spdlog/spdlog.h>

namespace cardbridge::journal {

// journald runs here (its native socket exists).
bool available();
// This process's stderr is a journal stream (systemd units, or a stream cdrsession opened):
// $JOURNAL_STREAM names stderr's device and inode.
bool stderr_is_journal();

enum class Target { kAuto, kJournal, kStderr };
// "auto", "journal", "stderr"; nullopt when unknown.
std::optional<Target> parse_target(std::string_view name);
const char* target_name(Target t);

// The target |t| means here: kAuto is the journal when stderr is a journal stream, else
// stderr; kJournal falls back to stderr when journald does not run.
Target resolve(Target t);

// Sets up this process's logging for |program| at |level| on target |t| (resolved as above).
// Returns the target used.
Target init_logging(spdlog::level::level_enum level, std::string_view program, Target t);

// A sink writing journald entries as above (for tests and special set-ups).
spdlog::sink_ptr make_sink(std::string identifier);

// The syslog priority of a spdlog level.
int priority_of(spdlog::level::level_enum level);

// A journal stream (sd_journal_stream_fd) for a child's stderr: what it writes becomes
// journal entries of |identifier|; -1 when journald does not run. Exports nothing: the
// caller sets JOURNAL_STREAM for the child (stream_variable()).
int open_stream(const std::string& identifier, int priority);
// "JOURNAL_STREAM" value for |fd| ("<dev>:<inode>").
std::string stream_variable(int fd);

}  // namespace cardbridge::journal
