#include "torchguard/scope_stack.hpp"

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "support.hpp"

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
