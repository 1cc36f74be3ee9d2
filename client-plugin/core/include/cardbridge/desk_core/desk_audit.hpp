// The desk's audit events: which server used this desk's readers and cards, and what the
// desk's policy refused. The edge adds who runs the desk (user, desk name) and records them
// (cardbridge/journal/audit.hpp). Never APDU contents.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cardbridge::client {

struct DeskAudit {
  enum class Kind : uint8_t {
    kServerConnected,     // server
    kServerDisconnected,  // server, reason
    kCardConnected,       // server, reader, atr, share_mode: a program of the session connected
    kReaderRefused,       // server, reader: a Connect to a reader the policy hides
    kControlRefused,      // server, reader (when known), code: a control code the policy forbids
  };
  Kind kind = Kind::kServerConnected;
  std::string server;   // the server's name, from its hello (peer text)
  std::string reader;   // peer text for refusals (the server named it)
  std::vector<uint8_t> atr;
  std::string reason;
  uint32_t share_mode = 0;
  uint32_t code = 0;

  const char* event_name() const;  // "server-connected", ...
  std::string text() const;        // one printable line
};

}  // namespace cardbridge::client
