// The admin's configuration files (protocol/config/include/cardbridge/config/config_file.hpp):
// a program's section lands on its own command-line options, the command line wins, a typo
// stops the program with the file, section and key named, other programs' sections are skipped.
#include "cardbridge/config/config_file.hpp"

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace cardbridge::config {
namespace {

class ConfigFile : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("cb-config-test-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string write(const std::string& text) {
    const auto p = (dir_ / "server.conf").string();
    std::ofstream(p) << text;
    return p;
  }

  // A shim-like program: its options, and [shim] as its section.
  struct Shim {
    CLI::App app{"shim"};
    std::string level = "info";
    std::string disable;
    std::string desk;
    bool insecure = false;
    std::vector<std::string> readers;
    explicit Shim(const std::string& path) {
      add_config_file(app, path, {{"shim", ""}}, {"cdrsession", "doctor"});
      app.add_option("--log-level", level);
      app.add_option("--disable", disable);
      app.add_option("--desk", desk);
      app.add_flag("--insecure-tcp", insecure);
      app.add_option("--readers", readers)->delimiter(',');
    }
    void parse(std::vector<std::string> args) {
      std::reverse(args.begin(), args.end());  // CLI11 takes them in reverse order
      app.parse(args);
    }
  };

  std::filesystem::path dir_;
};

TEST_F(ConfigFile, SectionSetsTheProgramsOptions) {
  const auto path = write(
      "# the admin's file\n"
      "[shim]\n"
      "log-level = debug\n"
      "desk = \"tls:desk-3.hospital.local:4433\"\n"
      "insecure-tcp = true\n"
      "\n"
      "[cdrsession]\n"
      "log-level = warn   # cdrsession's, not the shim's\n");
  Shim s(path);
  s.parse({});
  EXPECT_EQ(s.level, "debug");
  EXPECT_EQ(s.desk, "tls:desk-3.hospital.local:4433");
  EXPECT_TRUE(s.insecure);
  EXPECT_EQ(file_read(s.app), path);
}

TEST_F(ConfigFile, CommandLineWins) {
  Shim s(write("[shim]\nlog-level = debug\ndisable = pipeline\n"));
  s.parse({"--log-level", "error"});
  EXPECT_EQ(s.level, "error");
  EXPECT_EQ(s.disable, "pipeline") << "keys the command line does not give still apply";
}

TEST_F(ConfigFile, ListsInBothSpellingsReachAOneStringOptionAsOnTheCommandLine) {
  {
    Shim s(write("[shim]\ndisable = pipeline, defer-begin\n"));
    s.parse({});
    EXPECT_EQ(s.disable, "pipeline,defer-begin");
  }
  {
    Shim s(write("[shim]\ndisable = [\"pipeline\", \"defer-begin\"]\n"));
    s.parse({});
    EXPECT_EQ(s.disable, "pipeline,defer-begin");
  }
}

TEST_F(ConfigFile, ReaderNamesWithShellCharactersNeedNoQuoting) {
  // What broke on a command line (`readers:Gemalto;Omnikey` unquoted) is plain text here.
  Shim s(write("[shim]\nreaders = [\"Gemalto PC Twin Reader (A;B)\", \"OMNIKEY 3121 | 00\"]\n"));
  s.parse({});
  EXPECT_EQ(s.readers, (std::vector<std::string>{"Gemalto PC Twin Reader (A;B)", "OMNIKEY 3121 | 00"}));
}

TEST_F(ConfigFile, UnknownKeyNamesFileSectionAndKey) {
  const auto path = write("[shim]\nlog-levle = debug\n");
  Shim s(path);
  try {
    s.parse({});
    FAIL() << "a typo passed silently";
  } catch (const CLI::ParseError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(path), std::string::npos) << what;
    EXPECT_NE(what.find("[shim]"), std::string::npos) << what;
    EXPECT_NE(what.find("log-levle"), std::string::npos) << what;
  }
}

TEST_F(ConfigFile, UnknownSectionAndKeyOutsideASectionAreErrors) {
  {
    Shim s(write("[shmi]\nlog-level = debug\n"));
    EXPECT_THROW(s.parse({}), CLI::ParseError);
  }
  {
    Shim s(write("log-level = debug\n[shim]\n"));
    try {
      s.parse({});
      FAIL() << "a key outside any section passed";
    } catch (const CLI::ParseError& e) {
      EXPECT_NE(std::string(e.what()).find("outside any section"), std::string::npos) << e.what();
    }
  }
}

TEST_F(ConfigFile, ForeignSectionsAreNotChecked) {
  Shim s(write("[doctor]\nslow-median-ms = 80\n[shim]\nlog-level = warn\n"));
  s.parse({});
  EXPECT_EQ(s.level, "warn");
}

TEST_F(ConfigFile, MissingDefaultFileIsNoConfiguration) {
  Shim s((dir_ / "absent.conf").string());
  s.parse({});
  EXPECT_EQ(s.level, "info");
  EXPECT_EQ(file_read(s.app), "");
}

TEST_F(ConfigFile, MissingFileNamedOnTheCommandLineIsAnError) {
  Shim s((dir_ / "absent.conf").string());
  EXPECT_THROW(s.parse({"--config", (dir_ / "typo.conf").string()}), CLI::ParseError);
}

TEST_F(ConfigFile, ConfigOptionNamesAnotherFile) {
  Shim s((dir_ / "absent.conf").string());
  const auto other = write("[shim]\nlog-level = trace\n");
  s.parse({"--config", other});
  EXPECT_EQ(s.level, "trace");
  EXPECT_EQ(file_read(s.app), other);
}

TEST_F(ConfigFile, SubcommandSections) {
  const auto path = write("[doctor]\nslow-median-ms = 80\n[cdrsession]\nlog-level = warn\n");
  CLI::App app{"cdrsession"};
  std::string level = "info";
  int median = 50;
  add_config_file(app, path, {{"cdrsession", ""}, {"doctor", "doctor"}}, {"shim"});
  app.add_option("--log-level", level);
  auto* doctor = app.add_subcommand("doctor");
  doctor->add_option("--slow-median-ms", median);
  app.add_subcommand("status");
  app.parse(std::vector<std::string>{"doctor"});
  EXPECT_EQ(level, "warn");
  EXPECT_EQ(median, 80);
}

TEST_F(ConfigFile, SectionHas) {
  const auto path = write("[shim]\ndesk = tls:desk:4433\n[cdrsession]\nlog-level = warn\n");
  EXPECT_TRUE(section_has(path, "shim", "desk"));
  EXPECT_FALSE(section_has(path, "cdrsession", "desk"));
  EXPECT_FALSE(section_has(path, "shim", "log-level"));
  EXPECT_FALSE(section_has((dir_ / "absent.conf").string(), "shim", "desk"));
}

TEST(ConfigDirs, ServerDirFollowsCardbridgeEtcDeskDirDoesNot) {
  ::unsetenv("CARDBRIDGE_ETC");
  EXPECT_EQ(server_dir(), system_dir());
  ::setenv("CARDBRIDGE_ETC", "/tmp/elsewhere", 1);
  EXPECT_EQ(server_dir(), "/tmp/elsewhere");
  EXPECT_EQ(system_dir(), CARDBRIDGE_ETC_DIR);
  ::unsetenv("CARDBRIDGE_ETC");
}

}  // namespace
}  // namespace cardbridge::config
