"""Optimizer state between C++'s files and PyTorch's optimizer.state_dict().

C++ (checkpoint/optimizer_state.hpp) writes a built-in optimizer's per-parameter state as tensors
named "state.<i>.<field>", i counting the parameters of every group in order, which are the keys
of Python's state_dict()["state"], and each group's settings under Python's names with its
"params" indices. The kinds both sides rebuild: SGD (momentum, nesterov), Adam, AdamW, RMSprop,
Adagrad. The one field that differs: "step", an int64 in C++, a float32 tensor in PyTorch.
"""
import torch

from ._errors import UnsupportedOptimizerError

# kind -> (class, settings C++ keeps (Python's names), per-parameter fields)
KINDS = {
    "sgd": (torch.optim.SGD, ["lr", "momentum", "dampening", "weight_decay", "nesterov"],
            ["momentum_buffer"]),
    "adam": (torch.optim.Adam, ["lr", "betas", "eps", "weight_decay", "amsgrad"],
             ["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
    "adamw": (torch.optim.AdamW, ["lr", "betas", "eps", "weight_decay", "amsgrad"],
              ["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
    "rmsprop": (torch.optim.RMSprop, ["lr", "alpha", "eps", "weight_decay", "momentum", "centered"],
                ["step", "square_avg", "momentum_buffer", "grad_avg"]),
    "adagrad": (torch.optim.Adagrad,
                ["lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"],
                ["step", "sum"]),
}
# Settings Python has and C++ does not: a value other than this cannot cross.
_PYTHON_ONLY = {"maximize": False, "differentiable": False, "capturable": False, "fused": None}


def kind_of(optimizer):
    """The C++ kind of a Python optimizer, or UnsupportedOptimizerError naming it."""
    for base in type(optimizer).__mro__:  # the nearest: AdamW derives from Adam in PyTorch 2.x
        for kind, (cls, _, _) in KINDS.items():
            if base is cls:
                return kind
    raise UnsupportedOptimizerError(
        f"optimizer {type(optimizer).__module__}.{type(optimizer).__name__} has no counterpart in "
        f"LibTorch that torchguard saves (it saves {', '.join(cls.__name__ for cls, _, _ in KINDS.values())})")


def to_pytorch(name, record, tensors):
    """The PyTorch state_dict of optimizer `name` from its manifest record and its file's tensors."""
    kind = record.get("kind")
    if kind == "archive":
        raise UnsupportedOptimizerError(
            f"optimizer '{name}' is a LibTorch optimizer that torchguard does not know: its state "
            f"is in LibTorch's archive format ({record.get('file')}), which Python cannot read; "
            f"use one of {', '.join(sorted(KINDS))} to cross between C++ and Python")
    if kind not in KINDS:
        raise UnsupportedOptimizerError(f"optimizer '{name}' is of kind '{kind}', which this "
                                        f"package does not know")
    fields = KINDS[kind][2]
    state = {}
    for key, tensor in tensors.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or parts[2] not in fields:
            raise UnsupportedOptimizerError(f"optimizer '{name}' ({kind}) holds '{key}', which is "
                                            f"not one of its fields")
        index, field = int(parts[1]), parts[2]
        if field == "step":
            tensor = torch.tensor(float(tensor.item()), dtype=torch.float32)
        state.setdefault(index, {})[field] = tensor.clone()
    groups = []
    for group in record["param_groups"]:
        groups.append({key: tuple(value) if key == "betas" else value
                       for key, value in group.items()})
    return {"state": state, "param_groups": groups}


def from_pytorch(name, optimizer):
    """(kind, {"state.<i>.<field>": tensor}, param_groups) of a Python optimizer, for C++."""
    kind = kind_of(optimizer)
    _, settings, fields = KINDS[kind]
    state_dict = optimizer.state_dict()
    groups = []
    for group in state_dict["param_groups"]:
        for key, plain in _PYTHON_ONLY.items():
            if key in group and group[key] not in (plain, None, False):
                raise UnsupportedOptimizerError(
                    f"optimizer '{name}' has {key}={group[key]!r}, which LibTorch's "
                    f"{KINDS[kind][0].__name__} does not have: C++ could not go on from it")
        if kind == "adam" and group.get("decoupled_weight_decay"):
            raise UnsupportedOptimizerError(
                f"optimizer '{name}' is an Adam with decoupled_weight_decay=True: that is AdamW; "
                "use torch.optim.AdamW, which crosses as LibTorch's AdamW")
        missing = [key for key in settings if key not in group]
        if missing:
            raise UnsupportedOptimizerError(f"optimizer '{name}' lacks the settings {missing}")
        saved = {key: (list(group[key]) if key == "betas" else group[key]) for key in settings}
        saved["params"] = list(group["params"])
        groups.append(saved)
    tensors = {}
    for index, fields_of in state_dict["state"].items():
        for field, value in fields_of.items():
            if field not in fields or value is None:
                continue
            if field == "step":
                value = torch.tensor(int(value.item() if torch.is_tensor(value) else value),
                                     dtype=torch.int64)
            tensors[f"state.{index}.{field}"] = value.detach().cpu().contiguous()
    return kind, tensors, groups
