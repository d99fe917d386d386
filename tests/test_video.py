import pytest
import torch

from raysslvit.data import ClipSampler
from raysslvit.errors import UserError
from raysslvit.video import VideoTransformer
from raysslvit.vit import ViTConfig, VisionTransformer


def labels(per_class=(40, 35, 50)):
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]


def test_clips_hold_one_class_and_no_image_twice():
    y = labels()
    s = ClipSampler(y, clip_len=8, seed=1)
    clips = s.clips()
    assert clips.shape == (5 + 4 + 6, 8)
    assert all(len(set(y[c].tolist())) == 1 for c in clips)
    assert len(set(clips.flatten().tolist())) == clips.numel()  # each image at most once per epoch
    assert set(y[clips[:3, 0]].tolist()) == {0, 1, 2}  # classes interleaved, not in blocks


def test_epochs_reshuffle_and_are_seeded():
    s = ClipSampler(labels(), clip_len=8, seed=1)
    first = s.clips()
    s.set_epoch(1)
    assert not torch.equal(first, s.clips())
    s.set_epoch(0)
    assert torch.equal(first, s.clips())


def test_workers_get_disjoint_equal_shares():
    y = labels()
    shards = [ClipSampler(y, 8, seed=2, rank=r, world_size=3).clips() for r in range(3)]
    assert {len(s) for s in shards} == {5}
    seen = torch.cat([s.flatten() for s in shards]).tolist()
    assert len(seen) == len(set(seen))


def test_a_class_smaller_than_a_clip_is_an_error():
    with pytest.raises(UserError, match="fewer than one clip"):
        ClipSampler(labels((40, 5, 30)), clip_len=16)


@pytest.fixture
def m():
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(embed_dim=32, depth=3, num_heads=2)).eval()


@pytest.mark.parametrize("st_blocks", [1, 2])
def test_weights_start_from_model_m(m, st_blocks):
    v = VideoTransformer(m, 10, clip_len=4, st_blocks=st_blocks)
    assert v.encoder is m and len(v.temporal_blocks) == st_blocks
    for blk, source in zip(v.temporal_blocks, m.blocks[-st_blocks:]):
        for (name, p), q in zip(blk.named_parameters(), source.parameters()):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name  # a copy, not shared
    assert torch.equal(v.temporal_cls, m.cls_token)


@pytest.mark.parametrize("temporal", ["transformer", "mean"])
def test_static_clip_shortcut_equals_the_naive_forward(m, temporal):
    v = VideoTransformer(m, 10, clip_len=16, st_blocks=2, temporal=temporal).eval()
    images = torch.randn(3, 3, 32, 32)
    naive = v(images[:, None].expand(-1, 16, -1, -1, -1))
    assert torch.allclose(v.static_logits(v.encoder(images), 16), naive, atol=1e-5)
    assert v(torch.randn(2, 5, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("frame_clip_len", [1, 4])
def test_frame_logits_are_each_frame_as_a_static_clip(m, frame_clip_len):
    v = VideoTransformer(m, 10, clip_len=4, st_blocks=1).eval()
    clips = torch.randn(2, 4, 3, 32, 32)
    logits, frames = v(clips, frame_clip_len)
    assert torch.allclose(logits, v(clips)) and frames.shape == (2, 4, 10)
    assert torch.allclose(frames.flatten(0, 1), v.static_logits(v.encoder(clips.flatten(0, 1)), frame_clip_len), atol=1e-5)
