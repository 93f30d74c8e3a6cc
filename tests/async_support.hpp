// What the tests of async/ share (tests/async/): inputs, a bounded wait, a gate that holds a model
// call, and a BatchedInference whose first request is held in its model.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include "support.hpp"
#include "torchguard/async.hpp"

namespace torchguard::testing {

// The inputs 0 .. count - 1.
inline std::vector<int> iota(int count) {
  std::vector<int> values(static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) values[static_cast<std::size_t>(i)] = i;
  return values;
}

// Waits until `done()` holds, failing the test after 30 s rather than hanging.
template <class Predicate>
void wait_until(Predicate done) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!done()) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

// Holds a model call (the model thread) until opened: requests submitted meanwhile queue.
class Gate {
 public:
  void pass() {
    std::unique_lock<std::mutex> lock(mutex_);
    entered_ = true;
    cv_.notify_all();
    cv_.wait(lock, [this] { return open_; });
  }
  void open() {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ = true;
    cv_.notify_all();
  }
  // Waits until a call is held here (30 s at most, then fails the test).
  void wait_entered() {
    std::unique_lock<std::mutex> lock(mutex_);
    REQUIRE(cv_.wait_for(lock, std::chrono::seconds(30), [this] { return entered_; }));
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool entered_ = false;
  bool open_ = false;
};

// The message of the exception `error` holds.
inline std::string message_of(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  }
}

// A BatchedInference with a cancellation token whose first request (`running`) is held in the
// model by a Gate, so that the `queued` requests submitted after it stay queued.
struct HeldBatchServer {
  explicit HeldBatchServer(int queued_requests)
      : server(
            [this](const torch::Tensor& batch) {
              gate.pass();
              return batch * 2;
            },
            options(source)) {
    running = server.submit(torch::ones({2}));
    gate.wait_entered();
    for (int i = 0; i < queued_requests; ++i) queued.push_back(server.submit(torch::ones({2})));
  }
  static BatchedInferenceOptions options(const CancellationSource& source) {
    BatchedInferenceOptions options;
    options.max_batch = 64;
    options.cancellation = source.token();
    return options;
  }

  CancellationSource source;
  Gate gate;
  BatchedInference server;
  std::future<torch::Tensor> running;
  std::vector<std::future<torch::Tensor>> queued;
};

}  // namespace torchguard::testing
