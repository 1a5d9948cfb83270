"""Task "digits-mlp": scikit-learn's bundled 8×8 digits (1 797 × 64, 10 classes) with an MLP.

A tiny, offline multi-class task for fast tests of the whole pipeline. The split is fixed
(stratified, 20% test, random_state 0) and independent of the run seed; pixels (0..16) are
scaled to [0, 1] and standardised with the training pixels' scalar mean and standard deviation.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from byzps.common.tasks.base import TASKS
from byzps.common.tasks.functional import FunctionalModel, FunctionalModelTask
from byzps.common.tasks.spec import DataSpec

TEST_FRACTION = 0.2


@functools.lru_cache(maxsize=1)
def load_digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train features float32 (1437, 64), train labels int64, test features, test labels)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError("task digits-mlp needs scikit-learn: pip install byzps[tasks]") from exc
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data / 16.0, data.target, test_size=TEST_FRACTION, stratify=data.target, random_state=0
    )
    mean, std = x_train.mean(), x_train.std()

    def features(x: object) -> Tensor:
        return torch.tensor((x - mean) / std, dtype=torch.float32)

    def labels(y: object) -> Tensor:
        return torch.tensor(y, dtype=torch.int64)

    return features(x_train), labels(y_train), features(x_test), labels(y_test)


def digits_mlp() -> nn.Module:
    """64 → 32 → ReLU → 10 (d = 2 410)."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@TASKS.register("digits-mlp")
class DigitsMlpTask(FunctionalModelTask):
    """The digits MLP; the global objective uses all 1 437 training rows."""

    num_classes = 10

    def __init__(
        self,
        *,
        data: DataSpec,
        vmap_chunk_size: int | None = None,
    ) -> None:
        train_x, train_y, test_x, test_y = load_digits_split()
        super().__init__(
            FunctionalModel(digits_mlp),
            (train_x, train_y),
            (test_x, test_y),
            vmap_chunk_size=vmap_chunk_size,
            eval_size=None,
            data=data,
        )
