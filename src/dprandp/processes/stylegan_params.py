"""What a StyleGAN random-process image *is*: the architecture and the per-image random draws.

A randomly initialised StyleGAN2 synthesis network ("skip" architecture) that is never trained
(Baradad et al., NeurIPS 2021). Two evaluators read the same :class:`ImageParams`:
:mod:`.stylegan_reference` (every channel materialised, the definition) and :mod:`.stylegan_fast`
(the same numbers from a handful of maps). Everything random lives here, drawn from one
per-image generator in a fixed order, so an image depends only on (seed, index, size).

Per image (the original redraws one network every 400 images; we redraw everything per image):

- 4x4 constant input ~ N(0, 1); latents w_j = LeakyReLU_0.2(N(0, I_512)), no mapping network;
- style of each layer s = 1 + A w with A ~ N(0, 1)/sqrt(512), A drawn per image. Given w the
  entries of A w are i.i.d. N(0, |w|^2/512), so we draw s_i = 1 + (|w|/sqrt(512)) z_i directly:
  the same distribution, 512x fewer random numbers (and |w| itself from 3 numbers, see
  :func:`latent_scale`);
- 3x3 layers: a subset of n ~ U{5..40} bank filters, each input channel i one filter k_i of the
  subset, weight[o, i] = g_o F[k_i] with g_o ~ N(0, 1), bias ~ U(-0.2, 0.2), demodulation with
  epsilon 1e-8, noise strength ~ U(0, 0.3), ReLU with gain sqrt(2);
- one noise map per image (1/f^alpha under a Laplace envelope), area-downsampled to each layer;
- ToRGB 1x1 weights ~ N(0, 1), style / sqrt(C), no demodulation; skip connections upsample the
  running RGB image with the [1, 3, 3, 1] filter;
- colour targets: per-channel mean and std drawn from the SPEC.md normals.

Variants: High-frequency (all 40 filters for every layer, an independent noise map per layer, zero
biases) and Random (dense N(0, 1) 3x3 weights, no noise, zero biases; at width 64, see
:data:`RANDOM`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dprandp.processes.filters import N_FILTERS
from dprandp.processes.noise import area_pyramid, pink_noise

W_DIM = 512
CHANNEL_BASE = 32768
DEMOD_EPS = 1e-8
COLOUR_MEAN = ((0.483, 0.145), (0.455, 0.142), (0.401, 0.161))  # (mean, std) of the target mean
COLOUR_STD = ((0.219, 0.063), (0.213, 0.062), (0.213, 0.069))  # (mean, std) of the target std


@dataclass(frozen=True)
class Variant:
    """Which StyleGAN random process; every field is a fact of the process, not a tuning knob."""

    name: str
    subset_filters: bool = True  # Oriented: n ~ U{5..40} filters per layer; High-freq: all 40
    shared_noise: bool = True  # one noise map for all layers (Oriented) or one per layer
    bias_range: float = 0.2
    noise_max: float = 0.3
    dense: bool = False  # Random: dense Gaussian 3x3 weights instead of the filter bank
    channel_max: int = 512
    # The shared noise map is drawn and scaled to unit std at max(noise_size, output size), then
    # area-downsampled to every layer; 0 means the output size (ours), 512 is the original's.
    noise_size: int = 0


ORIENTED = Variant("stylegan-oriented")
# StyleGAN-Oriented with the original's noise map (drawn at 512 px): weaker per-layer noise, most
# at small alpha (see ``processes/noise.py``); ~10 ms more per image for the 512 x 512 FFT.
ORIENTED_N512 = Variant("stylegan-oriented-n512", noise_size=512)
HIGHFREQ = Variant("stylegan-highfreq", subset_filters=False, shared_noise=False, bias_range=0.0)
# The original Random network is 512 wide with dense weights: ~26 GFLOP per 64 px image, which no
# CPU pipeline can afford and which has no shortcut (nothing cancels). We keep its definition at
# width 64; a dense random network is a sum of many independent terms either way.
RANDOM = Variant("stylegan-random", dense=True, noise_max=0.0, bias_range=0.0, channel_max=64,
                 shared_noise=False)


@dataclass(frozen=True)
class ConvSpec:
    res: int  # output resolution
    c_in: int
    c_out: int
    up: bool  # 2x upsampling (first layer of every block after 4x4)
    w_index: int


@dataclass(frozen=True)
class BlockSpec:
    res: int
    convs: tuple[ConvSpec, ...]
    rgb_w_index: int  # ToRGB shares its latent with the next block's first layer


def channels(res: int, channel_max: int) -> int:
    return min(CHANNEL_BASE // res, channel_max)


def architecture(size: int, channel_max: int = 512) -> tuple[BlockSpec, ...]:
    """Blocks at 4, 8, ..., size; 9 conv layers and 5 ToRGB layers at 64 px."""
    blocks, w = [], 0
    res = 4
    while res <= size:
        c = channels(res, channel_max)
        if res == 4:
            convs = (ConvSpec(res, c, c, False, w),)
        else:
            c_prev = channels(res // 2, channel_max)
            convs = (ConvSpec(res, c_prev, c, True, w), ConvSpec(res, c, c, False, w + 1))
        w += len(convs)
        blocks.append(BlockSpec(res, convs, w))
        res *= 2
    return tuple(blocks)


@dataclass
class ConvParams:
    styles: np.ndarray  # (c_in,)
    gain: np.ndarray  # g_o, (c_out,); for dense layers all ones
    bias: np.ndarray  # (c_out,)
    noise: np.ndarray | None  # (res, res), already scaled by the layer's strength
    filters: np.ndarray | None = None  # (c_in,) bank indices (bank layers)
    weight: np.ndarray | None = None  # (c_out, c_in, 3, 3) (dense layers)


@dataclass
class RGBParams:
    styles: np.ndarray  # (c,), already divided by sqrt(c)
    weight: np.ndarray  # (3, c)


@dataclass
class ImageParams:
    size: int
    variant: Variant
    const: np.ndarray  # (c4, 4, 4)
    convs: list[list[ConvParams]]  # per block
    rgbs: list[RGBParams]  # per block
    colour_mean: np.ndarray  # (3,)
    colour_std: np.ndarray  # (3,)


def latent_scale(rng: np.random.Generator) -> float:
    """|w| / sqrt(512) for w = LeakyReLU_0.2(z), z ~ N(0, I_512), drawn exactly from 3 numbers:
    with N+ ~ Binomial(512, 1/2) positive entries, |w|^2 = X + 0.04 Y, X ~ chi2(N+), Y ~ chi2(512 - N+).
    Only |w| matters: given w, the style entries (A w)_i are i.i.d. N(0, |w|^2 / 512)."""
    n_pos = int(rng.binomial(W_DIM, 0.5))
    x = rng.chisquare(n_pos) if n_pos > 0 else 0.0
    y = rng.chisquare(W_DIM - n_pos) if n_pos < W_DIM else 0.0
    return float(np.sqrt((x + 0.04 * y) / W_DIM))


def sample_params(rng: np.random.Generator, size: int, variant: Variant) -> ImageParams:
    """Draw every random quantity of one image, in a fixed order (a few large draws rather than
    one per layer: the per-call overhead of numpy's generator dominates at these sizes)."""
    blocks = architecture(size, variant.channel_max)
    specs = [s for b in blocks for s in b.convs]
    n_layers = len(specs)
    const = rng.standard_normal((specs[0].c_in, 4, 4))
    w_scale = np.array([latent_scale(rng) for _ in range(blocks[-1].rgb_w_index + 1)])
    shared = None
    if variant.shared_noise and variant.noise_max > 0:
        shared = area_pyramid(pink_noise(rng, max(size, variant.noise_size)))

    c_in = np.array([s.c_in for s in specs])
    c_out = np.array([s.c_out for s in specs])
    in_at = np.concatenate([[0], np.cumsum(c_in)])
    out_at = np.concatenate([[0], np.cumsum(c_out)])
    z_styles = rng.standard_normal(in_at[-1])
    biases = rng.uniform(-variant.bias_range, variant.bias_range, size=out_at[-1])
    strengths = rng.uniform(0.0, variant.noise_max, size=n_layers)
    if variant.dense:
        weights = [rng.standard_normal((s.c_out, s.c_in, 3, 3)) for s in specs]
    else:
        gains = rng.standard_normal(out_at[-1])
        if variant.subset_filters:
            n_sub = rng.integers(5, N_FILTERS + 1, size=n_layers)
        else:
            n_sub = np.full(n_layers, N_FILTERS)
        subsets = np.argsort(rng.random((n_layers, N_FILTERS)), axis=1)  # a uniform permutation per layer
        picks = rng.random(in_at[-1])  # input channel i takes subset[floor(pick_i * n)]

    layers = []
    for li, spec in enumerate(specs):
        sl_in, sl_out = slice(in_at[li], in_at[li + 1]), slice(out_at[li], out_at[li + 1])
        styles = 1.0 + w_scale[spec.w_index] * z_styles[sl_in]
        if variant.dense:
            filters, weight, gain = None, weights[li], np.ones(spec.c_out)
        else:
            filters = subsets[li][np.floor(picks[sl_in] * n_sub[li]).astype(np.int64)]
            weight, gain = None, gains[sl_out]
        noise = None
        if variant.noise_max > 0:
            base = shared[spec.res] if shared is not None else pink_noise(rng, spec.res)
            noise = strengths[li] * base
        layers.append(ConvParams(styles, gain, biases[sl_out], noise, filters, weight))

    c_rgb = np.array([b.convs[-1].c_out for b in blocks])
    rgb_at = np.concatenate([[0], np.cumsum(c_rgb)])
    z_rgb = rng.standard_normal(rgb_at[-1])
    w_rgb = rng.standard_normal((3, rgb_at[-1]))
    convs, rgbs, li = [], [], 0
    for bi, block in enumerate(blocks):
        convs.append(layers[li : li + len(block.convs)])
        li += len(block.convs)
        sl = slice(rgb_at[bi], rgb_at[bi + 1])
        c = c_rgb[bi]
        rgbs.append(RGBParams((1.0 + w_scale[block.rgb_w_index] * z_rgb[sl]) / np.sqrt(c), w_rgb[:, sl]))
    mean = rng.normal([m for m, _ in COLOUR_MEAN], [s for _, s in COLOUR_MEAN])
    std = rng.normal([m for m, _ in COLOUR_STD], [s for _, s in COLOUR_STD])
    return ImageParams(size, variant, const, convs, rgbs, mean, std)


def to_uint8(img: np.ndarray, params: ImageParams) -> np.ndarray:
    """(3, S, S) network output -> (S, S, 3) uint8: standardise each channel, set the drawn
    mean/std, clip to [0, 1], scale by 255 and truncate (as the original's ``astype``)."""
    x = np.asarray(img, dtype=np.float64)
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = x.std(axis=(1, 2), keepdims=True)
    std = np.where(std > 0, std, 1.0)
    x = (x - mean) / std * params.colour_std[:, None, None] + params.colour_mean[:, None, None]
    x = np.clip(x, 0.0, 1.0) * 255.0
    return x.astype(np.uint8).transpose(1, 2, 0)
