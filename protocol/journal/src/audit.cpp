#include "cardbridge/journal/audit.hpp"

#include <pwd.h>
#include <sys/uio.h>
#include <syslog.h>
#include <unistd.h>

#include <mutex>

#include <fmt/format.h>
#include <systemd/sd-journal.h>

#include "cardbridge/journal/journal.hpp"
#include "cardbridge/support/log.hpp"

namespace cardbridge::audit {

namespace {

std::mutex g_mutex;
std::string g_identifier = "cardbridge";  // guarded by g_mutex (openlog keeps the pointer)

}  // namespace

Event& Event::with(std::string name, std::string value) {
  if (!value.empty()) fields.emplace_back(std::move(name), std::move(value));
  return *this;
}

void set_identifier(std::string program) {
  std::lock_guard lock(g_mutex);
  g_identifier = std::move(program);
}

std::vector<std::string> journal_fields(const Event& e, const std::string& identifier) {
  std::vector<std::string> out;
  out.push_back("MESSAGE=" + e.message);
  out.push_back(fmt::format("PRIORITY={}", LOG_NOTICE));
  out.push_back(fmt::format("SYSLOG_FACILITY={}", LOG_AUTHPRIV >> 3));
  out.push_back("SYSLOG_IDENTIFIER=" + identifier);
  out.push_back(fmt::format("MESSAGE_ID={}", kMessageId));
  out.push_back("CARDBRIDGE_EVENT=" + e.event);
  for (const auto& [name, value] : e.fields) out.push_back(fmt::format("CARDBRIDGE_{}={}", name, value));
  return out;
}

std::string syslog_line(const Event& e) {
  std::string line = e.message + " [EVENT=" + e.event;
  for (const auto& [name, value] : e.fields) line += fmt::format(" {}={}", name, value);
  return line + "]";
}

void emit(const Event& e) {
  try {
    std::lock_guard lock(g_mutex);
    if (journal::available()) {
      const auto fields = journal_fields(e, g_identifier);
      std::vector<iovec> iov;
      iov.reserve(fields.size());
      for (const auto& f : fields) iov.push_back(iovec{const_cast<char*>(f.data()), f.size()});
      if (::sd_journal_sendv(iov.data(), static_cast<int>(iov.size())) >= 0) return;
    }
    ::openlog(g_identifier.c_str(), LOG_PID, LOG_AUTHPRIV);
    ::syslog(LOG_NOTICE, "%s", syslog_line(e).c_str());
    ::closelog();
  } catch (...) {
  }
}

std::string user_name(unsigned uid) {
  passwd pw{};
  passwd* found = nullptr;
  char buf[4096];
  if (::getpwuid_r(static_cast<uid_t>(uid), &pw, buf, sizeof buf, &found) != 0 || !found) return {};
  return found->pw_name;
}

std::string executable_of(int pid) {
  if (pid <= 0) return {};
  char buf[4096];
  const ssize_t n = ::readlink(fmt::format("/proc/{}/exe", pid).c_str(), buf, sizeof buf - 1);
  if (n <= 0) return {};
  return log::printable(std::string_view(buf, static_cast<std::size_t>(n)));
}

}  // namespace cardbridge::audit
