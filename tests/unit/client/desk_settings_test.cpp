// desk.conf, the admin's desk policy (client-plugin/config): [desk] read onto a Policy that a
// connection's options can only narrow; [agent] is the agent's and skipped; a mistake is an
// error (the add-in then exposes nothing, the agent refuses to start).
#include "cardbridge/desk_config/desk_settings.hpp"

#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "cardbridge/support/scard.hpp"

namespace cardbridge::client {
namespace {

class DeskSettingsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("cb-desk-conf-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string write(const std::string& text) {
    const auto p = (dir_ / "desk.conf").string();
    std::ofstream(p) << text;
    return p;
  }
  std::filesystem::path dir_;
};

TEST_F(DeskSettingsTest, ReadsTheDeskSectionAndSkipsTheAgents) {
  const auto path = write(
      "[desk]\n"
      "name = ADMISSION-3\n"
      "readers = Gemalto, Omnikey\n"
      "deny-readers = [\"Windows Hello\"]\n"
      "allow-control = 3400\n"
      "[agent]\n"
      "listen = tls:0.0.0.0:4433\n");
  auto s = load_desk_settings(path);
  ASSERT_TRUE(s) << s.error();
  EXPECT_EQ(s->file, path);
  EXPECT_EQ(s->name, "ADMISSION-3");
  EXPECT_EQ(s->readers, (std::vector<std::string>{"Gemalto", "Omnikey"}));
  EXPECT_EQ(s->deny_readers, (std::vector<std::string>{"Windows Hello"}));
  auto p = admin_policy(*s);
  ASSERT_TRUE(p) << p.error();
  EXPECT_TRUE(p->reader_allowed("Gemalto PC Twin Reader 00 00"));
  EXPECT_FALSE(p->reader_allowed("Windows Hello Gemalto 00 00"));
  EXPECT_FALSE(p->reader_allowed("Yubikey 00 00"));
  EXPECT_TRUE(p->control_verdict(scard::ctl_code(3400), nullptr) == ControlVerdict::kAllowed);
  EXPECT_FALSE(p->control_verdict(scard::ctl_code(3401), nullptr) == ControlVerdict::kAllowed);
}

TEST_F(DeskSettingsTest, CardImageIsOnUnlessTheAdminTurnsItOff) {
  auto on = load_desk_settings(write("[desk]\nname = X\n"));
  ASSERT_TRUE(on) << on.error();
  EXPECT_TRUE(on->card_image);
  auto off = load_desk_settings(write("[desk]\ncard-image = off\n"));
  ASSERT_TRUE(off) << off.error();
  EXPECT_FALSE(off->card_image);
  auto bad = load_desk_settings(write("[desk]\ncard-image = maybe\n"));
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().find("maybe"), std::string::npos) << bad.error();
}

TEST_F(DeskSettingsTest, MissingFileIsNoPolicy) {
  auto s = load_desk_settings((dir_ / "absent.conf").string());
  ASSERT_TRUE(s) << s.error();
  EXPECT_EQ(s->file, "");
  auto p = admin_policy(*s);
  ASSERT_TRUE(p);
  EXPECT_TRUE(p->reader_allowed("anything 00 00"));
  EXPECT_TRUE(p->control_verdict(0x42000001, nullptr) == ControlVerdict::kAllowed);
}

TEST_F(DeskSettingsTest, MistakesAreErrorsNamingTheKey) {
  auto typo = load_desk_settings(write("[desk]\nreaderz = Gemalto\n"));
  ASSERT_FALSE(typo);
  EXPECT_NE(typo.error().find("readerz"), std::string::npos) << typo.error();
  auto bad_code = load_desk_settings(write("[desk]\nallow-control = 0xZZ\n"));
  ASSERT_TRUE(bad_code) << "the code list is checked by admin_policy";
  auto p = admin_policy(*bad_code);
  ASSERT_FALSE(p);
  EXPECT_NE(p.error().find("allow-control"), std::string::npos) << p.error();
}

TEST_F(DeskSettingsTest, ConnectionOptionsOnlyNarrowTheAdminsPolicy) {
  auto s = load_desk_settings(write("[desk]\nreaders = Gemalto\nallow-control = none\n"));
  ASSERT_TRUE(s);
  auto admin = admin_policy(*s);
  ASSERT_TRUE(admin);
  // The user's xfreerdp asks for everything: readers:Omnikey, allow-control:all.
  auto own = connection_policy({"Omnikey,Gemalto"}, {}, "");
  ASSERT_TRUE(own) << own.error();
  const Policy p = Policy::narrowed(*admin, *own);
  EXPECT_FALSE(p.reader_allowed("OMNIKEY 3121 00 00"));
  EXPECT_TRUE(p.reader_allowed("Gemalto PC Twin 00 00"));
  EXPECT_FALSE(p.control_verdict(scard::ctl_code(3400), nullptr) == ControlVerdict::kAllowed);
  auto bad = connection_policy({}, {}, "bogus");
  EXPECT_FALSE(bad);
}

TEST(AddinList, ShellSafePlusAndTheQuotedSeparators) {
  EXPECT_EQ(addin_list("Gemalto+Omnikey"), "Gemalto,Omnikey");
  EXPECT_EQ(addin_list("Gemalto;Omnikey|Identiv"), "Gemalto,Omnikey,Identiv");
  EXPECT_EQ(addin_list("3400+0x42000D48"), "3400,0x42000D48");
  EXPECT_EQ(addin_list("PC Twin Reader"), "PC Twin Reader");
  // As the add-in hands it on: a two-entry filter.
  auto p = connection_policy({addin_list("gemalto+omnikey")}, {}, "");
  ASSERT_TRUE(p);
  EXPECT_TRUE(p->reader_allowed("OMNIKEY 3121 00 00"));
  EXPECT_TRUE(p->reader_allowed("Gemalto PC Twin 00 00"));
  EXPECT_FALSE(p->reader_allowed("Identiv uTrust 00 00"));
}

TEST(DeskSettingsPath, IsTheBuiltInEtcDirectoryNotTheEnvironment) {
  ::setenv("CARDBRIDGE_ETC", "/tmp/user-chosen", 1);
  const std::string p = desk_conf_path();
  EXPECT_TRUE(p.ends_with("/desk.conf")) << p;
  EXPECT_FALSE(p.starts_with("/tmp/user-chosen")) << "the user must not choose the admin's policy file";
  ::unsetenv("CARDBRIDGE_ETC");
}

}  // namespace
}  // namespace cardbridge::client
