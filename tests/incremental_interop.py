"""The Python side of the [python] test of incremental checkpoints (tests/checkpoint/
test_incremental.cpp):

  incremental_interop.py CHECKPOINTS REFERENCES

Every checkpoint of CHECKPOINTS opens through torchguard.load as a whole state (the model's own
file and its shared file merged), every file its manifest lists opens with the safetensors
package, and the model "model" equals REFERENCES/<checkpoint's name>.safetensors (its whole
state, written by C++ at that step), tensor for tensor, bitwise. Prints a line per checkpoint;
exits 1 at the first difference.
"""
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import torchguard
from torchguard import _format


def check(checkpoints, references):
    names = [os.path.basename(path) for path in _format.committed(checkpoints)]
    if not names:
        print(f"no checkpoint in {checkpoints}")
        return 1
    for name in names:
        checkpoint = torchguard.load(checkpoints, restore=name)
        for file in checkpoint.manifest["files"]:  # each one a valid safetensors file
            with safe_open(os.path.join(checkpoints, name, file["name"]), framework="pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
        expected = load_file(os.path.join(references, f"{name}.safetensors"))
        model = checkpoint.models["model"]
        if sorted(model) != sorted(expected):
            print(f"{name}: holds {sorted(model)}, the reference {sorted(expected)}")
            return 1
        for key, tensor in expected.items():
            if model[key].dtype != tensor.dtype or not torch.equal(model[key], tensor):
                print(f"{name}: {key} differs from the reference")
                return 1
        record = checkpoint.manifest["models"]["model"]
        shared = record.get("shared_file")
        if shared is None:
            print(f"{name}: {len(model)} tensors, no shared file")
            continue
        entry = next(file for file in checkpoint.manifest["files"] if file["name"] == shared)
        count = len(load_file(os.path.join(checkpoints, name, shared)))
        how = f"linked from {entry['linked_from']}" if "linked_from" in entry else "written"
        print(f"{name}: {len(model)} tensors, {count} of them in {shared} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(check(sys.argv[1], sys.argv[2]))
