"""Review 26 of the DP-SGD engine's layer-wise self-check and model validation.

The self-check (``clipping._check_samples_independent``) must run for chunks of one sample too, cover
every parameter and buffer the forward pass could write private data into, and run again when the
trainable set changes; parameters below float32 are refused (their norms round past the clip margin).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dprandp.errors import InputError
from dprandp.models import create_model
from dprandp.privacy import DPSGD, DPConfig, clip_and_sum, clipped_grad_sum, validate_model

X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0], [13.0, 14.0, 15.0, 16.0]])
Y = torch.tensor([0, 1, 2, 0])


def engine(model: nn.Module, physical_batch_size: int) -> DPSGD:
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = DPConfig(sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0, batch_size=4,
                   physical_batch_size=physical_batch_size)
    return DPSGD(model, torch.optim.SGD(params, lr=0.1), config=cfg, noise_generator=torch.Generator().manual_seed(1))


def count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def per_sample_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sum over samples of each sample's unclipped gradient, one autograd pass per sample."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in trainable}
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), [p for _, p in trainable])
        for (n, _), g in zip(trainable, grads, strict=True):
            total[n] += g
    return total


class WritesBuffer(nn.Module):
    """Keeps the mean of the last training batch in a buffer: with one sample per chunk, the record itself."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("seen", torch.zeros(4))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.seen.copy_(x.mean(0))
        return self.fc(x)


@pytest.mark.parametrize("physical_batch_size", [1, 2])
def test_a_buffer_written_from_the_data_is_refused_with_chunks_of_one_too(physical_batch_size):
    """The state check used to need two samples per chunk: with physical_batch_size 1 the buffer held
    the last raw record after the step, outside the noise."""
    model = WritesBuffer().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(InputError, match=r"updates its buffers \(seen\)"):
        engine(model, physical_batch_size).step(X, Y)
    assert torch.equal(model.seen, torch.zeros(4))  # restored, nothing leaked
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # no step taken


def weight_norm_model() -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm is deprecated in favour of parametrizations
        return nn.Sequential(nn.utils.weight_norm(nn.Linear(5, 4)), nn.Tanh(), nn.Linear(4, 3)).double()


@pytest.mark.parametrize("b", [1, 3])
def test_weight_norm_is_refused_by_the_rules_for_any_chunk_size(b):
    """weight_norm recomputes ``weight`` from weight_g and weight_v outside the Linear's forward, so the
    rules gave them a zero gradient; with a chunk of one sample the autograd check was skipped and
    the zero went through silently. vmap gets it right."""
    model = weight_norm_model()
    x, y = torch.randn(b, 5, dtype=torch.float64), torch.arange(b) % 3
    with pytest.raises(InputError, match="differ from autograd's"):
        clip_and_sum(model, x, y, max_grad_norm=1e9, method="layerwise")
    out = clip_and_sum(model, x, y, max_grad_norm=1e9, method="vmap")
    ref = per_sample_reference(model, x, y)
    assert float(ref["0.weight_v"].norm()) > 0.1
    for n in ref:
        torch.testing.assert_close(out.grad_sum[n], ref[n])


class MixesSamples(nn.Module):
    """Subtracts the batch mean: mixes samples, which only a pair of samples can show."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - 0.5 * h.mean(0, keepdim=True))


def test_a_chunk_of_one_does_not_count_as_the_pair_comparison():
    """A first chunk of one sample runs the state and autograd checks only; the model must still meet
    the pair comparison at its first chunk of two or more, and be refused there."""
    model = MixesSamples().double()
    x, y = X.double(), Y
    clip_and_sum(model, x[:1], y[:1], max_grad_norm=1.0, method="layerwise")  # one sample cannot show mixing
    with pytest.raises(InputError, match="mixes the samples"):
        clip_and_sum(model, x, y, max_grad_norm=1.0, method="layerwise")
    with pytest.raises(InputError, match="mixes the samples"):  # not remembered as checked
        clip_and_sum(model, x[:2], y[:2], max_grad_norm=1.0, method="layerwise")


def test_the_check_costs_its_passes_once_per_level():
    """Chunks of one: two extra passes once (layer-wise alone, autograd); the first larger chunk: three
    more (pair, alone, autograd); after that one pass per chunk."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    calls = count_forwards(model)
    x, y = X.double(), Y
    expected = [(1, 3), (1, 1), (4, 4), (2, 1), (1, 1), (4, 1)]
    for b, passes in expected:
        calls[0] = 0
        clip_and_sum(model, x[:b], y[:b], max_grad_norm=1.0, method="layerwise")
        assert calls[0] == passes, (b, calls[0], passes)


class WritesFrozenParameter(nn.Module):
    """Stores the chunk's last sample in a frozen parameter (part of the state_dict) while training."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.center = nn.Parameter(torch.zeros(4), requires_grad=False)

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.center.copy_(x[-1])
        return self.fc(x) if self.training else self.fc(x - self.center)


class WritesTrainableParameter(nn.Module):
    """Overwrites a trainable bias with data before using it: the noise would be added to a record."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            self.fc.bias.copy_(x[-1])
        return self.fc(x)


@pytest.mark.parametrize("model_class,name", [(WritesFrozenParameter, "center"), (WritesTrainableParameter, "fc.bias")])
@pytest.mark.parametrize("physical_batch_size", [1, 4])
def test_a_parameter_written_from_the_data_is_refused_and_restored(model_class, name, physical_batch_size):
    """The state check covered buffers only: a frozen parameter holding the last sample was accepted."""
    model = model_class().train()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with pytest.raises(InputError, match=rf"updates its parameters \({name}\)"):
        engine(model, physical_batch_size).step(X, Y)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


class ReplacesBuffer(WritesBuffer):
    def forward(self, x):
        self.seen = x.detach().mean(0)  # a new tensor in place of the registered buffer
        return self.fc(x)


def test_a_replaced_buffer_is_refused_and_the_original_put_back():
    model = ReplacesBuffer()
    original = model.seen
    with pytest.raises(InputError, match=r"updates its buffers \(seen\)"):
        clipped_grad_sum(model, X[:1], Y[:1], max_grad_norm=1.0, method="layerwise")
    assert model.seen is original and torch.equal(original, torch.zeros(4))


class AddsBuffer(WritesBuffer):
    def forward(self, x):
        self.register_buffer("last", x[-1].detach().clone())
        return self.fc(x)


def test_a_buffer_added_by_the_forward_pass_is_refused_and_removed():
    model = AddsBuffer()
    with pytest.raises(InputError, match=r"updates its buffers \(last\)"):
        clipped_grad_sum(model, X, Y, max_grad_norm=1.0, method="layerwise")
    assert "last" not in model.state_dict() and not hasattr(model, "last")


def test_a_nan_in_a_buffer_is_not_a_change():
    model = WritesBuffer().eval()
    model.seen.fill_(float("nan"))
    clipped_grad_sum(model, X, Y, max_grad_norm=1.0, method="layerwise")
    assert model.seen.isnan().all()


def test_unfreezing_parameters_runs_the_check_again():
    """Phase II trains the head only and passes; Phase III unfreezes the weight_norm layer, whose
    parameters the rules cannot see: the check keyed on the model alone let them train on zeros."""
    model = weight_norm_model()
    x, y = torch.randn(4, 5, dtype=torch.float64), Y
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("2."))
    calls = count_forwards(model)
    clip_and_sum(model, x, y, max_grad_norm=1e9, method="layerwise")
    calls[0] = 0
    clip_and_sum(model, x, y, max_grad_norm=1e9, method="layerwise")
    assert calls[0] == 1  # the same trainable set is not checked again
    for p in model.parameters():
        p.requires_grad_(True)
    with pytest.raises(InputError, match="differ from autograd's"):
        clip_and_sum(model, x, y, max_grad_norm=1e9, method="layerwise")


def test_wrn_passes_the_check_in_every_phase_with_chunks_of_one_and_more():
    """The WRN models must keep passing: each trainable set is checked once, for one sample and for a pair."""
    model = create_model("wrn-10-1", num_classes=3, seed=1, head_pool=4).double().train()
    calls = count_forwards(model)
    x = torch.randn(3, 2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    for phase in (2, None):
        for n, p in model.named_parameters():
            p.requires_grad_(phase is None or not n.startswith(model.frozen_prefixes(phase)))
        for b, passes in ((1, 3), (3, 4), (1, 1), (3, 1)):
            calls[0] = 0
            out = clip_and_sum(model, x[:b], y[:b], max_grad_norm=1.0, method="auto")
            assert out.method == "layerwise" and calls[0] == passes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_trainable_parameters_are_refused(dtype):
    """A norm taken in bf16 let one sample's clipped contribution exceed C by up to 0.65 % (the fp32
    margin is 1e-6): such parameters are refused, pointing at bf16 autocast."""
    model = nn.Sequential(nn.Linear(8, 3)).to(dtype)
    with pytest.raises(InputError, match=r"float32 or float64, not 0\.weight .*precision='bf16'"):
        clipped_grad_sum(model, torch.randn(2, 8, dtype=dtype), Y[:2], max_grad_norm=1.0)
    with pytest.raises(InputError, match="float32 or float64"):
        engine(model, 2)
    model[0].weight.requires_grad_(False)  # a frozen half-precision parameter is not clipped: allowed
    with pytest.raises(InputError, match=r"not 0\.bias"):
        validate_model(model)
    model[0].bias.requires_grad_(False)
    model.add_module("head", nn.Linear(3, 3))
    assert [n for n, _ in validate_model(model)] == ["head.weight", "head.bias"]


def test_float64_and_float32_parameters_are_accepted():
    for dtype in (torch.float32, torch.float64):
        model = nn.Sequential(nn.Linear(4, 3)).to(dtype)
        g, norms = clipped_grad_sum(model, X.to(dtype), Y, max_grad_norm=1.0)
        assert g["0.weight"].dtype == dtype and norms.shape == (4,)


class WritesOnlyForLargeChunks(nn.Module):
    """Writes a record only when a chunk has more than 2 samples: the self-check's one- and two-sample passes
    never see it (found reviewing this session's change). Every layer-wise chunk now checks the state."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("mem", torch.zeros(4))
        self.register_buffer("empty", None)

    def forward(self, x):
        if x.shape[0] > 2:
            with torch.no_grad():
                self.mem.copy_(x[-1])
                self.empty = x[0].detach().clone()
        return self.fc(x)


def test_a_state_write_in_any_chunk_is_refused_and_restored():
    model = WritesOnlyForLargeChunks().double()
    clip_and_sum(model, X.double()[:2], Y[:2], max_grad_norm=1.0, method="layerwise")  # the check passes
    with pytest.raises(InputError, match="updates its buffers"):
        clip_and_sum(model, X.double()[:4], Y[:4], max_grad_norm=1.0, method="layerwise")
    assert torch.equal(model.mem, torch.zeros(4, dtype=torch.float64))
    assert "empty" in model._buffers and model._buffers["empty"] is None  # a None slot stays registered
