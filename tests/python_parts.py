"""The Python side of the [python] tests (tests/checkpoint/test_guard_parts.cpp): the same small run as
the C++ side (train_parts there), step for step, through torchguard's Python package.

  python_parts.py train DIR STEPS KIND_A KIND_B   resume from DIR's newest checkpoint (or start),
                                                   train up to STEPS, save
  python_parts.py compare DIR DIR                  the newest checkpoints' models and optimizer
                                                   states: prints the largest difference, exits 1
                                                   when one is not bitwise equal
  python_parts.py permutation SIZE SEED EPOCH      ResumableSampler's order, one index a line
  python_parts.py describe DIR                     loads DIR's newest checkpoint: its step, or
                                                   the error (type: message), warnings included
  python_parts.py save DIR                         saves a checkpoint of one model into DIR, or
                                                   prints the error (type: message)

The run: two models ("encoder" with dropout, "head"), an optimizer of kind KIND_A on the encoder
with a StepLR schedule, one of kind KIND_B on the head, a ResumableSampler ("train") over 256
samples in batches of 16, the data in DIR/data.safetensors (written by the C++ side).
"""
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import torchguard


def models():
    torch.manual_seed(3)
    encoder = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                  torch.nn.Linear(16, 4))
    head = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return encoder, head


def optimizer(kind, parameters):
    return {
        "sgd": lambda: torch.optim.SGD(parameters, lr=0.05, momentum=0.9, nesterov=True),
        # LibTorch's arithmetic (python/torchguard/optim.py): PyTorch 2.x's own differs in a bit
        "adam": lambda: torchguard.optim.Adam(parameters, lr=0.01, betas=(0.8, 0.99)),
        "adamw": lambda: torchguard.optim.AdamW(parameters, lr=0.01, weight_decay=0.05),
        "rmsprop": lambda: torch.optim.RMSprop(parameters, lr=0.01, momentum=0.5, centered=True),
        "adagrad": lambda: torch.optim.Adagrad(parameters, lr=0.05),
    }[kind]()


def train(directory, steps, kind_a, kind_b):
    torch.set_num_threads(1)
    data = load_file(f"{directory}/data.safetensors")
    x, y = data["x"], data["y"]
    encoder, head = models()
    opt_a, opt_b = optimizer(kind_a, encoder.parameters()), optimizer(kind_b, head.parameters())
    schedule = torch.optim.lr_scheduler.StepLR(opt_a, step_size=3, gamma=0.5)
    sampler = torchguard.ResumableSampler(len(y), seed=7)
    with torchguard.CheckpointDirectory(f"{directory}/checkpoints") as checkpoints:
        checkpoint = checkpoints.load()
        step = 0
        if checkpoint is not None:
            encoder.load_state_dict(checkpoint.models["encoder"])
            head.load_state_dict(checkpoint.models["head"])
            checkpoint.load_optimizer("encoder", opt_a)
            checkpoint.load_optimizer("head", opt_b)
            checkpoint.load_scheduler("encoder", schedule)
            checkpoint.restore_rng()
            sampler.load_checkpoint_state(checkpoint.samplers["train"])
            step = checkpoint.step
        while step < steps:
            left = torch.tensor(sampler.remaining())
            batch = left[:16]
            opt_a.zero_grad()
            opt_b.zero_grad()
            loss = F.mse_loss(head(encoder(x.index_select(0, batch))), y.index_select(0, batch))
            loss.backward()
            opt_a.step()
            opt_b.step()
            schedule.step()
            if len(batch) == len(left):
                sampler.next_epoch()
            else:
                sampler.consume(len(batch))
            step += 1
        checkpoints.save(step, epoch=sampler.epoch, models={"encoder": encoder, "head": head},
                         optimizers={"encoder": opt_a, "head": opt_b},
                         schedulers={"encoder": schedule}, samplers={"train": sampler})


def compare(first, second):
    a, b = torchguard.load(first), torchguard.load(second)
    worst, equal = 0.0, True
    pairs = [(f"model {name}: {key}", a.models[name][key], b.models[name][key])
             for name in a.models for key in a.models[name]]
    for name in a.optimizers:
        for index, fields in a.optimizers[name]["state"].items():
            for field, tensor in fields.items():
                pairs.append((f"optimizer {name}: state {index} {field}", tensor,
                              b.optimizers[name]["state"][index][field]))
        pairs.append((f"optimizer {name}: param_groups", torch.tensor(0.0), torch.tensor(
            0.0 if a.optimizers[name]["param_groups"] == b.optimizers[name]["param_groups"] else 1.0)))
    for what, left, right in pairs:
        if not torch.equal(left, right):
            equal = False
            difference = (left.double() - right.double()).abs().max().item()
            worst = max(worst, difference)
            print(f"differs: {what}: {difference:.3g}")
    print(f"largest difference {worst:.3g} (torch {torch.__version__})")
    sys.exit(0 if equal else 1)


def describe(directory):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            checkpoint = torchguard.load(directory)
            print(f"step {checkpoint.step}, models {sorted(checkpoint.models)}, "
                  f"optimizers {sorted(checkpoint.optimizers)}")
            for name, error in checkpoint.unsupported.items():
                print(f"optimizer '{name}': {type(error).__name__}: {error}")
        except torchguard.CheckpointError as error:
            print(f"{type(error).__name__}: {error}")
    for warning in caught:
        print(f"warning: {warning.message}")


def save_one(directory):
    try:
        torchguard.save(directory, step=1, models={"model": torch.nn.Linear(2, 2)})
        print("saved")
    except torchguard.CheckpointError as error:
        print(f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "train":
        train(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    elif command == "compare":
        compare(sys.argv[2], sys.argv[3])
    elif command == "describe":
        describe(sys.argv[2])
    elif command == "save":
        save_one(sys.argv[2])
    elif command == "permutation":
        for index in torchguard.permutation(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])):
            print(index)
