"""End of a run: the final model file, ``summary.json`` and the report; and ``evaluate``.

The reported model is the *final* EMA model (never the best over steps, which would select on
the test set). Its epsilon is recomputed from the ledger, so the summary states what was spent,
including steps a crash lost, not what was planned.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np
import torch

from dprandp.data import NORMALIZE_MEAN, NORMALIZE_STD, ImageData, with_validation
from dprandp.errors import InputError, require
from dprandp.pipeline.metrics import METRICS, classification_metrics
from dprandp.pipeline.rundir import (
    MetricsLog,
    atomic_torch_save,
    atomic_write_json,
    code_version,
)

MODEL_FORMAT = "dprandp-model/1"


def save_model(path: Path, model, *, model_name: str, data: ImageData, extra: dict) -> None:
    """A self-describing classifier file: weights + everything needed to rebuild and run it."""
    atomic_torch_save(path, {
        "format": MODEL_FORMAT,
        "model": model_name,
        "wrn_config": model.config.to_dict(),
        "num_classes": data.num_classes,
        "class_names": list(data.class_names),
        "normalize": {"mean": list(NORMALIZE_MEAN), "std": list(NORMALIZE_STD)},
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        **({} if data.val_split is None else {"val_split": dict(data.val_split)}),
        **extra,
    })


def require_model_file(path: Path) -> None:
    """Refuse a missing model file in one line; in a run directory that has not finished, say so."""
    if path.is_file():
        return
    if (path.parent / "checkpoint.pt").is_file() and not (path.parent / "summary.json").exists():
        raise InputError(f"the run {path.parent} has not finished (no {path.name} yet); continue it with "
                         f"`dprandp train --resume {path.parent}`")
    raise InputError(f"model file not found: {path}")


def load_model(path: str | Path, *, device: str = "auto"):
    """(model in eval mode on ``device``, metadata) from a ``model.pt`` written by :func:`save_model`;
    ``device`` is ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    from dprandp.models import create_model
    from dprandp.pipeline.trainer import resolve_device

    target = resolve_device(device)  # before reading the file: a bad device costs nothing

    p = Path(path)
    require_model_file(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"model file {p} is unreadable ({type(exc).__name__})") from None
    require(isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT,
            f"{p} is not a dprandp model file (a prior or a training checkpoint? use RUN_DIR/model.pt)")
    _check_model_fields(obj, p)
    bad = [k for k, v in obj["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    require(not bad, f"model file {p} holds non-finite weights ({', '.join(bad[:2])}): its training diverged")
    wrn = dict(obj["wrn_config"])
    wrn.pop("num_classes", None)
    model = create_model(obj["model"], num_classes=int(obj["num_classes"]), head_pool=int(wrn.get("head_pool", 1)))
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as exc:
        raise InputError(f"model file {p} does not match architecture {obj['model']}: {str(exc).splitlines()[0]}") from None
    model.to(target).eval()
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return model, meta


def _check_model_fields(obj: dict, path: Path) -> None:
    """Refuse in one line a model file whose metadata this module cannot use (written by hand, or
    by another tool): readers index these fields directly. ``class_names`` may be absent (readers
    then number the classes)."""
    def check(cond, problem):
        require(cond, f"model file {path} is malformed: {problem}")

    check(isinstance(obj.get("model"), str), "no architecture name ('model')")
    check(isinstance(obj.get("wrn_config"), dict), "no architecture config ('wrn_config')")
    head_pool = obj["wrn_config"].get("head_pool", 1)
    check(isinstance(head_pool, int) and not isinstance(head_pool, bool) and head_pool >= 1,
          f"wrn_config.head_pool must be an integer >= 1, got {head_pool!r}")
    n = obj.get("num_classes")
    check(isinstance(n, int) and not isinstance(n, bool) and n >= 1, f"num_classes must be an integer >= 1, got {n!r}")
    state = obj.get("state_dict")
    check(isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()),
          "its weights ('state_dict') are not a mapping of names to tensors")
    names = obj.get("class_names")
    check(names is None or (isinstance(names, (list, tuple)) and len(names) == n
                            and all(isinstance(c, str) for c in names)),
          f"class_names must be a list of {n} strings (one per class)")
    check(obj.get("train_config") is None or isinstance(obj["train_config"], dict), "train_config is not a mapping")
    split = obj.get("val_split")
    check(split is None or (isinstance(split, dict) and isinstance(split.get("fraction"), (int, float))
                            and isinstance(split.get("seed"), int)), "val_split is not {fraction, seed}")


def require_flip_tta_allowed(meta: dict, flip_tta: bool) -> None:
    """Refuse flip TTA for a model trained on unmirrored views (``--no-flip``: digits, text, X-rays
    with laterality): a mirror image is then an image of another kind, which the training run itself
    never scores. Model files without the setting trained with the default (mirrored views)."""
    trained_flip = (meta.get("train_config") or {}).get("flip", True)
    require(not flip_tta or trained_flip is not False,
            "the model was trained without mirrored views (--no-flip), so flip test-time augmentation would feed "
            "it images of another kind; drop --tta flip")


def evaluate(model_path: str | Path, data: ImageData, *, split: str = "test", batch_size: int = 1024,
             flip_tta: bool = False, device: str = "auto") -> dict:
    """Accuracy, balanced accuracy and ROC-AUC (dprandp.pipeline.metrics) of a saved model on
    ``data``'s ``split`` (``test``, ``val`` or ``train``); ``flip_tta`` averages the logits of each
    image and its mirror image; ``device`` as for :func:`load_model`."""
    from dprandp.pipeline.trainer import image_logits

    model, meta = load_model(model_path, device=device)
    require_flip_tta_allowed(meta, flip_tta)
    require(meta["num_classes"] == data.num_classes,
            f"the model has {meta['num_classes']} classes but dataset {data.name} has {data.num_classes}")
    trained = tuple(meta.get("class_names") or ())
    numbered = tuple(str(i) for i in range(data.num_classes))  # names a loader falls back to (no metadata)
    require(trained in ((), numbered) or data.class_names == numbered or trained == tuple(data.class_names),
            f"the model's classes {list(trained)[:4]} are not the dataset's {list(data.class_names)[:4]}: "
            "its labels would be scored against other classes")
    require(split in ("test", "val", "train"), f"unknown split {split!r}")
    data = with_training_split(data, meta)
    x, y = {"test": (data.x_test, data.y_test), "val": (data.x_val, data.y_val),
            "train": (data.x_train, data.y_train)}[split]
    require(x is not None, f"dataset {data.name} has no {split} split, and the model was trained without "
                           "--val-fraction")
    plain, flip = image_logits(model, x, batch_size, with_flip=flip_tta)
    scores = classification_metrics(flip if flip_tta else plain, y, data.num_classes)
    return {**scores, "split": split, "flip_tta": flip_tta, "num_examples": int(len(x)), "dataset": data.name,
            "model": str(model_path), "architecture": meta["model"],
            "epsilon": meta.get("epsilon"), "delta": meta.get("delta")}


def with_training_split(data: ImageData, meta: dict) -> ImageData:
    """``data`` split as the model's training run split it: a validation split carved from train
    is carved again (same fraction and seed), so ``val`` is the run's held-out split and ``train``
    what it trained on. Model files from before the split was recorded name it in their config."""
    if data.x_val is not None or data.val_split is not None:
        return data
    split = meta.get("val_split")
    if split is None:
        config = meta.get("train_config") or {}
        split = {"fraction": config.get("val_fraction") or 0.0, "seed": config.get("seed", 0)}
    return with_validation(data, fraction=float(split["fraction"]), seed=int(split["seed"]))


def prior_provenance(prior: str | None) -> str | None:
    """One line on how the prior was made (process, images, epochs), from its file."""
    if prior is None:
        return None
    try:
        from dprandp.pretrain import load_prior

        _, meta = load_prior(prior)
    except Exception:
        return None
    p = meta.get("provenance", {})
    return (f"{meta.get('model')} pretrained on {p.get('num_images')} {p.get('process')} images "
            f"({p.get('image_size')} px), {p.get('epochs_done')} epochs, seed {p.get('seed')}")


def prior_sha256(prior: str | None) -> str | None:
    """SHA-256 of the prior file: what the run really loaded, even if the path is later reused."""
    if prior is None:
        return None
    import hashlib

    h = hashlib.sha256()
    with open(prior, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _prior_record(run_dir: Path, prior: str | None) -> dict:
    """The prior's hash and provenance as recorded when the run started (config.json), so that a
    prior file replaced during the run cannot be misreported; computed now for older runs."""
    derived = {}
    try:
        derived = json.loads((Path(run_dir) / "config.json").read_text()).get("derived", {})
    except (OSError, ValueError):
        pass
    if "prior_sha256" in derived:
        return {"prior_sha256": derived["prior_sha256"], "prior_provenance": derived.get("prior_provenance")}
    return {"prior_sha256": prior_sha256(prior), "prior_provenance": prior_provenance(prior)}


def prior_preview(prior: str | None, n: int = 32) -> np.ndarray | None:
    """A few of the prior's random-process images, re-rendered from its provenance (or None)."""
    if prior is None:
        return None
    try:
        from dprandp import processes
        from dprandp.pretrain import load_prior

        _, meta = load_prior(prior)
        prov = meta.get("provenance", {})
        # the images' seed (a store's, from `dprandp generate --seed`), not the training seed
        seed = prov["process_seed"] if "process_seed" in prov else prov.get("seed")
        name, size = prov.get("process"), prov.get("image_size", 64)
        if name is None or seed is None:
            return None
        return processes.get_process(name).render(np.arange(n), seed=int(seed), size=int(size))
    except Exception:  # the report is still useful without the picture
        return None


def _discarded_run(run_dir: Path) -> dict | None:
    """The budget of a run that ``--overwrite`` deleted from this directory (config.json), if any."""
    try:
        return json.loads((run_dir / "config.json").read_text())["derived"].get("discarded_run")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shareable_config(config) -> dict:
    """``config`` as the model file states it: without the paths of the private data and of the prior
    (absolute, they name the user's machine, folders and often the cohort; a resume reads them from
    config.json, which stays in the private run directory). ``prior_sha256`` identifies the prior."""
    return {**config.to_dict(), "data": None, "prior": None}


def finish_run(run_dir: Path, *, config, data: ImageData, plan, ledger, reported, final: dict,
               steps_applied: int, stopped: str | None, wall_time_s: float, log,
               search: dict | None = None) -> "TrainResult":
    from dprandp.pipeline.report import write_report
    from dprandp.pipeline.state import CHECKPOINT_NAME
    from dprandp.pipeline.trainer import TrainResult

    epsilon = ledger.epsilon()
    # The ledger counts every step that spent budget, a crash's lost steps twice over; the model
    # received steps 1..steps_applied, of which the first phase2_steps were Phase II.
    counted = {"II": 0, "III": 0}
    for r in ledger.records:
        counted[r.phase] = counted.get(r.phase, 0) + 1
    applied_ii = min(config.phase2_steps, steps_applied)
    notes = []
    if config.prior is None:
        notes.append("No prior: this is DP-SGD from scratch (the baseline). Every step trains every "
                     "parameter; there is no Phase II.")
    elif config.phase3_steps == 0:
        notes.append("Phase III skipped (--phase3-steps 0): DP linear probing of the prior's features only.")
    if stopped:
        notes.append(stopped)
    if ledger.steps > steps_applied:
        notes.append(f"The ledger counts {ledger.steps} DP steps but the model received {steps_applied} updates: "
                     f"{ledger.steps - steps_applied} step(s) were lost in a crash and are still counted.")
    if search is not None:
        notes.append("Keep this directory private: its exact validation score and its times are not covered by "
                     "the search's guarantee (the times tell how many runs there were). Release model.pt and "
                     "tuning.json from the search's directory instead.")
    discarded = _discarded_run(run_dir)
    if discarded is not None:
        eps = "an unknown ε" if discarded.get("epsilon") is None else f"ε = {discarded['epsilon']:.4g}"
        notes.append(f"--overwrite deleted an earlier run in this directory whose ledger held "
                     f"{discarded.get('steps') or 'an unknown number of'} DP steps ({eps}). If that run's results "
                     "were seen, the privacy spent on this data is both runs composed, not this run's ε alone.")
    if config.deterministic_noise:
        notes.append("--deterministic-noise: noise and batch sampling were seeded from --seed. Reproducible, but "
                     "anyone who knows the seed can subtract the noise: never release such a model.")
    summary = {
        **{f"{split}_{metric}{suffix}": final.get(f"{split}_{metric}{suffix}") for split in ("test", "val")
           for metric in METRICS for suffix in ("", "_flip")},
        "epsilon": epsilon, "delta": config.target_delta, "target_epsilon": config.target_epsilon,
        "planned_epsilon": plan.planned_epsilon, "accountant": config.accountant,
        "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
        "max_grad_norm": config.max_grad_norm, "batch_size": config.batch_size, "augmult": config.augmult,
        "steps": ledger.steps, "steps_applied": steps_applied, "planned_steps": config.steps,
        "phase2_steps_done": applied_ii, "phase3_steps_done": steps_applied - applied_ii,
        "phase2_steps_counted": counted.get("II", 0), "phase3_steps_counted": counted.get("III", 0),
        "num_train": data.num_train, "num_test": int(len(data.x_test)), "num_classes": data.num_classes,
        "dataset": data.name, "prior": config.prior, **_prior_record(run_dir, config.prior),
        "model": config.model, "reported_model": "final EMA model" if config.ema else "final model (no EMA)",
        "wall_time_s": wall_time_s, "code_version": code_version(),
        "deterministic_noise": config.deterministic_noise, "stopped_early": stopped, "discarded_run": discarded,
        "finished": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    if search is not None:
        summary["search_epsilon"] = search["epsilon"]
    require(epsilon <= config.target_epsilon + 1e-12, "internal error: the ledger exceeds the target epsilon")
    save_model(run_dir / "model.pt", reported, model_name=config.model, data=data,
               extra={"epsilon": epsilon, "delta": config.target_delta, "dataset": data.name,
                      # what the (epsilon, delta) claim rests on, checkable from the shared file alone
                      "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                      "steps": ledger.steps, "steps_applied": steps_applied,
                      "prior_sha256": summary["prior_sha256"], "train_config": shareable_config(config),
                      **({} if search is None else {"search_candidate": True})})
    ledger_phases = [{"sample_rate": p.sample_rate, "noise_multiplier": p.noise_multiplier, "steps": p.steps}
                     for p in ledger.phases()]
    write_report(run_dir, summary=summary, config=config.to_dict(), metrics=MetricsLog(run_dir).read(),
                 ledger_phases=ledger_phases, notes=notes, prior_images=prior_preview(config.prior))
    atomic_write_json(run_dir / "summary.json", summary)  # last: its presence means "complete"
    (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
    auc = summary["test_auc"]
    log(f"test accuracy {100 * summary['test_accuracy']:.2f} % (balanced {100 * summary['test_balanced_accuracy']:.2f} %"
        f"{'' if auc is None else f', ROC-AUC {auc:.3f}'}) at (epsilon = {epsilon:.3f}, delta = "
        f"{config.target_delta:g}); run directory {run_dir}")
    return TrainResult(run_dir=run_dir, summary=summary)
