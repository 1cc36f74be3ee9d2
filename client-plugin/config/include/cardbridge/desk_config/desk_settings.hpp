// The admin's policy for a desk: /etc/cardbridge/desk.conf, section [desk]. Both the FreeRDP
// add-in and the desk agent apply it, and what a connection asks for (the add-in's
// `/vc:cardbridge,readers:...` options, the agent's own options) can only narrow it
// (Policy::narrowed).
//
//   [desk]
//   name = ADMISSION-3                 # the desk's name on the server (doctor, audit); a
//                                      # connection's name: option cannot change it
//   readers = Gemalto, Omnikey         # expose only readers whose name contains one of these
//   deny-readers = Windows Hello       # never expose these
//   allow-control = 3400, 0x42000D48   # control codes programs may use (all, none, or a list)
//   card-image = off                   # never read a card's public files ahead of a login
//                                      # (default on); a connection's image:on cannot undo it
//
// The file is read as root's configuration: the add-in reads it at CARDBRIDGE_ETC_DIR (built
// in), never from a path the user could choose.
#pragma once

#include <string>
#include <vector>

#include "cardbridge/desk_core/policy.hpp"
#include "cardbridge/support/result.hpp"

namespace cardbridge::client {

struct DeskSettings {
  std::string file;  // the file read; "" when there was none
  std::string name;  // "" when not set
  std::vector<std::string> readers;
  std::vector<std::string> deny_readers;
  std::string allow_control;  // "" when not set (no restriction by the admin)
  bool card_image = true;     // card-image = off: the desk never images a card (docs/performance.md)
};

// /etc/cardbridge/desk.conf (CARDBRIDGE_ETC_DIR at build time).
std::string desk_conf_path();

// Reads the [desk] section of |path| ([agent] is cardbridge-desk's own and skipped). A
// missing file is no policy; an unknown key, section or bad value is an error.
Result<DeskSettings, std::string> load_desk_settings(const std::string& path);

// The admin's policy of |s|; an error for a bad control-code list.
Result<Policy, std::string> admin_policy(const DeskSettings& s);

// A list given in an add-in option (readers:, deny-readers:, allow-control:) as the policy's
// comma-separated list. FreeRDP splits add-in arguments on ',', so entries are separated with
// '+' (safe in every shell: `/vc:cardbridge,readers:Gemalto+Omnikey`), or ';' or '|' (which a
// shell takes for its own unless quoted).
std::string addin_list(std::string value);

// A connection's policy from its options (the agent's or the add-in's); what is not given takes
// Policy's least-privilege defaults (control codes "pinpad", SET_ATTRIB "none", every reader).
// It then runs within the admin's (Policy::narrowed): desk.conf can only take away.
Result<Policy, std::string> connection_policy(const std::vector<std::string>& readers,
                                              const std::vector<std::string>& deny_readers,
                                              const std::string& allow_control,
                                              const std::string& allow_set_attrib = "");

}  // namespace cardbridge::client
