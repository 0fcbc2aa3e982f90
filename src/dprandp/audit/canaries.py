"""White-box gradient-canary audit of the DP-SGD engine in one training run.

What is audited: the engine's own DP-SGD path, end to end, exactly as training uses it:
:class:`~dprandp.privacy.PoissonSampler` draws each logical batch, :class:`~dprandp.privacy.DPSGD`
computes per-sample gradients, clips them to ``max_grad_norm``, adds Gaussian noise from its
noise generator once per step, divides by the expected batch size and lets a torch SGD optimizer
apply the update. The claim under test is the accountant's: ``steps`` Poisson-subsampled Gaussian
steps with the calibrated noise multiplier are (ε, δ)-DP.

How (Steinke, Nasr & Jagielski 2023, white-box DP-SGD with gradient canaries): the "model" is a
bias-free linear map ``w ∈ R^m`` and the per-example loss is ``-<w, x>``, so the gradient of
example x is ``-x`` whatever ``w`` is. Canary i is the input ``R · s_i · e_i`` (a random sign times
the i-th coordinate vector, with ``R = 10 C`` so that clipping has to do its job); its clipped
gradient is ``-C s_i e_i``, a Dirac canary of norm C. Each canary enters the training set
independently with probability 1/2. Because the gradients do not depend on ``w``, the final weights
minus the initial ones are exactly the sum of all noisy updates, so the score

    score_i = s_i · (w_T - w_0)_i · B / (lr · C)  =  (number of steps canary i was sampled) + noise

is the white-box statistic "inner product of the canary direction with the sum of the updates".
A correct engine hides membership behind N(0, T σ²) noise; an engine that skips the noise, clips
too late or samples too often separates the in- from the out-canaries and the audit's lower bound
on ε rises above the claim.

The audit noise is seeded from ``seed`` (the canaries are synthetic, so there is nothing private
to protect and reproducibility is what matters here).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dprandp.accounting import DPPhase, calibrate_noise, compute_epsilon
from dprandp.audit.statistics import AuditBound, audit_scores, epsilon_lower_bound, guess_grid
from dprandp.errors import require
from dprandp.privacy import DPSGD, DPConfig, PoissonSampler

#: Canary inputs have norm CANARY_SCALE * C before clipping.
CANARY_SCALE = 10.0


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """One audit run. ``target_epsilon`` sets the noise via the accountant (the claim tested).

    Give ``noise_multiplier`` instead to audit a given sigma: the claim is then its epsilon.
    """

    target_epsilon: float = 2.0
    noise_multiplier: float | None = None
    target_delta: float = 1e-5
    num_canaries: int = 5000
    steps: int = 10
    sample_rate: float = 0.5
    max_grad_norm: float = 1.0
    learning_rate: float = 1.0
    confidence: float = 0.95
    seed: int = 0
    insecure_no_noise: bool = False  # break the engine on purpose: sigma = 0 while claiming epsilon

    def __post_init__(self) -> None:
        def real(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def whole(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        require(real(self.target_epsilon) and self.target_epsilon > 0, f"epsilon must be a finite number > 0, got {self.target_epsilon}")
        require(self.noise_multiplier is None or (real(self.noise_multiplier) and self.noise_multiplier > 0),
                f"noise multiplier must be a finite number > 0, got {self.noise_multiplier}")
        require(real(self.target_delta) and 0 < self.target_delta < 1, f"delta must be in (0, 1), got {self.target_delta}")
        require(whole(self.num_canaries) and 2 <= self.num_canaries <= 1_000_000,
                f"canaries must be an integer in [2, 1000000], got {self.num_canaries}")
        require(whole(self.steps) and 1 <= self.steps <= 100_000, f"steps must be an integer in [1, 100000], got {self.steps}")
        require(real(self.sample_rate) and 0 < self.sample_rate <= 1, f"sample-rate must be in (0, 1], got {self.sample_rate}")
        require(real(self.max_grad_norm) and self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        require(real(self.learning_rate) and self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        require(real(self.confidence) and 0 < self.confidence < 1, f"confidence must be in (0, 1), got {self.confidence}")
        require(whole(self.seed) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed}")

    def phase(self, noise_multiplier: float) -> DPPhase:
        return DPPhase(sample_rate=self.sample_rate, noise_multiplier=noise_multiplier, steps=self.steps)


@dataclass(frozen=True, kw_only=True)
class AuditReport:
    """Claimed privacy of the audited run, the empirical lower bound, and how it was obtained."""

    epsilon: float  # what the accountant claims for the configured noise
    epsilon_lower_bound: float  # empirical, holds with probability `confidence`
    max_detectable_epsilon: float  # the bound if every guess were right: the audit's ceiling
    delta: float
    confidence: float
    noise_multiplier: float  # configured (claimed) sigma
    noise_multiplier_used: float  # sigma the engine actually ran with (0 in the insecure mode)
    sample_rate: float
    steps: int
    num_canaries: int
    num_included: int
    bound: AuditBound
    seconds: float
    insecure_no_noise: bool

    @property
    def passed(self) -> bool:
        """True when the audit found no evidence against the claim (see :attr:`conclusive`)."""
        return self.epsilon_lower_bound <= self.epsilon

    @property
    def conclusive(self) -> bool:
        """Whether this audit could have failed: the claim lies below the ceiling. A claim at or above
        it passes whatever the engine does (even with no noise), so such a pass is no evidence."""
        return self.epsilon < self.max_detectable_epsilon

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "bound"}
        out["passed"] = self.passed
        out["conclusive"] = self.conclusive
        out.update({f"guess_{k}": v for k, v in self.bound.to_dict().items()
                    if k in ("k_plus", "k_minus", "num_guesses", "num_correct", "candidates")})
        return out


def canary_model(num_canaries: int) -> nn.Linear:
    """The audited model: ``w ∈ R^m`` (float64 so rounding never blurs a canary), started at 0."""
    model = nn.Linear(num_canaries, 1, bias=False, dtype=torch.float64)
    nn.init.zeros_(model.weight)
    return model


def linear_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example loss ``-<w, x>``: its gradient is ``-x`` for every ``w``."""
    return -outputs[:, 0]


def canary_scores(
    *,
    config: AuditConfig,
    noise_multiplier: float,
    included: np.ndarray,
    signs: np.ndarray,
    sampler_generator: torch.Generator,
    noise_generator: torch.Generator,
) -> np.ndarray:
    """Train on the included canaries with the real DP-SGD engine; score every canary."""
    m = config.num_canaries
    members = torch.as_tensor(np.flatnonzero(included), dtype=torch.long)  # canary ids in the training set
    n = int(members.numel())
    # B = q * N, the expected logical batch (N is the training-set size, as in any DP-SGD run).
    batch_size = max(1, round(config.sample_rate * n))
    dp = DPConfig(
        sample_rate=config.sample_rate,
        noise_multiplier=noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        batch_size=batch_size,
        # each physical batch holds a dense (chunk, m) float64 input and as many per-sample
        # gradients: about 2**27 numbers (1 GiB) at most, whatever the number of canaries
        physical_batch_size=max(1, min(1024, 2**27 // m)),
    )
    model = canary_model(m)
    w0 = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    engine = DPSGD(model, optimizer, config=dp, noise_generator=noise_generator, loss_fn=linear_loss)
    sampler = PoissonSampler(num_samples=n, sample_rate=config.sample_rate, generator=sampler_generator, steps=config.steps)
    scale = torch.as_tensor(CANARY_SCALE * config.max_grad_norm * signs, dtype=torch.float64)

    def make_views(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        canary = members[idx]
        x = torch.zeros(idx.numel(), m, dtype=torch.float64)
        x[torch.arange(idx.numel()), canary] = scale[canary]
        return x, torch.zeros(idx.numel(), dtype=torch.long)

    for batch in sampler:
        engine.step_from_indices(batch, make_views)
    total = (model.weight.detach()[0] - w0[0]).numpy()
    return signs * total * batch_size / (config.learning_rate * config.max_grad_norm)


def max_detectable_epsilon(num_canaries: int, *, delta: float, confidence: float) -> float:
    """The largest lower bound this many canaries can give (every guess right, grid as audited)."""
    grid = guess_grid(num_canaries)
    level = 1.0 - (1.0 - confidence) / len(grid)
    return max(
        epsilon_lower_bound(num_canaries=num_canaries, num_guesses=kp + km, num_correct=kp + km, delta=delta, confidence=level)
        for kp, km in grid
    )


def run_audit(config: AuditConfig) -> AuditReport:
    """Calibrate the noise for the claimed ε, train once with canaries, and bound ε from below."""
    start = time.perf_counter()
    ceiling = max_detectable_epsilon(config.num_canaries, delta=config.target_delta, confidence=config.confidence)
    require(ceiling > 0, f"{config.num_canaries} canaries cannot show any epsilon > 0 at {config.confidence!r} "
            "confidence (even if every guess were right): use more canaries (e.g. 1000)")
    if config.noise_multiplier is None:
        calibration = calibrate_noise(
            target_epsilon=config.target_epsilon, target_delta=config.target_delta, phases=[config.phase(1.0)]
        )
        sigma, claimed = calibration.noise_multiplier, calibration.epsilon
    else:
        sigma = config.noise_multiplier
        claimed = compute_epsilon([config.phase(sigma)], target_delta=config.target_delta)
    used = 0.0 if config.insecure_no_noise else sigma

    seeds = np.random.SeedSequence(config.seed).spawn(3)
    canary_rng = np.random.default_rng(seeds[0])
    included = canary_rng.random(config.num_canaries) < 0.5
    signs = np.where(canary_rng.random(config.num_canaries) < 0.5, -1.0, 1.0)
    sampler_generator = torch.Generator().manual_seed(int(seeds[1].generate_state(1, dtype=np.uint64)[0] >> 1))
    noise_generator = torch.Generator().manual_seed(int(seeds[2].generate_state(1, dtype=np.uint64)[0] >> 1))

    scores = canary_scores(
        config=config, noise_multiplier=used, included=included, signs=signs,
        sampler_generator=sampler_generator, noise_generator=noise_generator,
    )
    bound = audit_scores(scores, included, delta=config.target_delta, confidence=config.confidence)
    return AuditReport(
        epsilon=claimed,
        epsilon_lower_bound=bound.epsilon_lower_bound,
        max_detectable_epsilon=ceiling,
        delta=config.target_delta,
        confidence=config.confidence,
        noise_multiplier=sigma,
        noise_multiplier_used=used,
        sample_rate=config.sample_rate,
        steps=config.steps,
        num_canaries=config.num_canaries,
        num_included=int(included.sum()),
        bound=bound,
        seconds=time.perf_counter() - start,
        insecure_no_noise=config.insecure_no_noise,
    )
