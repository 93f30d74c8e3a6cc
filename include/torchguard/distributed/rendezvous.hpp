// How the ranks of a process group meet: the store (a TCPStore served by rank 0 or by torchrun's
// agent, or a FileStore), then a rendezvous that checks every rank agrees on the world size and
// that no rank is claimed twice. Every wait is bounded by the timeout, including those that
// c10d's own client would not end (join_group).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "torchguard/core/error.hpp"
#include "torchguard/core/logging.hpp"
#include "torchguard/distributed/options.hpp"

namespace torchguard {
namespace detail {

// One rank's place in the group, as the store and the rendezvous see it.
struct RendezvousPlace {
  int rank = 0;
  int world_size = 1;
  std::chrono::milliseconds timeout{0};
  std::string where;          // "host:port" or "FileStore '...'", for messages
  bool serves_store = false;  // this process is the TCPStore's server
  std::chrono::steady_clock::time_point deadline{};  // the store and the rendezvous end by then

  std::chrono::milliseconds remaining() const {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    return std::max(left, std::chrono::milliseconds(1));
  }
};

// What a joining rank is doing now, for the message of a wait that did not end (join_group).
class JoinProgress {
 public:
  void set(std::string step, std::string where = {}) {
    std::lock_guard<std::mutex> lock(mutex_);
    step_ = std::move(step);
    if (!where.empty()) where_ = std::move(where);
  }
  std::string step() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return step_;
  }
  std::string where() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return where_;
  }

 private:
  mutable std::mutex mutex_;
  std::string step_ = "starting";
  std::string where_;
};

// The steps a watchdog's message tells apart: connecting (as c10d's own connection timeout says
// it, whichever ends first), and a first request the store has not answered.
inline constexpr const char* kConnecting = "connecting to it";
inline constexpr const char* kFirstRequest = "claiming its rank (its first request to the store)";

inline std::vector<std::uint8_t> to_bytes(const std::string& text) {
  return std::vector<std::uint8_t>(text.begin(), text.end());
}

inline std::string to_text(const std::vector<std::uint8_t>& bytes) {
  return std::string(bytes.begin(), bytes.end());
}

// Opens the store the options name, prefixed by torchrun's restart count (keys of an earlier
// attempt may still be in torchrun's store after an elastic restart). Fills place.where and
// place.serves_store.
inline c10::intrusive_ptr<c10d::Store> connect_store(const ProcessGroupOptions& options,
                                                     RendezvousPlace& place,
                                                     JoinProgress& progress) {
  c10::intrusive_ptr<c10d::Store> store;
  if (!options.file_store.empty()) {
    try {
      store = c10::make_intrusive<c10d::FileStore>(options.file_store, place.world_size);
    } catch (const std::exception& e) {
      throw DistributedError(fmt::format("ProcessGroupGuard: cannot open the FileStore '{}': {}",
                                         options.file_store, error_message(e)));
    }
    place.where = fmt::format("FileStore '{}'", options.file_store);
  } else {
    std::string host = options.master_addr;
    if (host.empty()) {
      const char* variable = std::getenv("MASTER_ADDR");
      if (variable && *variable) {
        host = variable;
      } else if (place.world_size == 1) {
        host = "127.0.0.1";
      } else {
        throw DistributedError(
            "ProcessGroupGuard: MASTER_ADDR is not set (the address of rank 0's machine; "
            "torchrun and scripts/launch.sh set it)");
      }
    }
    const int port = int_setting(options.master_port, "MASTER_PORT", 29500);
    if (port < 1 || port > 65535) {
      throw DistributedError(
          fmt::format("ProcessGroupGuard: MASTER_PORT {} is not a TCP port (1 to 65535)", port));
    }
    place.where = fmt::format("{}:{}", host, port);
    progress.set(kConnecting, place.where);
    c10d::TCPStoreOptions store_options;
    store_options.port = static_cast<std::uint16_t>(port);
    // Under torchrun, its agent may serve the store already (as Python's env:// knows).
    const char* agent_store = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
    place.serves_store = place.rank == 0 && !(agent_store && std::string(agent_store) == "True");
    store_options.isServer = place.serves_store;
    store_options.numWorkers = static_cast<std::size_t>(place.world_size);
    store_options.waitWorkers = false;  // the rendezvous waits, and says who is missing
    store_options.timeout = place.remaining();
    try {
      store = c10::make_intrusive<c10d::TCPStore>(host, store_options);
    } catch (const std::exception& e) {
      throw DistributedError(
          fmt::format("ProcessGroupGuard: rank {} could not {} at {} within {}: {}", place.rank,
                      place.serves_store ? "serve the store" : "reach the master", place.where,
                      format_duration(place.timeout), error_message(e)));
    }
  }
  store->setTimeout(place.timeout);  // for what Gloo and the collectives ask of it later
  const char* restart = std::getenv("TORCHELASTIC_RESTART_COUNT");
  return c10::make_intrusive<c10d::PrefixStore>(
      fmt::format("torchguard/{}", restart && *restart ? restart : "0"), store);
}

// Every rank announces its rank and world size; each checks the others against its own.
// A rank that serves the store keeps it up, on a mismatch, until every rank that joined has
// read what it needs: otherwise the other ranks would see a closed connection, not the cause.
inline void rendezvous(c10d::Store& store, const RendezvousPlace& place, JoinProgress& progress) {
  const std::string mine = std::to_string(place.world_size);
  const auto lost = [&](const std::exception& e) {
    return DistributedError(
        fmt::format("ProcessGroupGuard: rank {} lost the store at {} during the rendezvous: {}",
                    place.rank, place.where, error_message(e)));
  };
  try {
    progress.set(kFirstRequest);
    if (store.add(fmt::format("rank/{}", place.rank), 1) > 1) {
      throw DistributedError(fmt::format("ProcessGroupGuard: two processes claim RANK {} (at {})",
                                         place.rank, place.where));
    }
    // Counted before the key is visible, so a rank that sees the key also sees the count.
    store.add("joined", 1);
    store.set(fmt::format("world_size/{}", place.rank), to_bytes(mine));
  } catch (const DistributedError&) {
    throw;
  } catch (const std::exception& e) {
    throw lost(e);
  }
  std::optional<DistributedError> mismatch;
  for (int other = 0; other < place.world_size && !mismatch; ++other) {
    const std::string key = fmt::format("world_size/{}", other);
    progress.set(fmt::format("waiting for rank {} to join", other));
    try {
      store.wait({key}, place.remaining());
    } catch (const std::exception& e) {
      // c10d's clock may end the wait a little before ours.
      if (std::chrono::steady_clock::now() + std::chrono::milliseconds(100) < place.deadline) {
        throw lost(e);
      }
      throw DistributedError(fmt::format(
          "ProcessGroupGuard: rank {} did not join at {} within {} (WORLD_SIZE is {} here: is it "
          "the same on every rank, and did every rank start?)",
          other, place.where, format_duration(place.timeout), mine));
    }
    std::string theirs;
    try {
      theirs = to_text(store.get(key));
    } catch (const std::exception& e) {
      throw lost(e);
    }
    if (theirs != mine) {
      mismatch.emplace(fmt::format(
          "ProcessGroupGuard: WORLD_SIZE differs between ranks: rank {} has {}, rank {} has {}",
          other, theirs, place.rank, mine));
    }
  }
  if (!mismatch) return;
  try {
    progress.set("letting the other ranks read that WORLD_SIZE differs");
    const auto checked = store.add("checked", 1);
    if (place.serves_store) {
      // Bounded: a rank that joined but hangs must not hold this one past the deadline.
      auto done = checked;
      while (done < store.add("joined", 0) && std::chrono::steady_clock::now() < place.deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        done = store.add("checked", 0);
      }
    }
  } catch (const std::exception&) {
    // The mismatch is the error to report; a store gone by now changes nothing.
  }
  throw *mismatch;
}

// Why a rank's first request to the store may go unanswered, and what to do: LibTorch before 2.1
// under the agent's store of a torchrun from torch 2.1 or later. Empty for any other case.
inline std::string unanswered_store_cause(const std::string& step) {
#if TORCH_VERSION_MAJOR < 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 1)
  const char* agent_store = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
  if (step == kFirstRequest && agent_store && std::string(agent_store) == "True") {
    return fmt::format(
        ". The store is torchrun's agent's (TORCHELASTIC_USE_AGENT_STORE=True) and this program "
        "is built on LibTorch {}: a torchrun from torch 2.1 or later speaks a newer store "
        "protocol, which LibTorch before 2.1 does not, and ignores its requests. Remedies: start "
        "this build with scripts/launch.sh; or give the ranks a store of their own with "
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and torchrun's c10d rendezvous "
        "(`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone ...`, or on several machines "
        "--rdzv-backend=c10d --rdzv-endpoint=HOST:PORT); or build the program with LibTorch 2.1 "
        "or later (the torch that torchrun comes from)",
        TORCH_VERSION);
  }
#else
  (void)step;
#endif
  return {};
}

// Connects to the store and meets the other ranks (connect_store, then rendezvous) on a thread of
// its own, waiting for it until the timeout (and a grace, for c10d's own error to come first).
// The TCPStore client of LibTorch before 2.1 waits for an answer without a timeout, so a server
// that never answers would hold the rank forever. When the deadline passes, the thread is left
// behind (it owns copies of all it uses, and ends with the connection) and the error says what
// the rank was waiting for. The process should not go on long after that error: when the server
// later closes the connection, LibTorch 1.13's store client ends the process (std::terminate
// in its own thread).
inline c10::intrusive_ptr<c10d::Store> join_group(const ProcessGroupOptions& options,
                                                  RendezvousPlace& place) {
  // A timeout of years (milliseconds::max() meaning "never") must not overflow the clock.
  place.deadline = std::chrono::steady_clock::now() +
                   std::min<std::chrono::milliseconds>(place.timeout, std::chrono::hours(24 * 365));
  // c10d's connection retries may end a little after their timeout.
  const auto grace = std::min<std::chrono::milliseconds>(place.timeout, std::chrono::seconds(5));
  using Joined = std::pair<c10::intrusive_ptr<c10d::Store>, RendezvousPlace>;
  auto progress = std::make_shared<JoinProgress>();
  std::promise<Joined> promise;
  auto joined = promise.get_future();
  std::thread worker([options, place, progress, promise = std::move(promise)]() mutable {
    try {
      auto store = connect_store(options, place, *progress);
      rendezvous(*store, place, *progress);
      promise.set_value({std::move(store), place});
    } catch (...) {
      promise.set_exception(std::current_exception());
    }
  });
  if (joined.wait_until(place.deadline + grace) != std::future_status::ready) {
    worker.detach();
    const auto step = progress->step();
    const auto where = progress->where();
    if (step == kConnecting) {  // a server binds at once or fails: this is a client
      throw DistributedError(
          fmt::format("ProcessGroupGuard: rank {} could not reach the master at "
                      "{} within {} (no answer)",
                      place.rank, where, format_duration(place.timeout)));
    }
    throw DistributedError(fmt::format(
        "ProcessGroupGuard: rank {} had no answer from the store{} within {} while {}{}",
        place.rank, where.empty() ? "" : " at " + where, format_duration(place.timeout), step,
        unanswered_store_cause(step)));
  }
  worker.join();
  auto [store, settled] = joined.get();
  place = settled;
  return store;
}

}  // namespace detail
}  // namespace torchguard
