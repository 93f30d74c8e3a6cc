// The named values of a training step that guards log, save and compare: {{"loss", 0.25},
// {"epoch", 2}}. An integer stays an integer (in JSON too); NaN and infinities are written null.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <nlohmann/json.hpp>

namespace torchguard {

class MetricValue {
 public:
  template <class T, std::enable_if_t<std::is_arithmetic_v<T> && !std::is_same_v<T, bool>, int> = 0>
  MetricValue(T value) noexcept  // NOLINT: implicit, so that {"loss", 0.25} reads naturally
      : number_(static_cast<double>(value)), integer_(std::is_integral_v<T>) {
    if constexpr (std::is_integral_v<T>) whole_ = static_cast<std::int64_t>(value);
  }

  bool is_integer() const noexcept { return integer_; }
  double value() const noexcept { return number_; }
  operator double() const noexcept { return number_; }  // NOLINT: a metric is a number

  // "0.25", "2": what a log line shows.
  std::string text() const {
    return integer_ ? fmt::format("{}", whole_) : fmt::format("{:.6g}", number_);
  }

  friend void to_json(nlohmann::json& json, const MetricValue& metric) {
    if (metric.integer_) {
      json = metric.whole_;
    } else if (std::isfinite(metric.number_)) {
      json = metric.number_;
    } else {
      json = nullptr;  // NaN is not JSON
    }
  }
  friend void to_json(nlohmann::ordered_json& json, const MetricValue& metric) {
    nlohmann::json plain;
    to_json(plain, metric);
    json = plain;
  }

 private:
  double number_ = 0;
  std::int64_t whole_ = 0;
  bool integer_ = false;
};

using Metric = std::pair<std::string, MetricValue>;
using Metrics = std::vector<Metric>;

}  // namespace torchguard
