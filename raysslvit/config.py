"""Typed configs per stage, validated on construction, plus the named presets (smoke / cpu / seed).

CLI flags (`--mask-ratio`) and Tune spaces (`ssl.mask_ratio`) use these field names.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field, fields

from raysslvit.errors import UserError
from raysslvit.vit import ViTConfig

DEFAULT_DATA_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "raysslvit")


def _check(ok: bool, message: str):
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class DataConfig:
    data: str = "sample"  # sample | cifar10 | dir (set by --data-dir)
    data_dir: str = ""  # an ImageFolder tree with train/ and test/
    data_root: str = DEFAULT_DATA_ROOT  # torchvision download folder and decode cache
    val_fraction: float = 0.1  # held out from train, stratified: 5,000 images of CIFAR-10
    split_seed: int = 0

    def __post_init__(self):
        _check(self.data in ("sample", "cifar10", "dir"), f"unknown --data {self.data!r}: use sample, cifar10 or --data-dir PATH")
        _check(self.data != "dir" or bool(self.data_dir), "--data dir needs --data-dir PATH")
        _check(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")


def _check_init(init: str) -> None:
    _check(init in ("checkpoint", "random"), f"unknown init {init!r}: use checkpoint or random")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation shared by every gradient-trained stage: AdamW, linear warmup, cosine decay."""

    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3  # for batch 256; scaled linearly with the global batch
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    augment: bool = True  # random horizontal flip (+ crop when crop_pad > 0), batched on device
    crop_pad: int = 4  # random crop of the zero-padded image; 0 turns cropping off
    # share of each batch's 16-image chunks given a TrivialAugment op; off (docs/recipes.md)
    trivial_augment: float = 0.0

    def __post_init__(self):
        _check(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        _check(self.lr > 0, f"lr must be positive, got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be non-negative, got {self.weight_decay}")
        _check(0 <= self.warmup_epochs <= self.epochs, f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        _check(self.crop_pad >= 0, f"crop_pad must be non-negative, got {self.crop_pad}")
        _check(0 <= self.trivial_augment <= 1, f"trivial_augment must be in [0, 1], got {self.trivial_augment}")


@dataclass(frozen=True)
class SSLConfig(TrainConfig):
    objective: str = "masked_rotation"  # the study's task | infonce: the SimCLR baseline (see ssl.py)
    # No crop: the black border of a zero-padded crop, rotated with its patch, gives the angle away.
    crop_pad: int = 0
    subset_ratio: float = 0.5  # share of patches in set A
    mask_ratio: float = 0.5  # share of A blacked out; the rest of A is rotated
    recon_weight: float = 1.0  # lambda in CE + lambda * MSE
    norm_pix: bool = False  # reconstruct per-patch normalised pixels (MAE's norm_pix_loss)
    temperature: float = 0.2  # infonce only
    proj_dim: int = 128  # infonce only: projection head width
    # the SSL losses are nearly solved within a few epochs: a k-NN accuracy on val ranks configs instead
    knn_bank: int = 10000  # seeded train images the k-NN monitor compares val with; 0 turns it off
    knn_k: int = 20

    def __post_init__(self):
        super().__post_init__()
        _check(self.objective in ("masked_rotation", "infonce"),
               f"unknown objective {self.objective!r}: use masked_rotation or infonce")
        _check(self.temperature > 0, f"temperature must be positive, got {self.temperature}")
        _check(0 < self.subset_ratio <= 1, f"subset_ratio must be in (0, 1], got {self.subset_ratio}")
        _check(0 <= self.mask_ratio <= 1, f"mask_ratio must be in [0, 1], got {self.mask_ratio}")
        _check(self.recon_weight >= 0, f"recon_weight must be non-negative, got {self.recon_weight}")
        _check(self.knn_bank >= 0 and self.knn_k >= 1, f"knn_bank must be >= 0 and knn_k >= 1, got {self.knn_bank}, {self.knn_k}")


@dataclass(frozen=True)
class ProbeConfig:
    # cls: final CLS (the study) | multi: CLS + mean patch token of the last blocks (DINO) |
    # tokens: all final tokens, flattened in place (chosen on val: docs/recipes.md)
    features: str = "tokens"
    probe_blocks: int = 4  # blocks whose outputs the multi features concatenate
    weight_decays: tuple = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)  # chosen on val
    epochs: int = 300  # converged, at a third of 1000 epochs' time (docs/recipes.md, "Probe length")
    batch_size: int = 2048
    lr: float = 1e-2
    init: str = "checkpoint"  # checkpoint: M or --checkpoint | random: a random encoder of the model section's shape (the control)

    def __post_init__(self):
        _check_init(self.init)
        _check(self.features in ("cls", "multi", "tokens"), f"unknown probe features {self.features!r}: use cls, multi or tokens")
        _check(self.probe_blocks >= 1, f"probe_blocks must be at least 1, got {self.probe_blocks}")
        _check(len(self.weight_decays) > 0, "weight_decays must not be empty")
        _check(self.epochs >= 1 and self.batch_size >= 1, "probe epochs and batch_size must be positive")


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    epochs: int = 50
    batch_size: int = 128  # chosen on val (docs/recipes.md, "Fine-tuning")
    lr: float = 2e-3  # for batch 256, scaled linearly like every lr here
    warmup_epochs: float = 5.0
    label_smoothing: float = 0.1
    layer_decay: float = 1.0  # lr multiplier per block below the head (BEiT / MAE); 1.0 on val (docs/recipes.md)
    drop_path: float = 0.1
    mixup: float = 0.0  # Beta(alpha, alpha) mixing of pairs within a batch; 0 turns it off
    init: str = "checkpoint"  # checkpoint: M or --checkpoint | random: from scratch, the model section's shape (the control)

    def __post_init__(self):
        super().__post_init__()
        _check_init(self.init)
        _check(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay}")
        _check(0 <= self.drop_path < 1, f"drop_path must be in [0, 1), got {self.drop_path}")
        _check(self.mixup >= 0, f"mixup must be non-negative, got {self.mixup}")


@dataclass(frozen=True)
class VideoConfig(FinetuneConfig):
    """Pseudo-video training; batch_size counts images (batch_size // clip_len clips per step)."""

    epochs: int = 40  # the study's 25 stopped short of convergence (docs/recipes.md, "Pseudo-video epochs")
    warmup_epochs: float = 3.0
    batch_size: int = 64  # 4 clips per step, with lr 8e-3: the pilots' recipe (docs/recipes.md)
    lr: float = 8e-3
    label_smoothing: float = 0.0
    drop_path: float = 0.0
    clip_len: int = 16
    st_blocks: int = 1  # spatio-temporal blocks: temporal transformer blocks on top of M
    temporal: str = "transformer"  # transformer | mean (average the frame CLS tokens, no temporal blocks)
    # weight of the per-frame cross-entropy added to the clip's (0: the study's clip loss alone; 4 on val: docs/recipes.md)
    frame_loss: float = 4.0
    frame_clip_len: int = 1  # the frame loss classifies every frame as a static clip of this many copies (docs/recipes.md)

    def __post_init__(self):
        super().__post_init__()
        _check(self.clip_len >= 2, f"clip_len must be at least 2, got {self.clip_len}")
        _check(self.batch_size >= self.clip_len, f"batch_size {self.batch_size} holds no clip of {self.clip_len}")
        _check(self.st_blocks >= 1, f"st_blocks must be at least 1, got {self.st_blocks}")
        _check(self.temporal in ("transformer", "mean"), f"temporal must be transformer or mean, got {self.temporal!r}")
        _check(self.mixup == 0, "mixup is not used by the video stage")
        _check(self.frame_loss >= 0, f"frame_loss must be non-negative, got {self.frame_loss}")
        _check(1 <= self.frame_clip_len <= self.clip_len,
               f"frame_clip_len must be in [1, clip_len {self.clip_len}], got {self.frame_clip_len}")


@dataclass(frozen=True)
class AnalyzeConfig:
    before: str = ""  # default: this run's model M (<out>/ssl/model.pt)
    after: str = ""  # default: this run's fine-tuned model (<out>/finetune/model.pt)
    samples: tuple = ()  # test indices for the figures; default: 3 seeded, of different classes
    batch_size: int = 1000

    def __post_init__(self):
        _check(self.batch_size >= 4, f"analyze batch_size must be at least 4, got {self.batch_size}")
        _check(all(isinstance(i, int) and i >= 0 for i in self.samples), f"samples must be test indices, got {self.samples}")


@dataclass(frozen=True)
class CaptionsConfig:
    """Stage 7a: BLIP captions every image, CLIP embeds each caption (Ray Data, one actor pool per model)."""

    blip_model: str = "Salesforce/blip-image-captioning-base"  # a Hugging Face hub id or a local folder
    clip_model: str = "ViT-B-32"  # an open_clip name, local-dir:PATH or hf-hub:ID
    clip_pretrained: str = "laion2b_s34b_b79k"  # open_clip's tag for a named model (local-dir: / hf-hub: ignore it)
    max_new_tokens: int = 20
    actors: int = 1  # actors per model (each takes one GPU when Ray has GPUs)
    batch_size: int = 64  # images per actor call

    def __post_init__(self):
        _check(bool(self.blip_model) and bool(self.clip_model), "blip_model and clip_model must not be empty")
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        _check(self.actors >= 1 and self.batch_size >= 1,
               f"actors and batch_size must be at least 1, got {self.actors}, {self.batch_size}")


@dataclass(frozen=True)
class FusionConfig(VideoConfig):
    """Stage 7b: the video model plus a cross-attention block over its frames' caption embeddings."""

    st_blocks: int = 2  # the study fuses captions into the two-block model
    # starts from a trained video model of this shape: default <out>/video_<st_blocks>/model.pt when
    # it exists, else from M with new temporal blocks
    video_checkpoint: str = ""
    captions: str = ""  # the captions table; default <out>/captions/captions.parquet
    epochs: int = 10  # a short schedule for the new block on a trained video model, not tuned (docs/recipes.md)
    warmup_epochs: float = 1.0
    lr: float = 2e-3

    def __post_init__(self):
        super().__post_init__()
        _check(self.temporal == "transformer", "fusion needs temporal=transformer (its queries are the temporal tokens)")


@dataclass(frozen=True)
class Config:
    """Everything one run needs; saved as config.json beside every result."""

    preset: str = "smoke"
    out: str = ""  # default runs/<preset>
    seed: int = 0
    num_workers: int = 1  # Ray Train workers (DDP); the local launcher runs one
    cpus_per_worker: int = 0  # 0: this machine's CPUs shared by the workers (inside a Tune trial: those still free)
    gpus_per_worker: float = 1.0  # when a GPU is used (--use-gpu)
    use_gpu: str = "auto"  # auto | true | false
    launcher: str = "ray"  # ray: TorchTrainer | local: the same fit in-process, no Ray
    max_failures: int = 1
    checkpoint: str = ""  # the encoder for probe / finetune / video, and analyze's "before"; default <out>/ssl/model.pt
    verbose: bool = False  # Ray's own log lines on the console too (no result depends on it)
    address: str = ""  # a Ray cluster to join (default RAY_ADDRESS; none: a new local Ray on loopback)
    storage: str = ""  # a shared folder or s3://... that every node reaches: results, checkpoints (storage.py)
    tensorboard: bool = True  # event files in every trained stage's folder (tracking.py)
    mlflow: str = ""  # an MLflow tracking URI or folder (--mlflow alone: mlruns/); empty: no MLflow runs
    data: DataConfig = field(default_factory=DataConfig)
    model: ViTConfig = field(default_factory=ViTConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def __post_init__(self):
        _check(self.preset in PRESETS, f"unknown preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        _check(self.num_workers >= 1, f"num_workers must be at least 1, got {self.num_workers}")
        _check(self.cpus_per_worker >= 0, f"cpus_per_worker must be non-negative, got {self.cpus_per_worker}")
        _check(self.gpus_per_worker > 0, f"gpus_per_worker must be positive, got {self.gpus_per_worker}")
        _check(self.launcher == "ray" or self.num_workers == 1,
               f"the local launcher runs one worker, got num_workers {self.num_workers}: use --launcher ray")
        _check(self.use_gpu in ("auto", "true", "false"), f"use_gpu must be auto, true or false, got {self.use_gpu!r}")
        _check(self.launcher in ("ray", "local"), f"launcher must be ray or local, got {self.launcher!r}")
        from raysslvit.data import IMG_SIZE

        _check(self.model.img_size == IMG_SIZE,
               f"img_size must be {IMG_SIZE}: every data source gives {IMG_SIZE}x{IMG_SIZE} images, got {self.model.img_size}")

    @property
    def out_dir(self) -> str:
        return self.out or os.path.abspath(os.path.join("runs", self.preset))

    def to_dict(self) -> dict:
        return asdict(self)


SECTIONS = {"data": DataConfig, "model": ViTConfig, "ssl": SSLConfig, "probe": ProbeConfig,
            "finetune": FinetuneConfig, "analyze": AnalyzeConfig, "video": VideoConfig,
            "captions": CaptionsConfig, "fusion": FusionConfig}

PRESETS = {
    # Embedded sample, tiny model, every stage in under a minute; 12 rotated patches: a tiny model learns the angle from them.
    "smoke": {
        "data.data": "sample",
        "model.embed_dim": 64, "model.depth": 2, "model.num_heads": 2,
        "ssl.epochs": 20, "ssl.batch_size": 64, "ssl.lr": 2e-3, "ssl.warmup_epochs": 1,
        "ssl.subset_ratio": 1.0, "ssl.mask_ratio": 0.25,
        "probe.epochs": 30, "probe.batch_size": 512,
        "finetune.epochs": 10, "finetune.batch_size": 128, "finetune.warmup_epochs": 1,
        "video.epochs": 4, "video.batch_size": 128, "video.lr": 2e-3, "video.warmup_epochs": 1,
        "fusion.epochs": 3, "fusion.batch_size": 128,
    },
    # Full CIFAR-10, a model sized for a 2-core machine, the study's epochs; stem and masking chosen on val (docs/recipes.md).
    "cpu": {
        "data.data": "cifar10",
        "model.embed_dim": 128, "model.depth": 4, "model.num_heads": 4, "model.stem": "conv",
        "ssl.epochs": 20, "ssl.subset_ratio": 1.0, "ssl.mask_ratio": 0.125, "finetune.epochs": 50,
    },
    # Full CIFAR-10, a GPU-sized model, the study's epochs.
    "seed": {
        "data.data": "cifar10",
        "model.embed_dim": 384, "model.depth": 6, "model.num_heads": 6,
        "ssl.epochs": 20, "ssl.batch_size": 512, "finetune.epochs": 50, "finetune.batch_size": 512,
        # the video recipe chosen on the cpu preset is not assumed for this wider model
        "video.batch_size": 512, "video.lr": 2e-3, "video.label_smoothing": 0.1, "video.drop_path": 0.1,
        "fusion.batch_size": 512,
    },
}


# Fields that name files or folders: made absolute on the driver (Ray workers and Tune trials run in
# other folders); run folders fingerprint what such a file holds, not where it is.
PATH_KEYS = ("data.data_dir", "data.data_root", "out", "checkpoint", "analyze.before", "analyze.after",
             "fusion.video_checkpoint", "fusion.captions")
# Fields that change how fast a result is made, not the result: left out of fingerprints.
RUNTIME_KEYS = ("captions.actors", "captions.batch_size")


def parse_assignments(items: list[str]) -> dict:
    """`--set SECTION.FIELD=VALUE` items as overrides for `build_config`."""
    overrides = {}
    for item in items:
        key, eq, value = item.partition("=")
        _check(bool(eq), f"--set expects SECTION.FIELD=VALUE, got {item!r}")
        overrides[key] = value
    return overrides


def parse_value(cls, name: str, value):
    """A CLI / YAML / Tune value (text, or a number such as `depth: 4.0`) as the type of field `name`
    of dataclass `cls`: coerced when no information is lost, else a user error naming the field."""
    f = {f.name: f for f in fields(cls)}.get(name)
    _check(f is not None, f"unknown config field {name!r} of {cls.__name__}")
    kind = type(f.default) if f.default is not dataclasses.MISSING else str
    if kind is tuple:
        items = value.split(",") if isinstance(value, str) else value
        _check(isinstance(items, (list, tuple)), f"{name} must be a list of numbers, got {value!r}")
        return tuple(_number(name, v) for v in items if not (isinstance(v, str) and not v.strip()))
    return _coerce(kind, name, value)


def _number(name: str, value):
    """An int when the value is integral text or an int, else a float."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else _coerce(float, name, value)


def _coerce(kind: type, name: str, value):
    bad = UserError(f"{name} must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}")
    if kind is bool:
        text = str(value).lower()
        _check(text in ("true", "false", "1", "0"), f"{name} must be true or false, got {value!r}")
        return text in ("true", "1")
    if isinstance(value, bool):
        raise bad
    if kind is str:
        if not isinstance(value, str):
            raise bad
        return value
    try:
        number = float(value) if kind is int and not isinstance(value, int) else kind(value)
    except (TypeError, ValueError):
        raise bad from None
    if kind is int and not isinstance(number, int):
        if not float(number).is_integer():
            raise bad
        number = int(number)
    return number


def build_config(preset: str = "smoke", overrides: dict | None = None) -> Config:
    """Preset values, then `overrides` ({"ssl.epochs": 3, "seed": 1}), validated once at the end."""
    _check(preset in PRESETS, f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **(overrides or {})}
    top, sections = {"preset": preset}, {name: {} for name in SECTIONS}
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        if section:
            _check(section in SECTIONS, f"unknown config section {section!r} in {key!r}")
            sections[section][name] = parse_value(SECTIONS[section], name, value)
        else:
            top[name] = parse_value(Config, name, value)
    if sections["data"].get("data_dir"):
        sections["data"]["data"] = "dir"
    top["out"] = top.get("out") or os.path.join("runs", preset)
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        where = sections[section] if section else top
        if where.get(name):
            where[name] = os.path.abspath(os.path.expanduser(where[name]))
    built = {name: cls(**sections[name]) for name, cls in SECTIONS.items()}
    return Config(**top, **built)


def with_changes(cfg: Config, changes: dict) -> Config:
    """`cfg` with typed values changed by key ({"video.st_blocks": 2, "checkpoint": path}), validated."""
    top, sections = {}, {}
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (sections.setdefault(section, {}) if section else top)[name] = value
    return dataclasses.replace(cfg, **top, **{s: dataclasses.replace(getattr(cfg, s), **v) for s, v in sections.items()})


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config saved by `Config.to_dict` (checkpoints, config.json)."""
    d = dict(d)
    built = {name: cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop(name).items()})
             for name, cls in SECTIONS.items()}
    return Config(**d, **built)
