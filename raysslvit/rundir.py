"""A stage's run folder `<out>/<stage>/`: its fingerprint, skip, resume and atomic result writes.

A result is reused only while its fingerprint matches: the stage's config section, the seed, the
data source's content and the content of every input file (M's weights for probe, fine-tune,
analysis and video). Anything else redoes the stage, with one line saying what changed.
Write order makes a crash safe: `model.pt` and `metrics.json` first, `config.json` (the
fingerprint) last, so a half-written result never matches.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import asdict

import torch

from raysslvit.artifacts import file_digest, provenance, read_json, save_torch, write_json
from raysslvit.config import PATH_KEYS, RUNTIME_KEYS, SECTIONS, Config, TrainConfig
from raysslvit.data import source_digest
from raysslvit.errors import UserError


def stage_fingerprint(cfg: Config, section: str, inputs: dict[str, str] | None = None) -> dict:
    """What must match for a checkpoint or result to belong to this config (as JSON)."""
    d = json.loads(json.dumps(cfg.to_dict()))
    # paths: their content is in inputs; runtime keys: they change the speed, not the result
    skip = {key.rpartition(".")[2] for key in PATH_KEYS + RUNTIME_KEYS if key.startswith(f"{section}.")}
    fp = {"seed": d["seed"], section: {k: v for k, v in d[section].items() if k not in skip},
          "data": {"source": source_digest(cfg.data.data, cfg.data.data_dir),
                   "val_fraction": d["data"]["val_fraction"], "split_seed": d["data"]["split_seed"]},
          "inputs": {name: file_digest(path) for name, path in sorted((inputs or {}).items())}}
    if section == "ssl":  # later stages take the model's shape from their input's weights
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
    """The fingerprint of the finished result in `stage_dir`, if there is one."""
    config = os.path.join(stage_dir, "config.json")
    return read_json(config).get("fingerprint") if os.path.exists(config) else None


def latest_checkpoint(stage_dir: str) -> str | None:
    """The checkpoint folder with the highest epoch under `<stage_dir>/checkpoints/`, if any."""
    found = []
    for meta in glob.glob(os.path.join(stage_dir, "checkpoints", "*", "checkpoint_*", "meta.json")):
        if os.path.exists(os.path.join(os.path.dirname(meta), "state.pt")):
            found.append((read_json(meta)["epoch"], os.path.getmtime(meta), os.path.dirname(meta)))
    return max(found)[2] if found else None


def write_checkpoint(directory: str, state: dict, meta: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    save_torch(os.path.join(directory, "state.pt"), state)
    write_json(os.path.join(directory, "meta.json"), meta)


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
    """`<out>/<stage>/` for one fingerprint."""

    def __init__(self, out_dir: str, stage: str, fingerprint: dict):
        self.stage, self.fingerprint = stage, fingerprint
        self.path = os.path.join(out_dir, stage)
        self.checkpoints = os.path.join(self.path, "checkpoints")
        self._redoing = False  # said so already: stale checkpoints go without a second line

    def _say(self, line: str) -> None:
        print(f"{self.stage}: {line}", flush=True)

    def finished(self) -> dict | None:
        """The stored metrics when this fingerprint made them; None (saying why) when it must run."""
        metrics = os.path.join(self.path, "metrics.json")
        if not (os.path.exists(metrics) and os.path.exists(os.path.join(self.path, "config.json"))):
            return None
        changes = fingerprint_changes(saved_fingerprint(self.path), self.fingerprint)
        if changes:
            self._say(f"redoing: {', '.join(changes[:4])}{' ...' if len(changes) > 4 else ''} changed since {self.path}")
            self._redoing = True
            return None
        self._say(f"done already in {self.path} (--fresh to redo)")
        return read_json(metrics)

    def resume_point(self) -> str | None:
        """The latest checkpoint of this fingerprint; checkpoints of another one are removed."""
        latest = latest_checkpoint(self.path)
        if latest is None:
            return None
        changes = fingerprint_changes(read_json(os.path.join(latest, "meta.json")).get("fingerprint"), self.fingerprint)
        if changes:
            if not self._redoing:
                self._say(f"checkpoints were written with another {', '.join(changes[:4])}: starting over")
            self.clear_checkpoints()
            return None
        return latest

    def clear_checkpoints(self) -> None:
        shutil.rmtree(self.checkpoints, ignore_errors=True)

    def write(self, cfg: Config, metrics: dict, model: dict | None = None, **extra) -> None:
        """The result, atomically; config.json (the fingerprint) last, so only a whole result matches."""
        if model is not None:
            save_torch(os.path.join(self.path, "model.pt"), model)
        write_json(os.path.join(self.path, "metrics.json"), metrics)
        write_json(os.path.join(self.path, "config.json"), {"config": cfg.to_dict(), "fingerprint": self.fingerprint,
                                                            "seed": cfg.seed, **extra, **provenance()})
