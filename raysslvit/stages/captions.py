"""Stage 7a: `<out>/captions/captions.parquet`, one row per image of train, val and test: id, split,
label, caption (BLIP), embedding (CLIP's text embedding of the caption).

Ray Data (`raysslvit.captions`) streams the rows into parts under `captions.parts.partial/`; only
when every row is in are they written as one file, atomically, and `config.json` (the fingerprint:
data, model ids and the weights' files) after it. A finished table for the same fingerprint is reused; a
partial one from an interrupted run is removed and the table made again from the start.
"""
from __future__ import annotations

import logging
import os
import shutil
import time

import numpy as np

from raysslvit.artifacts import atomic_path
from raysslvit.config import Config
from raysslvit.rundir import RunFolder, stage_fingerprint

SPLITS = ("train", "val", "test")
TABLE = "captions.parquet"
PARTS = "captions.parts.partial"


def table_path(cfg: Config) -> str:
    return os.path.join(cfg.out_dir, "captions", TABLE)


def load_table(path: str):
    """The captions table as a pandas DataFrame indexed by image id; a clear error when it is missing."""
    import pandas as pd

    from raysslvit.errors import UserError

    if not os.path.isfile(path):
        raise UserError(f"captions not found: {path} (run `python -m raysslvit captions` first)")
    return pd.read_parquet(path).set_index("id")


def unavailable(cfg: Config) -> str | None:
    """Why the stage cannot run here (no Ray Data, no weights), or None."""
    import importlib.util

    from raysslvit.captions import resolve_weights
    from raysslvit.errors import UserError

    for module, package in (("ray", "ray[data]"), ("open_clip", "open_clip_torch"), ("transformers", "transformers")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install '{package}')"
    try:
        resolve_weights(cfg.captions)
    except UserError as e:
        return str(e)
    return None


def _progress(done: int, total: int, start: float, last: list) -> None:
    now = time.perf_counter()
    if done < total and now - last[0] < 10:
        return
    last[0] = now
    rate = done / max(now - start, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    print(f"captions: {done}/{total} images, {rate:.1f} images/s, ETA {eta:.0f} s", flush=True)


def _write_part(folder: str, k: int, batch) -> None:
    batch.to_parquet(os.path.join(folder, f"part-{k:05d}.parquet"), index=False)


def fingerprint(cfg: Config, paths: dict) -> dict:
    """The data and the weights' identity (model ids and their files); missing weights fail here,
    at once, before Ray starts. Captioning draws nothing at random: no seed."""
    from raysslvit.captions import resolve_weights, weights_identity

    fp = {**stage_fingerprint(cfg, "captions"), "weights": weights_identity(resolve_weights(cfg.captions))}
    fp.pop("seed")
    return fp


def local(cfg: Config, folder: RunFolder, paths: dict, splits) -> dict:
    """On the driver: the Ray Data pipeline's rows into parts, then the table, atomically."""
    import pandas as pd

    from raysslvit.console import start_ray
    from raysslvit.captions import caption_batches, label_word_rate, resolve_weights

    weights = resolve_weights(cfg.captions)
    table, partial = os.path.join(folder.path, TABLE), os.path.join(folder.path, PARTS)
    if os.path.isdir(partial):
        print(f"captions: removing the partial table of an interrupted run ({partial}): starting clean", flush=True)
        shutil.rmtree(partial)
    os.makedirs(partial)

    images = np.concatenate([splits.split(s)[0].permute(0, 2, 3, 1).numpy() for s in SPLITS])
    meta = {"id": sum((splits.image_ids(s) for s in SPLITS), []),
            "split": sum(([s] * len(splits.split(s)[1]) for s in SPLITS), []),
            "label": np.concatenate([splits.split(s)[1].numpy() for s in SPLITS])}
    start_ray(verbose=cfg.verbose, address=cfg.address)
    import ray
    import ray.data

    if not cfg.verbose:  # Ray Data sets its own logger's level on import: its plan and progress lines
        logging.getLogger("ray.data").setLevel(logging.ERROR)

    use_gpu = cfg.use_gpu != "false" and ray.cluster_resources().get("GPU", 0) > 0
    total, done, start, nodes = len(images), 0, time.perf_counter(), set()
    last = [start]
    print(f"captions: {total} images, {cfg.captions.actors} actor(s) per model on {'GPU' if use_gpu else 'CPU'}", flush=True)
    for k, batch in enumerate(caption_batches(images, meta, cfg.captions, weights, use_gpu)):
        nodes |= {*batch.pop("node").unique(), *batch.pop("text_node").unique()}
        _write_part(partial, k, batch)
        done += len(batch)
        _progress(done, total, start, last)
    wall = time.perf_counter() - start

    frame = pd.read_parquet(partial)
    metrics = {"images": len(frame), "embedding_dim": int(len(frame["embedding"].iloc[0])),
               "label_word_rate": label_word_rate(frame["caption"].tolist(), frame["label"].tolist(), splits.classes),
               "images_per_s": total / wall, "actor_nodes": len(nodes), "timing": {"wall_s": wall}}
    with atomic_path(table) as tmp:  # the finished table replaces the old one only now
        frame.sort_values("id", kind="stable").to_parquet(tmp, index=False)
    shutil.rmtree(partial)
    folder.write(cfg, metrics, weights=weights, data_sizes=splits.sizes())
    print(f"captions: {metrics['images']} rows, embedding width {metrics['embedding_dim']}, "
          f"label word rate {metrics['label_word_rate']:.3f}, {metrics['images_per_s']:.1f} images/s "
          f"on {len(nodes)} node(s) -> {table}", flush=True)
    return metrics
