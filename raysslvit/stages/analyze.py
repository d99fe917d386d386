"""Stages 4-5: similarity maps and CKA of model M against the fine-tuned model, over the test set.

Runs in-process (forward passes only), in its run folder like every stage (skipped while both
models' weights, the data and the config are unchanged). Writes `<out>/analyze/metrics.json`, `maps.png`,
`tokens.png`, `cka.png` and the raw arrays in `arrays.npz`.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend

from raysslvit.artifacts import atomic_path
from raysslvit.config import Config
from raysslvit.data import normalize
from raysslvit.errors import UserError
from raysslvit.metrics.cka import cka_matrix, linear_cka, minibatch_cka
from raysslvit.metrics.similarity import cls_patch_similarity, focus, similarity_map, token_similarity
from raysslvit.rundir import RunFolder, file_digest, saved_fingerprint
from raysslvit.stages.common import encoder_path, load_encoder
from raysslvit.vit import VisionTransformer


@torch.no_grad()
def collect(encoder: VisionTransformer, x: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Over all images: the CLS after every block (L, n, D); entering the last block, after its
    attention sub-layer (n, D) each; and the focus of the CLS-to-patch similarity map (n,) each.
    (The CLS entering block 1 is the same for every image, so it has no CKA.)"""
    encoder.eval()
    parts: dict[str, list] = {"depths": [], "entering": [], "attn": [], "entropy": [], "top4": []}
    for i in range(0, len(x), batch_size):
        out = encoder.forward_intermediates(normalize(x[i:i + batch_size]))
        parts["depths"].append(torch.stack([b[:, 0] for b in out["blocks"]]))
        parts["entering"].append(out["inputs"][-1][:, 0])
        parts["attn"].append(out["attn"][-1][:, 0])
        h, m = focus(cls_patch_similarity(out["final"]))
        parts["entropy"].append(h)
        parts["top4"].append(m)
    return {k: torch.cat(v, 1 if k == "depths" else 0) for k, v in parts.items()}


def pick_samples(labels: torch.Tensor, count: int = 3, seed: int = 0) -> list[int]:
    """Seeded test indices of `count` different classes."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randperm(int(labels.max()) + 1, generator=g)[:count]
    return [int((labels == c).nonzero()[torch.randint(0, int((labels == c).sum()), (1,), generator=g)]) for c in classes]


def plot_maps(images, maps_before, maps_after, titles, path):
    lo, hi = float(min(maps_before.min(), maps_after.min())), float(max(maps_before.max(), maps_after.max()))
    fig = Figure(figsize=(7.5, 2.5 * len(images)))
    axes = fig.subplots(len(images), 3, squeeze=False)
    for r, img in enumerate(images):
        axes[r, 0].imshow(img)
        axes[r, 0].set_ylabel(titles[r])
        for c, (maps, name) in enumerate(((maps_before, "before (M)"), (maps_after, "after fine-tuning")), 1):
            axes[r, c].imshow(img)
            shown = axes[r, c].imshow(maps[r], cmap="jet", alpha=0.5, vmin=lo, vmax=hi)
            if r == 0:
                axes[r, c].set_title(name)
        if r == 0:
            axes[r, 0].set_title("image")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes, shrink=0.8, label="cosine(CLS, patch)")
    _save(fig, path)


def plot_tokens(before, after, titles, path):
    fig = Figure(figsize=(7, 3.2 * len(before)))
    axes = fig.subplots(len(before), 2, squeeze=False)
    for r in range(len(before)):
        for c, (mats, name) in enumerate(((before, "before (M)"), (after, "after fine-tuning"))):
            shown = axes[r, c].imshow(mats[r], cmap="viridis", vmin=-1, vmax=1)
            axes[r, c].set_title(f"{titles[r]}: {name}", fontsize=9)
            axes[r, c].set_xlabel("token (0 = CLS)")
            axes[r, c].set_xticks(range(0, len(mats[r]), 4))
            axes[r, c].set_yticks(range(0, len(mats[r]), 4))
    fig.colorbar(shown, ax=axes, shrink=0.8, label="cosine similarity")
    _save(fig, path)


def plot_cka(before: np.ndarray, after: np.ndarray, path):
    fig = Figure(figsize=(10.5, 4.2))
    axes = fig.subplots(1, 2)
    labels = [f"block {i}" for i in range(1, len(before) + 1)]
    for ax, mat, name in ((axes[0], before, "before (M)"), (axes[1], after, "after fine-tuning")):
        shown = ax.imshow(mat, cmap="magma", vmin=0, vmax=1)
        ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(f"CKA of CLS across depths: {name}", fontsize=9)
        for i in range(len(mat)):
            for j in range(len(mat)):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[i, j] < 0.6 else "black")
    fig.colorbar(shown, ax=axes, shrink=0.8)
    _save(fig, path)


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def inputs(cfg: Config) -> dict[str, str]:
    """before: --before, --checkpoint or this run's M; after: --after, or the fine-tuned model of
    `before` in this run, which must have been fine-tuned from exactly those weights."""
    a = cfg.analyze
    before = a.before or encoder_path(cfg, "ssl")
    for path in (before, a.after):
        if path and not os.path.isfile(path):
            raise UserError(f"checkpoint not found: {path}")
    if a.after:
        return {"before": before, "after": a.after}
    after = os.path.join(cfg.out_dir, "finetune", "model.pt")
    made_from = (saved_fingerprint(os.path.dirname(after)) or {}).get("inputs", {}).get("checkpoint")
    if not os.path.isfile(after) or made_from != file_digest(before):
        raise UserError(f"no fine-tuned model of {before} in {cfg.out_dir}/finetune: run `python -m raysslvit "
                        f"finetune --checkpoint {before}` with this --out first, or pass --after PATH")
    return {"before": before, "after": after}


def local(cfg: Config, folder: RunFolder, paths: dict, splits) -> dict:
    """Runs on the driver (forward passes only) and writes the figures, the arrays and the result."""
    started = time.perf_counter()
    a = cfg.analyze
    models = {k: load_encoder(p) for k, p in paths.items()}
    x, y = splits.test_x, splits.test_y
    samples = [int(i) for i in a.samples] or pick_samples(y, 3, cfg.seed)
    if max(samples) >= len(y):
        raise UserError(f"sample index {max(samples)} is outside the test split ({len(y)} images)")
    metrics, arrays = {"samples": samples, "n_test": len(y)}, {"samples": np.array(samples)}
    for key, enc in models.items():
        c = collect(enc, x, a.batch_size)
        entering, after_attn, after_block = c["entering"], c["attn"], c["depths"][-1]
        metrics[f"cka_{key}"] = linear_cka(entering, after_attn)
        metrics[f"cka_block_{key}"] = linear_cka(entering, after_block)
        metrics[f"cka_{key}_unbiased"] = minibatch_cka(entering, after_attn, a.batch_size)
        metrics[f"focus_entropy_{key}"], metrics[f"focus_entropy_{key}_std"] = c["entropy"].mean().item(), c["entropy"].std().item()
        metrics[f"top4_mass_{key}"], metrics[f"top4_mass_{key}_std"] = c["top4"].mean().item(), c["top4"].std().item()
        arrays[f"cka_layers_{key}"] = cka_matrix(list(c["depths"]))
        with torch.no_grad():
            tokens = enc.forward_features(normalize(x[samples]))
        arrays[f"maps_{key}"] = similarity_map(tokens).numpy()
        arrays[f"tokens_{key}"] = token_similarity(tokens).numpy()
        arrays[f"entropy_{key}"], arrays[f"top4_{key}"] = c["entropy"].numpy(), c["top4"].numpy()
    images = x[samples].permute(0, 2, 3, 1).numpy()
    titles = [f"#{i} {splits.classes[int(y[i])]}" for i in samples]
    plot_maps(images, arrays["maps_before"], arrays["maps_after"], titles, os.path.join(folder.path, "maps.png"))
    plot_tokens(arrays["tokens_before"], arrays["tokens_after"], titles, os.path.join(folder.path, "tokens.png"))
    plot_cka(arrays["cka_layers_before"], arrays["cka_layers_after"], os.path.join(folder.path, "cka.png"))
    with atomic_path(os.path.join(folder.path, "arrays.npz")) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    metrics["timing"] = {"wall_s": time.perf_counter() - started}
    folder.write(cfg, metrics, inputs=paths, data_sizes=splits.sizes())
    print("analyze: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)), flush=True)
    return metrics
