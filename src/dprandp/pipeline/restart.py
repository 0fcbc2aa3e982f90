"""Automatic continuation of a run: ``torchrun --max-restarts``, a requeued cluster job, a rerun.

torchrun restarts every worker with the *same* command line after a failure (and sets
``TORCHELASTIC_RESTART_COUNT``); a scheduler that requeues a job does the same. So the same
``dprandp train ... --out DIR`` must be able to find out where it stands:

* no run in ``DIR``                 -> start it;
* the same run, complete            -> report its summary (train nothing, spend nothing);
* the same run, with a checkpoint   -> resume it (the ledger keeps every step already spent);
* the same run, killed before its first checkpoint and with no step in its ledger -> start it
  again (nothing was spent);
* a run with different settings     -> refuse: continuing it would mix two runs' budgets (settings of
  ``MEMORY_ONLY``, such as ``--physical-batch-size``, may differ: the run continues with the new ones).

Starting over a ledger that holds steps is never done: that would spend the privacy budget of the
same data a second time while reporting only the second run's epsilon.
"""

from __future__ import annotations

import os
from pathlib import Path

from dprandp.errors import require
from dprandp.pipeline.config import MEMORY_ONLY, TrainConfig
from dprandp.pipeline.ledger import LEDGER_NAME, PrivacyLedger
from dprandp.pipeline.rundir import read_json
from dprandp.pipeline.state import CHECKPOINT_NAME


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 outside torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def continue_or_start(config: TrainConfig, out: str | os.PathLike, **kwargs):
    """Train ``config`` into ``out``, or continue/report the same run already there (module doc)."""
    from dprandp.pipeline.trainer import TrainResult, load_summary, resume, train

    out = Path(out)
    has_config, has_ledger = (out / "config.json").is_file(), (out / LEDGER_NAME).is_file()
    if not (has_config or has_ledger):
        return train(config, out=out, **kwargs)  # absent, empty, or not a run (train refuses that)
    require(has_config, f"{out} has a privacy ledger but no config.json; it cannot be continued automatically")
    saved = read_json(out / "config.json", "run config").get("train", {})
    now = config.with_absolute_paths().to_dict()  # what train() records
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in MEMORY_ONLY)
    require(not diff, f"{out} holds a run with other settings ("
            + ", ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in diff[:4])
            + "); choose another --out")
    if (out / "summary.json").is_file():
        return TrainResult(out, load_summary(out))
    if (out / CHECKPOINT_NAME).is_file():
        return resume(out, progress=kwargs.get("progress"), log=kwargs.get("log"), data=kwargs.get("data"),
                      memory={k: now[k] for k in MEMORY_ONLY})
    spent = PrivacyLedger.open(out).steps if has_ledger else 0
    require(spent == 0, f"{out}: the ledger holds {spent} steps but there is no checkpoint; refusing to start over "
            "(that would spend the budget twice)")
    return train(config, out=out, **{**kwargs, "overwrite": True})
