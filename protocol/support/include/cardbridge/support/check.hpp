// CARDBRIDGE_CHECK: aborts on a bug in CardBridge itself (never on peer input; peer input
// errors are Result values that close the offending connection).
#pragma once

namespace cardbridge::detail {
[[noreturn]] void check_failed(const char* expr, const char* file, int line) noexcept;
}

#define CARDBRIDGE_CHECK(cond)                                                  \
  do {                                                                          \
    if (!(cond)) ::cardbridge::detail::check_failed(#cond, __FILE__, __LINE__); \
  } while (0)
