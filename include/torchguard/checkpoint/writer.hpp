// The background writer: one thread that writes snapshots while training goes on. At most one
// snapshot is pending and one being written; a failed write is kept and rethrown by the next
// wait() (the guard's next save, or close()).
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "torchguard/checkpoint/commit.hpp"

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
  // write.
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    idle_.wait(lock, [&] { return !pending_ && !writing_; });
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

  // Hands a snapshot to the writer thread. Call wait() first: one write in flight at most.
  void submit(std::unique_ptr<Snapshot> snapshot) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      pending_ = std::move(snapshot);
    }
    wake_.notify_one();
  }

  // Writes what is pending, then ends the thread. Idempotent.
  void stop() noexcept {
    if (!thread_.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
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
      lock.unlock();
      std::exception_ptr error;
      try {
        write_(*snapshot);
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

  std::function<void(Snapshot&)> write_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable idle_;
  std::unique_ptr<Snapshot> pending_;
  bool writing_ = false;
  bool stopping_ = false;
  std::exception_ptr error_;
  std::thread thread_;  // last: starts once everything above is built
};

}  // namespace detail
}  // namespace torchguard
