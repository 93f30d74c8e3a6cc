"""The training demo's model in Python: the same nn.Module names as examples/fashion_mnist_model.hpp,
so the demo's checkpoints load into it and its weights load into the demo.

  python fashion_mnist.py evaluate RUN_DIR/checkpoints [--samples N]
      the newest checkpoint's model.safetensors, evaluated on the Fashion-MNIST test set
  python fashion_mnist.py init FILE.safetensors [--seed S]
      initial weights for train_fashion_mnist --init-from FILE.safetensors
"""
import argparse
import gzip
import pathlib

import torch
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
    parser.add_argument("command", choices=["evaluate", "init"])
    parser.add_argument("path")
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "evaluate":
        evaluate(args.path, args.samples)
    else:
        torch.manual_seed(args.seed)
        save_file(Net().state_dict(), args.path)
        print(f"wrote {args.path}")
