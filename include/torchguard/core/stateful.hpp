// Stateful: something whose state a checkpoint keeps as JSON and puts back, known only by what
// it can do (CheckpointGuard holds samplers this way without knowing their type). A type fits
// when it has
//   nlohmann::json checkpoint_state() const;               // what to save
//   void load_checkpoint_state(const nlohmann::json&);    // puts it back; throws on one not its
//   own
// and, optionally,
//   std::string check_checkpoint_state(const nlohmann::json&) const;  // "" when it would load
//   std::int64_t epoch() const;                                      // the run's epoch
//   std::size_t skip(const std::vector<std::size_t>&);               // leaves samples out
// A Stateful holds a copy of the object (for types whose copies share their state, as
// ResumableSampler's do) or a std::shared_ptr to it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "torchguard/core/error.hpp"

namespace torchguard {
namespace detail {

template <class T, class = void>
struct has_check_checkpoint_state : std::false_type {};
template <class T>
struct has_check_checkpoint_state<
    T, std::void_t<decltype(std::declval<const T&>().check_checkpoint_state(nlohmann::json()))>>
    : std::true_type {};

template <class T, class = void>
struct has_epoch : std::false_type {};
template <class T>
struct has_epoch<T, std::void_t<decltype(std::declval<const T&>().epoch())>> : std::true_type {};

template <class T, class = void>
struct has_skip : std::false_type {};
template <class T>
struct has_skip<T, std::void_t<decltype(std::declval<T&>().skip(std::vector<std::size_t>()))>>
    : std::true_type {};

}  // namespace detail

class Stateful {
 public:
  Stateful() = default;
  template <class T, class = std::enable_if_t<!std::is_same_v<std::decay_t<T>, Stateful>>>
  Stateful(T object) : self_(std::make_shared<Model<T>>(std::make_shared<T>(std::move(object)))) {}
  template <class T>
  Stateful(std::shared_ptr<T> object) : self_(std::make_shared<Model<T>>(std::move(object))) {}

  explicit operator bool() const noexcept { return self_ != nullptr; }
  nlohmann::json save() const { return self_->save(); }
  void load(const nlohmann::json& state) const { self_->load(state); }
  // Why `state` would not load ("" when it would), without changing anything.
  std::string check(const nlohmann::json& state) const { return self_->check(state); }
  std::optional<std::int64_t> epoch() const { return self_->epoch(); }
  // Whether it can leave samples out (a sampler: CheckpointGuard's recovery skips a bad batch).
  bool can_skip() const { return self_->can_skip(); }
  // Leaves the samples `indices` out from now on; throws OptionsError when it cannot.
  void skip(const std::vector<std::size_t>& indices) const { self_->skip(indices); }

 private:
  struct Concept {
    virtual ~Concept() = default;
    virtual nlohmann::json save() const = 0;
    virtual void load(const nlohmann::json& state) = 0;
    virtual std::string check(const nlohmann::json& state) const = 0;
    virtual std::optional<std::int64_t> epoch() const = 0;
    virtual bool can_skip() const = 0;
    virtual void skip(const std::vector<std::size_t>& indices) = 0;
  };
  template <class T>
  struct Model final : Concept {
    explicit Model(std::shared_ptr<T> o) : object(std::move(o)) {}
    nlohmann::json save() const override { return object->checkpoint_state(); }
    void load(const nlohmann::json& state) override { object->load_checkpoint_state(state); }
    std::string check(const nlohmann::json& state) const override {
      if constexpr (detail::has_check_checkpoint_state<T>::value) {
        return object->check_checkpoint_state(state);
      } else {
        (void)state;
        return {};
      }
    }
    std::optional<std::int64_t> epoch() const override {
      if constexpr (detail::has_epoch<T>::value) {
        return static_cast<std::int64_t>(object->epoch());
      } else {
        return std::nullopt;
      }
    }
    bool can_skip() const override { return detail::has_skip<T>::value; }
    void skip(const std::vector<std::size_t>& indices) override {
      if constexpr (detail::has_skip<T>::value) {
        object->skip(indices);
      } else {
        (void)indices;
        throw OptionsError("Stateful: this part has no skip(): it cannot leave samples out");
      }
    }
    std::shared_ptr<T> object;
  };

  std::shared_ptr<Concept> self_;
};

}  // namespace torchguard
