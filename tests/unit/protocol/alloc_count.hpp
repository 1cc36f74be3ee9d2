// Counts the bytes this thread allocates with operator new while a Scope is alive
// (alloc_count.cpp replaces the global operator new/delete of the test program). For
// tests that show a decoder refuses input before allocating for it.
#pragma once

#include <cstddef>

namespace cardbridge::alloc_count {

class Scope {
 public:
  Scope();
  ~Scope();
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;
  // Bytes allocated on this thread since the Scope began (frees are not subtracted).
  std::size_t bytes() const;

 private:
  std::size_t start_;
};

}  // namespace cardbridge::alloc_count
