// The add-in logs through FreeRDP's WLog, as every FreeRDP channel does: xfreerdp's
// /log-level and /log-filters (and WLOG_LEVEL, WLOG_APPENDER: console, file, journald, syslog)
// apply to it. Our logger "cardbridge.desk" is WLog's "com.cardbridge.desk"; all of them sit
// under "com.cardbridge" (/log-filters:com.cardbridge:DEBUG shows only ours).
#pragma once

#include <string>

namespace cardbridge::client {

// Once per process. |level_option|: the add-in's own log-level: option; when not empty it
// sets the level of "com.cardbridge" in WLog too. Otherwise the level is WLog's for
// "com.cardbridge" as FreeRDP's options left it (WARN by default).
void init_wlog_logging(const std::string& level_option);

}  // namespace cardbridge::client
