import pytest
import torch

from raysslvit.errors import UserError
from raysslvit.vit import Classifier, ViTConfig, VisionTransformer


@pytest.fixture
def model():
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(embed_dim=48, depth=3, num_heads=3)).eval()


def test_shapes(model):
    x = torch.randn(5, 3, 32, 32)
    assert model.forward_features(x).shape == (5, 17, 48)
    assert model(x).shape == (5, 48)
    assert Classifier(model, 10)(x).shape == (5, 10)


def test_feature_calls_agree(model):
    """forward, forward_features, forward_head and forward_intermediates describe one computation."""
    x = torch.randn(4, 3, 32, 32)
    tokens = model.forward_features(x)
    inter = model.forward_intermediates(x)
    assert torch.allclose(inter["final"], tokens, atol=1e-6)
    assert torch.allclose(model.norm(inter["blocks"][-1]), tokens, atol=1e-6)
    assert torch.equal(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
    assert torch.allclose(model(x), tokens[:, 0], atol=1e-6)
    for i, blk in enumerate(model.blocks):
        assert torch.allclose(blk(inter["inputs"][i]), inter["blocks"][i], atol=1e-6)
        assert torch.allclose(blk.attn_out(inter["inputs"][i]), inter["attn"][i], atol=1e-6)
        if i:
            assert torch.equal(inter["inputs"][i], inter["blocks"][i - 1])
    assert len(inter["blocks"]) == 3 and inter["attn"][0].shape == (4, 17, 48)


def test_cls_shortcut_equals_the_full_forward_and_its_gradients(model):
    """forward_cls skips the last block's non-CLS outputs; logits and every gradient stay the same."""
    x = torch.randn(6, 3, 32, 32)
    clf = Classifier(model, 10)
    full = clf.head(model.forward_features(x)[:, 0])
    fast = clf(x)
    assert torch.allclose(fast, full, atol=1e-5)
    grads = [torch.autograd.grad(out.square().sum(), list(clf.parameters())) for out in (full, fast)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_no_weight_decay_names_exist(model):
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)


def test_bad_shapes_are_user_errors():
    with pytest.raises(UserError, match="does not divide"):
        ViTConfig(patch_size=5)
    with pytest.raises(UserError, match="num_heads"):
        ViTConfig(embed_dim=50, num_heads=4)
    with pytest.raises(UserError, match="power of 2"):
        ViTConfig(img_size=36, patch_size=6, stem="conv")
    with pytest.raises(UserError, match="unknown stem"):
        ViTConfig(stem="resnet")


def test_conv_stem_gives_one_token_per_patch_and_no_mode_dependence():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(embed_dim=48, depth=2, num_heads=3, stem="conv"))
    x = torch.randn(3, 3, 32, 32)
    assert model.patch_embed(x).shape == (3, 48, 4, 4)
    train_out = model.train()(x)
    assert torch.allclose(model.eval()(x), train_out, atol=1e-6)  # no norm layer: same in both modes
    # token j's receptive field is pixels 8j - 7 .. 8j + 7 along each axis: its own patch and the 7
    # pixels above and left of it
    seen = lambda p: [j for j in range(4) if 8 * j - 7 <= p <= 8 * j + 7]  # the tokens pixel p reaches
    for r, c in [(0, 0), (9, 20), (31, 16)]:
        y = x.clone()
        y[:, :, r, c] += 1
        changed = ((model.patch_embed(y) - model.patch_embed(x)).abs().sum(1) > 0)[0]
        expected = torch.zeros(4, 4, dtype=torch.bool)
        expected[seen(r)[0]:seen(r)[-1] + 1, seen(c)[0]:seen(c)[-1] + 1] = True
        assert torch.equal(changed, expected), (r, c)


def test_bench_compares_like_with_like_for_the_conv_stem():
    from raysslvit.bench import bench_step

    result = bench_step(ViTConfig(embed_dim=32, depth=1, num_heads=2, stem="conv"), batch=8, rounds=1,
                        device=torch.device("cpu"))  # asserts equal parameter counts with timm's model
    assert result["throughput_ratio"] > 0
