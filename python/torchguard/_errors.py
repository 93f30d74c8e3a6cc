"""The errors of torchguard's Python side; each says what to do."""


class CheckpointError(Exception):
    """A checkpoint cannot be read or written; the message names the file and the reason."""


class NoValidCheckpointError(CheckpointError):
    """Checkpoints exist but none is intact (or the one asked for is not there)."""


class DirectoryInUseError(CheckpointError):
    """Another run (a C++ job, or another Python process) holds the checkpoint directory's lock."""


class UnsupportedOptimizerError(CheckpointError):
    """An optimizer one side cannot rebuild (not one of SGD, Adam, AdamW, RMSprop, Adagrad)."""
