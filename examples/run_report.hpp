// What the training demo shows of a run: a progress line while an epoch trains, and at the end
// a table of the epochs and gnuplot charts, both drawn from the run's metrics.jsonl (the rows
// TrainingSession::log_metrics wrote: step rows with "loss", epoch rows with "epoch").
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torchguard/core/logging.hpp>

namespace run_report {

inline std::string duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  return torchguard::format_duration(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double>(seconds)));
}

// The rows of a metrics.jsonl file; an unreadable line (a run killed mid-write) is skipped.
inline std::vector<nlohmann::json> read_rows(const std::filesystem::path& path) {
  std::vector<nlohmann::json> rows;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    auto row = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (row.is_object()) rows.push_back(std::move(row));
  }
  return rows;
}

inline bool is_epoch_row(const nlohmann::json& row) { return row.contains("epoch"); }

// The epoch rows, the last one of each epoch (a run resumed with a higher --max-steps reports the
// epoch it ended inside once more).
inline std::vector<nlohmann::json> epoch_rows(const std::vector<nlohmann::json>& rows) {
  std::vector<nlohmann::json> epochs;
  for (const auto& row : rows) {
    if (!is_epoch_row(row)) continue;
    if (!epochs.empty() && epochs.back()["epoch"] == row["epoch"]) epochs.pop_back();
    epochs.push_back(row);
  }
  return epochs;
}

// A number of a row, NaN where it is missing or null.
inline double number(const nlohmann::json& row, const char* key) {
  const auto found = row.find(key);
  return found != row.end() && found->is_number() ? found->get<double>() : std::nan("");
}

// An aligned table of the epoch rows, for the end of a run.
inline std::string summary_table(const std::vector<nlohmann::json>& rows) {
  std::string table =
      fmt::format("{:>5} | {:>10} | {:>9} | {:>9} | {:>8} | {:>12} | {:>11}\n", "epoch",
                  "train loss", "train acc", "test loss", "test acc", "time", "peak memory");
  table += std::string(table.size() - 1, '-') + "\n";
  for (const auto& row : epoch_rows(rows)) {
    table += fmt::format(
        "{:>5} | {:>10.4f} | {:>8.2f}% | {:>9.4f} | {:>7.2f}% | {:>12} | {:>7.1f} MiB\n",
        row["epoch"].get<std::int64_t>(), number(row, "train_loss"),
        100 * number(row, "train_accuracy"), number(row, "test_loss"),
        100 * number(row, "test_accuracy"), duration(number(row, "epoch_s")),
        number(row, "memory_peak_mib"));
  }
  return table;
}

// Writes plot.gp (the data inline) into `dir` and runs gnuplot on it: loss.png (the loss per
// step) and accuracy.png (accuracy and loss per epoch). Returns the PNGs, or a reason in `why`.
inline std::vector<std::string> plot(const std::filesystem::path& dir, std::string& why) {
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) {
    why = "gnuplot is not installed (apt-get install gnuplot-nox)";
    return {};
  }
  const auto rows = read_rows(dir / "metrics.jsonl");
  std::string steps, epochs;
  for (const auto& row : epoch_rows(rows)) {
    epochs += fmt::format("{} {} {} {} {}\n", row["epoch"].get<std::int64_t>(),
                          100 * number(row, "train_accuracy"), 100 * number(row, "test_accuracy"),
                          number(row, "train_loss"), number(row, "test_loss"));
  }
  for (const auto& row : rows) {
    if (!is_epoch_row(row) && row.contains("loss")) {
      steps += fmt::format("{} {}\n", row["step"].get<std::int64_t>(), number(row, "loss"));
    }
  }
  if (steps.empty() || epochs.empty()) {
    why = "no step or epoch rows in metrics.jsonl";
    return {};
  }
  std::ofstream script(dir / "plot.gp");
  script << "# Written by the training demo from metrics.jsonl. Redraw with: gnuplot plot.gp\n"
         << "$steps << EOD\n"
         << steps << "EOD\n$epochs << EOD\n"
         << epochs << "EOD\n"
         << "set terminal png size 960,540 noenhanced\nset grid\nset key box opaque\n"
         << "set output 'loss.png'\nset title 'training loss'\n"
         << "set xlabel 'step'\nset ylabel 'loss'\n"
         << "plot $steps using 1:2 with lines lw 2 title 'loss'\n"
         << "set output 'accuracy.png'\nset title 'accuracy and loss per epoch'\n"
         << "set xlabel 'epoch'\nset xtics 1\nset ylabel 'accuracy (%)'\nset y2label 'loss'\n"
         << "set ytics nomirror\nset y2tics\nset offsets 0.5, 0.5, graph 0.05, graph 0.05\n"
         << "plot $epochs using 1:2 with linespoints pt 7 title 'train accuracy', \\\n"
         << "     $epochs using 1:3 with linespoints pt 7 title 'test accuracy', \\\n"
         << "     $epochs using 1:4 axes x1y2 with linespoints dt 2 title 'train loss', \\\n"
         << "     $epochs using 1:5 axes x1y2 with linespoints dt 2 title 'test loss'\n";
  script.close();
  const std::string command = "cd '" + dir.string() + "' && gnuplot plot.gp > plot.log 2>&1";
  if (dir.string().find('\'') != std::string::npos || std::system(command.c_str()) != 0) {
    why = "gnuplot failed; see " + (dir / "plot.log").string();
    return {};
  }
  std::error_code ignored;
  if (std::filesystem::file_size(dir / "plot.log", ignored) == 0) {
    std::filesystem::remove(dir / "plot.log", ignored);
  }
  return {(dir / "loss.png").string(), (dir / "accuracy.png").string()};
}

// One progress line on stderr: redrawn in place on a terminal, a line every 10 s otherwise.
class Progress {
 public:
  Progress(std::string label, std::int64_t total)
      : label_(std::move(label)), total_(total), tty_(::isatty(STDERR_FILENO) == 1) {}
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;
  ~Progress() { finish(); }

  void update(std::int64_t done, std::int64_t samples, double loss) {
    done_ = done;
    samples_ = samples;
    loss_ = loss;
    const auto now = Clock::now();
    if (now - last_print_ >= (tty_ ? std::chrono::milliseconds(250) : std::chrono::seconds(10))) {
      print(false);
      last_print_ = now;
    }
  }
  void finish() {
    if (finished_) return;
    finished_ = true;
    print(true);
    if (tty_) std::fputc('\n', stderr);
  }

 private:
  using Clock = std::chrono::steady_clock;

  void print(bool done) {
    const double seconds = std::chrono::duration<double>(Clock::now() - start_).count();
    const double rate = seconds > 0 ? static_cast<double>(samples_) / seconds : 0.0;
    const double left = done_ > 0 ? seconds * static_cast<double>(total_ - done_) / done_ : NAN;
    std::fprintf(stderr, "%s%s %lld/%lld  loss %.4f  %.0f samples/s  %s%s", tty_ ? "\r" : "",
                 label_.c_str(), static_cast<long long>(done_), static_cast<long long>(total_),
                 loss_, rate,
                 (done ? "done in " + duration(seconds) : duration(left) + " left").c_str(),
                 tty_ ? "   " : "\n");
    std::fflush(stderr);
  }

  std::string label_;
  std::int64_t total_;
  bool tty_;
  Clock::time_point start_ = Clock::now();
  Clock::time_point last_print_ = start_;
  std::int64_t done_ = 0;
  std::int64_t samples_ = 0;
  double loss_ = NAN;
  bool finished_ = false;
};

}  // namespace run_report
