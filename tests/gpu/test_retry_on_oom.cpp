// gpu/retry_on_oom.hpp: retry_on_oom shrinks the batch until the step fits, on the CPU and on a
// fake allocator. On a GPU: tests/test_cuda.cpp.
#include "torchguard/gpu.hpp"

#include <stdexcept>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "gpu_support.hpp"

using torchguard::GpuMemoryGuard;
using torchguard::GpuMemoryOptions;
using torchguard::OutOfMemoryRetryError;
using torchguard::retry_on_oom;
using torchguard::RetryOnOomOptions;
using torchguard::testing::CapturedLogger;
using torchguard::testing::Contains;
using torchguard::testing::FakeBlock;
using torchguard::testing::FakeGpu;
using torchguard::testing::MiB;
using torchguard::testing::throw_oom;

TEST_CASE("retry_on_oom halves the batch until it fits", "[gpu_memory][oom]") {
  CapturedLogger captured;
  RetryOnOomOptions options;
  options.logger = captured.logger;
  std::vector<std::int64_t> calls;
  const auto result = retry_on_oom(
      256,
      [&](std::int64_t batch) {
        calls.push_back(batch);
        if (batch > 40) throw_oom("Tried to allocate 2.00 GiB");
        return batch * 10;
      },
      options);
  CHECK(result == 320);
  CHECK(calls == std::vector<std::int64_t>{256, 128, 64, 32});
  CHECK(
      captured.sink->contains(spdlog::level::warn, "out of memory at batch 256; retrying at 128"));
  CHECK(captured.sink->contains(spdlog::level::info,
                                "batch 32 fits (out of memory at 256, 128, 64)"));
}

TEST_CASE("retry_on_oom takes the user's shrink function and a minimum", "[gpu_memory][oom]") {
  RetryOnOomOptions options;
  options.logger = CapturedLogger().logger;
  options.shrink = [](std::int64_t batch) { return batch - 100; };
  options.minimum_batch = 150;
  std::vector<std::int64_t> calls;
  try {
    retry_on_oom(
        500,
        [&](std::int64_t batch) -> int {
          calls.push_back(batch);
          throw_oom("Tried to allocate 1.00 GiB");
        },
        options);
    FAIL("expected OutOfMemoryRetryError");
  } catch (const OutOfMemoryRetryError& e) {
    // 200 - 100 is below the minimum: the minimum itself is tried last.
    CHECK(e.batch_sizes_tried() == std::vector<std::int64_t>{500, 400, 300, 200, 150});
    CHECK_THAT(std::string(e.what()), Contains("500, 400, 300, 200, 150") &&
                                          Contains("minimum 150") &&
                                          Contains("Tried to allocate 1.00 GiB"));
  }
  CHECK(calls.size() == 5);
}

TEST_CASE("retry_on_oom treats an old-style CUDA out-of-memory c10::Error as OOM",
          "[gpu_memory][oom]") {
  RetryOnOomOptions options;
  options.logger = CapturedLogger().logger;
  int calls = 0;
  const int result = retry_on_oom(
      8,
      [&](std::int64_t batch) {
        ++calls;
        if (batch == 8) {
          throw c10::Error({__func__, __FILE__, static_cast<std::uint32_t>(__LINE__)},
                           "CUDA out of memory. Tried to allocate 20.00 MiB");
        }
        return static_cast<int>(batch);
      },
      options);
  CHECK(result == 4);
  CHECK(calls == 2);
}

TEST_CASE("retry_on_oom lets other errors through unchanged", "[gpu_memory][oom]") {
  int calls = 0;
  CHECK_THROWS_AS(retry_on_oom(64,
                               [&](std::int64_t) -> int {
                                 ++calls;
                                 throw std::domain_error("bad input");
                               }),
                  std::domain_error);
  CHECK(calls == 1);
  CHECK_THROWS_WITH(retry_on_oom(0, [](std::int64_t b) { return b; }), Contains("at least"));
}

TEST_CASE("fake allocator: retry_on_oom catches the OOM then frees the cache and shrinks the batch",
          "[gpu_memory][fake][oom]") {
  FakeGpu gpu;
  GpuMemoryOptions scope = gpu.options();
  scope.memory_fraction = 0.25;  // 256 MiB
  GpuMemoryGuard guard(scope);
  gpu.allocator.events.clear();
  RetryOnOomOptions options;
  options.logger = gpu.captured.logger;
  // A step: activations of batch/4 MiB, then batch MiB for the batch itself.
  const auto fitted = retry_on_oom(
      1024,
      [&](std::int64_t batch) {
        FakeBlock activations(gpu.allocator, batch / 4 * MiB);
        FakeBlock data(gpu.allocator, batch * MiB);
        return batch;
      },
      options);
  CHECK(fitted == 128);
  CHECK(gpu.allocator.events ==
        std::vector<std::string>{"allocate 256 MiB", "out of memory at 1024 MiB", "empty_cache",
                                 "allocate 128 MiB", "out of memory at 512 MiB", "empty_cache",
                                 "allocate 64 MiB", "out of memory at 256 MiB", "empty_cache",
                                 "allocate 32 MiB", "allocate 128 MiB"});
  CHECK(guard.stats().oom_events == 3);
  CHECK(gpu.captured.sink->contains(spdlog::level::info,
                                    "batch 128 fits (out of memory at 1024, 512, 256)"));
}
