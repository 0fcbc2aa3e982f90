"""The GroupNorm WideResNet of DP-RandP (De et al. 2022 block order), trunk and heads separable.

Layout of :class:`WideResNet` (``depth = 6n + 4``, widths ``16, 16k, 32k, 64k``):

* ``trunk``: stem conv 3->16, then three stages of ``n`` pre-activation blocks (strides 1, 2, 2).
  A block computes ``conv(norm(relu(x)))`` twice; where the width changes, the shortcut is
  ``conv1x1(norm(relu(x)))``. This is what Phase I pretrains.
* ``final_norm``: ReLU then GroupNorm on the trunk output; ``head``: average pool + Linear.
  These are the parameters a prior lacks (Phase II trains only them). The paper pools globally
  (``head_pool = 1``); ``head_pool = p`` pools to a p x p grid and the Linear reads all
  ``C p^2`` numbers, which keeps where in the image a feature fired (BENCHMARKS.md, section
  ``utility_tuning``: a 4 x 4 grid lifts WRN-16-1's DP linear probe at epsilon = 1 by 10 points).

No BatchNorm (it mixes samples and breaks per-sample privacy) and no in-place operations
(they break per-sample gradient hooks). Initialisation: truncated normal with std 1/sqrt(fan_in)
for convs and linears, zero biases, GroupNorm weight 1 and bias 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dprandp.errors import InputError


@dataclass(frozen=True, kw_only=True)
class WRNConfig:
    """Architecture of a GroupNorm WideResNet. ``depth`` must be 6n + 4."""

    depth: int = 16
    width: int = 4
    num_classes: int = 10
    groups: int = 16
    in_channels: int = 3
    head_pool: int = 1  # side of the average-pool grid the linear head reads (1 = global pool)

    def __post_init__(self) -> None:
        if self.depth < 10 or (self.depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {self.depth}")
        if self.width < 1 or self.num_classes < 1 or self.groups < 1:
            raise ValueError("width, num_classes and groups must be positive")
        if not isinstance(self.head_pool, int) or self.head_pool < 1:
            raise ValueError(f"head_pool must be an integer >= 1, got {self.head_pool!r}")
        for c in self.widths:
            if c % self.groups != 0:
                raise ValueError(f"{self.groups} groups do not divide {c} channels")

    @property
    def widths(self) -> tuple[int, int, int, int]:
        k = self.width
        return (16, 16 * k, 32 * k, 64 * k)

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    """Pre-activation residual block: ``conv(norm(relu(x)))`` twice, shortcut where needed."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1)
        self.has_projection = c_in != c_out or stride != 1
        if self.has_projection:
            self.norm_shortcut = nn.GroupNorm(groups, c_in)
            self.conv_shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(x)
        skip = self.conv_shortcut(self.norm_shortcut(a)) if self.has_projection else x
        out = self.conv1(self.norm1(a))
        out = self.conv2(self.norm2(F.relu(out)))
        return skip + out


class Trunk(nn.Sequential):
    """Stem conv and the three stages: (B, 3, H, W) -> (B, 64k, H/4, W/4)."""

    def __init__(self, config: WRNConfig) -> None:
        n = (config.depth - 4) // 6
        c0, c1, c2, c3 = config.widths
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, c0, 3, padding=1)]
        starts = []
        c_in = c0
        for c_out, stride in ((c1, 1), (c2, 2), (c3, 2)):
            starts.append(len(layers))
            for i in range(n):
                layers.append(Block(c_in, c_out, stride if i == 0 else 1, config.groups))
                c_in = c_out
        super().__init__(*layers)
        #: Index of each stage's first block; the stem conv (index 0) belongs to the first stage.
        self.stage_starts = tuple(starts)


class FinalNorm(nn.Module):
    """ReLU then GroupNorm on the trunk output."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.relu(x))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` without the affine (gamma, beta): what a frozen trunk's features cache."""
        return F.group_norm(F.relu(x), self.norm.num_groups, eps=self.norm.eps)


class ClassifierHead(nn.Module):
    """Average pooling to a ``pool`` x ``pool`` grid, then Linear(channels * pool^2 -> classes).

    ``pool = 1`` is global average pooling. The flattened order is channel-major (c, i, j).
    """

    def __init__(self, channels: int, num_classes: int, pool: int = 1) -> None:
        super().__init__()
        self.pool = pool
        self.fc = nn.Linear(channels * pool * pool, num_classes)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C * pool^2): what ``fc`` reads."""
        if self.pool == 1:
            return x.mean(dim=(2, 3))
        return F.adaptive_avg_pool2d(x, self.pool).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))


class WideResNet(nn.Module):
    """Classifier = ``head(final_norm(trunk(x)))``. ``trunk`` is what a prior provides."""

    #: Parameter-name prefixes of the parts a Phase I prior does not provide.
    PRIOR_LACKS = ("final_norm.", "head.")

    def __init__(self, config: WRNConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = Trunk(config)
        self.final_norm = FinalNorm(config.feature_dim, config.groups)
        self.head = ClassifierHead(config.feature_dim, config.num_classes, config.head_pool)
        init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features after the final norm: (B, 64k)."""
        return self.final_norm(self.trunk(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_norm(self.trunk(x)))

    def head_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith(self.PRIOR_LACKS)]

    def stage_prefixes(self) -> tuple[tuple[str, ...], ...]:
        """Parameter-name prefixes of the trunk's three stages, input side first (the stem conv
        belongs to the first stage). ``--freeze-stages k`` keeps the first k frozen in Phase III."""
        bounds = (0, *self.trunk.stage_starts[1:], len(self.trunk))
        return tuple(tuple(f"trunk.{i}." for i in range(a, b)) for a, b in zip(bounds, bounds[1:]))

    def frozen_prefixes(self, stages: int) -> tuple[str, ...]:
        """Prefixes of the first ``stages`` stages (0: none); at most all but the last stage."""
        count = len(self.stage_prefixes())
        if not 0 <= stages < count:
            raise InputError(f"freeze-stages must be in [0, {count - 1}] for this model (it has {count} "
                             f"trunk stages; freezing all of them is linear probing: --phase3-steps 0), got {stages}")
        return tuple(p for stage in self.stage_prefixes()[:stages] for p in stage)


class ProjectionHead(nn.Module):
    """Phase I projection head: flatten -> [Linear(no bias) -> GN -> ReLU] x 2 -> Linear -> L2 norm.

    With the paper's sizes (256 x 8 x 8 -> 4096 -> 4096 -> 128) it holds ~84 M parameters;
    ``hidden`` is configurable for CPU-sized runs. Dropped after Phase I.
    """

    def __init__(self, in_features: int, *, hidden: int = 4096, out_dim: int = 128, groups: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.norm1 = nn.GroupNorm(groups, hidden)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = nn.GroupNorm(groups, hidden)
        self.fc3 = nn.Linear(hidden, out_dim)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.fc1(x.flatten(1))))
        x = F.relu(self.norm2(self.fc2(x)))
        return F.normalize(self.fc3(x), dim=1)


def init_weights(module: nn.Module) -> None:
    """Truncated normal (std 1/sqrt(fan_in), cut at +-2) for conv/linear weights, zero biases, GN = identity."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            std = fan_in**-0.5
            nn.init.trunc_normal_(m.weight, std=std)  # cut at +-2 (absolute), as in De et al.
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
