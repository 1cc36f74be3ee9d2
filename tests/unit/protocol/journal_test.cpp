// Journald logging and the audit trail (protocol/journal): the fields of an audit entry, its
// syslog line, the priorities of the log levels, the log targets. journald itself is proven
// by the integration tests that run one (tests/integration/test_session_admin.py).
#include <gtest/gtest.h>

#include <syslog.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cardbridge/journal/audit.hpp"
#include "cardbridge/journal/journal.hpp"

namespace cardbridge {
namespace {

bool has(const std::vector<std::string>& v, const std::string& x) { return std::find(v.begin(), v.end(), x) != v.end(); }

TEST(Audit, JournalFieldsAreStructured) {
  audit::Event e("card-connected", "card connected: reader='R 00 00' atr=3B00 share=shared");
  e.with("USER", "alice").with("UID", "1001").with("SESSION", "xrdp-10").with("READER", "R 00 00")
      .with("ATR", "3B00").with("PROGRAM_PID", "4242").with("PROGRAM_EXE", "");
  const auto f = audit::journal_fields(e, "cardbridge-shim");
  EXPECT_EQ(f.front(), "MESSAGE=card connected: reader='R 00 00' atr=3B00 share=shared");
  EXPECT_TRUE(has(f, "PRIORITY=5")) << "notice";
  EXPECT_TRUE(has(f, "SYSLOG_FACILITY=10")) << "authpriv";
  EXPECT_TRUE(has(f, "SYSLOG_IDENTIFIER=cardbridge-shim"));
  EXPECT_TRUE(has(f, std::string("MESSAGE_ID=") + audit::kMessageId));
  EXPECT_TRUE(has(f, "CARDBRIDGE_EVENT=card-connected"));
  EXPECT_TRUE(has(f, "CARDBRIDGE_USER=alice"));
  EXPECT_TRUE(has(f, "CARDBRIDGE_UID=1001"));
  EXPECT_TRUE(has(f, "CARDBRIDGE_SESSION=xrdp-10"));
  EXPECT_TRUE(has(f, "CARDBRIDGE_READER=R 00 00"));
  EXPECT_TRUE(has(f, "CARDBRIDGE_PROGRAM_PID=4242"));
  EXPECT_FALSE(std::any_of(f.begin(), f.end(), [](const std::string& s) { return s.starts_with("CARDBRIDGE_PROGRAM_EXE"); }))
      << "empty fields are left out";
  EXPECT_EQ(f.size(), 12u);
}

TEST(Audit, SyslogLineCarriesTheFields) {
  audit::Event e("desk-connected", "desk connected: name='D'");
  e.with("USER", "bob").with("DESK", "D");
  EXPECT_EQ(audit::syslog_line(e), "desk connected: name='D' [EVENT=desk-connected USER=bob DESK=D]");
}

TEST(Audit, MessageIdIsA128BitId) {
  const std::string id = audit::kMessageId;
  EXPECT_EQ(id.size(), 32u);
  EXPECT_TRUE(std::all_of(id.begin(), id.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }));
}

TEST(Audit, UserNameAndExecutable) {
  EXPECT_EQ(audit::user_name(0), "root");
  EXPECT_EQ(audit::user_name(4000000000u), "");
  EXPECT_FALSE(audit::executable_of(static_cast<int>(::getpid())).empty());
  EXPECT_EQ(audit::executable_of(0), "");
  EXPECT_EQ(audit::executable_of(-5), "");
}

TEST(Journal, Priorities) {
  EXPECT_EQ(journal::priority_of(spdlog::level::trace), LOG_DEBUG);
  EXPECT_EQ(journal::priority_of(spdlog::level::debug), LOG_DEBUG);
  EXPECT_EQ(journal::priority_of(spdlog::level::info), LOG_INFO);
  EXPECT_EQ(journal::priority_of(spdlog::level::warn), LOG_WARNING);
  EXPECT_EQ(journal::priority_of(spdlog::level::err), LOG_ERR);
  EXPECT_EQ(journal::priority_of(spdlog::level::critical), LOG_CRIT);
}

TEST(Journal, Targets) {
  EXPECT_EQ(journal::parse_target("auto"), journal::Target::kAuto);
  EXPECT_EQ(journal::parse_target("journal"), journal::Target::kJournal);
  EXPECT_EQ(journal::parse_target("stderr"), journal::Target::kStderr);
  EXPECT_EQ(journal::parse_target("syslog"), std::nullopt);
  for (auto t : {journal::Target::kAuto, journal::Target::kJournal, journal::Target::kStderr}) {
    EXPECT_EQ(journal::parse_target(journal::target_name(t)), t);
  }
  EXPECT_EQ(journal::resolve(journal::Target::kStderr), journal::Target::kStderr);
  // auto: the journal only when stderr is a journal stream.
  ::unsetenv("JOURNAL_STREAM");
  EXPECT_EQ(journal::resolve(journal::Target::kAuto), journal::Target::kStderr);
  ::setenv("JOURNAL_STREAM", "1:2", 1);  // not stderr's device and inode
  EXPECT_FALSE(journal::stderr_is_journal());
  ::setenv("JOURNAL_STREAM", journal::stream_variable(2).c_str(), 1);
  EXPECT_TRUE(journal::stderr_is_journal());
  EXPECT_EQ(journal::resolve(journal::Target::kAuto),
            journal::available() ? journal::Target::kJournal : journal::Target::kStderr);
  EXPECT_EQ(journal::resolve(journal::Target::kJournal),
            journal::available() ? journal::Target::kJournal : journal::Target::kStderr);
  ::unsetenv("JOURNAL_STREAM");
}

}  // namespace
}  // namespace cardbridge
