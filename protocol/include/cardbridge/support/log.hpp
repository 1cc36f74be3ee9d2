// Logging set-up shared by every program: spdlog to stderr, named loggers per component
// ("cardbridge.shim.conn"). Levels: trace, debug, info, warn, error, critical, off.
#pragma once

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

// Text that came from a peer (names, messages), made safe for a log line: control
// characters, backslashes and non-ASCII bytes become \xNN, and it is cut at 256 bytes.
std::string printable(std::string_view peer_text);

}  // namespace cardbridge::log
