// Logging set-up shared by every program: spdlog to stderr, named loggers per component
// ("cardbridge.shim.conn"). Levels: trace, debug, info, warn, error, critical, off.
#pragma once

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <spdlog/spdlog.h>

namespace cardbridge::log {

// Parses a level name; nullopt when unknown.
std::optional<spdlog::level::level_enum> parse_level(std::string_view name);
// Installs the stderr sink and the default level for every logger. Safe to call again.
void init(spdlog::level::level_enum level, std::string_view program);
// A named logger sharing the stderr sink (created on first use).
std::shared_ptr<spdlog::logger> get(const std::string& name);
// From now on every logger (existing and future) writes to |sink| instead of stderr: the
// journal (cardbridge::journal), FreeRDP's WLog (the add-in). Call at start-up, before other
// threads log.
void set_sink(spdlog::sink_ptr sink);

// A component's named logger, resolved once on first use. The one way code gets a logger:
//   namespace { log::Channel logger{"cardbridge.shim"}; }
//   logger->info("...");
// spdlog checks the level before it formats: pass arguments whose formatting is costly as
// lazily formatted values (see redact.hpp), never as pre-built strings.
class Channel {
 public:
  explicit Channel(const char* name) : name_(name) {}
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;
  spdlog::logger* operator->() const { return &resolve(); }
  spdlog::logger& operator*() const { return resolve(); }

 private:
  spdlog::logger& resolve() const;
  const char* name_;
  // Loggers are registered for the life of the process (never dropped): a plain pointer.
  mutable std::atomic<spdlog::logger*> cached_{nullptr};
};

// Text that came from a peer (names, messages), made safe for a log line: control
// characters, backslashes and non-ASCII bytes become \xNN, and it is cut at 256 bytes.
std::string printable(std::string_view peer_text);

}  // namespace cardbridge::log
