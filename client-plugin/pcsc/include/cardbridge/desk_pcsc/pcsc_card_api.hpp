// CardApi over the system libpcsclite (honours PCSCLITE_CSOCK_NAME like any PC/SC program).
#pragma once

#include <memory>

#include "cardbridge/desk_core/card_api.hpp"

namespace cardbridge::client {

// Sets PCSCLITE_NO_BLOCKING for this process (see the .cpp) and returns the API.
std::unique_ptr<CardApi> make_pcsc_card_api();
// The process's API, for runtimes that may outlive their host (never destroyed).
CardApi& process_pcsc_card_api();

}  // namespace cardbridge::client
