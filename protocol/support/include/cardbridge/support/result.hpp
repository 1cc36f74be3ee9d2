// A minimal expected-like Result<T, E> (std::expected is C++23; we build as C++20).
// Used for peer input that may be malformed: errors are values, never exceptions.
#pragma once

#include <type_traits>
#include <utility>
#include <variant>

#include "cardbridge/support/check.hpp"

namespace cardbridge {

template <typename E>
struct Unexpected {
  E error;
};
template <typename E>
Unexpected<std::decay_t<E>> unexpected(E&& e) {
  return {std::forward<E>(e)};
}

template <typename T, typename E>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT: implicit by design
  template <typename G>
  Result(Unexpected<G> e) : v_(std::in_place_index<1>, std::move(e.error)) {}  // NOLINT

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & {
    CARDBRIDGE_CHECK(ok());
    return std::get<0>(v_);
  }
  const T& value() const& {
    CARDBRIDGE_CHECK(ok());
    return std::get<0>(v_);
  }
  T&& value() && {
    CARDBRIDGE_CHECK(ok());
    return std::get<0>(std::move(v_));
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const E& error() const {
    CARDBRIDGE_CHECK(!ok());
    return std::get<1>(v_);
  }

 private:
  std::variant<T, E> v_;
};

}  // namespace cardbridge
