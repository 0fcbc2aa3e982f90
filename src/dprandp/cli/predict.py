"""``dprandp predict``: class predictions of a trained model (RUN_DIR/model.pt) on new images, as CSV."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from dprandp.cli.options import emit_json


@click.command("predict")
@click.option("--model", "model_path", type=str, required=True, help="model file (RUN_DIR/model.pt) or a run directory")
@click.option("--images", type=str, required=True,
              help="a folder of image files (searched recursively), one image file, a .npy or an .npz array of images")
@click.option("--key", type=str, default=None, help="the array of an .npz that holds the images (default: its only "
              "array, or images / x_test / x / test_images)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV file to write (default: print the CSV)")
@click.option("--overwrite", is_flag=True, help="replace an existing --out")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="test-time augmentation: flip averages the logits of each image and its mirror image")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if available), cpu, cuda or cuda:N")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object (with --out: a summary; else every row)")
def command(model_path: str, images: str, key: str | None, out: Path | None, overwrite: bool, tta: str, device: str,
            as_json: bool) -> None:
    """One CSV row per image: the predicted class, its probability and every class's probability.

    Predicting is post-processing of the DP model: it costs the private training data no privacy
    beyond the run's (ε, δ). The images you predict on are not protected by anything here."""
    from dprandp.errors import check_not_an_input, check_writable, require
    from dprandp.pipeline.finish import load_model, require_flip_tta_allowed, require_model_file
    from dprandp.pipeline.predict import predict, read_images
    from dprandp.pipeline.rundir import atomic_write_bytes
    from dprandp.pipeline.trainer import resolve_device

    path = Path(model_path)
    if path.is_dir():
        path = path / "model.pt"
    if out is not None:
        check_not_an_input(out, {"--model": path, "--images": images})
        require(not (Path(images).is_dir() and Path(out).resolve().is_relative_to(Path(images).resolve())),
                f"--out {out} lies inside the --images folder {images}; write the predictions elsewhere")
        check_writable(out, "output", overwrite)  # before any work, so a refusal costs nothing
    resolve_device(device)
    require_model_file(path)  # before reading what may be many images
    if tta == "flip":  # and so is flip TTA on a model trained without mirrored views
        require_flip_tta_allowed(load_model(path, device="cpu")[1], True)
    names, x = read_images(images, key=key)
    pred = predict(path, x, names=names, flip_tta=tta == "flip", device=device)
    counts = Counter(pred.class_names[i] for i in pred.labels)
    summary = {"num_images": len(names), "model": str(path), "images": images, "flip_tta": pred.flip_tta,
               "counts": {c: counts.get(c, 0) for c in pred.class_names}}
    if out is not None:
        atomic_write_bytes(out, pred.to_csv().encode())
        summary["out"] = str(out)
        if as_json:
            emit_json(summary)
        else:
            shares = ", ".join(f"{c} {n}" for c, n in summary["counts"].items())
            click.echo(f"wrote {out}: {len(names)} predictions ({shares})")
    elif as_json:
        rows = [{"image": n, "prediction": pred.class_names[i], "probabilities": [round(float(p), 6) for p in row]}
                for n, i, row in zip(pred.names, pred.labels, pred.probabilities, strict=True)]
        emit_json({**summary, "class_names": list(pred.class_names), "predictions": rows})
    else:
        click.echo(pred.to_csv(), nl=False)
