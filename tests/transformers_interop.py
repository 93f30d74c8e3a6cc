"""The Python side of the sharded state_dict interop test (tests/checkpoint/test_sharded.cpp,
[state_dict][interop]): the real transformers and huggingface_hub packages, run by the C++ test.

  transformers_interop.py write DIR        a small GPT-2 initialised at random (seeded; nothing
                                           downloaded): DIR/hf is its save_pretrained with
                                           max_shard_size="20KB" (several shards),
                                           DIR/reference.safetensors its state_dict in one file,
                                           DIR/order.txt the state_dict's keys in its order
  transformers_interop.py check DIR LIMIT  DIR/cpp (written by C++ with max_shard_size=LIMIT, with
                                           DIR/hf's config.json) loads with
                                           AutoModel.from_pretrained, every tensor bitwise the
                                           reference's; its files, index and split are what
                                           huggingface_hub makes of the same tensors and limit
  transformers_interop.py serve DIR LIMIT  both in one interpreter (importing transformers takes
                                           seconds): write, create DIR/written, wait for C++ to
                                           create DIR/cpp_written (or DIR/cpp_failed: stop), check
"""
import os
import sys

# Nothing from the network, no progress bars, no advice: the C++ test prints what fails.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def fail(message):
    print(f"transformers_interop.py: {message}", file=sys.stderr)
    sys.exit(1)


def same_bits(a, b):
    return (a.dtype == b.dtype and a.shape == b.shape and
            torch.equal(a.contiguous().flatten().view(torch.uint8),
                        b.contiguous().flatten().view(torch.uint8)))


def write(directory):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2Model(config)
    model.save_pretrained(f"{directory}/hf", max_shard_size="20KB")
    state = model.state_dict()
    save_file(state, f"{directory}/reference.safetensors", metadata={"format": "pt"})
    with open(f"{directory}/order.txt", "w") as f:
        f.write("".join(f"{name}\n" for name in state))
    shards = [name for name in os.listdir(f"{directory}/hf") if name.endswith(".safetensors")]
    if len(shards) < 3:
        fail(f"save_pretrained wrote {shards}: not several shards")


def check(directory, limit):
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import AutoModel

    cpp = f"{directory}/cpp"
    reference = load_file(f"{directory}/reference.safetensors")
    model, info = AutoModel.from_pretrained(cpp, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if info.get(kind):
            fail(f"from_pretrained: {kind} {info[kind]}")
    loaded = model.state_dict()
    if sorted(loaded) != sorted(reference):
        fail(f"keys {sorted(loaded)} != {sorted(reference)}")
    for name, tensor in reference.items():
        if not same_bits(loaded[name], tensor):
            fail(f"{name}: {loaded[name].dtype} {tuple(loaded[name].shape)} differs from "
                 f"{tensor.dtype} {tuple(tensor.shape)}")

    # huggingface_hub's split of the same tensors in C++'s order (a TensorMap's: by name), each
    # with a storage of its own as C++'s are.
    tensors = {name: reference[name].clone() for name in sorted(reference)}
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=limit)
    if not split.is_sharded:
        fail(f"the limit {limit} gives one shard: nothing compared")
    written = sorted(name for name in os.listdir(cpp) if name.endswith(".safetensors"))
    if written != sorted(split.filename_to_tensors):
        fail(f"C++ wrote {written}, huggingface_hub would write {sorted(split.filename_to_tensors)}")
    index_path = f"{cpp}/model.safetensors.index.json"
    with open(index_path, encoding="utf-8") as f:
        text = f.read()
    index = json.loads(text)
    if index["weight_map"] != split.tensor_to_filename:
        fail(f"weight_map {index['weight_map']} != huggingface_hub's {split.tensor_to_filename}")
    if index["metadata"]["total_size"] != split.metadata["total_size"]:
        fail(f"total_size {index['metadata']['total_size']} != {split.metadata['total_size']}")
    if text != json.dumps(index, indent=2, sort_keys=True) + "\n":
        fail("the index is not formatted as transformers' save_pretrained writes it")
    save_id = index["metadata"]["torchguard_save_id"]
    for filename, names in split.filename_to_tensors.items():
        with safe_open(f"{cpp}/{filename}", "pt") as f:
            if sorted(f.keys()) != sorted(names):
                fail(f"{filename} holds {sorted(f.keys())}, not {sorted(names)}")
            metadata = f.metadata()
            if metadata.get("format") != "pt" or metadata.get("torchguard_save_id") != save_id:
                fail(f"{filename}'s metadata {metadata}")


def serve(directory, limit):
    write(directory)
    open(f"{directory}/written", "w").close()
    deadline = time.monotonic() + 150
    while not os.path.exists(f"{directory}/cpp_written"):
        if os.path.exists(f"{directory}/cpp_failed") or time.monotonic() > deadline:
            fail("C++ did not write its part")
        time.sleep(0.02)
    check(directory, limit)


if __name__ == "__main__":
    command, target = sys.argv[1], sys.argv[2]
    if command == "write":
        write(target)
    elif command == "check":
        check(target, int(sys.argv[3]))
    elif command == "serve":
        serve(target, int(sys.argv[3]))
    else:
        fail(f"unknown command {command}")
    print("ok")
