"""Dataset loaders: each reads one source format and ends in :func:`make_image_data`.

=============  ==========================================================================
``digits``     scikit-learn's bundled 8x8 handwritten digits (1,797 images): no download,
               the offline default. Fixed 75 / 25 split (seed 0), upscaled to 32 px.
``cifar10``    an ``.npz`` with ``x_train, y_train, x_test, y_test`` (like
``cifar100``   ``../shared/data/cifar10.npz``) or a torchvision root folder (downloaded by
               torchvision when it is missing and the machine is online).
``medmnist``   an official MedMNIST ``.npz`` (keys ``train_images``, ``train_labels``,
               ``val_*``, ``test_*``), any 2D subset, 28 px -> 32 px, grayscale -> RGB;
               a missing file named like a subset (``pathmnist.npz``) is downloaded by the
               ``medmnist`` package when online.
``imagefolder`` a folder of class folders, either ``train/`` + ``test/`` (class names from
               ``test/``) or one set split with a fixed seed; folder names are released as
               class names.
``npz``        any ``.npz`` with the four CIFAR-style keys (optional ``class_names``).
=============  ==========================================================================
"""

from __future__ import annotations

import os
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from dprandp.data.base import ImageData, float_pixels_to_uint8, make_image_data, seeded_split
from dprandp.errors import InputError, require

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
MEDMNIST_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def default_data_root() -> Path:
    """Where downloads go when ``--data`` is not given: ``$DPRANDP_DATA`` or ~/.cache/dprandp."""
    return Path(os.environ.get("DPRANDP_DATA", Path.home() / ".cache" / "dprandp"))


_MAGIC = {b"PK\x03\x04": "npz", b"PK\x05\x06": "npz", b"\x93NUM": "npy"}


def numpy_file_kind(path: str | os.PathLike) -> str | None:
    """``"npz"`` (a zip archive), ``"npy"`` (one array) or None, from the file's first bytes."""
    try:
        with open(path, "rb") as f:
            return _MAGIC.get(f.read(4))
    except OSError:
        return None


def require_numpy_file(path: str | os.PathLike, kind: str, what: str) -> None:
    """Refuse, with one line, a file that is not a NumPy ``kind`` file (before numpy would try to unpickle it)."""
    found = numpy_file_kind(path)
    if found == kind:
        return
    if found is not None:
        raise InputError(f"{what} file {path} is a .{found} file, not a .{kind} "
                         f"({'numpy.savez writes an .npz archive' if kind == 'npz' else 'numpy.save writes a .npy array'})")
    raise InputError(f"{what} file {path} is not a .{kind} file (it does not start like one)")


def read_npz(path: str | os.PathLike, *, required: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (no pickle), refusing a missing, corrupt or incomplete file."""
    p = Path(path)
    require(p.exists(), f"{what} file not found: {p}")
    require(p.is_file(), f"{what} path is not a file: {p}")
    require_numpy_file(p, "npz", what)
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise InputError(f"{what} file {p} is not a readable .npz ({type(exc).__name__}: {exc})") from None
    missing = [k for k in required if k not in arrays]
    require(not missing, f"{what} file {p} lacks key(s) {', '.join(missing)} "
                         f"(has: {', '.join(sorted(arrays)) or 'none'})")
    return arrays


# ---------------------------------------------------------------------------------------- digits
def load_digits(path: str | None = None, *, seed: int = 0) -> ImageData:
    """scikit-learn's 8x8 digits, pixel values 0..16 scaled to 0..255, 25 % held out as test."""
    require(path is None, "the digits dataset is bundled with scikit-learn: do not pass --data")
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    train, test = seeded_split(len(images), test_fraction=0.25, seed=seed)
    return make_image_data(name="digits", x_train=images[train], y_train=d.target[train],
                           x_test=images[test], y_test=d.target[test], source="digits",
                           num_classes=10, class_names=[str(i) for i in range(10)])


# ------------------------------------------------------------------------------------------- npz
def load_npz(path: str | None, *, name: str = "npz", num_classes: int | None = None) -> ImageData:
    require(path is not None, f"the {name} dataset needs --data PATH.npz")
    arrays = read_npz(path, required=NPZ_KEYS, what=name)
    return make_image_data(
        name=name, source=f"{name} {path}", num_classes=num_classes,
        class_names=arrays.get("class_names"),
        **{k: arrays[k] for k in NPZ_KEYS})


# --------------------------------------------------------------------------------------- cifar
_CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


def load_cifar(path: str | None, *, name: str) -> ImageData:
    """CIFAR-10/100 from an ``.npz`` or a torchvision root folder (downloaded when online)."""
    classes = _CIFAR_CLASSES[name]
    if path is not None and Path(path).suffix.lower() == ".npz":  # CIFAR10.NPZ too
        return load_npz(path, name=name, num_classes=classes)
    root = Path(path) if path is not None else default_data_root()
    require(not root.is_file(), f"{name}: {root} is a file but not an .npz; pass an .npz or a torchvision root folder")
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train, test = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError:
        try:
            root.mkdir(parents=True, exist_ok=True)
            train = cls(str(root), train=True, download=True)
            test = cls(str(root), train=False, download=True)
        except Exception as exc:  # no network, no permission, corrupt archive ...
            raise InputError(f"{name}: no dataset under {root} and the download failed "
                             f"({type(exc).__name__}); pass --data with an .npz or a torchvision root") from None
    return make_image_data(name=name, source=f"{name} {root}", num_classes=classes,
                           class_names=train.classes,
                           x_train=np.asarray(train.data), y_train=np.asarray(train.targets),
                           x_test=np.asarray(test.data), y_test=np.asarray(test.targets))


# ------------------------------------------------------------------------------------ medmnist
def _medmnist_info(flag: str) -> dict | None:
    try:
        import medmnist
    except ImportError:
        return None
    return medmnist.INFO.get(flag)


def _download_medmnist(p: Path) -> None:
    flag = p.stem.lower()
    info = _medmnist_info(flag)
    require(info is not None, f"medmnist file not found: {p} (to download, name the file after a "
                              "MedMNIST 2D subset, e.g. pathmnist.npz, and install the medmnist package)")
    require("3d" not in flag, f"medmnist: {flag} is a 3D subset; only 2D subsets are supported")
    import medmnist

    cls = getattr(medmnist, info["python_class"])
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        cls(split="train", download=True, root=str(p.parent))
    except Exception as exc:
        raise InputError(f"medmnist file not found: {p}, and downloading {flag} failed "
                         f"({type(exc).__name__}; offline?)") from None
    require(p.exists(), f"medmnist: downloaded {flag} but {p} is still missing")


def load_medmnist(path: str | None) -> ImageData:
    """An official MedMNIST 2D ``.npz`` (28 px). Keeps the official validation split."""
    require(path is not None, "the medmnist dataset needs --data PATH.npz (e.g. ../data/pathmnist.npz)")
    p = Path(path)
    if not p.exists():
        _download_medmnist(p)
    arrays = read_npz(p, required=MEDMNIST_KEYS, what="medmnist")
    x = arrays["train_images"]
    require(x.ndim in (3, 4) and not (x.ndim == 4 and x.shape[-1] not in (1, 3)),
            f"medmnist {p}: train_images of shape {x.shape} are not 2D images (3D subsets are not supported)")
    info = _medmnist_info(p.stem.lower().split("_")[0])
    num_classes, class_names = None, None
    if info is not None and info.get("task") != "multi-label, binary-class":
        labels = info.get("label", {})
        class_names = [labels[k] for k in sorted(labels, key=int)]
        num_classes = len(class_names)
    has_val = "val_images" in arrays and "val_labels" in arrays
    return make_image_data(
        name=f"medmnist:{p.stem}", source=f"medmnist {p}", num_classes=num_classes,
        class_names=class_names, x_train=x, y_train=arrays["train_labels"],
        x_test=arrays["test_images"], y_test=arrays["test_labels"],
        x_val=arrays["val_images"] if has_val else None, y_val=arrays["val_labels"] if has_val else None)


# --------------------------------------------------------------------------------- imagefolder
#: Folders that are never classes: macOS's zip archiver adds ``__MACOSX`` (resource forks, ``._x.png``).
NOT_CLASS_FOLDERS = frozenset({"__MACOSX"})

#: The two layouts, for the messages that refuse anything else.
LAYOUTS = ("the layouts are ROOT/train/<class>/ + ROOT/test/<class>/ (class names come from test/, the public "
           "held-out set; a val/ folder is not read), or the class folders directly under ROOT (ROOT/<class>/, "
           "split with a fixed seed)")


def _class_dirs(root: Path) -> list[Path]:
    """The sub-folders of ``root`` read as classes: hidden ones (``.git``, ``.ipynb_checkpoints``) and
    macOS's ``__MACOSX`` are skipped, as they would otherwise become classes with no image of their own."""
    return sorted(d for d in root.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and d.name not in NOT_CLASS_FOLDERS)


def _is_image_file(f: Path) -> bool:
    return f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")  # e.g. macOS's ._x.png


def _image_files(folder: Path, *, declaration_ok: bool = False) -> list[Path]:
    """The image files directly inside one class folder; a folder with none is refused, naming what
    it holds instead (a class with no image would still be a class of the released model).
    ``declaration_ok``: an empty folder (nothing in it but hidden files) is accepted and gives no
    image: ``test/<class>/`` declaring a public class that has training images but no test image."""
    entries = sorted(folder.iterdir())
    files = [f for f in entries if _is_image_file(f)]
    if not files and declaration_ok and all(f.name.startswith(".") for f in entries):
        return []
    if not files:
        others = Counter(f.suffix or "(no suffix)" for f in entries if f.is_file() and not f.name.startswith("."))
        held = [f"{n} {suffix} file{'s' * (n > 1)}" for suffix, n in sorted(others.items())]
        hidden = sum(f.is_file() and f.name.startswith(".") for f in entries)
        subfolders = sum(f.is_dir() and not f.name.startswith(".") for f in entries)
        held += [f"{n} {what}{'s' * (n > 1)}" for what, n in (("hidden file", hidden), ("subfolder", subfolders)) if n]
        raise InputError(f"imagefolder: class folder {folder} holds no image file "
                         f"({'skipped: ' + ', '.join(held) if held else 'it is empty'}); images are read from "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))} files directly inside a class folder: convert "
                         "them, or remove the folder")
    return files


#: PIL modes whose pixels may exceed 8 bits (16-bit grayscale PNG/TIFF, 32-bit integer); float (``F``) has its own rule.
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _eight_bit(pixels: np.ndarray, path: Path) -> np.ndarray:
    """A wide-mode image's pixels as uint8 when they fit 0..255; else one line, never a clipped image."""
    low, high = float(pixels.min()), float(pixels.max())
    require(0 <= low and high <= 255,
            f"image {path} has pixel values in [{low:g}, {high:g}] ({pixels.dtype}, e.g. a 16-bit scan): dprandp reads "
            "8-bit images; rescale every image to 0..255 the same way first (PIL would clip it at 255)")
    return np.rint(pixels).astype(np.uint8)


def read_image_file(path: Path) -> np.ndarray:
    """One image file as uint8 (32, 32, 3) RGB, resized with PIL's bilinear filter where needed: the
    preparation of every image read from a file (training folders and ``dprandp predict`` alike).

    The EXIF orientation is applied (a phone photo is read upright, as it is shown); float pixels (PIL
    mode ``F``, e.g. a float TIFF) follow the rule of float arrays: values in [0, 1], scaled by 255.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    from dprandp.data.base import RESOLUTION

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode == "F":
                im = Image.fromarray(float_pixels_to_uint8(np.asarray(im), where=f"image {path}"))
            elif im.mode in WIDE_MODES:  # 16- or 32-bit integer pixels: PIL's convert would clip them at 255
                im = Image.fromarray(_eight_bit(np.asarray(im), path))
            im = im.convert("RGB")
            if im.size != (RESOLUTION, RESOLUTION):
                im = im.resize((RESOLUTION, RESOLUTION), Image.BILINEAR, reducing_gap=None)
            return np.array(im, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's guard against a small file that decodes to gigabytes
        detail = str(exc).split(", could be")[0]
        raise InputError(f"cannot read image {path}: too large ({detail}); shrink it first (it is read at "
                         f"{RESOLUTION} x {RESOLUTION} px)") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"cannot read image {path} ({type(exc).__name__})") from None


def _read_classes(folders: list[tuple[Path, int]], *, declarations_ok: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of (class folder, label) pairs; every folder is listed (and an empty one
    refused, unless ``declarations_ok``) before any image is decoded."""
    files = [(f, label) for folder, label in folders for f in _image_files(folder, declaration_ok=declarations_ok)]
    require(len(files) > 0, f"imagefolder: no image in {', '.join(str(f) for f, _ in folders)}")
    images = []
    for f, _ in files:
        try:
            images.append(read_image_file(f))
        except InputError as exc:
            raise InputError(f"imagefolder: {exc}") from None
    return np.stack(images), np.asarray([label for _, label in files], dtype=np.int64)


def _split_folders(root: Path) -> list[Path]:
    """``train/``, ``test/`` or ``val/`` folders of ``root`` that hold class folders and no image: split
    folders of an incomplete train/test layout, not classes (a class may well be called "train")."""
    return [d for d in _class_dirs(root)
            if d.name in ("train", "test", "val") and _class_dirs(d) and not any(map(_is_image_file, d.iterdir()))]


def load_imagefolder(path: str | None, *, test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """Class folders: ``ROOT/train/<class>/*`` + ``ROOT/test/<class>/*``, or ``ROOT/<class>/*``
    split with a fixed seed (``test_fraction`` held out).

    The class names are released with the model (its class names and output head), unprotected by
    epsilon, so they must be public metadata. With ``train/`` + ``test/`` they are taken from
    ``test/``, the public held-out set, never from the private ``train/``: a class folder only
    ``train/`` has is refused (its name could reveal the few records in it). With one folder tree the
    folder names are the user's declaration of the classes, and are released as they are.
    ``__MACOSX`` and hidden folders are skipped; a class folder with no image file is refused.
    """
    require(path is not None, "the imagefolder dataset needs --data DIR")
    root = Path(path)
    require(root.is_dir(), f"imagefolder: {root} is not a directory")
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        classes = [d.name for d in _class_dirs(test_dir)]
        require(len(classes) > 0, f"imagefolder {root}: test/ holds no class folder; {LAYOUTS}")
        train_only = [d.name for d in _class_dirs(train_dir) if d.name not in classes]
        require(not train_only,
                f"imagefolder {root}: class folder(s) {', '.join('train/' + c for c in train_only)} have no "
                "counterpart under test/: class names are taken from test/ only, because a name found only among "
                "the private training images would be released with the model, unprotected by epsilon; add test "
                "images of that class under test/, declare it with an empty folder test/<class>/ (its name is then "
                "your public declaration), or move those training images out of train/")
        train_folders = [(train_dir / c, i) for i, c in enumerate(classes) if (train_dir / c).is_dir()]
        require(len(train_folders) > 0, f"imagefolder {root}: train/ holds no class folder; {LAYOUTS}")
        x_tr, y_tr = _read_classes(train_folders)
        # An empty test/<class>/ declares a public class with no test image: it needs training images, then.
        x_te, y_te = _read_classes([(test_dir / c, i) for i, c in enumerate(classes)], declarations_ok=True)
        declared = sorted(set(range(len(classes))) - set(y_tr.tolist()) - set(y_te.tolist()))
        require(not declared, f"imagefolder {root}: class folder test/{classes[declared[0]] if declared else ''} is "
                "empty and train/ has no image of that class either: a class needs images somewhere")
    else:
        splits = _split_folders(root)
        if splits:
            missing = " or ".join(f"{s}/" for s in ("train", "test") if not (root / s).is_dir())
            raise InputError(f"imagefolder {root}: {' and '.join(d.name + '/' for d in splits)} "
                             f"hold{'s' * (len(splits) == 1)} class folders but there is no {missing}; {LAYOUTS}")
        classes = [d.name for d in _class_dirs(root)]
        require(len(classes) >= 2, f"imagefolder {root}: needs at least 2 class folders, found {len(classes)}"
                                   f"{' (' + ', '.join(classes) + ')' if classes else ''}; {LAYOUTS}")
        x, y = _read_classes([(root / c, i) for i, c in enumerate(classes)])
        train, test = seeded_split(len(x), test_fraction=test_fraction, seed=seed)
        x_tr, y_tr, x_te, y_te = x[train], y[train], x[test], y[test]
    return make_image_data(name="imagefolder", source=f"imagefolder {root}", num_classes=len(classes),
                           class_names=classes, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
