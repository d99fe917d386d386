import os

import numpy as np
import pytest
import torch
from PIL import Image

from raysslvit.data import augment, load_image_folder, load_sample, load_splits, shard_batches, stratified_holdout
from raysslvit.errors import UserError


def write_tree(root, classes=("a", "b"), n=3, size=32, splits=("train", "test")):
    rng = np.random.default_rng(0)
    for split in splits:
        for cls in classes:
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, cls, f"{i}.png"))
    return str(root)


def test_embedded_sample_is_cifar10_shaped():
    train_x, train_y, test_x, test_y, classes = load_sample()
    assert train_x.shape == (2500, 32, 32, 3) and test_x.shape == (500, 32, 32, 3)
    assert classes[0] == "airplane" and len(classes) == 10
    assert np.bincount(train_y).tolist() == [250] * 10


def test_validation_split_is_stratified_and_held_out():
    s = load_splits("sample", val_fraction=0.1, split_seed=3)
    assert len(s.val_y) == 250 and len(s.train_y) == 2250
    assert torch.bincount(s.val_y).tolist() == [25] * 10
    # no val image is also a train image
    flat = lambda x: {bytes(v) for v in x.flatten(1).numpy()}
    assert not flat(s.val_x) & flat(s.train_x)
    again = load_splits("sample", val_fraction=0.1, split_seed=3)
    assert torch.equal(again.val_x, s.val_x)


def test_holdout_of_a_tiny_class_is_a_clear_error():
    with pytest.raises(UserError, match="too few"):
        stratified_holdout(torch.tensor([0, 0, 0, 1]), 0.5, 0)


def test_image_folder_cache_is_reused_and_rebuilt_on_change(tmp_path):
    root = write_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    first = load_image_folder(root, str(cache))
    assert first[0].shape == (6, 32, 32, 3) and first[4] == ["a", "b"]
    assert len(os.listdir(cache)) == 1
    load_image_folder(root, str(cache))
    assert len(os.listdir(cache)) == 1  # reused
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(os.path.join(root, "train", "a", "new.png"))
    changed = load_image_folder(root, str(cache))
    assert changed[0].shape[0] == 7 and len(os.listdir(cache)) == 2


def test_augment_flips_and_crops_in_one_batch():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 32, 32)
    x = x.repeat(64, 1, 1, 1)
    out = augment(x, pad=0, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, x)]
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)
    cropped = augment(x, pad=4, generator=torch.Generator().manual_seed(0))
    assert cropped.shape == x.shape and cropped.dtype == torch.uint8
    assert (cropped == 0).any()  # some padding shows


def test_trivial_augment_draws_one_op_per_chunk_under_torch_seed():
    from raysslvit.data import trivial_augment

    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out = trivial_augment(x, chunk=16)
    torch.manual_seed(0)
    assert torch.equal(trivial_augment(x, chunk=16), out)  # fit's seed drives the draws
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert any(not torch.equal(o, i) for o, i in zip(out.split(16), x.split(16)))
    assert trivial_augment(x.view(4, 16, 3, 32, 32)).shape == (4, 16, 3, 32, 32)  # clips
    assert torch.equal(trivial_augment(x, p=0.0), x)


def test_shards_are_disjoint_and_equal():
    shards = [torch.cat(shard_batches(103, 10, r, 3, seed=5)) for r in range(3)]
    assert all(len(s) == 34 for s in shards)
    assert len(set(torch.cat(shards).tolist())) == 102
    assert torch.equal(torch.cat(shard_batches(103, 10, 0, 3, seed=5)), shards[0])  # seeded


def test_simclr_views_are_batched_random_and_normalised():
    from raysslvit.data import simclr_augment

    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = simclr_augment(x, generator=torch.Generator().manual_seed(1))
    b = simclr_augment(x, generator=torch.Generator().manual_seed(2))
    again = simclr_augment(x, generator=torch.Generator().manual_seed(1))
    assert a.shape == (64, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, again) and not torch.allclose(a, b)
    assert a.min() >= -2.1 and a.max() <= 2.2  # within the normalised range of [0, 1] pixels


def test_a_process_handed_its_data_never_reads_the_data_folder(tmp_path, monkeypatch):
    """A Tune trial on a node without the data folder: the driver's splits and digest, handed over."""
    from raysslvit import data
    from raysslvit.config import build_config
    from raysslvit.data import hand
    from raysslvit.rundir import stage_fingerprint
    from raysslvit.stages.common import load_data

    monkeypatch.setattr(data, "_handed", {})  # this process's, for this test only
    sample = load_data(build_config("smoke", {}))
    cfg = build_config("smoke", {"data.data": "dir", "data.data_dir": str(tmp_path / "on-the-driver-only")})
    hand(cfg.data.data, cfg.data.data_dir, cfg.data.val_fraction, cfg.data.split_seed, "dir:driver's", sample)
    assert load_data(cfg) is sample
    assert stage_fingerprint(cfg, "ssl")["data"]["source"] == "dir:driver's"
