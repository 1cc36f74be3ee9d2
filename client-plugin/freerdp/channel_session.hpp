// ChannelSession: the desk (a DeskRuntime) behind an RDP virtual channel (static or
// dynamic). The FreeRDP-specific code only moves bytes: incoming chunks go to feed(),
// outgoing frames leave through the write function given at construction (called from the
// runtime's threads). No PC/SC call ever runs on FreeRDP's threads (the runtime's lanes
// make them), nothing here throws, and shutting down never waits for a card on FreeRDP's
// thread (the Janitor does).
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "cardbridge/desk_core/card_api.hpp"
#include "cardbridge/desk_runtime/desk_runtime.hpp"
#include "cardbridge/desk_runtime/janitor.hpp"

namespace cardbridge::client {

// Options given with /vc:cardbridge,KEY:VALUE,... or /dvc:cardbridge,KEY:VALUE,... They narrow
// the admin's policy (/etc/cardbridge/desk.conf [desk]), never widen it.
struct AddinOptions {
  std::string log_level;        // "" = FreeRDP's (/log-level, WLOG_LEVEL) for com.cardbridge
  std::string readers;          // reader filter (comma-free list separated by '+', ';' or '|')
  std::string deny_readers;     // readers never exposed (same syntax)
  std::string allow_control;    // "" = the default, pinpad
  std::string allow_set_attrib; // "" = the default, none
  bool log_card_data = false;   // unsafe-log-card-data: diagnostics only (personal data)
  std::string name;             // desk name shown on the server; default: desk.conf's, else the client host name
  // image:on|off; unset: on. off: the desk never reads a card on its own (docs/admin-guide.md);
  // desk.conf's card-image = off wins over image:on.
  std::optional<bool> card_image;
  static AddinOptions parse(int argc, char** argv, std::string* error);
};

class ChannelSession {
 public:
  using Writer = std::function<bool(std::vector<uint8_t> frame)>;  // thread-safe
  // |link|: which channel, for the audit trail ("rdp static channel CBRIDGE").
  ChannelSession(const AddinOptions& options, std::string default_name, Writer writer, std::string link = {});
  ~ChannelSession();

  void opened();                               // the channel is open: hello
  void feed(const uint8_t* data, std::size_t n);  // bytes from the server, any chunking
  void closed();                               // the channel went away
  void shutdown();                             // the client terminates

 private:
  Writer writer_;
  std::unique_ptr<DeskRuntime> runtime_;
  std::unique_ptr<TimerThread> timer_;  // hello retries
};

// Log set-up for the add-in (once per process): FreeRDP's WLog (wlog_sink.hpp).
void init_addin_logging(const std::string& level);

}  // namespace cardbridge::client
