"""Phases II + III end to end: configs in, results (a run directory) out.

The Python API mirrors the CLI::

    from dprandp.pipeline import preset, train
    result = train(preset("demo", prior="prior.pt", target_epsilon=2.0), out="runs/mine")
    result.test_accuracy, result.epsilon

``resume(run_dir)`` continues a killed run; ``evaluate(model_path, data)`` scores a saved model;
``predict(model_path, images)`` labels new images (``read_images(path)`` reads them);
``demo_config`` / ``run_all`` add Phase I (see :mod:`dprandp.pipeline.run`).
"""

from dprandp.pipeline.config import PRESETS, TrainConfig, preset
from dprandp.pipeline.finish import evaluate, load_model
from dprandp.pipeline.ledger import PrivacyLedger
from dprandp.pipeline.predict import Predictions, predict, read_images
from dprandp.pipeline.trainer import TrainResult, make_plan, resume, train

__all__ = ["PRESETS", "Predictions", "PrivacyLedger", "TrainConfig", "TrainResult", "evaluate", "load_model",
           "make_plan", "predict", "preset", "read_images", "resume", "train"]
