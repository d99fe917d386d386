"""What the stages share, resolved on the driver: the data (decoded and validated once per process)
and the encoder weights a stage starts from (checked once, then handed to workers by value)."""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from raysslvit.config import Config
from raysslvit.data import Splits, handed, load_splits, source_digest
from raysslvit.errors import UserError
from raysslvit.vit import ViTConfig, VisionTransformer

_decoded: dict[tuple, Splits] = {}


def load_data(cfg: Config) -> Splits:
    """The config's splits, decoded (and so validated) once per process while the source's content
    is unchanged: every stage of a study uses the same ones."""
    d = cfg.data
    if (given := handed(d.data, d.data_dir, d.val_fraction, d.split_seed)) is not None:
        return given
    key = (d.data, d.data_dir, d.data_root, d.val_fraction, d.split_seed, source_digest(d.data, d.data_dir))
    if key not in _decoded:
        _decoded.clear()  # one source at a time: a study uses one
        _decoded[key] = load_splits(d.data, d.data_dir, d.data_root, d.val_fraction, d.split_seed)
    return _decoded[key]


def encoder_path(cfg: Config, default_stage: str = "ssl") -> str:
    """--checkpoint, or this run's model M; a clear error when it does not exist."""
    path = cfg.checkpoint or os.path.join(cfg.out_dir, default_stage, "model.pt")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path} (run `python -m raysslvit {default_stage}` first "
                        f"or pass --checkpoint PATH)")
    return path


def read_checkpoint(path: str) -> dict:
    """A raysslvit model.pt: {"stage", "model_config", "state_dict"}; a clear error otherwise."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code runs
        ViTConfig(**saved["model_config"]), saved["state_dict"], saved["stage"]
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"not a raysslvit checkpoint: {path} ({type(e).__name__})") from None
    if not any(k.startswith("encoder.") for k in saved["state_dict"]):
        raise UserError(f"{path} holds no encoder (it is a {saved['stage']} result)")
    return saved


def encoder_from(saved: dict, **changes) -> VisionTransformer:
    """The encoder of a checkpoint of `read_checkpoint` (its config travels with it), optionally
    reconfigured (e.g. drop_path for fine-tuning)."""
    encoder = VisionTransformer(replace(ViTConfig(**saved["model_config"]), **changes))
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in saved["state_dict"].items() if k.startswith("encoder.")})
    return encoder


def load_encoder(path: str, **changes) -> VisionTransformer:
    """The encoder of any raysslvit model.pt."""
    return encoder_from(read_checkpoint(path), **changes)
