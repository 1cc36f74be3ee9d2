#include "cardbridge/journal/journal.hpp"

#include <sys/stat.h>
#include <sys/uio.h>
#include <syslog.h>
#include <unistd.h>

#include <cstdlib>
#include <mutex>
#include <vector>

#include <fmt/format.h>
#include <spdlog/sinks/base_sink.h>
#include <systemd/sd-journal.h>

#include "cardbridge/support/log.hpp"

namespace cardbridge::journal {

namespace {

constexpr const char* kJournalSocket = "/run/systemd/journal/socket";

// One entry per line, fields as described in journal.hpp. sd_journal_sendv is thread-safe
// and binary-safe; the mutex only guards the sink's own state (spdlog's base_sink).
class JournalSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  explicit JournalSink(std::string identifier) : identifier_("SYSLOG_IDENTIFIER=" + std::move(identifier)) {
    if (const char* s = std::getenv("CARDBRIDGE_SESSION"); s && *s) session_ = fmt::format("CARDBRIDGE_SESSION={}", s);
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    const std::string message =
        fmt::format("MESSAGE={}", std::string_view(msg.payload.data(), msg.payload.size()));
    const std::string priority = fmt::format("PRIORITY={}", priority_of(msg.level));
    const std::string component =
        fmt::format("CARDBRIDGE_COMPONENT={}", std::string_view(msg.logger_name.data(), msg.logger_name.size()));
    std::vector<iovec> iov;
    auto add = [&iov](const std::string& s) { iov.push_back(iovec{const_cast<char*>(s.data()), s.size()}); };
    add(message);
    add(priority);
    add(identifier_);
    add(component);
    if (!session_.empty()) add(session_);
    ::sd_journal_sendv(iov.data(), static_cast<int>(iov.size()));
  }
  void flush_() override {}

 private:
  std::string identifier_;
  std::string session_;
};

}  // namespace

bool available() {
  struct stat st {};
  return ::stat(kJournalSocket, &st) == 0 && S_ISSOCK(st.st_mode);
}

bool stderr_is_journal() {
  const char* v = std::getenv("JOURNAL_STREAM");
  if (!v || !*v) return false;
  struct stat st {};
  if (::fstat(STDERR_FILENO, &st) != 0) return false;
  return stream_variable(STDERR_FILENO) == v;
}

std::optional<Target> parse_target(std::string_view name) {
  if (name == "auto") return Target::kAuto;
  if (name == "journal") return Target::kJournal;
  if (name == "stderr") return Target::kStderr;
  return std::nullopt;
}

const char* target_name(Target t) {
  switch (t) {
    case Target::kAuto: return "auto";
    case Target::kJournal: return "journal";
    case Target::kStderr: return "stderr";
  }
  return "auto";
}

Target resolve(Target t) {
  switch (t) {
    case Target::kAuto: return stderr_is_journal() && available() ? Target::kJournal : Target::kStderr;
    case Target::kJournal: return available() ? Target::kJournal : Target::kStderr;
    case Target::kStderr: return Target::kStderr;
  }
  return Target::kStderr;
}

Target init_logging(spdlog::level::level_enum level, std::string_view program, Target t) {
  log::init(level, program);
  const Target used = resolve(t);
  if (used == Target::kJournal) log::set_sink(make_sink(std::string(program)));
  return used;
}

spdlog::sink_ptr make_sink(std::string identifier) { return std::make_shared<JournalSink>(std::move(identifier)); }

int priority_of(spdlog::level::level_enum level) {
  switch (level) {
    case spdlog::level::trace:
    case spdlog::level::debug: return LOG_DEBUG;
    case spdlog::level::info: return LOG_INFO;
    case spdlog::level::warn: return LOG_WARNING;
    case spdlog::level::err: return LOG_ERR;
    case spdlog::level::critical: return LOG_CRIT;
    default: return LOG_INFO;
  }
}

int open_stream(const std::string& identifier, int priority) {
  if (!available()) return -1;
  const int fd = ::sd_journal_stream_fd(identifier.c_str(), priority, 0);
  return fd < 0 ? -1 : fd;
}

std::string stream_variable(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return {};
  return fmt::format("{}:{}", static_cast<unsigned long long>(st.st_dev), static_cast<unsigned long long>(st.st_ino));
}

}  // namespace cardbridge::journal
