"""Shared fixtures of the pipeline tests: a tiny learnable dataset and a prior file."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tiny_npz(path: Path, *, n_train: int = 64, n_test: int = 32, classes: int = 4, seed: int = 0) -> str:
    """Class k is a noisy image whose colour channel mix depends on k: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (classes, 3))

    def make(n):
        y = np.arange(n) % classes
        x = palette[y][:, None, None, :] + rng.normal(0, 25, (n, 32, 32, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    x_tr, y_tr = make(n_train)
    x_te, y_te = make(n_test)
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    return str(path)


def make_prior(path: Path, model: str = "wrn-10-1", seed: int = 1) -> str:
    """A prior file in the Phase I format holding a randomly initialised trunk."""
    from dprandp.models import create_model
    from dprandp.pretrain.checkpoint import atomic_save, prior_dict

    m = create_model(model, num_classes=10, seed=seed)
    atomic_save(prior_dict(m.trunk, model_name=model, wrn_config=m.config.to_dict(),
                           provenance={"process": None}, config={}), path)
    return str(path)


def tiny_flags(data: str) -> list[str]:
    return ["--preset", "demo", "--dataset", "npz", "--data", data, "--model", "wrn-10-1",
            "--batch-size", "16", "--augmult", "2", "--physical-batch-size", "16", "--no-progress"]
