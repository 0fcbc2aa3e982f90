"""Dataset loaders: formats, conversions and refusals (checked against hand-built arrays)."""

from pathlib import Path

import numpy as np
import pytest

from dprandp.data import load_dataset, to_float, with_validation
from dprandp.errors import InputError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def cifar_like(n_train=20, n_test=8, classes=3, rng=None):
    rng = rng or np.random.default_rng(0)
    return dict(
        x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        y_train=np.arange(n_train) % classes,
        x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        y_test=np.arange(n_test) % classes,
    )


def test_npz_roundtrip_keeps_pixels_and_labels(tmp_path):
    arrays = cifar_like()
    d = load_dataset("npz", write_npz(tmp_path / "d.npz", **arrays))
    assert d.x_train.dtype == np.uint8 and d.x_train.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(d.x_train, arrays["x_train"])
    np.testing.assert_array_equal(d.y_test, arrays["y_test"])
    assert d.y_train.dtype == np.int64 and d.num_classes == 3


def test_float_grayscale_is_scaled_and_repeated(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.random((6, 32, 32)).astype(np.float32)
    path = write_npz(tmp_path / "g.npz", x_train=gray, y_train=np.array([0, 1] * 3),
                     x_test=gray[:2], y_test=np.array([0, 1]))
    d = load_dataset("npz", path)
    expected = np.rint(gray * 255).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(d.x_train[..., c], expected)


def test_digits_offline_default():
    d = load_dataset("digits")
    assert d.num_classes == 10 and d.x_train.shape[1:] == (32, 32, 3)
    assert d.num_train + len(d.x_test) == 1797
    # the 25 % split is fixed: same test set every time
    np.testing.assert_array_equal(load_dataset("digits").y_test, d.y_test)


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    arrays = cifar_like(n_train=40)
    arrays["x_train"][:, 0, 0, 0] = np.arange(40)  # tag each image
    d = load_dataset("npz", write_npz(tmp_path / "d.npz", **arrays), val_fraction=0.25, val_seed=3)
    tags_train, tags_val = set(d.x_train[:, 0, 0, 0]), set(d.x_val[:, 0, 0, 0])
    assert len(tags_val) == 10 and len(tags_train) == 30 and not tags_train & tags_val
    again = with_validation(load_dataset("npz", str(tmp_path / "d.npz")), fraction=0.25, seed=3)
    np.testing.assert_array_equal(again.x_val, d.x_val)


def medmnist_file(path, *, channels, classes, n=(30, 6, 12), size=28):
    rng = np.random.default_rng(2)
    arrays = {}
    for split, m in zip(("train", "val", "test"), n):
        shape = (m, size, size) if channels == 1 else (m, size, size, 3)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(m) % classes).reshape(m, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("channels,classes", [(1, 2), (3, 9), (1, 11)])
def test_medmnist_shapes(tmp_path, channels, classes):
    arrays = medmnist_file(tmp_path / "mysubset.npz", channels=channels, classes=classes)
    d = load_dataset("medmnist", str(tmp_path / "mysubset.npz"))
    assert d.x_train.shape == (30, 32, 32, 3) and d.x_val.shape == (6, 32, 32, 3)
    assert d.num_classes == classes
    np.testing.assert_array_equal(d.y_train, arrays["train_labels"][:, 0])
    if channels == 1:  # gray -> 3 equal channels
        assert (d.x_train[..., 0] == d.x_train[..., 2]).all()


def test_medmnist_resize_matches_reference_bilinear(tmp_path):
    """28 -> 32 px: compare with PIL's bilinear resize of a smooth image (independent reference)."""
    from PIL import Image

    yy, xx = np.mgrid[0:28, 0:28]
    img = (4 * xx + 3 * yy).astype(np.uint8)  # a linear ramp: bilinear resampling is exact inside
    arrays = {f"{s}_images": np.stack([img] * 2) for s in ("train", "test")}
    arrays.update({f"{s}_labels": np.array([[0], [1]]) for s in ("train", "test")})
    np.savez(tmp_path / "ramp.npz", **arrays)
    d = load_dataset("medmnist", str(tmp_path / "ramp.npz"))
    ref = np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR), dtype=np.int16)
    assert np.abs(d.x_train[0, 2:-2, 2:-2, 0].astype(np.int16) - ref[2:-2, 2:-2]).max() <= 1


@pytest.mark.skipif(not (SHARED / "breastmnist.npz").exists(), reason="shared breastmnist.npz absent")
def test_breastmnist_official_file():
    d = load_dataset("medmnist", str(SHARED / "breastmnist.npz"))
    assert (d.num_train, len(d.x_val), len(d.x_test)) == (546, 78, 156)
    assert d.num_classes == 2 and d.x_train.shape[1:] == (32, 32, 3)


def test_imagefolder_with_and_without_split(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            (tmp_path / "a" / split / c).mkdir(parents=True)
            (tmp_path / "b" / c).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.new("RGB", (40, 24), color).save(tmp_path / "a" / split / c / f"{i}.png")
                Image.new("RGB", (16, 16), color).save(tmp_path / "b" / c / f"{split}{i}.png")
    d = load_dataset("imagefolder", str(tmp_path / "a"))
    assert d.class_names == ("cat", "dog") and d.num_train == 6 and len(d.x_test) == 6
    assert (d.x_train[d.y_train == 0][..., 0] == 255).all() and (d.x_train[d.y_train == 1][..., 2] == 255).all()
    e = load_dataset("imagefolder", str(tmp_path / "b"))
    assert e.num_train + len(e.x_test) == 12 and e.x_train.shape[1:] == (32, 32, 3)


def test_imagefolder_skips_hidden_files_and_refuses_16_bit_pixels_it_would_clip(tmp_path):
    """macOS's AppleDouble ``._x.png`` files are not images of the class; a 16-bit scan was clipped
    at 255 by PIL's convert (a 0..4095 gradient came back as 5 grey levels) and is refused instead,
    while 16-bit files whose values fit 0..255 read exactly as their 8-bit twins."""
    from PIL import Image

    from dprandp.data.loaders import read_image_file

    for c, value in (("a", 40), ("b", 200)):
        (tmp_path / "f" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (32, 32), value).save(tmp_path / "f" / c / f"{i}.png")
        (tmp_path / "f" / c / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    d = load_dataset("imagefolder", str(tmp_path / "f"))
    assert d.num_train + len(d.x_test) == 6
    wide = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "f" / "a" / "3.png")
    assert Image.open(tmp_path / "f" / "a" / "3.png").mode == "I;16"
    with pytest.raises(InputError, match=r"3\.png has pixel values in \[0, 4095\]"):
        load_dataset("imagefolder", str(tmp_path / "f"))
    narrow = np.linspace(0, 255, 64 * 64).reshape(64, 64)
    Image.fromarray(narrow.astype(np.uint16)).save(tmp_path / "n16.png")
    Image.fromarray(narrow.astype(np.uint8)).save(tmp_path / "n8.png")
    assert np.array_equal(read_image_file(tmp_path / "n16.png"), read_image_file(tmp_path / "n8.png"))


def test_one_colour_image_without_a_batch_axis_is_refused_not_read_as_many(tmp_path):
    """(32, 32, 3) was read as 32 grayscale images 3 pixels wide."""
    from dprandp.pipeline.predict import read_images

    np.save(tmp_path / "one.npy", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(InputError, match=r"add the batch axis, shape \(1, 32, 32, 3\)"):
        read_images(str(tmp_path / "one.npy"))
    np.save(tmp_path / "grey.npy", np.zeros((5, 28, 28), np.uint8))  # N grayscale images still read
    assert read_images(str(tmp_path / "grey.npy"))[1].shape == (5, 32, 32, 3)


def test_to_float_uses_fixed_constants():
    x = np.full((1, 32, 32, 3), 255, dtype=np.uint8)
    out = to_float(x)
    assert out.shape == (1, 3, 32, 32)
    assert out[0, 0, 0, 0].item() == pytest.approx((1 - 0.4409) / 0.2683, rel=1e-6)


def _bad(tmp_path, **changes):
    arrays = cifar_like()
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    return write_npz(tmp_path / "bad.npz", **arrays)


@pytest.mark.parametrize("changes,message", [
    (dict(x_train=None), "lacks key"),
    (dict(x_train=np.zeros((20, 5), np.uint8)), "shape"),
    (dict(x_test=np.zeros((0, 32, 32, 3), np.uint8), y_test=np.zeros(0, np.int64)), "empty"),
    (dict(x_train=np.full((20, 32, 32, 3), np.nan, np.float32)), "NaN"),
    (dict(y_train=np.full(20, -1)), "labels must"),
    (dict(y_train=np.zeros(20, np.int64)), "at least 2 classes"),
    (dict(y_train=np.zeros(19, np.int64)), "19 labels for 20 images"),
    (dict(y_train=np.zeros((20, 3), np.int64)), "multi-label"),
])
def test_bad_arrays_are_refused(tmp_path, changes, message):
    with pytest.raises(InputError, match=message):
        load_dataset("npz", _bad(tmp_path, **changes))


def test_cifar_labels_beyond_ten_are_refused(tmp_path):
    arrays = cifar_like(classes=3)
    arrays["y_train"] = arrays["y_train"] + 8  # 8, 9, 10
    with pytest.raises(InputError, match=r"0\.\.9"):
        load_dataset("cifar10", write_npz(tmp_path / "c.npz", **arrays))


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(InputError, match="is not a .npz file"):
        load_dataset("npz", str(tmp_path / "junk.npz"))
    good = write_npz(tmp_path / "good.npz", **cifar_like())
    data = Path(good).read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        load_dataset("npz", str(tmp_path / "trunc.npz"))
    with pytest.raises(InputError, match="not found"):
        load_dataset("npz", str(tmp_path / "missing.npz"))
    with pytest.raises(InputError, match="unknown dataset"):
        load_dataset("imagenet", None)


def test_the_class_count_is_never_inferred_from_the_private_training_labels(tmp_path):
    """Class 3 held by training records only: inferring 4 classes from them would put that class in
    the released model's head. Undeclared, it is refused with a hint; declared, it loads."""
    arrays = cifar_like(n_train=20, n_test=8, classes=3)
    arrays["y_train"][5] = 3
    with pytest.raises(InputError, match=r"train labels must lie in 0\.\.2, found 3 \(the 3 classes were inferred "
                                         r"from the test labels"):
        load_dataset("npz", write_npz(tmp_path / "a.npz", **arrays))
    d = load_dataset("npz", write_npz(tmp_path / "b.npz", **arrays, class_names=np.array(["a", "b", "c", "d"])))
    assert d.num_classes == 4
    arrays["y_train"][5] = 0  # the test split's classes decide, whatever the training labels hold
    arrays["y_train"][arrays["y_train"] == 2] = 0
    assert load_dataset("npz", write_npz(tmp_path / "c.npz", **arrays)).num_classes == 3
