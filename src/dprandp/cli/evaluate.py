"""``dprandp evaluate``: accuracy, balanced accuracy and ROC-AUC of a trained model (RUN_DIR/model.pt) on a dataset split."""

from __future__ import annotations

from pathlib import Path

import click

from dprandp.cli.options import emit_json
from dprandp.data import DATASETS


@click.command("evaluate")
@click.option("--model", "model_path", type=str, required=True, help="model file (RUN_DIR/model.pt) or a run directory")
@click.option("--dataset", type=click.Choice(list(DATASETS)), required=True, help="dataset to score on")
@click.option("--data", type=str, default=None, help="dataset path (as for `dprandp train`)")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="test-time augmentation: flip averages the logits of each image and its mirror image")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if available), cpu, cuda or cuda:N")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def command(model_path: str, dataset: str, data: str | None, split: str, tta: str, device: str, as_json: bool) -> None:
    """Top-1 accuracy, balanced accuracy and ROC-AUC of a saved model (no privacy cost on public test data; on private data,
    releasing the number itself is not covered by the training guarantee)."""
    from dprandp.data import load_dataset
    from dprandp.pipeline import evaluate
    from dprandp.pipeline.finish import load_model, require_flip_tta_allowed, require_model_file
    from dprandp.pipeline.trainer import resolve_device

    path = Path(model_path)
    if path.is_dir():
        path = path / "model.pt"
    resolve_device(device)  # a bad --device is refused before the dataset is read
    require_model_file(path)  # and so is a missing model
    if tta == "flip":  # and flip TTA on a model trained without mirrored views
        require_flip_tta_allowed(load_model(path, device="cpu")[1], True)
    ds = load_dataset(dataset, data)
    out = evaluate(path, ds, split=split, flip_tta=tta == "flip", device=device)
    if split != "test":  # the training images are the private ones; the validation split was carved from them
        click.echo(f"dprandp: note: accuracy on the {split} split is computed from private training images without "
                   "noise; it is not covered by the model's (epsilon, delta): keep it to yourself", err=True)
    if as_json:
        emit_json(out)
    else:
        auc = "" if out["auc"] is None else f", ROC-AUC {out['auc']:.4f}"
        click.echo(f"accuracy {100 * out['accuracy']:.2f} % (balanced {100 * out['balanced_accuracy']:.2f} %{auc}) on "
                   f"{out['dataset']} {split} (n = {out['num_examples']}"
                   f"{', flip test-time augmentation' if out['flip_tta'] else ''})")
