// Host staging for background saves: one reused host buffer (pinned when the state is on a GPU)
// that a snapshot's tensors are copied into, so that training may go on while another thread
// writes the copy.
//
// Overlapped staging: the parameters and the optimizer's state change only when the optimizer
// steps, so their copy may run on the writer thread while the next forward and backward run
// (on CUDA: on a side stream). The training thread waits for that copy only at the fence,
// CheckpointGuard::before_optimizer_step(). Nothing relies on the loop calling it: each deferred
// tensor's version counter (bumped by every in-place change, the optimizer's included) is read
// at capture and again once the copy is done, from the training thread; a copy whose sources
// changed in between may be torn, and is dropped (the guard then saves the state it has now).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "torchguard/checkpoint/format.hpp"
#include "torchguard/version.hpp"

#if TORCHGUARD_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace torchguard {
namespace detail {

inline constexpr std::size_t staging_alignment = 64;
inline std::size_t align_up(std::size_t value) {
  return (value + staging_alignment - 1) / staging_alignment * staging_alignment;
}

// The copies a capture left for later: run() on the writer thread, unchanged() on the training
// thread once run() has returned.
class DeferredCopies {
 public:
  bool empty() const noexcept { return copies_.empty(); }

  // Copies every source into its slot (CUDA: waits for the side stream's copies).
  void run() {
    for (auto& copy : copies_) {
      if (copy.source.is_cuda() || copy.source.nbytes() == 0) continue;
      if (copy.source.is_cpu() && copy.source.is_contiguous()) {
        std::memcpy(copy.slot.data_ptr(), copy.source.data_ptr(), copy.source.nbytes());
      } else {
        copy.slot.copy_(copy.source.detach());
      }
    }
#if TORCHGUARD_WITH_CUDA
    for (auto& done : cuda_done_) done->synchronize();
#endif
  }

  // True when no source changed since capture: the copies are the captured state.
  bool unchanged() const {
    for (const auto& copy : copies_) {
      if (copy.source._version() != copy.version) return false;
    }
    return true;
  }

 private:
  friend class HostStaging;
  struct Copy {
    torch::Tensor source;
    torch::Tensor slot;
    std::int64_t version;
  };
  std::vector<Copy> copies_;
#if TORCHGUARD_WITH_CUDA
  std::vector<std::shared_ptr<at::cuda::CUDAEvent>> cuda_done_;
#endif
};

// A host buffer reused from one background save to the next, so that copying the state out of
// the training loop is a memcpy into memory already mapped, not fresh page faults.
class HostStaging {
 public:
  // Replaces every file's tensors by their slots in the buffer (grown if needed; valid until
  // the next call) and copies into them now, except the tensors `defer` names: those are copied
  // by the returned DeferredCopies (CUDA ones start now, on a side stream).
  DeferredCopies stage(std::vector<TensorFile>& files,
                       const std::function<bool(const torch::Tensor&)>& defer = {}) {
    std::size_t total = 0;
    bool on_gpu = false;
    for (const auto& file : files) {
      for (const auto& item : file.tensors) {
        total = align_up(total + item.tensor.nbytes());
        on_gpu = on_gpu || item.tensor.is_cuda();
      }
    }
    const bool pin = on_gpu && TORCHGUARD_WITH_CUDA;
    if (!buffer_.defined() || static_cast<std::size_t>(buffer_.numel()) < total ||
        (pin && !buffer_.is_pinned())) {
      buffer_ = torch::Tensor();  // the old one goes first: at most one buffer at a time
      buffer_ = torch::empty({static_cast<std::int64_t>(total)},
                             torch::TensorOptions().dtype(torch::kUInt8).pinned_memory(pin));
      std::memset(buffer_.data_ptr(), 0, total);  // fault the pages in now, not during a copy
    }
    DeferredCopies deferred;
    std::size_t offset = 0;
    auto* base = static_cast<char*>(buffer_.data_ptr());
    for (auto& file : files) {
      for (auto& item : file.tensors) {
        const torch::Tensor source = item.tensor;  // its version counter: the original's
        torch::Tensor slot = torch::from_blob(base + offset, source.sizes(),
                                              torch::TensorOptions().dtype(source.dtype()));
        offset = align_up(offset + source.nbytes());
        item.tensor = slot;
        if (defer && defer(source)) {
          deferred.copies_.push_back({source, slot, source._version()});
        } else {
          slot.copy_(source.detach());
        }
      }
    }
#if TORCHGUARD_WITH_CUDA
    start_device_copies(deferred);
#endif
    return deferred;
  }

 private:
#if TORCHGUARD_WITH_CUDA
  // The deferred CUDA tensors: copied on a side stream that first waits for the work queued so
  // far on each device's current stream; an event per device marks the end.
  static void start_device_copies(DeferredCopies& deferred) {
    for (auto& copy : deferred.copies_) {
      if (!copy.source.is_cuda()) continue;
      const auto index = copy.source.device().index();
      auto current = c10::cuda::getCurrentCUDAStream(index);
      auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index);
      at::cuda::CUDAEvent ready;
      ready.record(current);
      ready.block(side);
      c10::cuda::CUDAStreamGuard on_side(side);
      copy.slot.copy_(copy.source.detach(), /*non_blocking=*/true);
      auto done = std::make_shared<at::cuda::CUDAEvent>();
      done->record(side);
      deferred.cuda_done_.push_back(std::move(done));
    }
  }
#endif

  torch::Tensor buffer_;
};

}  // namespace detail
}  // namespace torchguard
