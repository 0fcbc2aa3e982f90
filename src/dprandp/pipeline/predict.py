"""Class predictions of a trained model on new images: the step after ``train``.

Predicting is post-processing of the released DP model, so it costs the private training data no
privacy (the run's (ε, δ) still covers it). The images go through the same preparation as training
images (uint8 RGB, 32 × 32, the fixed normalisation), read from a folder of image files, one image
file, a ``.npy`` array or an ``.npz`` archive.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dprandp.errors import InputError, require

#: Keys an ``.npz`` of images is read from, in this order, when it holds several arrays.
NPZ_IMAGE_KEYS = ("images", "x_test", "x", "test_images")


@dataclass(frozen=True, eq=False)
class Predictions:
    """One row per image: the predicted class and the softmax probabilities over the classes."""

    names: tuple[str, ...]  # file path relative to the input folder, or the array index
    probabilities: np.ndarray  # (N, C) float32, rows sum to 1
    class_names: tuple[str, ...]
    flip_tta: bool

    @property
    def labels(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    def to_csv(self) -> str:
        """``image,prediction,confidence,p_<class>...`` with one line per image."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["image", "prediction", "confidence", *(f"p_{c}" for c in self.class_names)])
        for name, label, row in zip(self.names, self.labels, self.probabilities, strict=True):
            writer.writerow([name, self.class_names[label], f"{row[label]:.6f}", *(f"{p:.6f}" for p in row)])
        return out.getvalue()


def read_images(path: str | Path, *, key: str | None = None) -> tuple[tuple[str, ...], np.ndarray]:
    """(names, uint8 (N, 32, 32, 3) images) from an image folder (searched recursively, sorted), one
    image file, a ``.npy`` array or an ``.npz`` archive (``key``, else its only array or one of
    :data:`NPZ_IMAGE_KEYS`)."""
    from dprandp.data.base import to_uint8_nhwc
    from dprandp.data.loaders import IMAGE_SUFFIXES, read_image_file, read_npz, require_numpy_file

    p = Path(path)
    require(p.exists(), f"images not found: {p}")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        require(files, f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {p}")
        return tuple(f.relative_to(p).as_posix() for f in files), np.stack([read_image_file(f) for f in files])
    suffix = p.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return (p.name,), read_image_file(p)[None]
    require(suffix in (".npy", ".npz"), f"{p}: expected a folder of images, an image file, a .npy or an .npz")
    if suffix == ".npz":
        arrays = read_npz(p, required=(), what="images")
        keys = list(arrays)
        chosen = key or (keys[0] if len(keys) == 1 else next((k for k in NPZ_IMAGE_KEYS if k in keys), None))
        require(chosen is not None, f"{p} holds several arrays ({', '.join(keys)}): name one with --key")
        require(chosen in arrays, f"{p} has no array {chosen!r} (it has {', '.join(keys) or 'none'})")
        x = arrays[chosen]
    else:
        require(key is None, "--key applies to an .npz archive, not to a .npy array")
        require_numpy_file(p, "npy", "images")
        try:
            x = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"images file {p} is not a readable .npy ({type(exc).__name__})") from None
    x = to_uint8_nhwc(x, split="input", source=str(p))
    return tuple(str(i) for i in range(len(x))), x


def predict(model_path: str | Path, images: np.ndarray, *, names: tuple[str, ...] | None = None,
            flip_tta: bool = False, batch_size: int = 1024, device: str = "auto") -> Predictions:
    """Softmax probabilities of the saved model (``RUN_DIR/model.pt``) on uint8 NHWC ``images``;
    ``flip_tta`` averages the logits of each image and its mirror image, as ``evaluate`` does.
    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    from dprandp.data.base import RESOLUTION
    from dprandp.pipeline.finish import load_model, require_flip_tta_allowed
    from dprandp.pipeline.trainer import image_logits

    model, meta = load_model(model_path, device=device)
    require_flip_tta_allowed(meta, flip_tta)
    x = np.asarray(images)
    require(x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (RESOLUTION, RESOLUTION, 3),
            f"images must be uint8 (N, {RESOLUTION}, {RESOLUTION}, 3) (dprandp.data.base.to_uint8_nhwc makes them), "
            f"got {x.dtype} {x.shape}")
    names = tuple(str(i) for i in range(len(x))) if names is None else tuple(names)
    require(len(names) == len(x), f"{len(names)} names for {len(x)} images")
    plain, flip = image_logits(model, x, batch_size, with_flip=flip_tta)
    logits = torch.from_numpy(flip if flip_tta else plain).double()
    probabilities = torch.softmax(logits, dim=1).float().numpy()
    class_names = meta.get("class_names") or [str(i) for i in range(meta["num_classes"])]  # numbered if unnamed
    return Predictions(names=names, probabilities=probabilities, class_names=tuple(class_names), flip_tta=flip_tta)
