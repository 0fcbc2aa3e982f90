"""Which average of the DP iterates to release: EMA decay schedules side by side, from ONE DP run.

Averaging the iterates is post-processing of the DP-SGD outputs, so any number of averages can ride
along one run at no privacy cost and be compared on a validation split carved from the training
set (never on the test set). The pipeline's EMA warms up as ``min(0.9999, (1 + t) / (10 + t))``
(De et al. 2022): at the `cpu` preset's T = 300 its weight on the newest iterate is 9 / 310, so it
averages roughly the last 35 steps. This run carries, beside it:

* ``(1 + t) / (c + t)`` for c = 3 (the last ~100 steps) and c = 30 (the last ~10);
* the uniform average of the last 60 / 120 iterates (Phase III's last quarter / half);
* the last iterate itself (no averaging).

Each is scored on the validation split, plain and with flip TTA. The run is the `cpu` preset's
DP-RandP at the given epsilon with ``--val-fraction``.

    python bench/ema_decay.py --prior PRIOR [--eps 1] [--val-fraction 0.1] [--threads 1] [--no-write]
    python bench/ema_decay.py --prior none --preset demo --dataset digits --no-write   # a one-minute smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import write_section  # noqa: E402
from dprandp.pipeline import trainer as pipeline_trainer  # noqa: E402
from dprandp.pipeline.config import preset  # noqa: E402
from dprandp.privacy.ema import EMA  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ema_decay.jsonl"


def polynomial(c: float):
    return lambda t: min(0.9999, (1.0 + t) / (c + t))


def tail_uniform(total: int, last: int):
    """Copy the iterate until ``total - last`` updates are done, then average the rest uniformly."""
    start = total - last
    return lambda t: 0.0 if t < start else (t - start) / (t - start + 1.0)


class RidingEMAs(EMA):
    """The pipeline's EMA, plus other averages of the same iterates (post-processing, no privacy cost)."""

    instances: list = []
    variants: dict = {}

    def __init__(self, model, **kw) -> None:
        super().__init__(model, **kw)
        self.others = {name: EMA(model, decay_fn=fn) for name, fn in type(self).variants.items()}
        type(self).instances.append(self)

    def update(self, model):
        for other in self.others.values():
            other.update(model)
        self.last = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return super().update(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prior", required=True, help="a prior file, or none (DP-SGD from scratch)")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10.npz"))
    ap.add_argument("--eps", type=float, default=1.0)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    config = preset(a.preset, dataset=a.dataset, data=a.data if a.dataset != "digits" else None,
                    prior=None if a.prior == "none" else a.prior, target_epsilon=a.eps,
                    val_fraction=a.val_fraction, seed=a.seed, eval_every=0)
    t = config.steps
    RidingEMAs.variants = {"(1+t)/(3+t)": polynomial(3.0), "(1+t)/(30+t)": polynomial(30.0),
                           f"uniform, last {t // 5}": tail_uniform(t, t // 5),
                           f"uniform, last {2 * t // 5}": tail_uniform(t, 2 * t // 5)}
    pipeline_trainer.EMA = RidingEMAs  # the run's own EMA (the reported model) is unchanged
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = pipeline_trainer.train(config, out=Path(tmp) / "run", progress=False, log=print)
    minutes = (time.perf_counter() - t0) / 60
    ema = RidingEMAs.instances[-1]
    from dprandp.data import load_dataset
    from dprandp.models import create_model

    data = load_dataset(config.dataset, config.data, val_fraction=config.val_fraction, val_seed=config.seed)
    model = create_model(config.model, head_pool=config.head_pool, num_classes=data.num_classes)
    rows = {}
    states = {"(1+t)/(10+t) (the pipeline's)": ema.shadow, "last iterate": ema.last}
    states.update({name: e.shadow for name, e in ema.others.items()})
    for name, state in states.items():
        model.load_state_dict(state)
        rows[name] = pipeline_trainer.accuracies(model, data.x_val, data.y_val, batch_size=500)
    summary = result.summary
    assert abs(rows["(1+t)/(10+t) (the pipeline's)"][0] - summary["val_accuracy"]) < 1e-9, "riding EMA != run's EMA"
    record = {"prior": Path(a.prior).name, "eps": a.eps, "seed": a.seed, "val_fraction": a.val_fraction,
              "steps": t, "minutes": minutes, "val": {k: {"plain": v[0], "flip": v[1]} for k, v in rows.items()},
              "test_accuracy_of_the_run": summary.get("test_accuracy"), "date": time.strftime("%Y-%m-%d")}
    if not a.no_write:
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")
    base = rows["(1+t)/(10+t) (the pipeline's)"]
    lines = ["## Which average of the DP iterates: EMA schedules from one run (bench/ema_decay.py)", "",
             f"The `{a.preset}` preset's DP-RandP at ε = {a.eps:g} on `{Path(a.prior).name}`, {a.val_fraction:.0%} of train "
             f"held out; every average below rides the same run (post-processing: no privacy cost, paired: the same "
             f"noise). Validation accuracy, plain and with flip TTA; the run took {minutes:.0f} min.", "",
             "| average released | validation | with flip | Δ vs the pipeline's (plain / flip) |",
             "| --- | --- | --- | --- |"]
    for name, (plain, flip) in rows.items():
        lines.append(f"| {name} | {100 * plain:.2f} % | {100 * flip:.2f} % | "
                     f"{100 * (plain - base[0]):+.2f} / {100 * (flip - base[1]):+.2f} |")
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        write_section("ema_decay", text)


if __name__ == "__main__":
    main()
