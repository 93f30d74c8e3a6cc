#!/usr/bin/env bash
# Installs what torchguard needs on Debian 12, and nothing when it is all there (safe to rerun).
#   scripts/setup.sh           Debian's LibTorch 1.13 (CPU), spdlog, Catch2, CMake, Ninja, ...,
#                              and the Python side of the same LibTorch (Debian's python3-torch,
#                              with safetensors in $TORCHGUARD_DEBIAN_VENV, default
#                              /opt/torchguard-venv-debian): python/'s package runs on it
#   scripts/setup.sh --torch2  also LibTorch 2.x: the `torch` wheel from PyPI, installed once
#                              into $TORCHGUARD_TORCH2_VENV (default /opt/torchguard-venv)
#                              and reused by every build after that, with the Python packages
#                              the interop tests run against (safetensors, tensorboard,
#                              transformers, xxhash).
set -euo pipefail

packages=(build-essential cmake ninja-build git libtorch-dev libspdlog-dev catch2
          nlohmann-json3-dev libxxhash-dev zlib1g-dev libopenblas0-pthread libcli11-dev
          dataset-fashion-mnist gnuplot-nox libgloo-dev python3-torch python3-xxhash python3-venv)
# libopenblas0-pthread: Debian's LibTorch calls the system BLAS, and the default one is the
# unoptimised reference implementation (a batched matmul no faster than one row at a time).
# libgloo-dev: LibTorch's c10d headers include Gloo's, which libtorch-dev does not carry.
# python3-torch: Python over the very libtorch.so.1.13 the C++ builds link (a run that crosses
# between the languages is bitwise there); xxhash for python/'s package.
source "$(dirname "$0")/apt.sh"
apt_install_missing setup "${packages[@]}"

# Debian has no python3-safetensors: a venv over the system's packages adds it from PyPI.
source "$(dirname "$0")/venvs.sh"
if ! "$debian_venv/bin/python" -c 'import torch, safetensors.torch, xxhash' 2>/dev/null; then
  echo "setup: making $debian_venv (Debian's python3-torch, and safetensors from PyPI)"
  /usr/bin/python3 -m venv --clear --system-site-packages "$debian_venv"
  "$debian_venv/bin/python" -m pip install -q --disable-pip-version-check safetensors
fi

if [ "${1:-}" = "--torch2" ]; then
  if ! "$torch2_venv/bin/python" -c 'import torch' 2>/dev/null; then
    echo "setup: installing the torch wheel into $torch2_venv (large: done once)"
    python3 -m venv --clear "$torch2_venv"
    "$torch2_venv/bin/python" -m pip install -q --disable-pip-version-check "${TORCHGUARD_TORCH2_SPEC:-torch>=2,<3}"
  fi
  # The other side of the interop tests: Python's safetensors (numpy quiets torch's warning),
  # tensorboard (its EventAccumulator reads the event files; `tensorboard --logdir`) and
  # transformers (save_pretrained's sharded directories, from_pretrained; with huggingface_hub).
  if ! "$torch2_venv/bin/python" -c 'import safetensors.torch, numpy, tensorboard, transformers, xxhash' 2>/dev/null; then
    echo "setup: installing safetensors, tensorboard, transformers and xxhash into $torch2_venv"
    "$torch2_venv/bin/python" -m pip install -q --disable-pip-version-check safetensors numpy tensorboard \
      transformers xxhash
  fi
fi
