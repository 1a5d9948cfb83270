"""A LIBSVM-format parser ("label idx:val idx:val ...", 1-based indices) into dense tensors.

The a9a task needs dense rows (d = 123) for batched matrix products, so the parser scatters the
sparse entries into a dense float32 (N, d) array. Malformed input fails loudly with the source and
line number rather than silently producing a shifted or truncated data set.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor


class LibsvmFormatError(ValueError):
    """A LIBSVM file does not parse; the message names the source and the 1-based line."""


def _parse_line(
    tokens: list[str], n_features: int, cols: list[int], vals: list[float]
) -> tuple[float, int]:
    """Append the line's features to cols/vals (0-based); return (label, number of features)."""
    try:
        label = float(tokens[0])
    except ValueError:
        raise ValueError(f"label {tokens[0]!r} is not a number") from None
    previous = 0
    for token in tokens[1:]:
        index, colon, value = token.partition(":")
        if not colon:
            raise ValueError(f"feature {token!r} is not of the form index:value")
        try:
            col = int(index)
            val = float(value)
        except ValueError:
            raise ValueError(f"feature {token!r} has a non-numeric index or value") from None
        if not previous < col <= n_features:
            raise ValueError(
                f"feature index {col} out of order or outside [1, {n_features}] "
                f"(indices are 1-based and strictly increasing)"
            )
        previous = col
        cols.append(col - 1)
        vals.append(val)
    return label, len(tokens) - 1


def parse_libsvm(
    lines: Iterable[str], n_features: int, *, source: str = "<libsvm>"
) -> tuple[Tensor, Tensor]:
    """Parse LIBSVM lines into (features float32 (N, n_features), labels float32 (N,)).

    Blank lines and lines starting with '#' are skipped; text after '#' is a comment.
    Raises LibsvmFormatError naming `source` and the line number of the first malformed line.
    """
    labels: list[float] = []
    counts: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for lineno, line in enumerate(lines, start=1):
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        try:
            label, count = _parse_line(tokens, n_features, cols, vals)
        except ValueError as exc:
            raise LibsvmFormatError(f"{source}, line {lineno}: {exc}") from None
        labels.append(label)
        counts.append(count)
    rows = np.repeat(np.arange(len(labels)), counts)
    features = np.zeros((len(labels), n_features), dtype=np.float32)
    features[rows, np.asarray(cols, dtype=np.int64)] = np.asarray(vals, dtype=np.float32)
    return torch.from_numpy(features), torch.tensor(labels, dtype=torch.float32)
