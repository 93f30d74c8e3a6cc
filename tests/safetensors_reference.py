"""The judge of tests/checkpoint/test_safetensors_reference.cpp ([safetensors][reference]
[interop]): the real `safetensors` package's verdict on files, and the dtypes it exchanges with C++.

  safetensors_reference.py verdicts DIR      one JSON line per DIR/*.safetensors, sorted:
                                             {"file", "accepted": true, "tensors": [[name,
                                             dtype, shape], ...] by name, "metadata": {...} or
                                             null, "canonical": whether serialize() of those
                                             tensors writes exactly this file (null where it
                                             cannot take them)} or {"file", "accepted": false,
                                             "error": the package's message}
  safetensors_reference.py check-dtypes FILE FILE (written by C++) loads with load_file into
                                             every_dtype(), bytes and dtypes, and is byte for
                                             byte what safetensors.torch.save writes for them
  safetensors_reference.py write-dtypes FILE save_file(every_dtype()), for C++ to read
"""
import ctypes
import json
import os
import struct
import sys

import torch
from safetensors import TensorSpec, safe_open, serialize
from safetensors.torch import load_file, save, save_file

# The format's dtypes in the reference's declaration order (tensor.rs, Dtype), their bits, and
# torch's name for each (None: torch has no 6-bit floats). The same table as format_dtypes in
# tests/checkpoint/safetensors_reference_cases.hpp.
FORMAT_DTYPES = [
    ("BOOL", 8, "bool"), ("F4", 4, "float4_e2m1fn_x2"), ("F6_E2M3", 6, None),
    ("F6_E3M2", 6, None), ("U8", 8, "uint8"), ("I8", 8, "int8"), ("F8_E5M2", 8, "float8_e5m2"),
    ("F8_E4M3", 8, "float8_e4m3fn"), ("F8_E8M0", 8, "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", 8, "float8_e4m3fnuz"), ("F8_E5M2FNUZ", 8, "float8_e5m2fnuz"),
    ("I16", 16, "int16"), ("U16", 16, "uint16"), ("F16", 16, "float16"),
    ("BF16", 16, "bfloat16"), ("I32", 32, "int32"), ("U32", 32, "uint32"),
    ("F32", 32, "float32"), ("C64", 64, "complex64"), ("F64", 64, "float64"),
    ("I64", 64, "int64"), ("U64", 64, "uint64"),
]
TORCH_NAME = {name: torch_name for name, _, torch_name in FORMAT_DTYPES}


def fail(message):
    print(f"safetensors_reference.py: {message}", file=sys.stderr)
    sys.exit(1)


def canonical(path, tensors, metadata):
    """Whether the reference's writer, given the file's tensors, writes exactly the file."""
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    buffers, specs = [], {}
    for name, dtype, shape in tensors:
        if TORCH_NAME[dtype] is None:
            return None  # TensorSpec has no name for F6
        if dtype == "F4":  # TensorSpec takes torch's shape: two F4 to an element
            if not shape or shape[-1] % 2:
                return None
            shape = shape[:-1] + [shape[-1] // 2]
        entry = header[name]  # an object, or serde's positional [dtype, shape, data_offsets]
        begin, end = entry["data_offsets"] if isinstance(entry, dict) else entry[2]
        buffer = (ctypes.c_char * (end - begin)).from_buffer_copy(
            data[8 + length + begin:8 + length + end])
        buffers.append(buffer)
        specs[name] = TensorSpec(dtype=TORCH_NAME[dtype], shape=shape,
                                 data_ptr=ctypes.addressof(buffer), data_len=end - begin)
    return serialize(specs, metadata) == data


def verdict(path):
    try:
        with safe_open(path, framework="pt") as f:
            tensors = []
            for name in sorted(f.keys()):
                view = f.get_slice(name)
                tensors.append([name, view.get_dtype(), list(view.get_shape())])
            metadata = f.metadata()
    except Exception as error:  # noqa: BLE001 - whatever the package raises is its verdict
        return {"accepted": False, "error": f"{type(error).__name__}: {error}"}
    return {"accepted": True, "tensors": tensors, "metadata": metadata,
            "canonical": canonical(path, tensors, metadata)}


def verdicts(directory):
    for file in sorted(os.listdir(directory)):
        if file.endswith(".safetensors"):
            print(json.dumps({"file": file, **verdict(os.path.join(directory, file))}))


def pattern(index, k):
    """pattern_bytes() in tests/checkpoint/test_safetensors_reference.cpp."""
    value = (k * 29 + index * 7 + 3) & 0xFF
    return value & 1 if FORMAT_DTYPES[index][0] == "BOOL" else value


def every_dtype():
    """Each dtype of the format torch has, named by it, holding the pattern's bytes; file shape
    [2, 4] for the sub-byte dtypes, [2, 3] for the others."""
    tensors, missing = {}, []
    for index, (name, bits, torch_name) in enumerate(FORMAT_DTYPES):
        if torch_name is None:
            continue
        dtype = getattr(torch, torch_name, None)
        if dtype is None:
            missing.append(name)
            continue
        elements = 8 if bits < 8 else 6
        raw = torch.tensor([pattern(index, k) for k in range(elements * bits // 8)],
                           dtype=torch.uint8)
        tensors[name] = raw.view(dtype).reshape(2, -1)
    if missing:
        print(f"SKIPPED: torch {torch.__version__} has no dtype for {', '.join(missing)}")
        sys.exit(0)
    return tensors


def check_dtypes(path):
    expected = every_dtype()
    loaded = load_file(path)
    if sorted(loaded) != sorted(expected):
        fail(f"keys {sorted(loaded)} != {sorted(expected)}")
    for name, tensor in expected.items():
        got = loaded[name]
        # torch.equal is not implemented for the float8 and float4 dtypes: compare bytes.
        if (got.dtype != tensor.dtype or got.shape != tensor.shape
                or not torch.equal(got.view(torch.uint8), tensor.view(torch.uint8))):
            fail(f"{name}: {got.dtype} {tuple(got.shape)} != {tensor.dtype} {tuple(tensor.shape)}"
                 " or the bytes differ")
    with open(path, "rb") as f:
        written = f.read()
    if written != save(expected):
        fail("the file is not byte for byte what safetensors.torch.save writes")


if __name__ == "__main__":
    command, target = sys.argv[1], sys.argv[2]
    if command == "verdicts":
        verdicts(target)
        sys.exit(0)
    if command == "check-dtypes":
        check_dtypes(target)
    elif command == "write-dtypes":
        save_file(every_dtype(), target)
    else:
        fail(f"unknown command {command}")
    print("ok")
