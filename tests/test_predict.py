"""`dprandp predict` / ``dprandp.pipeline.predict``: probabilities against a per-image reference, agreement
with ``evaluate``, the image readers, and the CSV the command writes."""

import csv
import io
import json

import numpy as np
import pytest
import torch
from pipeline_helpers import tiny_npz

from dprandp.cli.main import main
from dprandp.data import load_dataset, to_float
from dprandp.data.base import to_uint8_nhwc
from dprandp.models import create_model
from dprandp.pipeline import evaluate, predict, read_images
from dprandp.pipeline.finish import save_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 4-class model file (random weights: predictions are defined whatever the weights) and its data."""
    d = tmp_path_factory.mktemp("predict")
    data = load_dataset("npz", tiny_npz(d / "tiny.npz"))
    data = type(data)(**{**data.__dict__, "class_names": ("cat", "dog", "eel", "fox")})
    model = create_model("wrn-10-1", num_classes=4, seed=3, head_pool=2)
    save_model(d / "model.pt", model, model_name="wrn-10-1", data=data, extra={"epsilon": 1.0, "delta": 1e-5})
    return d, data, model.eval()


def _reference(model, images, flip):
    """Softmax of each image alone (batch of one), in float64; with flip, of the mean of its two logits."""
    rows = []
    with torch.no_grad():
        for img in images:
            x = to_float(img[None])
            logits = model(x).double()
            if flip:
                logits = (logits + model(torch.flip(x, dims=[3])).double()) / 2
            rows.append(torch.softmax(logits, dim=1)[0])
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("flip", [False, True])
def test_probabilities_are_the_softmax_of_each_image_alone(saved, flip):
    d, data, model = saved
    pred = predict(d / "model.pt", data.x_test, flip_tta=flip, batch_size=7)
    assert pred.probabilities.shape == (len(data.x_test), 4) and pred.probabilities.dtype == np.float32
    np.testing.assert_allclose(pred.probabilities, _reference(model, data.x_test, flip), atol=1e-5)
    np.testing.assert_allclose(pred.probabilities.sum(1), 1.0, atol=1e-6)
    assert pred.class_names == ("cat", "dog", "eel", "fox") and pred.names[:2] == ("0", "1")


@pytest.mark.parametrize("flip", [False, True])
def test_predictions_score_what_evaluate_reports(saved, flip):
    d, data, _ = saved
    labels = predict(d / "model.pt", data.x_test, flip_tta=flip).labels
    assert float((labels == data.y_test).mean()) == evaluate(d / "model.pt", data, flip_tta=flip)["accuracy"]


def test_a_folder_is_read_recursively_sorted_and_exactly(tmp_path, saved):
    from PIL import Image

    _, data, _ = saved
    for i, rel in enumerate(["b/2.png", "a/1.png", "a/sub/0.png", ".hidden/9.png"]):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.x_test[i]).save(tmp_path / rel)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    names, x = read_images(tmp_path)
    assert names == ("a/1.png", "a/sub/0.png", "b/2.png")  # hidden folders and other files skipped
    np.testing.assert_array_equal(x, data.x_test[[1, 2, 0]])  # PNG is lossless at 32 px: no resize
    big = tmp_path / "big.png"
    Image.fromarray(np.kron(data.x_test[5], np.ones((2, 2, 1), np.uint8))).save(big)
    names, one = read_images(big)
    with Image.open(big) as im:  # the imagefolder loader's preparation: PIL's bilinear resize to 32 px
        want = np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR))
    assert names == ("big.png",) and one.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(one[0], want)


def test_arrays_are_prepared_as_training_images_are(tmp_path, saved):
    _, data, _ = saved
    grey = np.random.default_rng(0).random((5, 28, 28))
    np.save(tmp_path / "grey.npy", grey)
    names, x = read_images(tmp_path / "grey.npy")
    assert names == tuple("01234")
    np.testing.assert_array_equal(x, to_uint8_nhwc(grey, split="test", source="x"))
    np.savez(tmp_path / "several.npz", x_train=data.x_train, x_test=data.x_test, y_test=data.y_test)
    np.testing.assert_array_equal(read_images(tmp_path / "several.npz")[1], data.x_test)  # x_test by name
    np.testing.assert_array_equal(read_images(tmp_path / "several.npz", key="x_train")[1], data.x_train)
    np.savez(tmp_path / "one.npz", whatever=data.x_train[:3])
    assert read_images(tmp_path / "one.npz")[1].shape == (3, 32, 32, 3)  # its only array


def _rows(text):
    return list(csv.reader(io.StringIO(text)))


def test_the_command_writes_a_csv_and_never_replaces_a_file_unasked(tmp_path, saved, capsys):
    d, data, _ = saved
    np.save(tmp_path / "imgs.npy", data.x_test)
    out = tmp_path / "pred.csv"
    main(["predict", "--model", str(d), "--images", str(tmp_path / "imgs.npy"), "--out", str(out), "--tta", "flip"])
    assert capsys.readouterr().out.startswith(f"wrote {out}: {len(data.x_test)} predictions (cat ")
    rows = _rows(out.read_text())
    assert rows[0] == ["image", "prediction", "confidence", "p_cat", "p_dog", "p_eel", "p_fox"]
    want = predict(d / "model.pt", data.x_test, flip_tta=True)
    assert [r[0] for r in rows[1:]] == list(want.names)
    assert [r[1] for r in rows[1:]] == [want.class_names[i] for i in want.labels]
    np.testing.assert_allclose(np.array([r[3:] for r in rows[1:]], float), want.probabilities, atol=1e-6)
    assert all(float(r[2]) == max(map(float, r[3:])) for r in rows[1:])

    before = out.read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--model", str(d), "--images", str(tmp_path / "imgs.npy"), "--out", str(out)])
    assert exc.value.code == 2 and "already exists" in capsys.readouterr().err and out.read_bytes() == before
    main(["predict", "--model", str(d), "--images", str(tmp_path / "imgs.npy"), "--out", str(out), "--overwrite"])
    assert _rows(out.read_text())[1][3:] != rows[1][3:]  # replaced: without flip the probabilities differ


def test_the_command_prints_csv_or_json_without_out(tmp_path, saved, capsys):
    d, data, _ = saved
    np.save(tmp_path / "imgs.npy", data.x_test[:3])
    main(["predict", "--model", str(d / "model.pt"), "--images", str(tmp_path / "imgs.npy")])
    assert len(_rows(capsys.readouterr().out)) == 4
    main(["predict", "--model", str(d / "model.pt"), "--images", str(tmp_path / "imgs.npy"), "--json"])
    obj = json.loads(capsys.readouterr().out)
    assert obj["num_images"] == 3 and sum(obj["counts"].values()) == 3 and len(obj["predictions"]) == 3
    assert obj["predictions"][0]["prediction"] in obj["class_names"]


def test_device_is_chosen_and_checked_before_the_model_is_read(saved, tmp_path):
    from dprandp.errors import InputError
    from dprandp.pipeline.finish import load_model

    d, data, _ = saved
    model, _ = load_model(d / "model.pt", device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    pred = predict(d / "model.pt", data.x_test, device="auto")  # auto: CUDA when there, same numbers either way
    np.testing.assert_allclose(pred.probabilities, predict(d / "model.pt", data.x_test, device="cpu").probabilities,
                               atol=2e-3)
    with pytest.raises(InputError, match="--device must be"):
        load_model(tmp_path / "not-there.pt", device="gpu")  # the device is refused first, not the missing file

