"""The one in-memory form of every dataset: :class:`ImageData`, and the checks it must pass.

Every loader ends in :func:`make_image_data`, which turns whatever the source holds (grayscale or
RGB, 8, 28 or 32 px, uint8 or float in [0, 1]) into uint8 ``(N, 32, 32, 3)`` images and int64
labels, and refuses anything a user should fix (NaN pixels, labels outside ``0..C-1``, fewer than
two classes, an empty split) with one :class:`~dprandp.errors.InputError` line that names the
split and the problem. Keeping the data as uint8 NHWC costs 3 KB per image, so CIFAR-10 fits in
150 MB; conversion to normalised float happens per batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.nn import functional as F

from dprandp.errors import InputError, require

#: Side length every model in this project expects.
RESOLUTION = 32


@dataclass(frozen=True, kw_only=True, eq=False)
class ImageData:
    """Train / test (and optional validation) images of one dataset, ready for training.

    Images are uint8 ``(N, 32, 32, 3)``; labels int64 ``(N,)`` in ``0..num_classes-1``.
    ``x_val``/``y_val`` are ``None`` unless a validation split exists (MedMNIST's official one,
    or one carved from train by :func:`with_validation` for honest hyperparameter tuning).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    #: How the validation split was carved from train ({"fraction", "seed"}; None when not carved):
    #: recorded in model files so that ``evaluate`` carves the very same split again.
    val_split: dict | None = None

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    def describe(self) -> str:
        val = f", {len(self.x_val)} val" if self.x_val is not None else ""
        return (f"{self.name}: {self.num_train} train, {len(self.x_test)} test{val}, "
                f"{self.num_classes} classes")


def to_uint8_nhwc(images: np.ndarray, *, split: str, source: str) -> np.ndarray:
    """Images of shape (N, H, W), (N, H, W, 1|3) or (N, 1|3, H, W) -> uint8 (N, 32, 32, 3).

    uint8 is taken as is; floating point must lie in [0, 1] (scaled by 255); other integer types
    must lie in 0..255. Grayscale is repeated to 3 channels; other sizes are resized (bilinear,
    antialiased when shrinking).
    """
    x = np.asarray(images)
    where = f"{source}: {split} images"
    require(x.ndim in (3, 4), f"{where} must have shape (N, H, W) or (N, H, W, C), got {x.shape}")
    require(x.shape[0] > 0, f"{where}: the split is empty")
    require(not (x.ndim == 3 and x.shape[2] in (1, 3, 4) and x.shape[1] > 4),
            f"{where} have shape {x.shape}: that reads as {x.shape[0]} grayscale images {x.shape[2]} pixels wide; "
            f"for one {x.shape[2]}-channel image add the batch axis, shape (1, {x.shape[0]}, {x.shape[1]}, {x.shape[2]})")
    if x.ndim == 4 and x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = np.moveaxis(x, 1, -1)  # NCHW -> NHWC
    if x.ndim == 3:
        x = x[..., None]
    require(x.shape[-1] in (1, 3), f"{where} must have 1 or 3 channels, got shape {x.shape}")
    require(x.shape[1] >= 2 and x.shape[2] >= 2, f"{where} are too small: shape {x.shape}")
    if x.dtype == np.uint8:
        pass
    elif np.issubdtype(x.dtype, np.floating):
        x = float_pixels_to_uint8(x, where=where)
    elif np.issubdtype(x.dtype, np.integer) and not np.issubdtype(x.dtype, np.bool_):
        require(x.min() >= 0 and x.max() <= 255, f"{where}: integer pixels must lie in 0..255")
        x = x.astype(np.uint8)
    else:
        raise InputError(f"{where} have unsupported dtype {x.dtype} (use uint8 or float in [0, 1])")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (RESOLUTION, RESOLUTION):
        x = resize_uint8(x, RESOLUTION)
    return np.ascontiguousarray(x)


def float_pixels_to_uint8(x: np.ndarray, *, where: str) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8 (scaled by 255); NaN, infinite or out-of-range pixels are refused.

    The one rule for float images, shared by arrays (``.npz``, ``.npy``) and float image files (PIL
    mode ``F``, e.g. a float TIFF), so the same picture reads the same whichever way it is stored.
    """
    require(bool(np.isfinite(x).all()), f"{where} contain NaN or infinite pixels")
    low, high = float(x.min()), float(x.max())
    require(low >= 0.0 and high <= 1.0,
            f"{where}: float pixels must lie in [0, 1] (they are scaled by 255), got [{low:.3g}, {high:.3g}]")
    return np.rint(x * 255.0).astype(np.uint8)


def resize_uint8(x: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """Bilinear resize of uint8 NHWC images to ``size`` x ``size`` (antialiased when shrinking)."""
    out = np.empty((x.shape[0], size, size, x.shape[-1]), dtype=np.uint8)
    shrink = x.shape[1] > size or x.shape[2] > size
    for i in range(0, x.shape[0], chunk):
        t = torch.from_numpy(np.ascontiguousarray(x[i:i + chunk])).permute(0, 3, 1, 2).float()
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out[i:i + chunk] = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def to_labels(labels: np.ndarray, *, n: int, split: str, source: str) -> np.ndarray:
    """Labels of shape (N,) or (N, 1), integral -> int64 (N,)."""
    y = np.asarray(labels)
    where = f"{source}: {split} labels"
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    require(y.ndim == 1, f"{where} must have shape (N,) or (N, 1), got {y.shape} "
                         "(multi-label data is not supported)")
    require(y.shape[0] == n, f"{where}: {y.shape[0]} labels for {n} images")
    if np.issubdtype(y.dtype, np.floating):
        require(bool(np.isfinite(y).all()) and bool((y == np.round(y)).all()),
                f"{where} must be whole numbers")
    elif not np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_):
        raise InputError(f"{where} have unsupported dtype {y.dtype} (use integers)")
    # Range-check before the cast: numpy turns a float 1e30 or a uint64 above 2**63 into an unrelated
    # int64 (with at most a warning), which would then pass, or fail, the class checks as that value.
    if y.size:
        low, high = y.min(), y.max()
        require(-_LABEL_LIMIT <= low and high <= _LABEL_LIMIT,
                f"{where} must be class indices, found {high if high > _LABEL_LIMIT else low}")
    return y.astype(np.int64)


#: Largest label magnitude accepted before the int64 cast (2**53: floats are still whole numbers there).
_LABEL_LIMIT = 2**53


def clean_class_names(raw, *, source: str) -> tuple[str, ...]:
    """Declared class names as a tuple of str: bytes (numpy ``S`` arrays, e.g. CIFAR's pickled
    ``label_names``) are decoded, and empty or duplicate names, which would make predictions
    ambiguous or unreadable, are refused."""
    names = []
    for c in np.asarray(raw).reshape(-1).tolist():
        if isinstance(c, bytes):
            try:
                c = c.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{source}: class name {c!r} is not UTF-8 text") from None
        try:  # a folder name that is not valid UTF-8 arrives as str with surrogate escapes
            str(c).encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{source}: class name {c!r} is not valid UTF-8 text: rename it") from None
        names.append(str(c))
    empty = [i for i, c in enumerate(names) if not c.strip()]
    if empty:
        raise InputError(f"{source}: class name {empty[0]} (counting from 0) is empty: give every class a name")
    dupes = [c for c, count in Counter(names).items() if count > 1]
    if dupes:
        raise InputError(f"{source}: class name {dupes[0]!r} appears more than once: class names must be distinct")
    return tuple(names)


def make_image_data(*, name: str, x_train, y_train, x_test, y_test, source: str,
                    num_classes: int | None = None, class_names=None,
                    x_val=None, y_val=None) -> ImageData:
    """Validate and normalise raw arrays into an :class:`ImageData`.

    ``num_classes`` is the declared class count (CIFAR-10: 10; from ``class_names`` if given);
    without one it is inferred as ``max(label) + 1`` over the test and validation splits, never from
    the private training labels: a class that only one training record has would otherwise show in
    the released model's head, and so reveal that record. Training labels outside it are refused, and
    so are public labels with gaps (some class in ``0..max`` with no public label): declare the classes
    instead. ``class_names`` are released in the model file, so they must be public.
    """
    splits = {"train": (x_train, y_train), "test": (x_test, y_test)}
    if x_val is not None:
        splits["val"] = (x_val, y_val)
    xs, ys = {}, {}
    for split, (x, y) in splits.items():
        xs[split] = to_uint8_nhwc(x, split=split, source=source)
        ys[split] = to_labels(y, n=xs[split].shape[0], split=split, source=source)
    if class_names is not None:
        class_names = clean_class_names(class_names, source=source)
        if num_classes is None:
            num_classes = len(class_names)
        require(len(class_names) == num_classes,
                f"{source}: {len(class_names)} class names for {num_classes} classes")
    inferred = num_classes is None
    if inferred:
        public_y = np.concatenate([y for split, y in ys.items() if split != "train"])
        require(public_y.size > 0, f"{source}: cannot infer the number of classes from an empty test split; "
                "declare them (class_names)")
        require(int(public_y.min()) >= 0, f"{source}: labels must be >= 0, got {int(public_y.min())}")
        # A gap means some class has no public label at all: most often one stray label (255 for
        # "unknown", a typo such as 10**9) that would set the head size (256 classes, or an out-of-memory).
        public = " and ".join(split for split in ys if split != "train")
        distinct, top = np.unique(public_y).size, int(public_y.max())
        require(distinct == top + 1,
                f"{source}: the {public} labels reach {top} but hold only {distinct} distinct values, so "
                f"{top + 1 - distinct} of the {top + 1} classes inferred from them would have no {public} image "
                "(a stray label?): fix the labels, or declare the classes (class_names)")
        num_classes = top + 1
    for split, y in ys.items():
        bad = (y < 0) | (y >= num_classes)
        if bad.any():
            hint = (f" (the {num_classes} classes were inferred from the test labels, never from the private "
                    "training labels: declare them with class_names)") if inferred and split == "train" else ""
            raise InputError(f"{source}: {split} labels must lie in 0..{num_classes - 1}, "
                             f"found {int(y[bad][0])}{hint}")
    present = np.unique(ys["train"])
    require(num_classes >= 2 and present.size >= 2,
            f"{source}: a classifier needs at least 2 classes, the train split has {present.size}")
    if class_names is None:
        class_names = tuple(str(i) for i in range(num_classes))
    return ImageData(name=name, x_train=xs["train"], y_train=ys["train"], x_test=xs["test"],
                     y_test=ys["test"], num_classes=int(num_classes), class_names=class_names,
                     x_val=xs.get("val"), y_val=ys.get("val"))


def with_validation(data: ImageData, *, fraction: float, seed: int = 0) -> ImageData:
    """Carve a validation split of ``fraction`` of train with a fixed seed (stratified-free).

    Tuning hyperparameters on the test set overstates accuracy; tune on this split instead.
    Data that already has a validation split (MedMNIST's official one) is returned unchanged.
    """
    require(0.0 <= fraction < 1.0, f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or data.x_val is not None:
        return data
    n = data.num_train
    n_val = int(round(fraction * n))
    require(0 < n_val < n, f"validation fraction {fraction} of {n} training images leaves an empty split")
    perm = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return replace(data, x_train=data.x_train[train], y_train=data.y_train[train],
                   x_val=data.x_train[val], y_val=data.y_train[val], val_split={"fraction": fraction, "seed": seed})


def seeded_split(n: int, *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) of a fixed random split."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(test_fraction * n)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
