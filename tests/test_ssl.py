import torch

from raysslvit.ssl import (SSLHeads, corrupt, masked_rotation_loss, patchify, recon_targets, split_counts,
                           unpatchify)
from raysslvit.vit import ViTConfig, VisionTransformer


def _images(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=g)  # no natural zeros


def test_patchify_round_trip_and_order():
    x = _images(2)
    p = patchify(x, 8)
    assert p.shape == (2, 16, 3, 8, 8)
    assert torch.equal(p[:, 1], x[:, :, 0:8, 8:16])  # row-major: patch 1 is the second in the top row
    assert torch.equal(p[:, 4], x[:, :, 8:16, 0:8])
    assert torch.equal(unpatchify(p, 4, 4), x)


def test_corruption_is_exact():
    x = _images()
    c = corrupt(x, 8, 0.5, 0.5, torch.Generator().manual_seed(1))
    before, after = patchify(x, 8), patchify(c.images, 8)
    assert c.masked_idx.shape == (6, 4) and c.rotated_idx.shape == (6, 4) and c.targets.shape == (6, 4, 3, 8, 8)
    for b in range(len(x)):
        masked, rotated = c.masked_idx[b].tolist(), c.rotated_idx[b].tolist()
        assert len(set(masked + rotated)) == 8  # set A: half of the 16 patches, no overlap
        black = [i for i in range(16) if (after[b, i] == 0).all()]
        assert sorted(black) == sorted(masked)  # exactly the 4 masked patches are all black
        k = int(c.rot_label[b])
        for i in rotated:
            assert torch.equal(after[b, i], torch.rot90(before[b, i], k, dims=(-2, -1)))
        for i in set(range(16)) - set(masked) - set(rotated):
            assert torch.equal(after[b, i], before[b, i])
        assert torch.equal(c.targets[b], before[b, masked])


def test_images_are_corrupted_independently():
    x = _images(64)
    c = corrupt(x, 8, 0.5, 0.5, torch.Generator().manual_seed(2))
    assert len({tuple(sorted(m)) for m in c.masked_idx.tolist()}) > 32
    assert set(c.rot_label.tolist()) == {0, 1, 2, 3}


def test_ratios_set_the_counts():
    assert split_counts(16, 0.5, 0.5) == (4, 4)
    assert split_counts(16, 0.75, 0.25) == (3, 9)
    c = corrupt(_images(3), 8, 1.0, 0.75)
    assert c.masked_idx.shape == (3, 12) and c.rotated_idx.shape == (3, 4)


def test_recon_targets_normalise():
    t = recon_targets(_images(4)[:, None, :, :8, :8], norm_pix=True)
    assert t.shape == (4, 1, 192)
    assert torch.allclose(t.mean(-1), torch.zeros(4, 1), atol=1e-4)


def test_ssl_loss_falls_in_a_few_steps():
    torch.manual_seed(0)
    model = SSLHeads(VisionTransformer(ViTConfig(embed_dim=32, depth=1, num_heads=2)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = _images(32)
    c = corrupt(x, 8, 0.5, 0.5, torch.Generator().manual_seed(3))  # one fixed batch to overfit
    target = recon_targets(c.targets)
    losses = []
    for _ in range(30):
        rot, recon = model((c.images.float() / 255 - 0.5) / 0.25, c.masked_idx)
        loss, parts = masked_rotation_loss(rot, c.rot_label, recon, target, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(parts) == {"rot_ce", "recon_mse"}
    assert losses[-1] < 0.7 * losses[0]


def test_info_nce_prefers_matching_pairs_and_falls():
    from raysslvit.ssl import ContrastiveHeads, info_nce_loss

    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    matched, _ = info_nce_loss(z, z + 0.01, 0.2)
    shuffled, parts = info_nce_loss(z, z.roll(1, 0), 0.2)
    assert matched < shuffled and parts["pair_acc"] < 0.5
    torch.manual_seed(0)
    model = ContrastiveHeads(VisionTransformer(ViTConfig(embed_dim=32, depth=1, num_heads=2)), proj_dim=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randn(32, 3, 32, 32)
    losses = []
    for _ in range(20):
        z1, z2 = model(torch.cat([x, x + 0.1 * torch.randn_like(x)])).chunk(2)
        loss, _ = info_nce_loss(z1, z2, 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
