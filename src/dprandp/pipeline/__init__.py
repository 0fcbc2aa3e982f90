"""Phases II + III end to end: configs in, results (a run directory) out.

The Python API mirrors the CLI::

    from dprandp.pipeline import preset, train
    result = train(preset("demo", prior="prior.pt", target_epsilon=2.0), out="runs/mine")
    result.test_accuracy, result.epsilon

``resume(run_dir)`` continues a killed run; ``evaluate(model_path, data)`` scores a saved model;
``demo_config`` / ``run_all`` add Phase I (see :mod:`dprandp.pipeline.run`).
"""

from dprandp.pipeline.config import PRESETS, TrainConfig, preset
from dprandp.pipeline.finish import evaluate, load_model
from dprandp.pipeline.ledger import PrivacyLedger
from dprandp.pipeline.trainer import TrainResult, make_plan, resume, train

__all__ = ["PRESETS", "PrivacyLedger", "TrainConfig", "TrainResult", "evaluate", "load_model", "make_plan",
           "preset", "resume", "train"]
