// A minimal consumer: includes every guard, links against LibTorch, and runs the guards once.
#include <torch/torch.h>
#include <torchguard/torchguard.hpp>

#include <cstdio>

int main() {
  int cleanups = 0;
  {
    torchguard::ScopeStack stack;
    auto& session = stack.emplace<torchguard::TrainingSession>("consumer");
    stack.callback([&] { ++cleanups; });
    session.log_metrics(1, {{"loss", torch::ones({4}).mean().item<double>()}});
  }
  std::printf("torchguard %s (CUDA code paths: %s): %d cleanup ran\n", torchguard::version,
              torchguard::built_with_cuda ? "on" : "off", cleanups);
  return cleanups == 1 ? 0 : 1;
}
