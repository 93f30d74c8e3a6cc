// What both Fashion-MNIST training examples share: the model, the dataset loaded concurrently,
// the batch order, evaluation through BatchedInference, and a fingerprint of the parameters.
#pragma once

#define XXH_INLINE_ALL  // header-only, as torchguard uses it
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <future>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>
#include <torchguard/async.hpp>

#include "fashion_mnist.hpp"

namespace fashion_mnist {

// Two convolutions and two linear layers: about 0.91 test accuracy after a few epochs.
struct NetImpl : torch::nn::Module {
  NetImpl()
      : conv1(register_module("conv1",
                              torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 32, 3).padding(1)))),
        conv2(register_module("conv2",
                              torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 3).padding(1)))),
        fc1(register_module("fc1", torch::nn::Linear(64 * 7 * 7, 128))),
        fc2(register_module("fc2", torch::nn::Linear(128, 10))),
        dropout(register_module("dropout", torch::nn::Dropout(0.25))) {}

  torch::Tensor forward(torch::Tensor x) {
    x = torch::max_pool2d(torch::relu(conv1->forward(x)), 2);
    x = torch::max_pool2d(torch::relu(conv2->forward(x)), 2);
    x = dropout->forward(torch::relu(fc1->forward(x.flatten(1))));
    return fc2->forward(x);
  }

  torch::nn::Conv2d conv1, conv2;
  torch::nn::Linear fc1, fc2;
  torch::nn::Dropout dropout;
};
TORCH_MODULE(Net);

inline torch::Device pick_device(const std::string& name) {
  if (name == "auto") return torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  torch::Device device(name);  // throws for a malformed name
  if (device.is_cuda() && !torch::cuda::is_available()) {
    throw std::runtime_error("--device " + name + ": no CUDA device is available");
  }
  return device;
}

// The four files, decompressed and parsed concurrently.
inline std::pair<Split, Split> load_dataset(const std::string& dir) {
  check_data_dir(dir);
  struct File {
    std::string split, kind;
  };
  const std::vector<File> files{
      {"train", "images"}, {"train", "labels"}, {"t10k", "images"}, {"t10k", "labels"}};
  torchguard::GatherOptions options;
  options.max_in_flight = files.size();
  auto tensors = torchguard::values(torchguard::gather(
      files,
      [&dir](const File& file) {
        const auto path = file_path(dir, file.split, file.kind);
        return file.kind == "images" ? read_images(path) : read_labels(path);
      },
      options));
  return {make_split(tensors[0], tensors[1], "training set in " + dir),
          make_split(tensors[2], tensors[3], "test set in " + dir)};
}

// The epoch's sample order: a function of the seed and the epoch only, so a resumed run sees the
// batches the interrupted one would have.
inline std::vector<std::int64_t> epoch_order(std::int64_t samples, std::uint64_t seed,
                                             std::int64_t epoch) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(samples));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 random(seed * 1000003u + static_cast<std::uint64_t>(epoch));
  std::shuffle(order.begin(), order.end(), random);
  return order;
}

struct Evaluation {
  double loss = 0;
  double accuracy = 0;
};

// One request per test image through BatchedInference; the futures are gathered in order.
inline Evaluation evaluate(Net& model, const Split& test, std::int64_t count,
                           torch::Device device) {
  model->eval();
  torchguard::BatchedInferenceOptions options;
  options.max_batch = 500;
  options.max_delay = std::chrono::milliseconds(2);
  options.device = device;
  std::vector<torch::Tensor> logits;
  {
    torchguard::BatchedInference server(
        [&model](const torch::Tensor& batch) { return model->forward(batch); }, options);
    std::vector<std::future<torch::Tensor>> futures;
    futures.reserve(static_cast<std::size_t>(count));
    for (std::int64_t i = 0; i < count; ++i) {
      futures.push_back(server.submit(test.images[i]));
    }
    logits = torchguard::gather(std::move(futures));
  }
  model->train();
  const auto all = torch::stack(logits).to(torch::kCPU);
  Evaluation result;
  const auto labels = test.labels.slice(0, 0, count);
  result.loss = torch::nn::functional::cross_entropy(all, labels).item<double>();
  result.accuracy = all.argmax(1).eq(labels).to(torch::kDouble).mean().item<double>();
  return result;
}

// A fingerprint of every parameter's bytes: equal runs print equal fingerprints.
inline std::string parameter_fingerprint(Net& model) {
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  for (const auto& parameter : model->named_parameters()) {
    const auto values = parameter.value().detach().to(torch::kCPU).contiguous();
    XXH3_64bits_update(state, values.data_ptr(), values.numel() * values.element_size());
  }
  char text[17];
  std::snprintf(text, sizeof text, "%016llx",
                static_cast<unsigned long long>(XXH3_64bits_digest(state)));
  XXH3_freeState(state);
  return text;
}

}  // namespace fashion_mnist
