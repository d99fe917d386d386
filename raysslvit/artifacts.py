"""Atomic writes of results and checkpoints, and the provenance saved beside every result."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import time


class atomic_path:
    """`with atomic_path(dst) as tmp:` write to tmp; it replaces dst only if the block succeeds."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = f"{path}.tmp{os.getpid()}"

    def __enter__(self) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        return self.tmp

    def __exit__(self, exc_type, exc, _):
        if exc_type is None:
            os.replace(self.tmp, self.path)
            return False
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write() names no file
            exc.filename = self.path
        return False


def write_json(path: str, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def try_read_json(path: str):
    """The JSON in `path`, or None when it is missing or not valid JSON (a run folder's file that a
    crash or a user broke: the stage is redone, never a traceback)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def save_torch(path: str, obj) -> None:
    """torch.save through a buffer: a full disk then raises OSError (ENOSPC), which the CLI reports
    in one line, instead of the zip writer's RuntimeError."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())


_digests: dict[tuple, str] = {}


def file_digest(path: str) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) within this process."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _digests[key] = h.hexdigest()
    return _digests[key]


@functools.cache
def git_commit() -> str:
    """The checkout's commit (`-dirty` with uncommitted changes) when this process first asked:
    at import, so a commit made while a long run goes on is not recorded as the code it ran."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return commit + ("-dirty" if dirty.stdout.strip() else "")


git_commit()


def provenance() -> dict:
    """Versions, git commit, host and command line: who made this result, and how."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "ray", "transformers", "open_clip_torch", "pandas", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"versions": versions, "git_commit": git_commit(), "host": platform.node(), "hardware": hardware(),
            "command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def hardware() -> dict:
    """The machine a result was made on: CPU model and count, GPU if any."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
