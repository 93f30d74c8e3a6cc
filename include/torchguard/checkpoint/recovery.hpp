// A run that heals itself (CheckpointOptions::recovery): a step whose loss is not finite, whose
// gradients are not finite, or whose loss jumps far above its recent values is not applied; every
// part goes back to the newest committed checkpoint, the step's batch goes on the sampler's skip
// list (which the checkpoint saved at once keeps), and training goes on from there, in the same
// process. Bounded: too many recoveries in a window, or the same step going wrong again after a
// rollback, end the run with a RecoveryError naming the steps and the samples.
//
//   loss.backward();
//   const auto verdict = checkpoint.check_step(loss, batch_indices);
//   if (verdict.recovered) { /* the sampler and every part went back: start the epoch over */ }
//   else { optimizer.step(); checkpoint.step(); }
//
// docs/guides/recovery.md walks through it, with the lines a run logs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <limits>
#include <string>
#include <vector>

#include <spdlog/fmt/fmt.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "torchguard/checkpoint/options.hpp"
#include "torchguard/core/error.hpp"
#include "torchguard/core/metrics.hpp"

namespace torchguard {

// What CheckpointGuard::check_step() found and did.
struct StepVerdict {
  bool recovered = false;            // the step went wrong: the run went back
  std::string reason;                // "the loss is nan", "the loss 41.2 is 38.1x the median ..."
  std::int64_t bad_step = 0;         // the step that went wrong
  std::int64_t restored_step = 0;    // the step the run went back to
  std::vector<std::size_t> skipped;  // the samples of the bad step, left out from now on
  int recoveries = 0;                // in this run (and the runs it resumed), this one included

  // For TrainingSession::log_metrics(restored_step, ...): metrics.jsonl and TensorBoard.
  Metrics metrics() const {
    return {{"recovery/count", recoveries},
            {"recovery/bad_step", bad_step},
            {"recovery/skipped_samples", static_cast<std::int64_t>(skipped.size())}};
  }
};

// The run went wrong more often than the policy allows (RecoveryOptions::max_recoveries), or the
// same step went wrong again after going back: nothing more is trained and nothing is saved over
// the committed checkpoints. The message names the steps and the samples skipped.
class RecoveryError : public CheckpointError {
 public:
  using CheckpointError::CheckpointError;
};

namespace detail {

// One recovery, as the checkpoints keep it (metadata "torchguard/recovery").
struct RecoveryRecord {
  std::int64_t bad_step = 0;
  std::int64_t restored_step = 0;
  std::string reason;
  std::vector<std::size_t> skipped;
};

inline nlohmann::json to_json(const RecoveryRecord& record) {
  return {{"bad_step", record.bad_step},
          {"restored_step", record.restored_step},
          {"reason", record.reason},
          {"skipped", record.skipped}};
}

// The records a checkpoint kept; what is not a list of records is left out.
inline std::vector<RecoveryRecord> recovery_records(const nlohmann::json& saved) {
  std::vector<RecoveryRecord> records;
  if (!saved.is_array()) return records;
  for (const auto& item : saved) {
    if (!item.is_object()) continue;
    RecoveryRecord record;
    record.bad_step = item.value("bad_step", std::int64_t{0});
    record.restored_step = item.value("restored_step", std::int64_t{0});
    record.reason = item.value("reason", std::string());
    if (item.contains("skipped") && item["skipped"].is_array()) {
      for (const auto& index : item["skipped"]) {
        if (index.is_number_unsigned()) record.skipped.push_back(index.get<std::size_t>());
      }
    }
    records.push_back(std::move(record));
  }
  return records;
}

// "12, 345, 7 (3 samples)": at most `shown` of them, then how many in all.
inline std::string sample_list(const std::vector<std::size_t>& samples, std::size_t shown = 8) {
  std::string text;
  for (std::size_t i = 0; i < samples.size() && i < shown; ++i) {
    text += fmt::format("{}{}", i ? ", " : "", samples[i]);
  }
  if (samples.size() > shown) text += ", ...";
  return fmt::format("{}{}({} samples)", text, text.empty() ? "" : " ", samples.size());
}

// Every recovery, one per line, for the error that ends the run.
inline std::string recovery_history(const std::vector<RecoveryRecord>& records) {
  std::string text;
  for (const auto& record : records) {
    text += fmt::format("\n  step {} ({}) -> back to step {}, skipped {}", record.bad_step,
                        record.reason, record.restored_step, sample_list(record.skipped));
  }
  return text;
}

// The detection half of the policy: one look at a step's loss and gradients, with one
// synchronization (the gradients' 2-norms, fused by _foreach_norm, and the loss read together).
class StepMonitor {
 public:
  explicit StepMonitor(const RecoveryOptions& options) : options_(&options) {}

  // Why the step is bad, or "" when it is good; `loss_value` gets the loss.
  std::string judge(const torch::Tensor& loss, const std::vector<torch::Tensor>& parameters,
                    double& loss_value) const {
    std::vector<torch::Tensor> values{loss.detach().reshape({1}).to(torch::kDouble)};
    std::vector<torch::Tensor> grads;
    if (options_->non_finite_gradients) {
      for (const auto& parameter : parameters) {
        if (parameter.grad().defined()) grads.push_back(parameter.grad());
      }
      if (!grads.empty()) {
        // The 2-norm of each (one fused kernel per device and dtype on CUDA; on the CPU 15x
        // faster than the max-norm): NaN and inf propagate into it. A norm can also overflow
        // while every element is finite: the rare path below tells the two apart.
        const auto norms = at::_foreach_norm(grads, 2);
        values.push_back(torch::stack(norms).to(loss.device(), torch::kDouble).reshape({-1}));
      }
    }
    const auto host = torch::cat(values).to(torch::kCPU);
    const double* read = host.data_ptr<double>();
    loss_value = read[0];
    if (options_->non_finite_loss && !std::isfinite(loss_value)) {
      return fmt::format("the loss is {}", loss_value);
    }
    for (std::int64_t i = 1; i < host.numel(); ++i) {
      if (!std::isfinite(read[i]) &&
          !grads[static_cast<std::size_t>(i - 1)].isfinite().all().item<bool>()) {
        return "a gradient is not finite";
      }
    }
    if (options_->loss_spikes && window_.size() >= options_->spike_warmup &&
        std::isfinite(loss_value)) {
      std::vector<double> recent(window_.begin(), window_.end());
      std::nth_element(recent.begin(), recent.begin() + recent.size() / 2, recent.end());
      const double median = recent[recent.size() / 2];
      if (median > 0 && loss_value > options_->spike_factor * median) {
        return fmt::format("the loss {:.6g} is {:.1f}x the median of the last {} ({:.6g})",
                           loss_value, loss_value / median, recent.size(), median);
      }
    }
    return {};
  }

  // A good step's loss joins the window the spikes are judged against.
  void accept(double loss_value) {
    if (!std::isfinite(loss_value)) return;
    window_.push_back(loss_value);
    while (window_.size() > std::max<std::size_t>(options_->spike_window, 1)) window_.pop_front();
  }

 private:
  const RecoveryOptions* options_;
  std::deque<double> window_;
};

}  // namespace detail
}  // namespace torchguard
