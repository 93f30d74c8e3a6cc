#!/usr/bin/env bash
# python/'s package installs with pip (`pip install ./python`) and works from where it went:
#   tests/python_package.sh <LibTorch version>
# It is installed into a fresh directory (not the venv: nothing is left behind), imported from
# there, and round-trips a checkpoint: saved, verified, loaded, resumed.
set -uo pipefail
work=$(mktemp -d "${TMPDIR:-/tmp}/torchguard-python-XXXXXX")
trap 'rm -rf "$work"' EXIT
source "$(dirname "$0")/script_support.sh"
python=$(libtorch_python "$1" "safetensors, xxhash") || { echo "$python"; exit 0; }
python=${python##* }  # the interpreter alone: the package must come from the install
root=$(cd "$(dirname "$0")/.." && pwd)
"$python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
  --target "$work/site" "$root/python" > "$work/pip.out" 2>&1 ||
  { cat "$work/pip.out"; fail "pip install ./python failed"; }
PYTHONPATH="$work/site" "$python" - "$work/run" > "$work/out" 2>&1 <<'PY' || { cat "$work/out"; fail "the installed package failed"; }
import sys, torch, torchguard
assert torchguard.__file__.startswith(sys.path[0]) or "site" in torchguard.__file__, torchguard.__file__
model = torch.nn.Linear(3, 2)
optimizer = torchguard.optim.Adam(model.parameters(), lr=0.1)
model(torch.randn(4, 3)).sum().backward()
optimizer.step()
sampler = torchguard.ResumableSampler(10, seed=3)
sampler.consume(4)
path = torchguard.save(sys.argv[1], step=7, models={"model": model}, optimizers={"optimizer": optimizer},
                       samplers={"train": sampler}, metrics={"loss": float("nan")})
checkpoint = torchguard.load(sys.argv[1])
assert checkpoint.step == 7 and checkpoint.metrics == {"loss": None}, checkpoint.metrics
assert torch.equal(checkpoint.models["model"]["weight"], model.weight)
again = torchguard.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.5)
checkpoint.load_optimizer("optimizer", again)
assert again.param_groups[0]["lr"] == 0.1
assert checkpoint.sampler("train").remaining() == sampler.remaining()
print("installed from", torchguard.__file__, "and round-tripped", path)
PY
cat "$work/out"
echo "passed"
