// What a ScopeStack costs per entry (push + LIFO close), against the hand-written peer: a
// std::vector<std::function<void()>> run backwards, which has none of ScopeStack's guarantees
// (every entry runs when some throw, outcome-aware entries, owned guards, strong push).
// Prints the median over repeated rounds and the ratio measured in this run.
#include <torchguard/core.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <vector>

namespace {

constexpr int entries_per_round = 1000;
constexpr int rounds = 201;

template <class F>
double median_ns_per_entry(F&& round) {
  std::vector<double> samples;
  samples.reserve(rounds);
  for (int i = 0; i < rounds; ++i) {
    const auto start = std::chrono::steady_clock::now();
    round();
    const std::chrono::duration<double, std::nano> elapsed =
        std::chrono::steady_clock::now() - start;
    samples.push_back(elapsed.count() / entries_per_round);
  }
  std::nth_element(samples.begin(), samples.begin() + rounds / 2, samples.end());
  return samples[rounds / 2];
}

volatile long sink = 0;

}  // namespace

int main() {
  const double scope_stack = median_ns_per_entry([] {
    torchguard::ScopeStack stack;
    for (int i = 0; i < entries_per_round; ++i) stack.callback([i] { sink = sink + i; });
    stack.close();
  });
  const double function_vector = median_ns_per_entry([] {
    std::vector<std::function<void()>> cleanups;
    for (int i = 0; i < entries_per_round; ++i) cleanups.emplace_back([i] { sink = sink + i; });
    for (auto it = cleanups.rbegin(); it != cleanups.rend(); ++it) (*it)();
  });
  std::printf("ScopeStack push+close: %.1f ns/entry (median of %d rounds of %d entries)\n",
              scope_stack, rounds, entries_per_round);
  std::printf("vector<function> push+run: %.1f ns/entry\n", function_vector);
  std::printf("ratio ScopeStack / vector<function>: %.2fx\n", scope_stack / function_vector);
  return 0;
}
