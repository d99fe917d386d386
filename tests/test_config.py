import json

import pytest

from raysslvit.config import PRESETS, build_config, config_from_dict
from raysslvit.errors import UserError


def test_presets_build_and_round_trip_through_json():
    for name in PRESETS:
        cfg = build_config(name)
        assert cfg.preset == name
        assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_overrides_use_field_names_and_types():
    cfg = build_config("cpu", {"ssl.mask_ratio": "0.75", "finetune.augment": "false", "seed": "3",
                               "probe.weight_decays": "0,1e-3", "data.data_dir": "some/dir"})
    assert cfg.ssl.mask_ratio == 0.75 and cfg.finetune.augment is False and cfg.seed == 3
    assert cfg.probe.weight_decays == (0, 1e-3)
    assert cfg.data.data == "dir" and cfg.data.data_dir.endswith("some/dir") and cfg.data.data_dir.startswith("/")
    assert cfg.out_dir.endswith("runs/cpu")


@pytest.mark.parametrize("key,value,needle", [
    ("ssl.subset_ratio", "1.5", "subset_ratio"),
    ("ssl.mask_ratio", "-0.1", "mask_ratio"),
    ("model.patch_size", "7", "does not divide"),
    ("ssl.objective", "byol", "unknown objective"),
    ("nosuch.field", "1", "unknown config section"),
    ("ssl.nosuch", "1", "unknown config field"),
    ("finetune.augment", "maybe", "true or false"),
    ("data.val_fraction", "1", "val_fraction"),
    ("finetune.trivial_augment", "1.5", "trivial_augment"),
    ("model.img_size", "48", "img_size must be 32"),
    ("model.stem", "resnet", "unknown stem"),
    ("video.frame_clip_len", "17", "frame_clip_len"),
    ("finetune.init", "scratch", "unknown init .scratch.: use checkpoint or random"),
])
def test_invalid_values_are_user_errors(key, value, needle):
    with pytest.raises(UserError, match=needle):
        build_config("smoke", {key: value})


def test_values_from_outside_the_cli_are_coerced_when_nothing_is_lost():
    """A Tune space or YAML gives numbers and strings of the wrong type: `depth: 4.0`, `mask_ratio: "0.5"`."""
    cfg = build_config("smoke", {"model.depth": 4.0, "ssl.mask_ratio": "0.5", "ssl.epochs": "3.0", "seed": 2,
                                 "ssl.lr": 1, "probe.weight_decays": [0, "1e-3"], "finetune.augment": 0})
    assert cfg.model.depth == 4 and type(cfg.model.depth) is int and cfg.ssl.epochs == 3
    assert cfg.ssl.mask_ratio == 0.5 and type(cfg.ssl.lr) is float and cfg.probe.weight_decays == (0, 1e-3)
    assert cfg.finetune.augment is False


@pytest.mark.parametrize("key,value,needle", [
    ("model.depth", 4.5, "depth must be an int, got 4.5"),
    ("ssl.epochs", "2.5", "epochs must be an int"),
    ("ssl.mask_ratio", "half", "mask_ratio must be a float"),
    ("seed", True, "seed must be an int"),
    ("ssl.objective", 3, "objective must be a str"),
    ("probe.weight_decays", "0,x", "weight_decays must be a float"),
    ("num_workers", 2, "local launcher runs one worker"),
])
def test_lossy_or_wrong_values_name_their_field(key, value, needle):
    with pytest.raises(UserError, match=needle):
        build_config("smoke", {key: value, **({"launcher": "local"} if key == "num_workers" else {})})
