"""The Python side of the safetensors interop tests (tests/checkpoint/test_safetensors.cpp
and test_state_dict.cpp, [interop]):
the real `safetensors` package and PyTorch, run by the C++ tests.

  safetensors_interop.py check-dtypes FILE   FILE (written by C++) loads with load_file into the
                                             expected tensors, and is byte for byte what
                                             safetensors.torch.save writes for them
  safetensors_interop.py write-dtypes FILE   save_file of the same tensors, for C++ to read
  safetensors_interop.py train DIR           trains Small, writes DIR/python_model.safetensors
                                             and DIR/python_io.safetensors (inputs, outputs)
  safetensors_interop.py check-trained DIR   loads DIR/cpp_model.safetensors (trained in C++)
                                             into Small and compares its outputs on
                                             DIR/cpp_io.safetensors's inputs
"""
import sys

import torch
from safetensors.torch import load_file, save, save_file


def every_dtype():
    """The same tensors as every_dtype() in tests/checkpoint/test_safetensors.cpp."""
    base = (torch.arange(24, dtype=torch.float64) / 2).reshape(2, 3, 4)
    tensors = {name: base.to(dtype) for name, dtype in [
        ("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16),
        ("f64", torch.float64), ("i64", torch.int64), ("i32", torch.int32),
        ("i16", torch.int16), ("i8", torch.int8), ("u8", torch.uint8)]}
    tensors["bool"] = (torch.arange(6) % 3 == 0).reshape(3, 2)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(42, dtype=torch.int64)
    return tensors


class Small(torch.nn.Module):
    """The same module as SmallNet in tests/checkpoint/test_state_dict.cpp."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.flatten(1))


def fail(message):
    print(f"safetensors_interop.py: {message}", file=sys.stderr)
    sys.exit(1)


def check_dtypes(path):
    expected = every_dtype()
    loaded = load_file(path)
    if sorted(loaded) != sorted(expected):
        fail(f"keys {sorted(loaded)} != {sorted(expected)}")
    for name, tensor in expected.items():
        got = loaded[name]
        if got.dtype != tensor.dtype or got.shape != tensor.shape or not torch.equal(got, tensor):
            fail(f"{name}: {got.dtype} {tuple(got.shape)} {got} != {tensor.dtype} {tuple(tensor.shape)} {tensor}")
    with open(path, "rb") as f:
        written = f.read()
    if written != save(expected, metadata={"format": "pt"}):
        fail("the file is not byte for byte what safetensors.torch.save writes")


def train(directory):
    torch.manual_seed(0)
    model = Small()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        x = torch.randn(8, 2, 5, 5)
        loss = (model(x) - x.mean((1, 2, 3)).unsqueeze(1)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    inputs = torch.randn(6, 2, 5, 5)
    with torch.no_grad():
        outputs = model(inputs)
    save_file(model.state_dict(), f"{directory}/python_model.safetensors")
    save_file({"inputs": inputs, "outputs": outputs}, f"{directory}/python_io.safetensors")


def check_trained(directory):
    model = Small()
    model.load_state_dict(load_file(f"{directory}/cpp_model.safetensors"))  # strict
    model.eval()
    io = load_file(f"{directory}/cpp_io.safetensors")
    with torch.no_grad():
        outputs = model(io["inputs"])
    if not torch.allclose(outputs, io["outputs"], rtol=1e-5, atol=1e-6):
        fail(f"outputs differ by up to {(outputs - io['outputs']).abs().max().item()}")
    if model.bn.num_batches_tracked.item() != 5:
        fail(f"num_batches_tracked is {model.bn.num_batches_tracked.item()}, not 5")


if __name__ == "__main__":
    command, target = sys.argv[1], sys.argv[2]
    if command == "check-dtypes":
        check_dtypes(target)
    elif command == "write-dtypes":
        save_file(every_dtype(), target)
    elif command == "train":
        train(target)
    elif command == "check-trained":
        check_trained(target)
    else:
        fail(f"unknown command {command}")
    print("ok")
