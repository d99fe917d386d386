"""A stage's run folder `<out>/<stage>/`: its fingerprint, skip, resume and atomic result writes.

A result is reused only while its fingerprint matches: the stage's config section, the seed, the
data source's content and the content of every input file (M's weights for probe, fine-tune,
analysis and video). Anything else redoes the stage, with one line saying what changed.
Write order makes a crash safe: `model.pt` and `metrics.json` first, `config.json` (the
fingerprint and the size and sha256 of every output file) last, so a half-written result never
matches, and a missing, truncated or altered output, or a broken JSON file, redoes the stage.
One process at a time works in a stage folder: `RunFolder.claim()` holds its lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import platform
import shutil
import time
from dataclasses import asdict

import torch

from raysslvit.artifacts import file_digest, provenance, save_torch, try_read_json, write_json
from raysslvit.config import PATH_KEYS, RUNTIME_KEYS, SECTIONS, Config, TrainConfig
from raysslvit.data import source_digest
from raysslvit.errors import UserError
from raysslvit.storage import Storage


def stage_fingerprint(cfg: Config, section: str, inputs: dict[str, str] | None = None) -> dict:
    """What must match for a checkpoint or result to belong to this config (as JSON)."""
    d = json.loads(json.dumps(cfg.to_dict()))
    # paths: their content is in inputs; runtime keys: they change the speed, not the result
    skip = {key.rpartition(".")[2] for key in PATH_KEYS + RUNTIME_KEYS if key.startswith(f"{section}.")}
    fp = {"seed": d["seed"], section: {k: v for k, v in d[section].items() if k not in skip},
          "data": {"source": source_digest(cfg.data.data, cfg.data.data_dir),
                   "val_fraction": d["data"]["val_fraction"], "split_seed": d["data"]["split_seed"]},
          "inputs": {name: file_digest(path) for name, path in sorted((inputs or {}).items())}}
    # later stages take the model's shape from their input's weights, unless they start from random ones
    if section == "ssl" or d[section].get("init") == "random":
        fp["model"] = d["model"]
    if isinstance(getattr(cfg, section), TrainConfig):  # the world size changes every batch
        fp["num_workers"] = d["num_workers"]
    return fp


def fingerprint_changes(saved: dict | None, current: dict) -> list[str]:
    """What differs (`ssl.mask_ratio`, `inputs.checkpoint`), where a field that a saved result lacks
    (added to the config later) counts as its default; empty when the two match."""
    if saved is None:
        return ["no fingerprint"]
    changes = [key for key in set(saved) ^ set(current)]
    for key, value in current.items():
        if key not in saved:
            continue
        if isinstance(value, dict) and isinstance(saved[key], dict):
            defaults = json.loads(json.dumps(asdict(SECTIONS[key]()))) if key in SECTIONS else {}
            changes += [f"{key}.{k}" for k in sorted(set(value) | set(saved[key]))
                        if saved[key].get(k, defaults.get(k)) != value.get(k, defaults.get(k))]
        elif saved[key] != value:
            changes.append(key)
    return sorted(changes)


def saved_fingerprint(stage_dir: str) -> dict | None:
    """The fingerprint of the finished result in `stage_dir`, if there is a readable one."""
    saved = try_read_json(os.path.join(stage_dir, "config.json"))
    return saved.get("fingerprint") if isinstance(saved, dict) else None


def latest_checkpoint(stage_dir: str) -> str | None:
    """The checkpoint folder with the highest epoch under `<stage_dir>/checkpoints/`, if any (one
    with an unreadable meta.json is passed over)."""
    found = []
    for meta in glob.glob(os.path.join(stage_dir, "checkpoints", "*", "checkpoint_*", "meta.json")):
        saved = try_read_json(meta)
        if isinstance(saved, dict) and "epoch" in saved and os.path.exists(os.path.join(os.path.dirname(meta), "state.pt")):
            found.append((saved["epoch"], os.path.getmtime(meta), os.path.dirname(meta)))
    return max(found)[2] if found else None


def output_files(stage_dir: str) -> dict[str, dict]:
    """{name: {size, sha256}} of every result file directly in the folder: all but config.json,
    hidden files (the lock) and unfinished temporary files."""
    names = sorted(n for n in os.listdir(stage_dir) if n != "config.json" and not n.startswith(".")
                   and ".tmp" not in n and os.path.isfile(os.path.join(stage_dir, n)))
    return {n: {"size": os.path.getsize(p := os.path.join(stage_dir, n)), "sha256": file_digest(p)} for n in names}


def output_problem(stage_dir: str, recorded: dict | None) -> str | None:
    """Why the recorded outputs are not the ones on disk (missing, truncated, altered), or None.
    Sizes are compared first: a truncated file is found without reading it."""
    if not isinstance(recorded, dict):
        return "config.json has no record of the stage's outputs"
    for name, want in sorted(recorded.items()):
        path = os.path.join(stage_dir, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != want.get("size"):
            return f"{name} is truncated or altered ({os.path.getsize(path)} bytes, {want.get('size')} recorded)"
    for name, want in sorted(recorded.items()):
        if file_digest(os.path.join(stage_dir, name)) != want.get("sha256"):
            return f"{name} was altered (its sha256 differs from the recorded one)"
    return None


def make_folder(path: str) -> None:
    """`path` as a folder this process can write, or a user error naming why not."""
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        raise UserError(f"{parent} is a file, not a folder: pass another --out") from None
    except PermissionError:
        raise UserError(f"cannot create {path} (permission denied): pass another --out") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"cannot write to {path} (permission denied): pass another --out")


def write_checkpoint(directory: str, state: dict, meta: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    save_torch(os.path.join(directory, "state.pt"), state)
    write_json(os.path.join(directory, "meta.json"), meta)


class LatestCheckpoint:
    """One run's checkpoints in `<stage>/checkpoints/<run>/`, written by the driver, only the latest
    kept: what `RunFolder.resume_point` finds after a crash. `state` is the latest one written."""

    def __init__(self, folder: "RunFolder", run: str, meta: dict):
        self.folder, self.run_dir, self.meta = folder, os.path.join(folder.checkpoints, run), meta
        self.state, self._path = None, None

    def save(self, epoch: int, state: dict) -> None:
        directory = os.path.join(self.run_dir, f"checkpoint_{epoch:06d}")
        write_checkpoint(directory, state, {**self.meta, "epoch": epoch})
        self.folder.push(directory)
        if self._path:
            shutil.rmtree(self._path, ignore_errors=True)
            self.folder.unpush(self._path)
        self.state, self._path = state, directory


def load_state(directory: str | None) -> dict | None:
    """A checkpoint's state: tensors, dicts, lists and numbers only (weights_only: no pickled code runs)."""
    if not directory:
        return None
    path = os.path.join(directory, "state.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"unreadable checkpoint {path} ({type(e).__name__}): use --fresh") from None


class RunFolder:
    """`<out>/<stage>/` for one fingerprint; with a `Storage`, its files are mirrored there."""

    def __init__(self, out_dir: str, stage: str, fingerprint: dict, storage: Storage | None = None):
        self.stage, self.fingerprint = stage, fingerprint
        self.storage = storage.child(stage) if storage is not None else None
        self.path = os.path.join(out_dir, stage)
        self.checkpoints = os.path.join(self.path, "checkpoints")
        self._redoing = False  # said so already: stale checkpoints go without a second line

    def _say(self, line: str) -> None:
        print(f"{self.stage}: {line}", flush=True)

    def finished(self) -> dict | None:
        """The stored metrics when this fingerprint made them and every output is as recorded; None
        (saying why) when the stage must run."""
        config, metrics = (os.path.join(self.path, n) for n in ("config.json", "metrics.json"))
        if not (os.path.exists(metrics) or os.path.exists(config)):
            return None
        saved, done = try_read_json(config), try_read_json(metrics)
        if not isinstance(saved, dict) or not isinstance(done, dict):
            broken = "config.json" if not isinstance(saved, dict) else "metrics.json"
            return self._redo(f"{broken} is missing or not valid JSON in {self.path}")
        changes = fingerprint_changes(saved.get("fingerprint"), self.fingerprint)
        if changes:
            return self._redo(f"{', '.join(changes[:4])}{' ...' if len(changes) > 4 else ''} changed since {self.path}")
        if problem := output_problem(self.path, saved.get("outputs")):
            return self._redo(f"{problem} in {self.path}")
        self._say(f"done already in {self.path} (--fresh to redo)")
        self._complete_storage(saved["outputs"])
        return done

    def _complete_storage(self, outputs: dict) -> None:
        """A finished result the storage lacks part of (a copy cut off by a lost connection): the
        missing files, config.json last."""
        if self.storage is None:
            return
        stored = self.storage.files()
        missing = [n for n in [*outputs, "config.json"] if stored.get(n) != os.path.getsize(os.path.join(self.path, n))]
        for name in missing:
            self.push(os.path.join(self.path, name))
        if missing:
            self._say(f"{len(missing)} file(s) the storage lacked copied to {self.storage.uri}")

    def _redo(self, why: str) -> None:
        self._say(f"redoing: {why}")
        self._redoing = True
        return None

    @contextlib.contextmanager
    def claim(self):
        """Hold the folder's lock while the stage runs: a second process gets one line naming the
        holder; a lock left by a process that died is taken over, with a line. (flock: the kernel
        lets go of a dead process's lock, its note in the file stays.)"""
        make_folder(self.path)
        with open(os.path.join(self.path, ".lock"), "a+") as f:
            f.seek(0)
            note = f.read().strip()
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"{self.path} is in use by {note or 'another process'}: wait for it to end, "
                                f"or pass another --out") from None
            if note:
                self._say(f"taking over the lock of {note}, which ended without letting go")
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
            try:
                if self.storage is not None and (fetched := self.storage.pull(self.path)):
                    self._say(f"{len(fetched)} file(s) fetched from {self.storage.uri}")
                yield self
            finally:
                f.truncate(0)
                f.flush()
                fcntl.flock(f, fcntl.LOCK_UN)

    def resume_point(self) -> str | None:
        """The latest checkpoint of this fingerprint; checkpoints of another one are removed."""
        latest = latest_checkpoint(self.path)
        if latest is None:
            return None
        changes = fingerprint_changes(try_read_json(os.path.join(latest, "meta.json")).get("fingerprint"), self.fingerprint)
        if changes:
            if not self._redoing:
                self._say(f"checkpoints were written with another {', '.join(changes[:4])}: starting over")
            self.clear_checkpoints()
            return None
        return latest

    @staticmethod
    def epoch_of(checkpoint: str) -> int:
        """The epoch (1-based) a checkpoint folder of `resume_point` was written after."""
        return try_read_json(os.path.join(checkpoint, "meta.json"))["epoch"]

    def clear_checkpoints(self) -> None:
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        self.unpush(self.checkpoints)

    def push(self, path: str) -> None:
        """A file or folder of this stage's, written, to the storage (when there is one)."""
        if self.storage is not None:
            self.storage.push(self.path, os.path.relpath(path, self.path))

    def unpush(self, path: str) -> None:
        if self.storage is not None:
            self.storage.remove(os.path.relpath(path, self.path))

    def write(self, cfg: Config, metrics: dict, model: dict | None = None, **extra) -> None:
        """The result, atomically; config.json (the fingerprint, every output's size and sha256)
        last, so only a whole result matches. Files the stage wrote into its folder count as outputs."""
        if model is not None:
            save_torch(os.path.join(self.path, "model.pt"), model)
        write_json(os.path.join(self.path, "metrics.json"), metrics)
        outputs = output_files(self.path)
        write_json(os.path.join(self.path, "config.json"), {
            "config": cfg.to_dict(), "fingerprint": self.fingerprint, "seed": cfg.seed,
            "outputs": outputs, **extra, **provenance()})
        for name in [*outputs, "config.json"]:  # config.json last there too: only a whole result matches
            self.push(os.path.join(self.path, name))
