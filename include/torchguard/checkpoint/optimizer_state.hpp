// LibTorch's built-in optimizers without an archive: the per-parameter state as named tensors
// ("state.<i>.<field>", for optimizer.safetensors), written at the disk's speed and copied out
// cheaply for a background save, and each group's settings as JSON (Python's names: lr, betas,
// ...). Other optimizers fall back to their own serialize(). Version shim: LibTorch 1.13 keys the
// state by a string of the parameter's TensorImpl address, 2.x by the address itself.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <numeric>
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
  std::size_t first = 0;
  for (auto& group : optimizer.param_groups()) {
    nlohmann::json settings = nlohmann::json::object();
    visit_settings(static_cast<Options&>(group.options()),
                   [&](const char* name, const auto& value) { settings[name] = value; });
    // Python's param_groups list their parameters' indices, counted over every group.
    std::vector<std::size_t> params(group.params().size());
    std::iota(params.begin(), params.end(), first);
    first += params.size();
    settings["params"] = params;
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

// Checks the stored state against `optimizer` and returns what puts it there, changing nothing
// before it is called: the groups' settings (from `groups`, when given) and each parameter's
// state, every tensor the parameter's shape. nullopt when `optimizer` is not an `Optim`.
template <class Optim, class State, class Options>
std::optional<std::function<void()>> plan_known_state(torch::optim::Optimizer& optimizer,
                                                      const char* kind,
                                                      const std::string& saved_kind,
                                                      const TensorMap& tensors,
                                                      const nlohmann::json* groups) {
  if (!dynamic_cast<Optim*>(&optimizer)) return std::nullopt;
  if (saved_kind != kind) {
    throw Error(fmt::format("the optimizer is {}, the checkpoint's is {}", kind, saved_kind));
  }
  auto& param_groups = optimizer.param_groups();
  std::vector<Options> settings;
  if (groups) {
    if (!groups->is_array() || groups->size() != param_groups.size()) {
      throw Error(fmt::format("it holds the settings of {} optimizer groups, this optimizer has {}",
                              groups->is_array() ? groups->size() : 0, param_groups.size()));
    }
    for (std::size_t i = 0; i < param_groups.size(); ++i) {
      const auto params = (*groups)[i].find("params");
      if (params != (*groups)[i].end() && params->is_array() &&
          params->size() != param_groups[i].params().size()) {
        throw Error(fmt::format("its optimizer group {} has {} parameters, this one's has {}", i,
                                params->size(), param_groups[i].params().size()));
      }
      settings.push_back(static_cast<Options&>(param_groups[i].options()));
      visit_settings(settings.back(), [&](const char* name, auto& value) {
        value = (*groups)[i].at(name).template get<std::decay_t<decltype(value)>>();
      });
    }
  }
  using Map = std::decay_t<decltype(optimizer.state())>;
  auto states = std::make_shared<Map>();
  for_each_parameter(optimizer, [&](std::size_t index, const torch::Tensor& parameter) {
    auto state = std::make_unique<State>();
    bool found = false;
    visit_fields(*state, [&](const char* field, auto& value) {
      const std::string key = optimizer_state_key(std::to_string(index), field);
      const auto stored = tensors.find(key);
      if (stored == tensors.end()) return;
      found = true;
      if constexpr (std::is_same_v<std::decay_t<decltype(value)>, torch::Tensor>) {
        if (stored->second.sizes() != parameter.sizes()) {
          throw Error(fmt::format("{} is {}, its parameter {}", key,
                                  c10::str(stored->second.sizes()), c10::str(parameter.sizes())));
        }
        value = stored->second.to(parameter.device(), /*non_blocking=*/false, /*copy=*/true);
      } else {
        value = stored->second.template item<std::int64_t>();
      }
    });
    if (found) (*states)[optimizer_state_key<Map>(parameter)] = std::move(state);
  });
  return [&optimizer, states, settings = std::move(settings)]() mutable {
    auto& param_groups = optimizer.param_groups();
    for (std::size_t i = 0; i < settings.size(); ++i) {
      static_cast<Options&>(param_groups[i].options()) = settings[i];
    }
    optimizer.state() = std::move(*states);
  };
}

// Appends the optimizer's state as named tensors and returns its kind ("adam", ...), or
// nullopt for an optimizer that is not built in (the caller serializes it instead). `groups`:
// Python's param_groups (the settings under Python's names, and "params").
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

// Checks what save_optimizer_state() wrote against `optimizer` and returns what restores it (the
// groups' settings from `groups`; without, the caller restores them from format 1's archive);
// nullopt for an optimizer that is not built in. Throws Error naming what does not fit.
inline std::optional<std::function<void()>> plan_optimizer_state(torch::optim::Optimizer& optimizer,
                                                                 const std::string& kind,
                                                                 const TensorMap& tensors,
                                                                 const nlohmann::json* groups) {
  using namespace torch::optim;
  if (auto plan = plan_known_state<SGD, SGDParamState, SGDOptions>(optimizer, "sgd", kind, tensors,
                                                                   groups)) {
    return plan;
  }
  if (auto plan = plan_known_state<Adam, AdamParamState, AdamOptions>(optimizer, "adam", kind,
                                                                      tensors, groups)) {
    return plan;
  }
  if (auto plan = plan_known_state<AdamW, AdamWParamState, AdamWOptions>(optimizer, "adamw", kind,
                                                                         tensors, groups)) {
    return plan;
  }
  if (auto plan = plan_known_state<Adagrad, AdagradParamState, AdagradOptions>(
          optimizer, "adagrad", kind, tensors, groups)) {
    return plan;
  }
  return plan_known_state<RMSprop, RMSpropParamState, RMSpropOptions>(optimizer, "rmsprop", kind,
                                                                      tensors, groups);
}

}  // namespace detail
}  // namespace torchguard
