// The background writer: one thread that writes snapshots while training goes on. At most one
// snapshot is pending and one being written; a failed write is kept and rethrown by the next
// wait() (the guard's next save, or close()). A snapshot with deferred copies (staging.hpp) is
// copied here first, then held until the training thread decides, through settle(), whether
// the copy is the captured state (written) or may be torn (dropped).
#pragma once

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "torchguard/checkpoint/commit.hpp"
#include "torchguard/checkpoint/staging.hpp"

namespace torchguard {
namespace detail {

class BackgroundWriter {
 public:
  // `write` runs on the writer thread, once per submitted snapshot; what it throws is kept.
  explicit BackgroundWriter(std::function<void(Snapshot&)> write)
      : write_(std::move(write)), thread_([this] { loop(); }) {}
  ~BackgroundWriter() { stop(); }
  BackgroundWriter(const BackgroundWriter&) = delete;
  BackgroundWriter& operator=(const BackgroundWriter&) = delete;

  // Waits until nothing is pending or being written; rethrows (once) the error of a failed
  // write. A snapshot with deferred copies must be settled first.
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    idle_.wait(lock, [&] { return !pending_ && !writing_; });
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

  // Hands a snapshot to the writer thread, with the copies its staging deferred. Call wait()
  // first: one write in flight at most.
  void submit(std::unique_ptr<Snapshot> snapshot, DeferredCopies deferred = {}) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      pending_ = std::move(snapshot);
      deferred_ = std::move(deferred);
      unsettled_ = !deferred_.empty();
      keep_ = false;
    }
    wake_.notify_one();
  }

  // For a snapshot with deferred copies: waits until they are done, then writes the snapshot if
  // `keep(copies)` says so, or drops it. Returns what `keep` said; true when nothing was
  // waiting to be settled.
  bool settle(const std::function<bool(const DeferredCopies&)>& keep) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!unsettled_) return true;
    idle_.wait(lock, [&] { return copied_; });
    keep_ = keep(deferred_);
    unsettled_ = false;
    wake_.notify_all();
    return keep_;
  }

  // Writes what is pending, then ends the thread. Idempotent.
  // A snapshot never settled is dropped: it may be torn.
  void stop() noexcept {
    if (!thread_.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      unsettled_ = false;
    }
    wake_.notify_all();
    thread_.join();
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return pending_ || stopping_; });
      if (!pending_) return;  // stopping, nothing left
      std::unique_ptr<Snapshot> snapshot = std::move(pending_);
      writing_ = true;
      set_nice(write_tuning().writer_nice);
      std::exception_ptr error;
      if (!deferred_.empty()) {
        lock.unlock();
        try {
          deferred_.run();
        } catch (...) {
          error = std::current_exception();
        }
        lock.lock();
        copied_ = true;
        idle_.notify_all();
        wake_.wait(lock, [&] { return !unsettled_; });
        copied_ = false;
        if (!keep_) snapshot.reset();  // dropped, or stopping before it was settled
      }
      deferred_ = DeferredCopies();
      lock.unlock();
      try {
        if (snapshot && !error) write_(*snapshot);
      } catch (...) {
        error = std::current_exception();
      }
      snapshot.reset();
      lock.lock();
      writing_ = false;
      if (error && !error_) error_ = error;
      idle_.notify_all();
    }
  }

  // This thread's nice value (Linux: per thread). Failing to lower it (no CAP_SYS_NICE) is fine.
  void set_nice(int nice) noexcept {
    if (nice == nice_) return;
    ::setpriority(PRIO_PROCESS, static_cast<id_t>(::syscall(SYS_gettid)), nice);
    nice_ = nice;
  }

  std::function<void(Snapshot&)> write_;
  int nice_ = 0;  // the writer thread's own
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable idle_;
  std::unique_ptr<Snapshot> pending_;
  DeferredCopies deferred_;  // the pending or current snapshot's
  bool unsettled_ = false;   // its copies wait for settle()
  bool copied_ = false;      // ... and are done
  bool keep_ = false;        // settle()'s verdict
  bool writing_ = false;
  bool stopping_ = false;
  std::exception_ptr error_;
  std::thread thread_;  // last: starts once everything above is built
};

}  // namespace detail
}  // namespace torchguard
