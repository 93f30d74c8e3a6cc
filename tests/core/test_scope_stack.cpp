// core/scope_stack.hpp: ScopeStack, Python's contextlib.ExitStack for guards and callbacks.
#include "torchguard/core.hpp"

#include <array>
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "support.hpp"
#include "torchguard/core/guard.hpp"

using torchguard::Outcome;
using torchguard::ScopeStack;
using torchguard::testing::CapturedLogger;

static_assert(torchguard::is_guard_v<ScopeStack>);
static_assert(!torchguard::is_guard_v<std::vector<int>>);

namespace {

struct Event {
  std::string what;
  Outcome outcome;
};

// A guard that records its close(Outcome) and its destruction.
class RecordingGuard {
 public:
  RecordingGuard(std::vector<std::string>& log, std::string name)
      : log_(&log), name_(std::move(name)) {
    log_->push_back("enter " + name_);
  }
  RecordingGuard(RecordingGuard&& other) noexcept
      : log_(other.log_), name_(std::move(other.name_)) {
    other.log_ = nullptr;
  }
  ~RecordingGuard() {
    if (log_) log_->push_back("destroy " + name_);
  }
  void close(Outcome outcome) { log_->push_back("close " + name_ + " " + to_string(outcome)); }

 private:
  std::vector<std::string>* log_;
  std::string name_;
};

// A guard like fmt::buffered_file: close() reports errors, the destructor does not.
class FileLikeGuard {
 public:
  FileLikeGuard(int& closes, bool fail) : closes_(&closes), fail_(fail) {}
  void close() {
    ++*closes_;
    if (fail_) throw std::runtime_error("flush failed");
  }

 private:
  int* closes_;
  bool fail_;
};

struct ThrowingDestructor {
  explicit ThrowingDestructor(bool* d) : destroyed(d) {}
  bool* destroyed;
  ~ThrowingDestructor() noexcept(false) {
    *destroyed = true;
    throw std::logic_error("destructor failed");
  }
};

struct NotConstructible {
  NotConstructible() { throw std::runtime_error("cannot acquire"); }
};

// A callable whose move fails: storing it in the stack fails after the caller gave it away.
struct ThrowingMove {
  int* runs;
  explicit ThrowingMove(int* r) : runs(r) {}
  ThrowingMove(const ThrowingMove&) { throw std::bad_alloc(); }
  ThrowingMove(ThrowingMove&&) { throw std::bad_alloc(); }
  void operator()() const { ++*runs; }
};

}  // namespace

TEST_CASE("entries run in reverse order of registration", "[scope_stack]") {
  std::vector<std::string> log;
  {
    ScopeStack stack;
    stack.emplace<RecordingGuard>(log, "a");
    stack.callback([&] { log.push_back("callback b"); });
    stack.enter(RecordingGuard(log, "c"));
    CHECK(stack.size() == 3);
    CHECK_FALSE(stack.empty());
  }
  const std::vector<std::string> expected = {"enter a",   "enter c",    "close c success",
                                             "destroy c", "callback b", "close a success",
                                             "destroy a"};
  CHECK(log == expected);
}

TEST_CASE("emplace returns the owned guard, valid until close", "[scope_stack]") {
  std::vector<std::string> log;
  ScopeStack stack;
  auto& guard = stack.emplace<RecordingGuard>(log, "owned");
  guard.close(Outcome::success);  // usable through the reference
  CHECK(log.back() == "close owned success");
  stack.close();
  CHECK(log.back() == "destroy owned");
  CHECK(stack.empty());
}

TEST_CASE("on_success and on_failure follow an explicit outcome", "[scope_stack]") {
  std::vector<std::string> log;
  for (Outcome outcome : {Outcome::success, Outcome::failure}) {
    log.clear();
    ScopeStack stack;
    stack.on_success([&] { log.push_back("success"); });
    stack.on_failure([&] { log.push_back("failure"); });
    stack.callback([&](Outcome seen) { log.push_back(std::string("always ") + to_string(seen)); });
    stack.close(outcome);
    if (outcome == Outcome::success) {
      CHECK(log == std::vector<std::string>{"always success", "success"});
    } else {
      CHECK(log == std::vector<std::string>{"always failure", "failure"});
    }
  }
}

TEST_CASE("a scope left by an exception closes with failure", "[scope_stack]") {
  std::vector<std::string> log;
  try {
    ScopeStack stack;
    stack.emplace<RecordingGuard>(log, "g");
    stack.on_success([&] { log.push_back("success"); });
    stack.on_failure([&] { log.push_back("failure"); });
    throw std::runtime_error("training diverged");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()) == "training diverged");
  }
  CHECK(log == std::vector<std::string>{"enter g", "failure", "close g failure", "destroy g"});
}

TEST_CASE("a stack built during unwinding still tells success from failure", "[scope_stack]") {
  // A stack created inside a destructor that runs during unwinding: its own scope succeeds.
  std::vector<std::string> log;
  struct Unwinder {
    std::vector<std::string>* log;
    ~Unwinder() {
      ScopeStack inner;
      inner.on_success([this] { log->push_back("inner success"); });
      inner.on_failure([this] { log->push_back("inner failure"); });
    }
  };
  try {
    Unwinder unwinder{&log};
    throw std::runtime_error("outer");
  } catch (const std::runtime_error&) {
  }
  CHECK(log == std::vector<std::string>{"inner success"});
}

TEST_CASE("every entry runs when some throw and close rethrows the first error", "[scope_stack]") {
  CapturedLogger captured;
  std::vector<std::string> log;
  ScopeStack stack(captured.logger);
  stack.callback([&](Outcome o) { log.push_back(std::string("first ") + to_string(o)); });
  stack.callback([] { throw std::logic_error("second cleanup failed"); });
  stack.callback([&](Outcome o) { log.push_back(std::string("third ") + to_string(o)); });
  stack.callback([] { throw std::invalid_argument("fourth cleanup failed"); });
  stack.callback([&](Outcome o) { log.push_back(std::string("fifth ") + to_string(o)); });

  CHECK_THROWS_AS(stack.close(), std::invalid_argument);  // the original type, not a wrapper
  // Once a cleanup failed, the rest are told the scope failed.
  CHECK(log == std::vector<std::string>{"fifth success", "third failure", "first failure"});
  REQUIRE(stack.suppressed_errors().size() == 1);
  CHECK_THROWS_AS(std::rethrow_exception(stack.suppressed_errors().front()), std::logic_error);
  CHECK(captured.sink->contains(spdlog::level::err, "std::logic_error: second cleanup failed"));
  CHECK(stack.empty());
}

TEST_CASE("the destructor never throws when a cleanup throws", "[scope_stack]") {
  CapturedLogger captured;
  bool later_ran = false;
  {
    ScopeStack stack(captured.logger);
    stack.callback([&] { later_ran = true; });
    stack.callback([] { throw std::runtime_error("cleanup exploded"); });
  }
  CHECK(later_ran);
  CHECK(captured.sink->contains(spdlog::level::err, "std::runtime_error: cleanup exploded"));
}

TEST_CASE("a cleanup that throws while another exception unwinds the scope", "[scope_stack]") {
  CapturedLogger captured;
  std::vector<std::string> log;
  try {
    ScopeStack stack(captured.logger);
    stack.on_failure([&] { log.push_back("rollback"); });
    stack.callback([] { throw std::logic_error("cleanup failed during unwinding"); });
    throw std::runtime_error("the original error");
  } catch (const std::runtime_error& e) {
    // The original exception reaches the caller; the cleanup's is logged, not terminate().
    CHECK(std::string(e.what()) == "the original error");
  }
  CHECK(log == std::vector<std::string>{"rollback"});
  CHECK(captured.sink->contains(spdlog::level::err, "cleanup failed during unwinding"));
}

TEST_CASE("a guard with close() has its errors propagate on success only", "[scope_stack]") {
  int closes = 0;
  {
    ScopeStack stack;
    stack.emplace<FileLikeGuard>(closes, true);
    CHECK_THROWS_WITH(stack.close(), "flush failed");
  }
  CHECK(closes == 1);
  {
    ScopeStack stack;
    stack.emplace<FileLikeGuard>(closes, true);
    CHECK_NOTHROW(stack.close(Outcome::failure));  // failure path: only destroyed
  }
  CHECK(closes == 1);
}

TEST_CASE("a guard whose destructor throws is reported, not fatal", "[scope_stack]") {
  bool destroyed = false;
  bool earlier_ran = false;
  ScopeStack stack;
  stack.callback([&] { earlier_ran = true; });
  stack.emplace<ThrowingDestructor>(&destroyed);
  CHECK_THROWS_AS(stack.close(), std::logic_error);
  CHECK(destroyed);
  CHECK(earlier_ran);
}

TEST_CASE("a guard that fails to construct leaves the stack as it was", "[scope_stack]") {
  int runs = 0;
  ScopeStack stack;
  stack.callback([&] { ++runs; });
  CHECK_THROWS_WITH(stack.emplace<NotConstructible>(), "cannot acquire");
  CHECK(stack.size() == 1);
  stack.close();
  CHECK(runs == 1);
}

TEST_CASE("pushing is strongly exception-safe: an unstored cleanup runs at once", "[scope_stack]") {
  int runs = 0;
  int failure_runs = 0;
  int success_runs = 0;
  ScopeStack stack;
  ThrowingMove fn(&runs);
  CHECK_THROWS_AS(stack.callback(std::move(fn)), std::bad_alloc);
  CHECK(runs == 1);
  CHECK(stack.empty());

  struct OnFailure {
    int* runs;
    OnFailure(int* r) : runs(r) {}
    OnFailure(OnFailure&&) { throw std::bad_alloc(); }
    void operator()() const { ++*runs; }
  };
  CHECK_THROWS_AS(stack.on_failure(OnFailure(&failure_runs)), std::bad_alloc);
  CHECK(failure_runs == 1);
  CHECK_THROWS_AS(stack.on_success(OnFailure(&success_runs)), std::bad_alloc);
  CHECK(success_runs == 0);  // the scope did not succeed: a success-only cleanup does not run
}

TEST_CASE("move-only callables are accepted", "[scope_stack]") {
  auto resource = std::make_unique<int>(42);
  int seen = 0;
  {
    ScopeStack stack;
    stack.callback([r = std::move(resource), &seen] { seen = *r; });
  }
  CHECK(seen == 42);
}

TEST_CASE("10,000 entries all run, newest first", "[scope_stack]") {
  constexpr int count = 10000;
  std::vector<int> order;
  order.reserve(count);
  {
    ScopeStack stack;
    for (int i = 0; i < count; ++i) stack.callback([&order, i] { order.push_back(i); });
    CHECK(stack.size() == count);
  }
  REQUIRE(order.size() == count);
  for (int i = 0; i < count; ++i) REQUIRE(order[i] == count - 1 - i);
}

TEST_CASE("nested stacks close inner first, and a stack can be an entry", "[scope_stack]") {
  std::vector<std::string> log;
  {
    ScopeStack outer;
    outer.callback([&] { log.push_back("outer"); });
    {
      ScopeStack inner;
      inner.callback([&] { log.push_back("inner"); });
    }
    ScopeStack adopted;
    adopted.on_failure([&] { log.push_back("adopted failure"); });
    adopted.callback([&] { log.push_back("adopted"); });
    outer.enter(std::move(adopted));
    outer.close(Outcome::failure);  // the adopted stack is told the outcome
  }
  CHECK(log == std::vector<std::string>{"inner", "adopted", "adopted failure", "outer"});
}

TEST_CASE("pop_all transfers every entry to a new stack", "[scope_stack]") {
  std::vector<std::string> log;
  ScopeStack kept;
  {
    ScopeStack acquiring;
    acquiring.emplace<RecordingGuard>(log, "file");
    acquiring.callback([&] { log.push_back("release lock"); });
    // All acquisitions succeeded: keep them past this scope.
    kept = acquiring.pop_all();
    CHECK(acquiring.empty());
  }
  CHECK(log == std::vector<std::string>{"enter file"});  // nothing ran when `acquiring` died
  CHECK(kept.size() == 2);
  kept.close();
  CHECK(log == std::vector<std::string>{"enter file", "release lock", "close file success",
                                        "destroy file"});
}

TEST_CASE("move assignment closes the target's own entries first", "[scope_stack]") {
  std::vector<std::string> log;
  ScopeStack target;
  target.callback([&] { log.push_back("old"); });
  ScopeStack source;
  source.callback([&] { log.push_back("new"); });
  target = std::move(source);
  CHECK(log == std::vector<std::string>{"old"});
  target.close();
  CHECK(log == std::vector<std::string>{"old", "new"});
}

TEST_CASE("entries pushed while closing run too", "[scope_stack]") {
  std::vector<std::string> log;
  ScopeStack stack;
  stack.callback([&] {
    log.push_back("first");
    stack.callback([&] { log.push_back("pushed during close"); });
  });
  stack.close();
  CHECK(log == std::vector<std::string>{"first", "pushed during close"});
}

// Entry storage: small callables live in place, the others on the heap; the tests below check
// behaviour on each path (in place, heap, growth, moves), never timing.
namespace {

// Counts live instances, so that every stored copy is seen destroyed exactly once.
struct Tracked {
  int* live;
  int* runs;
  Tracked(int* l, int* r) : live(l), runs(r) { ++*live; }
  Tracked(const Tracked& other) noexcept : live(other.live), runs(other.runs) { ++*live; }
  Tracked(Tracked&& other) noexcept : live(other.live), runs(other.runs) { ++*live; }
  ~Tracked() { --*live; }
  void operator()() const { ++*runs; }
};

// Stored in place (its move cannot throw) but copying it fails.
struct ThrowingCopy {
  int* runs;
  explicit ThrowingCopy(int* r) : runs(r) {}
  ThrowingCopy(const ThrowingCopy&) { throw std::runtime_error("copy failed"); }
  ThrowingCopy(ThrowingCopy&&) noexcept = default;
  void operator()() const { ++*runs; }
};

// Its move may throw, so the stack keeps it on the heap; it never actually throws.
struct MayThrowMove {
  std::vector<int>* order;
  int id;
  MayThrowMove(std::vector<int>* o, int i) : order(o), id(i) {}
  MayThrowMove(MayThrowMove&& other) noexcept(false) : order(other.order), id(other.id) {}
  void operator()() const { order->push_back(id); }
};

struct alignas(64) OverAligned {
  bool* aligned;
  void operator()() const { *aligned = reinterpret_cast<std::uintptr_t>(this) % 64 == 0; }
};

// Only the stored copy throws when destroyed: a moved-from one does not.
struct ThrowingCallbackDestructor {
  int* runs;
  bool armed = true;
  explicit ThrowingCallbackDestructor(int* r) : runs(r) {}
  ThrowingCallbackDestructor(ThrowingCallbackDestructor&& other) noexcept
      : runs(other.runs), armed(std::exchange(other.armed, false)) {}
  ~ThrowingCallbackDestructor() noexcept(false) {
    if (armed) throw std::logic_error("callback destructor");
  }
  void operator()() const { ++*runs; }
};

// A guard that can be neither moved nor copied: only emplace() can own it.
class Pinned {
 public:
  explicit Pinned(std::vector<std::string>& log) : log_(&log) {}
  Pinned(const Pinned&) = delete;
  Pinned& operator=(const Pinned&) = delete;
  void close(Outcome outcome) { log_->push_back(std::string("pinned ") + to_string(outcome)); }

 private:
  std::vector<std::string>* log_;
};

}  // namespace

TEST_CASE("large and over-aligned callables are stored on the heap and run", "[scope_stack]") {
  std::vector<int> order;
  bool aligned = false;
  {
    ScopeStack stack;
    std::array<int, 256> big{};
    big.fill(7);
    stack.callback([&order] { order.push_back(1); });
    stack.callback([&order, big] { order.push_back(big[0] + big[255]); });  // 1 KiB capture
    stack.callback(OverAligned{&aligned});
    stack.callback([&order] { order.push_back(3); });
    CHECK(stack.size() == 4);
  }
  CHECK(order == std::vector<int>{3, 14, 1});
  CHECK(aligned);
}

TEST_CASE("move-only callables run once, in place or on the heap", "[scope_stack]") {
  int live = 0;
  int runs = 0;
  std::vector<int> seen;
  {
    ScopeStack stack;
    auto small = std::make_unique<int>(1);
    auto large = std::make_unique<int>(2);
    std::array<char, 200> padding{};
    stack.callback([p = std::move(small), &seen] { seen.push_back(*p); });
    stack.callback([p = std::move(large), padding, &seen] { seen.push_back(*p + padding[0]); });
    stack.callback(Tracked(&live, &runs));
    CHECK(live == 1);  // the temporary is gone, the stored one lives
  }
  CHECK(seen == std::vector<int>{2, 1});
  CHECK(runs == 1);
  CHECK(live == 0);
}

TEST_CASE("callables whose move may throw are kept on the heap", "[scope_stack]") {
  std::vector<int> order;
  {
    ScopeStack stack;
    for (int i = 0; i < 100; ++i) stack.callback(MayThrowMove(&order, i));  // through growth
  }
  REQUIRE(order.size() == 100);
  for (int i = 0; i < 100; ++i) REQUIRE(order[i] == 99 - i);
}

TEST_CASE("entries survive the stack's growth", "[scope_stack]") {
  constexpr int count = 5000;
  int live = 0;
  int runs = 0;
  std::vector<std::string> seen;
  std::vector<std::string> log;
  {
    ScopeStack stack;
    auto& pinned = stack.emplace<Pinned>(log);
    for (int i = 0; i < count; ++i) {
      stack.callback(Tracked(&live, &runs));  // moved in place as the stack grows
      stack.callback([&seen, text = std::to_string(i) + " a string too long for SSO"] {
        seen.push_back(text);
      });
    }
    CHECK(live == count);
    pinned.close(Outcome::failure);  // the owned guard has not moved
    CHECK(log == std::vector<std::string>{"pinned failure"});
  }
  CHECK(runs == count);
  CHECK(live == 0);
  REQUIRE(seen.size() == count);
  CHECK(seen.front() == std::to_string(count - 1) + " a string too long for SSO");
  CHECK(seen.back() == "0 a string too long for SSO");
  CHECK(log == std::vector<std::string>{"pinned failure", "pinned success"});
}

TEST_CASE("a moved stack keeps its entries and owned guards", "[scope_stack]") {
  std::vector<std::string> log;
  int live = 0;
  int runs = 0;
  ScopeStack source;
  auto& guard = source.emplace<RecordingGuard>(log, "g");
  source.callback(Tracked(&live, &runs));
  // A capture that is not trivially copyable, stored in place (a vector: GCC 12's C++20
  // std::string move draws a false -Warray-bounds when inlined into placement new).
  source.callback(
      [&log, text = std::vector<char>(40, 'x')] { log.emplace_back(text.begin(), text.end()); });
  ScopeStack moved(std::move(source));
  CHECK(source.empty());  // NOLINT(bugprone-use-after-move): a moved-from stack is empty
  source.close();
  CHECK(runs == 0);
  guard.close(Outcome::failure);  // the reference survived the move
  ScopeStack assigned;
  assigned = std::move(moved);
  CHECK(assigned.size() == 3);
  assigned.close();
  CHECK(runs == 1);
  CHECK(live == 0);
  CHECK(log == std::vector<std::string>{"enter g", "close g failure", std::string(40, 'x'),
                                        "close g success", "destroy g"});
}

TEST_CASE("a push that throws leaves every earlier entry in place", "[scope_stack]") {
  // Failing pushes at every size up to well past a few growths, in place and on the heap.
  CapturedLogger captured;
  std::vector<int> order;
  int failed_runs = 0;
  {
    ScopeStack stack(captured.logger);
    for (int i = 0; i < 40; ++i) {
      stack.callback([&order, i] { order.push_back(i); });
      ThrowingCopy in_place(&failed_runs);
      CHECK_THROWS_WITH(stack.callback(in_place), "copy failed");  // a copy: stored in place
      ThrowingMove on_heap(&failed_runs);
      CHECK_THROWS_AS(stack.on_failure(on_heap), std::bad_alloc);
      CHECK_THROWS_AS(stack.emplace<NotConstructible>(), std::runtime_error);
      REQUIRE(stack.size() == static_cast<std::size_t>(i + 1));
    }
  }
  CHECK(failed_runs == 80);  // each unstored cleanup ran once, at its push
  REQUIRE(order.size() == 40);
  for (int i = 0; i < 40; ++i) REQUIRE(order[i] == 39 - i);
}

TEST_CASE("a callback whose destructor throws is reported like a failed cleanup", "[scope_stack]") {
  int runs = 0;
  bool earlier_ran = false;
  ScopeStack stack;
  stack.callback([&] { earlier_ran = true; });
  stack.callback(ThrowingCallbackDestructor(&runs));
  CHECK_THROWS_WITH(stack.close(), "callback destructor");
  CHECK(runs == 1);
  CHECK(earlier_ran);
}

TEST_CASE("a guard's constructor may push onto the stack that owns it", "[scope_stack]") {
  struct Registering {
    Registering(ScopeStack& stack, std::vector<int>& order) {
      for (int i = 0; i < 100; ++i) stack.callback([&order, i] { order.push_back(i); });
    }
    void close(Outcome) {}
  };
  std::vector<int> order;
  {
    ScopeStack stack;
    stack.callback([&order] { order.push_back(-1); });
    stack.emplace<Registering>(stack, order);  // its pushes make the stack grow meanwhile
    CHECK(stack.size() == 102);
  }
  REQUIRE(order.size() == 101);
  CHECK(order.front() == 99);
  CHECK(order.back() == -1);
}
