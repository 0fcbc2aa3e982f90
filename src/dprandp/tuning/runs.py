"""``tune``: private random search over DP training runs, one (epsilon, delta) for the released model.

Every candidate is a full DP training run (Phases II + III) on the training split with the same
noise multiplier, sample rate and steps (so every run is the same DP mechanism; only settings that
leave it unchanged may vary, :data:`TUNABLE`). Its score is the number of correct predictions on
the validation split plus Gaussian noise. The noise multiplier is calibrated so that the whole
search, the best run released, meets the target (:func:`~dprandp.tuning.calibrate_tuning_noise`).

What may leave the output directory: ``model.pt`` (the best run's model, stating the search's
epsilon) and ``tuning.json`` (its hyperparameters, its noisy score, the accounting). The number of
runs, the other runs and their scores are never written: the bound does not cover them. The best
run's own directory is kept as ``private-run/`` for the operator: its exact validation score and
step times are not covered either. So are the console log and the wall time, which show how many
runs there were.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dprandp.accounting import DPPhase, compute_epsilon
from dprandp.errors import check_not_an_input, require
from dprandp.pipeline.config import TrainConfig
from dprandp.tuning.accounting import calibrate_tuning_noise
from dprandp.tuning.repetitions import Repetitions
from dprandp.tuning.search import noisy_count, private_search

#: Settings a search may vary: none of them changes the DP mechanism (q, sigma, steps, C-relative noise).
TUNABLE = ("lr_phase2", "lr_phase3", "momentum", "augmult", "max_grad_norm", "freeze_stages", "head_pool")
#: The default std of the noise on the count of correct validation predictions.
SCORE_NOISE = 20.0
MODEL_FILE = "model.pt"
RESULT_FILE = "tuning.json"
#: The selected run's own directory: diagnostics for the operator, not covered by the guarantee.
PRIVATE_DIR = "private-run"


def release_model(source: Path, target: Path, record: dict) -> None:
    """Write the selected model to ``target`` stating the search's epsilon (and no time or run count)."""
    import torch

    from dprandp.pipeline.rundir import atomic_torch_save

    obj = torch.load(source, map_location="cpu", weights_only=True)
    obj.pop("search", None)
    obj.pop("search_candidate", None)
    obj.update(epsilon=record["epsilon"], delta=record["target_delta"], epsilon_of_one_run_alone=record[
        "epsilon_of_one_run_alone"], search={k: v for k, v in record.items() if k != "released"},
        settings=record["released"]["settings"])
    atomic_torch_save(target, obj)


@dataclass(frozen=True, kw_only=True)
class TuningConfig:
    """The search: a grid of settings (name -> values), the distribution of the number of runs,
    and the score's noise std (in validation examples)."""

    grid: tuple[tuple[str, tuple], ...]
    repetitions: Repetitions
    score_noise: float = SCORE_NOISE

    def __post_init__(self) -> None:
        require(len(self.grid) > 0, "a search needs at least one --grid setting")
        for name, values in self.grid:
            require(name in TUNABLE, f"--grid {name}: only settings that leave the DP mechanism unchanged can be "
                                     f"searched ({', '.join(TUNABLE)})")
            require(len(values) > 0, f"--grid {name} has no values")
        names = [name for name, _ in self.grid]
        require(len(set(names)) == len(names), "each setting may appear in --grid once")
        require(math.isfinite(self.score_noise) and 0 < self.score_noise <= 1e9,
                f"the score noise must be a number in (0, 1e9], got {self.score_noise}")

    @classmethod
    def from_mapping(cls, grid: Mapping[str, Sequence], **kwargs) -> TuningConfig:
        return cls(grid=tuple((k, tuple(v)) for k, v in grid.items()), **kwargs)

    def candidates(self, base: TrainConfig) -> list[TrainConfig]:
        """Every combination of the grid's values on top of ``base`` (each one validated)."""
        names = [name for name, _ in self.grid]
        return [replace(base, **dict(zip(names, combo))) for combo in itertools.product(*(v for _, v in self.grid))]


def tune(base: TrainConfig, tuning: TuningConfig, *, out: str | Path, progress: bool | None = None, log=None,
         data=None, rng: np.random.Generator | None = None) -> dict:
    """Run the private search into the new directory ``out``; return what ``tuning.json`` holds.

    ``rng`` draws the number of runs, the candidates and the score noise; by default it is seeded
    from 128 bits of OS entropy and never recorded (a recorded seed would reveal the number of runs).
    """
    from dprandp.data import load_dataset
    from dprandp.models import create_model
    from dprandp.pipeline.rundir import atomic_write_json, check_run_dir
    from dprandp.pipeline.trainer import Plan, build_model, check_memory, resolve_device, sample_rate_for, train

    log = log or (lambda msg: None)
    out = Path(out)
    require(not out.exists(), f"output directory {out} already exists; choose another --out (nothing was written)")
    check_run_dir(out)  # its parent must be a directory
    # As train() checks for each run; refused here, since inside the search a refused run only counts as lost.
    check_not_an_input(out, {"--data": base.data, "--prior": base.prior}, deletes_tree=True,
                       trees=("--data",) if base.dataset == "imagefolder" else ())
    require(not base.deterministic_noise, "tuning needs fresh noise in every run; drop --deterministic-noise")
    require(int(os.environ.get("WORLD_SIZE", "1")) == 1,
            "dprandp tune runs in one process (each torchrun rank would draw its own runs); start it without torchrun")
    require(base.noise_multiplier is None, "tuning calibrates the noise itself; drop --noise-multiplier")
    candidates = tuning.candidates(base)
    model = create_model(base.model, num_classes=2, seed=0)
    for config in candidates:  # refuse now a setting every run of it would fail on (after spending budget)
        model.frozen_prefixes(config.freeze_stages)
    if data is None:
        data = load_dataset(base.dataset, base.data, val_fraction=base.val_fraction, val_seed=base.seed)
    require(data.x_val is not None and len(data.x_val) > 0,
            "tuning scores runs on a validation split: pass --val-fraction (e.g. 0.1)")
    # What every run would fail on (the device, the prior) is refused now, before any budget is spent:
    # inside the search a failed run only counts as one that lost.
    device = resolve_device(base.device)
    build_model(base, data.num_classes)
    for config in candidates:  # a chunk that cannot fit in memory (the grid may vary augmult or the batch)
        check_memory(config, data, device, log)
    shape = Plan(num_train=data.num_train, sample_rate=sample_rate_for(base, data.num_train), noise_multiplier=0.0,
                 planned_epsilon=0.0)
    phases = shape.phases(base)
    sigma, eps = calibrate_tuning_noise(target_epsilon=base.target_epsilon, target_delta=base.target_delta,
                                        phases=phases, score_noise=tuning.score_noise, repetitions=tuning.repetitions)
    # one run's own epsilon, computed exactly as `train` checks it (all steps as one phase), so it passes
    per_run = compute_epsilon([DPPhase(sample_rate=shape.sample_rate, noise_multiplier=sigma, steps=base.steps)],
                              target_delta=base.target_delta, accountant=base.accountant)
    log(f"tuning: {len(candidates)} candidates, {tuning.repetitions.mean:g} runs on average (shape "
        f"{tuning.repetitions.shape:g}); sigma = {sigma:.4f} for tuning epsilon {eps:.4f} (one run alone: {per_run:.4f})")
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    record = {
        "target_epsilon": base.target_epsilon, "target_delta": base.target_delta,
        "epsilon": eps, "accountant": "rdp (repeat and select; Papernot & Steinke 2022)",
        "noise_multiplier": sigma, "epsilon_of_one_run_alone": per_run,
        "repetitions": {"mean": tuning.repetitions.mean, "shape": tuning.repetitions.shape},
        "score": "correct validation predictions + N(0, score_noise^2)", "score_noise": tuning.score_noise,
        "num_val": len(data.y_val), "split_seed": base.seed, "grid": {k: list(v) for k, v in tuning.grid},
    }
    stamp = dict(record)  # what each candidate's own files state about the search
    out.mkdir(parents=True)

    def run(config: TrainConfig, index: int):
        # a fresh seed per run: runs must be independent (the split is fixed: `data` is loaded once)
        config = replace(config, noise_multiplier=sigma, target_epsilon=per_run, seed=secrets.randbits(31))
        run_dir = out / f".candidate-{secrets.token_hex(8)}"  # no index in the name: it would count the runs
        log(f"tuning: candidate run {index + 1} ({', '.join(f'{k} = {getattr(config, k)}' for k, _ in tuning.grid)})")
        try:
            result = train(config, out=run_dir, progress=progress, log=log, data=data, search=stamp)
        except Exception as exc:  # e.g. a diverging loss: the run counts, scores -inf, and the search goes on
            log(f"tuning: this run failed ({exc}); it counts as a run that lost")
            shutil.rmtree(run_dir, ignore_errors=True)
            return -math.inf, None
        correct = round(result.summary["val_accuracy"] * len(data.y_val))
        return noisy_count(correct, noise=tuning.score_noise, rng=rng), run_dir

    def discard(run_dir):
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)

    try:
        best = private_search(candidates, run, repetitions=tuning.repetitions, rng=rng, discard=discard)
    except BaseException:  # an interrupted search releases nothing: its runs are not covered one by one
        for leftover in out.glob(".candidate-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        try:  # an --out left empty would refuse the same command run again
            out.rmdir()
        except OSError:  # not empty (something else is in it): leave it
            pass
        raise
    record["released"] = None
    if best is not None and best.result is not None:
        chosen = {k: getattr(best.candidate, k) for k, _ in tuning.grid}
        record["released"] = {"model": MODEL_FILE, "settings": chosen, "noisy_val_correct": best.score,
                              "noisy_val_accuracy": best.score / len(data.y_val)}
        # The run directory holds diagnostics the bound does not cover (the exact validation score,
        # step times that count the runs after it): it stays private. The released model file is
        # written now, with the search's epsilon, so that no file time tells when the winner ran.
        best.result.rename(out / PRIVATE_DIR)
        release_model(out / PRIVATE_DIR / "model.pt", out / MODEL_FILE, record)
    atomic_write_json(out / RESULT_FILE, record)
    return json.loads((out / RESULT_FILE).read_text())
