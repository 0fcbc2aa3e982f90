"""DPSGD step: plain SGD when private parts are off, noise level, chunking invariance, freezing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from dprandp.errors import InputError
from dprandp.models import create_model
from dprandp.privacy import DPSGD, EMA, DPConfig, default_decay




def tiny(seed=0):
    return create_model("wrn-10-1", num_classes=4, seed=seed).double()


def data(b, k=0, seed=0, size=16):
    gen = torch.Generator().manual_seed(seed)
    shape = (b, k, 3, size, size) if k else (b, 3, size, size)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randint(0, 4, (b,), generator=gen)


def config(**kw):
    base = dict(sample_rate=0.1, noise_multiplier=0.0, max_grad_norm=1e9, batch_size=6, augmult=1, physical_batch_size=4)
    base.update(kw)
    return DPConfig(**base)


@pytest.mark.parametrize("k", [0, 2])
def test_no_noise_no_clipping_equals_plain_sgd(k):
    x, y = data(6, k)
    model, ref = tiny(), tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    dp = DPSGD(model, opt, config=config(augmult=max(k, 1)), noise_generator=torch.Generator().manual_seed(0))
    stats = dp.step(x, y)
    # Reference: plain SGD on the mean loss (views averaged per sample, then over the batch of b = B).
    views = x.reshape(-1, 3, 16, 16) if k else x
    loss = F.cross_entropy(ref(views), y.repeat_interleave(max(k, 1)))
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.5 * p.grad
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=n)
    assert stats.batch_size == 6 and stats.clipped_fraction == 0.0
    assert stats.loss == pytest.approx(float(loss.detach()), rel=1e-10)


def test_chunking_invariance_and_step_from_indices():
    x, y = data(7, 2, seed=1)
    results = []
    for chunk in (1, 3, 7, 64):
        model = tiny()
        cfg = config(noise_multiplier=1.3, max_grad_norm=0.7, augmult=2, physical_batch_size=chunk, batch_size=5)
        dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), config=cfg, noise_generator=torch.Generator().manual_seed(9))
        dp.step(x, y)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # Same update through the index API, views produced chunk by chunk.
    model = tiny()
    cfg = config(noise_multiplier=1.3, max_grad_norm=0.7, augmult=2, physical_batch_size=2, batch_size=5)
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), config=cfg, noise_generator=torch.Generator().manual_seed(9))
    seen = []

    def make_views(idx):
        seen.append(idx.numel())
        return x[idx], y[idx]

    dp.step_from_indices(torch.arange(7), make_views)
    results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert seen == [2, 2, 2, 1]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-10, atol=1e-12)


def test_noise_std_on_zero_gradients():
    """Zero gradients (zero head, so dL/dparams = 0 except the head bias, which we freeze):
    the update is pure noise with std sigma*C/B per coordinate."""
    model = create_model("wrn-10-1", num_classes=4, seed=0)
    for n, p in model.named_parameters():
        p.requires_grad_(n == "head.fc.weight")
    with torch.no_grad():
        model.final_norm.norm.weight.zero_()  # features are all zero: the head weight gets zero gradient
        model.final_norm.norm.bias.zero_()
    before = model.head.fc.weight.detach().clone()
    sigma, c, b, lr = 2.0, 0.5, 8, 1.0
    cfg = DPConfig(sample_rate=0.5, noise_multiplier=sigma, max_grad_norm=c, batch_size=b, physical_batch_size=8)
    draws = []
    for seed in range(40):
        with torch.no_grad():
            model.head.fc.weight.copy_(before)
        dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=lr), config=cfg, noise_generator=torch.Generator().manual_seed(seed))
        x, y = data(5, seed=seed)
        stats = dp.step(x.float(), y)
        assert stats.grad_norm == 0.0
        draws.append((model.head.fc.weight.detach() - before).flatten())
    d = torch.cat(draws).double()  # 40 * 4 * 64 = 10240 draws
    expected = sigma * c / b * lr
    # Relative std error of the sample std is ~ 1/sqrt(2n) = 0.7 %; 5 % is > 7 standard errors.
    assert float(d.std()) == pytest.approx(expected, rel=0.05)
    assert abs(float(d.mean())) < 5 * expected / len(d) ** 0.5
    assert stats.noise_std == pytest.approx(expected)


def test_empty_batch_still_adds_noise_and_steps():
    model = tiny()
    before = copy.deepcopy(model.state_dict())
    cfg = config(noise_multiplier=1.0, max_grad_norm=1.0)
    order = []
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), config=cfg, noise_generator=torch.Generator().manual_seed(0))
    x, y = data(0)
    stats = dp.step(x, y, before_update=lambda: order.append(dp.steps_taken))
    assert stats.batch_size == 0 and stats.step == 1 and order == [0]
    changed = [not torch.equal(before[n], p) for n, p in model.named_parameters()]
    assert all(changed)


def test_frozen_params_never_change_and_before_update_sees_grads():
    model = tiny()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(model.PRIOR_LACKS)}
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(model.PRIOR_LACKS))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=0.1)
    dp = DPSGD(model, opt, config=config(noise_multiplier=1.0, max_grad_norm=0.1), noise_generator=torch.Generator().manual_seed(1))
    seen = []
    for s in range(3):
        x, y = data(5, seed=s)
        dp.step(x, y, before_update=lambda: seen.append(model.head.fc.weight.grad is not None))
    assert seen == [True, True, True]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None


def test_all_reduce_hook_sums_before_noise():
    """Two 'ranks' holding halves of a batch, with a fake all-reduce, equal one rank with all of it."""
    x, y = data(6, seed=3)
    cfg = config(noise_multiplier=0.8, max_grad_norm=0.5, batch_size=6)
    full = tiny()
    DPSGD(full, torch.optim.SGD(full.parameters(), lr=1.0), config=cfg, noise_generator=torch.Generator().manual_seed(4)).step(x, y)
    other = tiny()
    other_dp = DPSGD(other, torch.optim.SGD(other.parameters(), lr=1.0), config=cfg, noise_generator=torch.Generator().manual_seed(4))
    # Rank 1's contribution, computed with its own engine (no step).
    from dprandp.privacy import clip_and_sum

    part = clip_and_sum(other, x[3:], y[3:], max_grad_norm=0.5)
    names = [n for n, _ in other_dp.trainable]
    stats1 = torch.tensor([3.0, float(part.per_sample_losses.sum()), float(part.per_sample_norms.sum()), float((part.per_sample_norms > 0.5).sum()), 0.0], dtype=torch.float64)
    rank1 = torch.cat([part.grad_sum[n].flatten() for n in names] + [stats1])
    rank0 = tiny()
    dp0 = DPSGD(rank0, torch.optim.SGD(rank0.parameters(), lr=1.0), config=cfg, noise_generator=torch.Generator().manual_seed(4), all_reduce=lambda t: t + rank1)
    stats = dp0.step(x[:3], y[:3])
    assert stats.batch_size == 6
    for p, q in zip(rank0.parameters(), full.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_config_validation_and_view_mismatch():
    with pytest.raises(InputError, match="noise_multiplier"):
        config(noise_multiplier=-1.0)
    with pytest.raises(InputError, match="max_grad_norm"):
        config(max_grad_norm=0.0)
    with pytest.raises(InputError, match="sample_rate"):
        config(sample_rate=0.0)
    with pytest.raises(InputError, match="augmult"):
        config(augmult=0)
    cfg = DPConfig.for_dataset(num_samples=50_000, batch_size=4096, noise_multiplier=9.3, max_grad_norm=1.0, augmult=16)
    assert cfg.sample_rate == 4096 / 50_000 and cfg.phase(875).steps == 875
    cfg.check_dataset(50_000)
    with pytest.raises(InputError, match="batch_size"):
        cfg.check_dataset(60_000)
    model = tiny()
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), config=config(augmult=2), noise_generator=torch.Generator())
    with pytest.raises(InputError, match="augmult"):
        dp.step(*data(3, k=3))
    with pytest.raises(InputError, match="BatchNorm"):
        bn = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3))
        DPSGD(bn, torch.optim.SGD(bn.parameters(), lr=1.0), config=config(), noise_generator=torch.Generator())


def test_ema_schedule_against_closed_form():
    model = torch.nn.Linear(2, 1, bias=False).double()
    ema = EMA(model)
    values = [1.0, 3.0, -2.0, 5.0]
    with torch.no_grad():
        model.weight.fill_(0.5)
    ema = EMA(model)
    expected = 0.5
    for t, v in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update(model)
        d = min(0.9999, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * v
    assert default_decay(0) == pytest.approx(0.1) and default_decay(10**6) == 0.9999
    clone = ema.averaged_model(model)
    assert float(clone.weight.detach()[0, 0]) == pytest.approx(expected, rel=1e-12)
    assert float(model.weight.detach()[0, 0]) == 5.0
    state = ema.state_dict()
    other = EMA(model)
    other.load_state_dict(state)
    other.copy_to(model)
    assert float(model.weight.detach()[0, 0]) == pytest.approx(expected, rel=1e-12) and other.updates == 4


def test_changing_trainable_set_after_construction_is_refused():
    model = tiny()
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), config=config(), noise_generator=torch.Generator())
    model.head.fc.bias.requires_grad_(False)
    with pytest.raises(InputError, match="trainable parameters changed"):
        dp.step(*data(2))


def test_a_non_finite_sample_is_dropped_and_counted_not_spread():
    """One sample that overflows: the step stays finite, the sample is counted as dropped, and the
    statistics are those of the others (a reference DPSGD run on the batch without it)."""
    x, y = data(6, k=2, seed=3)
    x[4, 1, 0, 0, 0] = float("nan")
    keep = [0, 1, 2, 3, 5]
    runs = {}
    for name, (xs, ys) in {"with": (x, y), "without": (x[keep], y[keep])}.items():
        model = tiny()
        dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), config=config(augmult=2, max_grad_norm=0.5),
                   noise_generator=torch.Generator().manual_seed(0))
        runs[name] = (dp.step(xs, ys), model)
    (s, m), (ref, m_ref) = runs["with"], runs["without"]
    assert s.batch_size == 6 and s.dropped == 1 and ref.dropped == 0
    assert s.loss == pytest.approx(ref.loss) and s.grad_norm == pytest.approx(ref.grad_norm)
    assert s.clipped_fraction == pytest.approx(ref.clipped_fraction)
    for p, q in zip(m.parameters(), m_ref.parameters(), strict=True):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q)
