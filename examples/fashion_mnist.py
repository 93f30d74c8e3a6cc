"""The training demo's model in Python: the same nn.Module names as examples/fashion_mnist_model.hpp,
so the demo's checkpoints load into it and its weights load into the demo; and the demo's
training loop, so that a run goes on in Python from the demo's checkpoint, and back.

  python fashion_mnist.py evaluate RUN_DIR/checkpoints [--samples N]
      the newest checkpoint's model.safetensors, evaluated on the Fashion-MNIST test set
  python fashion_mnist.py init FILE.safetensors [--seed S]
      initial weights for train_fashion_mnist --init-from FILE.safetensors
  python fashion_mnist.py train RUN_DIR [--max-steps N --batch-size B --lr L --seed S ...]
      train_fashion_mnist's loop in Python (the torchguard package, python/): resumes from the
      newest checkpoint in RUN_DIR/checkpoints, whichever language wrote it, with the batches the
      demo would have drawn, and saves checkpoints the demo resumes from
"""
import argparse
import gzip
import math
import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

DATA = pathlib.Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
MEAN, STD = 0.2860, 0.3530  # as examples/fashion_mnist.hpp normalizes


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = torch.nn.Linear(64 * 7 * 7, 128)
        self.fc2 = torch.nn.Linear(128, 10)
        self.dropout = torch.nn.Dropout(0.25)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = self.dropout(torch.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)


def test_set(samples):
    """The first `samples` test images, normalized, and their labels (IDX files: 16- and 8-byte headers)."""
    images = gzip.open(DATA / "t10k-images-idx3-ubyte.gz").read()[16:]
    labels = gzip.open(DATA / "t10k-labels-idx1-ubyte.gz").read()[8:]
    x = torch.frombuffer(bytearray(images), dtype=torch.uint8).view(-1, 1, 28, 28)[:samples]
    y = torch.frombuffer(bytearray(labels), dtype=torch.uint8)[:samples].long()
    return (x.float() / 255 - MEAN) / STD, y


def train_set():
    """The training images and labels, normalized as examples/fashion_mnist.hpp does."""
    images = gzip.open(DATA / "train-images-idx3-ubyte.gz").read()[16:]
    labels = gzip.open(DATA / "train-labels-idx1-ubyte.gz").read()[8:]
    x = torch.frombuffer(bytearray(images), dtype=torch.uint8).view(-1, 1, 28, 28)
    y = torch.frombuffer(bytearray(labels), dtype=torch.uint8).long()
    return x.float().div_(255.0).sub_(MEAN).div_(STD), y


def settings_of(args):
    """The settings the demo records (fashion_mnist::run_settings), by flag."""
    return {"--batch-size": args.batch_size, "--seed": args.seed, "--threads": args.threads,
            "world size": 1, "--lr": args.lr, "--epochs": args.epochs,
            "--max-steps": args.max_steps}


EXACT = ["--batch-size", "--seed", "--threads", "world size"]


def train(run_dir, args):
    """train_fashion_mnist's loop, step for step: the sampler's remaining order cut into batches,
    Adam, the checkpoint's parts under the demo's names ("model", "optimizer", "train")."""
    import torchguard  # the package in python/ (pip install ./python)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = Net()
    # LibTorch's Adam arithmetic (torchguard.optim): with PyTorch 2.x's own Adam a crossing run
    # drifts from the one done in C++ alone (python/torchguard/optim.py says why).
    optimizer = torchguard.optim.Adam(model.parameters(), lr=args.lr)
    images, labels = train_set()
    samples = len(labels)
    steps_per_epoch = math.ceil(samples / args.batch_size)
    total = steps_per_epoch * args.epochs
    if args.max_steps > 0:
        total = min(total, args.max_steps)
    sampler = torchguard.ResumableSampler(samples, seed=args.seed)
    settings = settings_of(args)
    with torchguard.CheckpointDirectory(pathlib.Path(run_dir) / "checkpoints") as checkpoints:
        checkpoint = checkpoints.load()
        step = 0
        if checkpoint is not None:
            for key in EXACT:
                if key in checkpoint.settings and checkpoint.settings[key] != settings[key]:
                    raise SystemExit(f"error: {key} is {settings[key]} in this run but was "
                                     f"{checkpoint.settings[key]} in the run that wrote "
                                     f"{checkpoint.path}: resume with {checkpoint.settings[key]}")
            model.load_state_dict(checkpoint.models["model"])
            checkpoint.load_optimizer("optimizer", optimizer)
            checkpoint.restore_rng()
            sampler.load_checkpoint_state(checkpoint.samplers["train"])
            step = checkpoint.step
            print(f"resumed from step {step} ({pathlib.Path(checkpoint.path).name}, written by "
                  f"LibTorch {checkpoint.manifest.get('libtorch_version')})", flush=True)
        for group in optimizer.param_groups:
            group["lr"] = args.lr  # this run's --lr, as the demo does
        saved_at = step
        while step < total:
            left = torch.tensor(sampler.remaining())
            left_steps = math.ceil(len(left) / args.batch_size)
            for done in range(1, min(left_steps, total - step) + 1):
                indices = left[(done - 1) * args.batch_size:done * args.batch_size]
                optimizer.zero_grad()
                loss = F.cross_entropy(model(images.index_select(0, indices)),
                                       labels.index_select(0, indices))
                loss.backward()
                optimizer.step()
                if done == left_steps:
                    sampler.next_epoch()
                else:
                    sampler.consume(len(indices))
                step += 1
                if step == total or (args.checkpoint_every and step % args.checkpoint_every == 0):
                    checkpoints.save(step, epoch=sampler.epoch, models={"model": model},
                                     optimizers={"optimizer": optimizer},
                                     samplers={"train": sampler}, settings=settings,
                                     metrics={"loss": loss.item()}, complete=step == total,
                                     total_steps=total)
                    saved_at = step
        if saved_at != step:
            checkpoints.save(step, epoch=sampler.epoch, models={"model": model},
                             optimizers={"optimizer": optimizer}, samplers={"train": sampler},
                             settings=settings, complete=step >= total, total_steps=total)
    print(f"finished at step {step}; parameters {fingerprint(model)}")


def fingerprint(model):
    """examples/parameter_fingerprint.hpp's: XXH3-64 of every parameter's bytes, in order."""
    import xxhash

    data = b"".join(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                    for p in model.parameters())
    return xxhash.xxh3_64_hexdigest(data)


def evaluate(checkpoints, samples):
    newest = max(pathlib.Path(checkpoints).glob("ckpt-*"))  # ckpt-<sequence>-step-<step>
    model = Net()
    model.load_state_dict(load_file(newest / "model.safetensors"))
    model.eval()
    x, y = test_set(samples)
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).sum().item()
    print(f"{newest.name}: test accuracy {correct / len(y):.4f} on {len(y)} images")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["evaluate", "init", "train"])
    parser.add_argument("path")
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    args = parser.parse_args()
    if args.command == "evaluate":
        evaluate(args.path, args.samples)
    elif args.command == "train":
        args.seed = 1 if args.seed is None else args.seed
        train(args.path, args)
    else:
        torch.manual_seed(args.seed or 0)
        save_file(Net().state_dict(), args.path)
        print(f"wrote {args.path}")
