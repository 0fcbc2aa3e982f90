"""One DP-SGD step: clipped sums over physical chunks, Gaussian noise once, divide by B, update.

The update for a Poisson-sampled logical batch S with expected size B is

    (sum_{i in S} clip_C(mean_k grad l(x_ik, y_i)) + N(0, sigma^2 C^2 I)) / B

which is the subsampled Gaussian mechanism the accountant composes. Chunking (``physical_batch_size``)
only splits the sum; data parallelism only splits it across ranks (``all_reduce`` adds the rank
sums *before* the noise, and identically seeded noise generators make every rank add the same
single draw). An empty batch still draws noise and steps: skipping it would change the mechanism.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dprandp.errors import require
from dprandp.privacy.clipping import clip_and_sum, low_precision_dtype, resolve_method, split_views
from dprandp.privacy.config import DPConfig
from dprandp.privacy.validate import validate_model


@dataclass(frozen=True)
class StepStats:
    """What one logical step did (summed over ranks when an ``all_reduce`` is given)."""

    step: int  # 1-based index of this step
    batch_size: int  # realised Poisson batch size (samples, not views)
    loss: float  # mean per-sample loss (mean over views); nan for an empty batch
    grad_norm: float  # mean per-sample gradient norm before clipping; nan if empty
    clipped_fraction: float  # share of samples whose gradient was scaled down; nan if empty
    dropped: int  # samples whose gradient was not finite: they contributed zero (loss, norm and share exclude them)
    noise_std: float  # std of the noise on the averaged gradient: sigma * C / B
    seconds: float
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


class DPSGD:
    """DP-SGD trainer step around any torch optimizer.

    ``noise_generator`` is the only source of DP noise (seed it identically on every rank).
    ``all_reduce(t) -> t`` must return the elementwise sum of ``t`` over ranks; it is called once
    per step on one flat tensor holding the clipped-gradient sums and the step statistics.
    ``precision="bf16"`` runs the forward and backward passes under bf16 autocast; clipping, the
    sums and the noise stay in the parameters' dtype (see :func:`~dprandp.privacy.clipped_grad_sum`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        config: DPConfig,
        noise_generator: torch.Generator,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        method: str = "auto",
        multi_view: bool | None = None,
        precision: str = "fp32",
    ) -> None:
        require(isinstance(config, DPConfig), f"config must be a DPConfig, got {type(config).__name__}")
        require(isinstance(noise_generator, torch.Generator), "DPSGD needs an explicit torch.Generator for the noise")
        self.trainable = validate_model(model)
        self.method = resolve_method(model, method)
        low_precision_dtype(precision, self.method)  # refuse a bad precision now, not at the first step
        self.precision = precision
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.noise_generator = noise_generator
        self.all_reduce = all_reduce
        self.loss_fn = loss_fn
        self.multi_view = multi_view
        self.steps_taken = 0

    # ------------------------------------------------------------------ public steps
    def step(
        self, inputs: torch.Tensor, targets: torch.Tensor, *, before_update: Callable[[], None] | None = None
    ) -> StepStats:
        """One step on a logical batch given as tensors: (b, K, C, H, W) or (b, C, H, W); b may be 0."""
        self._check_views(inputs, targets)
        p = self.config.physical_batch_size
        chunks = ((inputs[i : i + p], targets[i : i + p]) for i in range(0, inputs.shape[0], p))
        return self._step(chunks, before_update)

    def step_from_indices(
        self,
        indices: torch.Tensor,
        make_views: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        *,
        before_update: Callable[[], None] | None = None,
    ) -> StepStats:
        """One step on the logical batch ``indices`` (e.g. from :class:`PoissonSampler`).

        ``make_views(chunk_indices) -> (views, targets)`` is called once per physical chunk, so
        only ``physical_batch_size * K`` augmented images ever exist at once.
        """
        indices = torch.as_tensor(indices, dtype=torch.long).flatten()
        p = self.config.physical_batch_size

        def chunks() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            for i in range(0, indices.numel(), p):
                idx = indices[i : i + p]
                x, y = make_views(idx)
                require(
                    x.shape[0] == idx.numel() and y.shape[0] == idx.numel(),
                    f"make_views returned {x.shape[0]} inputs / {y.shape[0]} targets for {idx.numel()} indices",
                )
                self._check_views(x, y)
                yield x, y

        return self._step(chunks(), before_update)

    def state_dict(self) -> dict:
        return {"steps_taken": self.steps_taken, "noise_generator": self.noise_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.steps_taken = int(state["steps_taken"])
        self.noise_generator.set_state(state["noise_generator"])

    # ------------------------------------------------------------------ internals
    def _check_views(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        _, k = split_views(inputs, targets, self.multi_view)
        require(
            k == self.config.augmult,
            f"inputs carry {k} view(s) per sample but config.augmult is {self.config.augmult}",
        )

    def _step(self, chunks, before_update) -> StepStats:
        start = time.perf_counter()
        cfg = self.config
        now = [n for n, p in self.model.named_parameters() if p.requires_grad]
        require(
            now == [n for n, _ in self.trainable],
            "the set of trainable parameters changed since this DPSGD was built; build a new one for the new phase",
        )
        sums = {n: torch.zeros_like(p) for n, p in self.trainable}
        count, loss_sum, norm_sum, clipped, dropped = 0.0, 0.0, 0.0, 0.0, 0.0
        for x, y in chunks:
            if x.shape[0] == 0:
                continue
            out = clip_and_sum(
                self.model, x, y, max_grad_norm=cfg.max_grad_norm, loss_fn=self.loss_fn,
                multi_view=self.multi_view, method=self.method, precision=self.precision,
            )
            for n, g in out.grad_sum.items():
                sums[n] += g
            norms = out.per_sample_norms
            kept = torch.isfinite(norms)
            count += norms.numel()
            dropped += float((~kept).sum())
            loss_sum += float(out.per_sample_losses[kept].sum())
            norm_sum += float(norms[kept].sum())
            clipped += float((norms[kept] + 1e-6 > cfg.max_grad_norm).sum())
        if self.all_reduce is not None:
            sums, (count, loss_sum, norm_sum, clipped, dropped) = self._reduce(
                sums, (count, loss_sum, norm_sum, clipped, dropped))
        std = cfg.noise_std
        for n, p in self.trainable:
            g = sums[n]
            if std > 0:
                gen = self.noise_generator
                noise = torch.randn(g.shape, generator=gen, device=gen.device, dtype=g.dtype)
                g = g + std * noise.to(g.device)
            p.grad = (g / cfg.batch_size).to(p.dtype)
        if before_update is not None:
            before_update()
        self.optimizer.step()
        self.steps_taken += 1
        nan = float("nan")
        n_kept = count - dropped
        return StepStats(
            step=self.steps_taken,
            batch_size=round(count),
            loss=loss_sum / n_kept if n_kept else nan,
            grad_norm=norm_sum / n_kept if n_kept else nan,
            clipped_fraction=clipped / n_kept if n_kept else nan,
            dropped=round(dropped),
            noise_std=std / cfg.batch_size,
            seconds=time.perf_counter() - start,
            method=self.method,
        )

    def _reduce(self, sums: dict[str, torch.Tensor], stats: tuple[float, ...]):
        """Sum gradient sums and statistics over ranks with one ``all_reduce`` call."""
        names = [n for n, _ in self.trainable]
        ref = sums[names[0]]
        flat = torch.cat([sums[n].reshape(-1) for n in names] + [torch.tensor(stats, dtype=ref.dtype, device=ref.device)])
        flat = self.all_reduce(flat)
        require(isinstance(flat, torch.Tensor) and flat.numel() == sum(s.numel() for s in sums.values()) + len(stats),
                "all_reduce must return a tensor of the shape it was given")
        out, offset = {}, 0
        for n in names:
            k = sums[n].numel()
            out[n] = flat[offset : offset + k].view_as(sums[n])
            offset += k
        return out, tuple(float(v) for v in flat[offset:])
