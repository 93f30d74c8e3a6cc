"""Writes the hand-made seeds of the fuzz corpora (tests/fuzz/corpus/, scripts/fuzz.sh).

  make_seeds.py [--checkpoints DIR]

safetensors_header/: files of every dtype, shape and kind of metadata written by the reference
implementation (Python's safetensors, with torch), a few it cannot write (F6, the positional
entry form, padding, unknown fields) checked against its reader, and files it refuses: the
hand-written ones of huggingface/safetensors' tests (safetensors/src/tensor.rs) and more. Each
seed's name says whether the reference accepts it (valid-*) or refuses it (invalid-*); the
script checks that it does.

manifest/: manifests as CheckpointGuard writes them (checkpoint/commit.hpp, write_checkpoint and
manifest.hpp, manifest_text: JSON indented by two spaces in the writer's key order, the checksum
key on the last line, the XXH3 of the text before that line closed with "\n}"), of formats 1, 2
and 3, intact, newer and damaged. With --checkpoints DIR (a directory that examples/checkpoint
saved into), its manifests and safetensors files are taken too, and the text written here for
each manifest is first checked to be byte for byte theirs.

Needs the venv of scripts/setup.sh --torch2 (torch, safetensors) and libxxhash (Debian's
libxxhash-dev). Rerunning rewrites the same files (the manifests' created_unix_s is fixed); the
fuzzer's own finds (named by their SHA-1) are left as they are.
"""
import argparse
import ctypes
import json
import math
import struct
import sys
from pathlib import Path

import torch
from safetensors import deserialize
from safetensors.torch import save

CORPUS = Path(__file__).resolve().parent / "corpus"


def fail(message):
    print(f"make_seeds.py: {message}", file=sys.stderr)
    sys.exit(1)


def write(target, name, data):
    if len(data) > 64 * 1024:
        fail(f"{target}/{name} has {len(data)} bytes, over the fuzzers' -max_len of 64 KiB")
    (CORPUS / target).mkdir(parents=True, exist_ok=True)
    (CORPUS / target / name).write_bytes(data)


# --- safetensors_header ------------------------------------------------------------------------


def reference_accepts(data):
    try:
        deserialize(data)
        return True
    except Exception:  # SafetensorError, and the few the reference raises from Python
        return False


def safetensors_seed(name, data):
    # stricter-*: refused here on purpose although the reference reads them (a name given twice:
    # it keeps the last, readers that keep the first would see another file).
    expected = name.startswith(("valid-", "stricter-"))
    if reference_accepts(data) != expected:
        fail(f"the reference {'refuses' if expected else 'accepts'} {name}")
    write("safetensors_header", name, data)


def with_length(header, data=b""):
    """A file of `header` (str or bytes) and `data`, its length prefix computed."""
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header)) + header + data


def small(dtype, shape):
    """A tensor of `dtype` and `shape` with a few distinct values (zeros where arange can't)."""
    count = math.prod(shape)
    if dtype == torch.bool:
        return (torch.arange(count) % 3 == 0).reshape(shape)
    if dtype == torch.float4_e2m1fn_x2:  # two F4 per byte: no arithmetic, a view of bytes
        return torch.arange(count, dtype=torch.uint8).view(dtype).reshape(shape)
    try:
        return (torch.arange(count, dtype=torch.float64) / 2).to(dtype).reshape(shape)
    except (RuntimeError, TypeError):
        return torch.zeros(shape, dtype=torch.uint8).view(dtype)


TORCH_DTYPES = [
    (torch.bool, [3, 2]), (torch.uint8, [4]), (torch.int8, [2, 2]), (torch.int16, [3]),
    (torch.uint16, [2]), (torch.int32, []), (torch.uint32, [2]), (torch.int64, [0, 4]),
    (torch.uint64, [1]), (torch.float16, [2, 2]), (torch.bfloat16, [1, 3]),
    (torch.float32, [1, 2, 3]), (torch.float64, [2]), (torch.complex64, [2]),
    (torch.float8_e4m3fn, [2, 1]), (torch.float8_e4m3fnuz, [1]), (torch.float8_e5m2, [3]),
    (torch.float8_e5m2fnuz, [2]), (torch.float8_e8m0fnu, [2]), (torch.float4_e2m1fn_x2, [2]),
]


def safetensors_seeds():
    for dtype, shape in TORCH_DTYPES:
        label = str(dtype).split(".")[-1]
        safetensors_seed(f"valid-{label}", save({"t": small(dtype, shape)}))
    every = {str(dtype).split(".")[-1]: small(dtype, shape) for dtype, shape in TORCH_DTYPES}
    safetensors_seed("valid-every-dtype", save(every, metadata={"format": "pt"}))
    state_dict = {f"layers.{i}.{part}": small(torch.float32, [2, 2] if part == "weight" else [2])
                  for i in range(4) for part in ("weight", "bias")}
    state_dict["step"] = torch.tensor(7)
    safetensors_seed("valid-state-dict", save(state_dict, metadata={"format": "pt"}))
    safetensors_seed("valid-empty", save({}))
    safetensors_seed("valid-metadata-only", save({}, metadata={"framework": "pt"}))
    # Several metadata keys: written here, as the reference's writer orders them as a hash map
    # does (another order each run).
    metadata = {"ключ": "значение", "quote\"": "back\\slash", "tab\t": "line\nbreak\r",
                "control": "\x01\x1f\x7f", "emoji": "\U0001f642", "": "empty key",
                "empty value": ""}
    safetensors_seed("valid-metadata-text", with_length(json.dumps(
        {"__metadata__": metadata, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
        ensure_ascii=False, separators=(",", ":")), b"\0\0\x80?"))
    safetensors_seed("valid-zero-sized", save({
        "a": torch.zeros(0), "b": torch.zeros(2, 0), "c": torch.zeros(0, dtype=torch.int64),
        "d": small(torch.int8, [1])}))
    safetensors_seed("valid-scalars", save({"s1": torch.tensor(1.5), "s2": torch.tensor(3),
                                            "s3": torch.tensor(True)}))
    safetensors_seed("valid-names", save({
        "mod/sub.weight": small(torch.float16, [1]), "é\U0001f642": small(torch.float16, [1]),
        "with space": small(torch.float16, [1]), "\x00nul\x1f": small(torch.float16, [1]),
        "quote\"back\\": small(torch.float16, [1]), "__meta": small(torch.float16, [1])}))

    # What the reference reads but does not write.
    safetensors_seed("valid-f6", with_length(
        '{"a":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]},'
        '"b":{"dtype":"F6_E3M2","shape":[2,4],"data_offsets":[3,9]}}', bytes(range(9))))
    safetensors_seed("valid-positional-entry", with_length(
        '{"a":["F32",[1],[0,4]],"b":["I8",[2,1],[4,6]]}', b"\0\0\x80?\x01\x02"))
    safetensors_seed("valid-unknown-fields", with_length(
        '{"a":{"data_offsets":[0,4],"extra":{"x":[1,-2.5e3,0.5E-2,true,false,null,"s",{}]},'
        '"shape":[1],"dtype":"U32","more":[]}}', b"\x01\0\0\0"))
    safetensors_seed("valid-metadata-null", with_length(
        '{"__metadata__":null,"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"ab"))
    safetensors_seed("valid-escapes", with_length(
        '{"\\u00e9\\ud83d\\ude42\\/\\b\\f\\n\\r\\t\\"\\\\":{"dtype":"BOOL","shape":[1],'
        '"data_offsets":[0,1]},"__metadata__":{"\\u0041":"\\u00FF"}}', b"\x01"))
    safetensors_seed("valid-whitespace", with_length(
        ' \t\r\n{ "a" : { "dtype" : "I16" , "shape" : [ 1 , 1 ] , "data_offsets" : [ 0 , 2 ] } ,'
        '\n"b":{"dtype":"I16","shape":[1],"data_offsets":[2,4]}}\r\n \t', b"\1\2\3\4"))
    safetensors_seed("valid-out-of-order", with_length(
        '{"z":{"dtype":"F64","shape":[1],"data_offsets":[4,12]},'
        '"y":{"dtype":"F32","shape":[],"data_offsets":[0,4]},'
        '"x":{"dtype":"F16","shape":[0],"data_offsets":[12,12]}}', bytes(12)))
    safetensors_seed("valid-nested-unknown-126", with_length(
        '{"a":{"dtype":"U8","shape":[],"data_offsets":[0,1],"x":' + "[" * 125 + "]" * 125 +
        "}}", b"\0"))

    # From huggingface/safetensors' tests (safetensors/src/tensor.rs), as written there.
    test = b'{"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}}'
    safetensors_seed("valid-ref-deserialization", b"<\0\0\0\0\0\0\0" + test + bytes(16))
    safetensors_seed("valid-ref-empty-shapes", with_length(
        '{"test":{"dtype":"I32","shape":[],"data_offsets":[0,4]}}', bytes(4)))
    safetensors_seed("valid-ref-whitespace-padded", b"\x06\0\0\0\0\0\0\0{}\x0d\x20\x09\x0a")
    safetensors_seed("valid-ref-whitespace-leading", b"\x06\0\0\0\0\0\0\0\x09\x0a{}\x0d\x20")
    safetensors_seed("valid-ref-zero-sized", b"<\0\0\0\0\0\0\0" +
                     b'{"test":{"dtype":"I32","shape":[2,0],"data_offsets":[0, 0]}}')
    safetensors_seed("invalid-ref-incomplete-buffer", b"<\0\0\0\0\0\0\0" + test + bytes(16) +
                     b"extra_bogus_data_for_polyglot_file")
    safetensors_seed("invalid-ref-missing-bytes", b"<\0\0\0\0\0\0\0" + test + bytes(14))
    safetensors_seed("invalid-ref-header-too-large",
                     b"<\0\0\0\0\xff\xff\xff" + test + bytes(16))
    safetensors_seed("invalid-ref-too-small", b"")
    safetensors_seed("invalid-ref-header-length", b"<\0\0\0\0\0\0\0")
    safetensors_seed("invalid-ref-non-utf8", b"\x01\0\0\0\0\0\0\0\xff")
    safetensors_seed("invalid-ref-not-json", b"\x01\0\0\0\0\0\0\0{")
    safetensors_seed("invalid-ref-info", b"<\0\0\0\0\0\0\0" +
                     b'{"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0, 4]}}')
    safetensors_seed("invalid-ref-overflow-1", b"O\0\0\0\0\0\0\0" +
                     b'{"test":{"dtype":"I32","shape":[2,18446744073709551614],'
                     b'"data_offsets":[0,16]}}' + bytes(16))
    safetensors_seed("invalid-ref-overflow-2", b"N\0\0\0\0\0\0\0" +
                     b'{"test":{"dtype":"I32","shape":[2,9223372036854775807],'
                     b'"data_offsets":[0,16]}}' + bytes(16))
    attack = ",".join(f'"weight_{i}":{{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}'
                      for i in range(10))
    safetensors_seed("invalid-ref-json-attack", with_length("{" + attack + "}", bytes(16)))
    safetensors_seed("invalid-ref-f4-misaligned", with_length(
        '{"a":{"dtype":"F4","shape":[1,3],"data_offsets":[0,2]}}', bytes(2)))

    # More refusals, one rule each.
    entry = '{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    refusals = {
        "metadata-twice": '{"__metadata__":{},"__metadata__":{}}',
        "metadata-not-string": '{"__metadata__":{"a":1}}',
        "metadata-not-object": '{"__metadata__":[]}',
        "field-twice": '{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
        "no-dtype": '{"a":{"shape":[1],"data_offsets":[0,1]}}',
        "unknown-dtype": '{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,1]}}',
        "three-offsets": '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,1]}}',
        "negative": '{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}',
        "fraction": '{"a":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}',
        "leading-zero": '{"a":{"dtype":"U8","shape":[01],"data_offsets":[0,1]}}',
        "over-64-bits": '{"a":{"dtype":"U8","shape":[18446744073709551616],'
                        '"data_offsets":[0,1]}}',
        "positional-4": '{"a":["U8",[1],[0,1],1]}',
        "hole": '{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
        "overlap": f'{{"a":{entry},"b":{entry}}}',
        "lone-surrogate": '{"\\ud800":' + entry + "}",
        "bad-escape": '{"\\x":' + entry + "}",
        "control-in-string": '{"a\x01":' + entry + "}",
        "nul-padding": '{"a":' + entry + "}\0",
        "trailing-garbage": '{"a":' + entry + "}x",
        "nested-128": '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":' +
                      "[" * 126 + "]" * 126 + "}}",
        "not-object": "[]",
        "overlong-utf8": b'{"\xc0\xaf":' + entry.encode() + b"}",
    }
    for name, header in refusals.items():
        safetensors_seed(f"invalid-{name}", with_length(header, b"\1"))
    safetensors_seed("stricter-name-twice", with_length(f'{{"a":{entry},"a":{entry}}}', b"\1"))
    safetensors_seed("stricter-metadata-key-twice", with_length(
        '{"__metadata__":{"k":"1","k":"2"}}'))


# --- manifest ----------------------------------------------------------------------------------

XXHASH = ctypes.CDLL("libxxhash.so.0")
XXHASH.XXH3_64bits.restype = ctypes.c_uint64
XXHASH.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
CHECKSUM_KEY = "manifest_xxh3_64"


def dump2(value):
    """nlohmann's dump(2): the same text as json.dumps for what these seeds hold."""
    return json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False)


def sealed(manifest):
    """The text manifest_text writes: dump(2) without the checksum, then the checksum of that
    text as its last key (the XXH3 of dump(2) of the rest, the same for formats 2 and 3)."""
    manifest = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    body = dump2(manifest).encode()
    manifest[CHECKSUM_KEY] = f"{XXHASH.XXH3_64bits(body, len(body)):016x}"
    return (dump2(manifest) + "\n").encode()


def files_of(*names):
    """The manifest's list of `names` (sizes and checksums made up: only the text is read)."""
    return [{"name": name, "size": 100 + 7 * i,
             "xxh3_64": f"{(i + 1) * 0x9e3779b97f4a7c15 % 2**64:016x}"} for i, name in
            enumerate(names)]


ADAM_GROUPS = [{"amsgrad": False, "betas": [0.9, 0.999], "eps": 1e-08, "lr": 0.005,
                "weight_decay": 0.0}]


def manifest_of(format_version=3, files=None, **fields):
    """A manifest of format 3 with write_checkpoint's keys in its order: one model, an Adam
    optimizer, a scheduler and a sampler."""
    manifest = {
        "format_version": format_version, "sequence": 4, "step": 200, "epoch": 1,
        "complete": False, "total_steps": 300, "metrics": {"loss": 0.013844713568687439},
        "metadata": {}, "settings": {"batch_size": 64, "lr": 0.01},
        "models": {"model": {"file": "model.safetensors"}},
        "optimizers": {"optimizer": {"kind": "adam", "file": "optimizer.safetensors",
                                     "param_groups": ADAM_GROUPS,
                                     "parameters": ["0.weight", "0.bias", "2.weight", "2.bias"]}},
        "schedulers": {"scheduler": {"step_count": 200}},
        "samplers": {"sampler": {"consumed": 64, "epoch": 1, "seed": 0, "shuffle": True,
                                 "size": 60000}},
        "libtorch_version": "1.13.0", "created_unix_s": 1796582073,
        "files": files_of("model.safetensors", "optimizer.safetensors", "extra.safetensors")
        if files is None else files}
    manifest.update(fields)
    return manifest


def manifest_of_format2(optimizer="adam", files=None, **fields):
    """A manifest of format 2, as the writer before format 3 wrote it."""
    manifest = {"format_version": 2, "sequence": 4, "step": 200, "epoch": 1,
                "metrics": {"loss": 0.013844713568687439}, "metadata": {},
                "optimizer": optimizer}
    if optimizer == "adam":
        manifest["optimizer_groups"] = ADAM_GROUPS
    manifest.update({"libtorch_version": "1.13.0", "created_unix_s": 1796582073,
                     "files": files_of("model.safetensors", "optimizer.safetensors",
                                       "extra.safetensors") if files is None else files})
    manifest.update(fields)
    return manifest


def manifest_seeds(checkpoints):
    write_manifest = lambda name, data: write("manifest", name, data)  # noqa: E731
    if checkpoints:
        for i, path in enumerate(sorted(Path(checkpoints).glob("*/manifest.json"))[:2]):
            text = path.read_bytes()
            manifest = json.loads(text)
            if sealed(manifest) != text:
                fail(f"{path} is not what this script would write for it: the checksum or the "
                     "dump(2) form here differs from write_checkpoint's")
            write_manifest(f"intact-saved-{i}", text)
        for path in sorted(Path(checkpoints).glob("*/*.safetensors"))[:3]:
            safetensors_seed(f"valid-saved-{path.stem}", path.read_bytes())

    write_manifest("intact-format3", sealed(manifest_of()))
    write_manifest("intact-format3-parts", sealed(manifest_of(
        complete=True, total_steps=200,
        models={"model": {"file": "model.safetensors"},
                "ema": {"file": "model.ema.safetensors"}},
        optimizers={"optimizer": {"kind": "sgd", "file": "optimizer.safetensors",
                                  "param_groups": [{"lr": 0.1, "momentum": 0.9}, {"lr": 0.01}],
                                  "parameters": ["w", ""]},
                    "custom": {"kind": "archive", "file": "optimizer.custom.pt",
                               "param_groups": [], "parameters": []}},
        schedulers={}, samplers={},
        files=files_of("model.safetensors", "model.ema.safetensors", "optimizer.safetensors",
                       "optimizer.custom.pt", "extra.safetensors"))))
    write_manifest("intact-format3-user-data", sealed(manifest_of(
        step=-1, epoch=-3, sequence=18446744073709551615,
        metrics={"loss": None, "accuracy": 0.5, "big": 1e300, "small": -1.5e-300},
        metadata={"run": "émoji \U0001f642", "nested": {"a": [1, 2, {"b": None}]},
                  "escapes": "\"\\\n\t\x01", "settings": {"old": 1}},
        settings={"exact": True, "name": "ünïcode", "list": [1, 2.5, "x"]})))
    write_manifest("intact-format2-adam", sealed(manifest_of_format2()))
    write_manifest("intact-format2-sgd", sealed(manifest_of_format2(optimizer="sgd")))
    write_manifest("intact-format2-archive", sealed(manifest_of_format2(
        optimizer="archive", files=files_of("model.safetensors", "extra.safetensors",
                                            "state.pt"))))
    write_manifest("intact-no-files", sealed(manifest_of_format2(files=[])))
    # Format 1: no checksum of its own, nlohmann's dump() (tests/checkpoint/test_format_v1.cpp).
    format1 = {"epoch": 2, "files": files_of("tensors.bin", "state.pt"), "format_version": 1,
               "metadata": {}, "metrics": None, "optimizer": "sgd", "sequence": 1, "step": 5}
    write_manifest("intact-format1", json.dumps(format1, separators=(",", ":")).encode())
    write_manifest("damaged-bom", b"\xef\xbb\xbf" + sealed(manifest_of()))
    write_manifest("newer-format99", sealed(manifest_of(format_version=99)))

    # Damage, one kind each.
    good = sealed(manifest_of())
    write_manifest("damaged-step-changed", good.replace(b'"step": 200', b'"step": 201'))
    write_manifest("damaged-version-bit", good.replace(b'"format_version": 3',
                                                       b'"format_version": 7'))
    write_manifest("damaged-no-checksum", (dump2(manifest_of()) + "\n").encode())
    write_manifest("damaged-checksum-number", dump2(
        dict(manifest_of(), manifest_xxh3_64=12345)).encode())
    write_manifest("damaged-checksum-first", dump2(
        dict({CHECKSUM_KEY: "0123456789abcdef"}, **manifest_of())).encode())
    write_manifest("damaged-checksum-uppercase", good[:-20] + good[-20:].upper())
    write_manifest("damaged-after-checksum", good + b" ")
    write_manifest("damaged-nul", good[:40] + b"\0" + good[40:])
    write_manifest("damaged-truncated", good[: len(good) // 2])
    write_manifest("damaged-not-object", b"[1, 2, 3]\n")
    write_manifest("damaged-invalid-utf8", good.replace(b"1.13.0", b"1.13\xff"))
    fields = {
        "version-0": {"format_version": 0},
        "version-string": {"format_version": "3"},
        "version-float": {"format_version": 3.0},
        "version-huge": {"format_version": 1000001},
        "sequence-negative": {"sequence": -4},
        "step-float": {"step": 200.5},
        "files-object": {"files": {"name": "model.safetensors"}},
        "complete-number": {"complete": 1},
        "no-total-steps": {"total_steps": None},
        "models-array": {"models": []},
        "model-unlisted-file": {"models": {"model": {"file": "other.safetensors"}}},
        "optimizer-no-kind": {"optimizers": {"optimizer": {"file": "optimizer.safetensors",
                                                           "param_groups": []}}},
        "optimizer-groups-numbers": {"optimizers": {"optimizer": {
            "kind": "adam", "file": "optimizer.safetensors", "param_groups": [1]}}},
        "scheduler-negative": {"schedulers": {"scheduler": {"step_count": -1}}},
    }
    for name, change in fields.items():
        write_manifest(f"damaged-{name}", sealed(dict(manifest_of(), **change)))
    names = {"parent": "../model.safetensors", "absolute": "/etc/passwd",
             "subdirectory": "a/model.safetensors", "dot": ".", "dotdot": "..", "empty": "",
             "nul": "model\0.safetensors"}
    for label, file_name in names.items():
        files = [{"name": file_name, "size": 1, "xxh3_64": "0000000000000000"}]
        write_manifest(f"damaged-name-{label}", sealed(manifest_of(files=files)))
    for label, file in {"size-negative": {"name": "x", "size": -1, "xxh3_64": "0"},
                        "size-float": {"name": "x", "size": 1.5, "xxh3_64": "0"},
                        "checksum-number": {"name": "x", "size": 1, "xxh3_64": 0},
                        "no-name": {"size": 1, "xxh3_64": "0"},
                        "not-object": "model.safetensors"}.items():
        write_manifest(f"damaged-file-{label}", sealed(manifest_of(files=[file])))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", help="a directory examples/checkpoint saved into")
    args = parser.parse_args()
    safetensors_seeds()
    manifest_seeds(args.checkpoints)
    for target in ("safetensors_header", "manifest"):
        print(f"{target}: {len(list((CORPUS / target).iterdir()))} files")


if __name__ == "__main__":
    main()
