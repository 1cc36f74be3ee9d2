// Client of the shim's control socket (one JSON line each way), with a deadline.
#pragma once

#include <chrono>
#include <string>

#include <nlohmann/json.hpp>

#include "cardbridge/support/result.hpp"

namespace cardbridge::session {

struct ControlError {
  enum Kind { kNoSocket, kRefused, kTimeout, kBadAnswer } kind;
  std::string text;
};

Result<nlohmann::json, ControlError> control_request(const std::string& path, const nlohmann::json& request,
                                                     std::chrono::milliseconds timeout);

}  // namespace cardbridge::session
