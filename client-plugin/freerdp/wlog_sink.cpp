#include "wlog_sink.hpp"

#include <winpr/wlog.h>

#include <map>
#include <mutex>

#include <spdlog/sinks/base_sink.h>

#include "cardbridge/support/log.hpp"

namespace cardbridge::client {

namespace {

constexpr const char* kRoot = "com.cardbridge";

DWORD wlog_level(spdlog::level::level_enum l) {
  switch (l) {
    case spdlog::level::trace: return WLOG_TRACE;
    case spdlog::level::debug: return WLOG_DEBUG;
    case spdlog::level::info: return WLOG_INFO;
    case spdlog::level::warn: return WLOG_WARN;
    case spdlog::level::err: return WLOG_ERROR;
    case spdlog::level::critical: return WLOG_FATAL;
    default: return WLOG_OFF;
  }
}

spdlog::level::level_enum spdlog_level(DWORD l) {
  switch (l) {
    case WLOG_TRACE: return spdlog::level::trace;
    case WLOG_DEBUG: return spdlog::level::debug;
    case WLOG_INFO: return spdlog::level::info;
    case WLOG_WARN: return spdlog::level::warn;
    case WLOG_ERROR: return spdlog::level::err;
    case WLOG_FATAL: return spdlog::level::critical;
    default: return spdlog::level::off;
  }
}

// spdlog -> WLog: the message only (WLog's layout adds time, thread, level and tag).
class WlogSink final : public spdlog::sinks::base_sink<std::mutex> {
 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    const std::string name(msg.logger_name.data(), msg.logger_name.size());
    auto it = loggers_.find(name);
    if (it == loggers_.end()) {
      const std::string tag = "com." + name;
      it = loggers_.emplace(name, WLog_Get(tag.c_str())).first;
    }
    wLog* log = it->second;
    if (!log) return;
    const std::string text(msg.payload.data(), msg.payload.size());
    WLog_Print(log, wlog_level(msg.level), "%s", text.c_str());
  }
  void flush_() override {}

 private:
  std::map<std::string, wLog*> loggers_;  // WLog keeps its loggers for the process's life
};

}  // namespace

void init_wlog_logging(const std::string& level_option) {
  static std::once_flag once;
  std::call_once(once, [&] {
    wLog* root = WLog_Get(kRoot);
    auto level = log::parse_level(level_option);
    if (level && root) WLog_SetLogLevel(root, wlog_level(*level));
    const auto effective = level ? *level : root ? spdlog_level(WLog_GetLogLevel(root)) : spdlog::level::warn;
    log::init(effective, "cardbridge-client");
    log::set_sink(std::make_shared<WlogSink>());
  });
}

}  // namespace cardbridge::client
