"""Measurements for tests/test_ablate.py, importable by the runner's worker processes (``tests/`` is
on ``sys.path`` under pytest, and spawned workers inherit it)."""

from __future__ import annotations

from typing import Any

import torch

from canonreg.data import Split
from canonreg.experiment import TrainedTrial


@torch.no_grad()
def weights_and_accuracy(trained: TrainedTrial, split: Split, scale: float = 1.0, rows: int = 10) -> dict[str, Any]:
    """Sum of squared weights (× ``scale``), test accuracy, the first ``rows`` test predictions, the
    run's arm and seed, the training-split size, and a NaN (stored as None)."""
    model = trained.model
    return {
        "sq_weights": scale * float(sum((p.double() ** 2).sum() for p in model.parameters())),
        "test_acc": float((model(split.x_test).argmax(1) == split.y_test).double().mean()),
        "pred": model(split.x_test[:rows]).argmax(1),
        "arm": trained.config.arm,
        "seed": trained.config.seed,
        "n_train": split.x.shape[0],
        "undefined": float("nan"),
    }


def fails(trained: TrainedTrial, split: Split) -> dict[str, Any]:
    return {"ratio": 1 / 0}


def not_a_dict(trained: TrainedTrial, split: Split) -> list[int]:
    return [1, 2]


def not_json(trained: TrainedTrial, split: Split) -> dict[str, Any]:
    return {"model": trained.model}
