"""Per-sample clipping against independent references: loops of batch-size-1 backward passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dprandp.errors import InputError
from dprandp.models import create_model
from dprandp.privacy import clip_and_sum, clipped_grad_sum

METHODS = ["layerwise", "vmap"]




def tiny_wrn(seed: int = 0) -> nn.Module:
    return create_model("wrn-10-1", num_classes=5, seed=seed).double()


def loop_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Each sample's gradient of its mean-over-views loss, one backward pass per view."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    out = []
    for i in range(x.shape[0]):
        views = x[i] if x.dim() == 5 else x[i : i + 1]
        acc = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
        for v in range(views.shape[0]):
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(views[v : v + 1]), y[i : i + 1])
            loss.backward()
            for n, p in model.named_parameters():
                if p.requires_grad:
                    acc[n] += p.grad / views.shape[0]
        out.append({n: acc[n] for n in names})
    model.zero_grad(set_to_none=True)
    return out


def norm_of(g: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t**2).sum() for t in g.values()))


def clipped_reference(per_sample, c):
    total = {n: torch.zeros_like(t) for n, t in per_sample[0].items()}
    norms = []
    for g in per_sample:
        nrm = norm_of(g)
        norms.append(nrm)
        scale = min(1.0, c / (float(nrm) + 1e-6))
        for n in total:
            total[n] += g[n] * scale
    return total, torch.stack(norms)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("views", [0, 3])
def test_per_sample_grads_match_loop(method, views):
    gen = torch.Generator().manual_seed(1)
    model = tiny_wrn()
    shape = (5, views, 3, 16, 16) if views else (5, 3, 16, 16)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (5,), generator=gen)
    ref = loop_reference(model, x, y)
    # A huge bound: nothing is clipped, so the sum is the plain sum of per-sample gradients.
    g, norms = clipped_grad_sum(model, x, y, max_grad_norm=1e9, method=method)
    ref_sum, ref_norms = clipped_reference(ref, 1e9)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)
    assert g.keys() == ref_sum.keys()
    for n in g:
        torch.testing.assert_close(g[n], ref_sum[n], rtol=1e-9, atol=1e-12)
    for p in model.parameters():
        assert p.grad is None  # the primitive leaves .grad alone


@pytest.mark.parametrize("method", METHODS)
def test_grid_pooled_head_matches_loop(method):
    """A head reading a 2 x 2 grid of pooled features (``head_pool=2``): same per-sample gradients."""
    gen = torch.Generator().manual_seed(3)
    model = create_model("wrn-10-1", num_classes=5, seed=0, head_pool=2).double()
    assert model.head.fc.in_features == 64 * 4
    x = torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (4,), generator=gen)
    ref_sum, ref_norms = clipped_reference(loop_reference(model, x, y), 0.5)
    g, norms = clipped_grad_sum(model, x, y, max_grad_norm=0.5, method=method)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)
    assert bool((ref_norms > 0.5).any())  # clipping is active
    for n in g:
        torch.testing.assert_close(g[n], ref_sum[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_clipping_bounds_and_untouched(method):
    gen = torch.Generator().manual_seed(2)
    model = tiny_wrn()
    x = torch.randn(6, 2, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=gen)
    ref = loop_reference(model, x, y)
    ref_norms = torch.stack([norm_of(g) for g in ref])
    c = float(ref_norms.median())  # some samples above, some below C
    assert (ref_norms < c).any() and (ref_norms > c).any()
    g, norms = clipped_grad_sum(model, x, y, max_grad_norm=c, method=method)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=0)
    ref_sum, _ = clipped_reference(ref, c)
    for n in g:
        torch.testing.assert_close(g[n], ref_sum[n], rtol=1e-9, atol=1e-12)
    # Each sample alone: its clipped gradient is the sum over a batch of one.
    for i in range(6):
        gi, ni = clipped_grad_sum(model, x[i : i + 1], y[i : i + 1], max_grad_norm=c, method=method)
        clipped_norm = norm_of(gi)
        assert clipped_norm <= c * (1 + 1e-12)
        if ref_norms[i] < c:
            for n in gi:  # below the bound: exactly the unclipped gradient
                torch.testing.assert_close(gi[n], ref[i][n], rtol=1e-10, atol=1e-14)
        else:
            assert clipped_norm == pytest.approx(c, rel=1e-5)


def test_float32_layerwise_matches_float64_loop():
    gen = torch.Generator().manual_seed(3)
    model64 = tiny_wrn()
    model32 = tiny_wrn().float()
    x = torch.randn(4, 2, 3, 32, 32, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (4,), generator=gen)
    ref_sum, ref_norms = clipped_reference(loop_reference(model64, x, y), 1e9)
    g, norms = clipped_grad_sum(model32, x.float(), y, max_grad_norm=1e9)
    torch.testing.assert_close(norms, ref_norms.float(), rtol=1e-4, atol=1e-5)
    for n in g:
        torch.testing.assert_close(g[n], ref_sum[n].float(), rtol=1e-3, atol=1e-4)


class Mixed(nn.Module):
    """Linear on sequences, LayerNorm, a conv with reflect padding and stride, and a frozen layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.frozen = nn.Conv2d(4, 4, 1)
        self.frozen.requires_grad_(False)
        self.norm = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.frozen(torch.tanh(self.gn(self.conv(x))))  # (N, 4, 4, 4)
        h = self.norm(h.flatten(2).transpose(1, 2))  # (N, 16, 4): a sequence of 16 tokens
        return self.fc(h).mean(dim=1)


@pytest.mark.parametrize("method", METHODS)
def test_other_layers_and_frozen_excluded(method):
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    model = Mixed().double()
    x = torch.randn(3, 2, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (3,), generator=gen)
    ref_sum, ref_norms = clipped_reference(loop_reference(model, x, y), 1e9)
    g, norms = clipped_grad_sum(model, x, y, max_grad_norm=1e9, method=method)
    assert not any(n.startswith("frozen.") for n in g)
    assert set(g) == {n for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)
    for n in g:
        torch.testing.assert_close(g[n], ref_sum[n], rtol=1e-9, atol=1e-12)


def test_frozen_trunk_skipped_entirely():
    """Phase II: with the trunk frozen, no hook or graph touches it; only final norm + head appear."""
    model = tiny_wrn()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(model.PRIOR_LACKS))
    calls = []
    for m in model.trunk.modules():
        m.register_forward_hook(lambda mod, a, o: calls.append(o.requires_grad))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (4,), generator=gen)
    g, _ = clipped_grad_sum(model, x, y, max_grad_norm=1e9)
    assert set(g) == set(model.head_parameter_names())
    assert calls and not any(calls)  # the trunk ran without recording a graph
    ref_sum, _ = clipped_reference(loop_reference(model, x, y), 1e9)
    for n in g:
        torch.testing.assert_close(g[n], ref_sum[n], rtol=1e-9, atol=1e-12)


def test_auto_falls_back_to_vmap_for_unknown_layers():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.tensor([1.5], dtype=torch.float64))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), Scale()).double()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=gen)
    ref_sum, ref_norms = clipped_reference(loop_reference(model, x, y), 0.5)
    g, norms = clipped_grad_sum(model, x, y, max_grad_norm=0.5)
    torch.testing.assert_close(norms, ref_norms)
    for n in g:
        torch.testing.assert_close(g[n], ref_sum[n])
    with pytest.raises(InputError, match="Scale"):
        clipped_grad_sum(model, x, y, max_grad_norm=0.5, method="layerwise")


def vector_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n float64 vectors of 12 features and labels of 3 classes (fixed seed)."""
    gen = torch.Generator().manual_seed(8)
    return torch.randn(n, 12, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


class BatchCentred(nn.Module):
    """Linear layers around a parameter-free cross-sample operation, invisible to a module scan."""

    def __init__(self, centre: bool | str):
        super().__init__()
        self.a, self.b, self.centre = nn.Linear(12, 8), nn.Linear(8, 3), centre
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = self.a(x.flatten(1))
        if self.centre == "dropout":  # per-sample randomness: not mixing, must not be refused
            h = self.drop(h)
        mix = self.centre is True or (self.centre == "train-only" and self.training)
        return self.b(h - h.mean(0, keepdim=True) if mix else h)


class RunningMean(nn.Module):
    """A custom layer that keeps a running mean of its inputs in a buffer (as BatchNorm does)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 8), nn.Linear(8, 3)
        self.register_buffer("running", torch.zeros(8, dtype=torch.float64))

    def forward(self, x):
        h = self.a(x.flatten(1))
        if self.training:
            self.running.mul_(0.9).add_(0.1 * h.detach().mean(0))
        return self.b(h)


def test_layerwise_refuses_a_forward_that_mixes_samples():
    """x - x.mean(0) makes each sample's gradient depend on the others, so clipping bounds nothing;
    the once-per-model check (sample 0 beside sample 1 against alone) refuses it before any sum."""
    x, y = vector_batch(5)
    mixing = BatchCentred(centre=True).double()
    with pytest.raises(InputError, match="mixes the samples"):
        clipped_grad_sum(mixing, x, y, max_grad_norm=1.0, method="layerwise")
    with pytest.raises(InputError, match="mixes the samples"):  # refused again, not remembered as checked
        clipped_grad_sum(mixing, x, y, max_grad_norm=1.0, method="layerwise")
    # Mixing only in train mode is caught too: the check runs in the model's own mode.
    with pytest.raises(InputError, match="mixes the samples"):
        clipped_grad_sum(BatchCentred(centre="train-only").double().train(), x, y, max_grad_norm=1.0,
                         method="layerwise")
    dropout = BatchCentred(centre="dropout").double().train()  # same seed in both passes: no false alarm
    clipped_grad_sum(dropout, x, y, max_grad_norm=1.0, method="layerwise")
    assert dropout.drop.training
    clean = BatchCentred(centre=False).double().train()
    ref_sum, ref_norms = clipped_reference(loop_reference(clean, x, y), 1.0)
    g, norms = clipped_grad_sum(clean, x, y, max_grad_norm=1.0, method="layerwise")
    torch.testing.assert_close(norms, ref_norms)
    assert clean.training  # the check's eval mode is undone
    for n in g:
        torch.testing.assert_close(g[n], ref_sum[n])


def test_layerwise_refuses_a_forward_that_updates_buffers():
    """Running statistics updated in forward would carry private data into the model without noise."""
    x, y = vector_batch(5)
    model = RunningMean().double().train()
    with pytest.raises(InputError, match=r"updates its buffers \(running\)"):
        clipped_grad_sum(model, x, y, max_grad_norm=1.0, method="layerwise")
    assert torch.equal(model.running, torch.zeros(8, dtype=torch.float64))  # restored: nothing leaked
    clipped_grad_sum(model.eval(), x, y, max_grad_norm=1.0, method="layerwise")  # no update in eval mode


class ReadsWeightDirectly(nn.Module):
    """A custom forward that uses a LayerNorm's affine weight without calling the LayerNorm."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(12), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x * self.norm.weight + self.norm.bias)


class TiedWeights(nn.Module):
    """Two Linear layers sharing one weight (``b.weight is a.weight``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.fc(self.b(F.relu(self.a(x))))


class ReadsCalledLayersBias(nn.Module):
    """A Linear layer that is called, and whose bias the forward also reads directly."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(F.relu(self.a(x)) * self.a.bias)


def test_a_weight_shared_by_two_layers_goes_to_vmap_not_to_rules_that_see_one_use():
    """Each layer's rule sees only its own use of a shared weight, so the layer-wise sum would miss
    the other use's part of the gradient: explicit layer-wise is refused, auto takes vmap, and that
    matches the batch-size-1 loop."""
    x, y = vector_batch(4)
    model = TiedWeights().double()
    with pytest.raises(InputError, match=r"b\.weight \(the parameter a\.weight, shared\)"):
        clipped_grad_sum(model, x, y, max_grad_norm=1.0, method="layerwise")
    ref_sum, ref_norms = clipped_reference(loop_reference(model, x, y), 1.0)
    out = clip_and_sum(model, x, y, max_grad_norm=1.0, method="auto")
    assert out.method == "vmap"
    torch.testing.assert_close(out.per_sample_norms, ref_norms)
    for n in ref_sum:
        torch.testing.assert_close(out.grad_sum[n], ref_sum[n])


@pytest.mark.parametrize("model_class,refusal", [
    # no hook sees ``norm.weight``: the rules would report its per-sample gradient as zero
    (ReadsWeightDirectly, r"norm\.weight, norm\.bias are read outside their module's forward"),
    # no module scan sees ``self.a.bias`` read again; the once-per-model check holds sample 0's
    # layer-wise gradient to autograd's (before it, the bias gradient was silently off by 0.35 of 0.55)
    (ReadsCalledLayersBias, "differ from autograd's"),
])
def test_a_parameter_read_outside_its_module_is_refused_not_given_a_partial_gradient(model_class, refusal):
    """The layer-wise rules refuse such a model; the vmap method gets it right (against the loop)."""
    x, y = vector_batch(4)
    model = model_class().double()
    with pytest.raises(InputError, match=refusal):
        clipped_grad_sum(model, x, y, max_grad_norm=1.0, method="layerwise")
    ref_sum, ref_norms = clipped_reference(loop_reference(model, x, y), 1.0)
    g, norms = clipped_grad_sum(model, x, y, max_grad_norm=1.0, method="vmap")
    torch.testing.assert_close(norms, ref_norms)
    for n in ref_sum:
        torch.testing.assert_close(g[n], ref_sum[n])


def test_a_check_that_fails_for_another_reason_is_run_again():
    """The model counts as checked only once the check passed: an error inside it (here a transient
    one on the first forward) must not let the mixing model through on the next call."""

    class FlakyMixing(BatchCentred):
        calls = 0

        def forward(self, x):
            FlakyMixing.calls += 1
            if FlakyMixing.calls == 1:
                raise RuntimeError("transient")
            return super().forward(x)

    x, y = vector_batch(5)
    model = FlakyMixing(centre=True).double()
    with pytest.raises(RuntimeError, match="transient"):
        clipped_grad_sum(model, x, y, max_grad_norm=1.0, method="layerwise")
    with pytest.raises(InputError, match="mixes the samples"):
        clipped_grad_sum(model, x, y, max_grad_norm=1.0, method="layerwise")


def test_empty_batch_gives_zeros():
    model = tiny_wrn()
    g, norms = clipped_grad_sum(model, torch.zeros(0, 3, 16, 16, dtype=torch.float64), torch.zeros(0, dtype=torch.long), max_grad_norm=1.0)
    assert norms.numel() == 0 and all((t == 0).all() for t in g.values())


@pytest.mark.parametrize("method", ["layerwise", "vmap"])
def test_clipping_runs_with_tf32_off_and_restores_the_callers_setting(method):
    """TF32 would make the ghost norm and the clipped sum round differently on a GPU (the sum can
    exceed C); the flags are off while the per-sample gradients are computed, as seen from inside
    the loss, and the caller's values come back afterwards, also after an error."""
    seen = []

    def loss_fn(out, y):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return F.cross_entropy(out, y, reduction="none")

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    model = tiny_wrn()
    x, y = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2])
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        clipped_grad_sum(model, x, y, max_grad_norm=1.0, loss_fn=loss_fn, method=method)
        assert seen and all(flags == (False, False) for flags in seen)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        with pytest.raises(RuntimeError, match="boom"):
            clipped_grad_sum(model, x, y, max_grad_norm=1.0, method=method,
                             loss_fn=lambda out, y: (_ for _ in ()).throw(RuntimeError("boom")))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)), "BatchNorm2d"),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True)), "InstanceNorm2d"),
    ],
)
def test_cross_sample_layers_refused(make, match):
    with pytest.raises(InputError, match=match):
        clipped_grad_sum(make(), torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), max_grad_norm=1.0)


@pytest.mark.parametrize("c", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_max_grad_norm(c):
    with pytest.raises(InputError, match="max_grad_norm"):
        clipped_grad_sum(tiny_wrn(), torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.long), max_grad_norm=c)


def test_batch_mismatch_refused_before_work():
    model = tiny_wrn()
    ran = []
    model.register_forward_hook(lambda *a: ran.append(1))
    with pytest.raises(InputError, match="batch dimension"):
        clipped_grad_sum(model, torch.zeros(3, 3, 16, 16, dtype=torch.float64), torch.zeros(2, dtype=torch.long), max_grad_norm=1.0)
    assert not ran


def test_inplace_after_layer_refused():
    class Inplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.fc2 = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(torch.relu_(self.fc1(x)))

    with pytest.raises(InputError, match="in-place"):
        clipped_grad_sum(Inplace(), torch.randn(3, 4), torch.zeros(3, dtype=torch.long), max_grad_norm=1.0, method="layerwise")


class Convs(nn.Module):
    """Strided, dilated, grouped and 1x1 convolutions (with and without bias)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.b = nn.Conv2d(6, 6, 3, dilation=2, padding=2, groups=2)
        self.c = nn.Conv2d(6, 4, (3, 1), padding=(1, 0), bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))
        return self.fc(h.mean(dim=(2, 3)))


class Shared(nn.Module):
    """The same conv applied twice: its per-sample gradient sums two calls (no ghost norm)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.conv(torch.tanh(self.conv(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("path", ["grouped", "unfold", "ghost"])
@pytest.mark.parametrize("views", [0, 2])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_all_conv_paths_match_loop(monkeypatch, path, views, memory_format):
    """Every per-sample conv route against the batch-size-1 loop, also for channels_last models
    and inputs (the layout cuDNN prefers for bf16 on GPUs)."""
    from dprandp.privacy import layerwise

    monkeypatch.setattr(layerwise, "_use_ghost", lambda *a: path == "ghost")
    if path == "unfold":  # route every eligible conv through im2col + bmm
        monkeypatch.setattr(layerwise, "_UNFOLD_MIN_FAN_IN", 0)
        monkeypatch.setattr(layerwise, "_UNFOLD_MAX_POSITIONS", 10**9)
    else:
        monkeypatch.setattr(layerwise, "_UNFOLD_MIN_FAN_IN", 10**9)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(8)
    for model in (Convs().double(), tiny_wrn(), Shared().double(), Mixed().double()):
        shape = (3, views, 3, 12, 12) if views else (3, 3, 12, 12)
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 2, (3,), generator=gen)
        ref = loop_reference(model, x, y)
        c = float(torch.stack([norm_of(r) for r in ref]).median())  # clip some samples
        ref_sum, ref_norms = clipped_reference(ref, c)
        model = model.to(memory_format=memory_format)
        images = x.reshape(-1, *shape[-3:]).contiguous(memory_format=memory_format).reshape(shape)
        g, norms = clipped_grad_sum(model, images, y, max_grad_norm=c, method="layerwise")
        torch.testing.assert_close(norms, ref_norms, rtol=1e-9, atol=1e-12)  # ghost: a rigorous bound, +1e-10
        for n in g:  # the clip factors of the ghost route's bound: relative 1e-10 of each sample's share
            torch.testing.assert_close(g[n], ref_sum[n], rtol=1e-9, atol=1e-9 * float(ref_sum[n].abs().max()))


@pytest.mark.parametrize("method", METHODS)
def test_custom_loss_with_soft_targets(method):
    """Targets with trailing dimensions are repeated per view, not flattened."""

    def soft_ce(logits, probs):
        return -(probs * logits.log_softmax(dim=-1)).sum(dim=-1)

    gen = torch.Generator().manual_seed(9)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    x = torch.randn(4, 2, 12, generator=gen, dtype=torch.float64)
    probs = torch.softmax(torch.randn(4, 3, generator=gen, dtype=torch.float64), dim=-1)
    ref = []
    for i in range(4):
        model.zero_grad()
        soft_ce(model(x[i]), probs[i].expand(2, 3)).mean().backward()
        ref.append({n: p.grad.clone() for n, p in model.named_parameters()})
    ref_sum, ref_norms = clipped_reference(ref, 0.3)
    g, norms = clipped_grad_sum(model, x, probs, max_grad_norm=0.3, loss_fn=soft_ce, multi_view=True, method=method)
    torch.testing.assert_close(norms, ref_norms)
    for n in g:
        torch.testing.assert_close(g[n], ref_sum[n])


@pytest.mark.parametrize("path", ["grouped", "unfold", "ghost", "vmap"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_sample_with_a_non_finite_gradient_contributes_zero(monkeypatch, path, bad):
    """0 * inf is NaN: a clip factor of 0 alone would let one overflowing sample turn the whole sum
    into NaN (its influence unbounded). It must contribute exactly zero, on every route, and the
    others must be clipped as if it were absent (the reference: the loop without it)."""
    from dprandp.privacy import layerwise

    monkeypatch.setattr(layerwise, "_use_ghost", lambda *a: path == "ghost")
    monkeypatch.setattr(layerwise, "_UNFOLD_MIN_FAN_IN", 0 if path == "unfold" else 10**9)
    monkeypatch.setattr(layerwise, "_UNFOLD_MAX_POSITIONS", 10**9)
    gen = torch.Generator().manual_seed(4)
    for views in (0, 2):
        model = tiny_wrn()
        shape = (4, views, 3, 12, 12) if views else (4, 3, 12, 12)
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 5, (4,), generator=gen)
        x[2].view(-1)[7] = bad  # sample 2 (one view of it when views > 0)
        others = [0, 1, 3]
        ref = loop_reference(model, x[others], y[others])
        c = float(torch.stack([norm_of(r) for r in ref]).median())
        ref_sum, ref_norms = clipped_reference(ref, c)
        g, norms = clipped_grad_sum(model, x, y, max_grad_norm=c, method="vmap" if path == "vmap" else "layerwise")
        assert not torch.isfinite(norms[2])
        torch.testing.assert_close(norms[others], ref_norms, rtol=1e-9, atol=1e-12)  # ghost: a rigorous bound, +1e-10
        for n in g:  # ghost: clip factors of a rigorous norm bound (relative 1e-10 of each sample's share)
            torch.testing.assert_close(g[n], ref_sum[n], rtol=1e-9, atol=1e-9 * float(ref_sum[n].abs().max()))


def test_a_record_whose_positions_cancel_is_clipped_on_the_ghost_route():
    """Found in review (session 26): the ghost norm's Gram matrices in float32 cancelled for a record
    whose two positions nearly cancel (x_2 = -x_1 + d): its norm came out 0 (true ~1), its clip factor 1,
    and it added up to 19 C. Now the Gram sum runs in float64 with a rigorous rounding bound: the norm
    is never below the true norm, and the record adds C up to the float32 rounding of the clipped sum
    of its terms (3e4 times its gradient here: ~1e-4 relative; ordinary samples ~1e-7)."""
    from dprandp.privacy import layerwise

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 64, 1, bias=False)  # 2 positions, fan-in 16, 64 out: the ghost route
            self.fc = nn.Linear(64, 10, bias=False)
            self.fc.weight.requires_grad_(False)

        def forward(self, x):
            return self.fc(self.conv(x).mean(dim=(2, 3)))

    assert layerwise._use_ghost(2, 16, 64)
    torch.manual_seed(0)
    net, c = Net(), 0.1
    gen = torch.Generator().manual_seed(1)
    clip_and_sum(net, torch.randn(2, 16, 1, 2, generator=gen), torch.tensor([0, 1]), max_grad_norm=c,
                 method="layerwise")  # the once-per-model self-check, on ordinary inputs
    worst = 0.0
    for _ in range(60):
        v, d = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
        x = torch.stack([3e4 * v, -3e4 * v + d], dim=-1).reshape(1, 16, 1, 2)
        y = torch.randint(0, 10, (1,), generator=gen)
        out = clip_and_sum(net, x, y, max_grad_norm=c, method="layerwise")
        worst = max(worst, float(out.grad_sum["conv.weight"].double().norm()) / c)
        # The materialised per-sample gradient (vmap) of the same float32 model: its norm agrees; the bug gave 0.
        materialised = clip_and_sum(net, x, y, max_grad_norm=1e30, method="vmap").per_sample_norms[0]
        assert float(out.per_sample_norms[0]) >= 0.999 * float(materialised)
    assert worst <= 1.0 + 2e-4  # was 17.7


def test_the_ghost_bound_is_tight_for_ordinary_samples():
    """The bound's additions (float64 rounding, the clipped sum's rounding) are far below float32's own
    rounding of the norm for samples whose terms do not cancel: the ghost norm is the float64 norm."""
    from dprandp.privacy.layerwise import ghost_sq_norm_upper

    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(4, 288, 128, generator=gen), torch.randn(4, 64, 128, generator=gen)
    exact = torch.einsum("bpt,bdt->bpd", g.double(), x.double()).flatten(1).norm(dim=1)
    got = ghost_sq_norm_upper(x, g).sqrt()
    assert torch.all(got >= exact) and torch.all(got <= exact * (1 + 1e-9))
