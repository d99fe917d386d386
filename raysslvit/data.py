"""CIFAR-10 sources (embedded sample, torchvision download, any ImageFolder tree), a decode cache,
the stratified validation split, and batched on-device augmentation.

Images live as uint8 (N, 3, 32, 32) tensors on the training device; a batch is a slice of a
permutation, and crops, flips and normalisation are tensor ops on the whole batch.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from raysslvit.artifacts import atomic_path, file_digest
from raysslvit.errors import UserError

SAMPLE_ZIP = os.path.join(os.path.dirname(__file__), "assets", "cifar10_sample.zip")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Channel statistics of the CIFAR-10 train set, used for every source.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
IMG_SIZE = 32
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


@dataclass
class Splits:
    """train / val / test as uint8 image tensors (N, 3, 32, 32), int64 labels, and each image's index
    in its source split (val comes from the source's train): with the source split it is the image's
    stable id (`image_ids`), which captions are keyed by."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    test_idx: torch.Tensor
    classes: list[str]

    def to(self, device) -> "Splits":
        moved = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return Splits(**moved, classes=self.classes)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")

    def sizes(self) -> dict[str, int]:
        """Images per split and the number of classes: what the report tells full CIFAR-10 by."""
        return {"train": len(self.train_y), "val": len(self.val_y), "test": len(self.test_y), "classes": len(self.classes)}

    def image_ids(self, name: str) -> list[str]:
        """Stable ids of a split's images, in order: `train/123` (val's too) or `test/45`."""
        source = "test" if name == "test" else "train"
        return [f"{source}/{i}" for i in getattr(self, f"{name}_idx").tolist()]


# ---------------------------------------------------------------------------------------------
# Sources: each returns numpy (train_x, train_y, test_x, test_y, classes), images as (N, 32, 32, 3)


def _decode(name: str, raw: bytes) -> np.ndarray:
    try:
        img = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    except Exception:
        raise UserError(f"unreadable image: {name}") from None
    if img.shape[:2] != (IMG_SIZE, IMG_SIZE):
        raise UserError(f"image {name} is {img.shape[1]}x{img.shape[0]}, expected {IMG_SIZE}x{IMG_SIZE}")
    return img


def _assemble(files: dict[str, dict[str, list]], where: str, read) -> tuple:
    """files[split][class] = sorted keys; `read(key)` gives the bytes. Decodes into arrays."""
    for split in ("train", "test"):
        if not files.get(split):
            raise UserError(f"{where} has no images under {split}/ (expected {split}/<class>/<image>)")
    classes = sorted(files["train"])
    if sorted(files["test"]) != classes:
        raise UserError(f"{where}: train classes {classes} differ from test classes {sorted(files['test'])}")
    out = []
    for split in ("train", "test"):
        images, labels = [], []
        for label, cls in enumerate(classes):
            for key in files[split][cls]:
                images.append(_decode(key, read(key)))
                labels.append(label)
        out += [np.stack(images), np.asarray(labels, dtype=np.int64)]
    return (*out, classes)


def _list_image_folder(root: str) -> dict[str, dict[str, list]]:
    files = {}
    for split in ("train", "test"):
        top = os.path.join(root, split)
        if not os.path.isdir(top):
            continue
        files[split] = {}
        for cls in sorted(os.listdir(top)):
            d = os.path.join(top, cls)
            if os.path.isdir(d):
                names = sorted(n for n in os.listdir(d) if n.lower().endswith(IMAGE_EXTENSIONS))
                if names:
                    files[split][cls] = [os.path.join(d, n) for n in names]
    return files


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def image_folder_digest(root: str, files: dict | None = None) -> str:
    """What an ImageFolder tree holds: every image's path under `root` and the hash of its bytes
    (not mtimes: a copied or re-extracted tree is the same data; each file's hash is remembered
    within this process, `file_digest`)."""
    if not os.path.isdir(root):
        raise UserError(f"data folder not found: {root}")
    files = files if files is not None else _list_image_folder(root)
    digest = hashlib.sha1()
    for split, by_class in sorted(files.items()):
        for cls, paths in sorted(by_class.items()):
            for p in paths:
                digest.update(f"{os.path.relpath(p, root)}|{file_digest(p)}\n".encode())
    return digest.hexdigest()


# data the driver decoded and handed to this process (a Tune trial, on any node), by source and split
_handed: dict[tuple, tuple[str, "Splits"]] = {}


def hand(data: str, data_dir: str, val_fraction: float, split_seed: int, digest: str, splits: "Splits") -> None:
    """Take the driver's decoded splits and digest of a source: `handed` and `source_digest` give
    them back, so this process never reads the data folder (which its node may not have)."""
    _handed[(data, data_dir, val_fraction, split_seed)] = (digest, splits)


def handed(data: str, data_dir: str, val_fraction: float, split_seed: int) -> "Splits | None":
    given = _handed.get((data, data_dir, val_fraction, split_seed))
    return given[1] if given else None


def source_digest(data: str, data_dir: str = "") -> str:
    """The content of a data source, for the fingerprints of results made from it."""
    if given := next((digest for key, (digest, _) in _handed.items() if key[:2] == (data, data_dir)), None):
        return given
    if data == "sample":
        with open(SAMPLE_ZIP, "rb") as f:
            return "sample:" + hashlib.sha1(f.read()).hexdigest()
    if data == "cifar10":
        return "cifar10:torchvision"  # torchvision checks its files' md5 on every load
    return "dir:" + image_folder_digest(data_dir)


def load_image_folder(root: str, cache_dir: str) -> tuple:
    """An ImageFolder tree with train/ and test/, decoded once into a cache rebuilt when it changes."""
    if not os.path.isdir(root):
        raise UserError(f"data folder not found: {root}")
    files = _list_image_folder(root)
    key = hashlib.sha1(f"{os.path.realpath(root)}|{image_folder_digest(root, files)}".encode())
    cache = os.path.join(cache_dir, f"imagefolder-{key.hexdigest()[:16]}.npz")
    if os.path.exists(cache):
        return _load_arrays(cache)
    arrays = _assemble(files, root, _read_file)
    _save_arrays(cache, arrays)
    return arrays


def _load_arrays(cache: str) -> tuple:
    with np.load(cache) as z:
        return z["train_x"], z["train_y"], z["test_x"], z["test_y"], list(z["classes"])


def _save_arrays(cache: str, arrays: tuple) -> None:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, train_x=arrays[0], train_y=arrays[1], test_x=arrays[2], test_y=arrays[3], classes=np.array(arrays[4]))


def load_sample(cache_dir: str = "") -> tuple:
    """The embedded CIFAR-10 sample: an ImageFolder tree of the JPEG copy, zipped in the package;
    decoded once into `cache_dir` when one is given (every stage of a study loads it again)."""
    cache = ""
    if cache_dir:
        cache = os.path.join(cache_dir, f"sample-{source_digest('sample').removeprefix('sample:')[:16]}.npz")
        if os.path.exists(cache):
            return _load_arrays(cache)
    with zipfile.ZipFile(SAMPLE_ZIP) as z:
        files: dict[str, dict[str, list]] = {}
        for name in sorted(z.namelist()):
            parts = name.split("/")
            if len(parts) == 3 and parts[2]:
                files.setdefault(parts[0], {}).setdefault(parts[1], []).append(name)
        arrays = _assemble(files, SAMPLE_ZIP, z.read)
    if cache:
        _save_arrays(cache, arrays)
    return arrays


def load_cifar10(root: str) -> tuple:
    """Real CIFAR-10 through torchvision (downloaded into `root` once)."""
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(root, train=True, download=True)
        test = CIFAR10(root, train=False, download=True)
    except Exception as e:  # offline, proxy, disk: all end the same way for the user
        raise UserError(f"could not get CIFAR-10 into {root} ({type(e).__name__}); "
                        f"use --data sample (embedded) or --data-dir PATH (an ImageFolder tree)") from None
    as_np = lambda ds: (ds.data, np.asarray(ds.targets, dtype=np.int64))
    return (*as_np(train), *as_np(test), list(train.classes))


def load_splits(data: str, data_dir: str = "", data_root: str = "", val_fraction: float = 0.1,
                split_seed: int = 0) -> Splits:
    """Load a source and hold out a seeded, stratified validation split from train."""
    if data == "sample":
        arrays = load_sample(os.path.join(data_root, "cache") if data_root else "")
    elif data == "cifar10":
        arrays = load_cifar10(data_root)
    else:
        arrays = load_image_folder(data_dir, os.path.join(data_root, "cache"))
    train_x, train_y, test_x, test_y, classes = arrays
    to_tensor = lambda x: torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    x, y = to_tensor(train_x), torch.from_numpy(train_y)
    val = stratified_holdout(y, val_fraction, split_seed)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val] = False
    test_y = torch.from_numpy(test_y)
    return Splits(x[keep], y[keep], x[val], y[val], to_tensor(test_x), test_y,
                  keep.nonzero().squeeze(1), val, torch.arange(len(test_y)), classes)


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a seeded held-out set with `fraction` of every class (at least one each)."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        n = max(1, round(fraction * len(idx)))
        if n >= len(idx):
            raise UserError(f"class {int(c)} has {len(idx)} train images: too few for a validation split")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(picked).sort().values


# ---------------------------------------------------------------------------------------------
# Batched, on-device operations


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1], (..., 3, H, W) -> standardised per channel."""
    mean = torch.tensor(MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float, standardised per channel."""
    return standardize(x.float() / 255)


def augment(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding (pad > 0) and horizontal flip for a whole uint8 batch, no loop.
    Any leading shape works: clips (B, T, C, H, W) get an independent draw per frame."""
    if x.dim() > 4:
        return augment(x.flatten(0, -4), pad, generator).view(x.shape)
    B, C, H, W = x.shape
    flip = torch.rand(B, device=x.device, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if pad == 0:
        return x
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, B, 1), device=x.device, generator=generator))
    rows = (dy + torch.arange(H, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx + torch.arange(W, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    return padded[b, c, rows, cols]


def trivial_augment(x: torch.Tensor, p: float = 1.0, chunk: int = 16) -> torch.Tensor:
    """TrivialAugment (Müller & Hutter 2021; torchvision's `TrivialAugmentWide`) for a uint8 batch:
    each chunk of `chunk` images gets, with probability `p`, one random op and magnitude in one
    batched call. Batches are slices of a random permutation, so chunks are random groups. Any
    leading shape works (clips: one draw per 16 frames)."""
    from torchvision.transforms import v2

    if p == 0:  # off: no copy, and torch's RNG stream stays as without the option
        return x
    if x.dim() > 4:
        return trivial_augment(x.flatten(0, -4), p, chunk).view(x.shape)
    op = v2.TrivialAugmentWide()
    chunks = x.split(chunk)
    draw = (torch.rand(len(chunks)) < p).tolist()  # torch's RNG: seeded by fit
    return torch.cat([op(c) if d else c for c, d in zip(chunks, draw)])


class ClipSampler:
    """Same-class clips for pseudo-video: each item is `clip_len` distinct images of one class.

    Per epoch (seeded, `set_epoch`) every class is shuffled and cut into clips, the remainder
    dropped, so an image appears at most once; clips are interleaved round-robin over classes
    in a shuffled class order, then dealt to ranks so Ray Train workers get disjoint clips.
    """

    def __init__(self, labels: torch.Tensor, clip_len: int = 16, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.labels, self.clip_len, self.seed, self.rank, self.world_size = labels.cpu(), clip_len, seed, rank, world_size
        counts = torch.bincount(self.labels)
        small = [(c, int(n)) for c, n in enumerate(counts) if 0 < n < clip_len]
        if small:
            raise UserError(f"class {small[0][0]} has {small[0][1]} images, fewer than one clip of {clip_len}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def clips(self) -> torch.Tensor:
        """(clips of this rank, clip_len) image indices for the current epoch."""
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        classes = self.labels.unique()
        class_rank = torch.empty(int(classes.max()) + 1, dtype=torch.long)
        class_rank[classes] = torch.randperm(len(classes), generator=g)
        clips, keys = [], []
        for c in classes:  # one pass per class, not per image
            idx = (self.labels == c).nonzero().squeeze(1)
            k = len(idx) // self.clip_len
            clips.append(idx[torch.randperm(len(idx), generator=g)][:k * self.clip_len].view(k, self.clip_len))
            keys.append(torch.arange(k) * len(class_rank) + class_rank[c])  # round r, then class order
        clips = torch.cat(clips)[torch.cat(keys).argsort()]
        per_rank = len(clips) // self.world_size
        return clips[self.rank::self.world_size][:per_rank]


def shard_batches(n: int, batch_size: int, rank: int, world: int, seed: int, device=None):
    """Index tensors of this rank's batches for one epoch: a seeded permutation, split across ranks
    into equal disjoint shards (DDP needs equal step counts), then cut into batches."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    per_rank = n // world
    shard = perm[rank * per_rank:(rank + 1) * per_rank].to(device)
    return list(shard.split(batch_size))


def simclr_augment(x: torch.Tensor, min_scale: float = 0.25, generator: torch.Generator | None = None) -> torch.Tensor:
    """SimCLR's views (Chen et al. 2020) for a whole uint8 batch: random resized crop and flip as one
    affine resampling, colour jitter (p=0.8) and grayscale (p=0.2); returns normalised floats."""
    B, C, H, W = x.shape
    dev = x.device
    u = lambda *shape: torch.rand(*shape, device=dev, generator=generator)
    area = min_scale + (1 - min_scale) * u(B)
    aspect = torch.exp((u(B) * 2 - 1) * 0.2877)  # log-uniform in (3/4, 4/3)
    sx, sy = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    tx, ty = (u(B) * 2 - 1) * (1 - sx), (u(B) * 2 - 1) * (1 - sy)
    flip = torch.where(u(B) < 0.5, -1.0, 1.0)
    zero = torch.zeros(B, device=dev)
    theta = torch.stack([torch.stack([sx * flip, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)  # (B, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, (B, C, H, W), align_corners=False)
    img = torch.nn.functional.grid_sample(x.float() / 255, grid, mode="bilinear", padding_mode="reflection",
                                          align_corners=False)
    weights = torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)
    gray = lambda t: (t * weights).sum(1, keepdim=True)
    jitter = (u(B) < 0.8).view(B, 1, 1, 1)
    brightness, contrast, saturation = (1 + (u(3, B, 1, 1, 1) * 2 - 1) * 0.4).unbind(0)
    j = img * brightness
    j = (j - gray(j).mean((2, 3), keepdim=True)) * contrast + gray(j).mean((2, 3), keepdim=True)
    j = (j - gray(j)) * saturation + gray(j)
    img = torch.where(jitter, j.clamp(0, 1), img)
    img = torch.where((u(B) < 0.2).view(B, 1, 1, 1), gray(img).expand(-1, 3, -1, -1), img)
    return standardize(img)
