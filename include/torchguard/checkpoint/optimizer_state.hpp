// LibTorch's built-in optimizers without an archive: the per-parameter state as named tensors
// ("state.<i>.<field>", for optimizer.safetensors), written at the disk's speed and copied out
// cheaply for a background save, and each group's settings as JSON (Python's names: lr, betas,
// ...). Other optimizers fall back to their own serialize(). Version shim: LibTorch 1.13 keys the
// state by a string of the parameter's TensorImpl address, 2.x by the address itself.
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
#include <nlohmann/json.hpp>

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

// Calls visit(name, setting) for each setting of a built-in optimizer's group options, under
// Python's names.
template <class V>
void visit_settings(torch::optim::SGDOptions& o, V&& visit) {
  visit("lr", o.lr());
  visit("momentum", o.momentum());
  visit("dampening", o.dampening());
  visit("weight_decay", o.weight_decay());
  visit("nesterov", o.nesterov());
}
template <class AdamLikeOptions, class V>
void visit_adam_settings(AdamLikeOptions& o, V&& visit) {
  visit("lr", o.lr());
  visit("betas", o.betas());
  visit("eps", o.eps());
  visit("weight_decay", o.weight_decay());
  visit("amsgrad", o.amsgrad());
}
template <class V>
void visit_settings(torch::optim::AdamOptions& o, V&& visit) {
  visit_adam_settings(o, visit);
}
template <class V>
void visit_settings(torch::optim::AdamWOptions& o, V&& visit) {
  visit_adam_settings(o, visit);
}
template <class V>
void visit_settings(torch::optim::AdagradOptions& o, V&& visit) {
  visit("lr", o.lr());
  visit("lr_decay", o.lr_decay());
  visit("weight_decay", o.weight_decay());
  visit("initial_accumulator_value", o.initial_accumulator_value());
  visit("eps", o.eps());
}
template <class V>
void visit_settings(torch::optim::RMSpropOptions& o, V&& visit) {
  visit("lr", o.lr());
  visit("alpha", o.alpha());
  visit("eps", o.eps());
  visit("weight_decay", o.weight_decay());
  visit("momentum", o.momentum());
  visit("centered", o.centered());
}

template <class F>
void for_each_parameter(torch::optim::Optimizer& optimizer, F&& fn) {
  std::size_t index = 0;
  for (auto& group : optimizer.param_groups()) {
    for (auto& parameter : group.params()) fn(index++, parameter);
  }
}

template <class Optim, class State, class Options>
bool save_known_state(torch::optim::Optimizer& optimizer, const char* kind, std::string& saved_kind,
                      std::vector<NamedTensor>& out, nlohmann::json& groups) {
  if (!dynamic_cast<Optim*>(&optimizer)) return false;
  saved_kind = kind;
  groups = nlohmann::json::array();
  for (auto& group : optimizer.param_groups()) {
    nlohmann::json settings = nlohmann::json::object();
    visit_settings(static_cast<Options&>(group.options()),
                   [&](const char* name, const auto& value) { settings[name] = value; });
    groups.push_back(std::move(settings));
  }
  auto& states = optimizer.state();
  using Map = std::decay_t<decltype(states)>;
  for_each_parameter(optimizer, [&](std::size_t index, const torch::Tensor& parameter) {
    const auto it = states.find(optimizer_state_key<Map>(parameter));
    if (it == states.end()) return;
    auto& state = static_cast<State&>(*it->second);
    visit_fields(state, [&](const char* field, auto& value) {
      const std::string name = optimizer_state_key(std::to_string(index), field);
      if constexpr (std::is_same_v<std::decay_t<decltype(value)>, torch::Tensor>) {
        if (value.defined()) out.push_back({name, value});
      } else {
        out.push_back({name, torch::tensor(static_cast<std::int64_t>(value))});
      }
    });
  });
  return true;
}

template <class Optim, class State, class Options>
bool load_known_state(torch::optim::Optimizer& optimizer, const char* kind,
                      const std::string& saved_kind, const TensorMap& tensors,
                      const nlohmann::json* groups) {
  if (!dynamic_cast<Optim*>(&optimizer)) return false;
  if (saved_kind != kind) {
    throw Error(fmt::format("the optimizer is {}, the checkpoint's is {}", kind, saved_kind));
  }
  if (groups) {  // format 2: the settings in JSON; checked before anything changes
    auto& param_groups = optimizer.param_groups();
    if (!groups->is_array() || groups->size() != param_groups.size()) {
      throw Error(fmt::format("it holds the settings of {} optimizer groups, this optimizer has {}",
                              groups->is_array() ? groups->size() : 0, param_groups.size()));
    }
    std::vector<Options> settings;
    for (std::size_t i = 0; i < param_groups.size(); ++i) {
      settings.push_back(static_cast<Options&>(param_groups[i].options()));
      visit_settings(settings.back(), [&](const char* name, auto& value) {
        value = (*groups)[i].at(name).template get<std::decay_t<decltype(value)>>();
      });
    }
    for (std::size_t i = 0; i < param_groups.size(); ++i) {
      static_cast<Options&>(param_groups[i].options()) = settings[i];
    }
  }
  auto& states = optimizer.state();
  using Map = std::decay_t<decltype(states)>;
  states.clear();
  for_each_parameter(optimizer, [&](std::size_t index, const torch::Tensor& parameter) {
    auto state = std::make_unique<State>();
    bool found = false;
    visit_fields(*state, [&](const char* field, auto& value) {
      const auto stored = tensors.find(optimizer_state_key(std::to_string(index), field));
      if (stored == tensors.end()) return;
      found = true;
      if constexpr (std::is_same_v<std::decay_t<decltype(value)>, torch::Tensor>) {
        value = stored->second.to(parameter.device(), /*non_blocking=*/false, /*copy=*/true);
      } else {
        value = stored->second.template item<std::int64_t>();
      }
    });
    if (found) states[optimizer_state_key<Map>(parameter)] = std::move(state);
  });
  return true;
}

// Appends the optimizer's state as named tensors and returns its kind ("adam", ...), or
// nullopt for an optimizer that is not built in (the caller serializes it instead).
inline std::optional<std::string> save_optimizer_state(torch::optim::Optimizer& optimizer,
                                                       std::vector<NamedTensor>& out,
                                                       nlohmann::json& groups) {
  using namespace torch::optim;
  std::string kind;
  if (save_known_state<SGD, SGDParamState, SGDOptions>(optimizer, "sgd", kind, out, groups) ||
      save_known_state<Adam, AdamParamState, AdamOptions>(optimizer, "adam", kind, out, groups) ||
      save_known_state<AdamW, AdamWParamState, AdamWOptions>(optimizer, "adamw", kind, out,
                                                             groups) ||
      save_known_state<Adagrad, AdagradParamState, AdagradOptions>(optimizer, "adagrad", kind, out,
                                                                   groups) ||
      save_known_state<RMSprop, RMSpropParamState, RMSpropOptions>(optimizer, "rmsprop", kind, out,
                                                                   groups)) {
    return kind;
  }
  return std::nullopt;
}

// Restores what save_optimizer_state() wrote, the groups' settings from `groups` (format 2) or,
// when null, by the caller (format 1's archive); false for an optimizer that is not built in.
inline bool load_optimizer_state(torch::optim::Optimizer& optimizer, const std::string& kind,
                                 const TensorMap& tensors, const nlohmann::json* groups) {
  using namespace torch::optim;
  return load_known_state<SGD, SGDParamState, SGDOptions>(optimizer, "sgd", kind, tensors,
                                                          groups) ||
         load_known_state<Adam, AdamParamState, AdamOptions>(optimizer, "adam", kind, tensors,
                                                             groups) ||
         load_known_state<AdamW, AdamWParamState, AdamWOptions>(optimizer, "adamw", kind, tensors,
                                                                groups) ||
         load_known_state<Adagrad, AdagradParamState, AdagradOptions>(optimizer, "adagrad", kind,
                                                                      tensors, groups) ||
         load_known_state<RMSprop, RMSpropParamState, RMSpropOptions>(optimizer, "rmsprop", kind,
                                                                      tensors, groups);
}

}  // namespace detail
}  // namespace torchguard
