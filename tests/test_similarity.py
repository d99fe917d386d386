import torch
import torch.nn.functional as F

from raysslvit.metrics.similarity import cls_patch_similarity, focus, similarity_map, token_similarity


def test_maps_agree_with_a_direct_per_sample_computation():
    tokens = torch.randn(3, 17, 24, generator=torch.Generator().manual_seed(0))
    sim = cls_patch_similarity(tokens)
    maps = similarity_map(tokens)
    full = token_similarity(tokens)
    for b in range(3):
        direct = torch.tensor([F.cosine_similarity(tokens[b, 0], tokens[b, i], dim=0) for i in range(1, 17)])
        assert torch.allclose(sim[b], direct, atol=1e-6)
        assert torch.allclose(full[b, 0, 1:], direct, atol=1e-6)
        up = F.interpolate(direct.view(1, 1, 4, 4), size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
        assert torch.allclose(maps[b], up, atol=1e-6)
    assert maps.shape == (3, 32, 32) and full.shape == (3, 17, 17)
    assert torch.allclose(full.diagonal(dim1=1, dim2=2), torch.ones(3, 17), atol=1e-6)


def test_focus_ranks_a_peaked_map_above_a_flat_one():
    flat, peaked = torch.zeros(1, 16), torch.zeros(1, 16)
    peaked[0, :2] = 5.0
    (h_flat, m_flat), (h_peak, m_peak) = focus(flat), focus(peaked)
    assert torch.allclose(h_flat, torch.log(torch.tensor([16.0])))
    assert torch.allclose(m_flat, torch.tensor([0.25]))
    assert h_peak < h_flat and m_peak > m_flat
