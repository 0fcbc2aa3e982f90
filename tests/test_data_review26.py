"""Dataset loaders after review 26: class names never taken from private training folders, class folders
without images, huge / float / rotated image files, stray labels, class-name hygiene, layout messages."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dprandp.data import load_dataset
from dprandp.data.loaders import read_image_file
from dprandp.errors import InputError


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def cifar_like(n_train=20, n_test=8, classes=3):
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), "y_train": np.arange(n_train) % classes,
            "x_test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), "y_test": np.arange(n_test) % classes}


def class_folder(folder: Path, value: int, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("L", (32, 32), value).save(folder / f"{i}.png")


# ------------------------------------------------------------------------- 1: class names from public test/
def test_imagefolder_class_names_come_from_test_never_from_the_private_train_folders(tmp_path):
    """A train/ class folder with one image (a rare patient's condition) was a class of the released model:
    its name in class_names and a row of the head. Class names now come from test/; that folder is refused."""
    root = tmp_path / "r"
    for split in ("train", "test"):
        class_folder(root / split / "benign", 40)
        class_folder(root / split / "malignant", 200)
    class_folder(root / "train" / "patient_0421_rare_syndrome", 120, n=1)
    with pytest.raises(InputError, match=r"train/patient_0421_rare_syndrome have no counterpart under test/: class "
                                         r"names are taken from test/ only.*unprotected by epsilon"):
        load_dataset("imagefolder", str(root))
    for f in (root / "train" / "patient_0421_rare_syndrome").iterdir():
        f.unlink()
    (root / "train" / "patient_0421_rare_syndrome").rmdir()
    class_folder(root / "test" / "normal", 90)  # a public class with no training image is fine (npz rule too)
    d = load_dataset("imagefolder", str(root))
    assert d.class_names == ("benign", "malignant", "normal") and d.num_classes == 3
    assert d.num_train == 6 and len(d.x_test) == 9
    for label, value in enumerate((40, 200, 90)):  # labels index the test/ class list in both splits
        assert (d.x_test[d.y_test == label] == value).all()
        assert (d.x_train[d.y_train == label] == value).all()


# -------------------------------------------------------------------- 3: no class without an image
def test_imagefolder_skips_macosx_and_refuses_a_class_folder_without_images(tmp_path):
    root = tmp_path / "r"
    class_folder(root / "bird", 40)
    class_folder(root / "cat", 200)
    (root / "__MACOSX" / "cat").mkdir(parents=True)  # what macOS's zip adds: resource forks only
    (root / "__MACOSX" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    d = load_dataset("imagefolder", str(root))
    assert d.class_names == ("bird", "cat")
    (root / "dog").mkdir()
    for i in range(2):
        (root / "dog" / f"IMG_{i}.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (root / "dog" / "sub").mkdir()
    with pytest.raises(InputError, match=r"class folder .*dog holds no image file \(skipped: 2 \.HEIC files, "
                                         r"1 subfolder\)"):
        load_dataset("imagefolder", str(root))


# ------------------------------------------------------------------------------- 5: decompression bomb
def test_too_large_image_is_one_line_in_train_and_predict(tmp_path, monkeypatch):
    """PIL's DecompressionBombError (an image over 2 * MAX_IMAGE_PIXELS) was a raw traceback."""
    from PIL import Image as PILImage

    from dprandp.pipeline.predict import read_images

    class_folder(tmp_path / "r" / "a", 40)
    class_folder(tmp_path / "r" / "b", 200)
    PILImage.new("1", (80, 80)).save(tmp_path / "r" / "a" / "huge.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 3000)  # 80 x 80 = 6400 > 2 * 3000: the same error, cheaply
    with pytest.raises(InputError, match=r"cannot read image .*huge\.png: too large \(Image size \(6400 pixels\)"):
        load_dataset("imagefolder", str(tmp_path / "r"))
    with pytest.raises(InputError, match=r"huge\.png: too large"):
        read_images(tmp_path / "r" / "a" / "huge.png")


# ------------------------------------------------------------------------------------ 6: float images
def test_float_image_file_reads_as_the_same_float_array_does(tmp_path):
    """A float TIFF in [0, 1] was read on a 0..255 scale (nearly black) while the same array in an .npz
    was scaled by 255; both now follow one rule, out-of-range floats refused the same way."""
    ramp = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(ramp, mode="F").save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    from_file = read_image_file(tmp_path / "f.tif")
    arrays = {"x_train": np.stack([ramp, 1 - ramp]), "y_train": np.array([0, 1]), "x_test": np.stack([ramp, ramp]),
              "y_test": np.array([0, 1])}
    from_npz = load_dataset("npz", write_npz(tmp_path / "f.npz", **arrays)).x_train[0]
    np.testing.assert_array_equal(from_file, from_npz)
    assert from_file.max() == 255
    Image.fromarray(ramp * 255, mode="F").save(tmp_path / "f255.tif")
    with pytest.raises(InputError, match=r"image .*f255\.tif: float pixels must lie in \[0, 1\]"):
        read_image_file(tmp_path / "f255.tif")


# ------------------------------------------------------------------------------ 7: stray and huge labels
@pytest.mark.parametrize("stray", [255, 100_000])
def test_a_stray_test_label_does_not_set_the_class_count(tmp_path, stray):
    """Inferred classes: test labels 0, 1, 2 and one 255 made a 256-class head (10**9: out of memory; the
    test uses 100_000 so that a regression fails, not exhausts memory)."""
    arrays = cifar_like()
    arrays["y_test"] = arrays["y_test"].copy()
    arrays["y_test"][-1] = stray
    with pytest.raises(InputError, match=rf"the test labels reach {stray} but hold only 4 distinct values.*"
                                         r"declare the classes \(class_names\)"):
        load_dataset("npz", write_npz(tmp_path / "a.npz", **arrays))


@pytest.mark.parametrize("split,label", [("test", 1e30), ("train", np.iinfo(np.uint64).max)])
def test_labels_beyond_int64_are_refused_before_the_cast(tmp_path, split, label):
    """1e30 became int64's minimum (with a cast warning) and uint64's maximum became -1."""
    arrays = cifar_like()
    y = arrays[f"y_{split}"].astype(np.asarray(label).dtype)
    y[-1] = label
    arrays[f"y_{split}"] = y
    with pytest.raises(InputError, match=rf"{split} labels must be class indices, found {re.escape(str(label))}"):
        load_dataset("npz", write_npz(tmp_path / "a.npz", **arrays))


# ---------------------------------------------------------------------------------- 8: class names
def test_class_names_bytes_are_decoded_and_duplicates_or_empty_names_refused(tmp_path):
    arrays = cifar_like(classes=2)
    d = load_dataset("npz", write_npz(tmp_path / "a.npz", **arrays, class_names=np.array([b"cat", b"dog"])))
    assert d.class_names == ("cat", "dog")  # was ("b'cat'", "b'dog'")
    with pytest.raises(InputError, match=r"class name 'cat' appears more than once"):
        load_dataset("npz", write_npz(tmp_path / "b.npz", **arrays, class_names=np.array(["cat", "cat"])))
    with pytest.raises(InputError, match=r"class name 1 \(counting from 0\) is empty"):
        load_dataset("npz", write_npz(tmp_path / "c.npz", **arrays, class_names=np.array(["cat", " "])))


# ------------------------------------------------------------------------------------ smaller ones
def test_incomplete_train_test_layouts_explain_the_layouts(tmp_path):
    for split in ("train", "val"):
        class_folder(tmp_path / "tv" / split / "cat", 40)
        class_folder(tmp_path / "tv" / split / "dog", 200)
    with pytest.raises(InputError, match=r"train/ and val/ hold class folders but there is no test/; the layouts "
                                         r"are ROOT/train/<class>/ \+ ROOT/test/<class>/"):
        load_dataset("imagefolder", str(tmp_path / "tv"))
    class_folder(tmp_path / "t" / "train" / "cat", 40)
    class_folder(tmp_path / "t" / "train" / "dog", 200)
    with pytest.raises(InputError, match=r"train/ holds class folders but there is no test/; the layouts"):
        load_dataset("imagefolder", str(tmp_path / "t"))
    (tmp_path / "t" / "test").mkdir()
    with pytest.raises(InputError, match=r"test/ holds no class folder; the layouts"):
        load_dataset("imagefolder", str(tmp_path / "t"))
    for c in ("cat", "dog"):
        (tmp_path / "t" / "train" / c).rename(tmp_path / "t" / "test" / c)
    with pytest.raises(InputError, match=r"train/ holds no class folder; the layouts"):
        load_dataset("imagefolder", str(tmp_path / "t"))
    class_folder(tmp_path / "v" / "train", 40)  # a class that is called "train" (CIFAR-100 has one) still reads
    class_folder(tmp_path / "v" / "bus", 200)
    assert load_dataset("imagefolder", str(tmp_path / "v")).class_names == ("bus", "train")


def test_npz_suffix_is_case_insensitive(tmp_path):
    arrays = cifar_like(classes=3)
    with open(tmp_path / "CIFAR10.NPZ", "wb") as f:  # np.savez would append ".npz" to the name
        np.savez(f, **arrays)
    d = load_dataset("cifar10", str(tmp_path / "CIFAR10.NPZ"))
    assert d.num_classes == 10 and d.num_train == 20


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored upside down with EXIF orientation 3 was read upside down."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[:16] = 255  # white top half, as the photo is shown
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 to display
    Image.fromarray(img[::-1, ::-1].copy()).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    x = read_image_file(tmp_path / "photo.jpg").astype(int)
    assert x[:12].mean() > 240 and x[-12:].mean() < 15


def test_an_empty_test_class_folder_declares_a_public_class_that_has_training_images(tmp_path):
    """Found in review of this session's rule: with test/ as the only source of class names, a rare class
    with training images but no test image had no way in (an empty test/c was refused as empty, and
    without it train/c was refused). An empty test/<class>/ is now that declaration."""
    root = tmp_path / "rare"
    for split, n in (("train", 4), ("test", 2)):
        class_folder(root / split / "a", 10, n)
        class_folder(root / split / "b", 200, n)
    class_folder(root / "train" / "c", 120, 3)
    with pytest.raises(InputError, match="declare it with an empty folder test/<class>/"):
        load_dataset("imagefolder", str(root))
    (root / "test" / "c").mkdir()
    data = load_dataset("imagefolder", str(root))
    assert data.class_names == ("a", "b", "c") and sorted(set(data.y_train.tolist())) == [0, 1, 2]
    assert 2 not in data.y_test.tolist()
    (root / "test" / "d").mkdir()  # declared, but no image anywhere
    with pytest.raises(InputError, match="test/d is empty and train/ has no image of that class"):
        load_dataset("imagefolder", str(root))
    (root / "test" / "d").rmdir()
    (root / "test" / "c" / "notes.txt").write_text("x")  # not empty: still the old refusal, naming what it holds
    with pytest.raises(InputError, match="holds no image file"):
        load_dataset("imagefolder", str(root))


def test_a_class_folder_name_that_is_not_utf8_is_refused(tmp_path):
    import os

    root = tmp_path / "surr"
    class_folder(root / "b", 10, 4)
    bad = os.fsencode(str(root)) + b"/a\xff"
    os.mkdir(bad)
    class_folder(Path(os.fsdecode(bad)), 200, 4)
    with pytest.raises(InputError, match="not valid UTF-8"):
        load_dataset("imagefolder", str(root))
