"""Every registered model: forward, backward, finite values; the paper's parameter count."""

import pytest
import torch
from torch import nn

from dprandp.errors import InputError
from dprandp.models import ProjectionHead, create_model, list_models, register_model


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_finite(name):
    model = create_model(name, num_classes=7, seed=0)
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    assert out.shape == (3, 7)
    out.square().sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", list_models())
def test_no_inplace_activations(name):
    model = create_model(name, seed=0)
    for m in model.modules():
        assert not getattr(m, "inplace", False), m


def test_wrn_16_4_parameter_count():
    model = create_model("wrn-16-4", num_classes=10, seed=0)
    trunk = sum(p.numel() for p in model.trunk.parameters())
    assert 2.7e6 <= trunk <= 2.8e6
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(model.PRIOR_LACKS))
    assert head == 2 * 256 + 256 * 10 + 10


def test_seeded_creation_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = create_model("wrn-10-1", seed=5)
    after = torch.rand(1)
    b = create_model("wrn-10-1", seed=5)
    assert torch.equal(before, after)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_projection_head_unit_norm():
    head = ProjectionHead(64 * 8 * 8, hidden=128, out_dim=16)
    z = head(torch.randn(4, 64, 8, 8))
    assert z.shape == (4, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)


def test_unknown_model_and_duplicate_registration():
    with pytest.raises(InputError, match="known models"):
        create_model("resnet-1000")
    with pytest.raises(ValueError, match="already registered"):
        register_model("wrn-16-4")(lambda **kw: None)


def test_grid_pooled_head_reads_every_cell():
    """head_pool = p: Linear over C p^2 cell means, in channel-major order; p = 1 is the global pool."""
    import torch.nn.functional as F

    model = create_model("wrn-10-1", num_classes=3, seed=0, head_pool=4)
    assert model.head.fc.in_features == 64 * 16 and model.config.head_pool == 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.final_norm(model.trunk(x))  # (2, 64, 8, 8)
        cells = h.reshape(2, 64, 4, 2, 4, 2).mean(dim=(3, 5)).flatten(1)  # 2 x 2 blocks by hand
        torch.testing.assert_close(model(x), F.linear(cells, model.head.fc.weight, model.head.fc.bias))
    one = create_model("wrn-10-1", num_classes=3, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(one(x), one.head.fc(one.final_norm(one.trunk(x)).mean(dim=(2, 3))))
    with pytest.raises(ValueError, match="head_pool"):
        create_model("wrn-10-1", head_pool=0)
