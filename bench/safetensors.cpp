// How long opening a safetensors file takes, header only, against the reference in the same run:
// SafetensorsFile(path) + names() vs huggingface/safetensors' Python API,
// `with safe_open(path, framework="pt") as f: keys = list(f.keys())`, on files of 1k, 10k and
// 100k small tensors (a model's names, mixed dtypes and shapes, a few bytes each: the header is
// the file), written by save_safetensors. The target: within 2x of safe_open at every size.
//
// The reference runs in one Python process (TORCHGUARD_PYTHON, or scripts/setup.sh --torch2's
// venv) started once and driven over a pipe: it times each open with time.perf_counter() and
// answers with the times, so the interpreter's start-up and imports are not counted, and rounds
// alternate between the two sides. Warm: the file in the page cache (an untimed open first).
// Cold: the file evicted (posix_fadvise DONTNEED, checked with mincore) before each open.
//
// Then the attack of the reference's attacks/safetensors_abuse_attempt_3.py, written byte for byte
// as that script writes it: 100k tensors whose data_offsets are all [0, 160000] (overlapping), a
// 7.8 MB header. Both sides must refuse it; the target: under a second.
//
//   bench_safetensors [--rounds R]    (default 15)
// A round times 100000 / size opens per side and size, warm, and one cold; medians are printed.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>
#include <torchguard/checkpoint.hpp>

#include "bench_support.hpp"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

constexpr std::array<std::size_t, 3> sizes = {1000, 10000, 100000};
constexpr double target_ratio = 2.0;
constexpr double attack_target_seconds = 1.0;

using torchguard_bench::median;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// A decoder layer's tensors as a quantized Llama-style checkpoint names them, a few bytes each.
struct LayerPart {
  const char* suffix;
  torch::Dtype dtype;
  std::vector<std::int64_t> shape;
};

const std::vector<LayerPart>& layer_parts() {
  static const std::vector<LayerPart> parts = {
      {"self_attn.q_proj.weight", torch::kBFloat16, {4, 4}},
      {"self_attn.k_proj.weight", torch::kBFloat16, {2, 4}},
      {"self_attn.v_proj.weight", torch::kBFloat16, {2, 4}},
      {"self_attn.o_proj.weight", torch::kBFloat16, {4, 4}},
      {"self_attn.q_proj.bias", torch::kFloat32, {4}},
      {"self_attn.rotary_emb.inv_freq", torch::kFloat64, {2}},
      {"mlp.gate_proj.weight", torch::kInt8, {8, 4}},
      {"mlp.up_proj.weight", torch::kInt8, {8, 4}},
      {"mlp.down_proj.weight", torch::kInt8, {4, 8}},
      {"mlp.down_proj.weight_scale", torch::kFloat16, {4, 1}},
      {"mlp.down_proj.zero_point", torch::kInt64, {1}},
      {"input_layernorm.weight", torch::kFloat32, {4}},
      {"post_attention_layernorm.weight", torch::kFloat32, {4}},
      {"self_attn.sliding_window_mask", torch::kBool, {2, 2}},
  };
  return parts;
}

// `count` tensors named model.layers.{i}.<part>, layer after layer.
torchguard::TensorMap model_tensors(std::size_t count) {
  const auto& parts = layer_parts();
  torchguard::TensorMap tensors;
  for (std::size_t k = 0; k < count; ++k) {
    const auto& part = parts[k % parts.size()];
    tensors.emplace("model.layers." + std::to_string(k / parts.size()) + "." + part.suffix,
                    torch::ones(part.shape, torch::TensorOptions().dtype(part.dtype)));
  }
  return tensors;
}

// The file attacks/safetensors_abuse_attempt_3.py writes: json.dumps of 100k tensors (its
// separators ", " and ": "), the header's length, the header, as many zero bytes as it has.
void write_attack(const fs::path& path) {
  std::string header = "{";
  for (int i = 0; i < 100000; ++i) {
    if (i > 0) header += ", ";
    header += "\"weight_" + std::to_string(i) +
              R"(": {"dtype": "F32", "shape": [200, 200], "data_offsets": [0, 160000]})";
  }
  header += "}";
  std::string length(8, '\0');
  for (int i = 0; i < 8; ++i)
    length[static_cast<std::size_t>(i)] = static_cast<char>(header.size() >> (8 * i));
  std::ofstream out(path, std::ios::binary);
  out << length << header << std::string(header.size(), '\0');
  if (!out.flush()) throw std::runtime_error("cannot write " + path.string());
}

// The length of the file's header (its first 8 bytes, little-endian).
std::uint64_t header_length(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  unsigned char prefix[8] = {};
  in.read(reinterpret_cast<char*>(prefix), 8);
  std::uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = length << 8 | prefix[i];
  return length;
}

// Drops the file's pages from the page cache; true when none of them is left there.
bool evict(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  ::fdatasync(fd);  // only clean pages can be dropped
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  const auto size = static_cast<std::size_t>(fs::file_size(path));
  const long page = ::sysconf(_SC_PAGESIZE);
  std::vector<unsigned char> resident((size + static_cast<std::size_t>(page) - 1) /
                                      static_cast<std::size_t>(page));
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return false;
  const bool checked = ::mincore(map, size, resident.data()) == 0;
  ::munmap(map, size);
  return checked && std::none_of(resident.begin(), resident.end(),
                                 [](unsigned char page_state) { return page_state & 1; });
}

// The C++ side: open, list the names, close (as the Python `with` block does). Seconds.
double torchguard_open(const fs::path& path, std::size_t expected) {
  std::vector<std::string> names;
  const auto start = Clock::now();
  {
    const torchguard::SafetensorsFile file(path);
    names = file.names();
  }
  const double seconds = seconds_since(start);
  if (names.size() != expected) {
    throw std::runtime_error(path.string() + ": SafetensorsFile lists " +
                             std::to_string(names.size()) + " names, not " +
                             std::to_string(expected));
  }
  return seconds;
}

// Seconds to refuse the attack, and what was said; a negative time when it was accepted.
std::pair<double, std::string> torchguard_attack(const fs::path& path) {
  const auto start = Clock::now();
  try {
    const torchguard::SafetensorsFile file(path);
    return {-1, "accepted, " + std::to_string(file.names().size()) + " tensors"};
  } catch (const torchguard::SafetensorsError& error) {
    const double seconds = seconds_since(start);
    return {seconds, error.what()};
  }
}

// A Python that imports safetensors and torch, or "".
std::string find_python() {
  std::vector<std::string> candidates;
  if (const char* python = std::getenv("TORCHGUARD_PYTHON")) candidates.push_back(python);
  const char* venv = std::getenv("TORCHGUARD_TORCH2_VENV");
  candidates.push_back(std::string(venv ? venv : "/opt/torchguard-venv") + "/bin/python");
  for (const auto& python : candidates) {
    if (fs::exists(python) &&
        std::system((python + " -c 'import safetensors, torch' 2>/dev/null").c_str()) == 0) {
      return python;
    }
  }
  return {};
}

// The reference's side, one request a line: "open <repeats> <path>" answers the number of keys
// and each open's seconds; "attack <path>" the seconds to refuse it and the error.
constexpr const char* python_peer_script = R"(import sys, time
import safetensors, torch
from safetensors import safe_open
print('ready', safetensors.__version__, flush=True)
for line in sys.stdin:
    command, rest = line.rstrip('\n').split(' ', 1)
    if command == 'open':
        repeats, path = rest.split(' ', 1)
        times = []
        for _ in range(int(repeats)):
            start = time.perf_counter()
            with safe_open(path, framework='pt') as f:
                keys = list(f.keys())
            times.append(time.perf_counter() - start)
            count = len(keys)
            del f, keys
        print(count, *times, flush=True)
    elif command == 'attack':
        start = time.perf_counter()
        try:
            with safe_open(rest, framework='pt') as f:
                keys = list(f.keys())
            print(-1, 'accepted,', len(keys), 'tensors', flush=True)
        except Exception as error:
            seconds = time.perf_counter() - start
            message = ' '.join(str(error).split())
            print(seconds, type(error).__name__ + ':', message, flush=True)
)";

// safe_open in one Python process, started once and driven over pipes.
class PythonPeer {
 public:
  explicit PythonPeer(const std::string& python) : child_(python, {"-c", python_peer_script}) {
    const std::string hello = child_.answer();
    if (hello.rfind("ready ", 0) == 0) version_ = hello.substr(6);
  }

  bool ready() const { return !version_.empty(); }
  const std::string& version() const { return version_; }

  // Seconds of each of `repeats` opens, or nothing when the answer is not that.
  std::vector<double> open(const fs::path& path, int repeats, std::size_t expected) {
    std::istringstream reply(
        child_.request("open " + std::to_string(repeats) + " " + path.string()));
    std::size_t count = 0;
    std::vector<double> times;
    double seconds = 0;
    if (!(reply >> count) || count != expected) return {};
    while (reply >> seconds) times.push_back(seconds);
    if (times.size() != static_cast<std::size_t>(repeats)) return {};
    return times;
  }
  // Seconds to refuse the file (negative: accepted) and what was said, or nullopt.
  std::optional<std::pair<double, std::string>> attack(const fs::path& path) {
    const std::string reply = child_.request("attack " + path.string());
    char* end = nullptr;
    const double seconds = std::strtod(reply.c_str(), &end);
    if (end == reply.c_str()) return std::nullopt;
    return std::make_pair(seconds, std::string(end + (*end == ' ' ? 1 : 0)));
  }

 private:
  torchguard_bench::PythonChild child_;
  std::string version_;
};

// An error message for the table: the temporary directory left out, cut at `at_most` bytes.
std::string shortened(std::string text, const fs::path& dir, std::size_t at_most = 200) {
  const std::string prefix = (dir / "").string();
  for (std::size_t at; (at = text.find(prefix)) != std::string::npos;)
    text.erase(at, prefix.size());
  if (text.size() > at_most) text = text.substr(0, at_most - 3) + "...";
  return text;
}

struct Samples {
  std::vector<double> ours, theirs;
};

}  // namespace

int main(int argc, char** argv) {
  int rounds = 15;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--rounds") == 0) rounds = std::max(1, std::atoi(argv[i + 1]));
  }
  ::signal(SIGPIPE, SIG_IGN);  // a Python that dies is an answer missing, not our death
  const fs::path dir =
      fs::temp_directory_path() / ("bench-safetensors-" + std::to_string(getpid()));
  fs::create_directories(dir);

  std::vector<fs::path> files;
  for (const std::size_t size : sizes) {
    files.push_back(dir / ("model-" + std::to_string(size) + ".safetensors"));
    torchguard::save_safetensors(files.back(), model_tensors(size), {{"format", "pt"}});
  }
  const fs::path attack = dir / "safetensors_abuse_attempt_3.safetensors";
  write_attack(attack);

  const std::string python = find_python();
  std::optional<PythonPeer> peer;
  if (!python.empty()) peer.emplace(python);
  const bool with_python = peer && peer->ready();
  bool python_failed = false;  // an answer was not what it should be: the column is skipped

  // Untimed first opens: the page cache, Python's lazy imports, the allocators.
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    torchguard_open(files[i], sizes[i]);
    if (with_python && peer->open(files[i], 1, sizes[i]).empty()) python_failed = true;
  }
  bool cold_works = true;
  std::vector<Samples> warm(sizes.size()), cold(sizes.size());
  for (int round = 0; round < rounds; ++round) {
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      const int repeats = static_cast<int>(100000 / sizes[i]);
      auto ours = [&](bool cached) {
        if (cached) {
          for (int r = 0; r < repeats; ++r) {
            warm[i].ours.push_back(torchguard_open(files[i], sizes[i]));
          }
        } else if (cold_works && (cold_works = evict(files[i]))) {
          cold[i].ours.push_back(torchguard_open(files[i], sizes[i]));
        }
      };
      auto theirs = [&](bool cached) {
        if (!with_python || python_failed) return;
        if (!cached && !(cold_works && (cold_works = evict(files[i])))) return;
        const auto times = peer->open(files[i], cached ? repeats : 1, sizes[i]);
        if (times.empty()) python_failed = true;
        auto& samples = cached ? warm[i].theirs : cold[i].theirs;
        samples.insert(samples.end(), times.begin(), times.end());
      };
      // Each side goes first every other round.
      for (const bool cached : {true, false}) {
        if (round % 2 == 0) {
          ours(cached);
          theirs(cached);
        } else {
          theirs(cached);
          ours(cached);
        }
      }
    }
  }
  const int attack_tries = std::min(rounds, 5);
  std::vector<double> attack_ours, attack_theirs;
  std::string attack_our_message, attack_their_message;
  for (int t = 0; t < attack_tries; ++t) {
    const auto [seconds, message] = torchguard_attack(attack);
    attack_ours.push_back(seconds);
    attack_our_message = message;
    if (with_python && !python_failed) {
      if (const auto answer = peer->attack(attack)) {
        attack_theirs.push_back(answer->first);
        attack_their_message = answer->second;
      } else {
        python_failed = true;
      }
    }
  }
  const auto attack_bytes = fs::file_size(attack);
  std::vector<std::uint64_t> header_bytes;
  for (const auto& file : files) header_bytes.push_back(header_length(file));
  const bool python_column = with_python && !python_failed;
  const std::string version =
      with_python ? "\n(safetensors " + peer->version() + ")" : std::string();
  peer.reset();
  fs::remove_all(dir);

  std::printf(
      "Opening a safetensors file's header: SafetensorsFile(path) + names(), against the "
      "reference's\n`with safe_open(path, framework=\"pt\") as f: keys = list(f.keys())`%s, "
      "timed in one Python process.\nMedian ms per open; warm: %d rounds of 100000/size opens "
      "per side; cold (the file evicted from\nthe page cache before each open): %d opens per "
      "side. Target: torchguard / safe_open <= %.1f.\n",
      version.c_str(), rounds, rounds, target_ratio);
  if (!with_python) {
    std::printf(
        "safe_open: SKIPPED, no Python with safetensors and torch\n"
        "  ($TORCHGUARD_PYTHON, or the venv of scripts/setup.sh --torch2)\n");
  } else if (python_failed) {
    std::printf("safe_open: SKIPPED, the Python process did not answer as expected\n");
  }
  std::printf("  tensors  header MB  cache  torchguard ms  safe_open ms   ratio  target\n");
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    for (const bool cached : {true, false}) {
      const Samples& samples = cached ? warm[i] : cold[i];
      if (samples.ours.empty()) {
        std::printf("  %7zu  %9.2f  %-5s  (cold not measured: the page cache keeps the file)\n",
                    sizes[i], static_cast<double>(header_bytes[i]) / 1e6, cached ? "warm" : "cold");
        continue;
      }
      const double ours = median(samples.ours) * 1e3;
      if (!python_column || samples.theirs.empty()) {
        std::printf("  %7zu  %9.2f  %-5s  %13.3f  %12s  %6s  -\n", sizes[i],
                    static_cast<double>(header_bytes[i]) / 1e6, cached ? "warm" : "cold", ours,
                    "skipped", "-");
        continue;
      }
      const double theirs = median(samples.theirs) * 1e3;
      std::printf("  %7zu  %9.2f  %-5s  %13.3f  %12.3f  %6.2f  %s\n", sizes[i],
                  static_cast<double>(header_bytes[i]) / 1e6, cached ? "warm" : "cold", ours,
                  theirs, ours / theirs, ours / theirs <= target_ratio ? "met" : "NOT met");
    }
  }

  std::printf(
      "The attack of huggingface/safetensors attacks/safetensors_abuse_attempt_3.py (100000 "
      "tensors,\nall data_offsets [0, 160000]; header %.1f MB, file %.1f MB), median of %d "
      "tries.\nTarget: refused in < %.0f s.\n",
      static_cast<double>(attack_bytes - 8) / 2e6, static_cast<double>(attack_bytes) / 1e6,
      attack_tries, attack_target_seconds);
  const double ours = median(attack_ours);
  if (ours < 0) {
    std::printf("  torchguard  ACCEPTED it (NOT met): %s\n", attack_our_message.c_str());
  } else {
    std::printf("  torchguard  refused in %8.2f ms  %s\n    %s\n", ours * 1e3,
                ours < attack_target_seconds ? "met" : "NOT met",
                shortened(attack_our_message, dir).c_str());
  }
  if (attack_theirs.empty()) {
    std::printf("  safe_open   skipped\n");
  } else if (const double theirs = median(attack_theirs); theirs < 0) {
    std::printf("  safe_open   accepted it: %s\n", attack_their_message.c_str());
  } else {
    std::printf("  safe_open   refused in %8.2f ms  (torchguard / safe_open %.2f)\n    %s\n",
                theirs * 1e3, ours > 0 ? ours / theirs : 0.0,
                shortened(attack_their_message, dir).c_str());
  }
  return 0;
}
