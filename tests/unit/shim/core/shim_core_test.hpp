// What every ShimCore test file starts with: the kit (kit/rig.hpp), the PC/SC values by
// their short names, and the test data they share. Test-only: the using-directives stay in
// this namespace.
#pragma once

#include "cardbridge/protocol/messages.hpp"
#include "kit/rig.hpp"

namespace cardbridge::shim::core_test {

using namespace kit;
using namespace kit::pcsc;
namespace pr = cardbridge::protocol;

inline const Bytes kSelectMf = {0x00, 0xA4, 0x00, 0x00, 0x02, 0x3F, 0x00};  // testpcsc step 8
inline const Bytes kSw9000 = {0x90, 0x00};
inline const Bytes kZeroArray(kArraySize, 0);

}  // namespace cardbridge::shim::core_test
