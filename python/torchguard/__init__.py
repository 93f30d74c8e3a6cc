"""torchguard's checkpoints in Python: a training run crosses between C++ and Python.

    import torchguard
    ckpt = torchguard.load("run/checkpoints")       # the newest intact checkpoint (verified)
    model.load_state_dict(ckpt.models["model"])
    ckpt.load_optimizer("optimizer", optimizer)     # PyTorch's own layout, settings included
    ckpt.load_scheduler("scheduler", scheduler)
    ckpt.restore_rng()                              # dropout and the rest draw as C++ would have
    sampler = ckpt.sampler("train")                 # the same order, the same place in the epoch
    ... train from ckpt.step ...
    torchguard.save("run/checkpoints", step=step, epoch=sampler.epoch,
                    models={"model": model}, optimizers={"optimizer": optimizer},
                    schedulers={"scheduler": scheduler}, samplers={"train": sampler})

load() verifies each file against the manifest (sizes, XXH3-64, the manifest's own checksum) as
C++'s CheckpointGuard does, and falls back past a damaged checkpoint. save() writes what
CheckpointGuard restores: the same files, the same commit (a temporary directory, fsync, the
manifest last, an atomic rename, a directory fsync), under the same lock a running C++ job holds;
it never deletes a checkpoint.
"""
import os
import time
import warnings

import torch
from safetensors.torch import load as _load_safetensors
from safetensors.torch import save as _save_safetensors

from . import _format, _optim, optim
from ._errors import (CheckpointError, DirectoryInUseError, NoValidCheckpointError,
                      UnsupportedOptimizerError)
from ._sampler import ResumableSampler, permutation

__all__ = ["load", "save", "Checkpoint", "CheckpointDirectory", "ResumableSampler", "optim",
           "permutation", "CheckpointError", "NoValidCheckpointError", "DirectoryInUseError",
           "UnsupportedOptimizerError"]
__version__ = "0.3.0"


def _tensors(data, file_name):
    try:
        return _load_safetensors(data)
    except Exception as error:  # a dtype this torch lacks, or a file safetensors refuses
        raise CheckpointError(f"{file_name}: {error} (a dtype this PyTorch {torch.__version__} has "
                              "no tensor for?)") from error


def _part_tensors(contents, record):
    """A part's tensors: its file's and, in format 4, its shared file's (what did not change since
    an earlier checkpoint)."""
    tensors = _tensors(contents[record["file"]], record["file"])
    shared = record.get("shared_file")
    if shared:
        for key, value in _tensors(contents[shared], shared).items():
            if key in tensors:
                raise CheckpointError(f"{record['file']} and {shared} both hold '{key}'")
            tensors[key] = value
    return tensors


def _model_file(name):
    return "model.safetensors" if name == "model" else f"model.{name}.safetensors"


def _optimizer_file(name):
    return "optimizer.safetensors" if name == "optimizer" else f"optimizer.{name}.safetensors"


class Checkpoint:
    """One checkpoint's parts, as C++'s CheckpointGuard saved them.

    models      {name: state_dict}, for model.load_state_dict()
    optimizers  {name: PyTorch optimizer state_dict}, for optimizer.load_state_dict()
    unsupported {name: UnsupportedOptimizerError}: optimizers Python cannot rebuild (load_optimizer()
                raises it; the rest of the checkpoint reads)
    schedulers  {name: {"step_count": n}} (LibTorch's count; load_scheduler() maps it)
    samplers    {name: state}, for ResumableSampler(..., state=...) or sampler(name)
    tensors     {name: tensor} (CheckpointOptions::tensors)
    step, epoch, complete, total_steps, metrics, metadata, settings, path, manifest
    """

    def __init__(self, path, manifest, contents):
        self.path = path
        self.manifest = manifest
        self._optimizer_records = {}  # name -> (manifest record, its file's tensors)
        self.step = manifest["step"]
        self.epoch = manifest["epoch"]
        self.sequence = manifest["sequence"]
        self.complete = bool(manifest.get("complete", False))
        self.total_steps = manifest.get("total_steps", 0)
        self.metrics = manifest.get("metrics") or {}
        self.metadata = manifest.get("metadata") or {}
        self.settings = manifest.get("settings") or self.metadata.get("settings") or {}
        extra = _tensors(contents["extra.safetensors"], "extra.safetensors")
        self.rng_cpu = extra.get("rng.cpu")
        self.rng_cuda = [extra[key] for key in sorted(k for k in extra if k.startswith("rng.cuda."))]
        self.tensors = {key[len("tensors."):]: value for key, value in extra.items()
                        if key.startswith("tensors.")}
        self.models, self.optimizers, self.schedulers, self.samplers = {}, {}, {}, {}
        if manifest["format_version"] >= 3:  # 4: a part may have a shared file too
            for name, record in manifest["models"].items():
                self.models[name] = _part_tensors(contents, record)
            for name, record in manifest["optimizers"].items():
                tensors = {} if record.get("kind") == "archive" else _part_tensors(contents, record)
                self._optimizer_records[name] = (record, tensors)
            self.schedulers = {name: dict(record) for name, record in manifest["schedulers"].items()}
            self.samplers = {name: dict(record) for name, record in manifest["samplers"].items()}
        else:  # format 2: one model and one optimizer; options.modules and the scheduler in extra
            self.models["model"] = _tensors(contents["model.safetensors"], "model.safetensors")
            for key, value in extra.items():
                if key.startswith("modules."):
                    module, _, parameter = key[len("modules."):].partition(".")
                    self.models.setdefault(module, {})[parameter] = value
            kind = manifest.get("optimizer", "")
            if kind:
                # Format 2 kept no "params" lists: load_optimizer() takes them from the optimizer.
                record = {"kind": kind, "file": "state.pt" if kind == "archive" else
                          "optimizer.safetensors",
                          "param_groups": manifest.get("optimizer_groups", [])}
                tensors = ({} if kind == "archive" else
                           _tensors(contents["optimizer.safetensors"], "optimizer.safetensors"))
                self._optimizer_records["optimizer"] = (record, tensors)
            if "scheduler.step_count" in extra:
                self.schedulers["scheduler"] = {"step_count": int(extra["scheduler.step_count"])}
        self.unsupported = {}  # name -> why Python cannot rebuild that optimizer
        for name, (record, tensors) in self._optimizer_records.items():
            try:
                self.optimizers[name] = _optim.to_pytorch(name, record, tensors)
            except UnsupportedOptimizerError as error:
                self.unsupported[name] = error

    def load_optimizer(self, name, optimizer):
        """Loads optimizer `name` into a PyTorch optimizer of the same kind: its per-parameter
        state and each group's settings (lr, betas, ...); the settings Python has and LibTorch
        does not (foreach, ...) stay the optimizer's own."""
        if name in self.unsupported:
            raise self.unsupported[name]
        if name not in self._optimizer_records:
            raise CheckpointError(f"'{self.path}' holds no optimizer '{name}' (it holds "
                                  f"{sorted(self._optimizer_records) or 'none'})")
        record, tensors = self._optimizer_records[name]
        saved = _optim.to_pytorch(name, record, tensors)
        kind = _optim.kind_of(optimizer)
        if kind != record["kind"]:
            raise UnsupportedOptimizerError(f"optimizer '{name}' is {record['kind']} in the "
                                            f"checkpoint, {kind} here")
        current = optimizer.state_dict()
        if len(current["param_groups"]) != len(saved["param_groups"]):
            raise CheckpointError(f"optimizer '{name}' has {len(saved['param_groups'])} groups in "
                                  f"the checkpoint, {len(current['param_groups'])} here")
        groups = [{**mine, **theirs} for mine, theirs in zip(current["param_groups"],
                                                                saved["param_groups"])]
        optimizer.load_state_dict({"state": saved["state"], "param_groups": groups})

    def load_scheduler(self, name, scheduler):
        """Puts LibTorch's step count into a PyTorch scheduler. LibTorch's schedulers apply a
        change one step() later than PyTorch's (StepLR(3): C++ lowers the rate at its 4th call,
        Python at its 3rd): last_epoch = count - 1 makes the schedule go on as the run began."""
        if name not in self.schedulers:
            raise CheckpointError(f"'{self.path}' holds no scheduler '{name}'")
        count = int(self.schedulers[name]["step_count"])
        scheduler.last_epoch = count - 1
        scheduler._step_count = count
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    def restore_rng(self):
        """The CPU (and CUDA) generators as they were: dropout and data draws go on as they would
        have in the run that saved this."""
        if self.rng_cpu is not None:
            torch.set_rng_state(self.rng_cpu)
        if self.rng_cuda and torch.cuda.is_available():
            for index, state in enumerate(self.rng_cuda[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, index)

    def sampler(self, name, size=None):
        """A ResumableSampler at sampler `name`'s saved place."""
        if name not in self.samplers:
            raise CheckpointError(f"'{self.path}' holds no sampler '{name}'")
        state = self.samplers[name]
        return ResumableSampler(state["size"] if size is None else size, state["seed"],
                                state["shuffle"], state=state)

    def __repr__(self):
        return (f"Checkpoint('{self.path}', step={self.step}, epoch={self.epoch}, "
                f"models={sorted(self.models)}, optimizers={sorted(self.optimizers)})")


def _checkpoints_directory(path):
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, _format.MANIFEST)):
        return os.path.dirname(os.path.abspath(path)), os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")) and not _format.committed(path):
        return os.path.join(path, "checkpoints"), None
    return path, None


def load(path, restore="latest", quarantine=False):
    """The checkpoint to resume from, verified: `path` is a checkpoint directory (ckpt-...), the
    checkpoints' directory, or a run directory holding checkpoints/. `restore` is "latest" (the
    newest intact one, past damaged ones, with a warning), a step or a checkpoint's name (that one,
    or NoValidCheckpointError). With `quarantine`, damaged checkpoints are moved to quarantine/ as
    C++ moves them (do it only where no C++ job runs). Returns None when there is no checkpoint."""
    directory, single = _checkpoints_directory(path)
    if single is not None:
        manifest, contents, problem = _format.read_checkpoint(single)
        if manifest is None:
            raise NoValidCheckpointError(f"checkpoint '{single}' is damaged: {problem}")
        return Checkpoint(single, manifest, contents)
    candidates = _format.committed(directory)
    if restore not in ("latest", "", None):
        wanted = [c for c in candidates if os.path.basename(c) == str(restore) or
                  os.path.basename(c).endswith(f"-step-{restore}")]
        if not wanted:
            raise NoValidCheckpointError(
                f"no checkpoint '{restore}' in '{directory}' (there are: "
                f"{', '.join(os.path.basename(c) for c in candidates) or 'none'})")
        candidates = wanted[-1:]
    damaged = 0
    for candidate in reversed(candidates):
        manifest, contents, problem = _format.read_checkpoint(candidate)
        if manifest is not None:
            return Checkpoint(candidate, manifest, contents)
        damaged += 1
        warnings.warn(f"torchguard: checkpoint '{candidate}' is damaged: {problem}; "
                      "trying the one before it", stacklevel=2)
        if quarantine:
            aside = os.path.join(directory, "quarantine")
            os.makedirs(aside, exist_ok=True)
            target = os.path.join(aside, os.path.basename(candidate))
            os.rename(candidate, target)
            with open(os.path.join(target, "QUARANTINE_REASON.txt"), "w") as note:
                note.write(problem + "\n")
    if damaged:
        raise NoValidCheckpointError(f"no valid checkpoint in '{directory}' ({damaged} damaged)")
    return None


def _model_parameter_names(models):
    names = {}
    for model_name, model in models.items():
        for parameter_name, parameter in model.named_parameters():
            names[id(parameter)] = f"{model_name}/{parameter_name}"
    return names


def save(directory, step, epoch=0, models=None, optimizers=None, schedulers=None, samplers=None,
         tensors=None, metrics=None, metadata=None, settings=None, complete=False,
         total_steps=0, rng=True):
    """Commits a checkpoint that C++'s CheckpointGuard restores, with the parts under the names
    the C++ program registers them by. Takes the directory's lock for the save (a running C++
    job on it: DirectoryInUseError). Returns its path."""
    os.makedirs(directory, exist_ok=True)
    with _format.DirectoryLock(directory):
        return _save_locked(directory, step, epoch, models or {}, optimizers or {},
                            schedulers or {}, samplers or {}, tensors or {}, metrics or {},
                            metadata or {}, settings or {}, complete, total_steps, rng)


def _save_locked(directory, step, epoch, models, optimizers, schedulers, samplers, tensors,
                 metrics, metadata, settings, complete, total_steps, rng):
    files, parts = {}, {"models": {}, "optimizers": {}, "schedulers": {}, "samplers": {}}
    for name, model in models.items():
        state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
        files[_model_file(name)] = _save_safetensors(state, {"format": "pt"})
        parts["models"][name] = {"file": _model_file(name)}
    names = _model_parameter_names(models)
    for name, optimizer in optimizers.items():
        kind, state, groups = _optim.from_pytorch(name, optimizer)
        files[_optimizer_file(name)] = _save_safetensors(state, {"format": "pt"})
        parameters = [names.get(id(p), "") for group in optimizer.param_groups
                      for p in group["params"]]
        parts["optimizers"][name] = {"kind": kind, "file": _optimizer_file(name),
                                     "param_groups": groups, "parameters": parameters}
    for name, scheduler in schedulers.items():
        # LibTorch counts step() calls; PyTorch's last_epoch counts one less (load_scheduler()).
        parts["schedulers"][name] = {"step_count": int(scheduler.last_epoch) + 1}
    for name, sampler in samplers.items():
        parts["samplers"][name] = sampler.checkpoint_state()
    extra = {f"tensors.{name}": tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    if rng:
        extra["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                extra[f"rng.cuda.{index}"] = torch.cuda.get_rng_state(index)
    files["extra.safetensors"] = _save_safetensors(extra)
    manifest = {"epoch": epoch, "complete": bool(complete), "total_steps": int(total_steps),
                "metrics": metrics, "metadata": metadata, "settings": settings, **parts,
                "libtorch_version": torch.__version__, "created_unix_s": int(time.time())}
    sequence = _format.highest_sequence(directory) + 1
    return _format.commit(directory, sequence, step, files, manifest)


class CheckpointDirectory:
    """A checkpoint directory held for a whole run, as a C++ CheckpointGuard holds it: the lock is
    taken on entry (DirectoryInUseError if a C++ job holds it) and kept until exit.

        with torchguard.CheckpointDirectory("run/checkpoints") as checkpoints:
            ckpt = checkpoints.load()          # None for a fresh start
            ...
            checkpoints.save(step=step, models=..., optimizers=...)
    """

    def __init__(self, directory):
        self.directory = os.fspath(directory)

    def __enter__(self):
        os.makedirs(self.directory, exist_ok=True)
        self._lock = _format.DirectoryLock(self.directory)
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def load(self, restore="latest"):
        return load(self.directory, restore=restore, quarantine=True)

    def save(self, step, **parts):
        return _save_locked(self.directory, step, parts.pop("epoch", 0), parts.pop("models", {}),
                            parts.pop("optimizers", {}), parts.pop("schedulers", {}),
                            parts.pop("samplers", {}), parts.pop("tensors", {}),
                            parts.pop("metrics", {}), parts.pop("metadata", {}),
                            parts.pop("settings", {}), parts.pop("complete", False),
                            parts.pop("total_steps", 0), parts.pop("rng", True))
