"""The PyTorch side of bench_checkpoint_dcp (bench/checkpoint_dcp.cpp), run by it as a child with
the torch2 venv's Python: the same state as the C++ side (L Linear(4096, 4096) layers and SGD(lr
1e-3, momentum 0.9) after one step) and the same training step, saved with PyTorch's distributed
checkpoint (DCP), in one process without a process group.

  checkpoint_dcp.py serve LAYERS THREADS EVERY DIR
      Builds the state, makes one save of each kind (untimed), prints one line:
        ready <torch version> <state bytes> <bytes of a checkpoint directory> <configuration>
      then answers each line "round" on stdin with one line: for each contender, its name, the
      loop's seconds (2 EVERY steps), the seconds it was blocked per save (2 saves a round) and of
      those, the seconds waiting for the previous save and at the fence:
        none S 0 0 0 save S B W F async_save S B W F async_staged S B W F
  checkpoint_dcp.py memory LAYERS THREADS MODE DIR
      In this fresh process: the peak extra resident memory of 3 saves of MODE (save, async_save,
      async_staged) in 9 training steps (a save after steps 1, 4, 7, written during the next
      step and waited for at its end), over the process's memory once the state exists and over
      a training step's own peak; prints "memory <state bytes> <extra bytes>".

The contenders, each writing checkpoint_id=DIR/<kind>-<n> and keeping only the newest committed
directory (the one before it is removed once the new one is complete, as CheckpointGuard's
keep_last=1 does):
  save          dcp.save(state): blocked for the whole save, the removal of the previous one too.
  async_save    dcp.async_save(state) as its documentation shows it, defaults unchanged: the
                state is staged (copied into new CPU memory) on the caller's thread, written on a
                thread of its own. Blocked: the wait for the previous save's future (at most one
                in flight, as the documentation asks) + the async_save call.
  async_staged  dcp.async_save(state, async_stager=DefaultStager(StagingOptions(...)) with
                use_async_staging=True, the other options False (they need an accelerator), one
                stager for the run, so its CPU copy is reused: the copy too runs on a thread,
                and the loop waits for staging_completion before optimizer.step() (the
                counterpart of CheckpointGuard's before_optimizer_step()). Blocked: that wait +
                the wait for the previous upload + the async_save call.
`state` is {"model": ..., "optim": ...} from torch.distributed.checkpoint.state_dict's
get_state_dict(model, optimizer), taken at each save (inside the blocked time).
"""
import inspect
import os
import shutil
import sys
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

# dcp.save warns at every call that no process group is initialized: that is this benchmark's
# intent (one process), said once in the configuration line instead.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

MODES = ("save", "async_save", "async_staged")


class State:
    """The module, its optimizer and the batch: what bench/checkpoint_dcp.cpp's State builds."""

    def __init__(self, layers):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(layers)])
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.batch = torch.randn(8, 4096)
        self.step()  # the momentum buffers exist
        self.bytes = 2 * sum(p.numel() * p.element_size() for p in self.model.parameters())

    def step(self, fence=None):
        """One training step; `fence` runs before the optimizer steps."""
        self.optimizer.zero_grad()
        torch.nn.functional.mse_loss(self.model(self.batch), self.batch).backward()
        if fence:
            fence()
        self.optimizer.step()

    def state_dict(self):
        model, optim = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optim": optim}


def remove_when_done(future, directory):
    """Removes `directory` once `future` succeeds (on the writer's thread, as CheckpointGuard's
    retention runs on its writer's)."""
    if directory is None:
        return

    def remove(done):
        if done.exception() is None:
            shutil.rmtree(directory, ignore_errors=True)

    future.add_done_callback(remove)


class Saver:
    """One contender: save() after a training step, fence() before optimizer.step(), finish() at
    the end of a round (untimed). Keeps only the newest committed checkpoint directory."""

    def __init__(self, mode, state, directory):
        self.mode, self.state, self.directory = mode, state, directory
        self.count = 0
        self.waited = 0.0  # seconds waiting for the previous save, in save()
        self.newest = None  # the newest directory committed or in flight
        self.upload = None  # the save in flight
        self.staging = None  # its copy, while it runs (async_staged)
        self.stager = None
        if mode == "async_staged":
            # CPU only: no pinned or shared memory, no non-blocking copies (they need an
            # accelerator); the copy runs on the stager's thread.
            self.stager = DefaultStager(
                StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                               use_async_staging=True, use_non_blocking_copy=False))

    def save(self):
        if self.upload is not None:
            start = time.perf_counter()
            self.upload.result()  # at most one save in flight
            self.waited += time.perf_counter() - start
            self.upload = None
        self.count += 1
        directory = os.path.join(self.directory, f"{self.mode}-{self.count}")
        previous, self.newest = self.newest, directory
        if self.mode == "save":
            dcp.save(self.state.state_dict(), checkpoint_id=directory)
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
        elif self.mode == "async_save":
            self.upload = dcp.async_save(self.state.state_dict(), checkpoint_id=directory)
            remove_when_done(self.upload, previous)
        else:
            response = dcp.async_save(self.state.state_dict(), checkpoint_id=directory,
                                      async_stager=self.stager)
            self.staging, self.upload = response.staging_completion, response.upload_completion
            remove_when_done(self.upload, previous)

    def fence(self):
        if self.staging is not None:
            self.staging.result()
            self.staging = None

    def finish(self):
        self.fence()
        if self.upload is not None:
            self.upload.result()
            self.upload = None

    def close(self):
        self.finish()
        if self.stager is not None:
            self.stager.close()


def directory_bytes(directory):
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(directory) for name in names)


def configuration():
    """What async_save and save do here, read from this torch's own signatures."""
    writer = inspect.signature(dcp.FileSystemWriter.__init__).parameters
    checkpointer = inspect.signature(dcp.async_save).parameters["async_checkpointer_type"]
    return ("no process group (single-process, no_dist); FileSystemWriter defaults: "
            f"sync_files={writer['sync_files'].default} "
            f"thread_count={writer['thread_count'].default} "
            f"single_file_per_rank={writer['single_file_per_rank'].default}; async_save: "
            f"async_checkpointer_type={checkpointer.default.name}, the default stager "
            "(DefaultStager, staging on the caller's thread into new CPU memory)")


def round_figures(state, savers, every):
    """One round of each contender: 2*every steps, a save at every/2 and 3*every/2."""
    answer = []
    for mode in ("none",) + MODES:
        saver = savers.get(mode)
        os.sync()
        blocked = fenced = 0.0
        waited = saver.waited if saver else 0.0
        start = time.perf_counter()
        for i in range(2 * every):
            if saver is None:
                state.step()
                continue

            def fence():
                nonlocal fenced
                t = time.perf_counter()
                saver.fence()
                fenced += time.perf_counter() - t

            state.step(fence)
            if (i + 1 + every // 2) % every == 0:
                t = time.perf_counter()
                saver.save()
                blocked += time.perf_counter() - t
        seconds = time.perf_counter() - start
        waited = saver.waited - waited if saver else 0.0
        if saver is not None:
            saver.finish()  # untimed: the last write ended inside the round anyway
        answer += [mode] + [f"{x:.6f}" for x in (seconds, (blocked + fenced) / 2, waited / 2,
                                                  fenced / 2)]
    return " ".join(answer)


def serve(layers, every, directory):
    state = State(layers)
    savers = {mode: Saver(mode, state, directory) for mode in MODES}
    sizes = []
    for saver in savers.values():  # the first of each kind (imports, threads, the stager's copy)
        saver.save()
        saver.finish()
        sizes.append(directory_bytes(saver.newest))
    print("ready", torch.__version__, state.bytes, max(sizes), configuration(), flush=True)
    for line in sys.stdin:
        if line.strip() == "round":
            print(round_figures(state, savers, every), flush=True)
    for saver in savers.values():
        saver.close()


def status_bytes(key):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak():
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def memory(layers, mode, directory):
    """As bench/checkpoint_dcp.cpp's memory_figure measures CheckpointGuard's saves."""
    state = State(layers)
    base = status_bytes("VmRSS:")
    reset_peak()
    state.step()  # training's own transient peak is not the checkpoints' doing
    training_peak = status_bytes("VmHWM:") - base
    reset_peak()
    saver = Saver(mode, state, directory)
    for i in range(9):
        state.step(saver.fence)
        if i % 3 == 0:
            saver.save()  # written during the next step
        elif i % 3 == 1:
            # Done before the next save, as in the loop, where saves are N steps apart: async_save
            # releases its copy in a callback that runs after its future's result() returns.
            saver.finish()
    saver.close()
    extra = status_bytes("VmHWM:") - base - training_peak
    print("memory", state.bytes, extra, flush=True)


def main(argv):
    if len(argv) != 6 or argv[1] not in ("serve", "memory"):
        sys.exit(__doc__)
    command, layers, threads, arg, directory = argv[1], int(argv[2]), int(argv[3]), argv[4], argv[5]
    torch.set_num_threads(threads)
    os.makedirs(directory, exist_ok=True)
    if command == "serve":
        serve(layers, int(arg), directory)
    else:
        memory(layers, arg, directory)


if __name__ == "__main__":
    main(sys.argv)
