import os

from raysslvit.config import build_config
from raysslvit.launch import latest_checkpoint, same_fingerprint, stage_fingerprint, _write_checkpoint


def test_fingerprint_tells_configs_apart_and_tolerates_fields_added_later():
    a = stage_fingerprint(build_config("smoke"), "ssl")
    assert same_fingerprint(a, stage_fingerprint(build_config("smoke"), "ssl"))
    assert not same_fingerprint(a, stage_fingerprint(build_config("smoke", {"ssl.mask_ratio": 0.75}), "ssl"))
    assert not same_fingerprint(a, stage_fingerprint(build_config("smoke", {"seed": 1}), "ssl"))
    assert same_fingerprint(a, stage_fingerprint(build_config("smoke", {"finetune.lr": 0.1}), "ssl"))
    older = {**a, "ssl": {k: v for k, v in a["ssl"].items() if k != "temperature"}}  # saved before the field existed
    assert same_fingerprint(older, a)
    assert not same_fingerprint(older, stage_fingerprint(build_config("smoke", {"ssl.temperature": 0.5}), "ssl"))
    assert not same_fingerprint(None, a)


def test_latest_checkpoint_is_the_highest_epoch(tmp_path):
    stage = tmp_path / "ssl"
    assert latest_checkpoint(str(stage)) is None
    for run, epoch in (("ray-1", 3), ("local-2", 5), ("ray-3", 4)):
        _write_checkpoint(str(stage / "checkpoints" / run / f"checkpoint_{epoch}"), {"epoch": epoch}, {"epoch": epoch})
    assert os.path.basename(latest_checkpoint(str(stage))) == "checkpoint_5"
