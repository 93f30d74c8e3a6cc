// Real-time inference for many callers: each submits one input and waits for its own output;
// BatchedInference merges concurrent requests into batches (up to 32, waiting at most 2 ms).
#include <chrono>
#include <cstdio>
#include <future>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include "torchguard/async.hpp"

int run() {
  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(784, 256), torch::nn::ReLU(),
                              torch::nn::Linear(256, 10));
  model->eval();

  torchguard::BatchedInference server(model, /*max_batch=*/32, std::chrono::milliseconds(2));

  // 16 client threads, 50 requests each, one at a time (each waits for its answer).
  const int clients = 16;
  const int requests = 50;
  std::vector<int> agreements(clients, 0);
  std::vector<std::thread> threads;
  for (int client = 0; client < clients; ++client) {
    threads.emplace_back([&, client] {
      for (int r = 0; r < requests; ++r) {
        auto image = torch::rand({784});
        std::future<torch::Tensor> logits = server.submit(image);
        const auto batched = logits.get().argmax().item<std::int64_t>();
        // The same answer as calling the model alone.
        c10::InferenceMode inference;
        const auto alone = model->forward(image.unsqueeze(0))[0].argmax().item<std::int64_t>();
        agreements[static_cast<std::size_t>(client)] += batched == alone;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  server.close();  // answers anything still queued; the destructor would too

  int agreed = 0;
  for (int count : agreements) agreed += count;
  const auto stats = server.stats();
  std::printf(
      "%d requests in %llu batches (largest %zu, mean %.1f); %d of %d agree with "
      "one-by-one calls\n",
      clients * requests, static_cast<unsigned long long>(stats.batches), stats.largest_batch,
      static_cast<double>(stats.requests) / static_cast<double>(stats.batches), agreed,
      clients * requests);
  return agreed == clients * requests ? 0 : 1;
}

// Errors end the program with "error: <message>" and status 1, never an abort.
int main() { return torchguard::exit_status(run); }
