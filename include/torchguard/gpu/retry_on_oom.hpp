// retry_on_oom: run a step at the largest batch that fits, what Accelerate's
// find_executable_batch_size gives Python.
//
//   auto loss = torchguard::retry_on_oom(512, [&](std::int64_t batch) { return step(batch); });
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <spdlog/spdlog.h>
#if FMT_VERSION >= 110000
#include <fmt/ranges.h>  // fmt::join moved here in fmt 11
#endif
#include <torch/torch.h>

#include "torchguard/core/error.hpp"
#include "torchguard/core/logging.hpp"
#include "torchguard/gpu/cuda_memory.hpp"

namespace torchguard {

// Thrown by retry_on_oom when even the smallest batch did not fit.
class OutOfMemoryRetryError : public Error {
 public:
  OutOfMemoryRetryError(const std::string& message, std::vector<std::int64_t> tried)
      : Error(message), tried_(std::move(tried)) {}
  const std::vector<std::int64_t>& batch_sizes_tried() const noexcept { return tried_; }

 private:
  std::vector<std::int64_t> tried_;
};

struct RetryOnOomOptions {
  std::int64_t minimum_batch = 1;
  std::function<std::int64_t(std::int64_t)> shrink;  // default: halve
  bool empty_cache = true;                           // free the allocator's cache before each retry
  std::shared_ptr<spdlog::logger> logger;
};

namespace detail {

// True for an out-of-memory error: c10::OutOfMemoryError, or the CUDA out-of-memory c10::Error
// of versions that had no such type.
inline bool is_out_of_memory(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const c10::OutOfMemoryError&) {
    return true;
  } catch (const c10::Error& e) {
    return std::string(e.what()).find("out of memory") != std::string::npos;
  } catch (...) {
    return false;
  }
}

}  // namespace detail

// Calls fn(batch) from `initial_batch` down: after an out-of-memory error the cache is freed,
// the batch shrinks (halved, or options.shrink) and fn runs again, down to minimum_batch; then
// OutOfMemoryRetryError lists every size tried. Each retry is logged (warn), and the size that
// fitted with those that did not (info). Other errors propagate unchanged.
template <class F>
auto retry_on_oom(std::int64_t initial_batch, F&& fn, RetryOnOomOptions options = {})
    -> std::invoke_result_t<F&, std::int64_t> {
  if (initial_batch < options.minimum_batch || options.minimum_batch < 1) {
    throw OptionsError(fmt::format(
        "retry_on_oom: initial batch {} must be at least minimum_batch {} (itself at least 1)",
        initial_batch, options.minimum_batch));
  }
  auto logger = detail::or_default(options.logger);
  std::vector<std::int64_t> tried;
  std::int64_t batch = initial_batch;
  for (;;) {
    std::exception_ptr error;
    // After out-of-memory errors, the size that fitted and those that did not are logged.
    const auto report_fit = [&] {
      if (tried.empty()) return;
      logger->info("retry_on_oom: batch {} fits (out of memory at {})", batch,
                   fmt::join(tried, ", "));
    };
    try {
      if constexpr (std::is_void_v<std::invoke_result_t<F&, std::int64_t>>) {
        fn(batch);
        report_fit();
        return;
      } else {
        auto result = fn(batch);
        report_fit();
        return result;
      }
    } catch (...) {
      error = std::current_exception();
      if (!detail::is_out_of_memory(error)) throw;
    }
    tried.push_back(batch);
    auto& allocator = detail::allocator_source();
    if (options.empty_cache && allocator.usable()) allocator.empty_cache();
    // Shrunk below the minimum, the minimum itself is the last size tried.
    const std::int64_t shrunk = options.shrink ? options.shrink(batch) : batch / 2;
    const std::int64_t next = std::max(shrunk, options.minimum_batch);
    if (next >= batch) {
      throw OutOfMemoryRetryError(
          fmt::format("retry_on_oom: out of memory at every batch size tried ({}; minimum {}): {}",
                      fmt::join(tried, ", "), options.minimum_batch, describe(error)),
          tried);
    }
    logger->warn("retry_on_oom: out of memory at batch {}; retrying at {}", batch, next);
    batch = next;
  }
}

}  // namespace torchguard
