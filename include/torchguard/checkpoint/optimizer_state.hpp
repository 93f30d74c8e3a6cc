// The per-parameter state of LibTorch's built-in optimizers as named tensors, so that it can be
// written at the disk's speed (see checkpoint/format.hpp) and copied out cheaply for a background
// save. Other optimizers fall back to their own serialize(). Version shim: LibTorch 1.13 keys
// the state by a string of the parameter's TensorImpl address, 2.x by the address itself.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <torch/torch.h>

#include "torchguard/checkpoint/format.hpp"
#include "torchguard/core/error.hpp"

namespace torchguard {
namespace detail {

template <class StateMap>
auto optimizer_state_key(const torch::Tensor& parameter) {
  using Key = typename StateMap::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream text;  // what 1.13's c10::guts::to_string(TensorImpl*) writes
    text << static_cast<const void*>(parameter.unsafeGetTensorImpl());
    return text.str();
  } else {
    return static_cast<Key>(parameter.unsafeGetTensorImpl());
  }
}

// Calls visit(field_name, field) for each field of a built-in optimizer's parameter state.
template <class V>
void visit_fields(torch::optim::SGDParamState& s, V&& visit) {
  visit("momentum_buffer", s.momentum_buffer());
}
template <class AdamLikeState, class V>
void visit_adam_fields(AdamLikeState& s, V&& visit) {  // Adam and AdamW keep the same fields
  visit("step", s.step());
  visit("exp_avg", s.exp_avg());
  visit("exp_avg_sq", s.exp_avg_sq());
  visit("max_exp_avg_sq", s.max_exp_avg_sq());
}
template <class V>
void visit_fields(torch::optim::AdamParamState& s, V&& visit) {
  visit_adam_fields(s, visit);
}
template <class V>
void visit_fields(torch::optim::AdamWParamState& s, V&& visit) {
  visit_adam_fields(s, visit);
}
template <class V>
void visit_fields(torch::optim::AdagradParamState& s, V&& visit) {
  visit("step", s.step());
  visit("sum", s.sum());
}
template <class V>
void visit_fields(torch::optim::RMSpropParamState& s, V&& visit) {
  visit("step", s.step());
  visit("square_avg", s.square_avg());
  visit("momentum_buffer", s.momentum_buffer());
  visit("grad_avg", s.grad_avg());
}

template <class F>
void for_each_parameter(torch::optim::Optimizer& optimizer, F&& fn) {
  std::size_t index = 0;
  for (auto& group : optimizer.param_groups()) {
    for (auto& parameter : group.params()) fn(index++, parameter);
  }
}

inline std::string state_prefix(std::size_t parameter_index) {
  return fmt::format("optimizer/{}/", parameter_index);
}

template <class Optim, class State>
bool save_known_state(torch::optim::Optimizer& optimizer, const char* kind, std::string& saved_kind,
                      std::vector<NamedTensor>& out) {
  if (!dynamic_cast<Optim*>(&optimizer)) return false;
  saved_kind = kind;
  auto& states = optimizer.state();
  using Map = std::decay_t<decltype(states)>;
  for_each_parameter(optimizer, [&](std::size_t index, const torch::Tensor& parameter) {
    const auto it = states.find(optimizer_state_key<Map>(parameter));
    if (it == states.end()) return;
    auto& state = static_cast<State&>(*it->second);
    visit_fields(state, [&](const char* field, auto& value) {
      const std::string name = state_prefix(index) + field;
      if constexpr (std::is_same_v<std::decay_t<decltype(value)>, torch::Tensor>) {
        if (value.defined()) out.push_back({name, value});
      } else {
        out.push_back({name, torch::tensor(static_cast<std::int64_t>(value))});
      }
    });
  });
  return true;
}

template <class Optim, class State>
bool load_known_state(torch::optim::Optimizer& optimizer, const char* kind,
                      const std::string& saved_kind, const TensorFileView& tensors) {
  if (!dynamic_cast<Optim*>(&optimizer)) return false;
  if (saved_kind != kind) {
    throw Error(fmt::format("the optimizer is {}, the checkpoint's is {}", kind, saved_kind));
  }
  auto& states = optimizer.state();
  using Map = std::decay_t<decltype(states)>;
  states.clear();
  for_each_parameter(optimizer, [&](std::size_t index, const torch::Tensor& parameter) {
    auto state = std::make_unique<State>();
    bool found = false;
    visit_fields(*state, [&](const char* field, auto& value) {
      const auto stored = tensors.get(state_prefix(index) + field);
      if (!stored) return;
      found = true;
      if constexpr (std::is_same_v<std::decay_t<decltype(value)>, torch::Tensor>) {
        value = stored->to(parameter.device(), /*non_blocking=*/false, /*copy=*/true);
      } else {
        value = stored->template item<std::int64_t>();
      }
    });
    if (found) states[optimizer_state_key<Map>(parameter)] = std::move(state);
  });
  return true;
}

// Appends the optimizer's state as named tensors and returns its kind ("adam", ...), or
// nullopt for an optimizer that is not built in (the caller serializes it instead).
inline std::optional<std::string> save_optimizer_state(torch::optim::Optimizer& optimizer,
                                                       std::vector<NamedTensor>& out) {
  std::string kind;
  if (save_known_state<torch::optim::SGD, torch::optim::SGDParamState>(optimizer, "sgd", kind,
                                                                       out) ||
      save_known_state<torch::optim::Adam, torch::optim::AdamParamState>(optimizer, "adam", kind,
                                                                         out) ||
      save_known_state<torch::optim::AdamW, torch::optim::AdamWParamState>(optimizer, "adamw", kind,
                                                                           out) ||
      save_known_state<torch::optim::Adagrad, torch::optim::AdagradParamState>(optimizer, "adagrad",
                                                                               kind, out) ||
      save_known_state<torch::optim::RMSprop, torch::optim::RMSpropParamState>(optimizer, "rmsprop",
                                                                               kind, out)) {
    return kind;
  }
  return std::nullopt;
}

// Restores what save_optimizer_state() wrote; false for an optimizer that is not built in.
inline bool load_optimizer_state(torch::optim::Optimizer& optimizer, const std::string& kind,
                                 const TensorFileView& tensors) {
  return load_known_state<torch::optim::SGD, torch::optim::SGDParamState>(optimizer, "sgd", kind,
                                                                          tensors) ||
         load_known_state<torch::optim::Adam, torch::optim::AdamParamState>(optimizer, "adam", kind,
                                                                            tensors) ||
         load_known_state<torch::optim::AdamW, torch::optim::AdamWParamState>(optimizer, "adamw",
                                                                              kind, tensors) ||
         load_known_state<torch::optim::Adagrad, torch::optim::AdagradParamState>(
             optimizer, "adagrad", kind, tensors) ||
         load_known_state<torch::optim::RMSprop, torch::optim::RMSpropParamState>(
             optimizer, "rmsprop", kind, tensors);
}

}  // namespace detail
}  // namespace torchguard
