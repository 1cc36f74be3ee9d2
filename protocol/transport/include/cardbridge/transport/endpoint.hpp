// "unix:PATH", "tcp:HOST:PORT" or "tls:HOST:PORT" as typed on the command line.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "cardbridge/support/result.hpp"

namespace cardbridge::transport {

struct Endpoint {
  enum class Kind { kUnix, kTcp, kTls };
  Kind kind = Kind::kUnix;
  std::string path;  // kUnix
  std::string host;  // kTcp, kTls
  uint16_t port = 0;

  static Result<Endpoint, std::string> parse(std::string_view text);
  std::string to_string() const;
};

}  // namespace cardbridge::transport
