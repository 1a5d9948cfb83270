"""Task "fmnist-cnn": Fashion-MNIST (60 000 / 10 000, 10 classes) with a small CNN.

Our offline stand-in for the paper's CIFAR-10 / ResNet-20 image task. Data comes from the Debian
package `dataset-fashion-mnist` (gzipped IDX files under /usr/share/datasets/fashion-mnist);
`data_dir` or the BYZPS_FASHION_MNIST_DIR environment variable point elsewhere. Pixels are scaled
to [0, 1], then standardised with the mean and standard deviation of all training pixels.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from byzps.common.tasks.base import TASKS
from byzps.common.tasks.functional import FunctionalModel, FunctionalModelTask
from byzps.common.tasks.spec import DataSpec

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "BYZPS_FASHION_MNIST_DIR"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes (type 0x08) as a uint8 array of its stated shape."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} bytes")
    return array.reshape(shape)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """`data_dir`, else $BYZPS_FASHION_MNIST_DIR, else the Debian package's directory; checked."""
    path = Path(data_dir or os.environ.get(ENV_VAR) or DEFAULT_DIR)
    missing = [name for pair in _FILES.values() for name in pair if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {path} lacks {', '.join(missing)}. Install the Debian "
            f"package dataset-fashion-mnist (apt install dataset-fashion-mnist), or point "
            f"{ENV_VAR} or the task's data_dir at a directory holding the IDX .gz files."
        )
    return path


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(data_dir: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images (60000, 1, 28, 28) float32 standardised, train labels int64, test images,
    test labels); parsed once per process and shared, so callers must not modify them."""
    arrays = {
        split: (read_idx(data_dir / images), read_idx(data_dir / labels))
        for split, (images, labels) in _FILES.items()
    }
    train_pixels = arrays["train"][0].astype(np.float32) / 255.0
    mean, std = float(train_pixels.mean()), float(train_pixels.std())

    def images(split: str) -> Tensor:
        pixels = arrays[split][0].astype(np.float32) / 255.0
        return torch.from_numpy((pixels - mean) / std).unsqueeze(1)

    def labels(split: str) -> Tensor:
        return torch.from_numpy(arrays[split][1].astype(np.int64))

    return images("train"), labels("train"), images("test"), labels("test")


class SmallCNN(nn.Module):
    """conv 1→16 5×5 → ReLU → max-pool 2 → conv 16→32 5×5 → ReLU → max-pool 2 → linear 512→32 →
    ReLU → linear 32→10: d = 29 994. Unpadded convolutions keep the CPU cost of 20 workers × 64
    images per round low (the second convolution dominates it and sees only 8×8 outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(start_dim=-3))))


@TASKS.register("fmnist-cnn")
class FashionMnistCnnTask(FunctionalModelTask):
    """Fashion-MNIST with SmallCNN; `max_train` keeps only the first rows (tests, smoke runs).

    `vmap_chunk_size` defaults to 4 workers per vmap call: on a 2-core CPU, w = 20, batch 64, one
    vmap over all workers took ~160 ms (its batched convolution backward is slow there) against
    ~90 ms in chunks of 4. Pass None on an accelerator.
    """

    num_classes = 10

    def __init__(
        self,
        *,
        data: DataSpec,
        vmap_chunk_size: int | None = 4,
        data_dir: str | None = None,
        max_train: int | None = None,
        eval_size: int | None = 10_000,
    ) -> None:
        train_x, train_y, test_x, test_y = load_fashion_mnist(resolve_data_dir(data_dir))
        if max_train is not None:
            train_x, train_y = train_x[:max_train], train_y[:max_train]
        super().__init__(
            FunctionalModel(SmallCNN),
            (train_x, train_y),
            (test_x, test_y),
            vmap_chunk_size=vmap_chunk_size,
            eval_size=eval_size,
            data=data,
        )
