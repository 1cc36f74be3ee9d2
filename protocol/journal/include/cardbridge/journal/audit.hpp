// The audit trail: which user, in which session, at which desk, used which reader and card,
// from which program. Never APDU contents, PINs or card data (the holder's identity).
//
// One journald entry per event (when journald runs):
//   MESSAGE               one line for people ("card connected: reader='...' ...")
//   PRIORITY=5            notice
//   SYSLOG_FACILITY=10    authpriv (what syslog-based collectors route as security)
//   SYSLOG_IDENTIFIER     the program (cardbridge-shim, cardbridge-desk, cardbridge-client)
//   MESSAGE_ID            kMessageId, the same for every CardBridge audit event
//   CARDBRIDGE_EVENT      what happened (see Event)
//   CARDBRIDGE_<FIELD>    the event's fields: USER, UID, SESSION, DESK, DESK_LINK,
//                         DESK_SOFTWARE, SERVER, READER, ATR, CARD, SHARE, PROGRAM_PID,
//                         PROGRAM_EXE, REASON, CONTROL_CODE (only those that apply)
// Without journald: syslog(authpriv.notice), "MESSAGE [FIELD=value ...]".
//
//   journalctl MESSAGE_ID=1a9cbc1bf7d440baa3b7681f03d7ca32           the whole trail
//   journalctl CARDBRIDGE_EVENT=card-connected CARDBRIDGE_USER=alice  one user's card use
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace cardbridge::audit {

inline constexpr const char* kMessageId = "1a9cbc1bf7d440baa3b7681f03d7ca32";

struct Event {
  // Server (shim): desk-connected, desk-disconnected, reader-added, reader-removed,
  // card-inserted, card-removed, card-connected. Desk (agent, add-in): server-connected,
  // server-disconnected, card-connected, control-refused, reader-hidden.
  std::string event;
  std::string message;
  std::vector<std::pair<std::string, std::string>> fields;  // upper-case names, no prefix

  Event(std::string event_name, std::string text) : event(std::move(event_name)), message(std::move(text)) {}
  // Adds CARDBRIDGE_|name|=|value| (skipped when |value| is empty).
  Event& with(std::string name, std::string value);
};

// The SYSLOG_IDENTIFIER of this process's audit entries (default "cardbridge").
void set_identifier(std::string program);
// Records |e| as described above. Thread-safe; never throws.
void emit(const Event& e);

// The journald fields of |e| ("NAME=value"), as emit() sends them.
std::vector<std::string> journal_fields(const Event& e, const std::string& identifier);
// The syslog line of |e| (without journald).
std::string syslog_line(const Event& e);

// The login name of |uid| ("" when unknown), and the executable of process |pid| ("" when it
// cannot be read: another user's process, or gone).
std::string user_name(unsigned uid);
std::string executable_of(int pid);

}  // namespace cardbridge::audit
