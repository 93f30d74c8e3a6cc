# Sourced by setup.sh, configure.sh and tests/script_support.sh: where the Python venvs live.
#   debian_venv  Debian's python3-torch (LibTorch 1.13's Python side) with safetensors from PyPI
#   torch2_venv  the torch wheel (LibTorch 2.x) and the interop tests' packages
debian_venv=${TORCHGUARD_DEBIAN_VENV:-/opt/torchguard-venv-debian}
torch2_venv=${TORCHGUARD_TORCH2_VENV:-/opt/torchguard-venv}
