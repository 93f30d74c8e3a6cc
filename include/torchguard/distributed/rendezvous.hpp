// How the ranks of a process group meet: the store (a TCPStore served by rank 0 or by torchrun's
// agent, or a FileStore), then a rendezvous that checks every rank agrees on the world size and
// that no rank is claimed twice. Every wait is bounded by the timeout.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <torch/torch.h>

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
};

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
                                                     RendezvousPlace& place) {
  c10::intrusive_ptr<c10d::Store> store;
  if (!options.file_store.empty()) {
    try {
      store = c10::make_intrusive<c10d::FileStore>(options.file_store, place.world_size);
    } catch (const std::exception& e) {
      throw DistributedError(fmt::format("ProcessGroupGuard: cannot open the FileStore '{}': {}",
                                         options.file_store, error_message(e)));
    }
    store->setTimeout(place.timeout);
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
    c10d::TCPStoreOptions store_options;
    store_options.port = static_cast<std::uint16_t>(port);
    // Under torchrun, its agent may serve the store already (as Python's env:// knows).
    const char* agent_store = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
    place.serves_store = place.rank == 0 && !(agent_store && std::string(agent_store) == "True");
    store_options.isServer = place.serves_store;
    store_options.numWorkers = static_cast<std::size_t>(place.world_size);
    store_options.waitWorkers = false;  // the rendezvous waits, and says who is missing
    store_options.timeout = place.timeout;
    try {
      store = c10::make_intrusive<c10d::TCPStore>(host, store_options);
    } catch (const std::exception& e) {
      throw DistributedError(
          fmt::format("ProcessGroupGuard: rank {} could not {} at {} within {}: {}", place.rank,
                      place.rank == 0 ? "serve the store" : "reach the master", place.where,
                      format_duration(place.timeout), error_message(e)));
    }
  }
  const char* restart = std::getenv("TORCHELASTIC_RESTART_COUNT");
  return c10::make_intrusive<c10d::PrefixStore>(
      fmt::format("torchguard/{}", restart && *restart ? restart : "0"), store);
}

// Every rank announces its rank and world size; each checks the others against its own.
// A rank that serves the store keeps it up, on a mismatch, until every rank that joined has
// read what it needs: otherwise the other ranks would see a closed connection, not the cause.
inline void rendezvous(c10d::Store& store, const RendezvousPlace& place) {
  const std::string mine = std::to_string(place.world_size);
  const auto lost = [&](const std::exception& e) {
    return DistributedError(
        fmt::format("ProcessGroupGuard: rank {} lost the store at {} during the rendezvous: {}",
                    place.rank, place.where, error_message(e)));
  };
  try {
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
    const auto started = std::chrono::steady_clock::now();
    try {
      store.wait({key}, place.timeout);
    } catch (const std::exception& e) {
      if (std::chrono::steady_clock::now() - started < place.timeout) throw lost(e);
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
    const auto checked = store.add("checked", 1);
    if (place.serves_store) {
      // Bounded: a rank that joined but hangs must not hold this one past the timeout.
      const auto deadline = std::chrono::steady_clock::now() + place.timeout;
      auto done = checked;
      while (done < store.add("joined", 0) && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        done = store.add("checked", 0);
      }
    }
  } catch (const std::exception&) {
    // The mismatch is the error to report; a store gone by now changes nothing.
  }
  throw *mismatch;
}

}  // namespace detail
}  // namespace torchguard
