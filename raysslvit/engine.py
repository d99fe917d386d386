"""The Ray-free training loop every gradient-trained stage shares.

`fit(task, splits, cfg, ctx, report)` trains `task.model` with AdamW, linear warmup and cosine
decay, on batches cut from a seeded permutation of the on-device uint8 train split. After every
epoch it evaluates on val and calls `report(metrics, state)`; the state (rank 0 only) is the
checkpoint. The caller decides what a report means: Ray Train, or plain files (`--launcher local`).
"""
from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn as nn

from raysslvit.config import TrainConfig
from raysslvit.data import Splits, augment, shard_batches, trivial_augment


@dataclass
class WorkerContext:
    """Where this worker runs; `prepare_model` is DDP under Ray Train and `.to(device)` locally."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prepare_model: Callable[[nn.Module], nn.Module] | None = None
    sink: Callable[[str], None] | None = None  # where rank 0's lines go (the driver's mailbox, to the console); default stdout

    def prepare(self, model: nn.Module) -> nn.Module:
        return self.prepare_model(model) if self.prepare_model else model.to(self.device)

    def log(self, line: str) -> None:
        if self.rank != 0:
            return
        if self.sink is not None:
            self.sink(line)
        else:  # not print(): Ray Train patches it to log each line twice
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


class Task(Protocol):
    name: str
    model: nn.Module
    monitor: str | None  # val metric that picks the best epoch (higher is better); None: the last

    # `*extra`: what an optional `batch_inputs(idx)` gives for the batch beside images and labels
    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *extra) -> tuple[torch.Tensor, dict]: ...
    def evaluate(self, model: nn.Module, splits: Splits) -> dict: ...
    def finish(self, model: nn.Module, splits: Splits) -> dict: ...


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: no decay for biases, norms and `no_weight_decay()` names; with layer_decay < 1
    the lr shrinks geometrically from the head down to the patch embedding (BEiT, MAE). Layer ids
    come from the model's encoder (`layer_of`); parameters outside it sit above its last block."""
    encoder = getattr(model, "encoder", model)
    prefix = next(name for name, m in model.named_modules() if m is encoder)
    skip = {f"{p}.{n}".lstrip(".") for p, m in model.named_modules() if hasattr(m, "no_weight_decay")
            for n in m.no_weight_decay()}
    top = encoder.num_layers - 1
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        inside = not prefix or name.startswith(prefix + ".")
        layer = encoder.layer_of(name[len(prefix) + 1 if prefix else 0:]) if inside else top
        decay = 0.0 if p.ndim <= 1 or name in skip else weight_decay
        key = (layer, decay)
        groups.setdefault(key, {"params": [], "weight_decay": decay, "lr_scale": layer_decay ** (top - layer)})
        groups[key]["params"].append(p)
    return list(groups.values())


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup to `base`, then cosine decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def autocast(device: torch.device):
    """bf16 autocast on GPUs; fp32 on CPUs, where it measured faster for these small matrices."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Apply `fn` to uint8 images in batches and concatenate (fp32)."""
    return torch.cat([fn(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])


def accuracy(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of `fn` (uint8 images -> logits), applied in batches."""
    return (predict(fn, x).argmax(1) == y).float().mean().item()


def fit(task: Task, splits: Splits, cfg: TrainConfig, ctx: WorkerContext, report: Callable[[dict, dict | None], None],
        resume: dict | None = None, seed: int = 0, layer_decay: float = 1.0,
        batcher: Callable[[int], list[torch.Tensor]] | None = None) -> dict:
    """Train, evaluate every epoch, report; returns the final metrics (test at the best val epoch).

    `batcher(epoch)` gives this rank's index batches into the train split (default: images; the
    video stage gives (clips, T) index tensors); `cfg.batch_size` counts images across all ranks.
    """
    torch.manual_seed(seed * 1000 + ctx.rank)
    model = ctx.prepare(task.model)
    base = unwrap(model)
    groups = param_groups(base, cfg.weight_decay, layer_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    local_batch = max(1, cfg.batch_size // ctx.world_size)
    batcher = batcher or (lambda epoch: shard_batches(len(splits.train_y), local_batch, ctx.rank, ctx.world_size,
                                                      seed * 10007 + epoch, ctx.device))
    lr = cfg.lr * cfg.batch_size / 256
    steps_per_epoch = len(batcher(0))
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)

    start, best, best_state, history = 0, -math.inf, None, []
    if resume is not None:
        base.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        start, best, best_state, history = resume["epoch"] + 1, resume["best"], resume["best_state"], resume["history"]
        set_rng_state(resume["rng"][ctx.rank], ctx.device)  # the draws continue where they stopped
        ctx.log(f"{task.name}: resumed after epoch {resume['epoch'] + 1}/{cfg.epochs}")

    fit_started = time.perf_counter()
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        batches = batcher(epoch)
        train = _train_epoch(task, model, opt, splits, cfg, ctx, batches, epoch * steps_per_epoch, total, warmup, lr)
        model.eval()
        with autocast(ctx.device):
            val = task.evaluate(base, splits)
        metrics = {"epoch": epoch + 1, **train, **coverage(batches, len(splits.train_y), ctx), **val,
                   "epoch_time_s": time.perf_counter() - t0}
        score = val[task.monitor] if task.monitor else epoch
        if score > best:
            best, best_state = score, copy.deepcopy(base.state_dict())
        history.append(metrics)
        elapsed = time.perf_counter() - fit_started
        eta = elapsed / (epoch + 1 - start) * (cfg.epochs - epoch - 1)
        ctx.log(f"{task.name} epoch {epoch + 1}/{cfg.epochs}  " + "  ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("val_", "train_loss")) and isinstance(v, float))
            + f"  {elapsed:.0f} s, ETA {eta:.0f} s")
        state = {"model": base.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "best": best,
                 "best_state": best_state, "history": history, "model_config": base.encoder.cfg.to_dict(),
                 "rng": rng_states(ctx)}
        if epoch + 1 == cfg.epochs:
            break
        report(metrics, state if ctx.rank == 0 else None)
    else:  # resumed from the last epoch's checkpoint: only the final evaluation is missing
        state = resume
    # The last report carries the final metrics: the test split, once, at the best val epoch.
    final = _finish(task, model, base, splits, ctx, history, state["best_state"])
    report(final, state if ctx.rank == 0 else None)
    return final


def result_model(stage: str, state: dict) -> dict:
    """What a stage's model.pt holds, from its final checkpoint state (as `fit` or `final_state`
    lays it out): the best epoch's weights and the encoder config they need."""
    return {"stage": stage, "model_config": state["model_config"], "state_dict": state["best_state"]}


def final_state(model_config: dict, weights: dict) -> dict:
    """The checkpoint state of a stage that trains no `fit` loop (the probe): weights only."""
    return {"model_config": model_config, "best_state": weights}


def rng_states(ctx: WorkerContext) -> list[dict]:
    """Every rank's torch RNG state (CPU, and the GPU's when used): all that training draws from
    besides the seeded generators of batches and clips. A collective: every rank calls it."""
    mine = {"cpu": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(ctx.device)
    if ctx.world_size == 1:
        return [mine]
    states = [None] * ctx.world_size
    torch.distributed.all_gather_object(states, mine)
    return [{k: v.cpu() for k, v in s.items()} for s in states]


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def coverage(batches: list[torch.Tensor], n: int, ctx: WorkerContext) -> dict:
    """Distinct train images this epoch over all ranks, and how many of them more than one rank (or
    batch) used: what shows that the workers trained on disjoint shards."""
    seen = torch.zeros(n, device=ctx.device)
    idx = torch.cat([b.flatten() for b in batches])
    seen.index_add_(0, idx, torch.ones(len(idx), device=ctx.device))
    if ctx.world_size > 1:
        torch.distributed.all_reduce(seen)
    return {"train_images": int((seen > 0).sum()), "train_images_repeated": int((seen > 1).sum())}


def _train_epoch(task, model, opt, splits, cfg, ctx, batches, first_step, total, warmup, lr) -> dict:
    model.train()
    sums: dict[str, torch.Tensor] = {}
    for i, idx in enumerate(batches):
        step = first_step + i
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, warmup, lr) * g["lr_scale"]
        x, y = splits.train_x[idx], splits.train_y[idx]
        extra = task.batch_inputs(idx) if hasattr(task, "batch_inputs") else ()  # e.g. fusion's captions
        if cfg.augment:
            x = augment(trivial_augment(x, cfg.trivial_augment), cfg.crop_pad)
        with autocast(ctx.device):
            loss, logs = task.loss(model, x, y, *extra)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k, v in {"loss": loss.detach(), **logs}.items():
            sums[k] = sums.get(k, 0.0) + v  # tensors: no sync with the device per step
    # lr: the last step's, of the layers at full rate (layer decay scales the lower ones down)
    return {**{f"train_{k}": float(v) / len(batches) for k, v in sums.items()}, "lr": max(g["lr"] for g in opt.param_groups)}


def _finish(task, model, base, splits, ctx, history, best_state) -> dict:
    best = max(history, key=lambda m: m[task.monitor] if task.monitor else m["epoch"])
    base.load_state_dict(best_state)
    model.eval()
    with autocast(ctx.device):
        final = task.finish(base, splits)
    # train figures of the last epoch; val figures of the best one, whose weights the test figures use
    return {**history[-1], **{k: v for k, v in best.items() if k.startswith("val_")}, **final,
            "best_val_epoch": best["epoch"], "history": history}
