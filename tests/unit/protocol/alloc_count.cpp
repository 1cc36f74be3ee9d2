#include "alloc_count.hpp"

#include <cstdlib>
#include <new>

namespace cardbridge::alloc_count {
namespace {
thread_local std::size_t g_bytes = 0;
thread_local int g_scopes = 0;
}  // namespace

Scope::Scope() : start_(g_bytes) { ++g_scopes; }
Scope::~Scope() { --g_scopes; }
std::size_t Scope::bytes() const { return g_bytes - start_; }

void note(std::size_t n) {
  if (g_scopes > 0) g_bytes += n;
}

}  // namespace cardbridge::alloc_count

void* operator new(std::size_t n) {
  cardbridge::alloc_count::note(n);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return ::operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
