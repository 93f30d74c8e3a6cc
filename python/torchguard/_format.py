"""The checkpoint directory as C++ writes it (include/torchguard/checkpoint/format.hpp,
manifest.hpp, commit.hpp, restore.hpp): ckpt-<sequence>-step-<step>/ directories, each with its
safetensors files and manifest.json (each file's size and XXH3-64, and the manifest's own
checksum on its last line), committed by renaming a temporary, and a .lock that one writer holds.
A part of format 4 may have a shared file beside its own ("shared_file" in its record: the
tensors that did not change since an earlier checkpoint, often a hard link to that checkpoint's
file, incremental.hpp); its state is both files' tensors together.
"""
import errno
import fcntl
import json
import math
import os
import re

import xxhash

from ._errors import CheckpointError, DirectoryInUseError

FORMAT_VERSION = 4  # what this package writes (every file whole); it reads 2 to 4
MANIFEST = "manifest.json"
CHECKSUM_KEY = "manifest_xxh3_64"
_CHECKSUM_LINE = ',\n  "manifest_xxh3_64": "'
_NAME = re.compile(r"^ckpt-(\d{1,18})-step-(-?\d+)$")


def xxh3(data):
    return xxhash.xxh3_64_hexdigest(data)


def parse_sequence(name):
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def checkpoint_name(sequence, step):
    return f"ckpt-{sequence:06d}-step-{step}"


def committed(directory):
    """The committed checkpoint directories of `directory`, oldest first (by sequence)."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        sequence = parse_sequence(entry.name)
        if sequence is not None and entry.is_dir():
            found.append((sequence, entry.path))
    return [path for _, path in sorted(found)]


def highest_sequence(directory):
    """The highest sequence number in use, quarantined checkpoints included: never reused."""
    highest = 0
    for where in (directory, os.path.join(directory, "quarantine")):
        try:
            for entry in os.scandir(where):
                sequence = parse_sequence(entry.name)
                if sequence is not None:
                    highest = max(highest, sequence)
        except FileNotFoundError:
            pass
    return highest


def _finite(value):
    """JSON as C++ reads it: a non-finite float (no JSON for it) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def manifest_text(manifest):
    """The manifest's text with its checksum on its last line: the XXH3-64 of the JSON without the
    key, two-space indented (what C++'s check_text_checksum() verifies)."""
    body = json.dumps(_finite(manifest), indent=2, ensure_ascii=False, allow_nan=False)
    return f"{body[:-2]}{_CHECKSUM_LINE}{xxh3(body.encode())}\"\n}}\n"


def check_manifest(text_bytes):
    """(manifest, "") when intact, (None, reason) when damaged; raises CheckpointError for an
    intact manifest of a format newer than this package reads."""
    if b"\0" in text_bytes:
        return None, "its manifest holds a NUL byte"
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return None, "its manifest is not UTF-8"
    at = text.rfind(_CHECKSUM_LINE)
    verified = False
    if at >= 0:
        rest = text[at + len(_CHECKSUM_LINE):]
        digest = rest[:16]
        if not re.fullmatch(r"[0-9a-f]{16}", digest) or rest[16:] not in ('"\n}', '"\n}\n'):
            return None, "its manifest's checksum line is malformed, or not its last"
        if xxh3((text[:at] + "\n}").encode()) != digest:
            return None, "its manifest fails its own checksum"
        verified = True
    try:
        manifest = json.loads(text)
    except ValueError as error:
        return None, f"its manifest is unreadable ({error})"
    if not isinstance(manifest, dict):
        return None, "its manifest is not a JSON object"
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= 1_000_000:
        return None, "its manifest has no valid format_version"
    if CHECKSUM_KEY not in manifest and version != 1:
        return None, "its manifest has no checksum of its own"
    if CHECKSUM_KEY in manifest and not verified:
        return None, "its manifest's checksum is not on the last line of its own"
    if version > FORMAT_VERSION:
        raise CheckpointError(f"the checkpoint has format version {version}, newer than this "
                              f"package reads ({FORMAT_VERSION}): upgrade torchguard")
    if version < 2:
        return None, ("it is of format 1 (torchguard 0.1), which Python does not read: restore "
                      "it once in C++, which saves it again in the current format")
    files = manifest.get("files")
    if not isinstance(files, list):
        return None, "its manifest lists no files"
    for file in files:
        name = file.get("name") if isinstance(file, dict) else None
        if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name
                or not isinstance(file.get("size"), int) or not isinstance(file.get("xxh3_64"), str)):
            return None, "its manifest lists a file without a plain name, a size and a checksum"
    for key in ("sequence", "step", "epoch"):
        if not isinstance(manifest.get(key), int):
            return None, f"its manifest lacks its {key}"
    if version >= 3:  # each model and optimizer names its file (and shared file) among the files
        listed = {file["name"] for file in files}
        for kind in ("models", "optimizers"):
            parts = manifest.get(kind)
            if not isinstance(parts, dict):
                return None, f"its manifest lacks its {kind}"
            for name, record in parts.items():
                names = ([record.get("file"), *([record["shared_file"]] if "shared_file" in record
                                                else [])] if isinstance(record, dict) else [None])
                if (any(not isinstance(file, str) or file not in listed for file in names)
                        or len(set(names)) != len(names)):
                    return None, f"its manifest's {kind[:-1]} '{name}' names no file it lists"
    return manifest, ""


def read_checkpoint(path):
    """(manifest, {file name: bytes}, "") for an intact checkpoint, or (None, None, reason)."""
    try:
        with open(os.path.join(path, MANIFEST), "rb") as file:
            text = file.read()
    except FileNotFoundError:
        return None, None, "it has no manifest (an interrupted save or deletion)"
    except OSError as error:
        if error.errno in (errno.EIO, errno.ENXIO, errno.ESTALE):
            return None, None, f"its manifest cannot be read ({error})"
        raise CheckpointError(f"cannot read checkpoint '{path}': {error}") from error
    manifest, problem = check_manifest(text)
    if manifest is None:
        return None, None, problem
    contents = {}
    for file in manifest["files"]:
        try:
            with open(os.path.join(path, file["name"]), "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None, None, f"{file['name']} is missing"
        except OSError as error:
            if error.errno in (errno.EIO, errno.ENXIO, errno.ESTALE):
                return None, None, f"{file['name']} cannot be read ({error})"
            raise CheckpointError(f"cannot read checkpoint '{path}': {error}") from error
        if len(data) != file["size"]:
            return None, None, (f"{file['name']} has {len(data)} bytes, its manifest says "
                                f"{file['size']} (truncated?)")
        checksum = xxh3(data)
        if checksum != file["xxh3_64"]:
            return None, None, (f"{file['name']} fails its checksum (xxh3 {checksum} instead of "
                                f"{file['xxh3_64']})")
        contents[file["name"]] = data
    return manifest, contents, ""


class DirectoryLock:
    """The flock C++ holds on <directory>/.lock while it writes (detail/directory_lock.hpp)."""

    def __init__(self, directory):
        self.path = os.path.join(directory, ".lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 63, 0).decode(errors="replace").strip()
            os.close(self.fd)
            raise DirectoryInUseError(
                f"the checkpoint directory '{directory}' is in use by another run "
                f"({holder or 'its pid is not recorded'}): two runs must not write one directory; "
                "wait for that run to end (a C++ training job?), or give this one another "
                "directory") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()}\n".encode(), 0)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _fsync_directory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(directory, sequence, step, files, manifest):
    """Writes `files` ({name: bytes}) and the manifest (completed with format_version, sequence,
    step and files) as C++'s write_checkpoint() does: a temporary directory, each file fsynced,
    the manifest last, the directory fsynced, renamed, the parent fsynced. Returns the path."""
    name = checkpoint_name(sequence, step)
    final = os.path.join(directory, name)
    temporary = os.path.join(directory, f".tmp-{name}-{os.getpid()}")
    os.mkdir(temporary)
    try:
        listed = []
        for file_name, data in files.items():
            with open(os.path.join(temporary, file_name), "xb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            listed.append({"name": file_name, "size": len(data), "xxh3_64": xxh3(data)})
        manifest = {"format_version": FORMAT_VERSION, "sequence": sequence, "step": step,
                    **manifest, "files": listed}
        with open(os.path.join(temporary, MANIFEST), "x", encoding="utf-8") as out:
            out.write(manifest_text(manifest))
            out.flush()
            os.fsync(out.fileno())
        _fsync_directory(temporary)
        os.rename(temporary, final)
    except BaseException:
        for leftover in os.listdir(temporary) if os.path.isdir(temporary) else []:
            os.unlink(os.path.join(temporary, leftover))
        if os.path.isdir(temporary):
            os.rmdir(temporary)
        raise
    _fsync_directory(directory)
    return final
