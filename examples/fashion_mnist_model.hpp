// The Fashion-MNIST CNN, the device it runs on, and a fingerprint of its parameters. Shared by
// the training demos and bench/distributed.cpp.
#pragma once

#include "parameter_fingerprint.hpp"

#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <torchguard/gpu.hpp>

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

// "auto": the GPU when there is one, else the CPU.
inline torch::Device pick_device(const std::string& name) {
  if (name == "auto") return torchguard::cuda_available() ? torch::kCUDA : torch::kCPU;
  torch::Device device(name);  // throws for a malformed name
  if (device.is_cuda() && !torchguard::cuda_available()) {
    throw std::runtime_error("--device " + name + ": no CUDA device is available");
  }
  return device;
}

inline std::string parameter_fingerprint(Net& model) {
  return examples::parameter_fingerprint(*model);
}

}  // namespace fashion_mnist
