// session/stop_signals.hpp: SIGINT and SIGTERM request a TrainingSession's stop, and the
// handlers come back at its end.
#include "torchguard/session.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

#include "support.hpp"

using torchguard::TrainingSession;
using torchguard::TrainingSessionOptions;
using torchguard::testing::CapturedLogger;

namespace {

// Waits (bounded) for a signal sent to this process to be handled.
bool wait_for_stop(const TrainingSession& session) {
  for (int i = 0; i < 1000 && !session.stop_requested(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return session.stop_requested();
}

std::atomic<int> custom_handler_calls{0};
extern "C" void custom_handler(int) { custom_handler_calls.fetch_add(1); }

}  // namespace

TEST_CASE("SIGTERM sent to the process requests a stop and handlers come back at exit",
          "[session][signal]") {
  CapturedLogger captured;
  struct sigaction custom {};
  custom.sa_handler = custom_handler;
  sigemptyset(&custom.sa_mask);
  struct sigaction saved_term {
  }, saved_int{};
  REQUIRE(::sigaction(SIGTERM, &custom, &saved_term) == 0);
  REQUIRE(::sigaction(SIGINT, &custom, &saved_int) == 0);
  custom_handler_calls = 0;
  {
    TrainingSessionOptions options;
    options.logger = captured.logger;
    options.handle_signals = true;
    TrainingSession session("signalled", options);
    CHECK_FALSE(session.stop_requested());
    REQUIRE(::kill(::getpid(), SIGTERM) == 0);
    CHECK(wait_for_stop(session));
    CHECK(session.stop_token().cancelled());  // the one stop signal the other guards take
    CHECK(custom_handler_calls == 0);         // the session's handler took it, the process lives
    CHECK(captured.sink->contains(spdlog::level::warn, "SIGTERM received, stopping"));
  }
  CHECK(captured.sink->contains(spdlog::level::warn, "stopped by SIGTERM"));
  CHECK_FALSE(captured.sink->contains(spdlog::level::info, "completed successfully"));
  // The previous handlers are back.
  struct sigaction now {};
  REQUIRE(::sigaction(SIGTERM, nullptr, &now) == 0);
  CHECK(now.sa_handler == custom_handler);
  REQUIRE(::kill(::getpid(), SIGINT) == 0);
  for (int i = 0; i < 1000 && custom_handler_calls == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  CHECK(custom_handler_calls == 1);
  ::sigaction(SIGTERM, &saved_term, nullptr);
  ::sigaction(SIGINT, &saved_int, nullptr);
}

TEST_CASE("a signal inherited as ignored stays ignored, and the log says so once",
          "[session][signal]") {
  CapturedLogger captured;
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  struct sigaction saved_int {};
  REQUIRE(::sigaction(SIGINT, &ignore, &saved_int) == 0);
  {
    TrainingSessionOptions options;
    options.logger = captured.logger;
    options.handle_signals = true;
    TrainingSession session("nohup", options);
    struct sigaction now {};
    REQUIRE(::sigaction(SIGINT, nullptr, &now) == 0);
    CHECK(now.sa_handler == SIG_IGN);
    REQUIRE(::sigaction(SIGTERM, nullptr, &now) == 0);
    CHECK(now.sa_handler != SIG_IGN);  // SIGTERM was not ignored: the session takes it
    REQUIRE(::kill(::getpid(), SIGINT) == 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK_FALSE(session.stop_requested());
    CHECK(captured.sink->count(spdlog::level::info, "SIGINT ignored by this process") == 1);
  }
  struct sigaction after {};
  REQUIRE(::sigaction(SIGINT, nullptr, &after) == 0);
  CHECK(after.sa_handler == SIG_IGN);
  ::sigaction(SIGINT, &saved_int, nullptr);
}

TEST_CASE("without handle_signals a session leaves the handlers alone", "[session][signal]") {
  struct sigaction before {};
  REQUIRE(::sigaction(SIGINT, nullptr, &before) == 0);
  {
    CapturedLogger captured;
    TrainingSession session("plain", captured.logger);
    struct sigaction during {};
    REQUIRE(::sigaction(SIGINT, nullptr, &during) == 0);
    CHECK(during.sa_handler == before.sa_handler);
  }
}

TEST_CASE("nested sessions restore handlers in order", "[session][signal]") {
  CapturedLogger captured;
  TrainingSessionOptions options;
  options.logger = captured.logger;
  options.handle_signals = true;
  struct sigaction before {};
  REQUIRE(::sigaction(SIGINT, nullptr, &before) == 0);
  {
    TrainingSession outer("outer", options);
    struct sigaction outer_handler {};
    REQUIRE(::sigaction(SIGINT, nullptr, &outer_handler) == 0);
    {
      TrainingSession inner("inner", options);
      REQUIRE(::kill(::getpid(), SIGINT) == 0);
      CHECK(wait_for_stop(inner));
      CHECK(outer.stop_requested());  // a signal is for the whole process
    }
    struct sigaction after_inner {};
    REQUIRE(::sigaction(SIGINT, nullptr, &after_inner) == 0);
    CHECK(after_inner.sa_handler == outer_handler.sa_handler);
  }
  struct sigaction after {};
  REQUIRE(::sigaction(SIGINT, nullptr, &after) == 0);
  CHECK(after.sa_handler == before.sa_handler);
}

namespace {

// Runs `child` in a forked process and returns its wait status. The child never returns into
// Catch2: it _exit()s with the code `child` returns.
template <class F>
int run_in_child(F child, int parent_signals_after_ready) {
  int ready[2];
  REQUIRE(::pipe(ready) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(ready[0]);
    ::_exit(child(ready[1]));
  }
  ::close(ready[1]);
  char byte = 0;
  REQUIRE(::read(ready[0], &byte, 1) == 1);  // the child's session is up
  for (int i = 0; i < parent_signals_after_ready; ++i) {
    ::kill(pid, SIGTERM);
    if (i == 0) REQUIRE(::read(ready[0], &byte, 1) == 1);  // the child saw the first one
  }
  ::close(ready[0]);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  return status;
}

// A child with a signal-handling session: reports when it is up and when it saw a stop, then
// lingers `linger_ms` (a second signal, if sent, ends it there).
int child_session(int ready_fd, int linger_ms) {
  TrainingSessionOptions options;
  options.logger = std::make_shared<spdlog::logger>("child");  // no sinks: quiet
  options.handle_signals = true;
  TrainingSession session("child", options);
  const char byte = 'r';
  if (::write(ready_fd, &byte, 1) != 1) return 10;
  for (int i = 0; i < 5000 && !session.stop_requested(); ++i) ::usleep(1000);
  if (!session.stop_requested()) return 11;
  if (::write(ready_fd, &byte, 1) != 1) return 12;
  for (int i = 0; i < linger_ms; ++i) ::usleep(1000);
  return 0;
}

}  // namespace

TEST_CASE("a real SIGTERM from another process stops the loop and the process exits normally",
          "[session][signal]") {
  const int status = run_in_child([](int fd) { return child_session(fd, 0); }, 1);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("a second SIGTERM takes the default action", "[session][signal]") {
  const int status = run_in_child([](int fd) { return child_session(fd, 10000); }, 2);
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGTERM);
}
