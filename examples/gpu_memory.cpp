// gpu_memory: per-scope GPU memory accounting and a batch size that adapts to the memory.
//
// On a GPU: each phase logs its own peak, what it left allocated, and fragmentation; a forward
// pass finds the largest batch that fits with retry_on_oom. On a CPU-only build or machine, the
// guards say once that they do nothing, and the same program runs on the CPU.
#include <torch/torch.h>
#include <torchguard/torchguard.hpp>

#include <cstdio>

int run() {
  const bool gpu = torch::cuda::is_available();
  const torch::Device device = gpu ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
  torch::nn::Sequential model(torch::nn::Linear(1024, 4096), torch::nn::ReLU(),
                              torch::nn::Linear(4096, 1024));
  model->to(device);

  torchguard::GpuMemoryOptions options;
  options.label = "whole run";
  torchguard::GpuMemoryGuard whole(options);
  {
    options.label = "warm-up";
    torchguard::GpuMemoryGuard warm_up(options);  // nested: reports its own peak
    model->forward(torch::randn({256, 1024}, device)).sum().backward();
  }
  // The largest power-of-two batch that fits for a forward pass (from 1M samples down on a GPU;
  // the CPU's memory is not probed this way).
  const std::int64_t batch = torchguard::retry_on_oom(gpu ? 1 << 20 : 1024, [&](std::int64_t size) {
    options.label = "forward at batch " + std::to_string(size);
    torchguard::GpuMemoryGuard scope(options);
    torch::NoGradGuard no_grad;
    model->forward(torch::randn({size, 1024}, device));
    return size;
  });
  std::printf("a forward pass fits at batch %lld on %s\n", static_cast<long long>(batch),
              gpu ? "the GPU" : "the CPU");
  const auto stats = whole.stats();
  if (stats.available) {
    std::printf("peak allocated so far: %.1f MiB\n", stats.peak_allocated_bytes / 1048576.0);
  }
  return 0;
}

// Errors end the program with "error: <message>" and status 1, never an abort.
int main() { return torchguard::exit_status(run); }
