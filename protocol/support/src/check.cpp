#include "cardbridge/support/check.hpp"

#include <cstdio>
#include <cstdlib>

namespace cardbridge::detail {

void check_failed(const char* expr, const char* file, int line) noexcept {
  std::fprintf(stderr, "cardbridge: internal check failed: %s (%s:%d)\n", expr, file, line);
  std::abort();
}

}  // namespace cardbridge::detail
