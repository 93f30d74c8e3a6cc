// The guard contract every torchguard guard keeps, checked at compile time:
//   - built from its required arguments, an `Options` struct (with a `logger` member) and nothing
//     else; `T::Options` names that struct;
//   - `close(Outcome)` ends the guard's work: idempotent, and it throws what went wrong;
//   - the destructor is noexcept: it closes with the scope's outcome and logs what close() would
//     have thrown;
//   - move-only: a guard owns what it opened, exactly once.
#pragma once

#include <memory>
#include <type_traits>
#include <utility>

#include <spdlog/spdlog.h>

#include "torchguard/core/outcome.hpp"

namespace torchguard {
namespace detail {

template <class T, class = void>
struct has_options_with_logger : std::false_type {};
template <class T>
struct has_options_with_logger<T,
                               std::void_t<decltype(std::declval<typename T::Options&>().logger)>>
    : std::is_convertible<decltype(std::declval<typename T::Options&>().logger),
                          std::shared_ptr<spdlog::logger>> {};

template <class T, class = void>
struct has_close_outcome : std::false_type {};
template <class T>
struct has_close_outcome<T, std::void_t<decltype(std::declval<T&>().close(Outcome{}))>>
    : std::true_type {};

}  // namespace detail

template <class T>
struct is_guard
    : std::bool_constant<detail::has_options_with_logger<T>::value &&
                         detail::has_close_outcome<T>::value && std::is_nothrow_destructible_v<T> &&
                         std::is_move_constructible_v<T> && !std::is_copy_constructible_v<T> &&
                         !std::is_copy_assignable_v<T>> {};

template <class T>
inline constexpr bool is_guard_v = is_guard<T>::value;

#if defined(__cpp_concepts) && __cpp_concepts >= 201907L
template <class T>
concept Guard = is_guard_v<T>;
#endif

}  // namespace torchguard
