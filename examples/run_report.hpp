// run_report.hpp: what the training demo writes into its run directory and prints.
//
// metrics.csv holds one row per logged step, epochs.csv one row per epoch; both are appended
// to, so a resumed run continues them. plot() turns them into PNGs with gnuplot, run without
// a shell. Header-only, POSIX.
#pragma once

#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

extern "C" {
extern char** environ;  // for posix_spawnp: gnuplot inherits our environment
}

namespace run_report {

inline constexpr const char* kStepsCsv = "metrics.csv";
inline constexpr const char* kEpochsCsv = "epochs.csv";

// One row of metrics.csv.
struct StepRow {
  std::int64_t step = 0;
  std::int64_t epoch = 0;
  double loss = 0;
  double lr = 0;
  double samples_per_s = 0;

  static std::vector<std::string> columns() {
    return {"step", "epoch", "loss", "lr", "samples_per_s"};
  }
  std::vector<double> values() const {
    return {static_cast<double>(step), static_cast<double>(epoch), loss, lr, samples_per_s};
  }
};

// One row of epochs.csv. Accuracies are fractions in [0, 1]; memory is 0 where not measured
// (CPU).
struct EpochRow {
  std::int64_t epoch = 0;
  std::int64_t step = 0;
  double train_loss = 0;
  double train_accuracy = 0;
  double test_loss = 0;
  double test_accuracy = 0;
  double seconds = 0;
  double memory_peak_mib = 0;

  static std::vector<std::string> columns() {
    return {"epoch",     "step",          "train_loss", "train_accuracy",
            "test_loss", "test_accuracy", "seconds",    "memory_peak_mib"};
  }
  std::vector<double> values() const {
    return {static_cast<double>(epoch),
            static_cast<double>(step),
            train_loss,
            train_accuracy,
            test_loss,
            test_accuracy,
            seconds,
            memory_peak_mib};
  }
};

namespace detail {

inline std::string errno_text(int error) { return std::strerror(error); }

struct FileCloser {
  void operator()(std::FILE* file) const { std::fclose(file); }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

inline std::string join(const std::vector<std::string>& parts, const char* separator) {
  std::string joined;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    if (i > 0) joined += separator;
    joined += parts[i];
  }
  return joined;
}

inline std::string format(const char* pattern, double value) {
  char text[64];
  std::snprintf(text, sizeof text, pattern, value);
  return text;
}

// A CSV file of numbers with a header line; unparsable or missing fields read as NaN.
struct CsvTable {
  std::vector<std::string> columns;
  std::vector<std::vector<double>> rows;

  int column(const std::string& name) const {
    const auto found = std::find(columns.begin(), columns.end(), name);
    return found == columns.end() ? -1 : static_cast<int>(found - columns.begin());
  }
};

inline std::vector<std::string> split_line(const std::string& line) {
  std::vector<std::string> fields(1);
  for (char c : line) {
    if (c == ',') {
      fields.emplace_back();
    } else if (c != '\r') {
      fields.back() += c;
    }
  }
  return fields;
}

// A row's `columns` values; NaN where a field is missing or not a number.
inline std::vector<double> parse_row(const std::string& line, std::size_t columns) {
  const std::vector<std::string> fields = split_line(line);
  std::vector<double> row(columns, std::numeric_limits<double>::quiet_NaN());
  for (std::size_t i = 0; i < fields.size() && i < row.size(); ++i) {
    char* end = nullptr;
    const double value = std::strtod(fields[i].c_str(), &end);
    if (!fields[i].empty() && end != nullptr && *end == '\0') row[i] = value;
  }
  return row;
}

// A missing file reads as an empty table.
inline CsvTable read_csv(const std::string& path) {
  CsvTable table;
  std::ifstream in(path);
  std::string line;
  if (!std::getline(in, line)) return table;
  table.columns = split_line(line);
  while (std::getline(in, line)) {
    if (!line.empty()) table.rows.push_back(parse_row(line, table.columns.size()));
  }
  return table;
}

// A gnuplot single-quoted string: only the quote itself needs escaping, by doubling.
inline std::string gnuplot_quote(const std::string& text) {
  std::string quoted = "'";
  for (char c : text) quoted += c == '\'' ? std::string("''") : std::string(1, c);
  return quoted + "'";
}

inline std::string describe_wait_status(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return "was killed by signal " + std::to_string(WTERMSIG(status));
  return "ended with wait status " + std::to_string(status);
}

// Runs `argv` (looked up on PATH) without a shell: stdin from /dev/null, stdout and stderr to
// `log_path`. Returns the wait status; throws if it cannot be started.
inline int run_program(const std::vector<std::string>& argv, const std::string& log_path) {
  std::vector<char*> args;
  for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  if (posix_spawn_file_actions_init(&actions) != 0) {
    throw std::runtime_error("cannot run " + argv[0] + ": posix_spawn_file_actions_init failed");
  }
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                   0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = 0;
  const int error = posix_spawnp(&pid, argv[0].c_str(), &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (error != 0) throw std::runtime_error("cannot run " + argv[0] + ": " + errno_text(error));

  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) {
      throw std::runtime_error("waiting for " + argv[0] + ": " + errno_text(errno));
    }
  }
  return status;
}

inline std::string read_tail(const std::string& path, std::size_t max_chars) {
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (text.size() > max_chars) text = "..." + text.substr(text.size() - max_chars);
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text;
}

}  // namespace detail

// Appends rows of numbers to a CSV file. Writes the header only into a new or empty file and
// refuses a file whose header differs, so a resumed run appends to the same table.
//
// With `keep_through_step`, the table must have a "step" column and is cut back to the rows at
// or before that step: a run resumed from an older checkpoint (after a fallback, or after a
// crash between the last row and the next commit) redoes those steps and would otherwise list
// them twice. A partial last row, left by a run killed mid-write, is dropped as well. The file
// is rewritten through a temporary file and a rename, so an interruption keeps the old table.
class CsvWriter {
 public:
  CsvWriter(std::string path, std::vector<std::string> columns,
            std::optional<std::int64_t> keep_through_step = std::nullopt)
      : path_(std::move(path)), columns_(std::move(columns)) {
    if (columns_.empty()) throw std::invalid_argument("CsvWriter " + path_ + ": no columns");
    for (const std::string& column : columns_) {
      if (column.empty() || column.find_first_of(",\"\r\n") != std::string::npos) {
        throw std::invalid_argument("CsvWriter " + path_ + ": bad column name \"" + column + "\"");
      }
    }
    const auto step_column = std::find(columns_.begin(), columns_.end(), "step");
    if (keep_through_step && step_column == columns_.end()) {
      throw std::invalid_argument("CsvWriter " + path_ + ": keep_through_step needs a step column");
    }
    const std::string header = detail::join(columns_, ",");
    std::string text;
    {
      std::ifstream in(path_, std::ios::binary);
      if (in) text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
      if (in.bad()) fail("cannot read");
    }
    if (text.empty()) {
      open("w");
      write_line(header);
      return;
    }
    std::string first_line = text.substr(0, text.find('\n'));
    if (!first_line.empty() && first_line.back() == '\r') first_line.pop_back();
    if (first_line != header) {
      throw std::runtime_error(path_ + ": existing header \"" + first_line + "\" differs from \"" +
                               header + "\"; use a new run directory or remove the file");
    }
    // Complete lines only; with a limit, only rows whose step is within it.
    const auto step_index = static_cast<std::size_t>(step_column - columns_.begin());
    std::string kept = header + "\n";
    std::size_t at = text.find('\n');
    while (at != std::string::npos && at + 1 < text.size()) {
      const std::size_t end = text.find('\n', at + 1);
      if (end == std::string::npos) break;  // a partial row
      const std::string line = text.substr(at + 1, end - at - 1);
      at = end;
      // A row without a readable step goes too (NaN compares false).
      if (keep_through_step && !(detail::parse_row(line, columns_.size())[step_index] <=
                                 static_cast<double>(*keep_through_step))) {
        continue;
      }
      kept += line + "\n";
    }
    if (kept.size() != text.size()) {
      const std::string temporary = path_ + ".tmp";
      {
        detail::File out(std::fopen(temporary.c_str(), "w"));
        if (!out || std::fputs(kept.c_str(), out.get()) == EOF || std::fflush(out.get()) != 0) {
          const int error = errno;
          std::remove(temporary.c_str());
          throw std::runtime_error(temporary + ": cannot write: " + detail::errno_text(error));
        }
      }
      if (std::rename(temporary.c_str(), path_.c_str()) != 0) fail("cannot replace");
    }
    open("a");
  }

  // One value per column; integers up to 1e12 are written exactly.
  void write_row(const std::vector<double>& values) {
    if (values.size() != columns_.size()) {
      throw std::invalid_argument("CsvWriter " + path_ + ": " + std::to_string(values.size()) +
                                  " values for " + std::to_string(columns_.size()) + " columns");
    }
    std::string line;
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (i > 0) line += ',';
      line += detail::format("%.12g", values[i]);
    }
    write_line(line);
  }

  const std::string& path() const { return path_; }
  const std::vector<std::string>& columns() const { return columns_; }

 private:
  [[noreturn]] void fail(const char* what) const {
    throw std::runtime_error(path_ + ": " + what + ": " + detail::errno_text(errno));
  }

  void open(const char* mode) {
    file_.reset(std::fopen(path_.c_str(), mode));
    if (!file_) fail("cannot open");
  }

  // Flushed per row so a crash loses at most the row being written.
  void write_line(const std::string& line) {
    if (std::fputs((line + "\n").c_str(), file_.get()) == EOF || std::fflush(file_.get()) != 0) {
      fail("cannot write");
    }
  }

  std::string path_;
  std::vector<std::string> columns_;
  detail::File file_;
};

// Reads epochs.csv back, e.g. to include a resumed run's earlier epochs in the summary.
inline std::vector<EpochRow> read_epochs(const std::string& path) {
  const detail::CsvTable table = detail::read_csv(path);
  std::vector<int> index;
  for (const std::string& name : EpochRow::columns()) index.push_back(table.column(name));
  const auto get = [&](const std::vector<double>& row, std::size_t field) {
    return index[field] < 0 ? std::numeric_limits<double>::quiet_NaN() : row[index[field]];
  };
  std::vector<EpochRow> rows;
  for (const std::vector<double>& row : table.rows) {
    if (std::isnan(get(row, 0))) continue;
    EpochRow epoch;
    epoch.epoch = static_cast<std::int64_t>(get(row, 0));
    epoch.step = std::isnan(get(row, 1)) ? 0 : static_cast<std::int64_t>(get(row, 1));
    epoch.train_loss = get(row, 2);
    epoch.train_accuracy = get(row, 3);
    epoch.test_loss = get(row, 4);
    epoch.test_accuracy = get(row, 5);
    epoch.seconds = get(row, 6);
    epoch.memory_peak_mib = get(row, 7);
    rows.push_back(epoch);
  }
  return rows;
}

// Whether an executable `name` is on PATH; checked without spawning anything.
inline std::string find_in_path(const std::string& name) {
  const auto executable = [](const std::string& path) {
    struct stat info {};
    return ::stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode) &&
           ::access(path.c_str(), X_OK) == 0;
  };
  if (name.find('/') != std::string::npos) return executable(name) ? name : "";
  const char* path_env = std::getenv("PATH");
  const std::string path = path_env != nullptr ? path_env : "/usr/local/bin:/usr/bin:/bin";
  std::size_t start = 0;
  while (start <= path.size()) {
    std::size_t end = path.find(':', start);
    if (end == std::string::npos) end = path.size();
    std::string dir = path.substr(start, end - start);
    if (dir.empty()) dir = ".";  // POSIX: an empty PATH entry is the current directory
    const std::string candidate = dir + "/" + name;
    if (executable(candidate)) return candidate;
    start = end + 1;
  }
  return "";
}

inline bool gnuplot_available() { return !find_in_path("gnuplot").empty(); }

class PlotError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct PlotOptions {
  std::string title_prefix;  // e.g. "Fashion-MNIST: "
  int width = 960;
  int height = 540;
};

// Writes plot.gp into run_dir and runs gnuplot on metrics.csv and epochs.csv there. Returns the
// PNGs written: loss.png (loss per step), accuracy.png (accuracy and loss per epoch),
// memory.png (peak memory per epoch). A chart without data is skipped, with a line in `notes`.
// Throws PlotError when gnuplot is missing or fails (its output is in run_dir/plot.log).
inline std::vector<std::string> plot(const std::string& run_dir, const PlotOptions& options = {},
                                     std::vector<std::string>* notes = nullptr) {
  const auto note = [&](const std::string& text) {
    if (notes != nullptr) notes->push_back(text);
  };
  if (!gnuplot_available()) throw PlotError("gnuplot not found on PATH; no charts drawn");
  const std::string dir = run_dir.empty() ? "." : run_dir;
  const std::string steps_path = dir + "/" + kStepsCsv;
  const std::string epochs_path = dir + "/" + kEpochsCsv;
  const std::string script_path = dir + "/plot.gp";
  const std::string log_path = dir + "/plot.log";
  const detail::CsvTable steps = detail::read_csv(steps_path);
  const detail::CsvTable epochs = detail::read_csv(epochs_path);

  // Column numbers for gnuplot (1-based), resolved here so an unexpected layout is reported
  // in words rather than as a gnuplot error.
  const auto column = [&](const detail::CsvTable& table, const std::string& name,
                          const std::string& path) {
    const int index = table.column(name);
    if (index < 0) throw PlotError(path + ": no column \"" + name + "\"");
    return std::to_string(index + 1);
  };

  // Explicit ranges with 5% room, since gnuplot's autoscale puts extreme points on the border
  // and its `set offsets` do not apply to the second y axis.
  const auto padded_range = [](const detail::CsvTable& table, const std::vector<std::string>& names,
                               double scale) {
    double low = std::numeric_limits<double>::infinity();
    double high = -low;
    for (const std::string& name : names) {
      const int index = table.column(name);
      if (index < 0) continue;
      for (const auto& row : table.rows) {
        if (!std::isfinite(row[index])) continue;
        low = std::min(low, scale * row[index]);
        high = std::max(high, scale * row[index]);
      }
    }
    if (!(low <= high)) return std::string("[*:*]");
    const double pad = high > low ? 0.05 * (high - low) : std::max(0.5, 0.05 * std::abs(high));
    return detail::format("[%.6g:", low - pad) + detail::format("%.6g]", high + pad);
  };

  // pngcairo draws antialiased; the libgd png terminal is the fallback where it is missing.
  const bool cairo =
      detail::run_program({"gnuplot", "-e", "set terminal pngcairo"}, "/dev/null") == 0;
  std::string script = "# Written by run_report::plot. Redraw with: gnuplot plot.gp\n";
  script += "set datafile separator ','\n";
  script += std::string("set terminal ") + (cairo ? "pngcairo" : "png") + " size " +
            std::to_string(options.width) + "," + std::to_string(options.height) + " noenhanced" +
            (cairo ? " font ',11'" : "") + "\n";
  script += "set grid\nset key box opaque\n";
  std::vector<std::string> pngs;
  const auto output = [&](const std::string& name, const std::string& title) {
    pngs.push_back(dir + "/" + name);
    script += "\nset output " + detail::gnuplot_quote(pngs.back()) + "\n";
    script += "set title " + detail::gnuplot_quote(options.title_prefix + title) + "\n";
  };

  if (steps.rows.empty()) {
    note("loss chart skipped: no rows in " + steps_path);
  } else {
    const std::string file = detail::gnuplot_quote(steps_path) + " skip 1";
    const std::string step = column(steps, "step", steps_path);
    const std::string loss = column(steps, "loss", steps_path);
    output("loss.png", "training loss");
    script += "set xlabel 'step'\nset ylabel 'loss'\n";
    script += "n = 0\nema = 0\n";
    script += "plot " + file + " using " + step + ":" + loss +
              " with lines lc rgb '#9ecae1' title 'loss'";
    // An exponential moving average spanning ~2% of the run shows the trend through the noise.
    if (steps.rows.size() >= 20) {
      const double span = std::max(2.0, static_cast<double>(steps.rows.size()) / 50.0);
      const std::string alpha = detail::format("%.6g", 2.0 / (span + 1.0));
      script += ", \\\n     " + file + " using " + step + ":(n = n + 1, ema = n == 1 ? $" + loss +
                " : ema + " + alpha + " * ($" + loss + " - ema))" +
                " with lines lw 2 lc rgb '#08519c' title 'moving average'";
    }
    script += "\n";
  }

  if (epochs.rows.empty()) {
    note("epoch charts skipped: no rows in " + epochs_path);
  } else {
    const std::string file = detail::gnuplot_quote(epochs_path) + " skip 1";
    const std::string epoch = column(epochs, "epoch", epochs_path);
    const int epoch_index = epochs.column("epoch");
    double last_epoch = 1;
    for (const auto& row : epochs.rows) {
      if (!std::isnan(row[epoch_index])) last_epoch = std::max(last_epoch, row[epoch_index]);
    }
    // Whole epochs on the x axis, with room either side of a single point.
    script += "\nset xrange [0.5:" + detail::format("%.1f", last_epoch + 0.5) + "]\n";
    script += last_epoch <= 20 ? "set xtics 1\n" : "set xtics autofreq\n";
    output("accuracy.png", "accuracy and loss per epoch");
    script += "set xlabel 'epoch'\nset ylabel 'accuracy (%)'\nset y2label 'loss'\n";
    script += "set ytics nomirror\nset y2tics\nset key outside top center horizontal\n";
    script += "set yrange " + padded_range(epochs, {"train_accuracy", "test_accuracy"}, 100) +
              "\nset y2range " + padded_range(epochs, {"train_loss", "test_loss"}, 1) + "\n";
    const auto series = [&](const std::string& name, const std::string& expression_of,
                            const std::string& style) {
      const std::string index = column(epochs, name, epochs_path);
      std::string expression = expression_of;
      expression.replace(expression.find('#'), 1, "$" + index);
      return file + " using " + epoch + ":(" + expression + ") " + style;
    };
    script += "plot " +
              series("train_accuracy", "100 * #",
                     "with linespoints pt 7 lc rgb '#1f77b4' title 'train accuracy'") +
              ", \\\n     " +
              series("test_accuracy", "100 * #",
                     "with linespoints pt 7 lc rgb '#d62728' title 'test accuracy'") +
              ", \\\n     " +
              series("train_loss", "#",
                     "axes x1y2 with linespoints pt 6 dt 2 lc rgb '#1f77b4' title 'train loss'") +
              ", \\\n     " +
              series("test_loss", "#",
                     "axes x1y2 with linespoints pt 6 dt 2 lc rgb '#d62728' title 'test loss'") +
              "\n";
    script += "unset y2label\nunset y2tics\nset ytics mirror\nset key inside top right\n";

    const int memory = epochs.column("memory_peak_mib");
    double memory_max = 0;
    for (const auto& row : epochs.rows) {
      if (memory >= 0 && std::isfinite(row[memory])) memory_max = std::max(memory_max, row[memory]);
    }
    if (memory_max <= 0) {
      note("memory chart skipped: no nonzero memory_peak_mib in " + epochs_path +
           " (not measured on CPU)");
    } else {
      output("memory.png", "peak memory per epoch");
      script +=
          "set ylabel 'MiB'\nset yrange [0:" + detail::format("%.6g", 1.1 * memory_max) + "]\n";
      script += "plot " + file + " using " + epoch + ":" + std::to_string(memory + 1) +
                " with linespoints pt 7 lw 2 lc rgb '#2ca02c' notitle\n";
    }
  }
  if (pngs.empty()) return pngs;

  {
    std::ofstream out(script_path, std::ios::trunc);
    out << script;
    if (!out.flush()) throw PlotError("cannot write " + script_path);
  }
  const int status = detail::run_program({"gnuplot", script_path}, log_path);
  if (status != 0) {
    throw PlotError("gnuplot " + detail::describe_wait_status(status) + " on " + script_path +
                    ": " + detail::read_tail(log_path, 600));
  }
  std::ifstream log(log_path);
  if (log.peek() == std::ifstream::traits_type::eof()) std::remove(log_path.c_str());
  return pngs;
}

// "8.3s", "42s", "3m07s", "2h05m".
inline std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  if (seconds < 9.95) return detail::format("%.1fs", seconds);
  const auto whole = static_cast<long long>(std::llround(seconds));
  char text[48];
  if (whole < 60) {
    std::snprintf(text, sizeof text, "%llds", whole);
  } else if (whole < 3600) {
    std::snprintf(text, sizeof text, "%lldm%02llds", whole / 60, whole % 60);
  } else {
    std::snprintf(text, sizeof text, "%lldh%02lldm", whole / 3600, (whole % 3600) / 60);
  }
  return text;
}

// An aligned text table of the epochs, for printing at the end of a run.
inline std::string summary_table(const std::vector<EpochRow>& rows) {
  const std::vector<std::string> headers = {"epoch",    "train loss", "train acc",  "test loss",
                                            "test acc", "time",       "peak memory"};
  std::vector<std::vector<std::string>> cells;
  for (const EpochRow& row : rows) {
    cells.push_back(
        {std::to_string(row.epoch), detail::format("%.4f", row.train_loss),
         detail::format("%.2f%%", 100 * row.train_accuracy), detail::format("%.4f", row.test_loss),
         detail::format("%.2f%%", 100 * row.test_accuracy), format_duration(row.seconds),
         row.memory_peak_mib > 0 ? detail::format("%.1f MiB", row.memory_peak_mib)
                                 : std::string("-")});
  }
  std::vector<std::size_t> widths;
  for (const std::string& header : headers) widths.push_back(header.size());
  for (const auto& line : cells) {
    for (std::size_t i = 0; i < line.size(); ++i) widths[i] = std::max(widths[i], line[i].size());
  }
  const auto format_line = [&](const std::vector<std::string>& fields) {
    std::string line;
    for (std::size_t i = 0; i < fields.size(); ++i) {
      if (i > 0) line += " | ";
      line += std::string(widths[i] - fields[i].size(), ' ') + fields[i];  // right-aligned
    }
    return line + "\n";
  };
  std::string table = format_line(headers);
  for (std::size_t i = 0; i < widths.size(); ++i) {
    table += (i > 0 ? "-+-" : "") + std::string(widths[i], '-');
  }
  table += "\n";
  for (const auto& line : cells) table += format_line(line);
  return table;
}

struct ProgressOptions {
  double redraw_interval_s = 0.25;  // on a terminal: redraw the line in place this often
  double log_interval_s = 10.0;     // otherwise: print a new line this often
  double smoothing_s = 5.0;         // time constant of the moving averages of the rates
  int tty = -1;                     // -1: ask isatty(stderr); 0 or 1: force
};

// One progress line on stderr: redrawn with '\r' on a terminal, a plain line every
// log_interval_s otherwise, so logs stay readable. Finish it (or destroy it) before printing
// anything else.
class Progress {
 public:
  using Clock = std::chrono::steady_clock;

  Progress(std::string label, std::int64_t total_steps, ProgressOptions options = {})
      : label_(std::move(label)),
        total_steps_(total_steps),
        options_(options),
        tty_(options.tty < 0 ? ::isatty(STDERR_FILENO) == 1 : options.tty != 0),
        start_(Clock::now()),
        last_update_(start_),
        last_print_(start_) {}

  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  ~Progress() {
    if (line_open_) std::fputc('\n', stderr);
  }

  // Counts are cumulative, so a skipped call loses nothing. `loss` NaN: not known this step.
  void update(std::int64_t steps_done, std::int64_t samples_done, double loss = std::nan("")) {
    const Clock::time_point now = Clock::now();
    const double dt = std::chrono::duration<double>(now - last_update_).count();
    if (dt > 0 && steps_done > steps_done_) {
      const double step_rate = static_cast<double>(steps_done - steps_done_) / dt;
      const double sample_rate = static_cast<double>(samples_done - samples_done_) / dt;
      // Weighting by elapsed time keeps the smoothing independent of how often update() is
      // called.
      const double weight = rates_known_ ? 1.0 - std::exp(-dt / options_.smoothing_s) : 1.0;
      steps_per_s_ += weight * (step_rate - steps_per_s_);
      samples_per_s_ += weight * (sample_rate - samples_per_s_);
      rates_known_ = true;
      last_update_ = now;
      steps_done_ = steps_done;
      samples_done_ = samples_done;
    }
    if (!std::isnan(loss)) loss_ = std::isnan(loss_) ? loss : loss_ + 0.1 * (loss - loss_);
    const double since_print = std::chrono::duration<double>(now - last_print_).count();
    if (since_print >= (tty_ ? options_.redraw_interval_s : options_.log_interval_s)) {
      print(status_line(false));
      last_print_ = now;
    }
  }

  // Prints the final line, with the elapsed time instead of the time left.
  void finish() {
    if (finished_) return;
    finished_ = true;
    print(status_line(true));
    if (tty_) {
      std::fputc('\n', stderr);
      line_open_ = false;
    }
  }

  double samples_per_second() const { return rates_known_ ? samples_per_s_ : 0.0; }
  double seconds_left() const {
    if (!rates_known_ || steps_per_s_ <= 0) return std::nan("");
    return static_cast<double>(std::max<std::int64_t>(0, total_steps_ - steps_done_)) /
           steps_per_s_;
  }
  double elapsed_seconds() const {
    return std::chrono::duration<double>(Clock::now() - start_).count();
  }

 private:
  std::string status_line(bool done) const {
    std::string line =
        label_ + " " + std::to_string(steps_done_) + "/" + std::to_string(total_steps_);
    if (total_steps_ > 0) {
      line += detail::format(
          " %5.1f%%", 100.0 * static_cast<double>(steps_done_) / static_cast<double>(total_steps_));
    }
    if (!std::isnan(loss_)) line += detail::format("  loss %.4f", loss_);
    if (rates_known_) line += detail::format("  %.0f samples/s", samples_per_s_);
    line += done ? "  done in " + format_duration(elapsed_seconds())
                 : "  " + format_duration(seconds_left()) + " left";
    return line;
  }

  void print(const std::string& line) {
    if (tty_) {
      // Pad over the rest of a longer previous line rather than rely on terminal escapes.
      const std::size_t pad = last_length_ > line.size() ? last_length_ - line.size() : 0;
      std::fprintf(stderr, "\r%s%s", line.c_str(), std::string(pad, ' ').c_str());
      last_length_ = line.size();
      line_open_ = true;
    } else {
      std::fprintf(stderr, "%s\n", line.c_str());
    }
    std::fflush(stderr);
  }

  std::string label_;
  std::int64_t total_steps_;
  ProgressOptions options_;
  bool tty_;
  Clock::time_point start_;
  Clock::time_point last_update_;
  Clock::time_point last_print_;
  std::int64_t steps_done_ = 0;
  std::int64_t samples_done_ = 0;
  bool rates_known_ = false;
  double steps_per_s_ = 0;
  double samples_per_s_ = 0;
  double loss_ = std::nan("");
  std::size_t last_length_ = 0;
  bool line_open_ = false;
  bool finished_ = false;
};

}  // namespace run_report
