"""What a rule did to each of its inputs: the weight its output gave them, and the discount.

Every rule here ends in one of two reductions of its (possibly mixed) rows:

* a weighted sum, `Rows.combine(w)` — mean, krum, multikrum, gm, cclip, cge, mda, smea, monna,
  caf, dnc;
* per coordinate, the mean of a band of order statistics, `Rows.band_mean(a, b, slide)` — cm,
  cwtm, meamed, and Bulyan's last stage.

Wrappers (nnm, bucketing, clip, arc) only change which rows those are, M · X; so in either case
raw input i has an effective weight w_i in the output (per coordinate t for a band: w_ti). A rule
that treated its n inputs alike would give each 1/n, so the *discount* of input i is

    δ_i = 1 − min(1, n · w_i)              (bands: the mean over coordinates of 1 − min(1, n·w_ti))

0 for an input weighted at least as an equal share, 1 for one the output ignores. It reads as the
familiar per-rule notions: krum/multikrum — not selected; gm — one minus its Weiszfeld weight
relative to the mean weight; cclip — how much it was clipped (1 − τ/‖x_i − v‖); cm, cwtm,
meamed — the share of coordinates where its value fell outside the kept band; nnm — how often it is
missing from the neighbourhoods the base rule kept; bucketing — its bucket's discount; clip/arc —
how much it was scaled down, composed with the base rule's verdict.

A verdict is recorded by `Rows` when the reduction runs and is expressed over the raw inputs of
the call (`through` maps a verdict over computed mixed rows back to the rows they mix), so it
costs nothing until a discount is asked for; a band's discount is then evaluated on a sample of
coordinates (`discount(x, columns)`), which is what keeps suspicion scores cheap at d = 1e7.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from byzps.common.aggregators._networks import ranked_network
from byzps.common.aggregators._verdict_kernels import band_discount, band_discount_runs


class Verdict(ABC):
    """The effective weights a rule's output gave its raw inputs."""

    #: True when `discount` reads the data's columns (a band), so its caller need draw a sample
    #: of columns only then; a weighted verdict's discount is n numbers it already has.
    reads_columns: ClassVar[bool] = False

    @abstractmethod
    def through(self, mix: np.ndarray) -> Verdict:
        """The same verdict over the rows that `mix` (n_rows, n_parent) combined."""

    @abstractmethod
    def discount(self, x: Tensor, columns: np.ndarray | None) -> np.ndarray:
        """(n,) float64 δ_i in [0, 1] for the raw inputs x (n, d); a band reads only `columns`
        (None: all of them)."""


def relative_discount(weights: np.ndarray, n: int) -> np.ndarray:
    """1 − min(1, n · w), elementwise, with negative or non-finite weights counted as 0."""
    share = np.where(np.isfinite(weights), weights, 0.0) * n
    return 1.0 - np.clip(share, 0.0, 1.0)


@dataclass(frozen=True)
class Weighted(Verdict):
    """The output was Σ_i weights[i] · x_i (plus, for cclip, a share of its old centre)."""

    weights: np.ndarray

    def through(self, mix: np.ndarray) -> Verdict:
        return Weighted(self.weights @ mix)

    def discount(self, x: Tensor, columns: np.ndarray | None) -> np.ndarray:
        del columns
        return relative_discount(np.asarray(self.weights, np.float64), x.shape[0])


@dataclass(frozen=True)
class Banded(Verdict):
    """Per coordinate, the output was the mean of the order statistics a..b−1 of the rows
    mix · x (mix None: x itself); with slide > 0, of the window a+s..b+s−1 nearest the median
    (`ops.window_network`'s rule for s). NaN ranks as +inf. The value is the same whichever of
    tied rows fill the band; the discount shares a tie's slots in the band among all its
    members, so it follows what each worker sent, not its row."""

    reads_columns: ClassVar[bool] = True
    mix: np.ndarray | None
    a: int
    b: int
    slide: int = 0

    def through(self, mix: np.ndarray) -> Verdict:
        total = mix if self.mix is None else self.mix @ mix
        return Banded(total, self.a, self.b, self.slide)

    def discount(self, x: Tensor, columns: np.ndarray | None) -> np.ndarray:
        if columns is not None and not x.is_cpu:  # copy only the sampled columns off the GPU
            x = x.index_select(1, torch.from_numpy(columns).to(x.device))
            columns = None
        raw = x.detach().cpu().numpy()
        raw = raw if columns is None else raw[:, columns]
        if raw.dtype not in (np.float32, np.float64):
            raw = raw.astype(np.float64)
        mix = np.empty((0, 0)) if self.mix is None else np.ascontiguousarray(self.mix)
        network = ranked_network(mix.shape[0] or raw.shape[0], self.a, self.b, self.slide)
        return band_discount(np.ascontiguousarray(raw), mix, network, self.a, self.b, self.slide)


def band_discounts(verdicts: Sequence[Verdict | None], x: Tensor) -> list[np.ndarray] | None:
    """Each run's discount over all columns of its raw inputs x[r] (x: (R, n0, d) on the CPU) in
    one kernel call, bitwise `verdicts[r].discount(x[r], None)` — for a batched simulation whose
    runs all ended in the same band (the same a, b and slide, each its own mix or none); None
    when they did not (each verdict is then asked alone)."""
    bands = {(v.a, v.b, v.slide, v.mix is None) for v in verdicts if isinstance(v, Banded)}
    if len(bands) != 1 or not all(isinstance(v, Banded) for v in verdicts) or not x.is_cpu:
        return None
    a, b, slide, unmixed = bands.pop()
    raw = x.detach().numpy()
    if raw.dtype not in (np.float32, np.float64):
        return None
    mixes = np.empty((len(verdicts), 0, 0))
    if not unmixed:
        shaped = [v.mix for v in verdicts]  # type: ignore[union-attr]
        if len({m.shape for m in shaped}) != 1:
            return None
        mixes = np.ascontiguousarray(np.stack(shaped), dtype=np.float64)
    network = ranked_network(mixes.shape[1] or raw.shape[1], a, b, slide)
    return list(band_discount_runs(np.ascontiguousarray(raw), mixes, network, a, b, slide))
