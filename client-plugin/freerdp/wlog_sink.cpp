#include "wlog_sink.hpp"

#include <winpr/wlog.h>

#include <cstdio>
#include <map>
#include <optional>
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
 public:
  // |level|: the add-in's log-level: option, set on each com.cardbridge.* logger (WLog does not
  // pass a level set on com.cardbridge down to com.cardbridge.addin); none: WLog's own
  // (/log-level, WLOG_LEVEL, WLOG_FILTER).
  explicit WlogSink(std::optional<DWORD> level) : level_(level) {}

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    const std::string name(msg.logger_name.data(), msg.logger_name.size());
    auto it = loggers_.find(name);
    if (it == loggers_.end()) {
      const std::string tag = "com." + name;
      wLog* created = WLog_Get(tag.c_str());
      if (created && level_) WLog_SetLogLevel(created, *level_);
      it = loggers_.emplace(name, created).first;
    }
    wLog* log = it->second;
    if (!log) return;
    const std::string text(msg.payload.data(), msg.payload.size());
    WLog_Print(log, wlog_level(msg.level), "%s", text.c_str());
    // WLog's console appender writes info and below to stdout, which is fully buffered when
    // it is a file or a pipe (a wrapper script's log): an admin tailing it, or a client killed
    // later, would otherwise never see the lines.
    std::fflush(stdout);
  }
  void flush_() override {}

 private:
  std::optional<DWORD> level_;
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
    log::set_sink(std::make_shared<WlogSink>(level ? std::optional<DWORD>(wlog_level(*level)) : std::nullopt));
  });
}

}  // namespace cardbridge::client
