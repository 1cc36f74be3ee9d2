// The admin's configuration files, read by CLI11 onto the very options of each program's
// command line: every long option is a key of the program's section, spelt without "--".
//
//   /etc/cardbridge/server.conf   [shim] cardbridge-shim, [cdrsession] and [doctor] cdrsession
//   /etc/cardbridge/desk.conf     [desk] the admin's desk policy (FreeRDP add-in and desk agent),
//                                 [agent] cardbridge-desk
//
// Format (CLI11's TOML/INI reader): `[section]` lines, `key = value`, `#` comments (also `;`
// at the start of a line), values with or without double quotes, lists as `a, b` or
// `["a", "b"]`, flags as `key = true`. An option added to a program later is settable in the
// file with no more code. Values given on the command line win over the file's.
//
// Strict, because a typo in a policy file must not pass silently: a key that the section's
// program does not have, an unknown section, or a key outside any section stops the program
// with a message naming the file, the section and the key.
#pragma once

#include <map>
#include <set>
#include <string>

#include <CLI/CLI.hpp>

namespace cardbridge::config {

// The directory of the admin's files: /etc/cardbridge (CARDBRIDGE_ETC_DIR at build time).
std::string system_dir();
// The server side's directory: $CARDBRIDGE_ETC when set (tests; a second installation), else
// system_dir(). The desk side never takes its directory from the environment: desk.conf is
// the admin's policy over the user who runs the RDP client.
std::string server_dir();

inline constexpr const char* kServerConf = "server.conf";
inline constexpr const char* kDeskConf = "desk.conf";

// Section of the file -> the part of the app whose options it sets: "" the app itself, else
// a subcommand's name.
using SectionMap = std::map<std::string, std::string>;

// Makes |app| read |default_path| (or the file named with --config FILE) before checking its
// requirements. A missing default file is no configuration; a file named with --config must
// exist. |sections| say where each of this program's sections goes; |foreign| sections belong
// to other programs and are skipped. Call before adding subcommands' options is fine; the
// checks run at parse time. Returns the --config option.
CLI::Option* add_config_file(CLI::App& app, const std::string& default_path, SectionMap sections,
                             std::set<std::string> foreign = {});

// After parsing: the file that was read, "" when none was.
std::string file_read(const CLI::App& app);

// Whether |path| sets |key| in [section] (another program's section, e.g. cdrsession looking
// at the shim's). False when the file cannot be read.
bool section_has(const std::string& path, const std::string& section, const std::string& key);

}  // namespace cardbridge::config
