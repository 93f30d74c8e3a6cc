// The Prefetcher's CUDA stage: pin an item's tensors, copy them to the device non-blocking on a
// side stream, and let the consumer's stream wait for the copy (an event) rather than the host.
// The CUDA calls are compiled only against a CUDA-enabled LibTorch (TORCHGUARD_WITH_CUDA).
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <torch/torch.h>

#include "torchguard/core/error.hpp"
#include "torchguard/version.hpp"

#if TORCHGUARD_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace torchguard {
namespace detail {

// The item types whose tensors the stage can find: a tensor, torch::data::Example, and
// vectors, pairs and tuples of those.
template <class T>
struct stageable : std::false_type {};
template <>
struct stageable<torch::Tensor> : std::true_type {};
template <class A, class B>
struct stageable<torch::data::Example<A, B>> : std::bool_constant<stageable<A>::value> {};
template <class T>
struct stageable<std::vector<T>> : stageable<T> {};
template <class A, class B>
struct stageable<std::pair<A, B>> : std::bool_constant<stageable<A>::value || stageable<B>::value> {
};
template <class... T>
struct stageable<std::tuple<T...>> : std::bool_constant<(stageable<T>::value || ...)> {};

template <class F>
void for_each_tensor(torch::Tensor& tensor, F& f) {
  if (tensor.defined()) f(tensor);
}
template <class A, class B, class F>
void for_each_tensor(torch::data::Example<A, B>& example, F& f);
template <class T, class F>
void for_each_tensor(std::vector<T>& items, F& f);
template <class A, class B, class F>
void for_each_tensor(std::pair<A, B>& pair, F& f);
template <class... T, class F>
void for_each_tensor(std::tuple<T...>& tuple, F& f);
template <class T, class F, class = std::enable_if_t<!stageable<T>::value>>
void for_each_tensor(T&, F&) {}  // no tensors in there

template <class A, class B, class F>
void for_each_tensor(torch::data::Example<A, B>& example, F& f) {
  for_each_tensor(example.data, f);
  for_each_tensor(example.target, f);
}
template <class T, class F>
void for_each_tensor(std::vector<T>& items, F& f) {
  for (auto& item : items) for_each_tensor(item, f);
}
template <class A, class B, class F>
void for_each_tensor(std::pair<A, B>& pair, F& f) {
  for_each_tensor(pair.first, f);
  for_each_tensor(pair.second, f);
}
template <class... T, class F>
void for_each_tensor(std::tuple<T...>& tuple, F& f) {
  std::apply([&f](auto&... items) { (for_each_tensor(items, f), ...); }, tuple);
}

// Throws unless items can be staged on `device` in this build and on this machine. Returns the
// device with its index: the caller's current device when none was given (workers' threads have
// their own current device).
inline torch::Device check_stage_device(const torch::Device& device) {
  if (!device.is_cuda()) {
    throw OptionsError(
        fmt::format("Prefetcher: the staging device must be a CUDA device, not {}", device.str()));
  }
#if TORCHGUARD_WITH_CUDA
  if (!torch::cuda::is_available()) {
    throw OptionsError(
        fmt::format("Prefetcher: staging on {} needs a GPU, and none is visible", device.str()));
  }
  const auto index = device.has_index() ? device.index() : c10::cuda::current_device();
  if (index >= static_cast<c10::DeviceIndex>(torch::cuda::device_count())) {
    throw OptionsError(fmt::format("Prefetcher: there is no {} on this machine", device.str()));
  }
  return torch::Device(torch::kCUDA, index);
#else
  throw OptionsError(fmt::format(
      "Prefetcher: staging on {} needs a CUDA-enabled LibTorch; torchguard was built against a "
      "CPU-only one",
      device.str()));
#endif
}

// Copies the item's tensors to `device` on a side stream (from pinned memory when `pin`) and
// returns what the consumer calls before use: its current stream waits for the copy, and the
// caching allocator learns the tensors are used on that stream.
template <class T>
std::function<void(T&)> stage_to_device(T& item, const torch::Device& device, bool pin) {
  static_assert(stageable<T>::value, "staging needs items made of tensors");
#if TORCHGUARD_WITH_CUDA
  const auto index = device.has_index() ? device.index() : c10::cuda::current_device();
  const torch::Device target(torch::kCUDA, index);
  auto stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index);
  {
    c10::cuda::CUDAStreamGuard on_side_stream(stream);
    auto copy = [&](torch::Tensor& tensor) {
      if (tensor.device() == target) return;
      auto source = (pin && tensor.is_cpu() && !tensor.is_pinned()) ? tensor.pin_memory() : tensor;
      tensor = source.to(target, /*non_blocking=*/true);
    };
    for_each_tensor(item, copy);
  }
  auto copied = std::make_shared<at::cuda::CUDAEvent>();
  copied->record(stream);
  return [copied, index](T& value) {
    auto current = c10::cuda::getCurrentCUDAStream(index);
    copied->block(current);
    auto mark = [&current](torch::Tensor& tensor) {
      if (tensor.is_cuda()) tensor.record_stream(current);
    };
    for_each_tensor(value, mark);
  };
#else
  (void)item;
  (void)pin;
  check_stage_device(device);  // throws: no CUDA in this build
  return {};
#endif
}

}  // namespace detail
}  // namespace torchguard
