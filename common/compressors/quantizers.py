"""Quantizers: QSGD, natural compression and scaled sign keep every coordinate (nnz = d) and
round its value onto a small code that travels bit-packed (byzps.common.compressors.codes).

Each returns float32 values that are exactly what the receiver decodes from the packed code, so a
worker's error feedback mirrors the server to the bit. `pack` turns one row back into its code;
a row that is not on the code (the Byzantine cohort rescales its messages) is rounded onto it,
as any sender's bytes would be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from byzps.common.compressors import codes
from byzps.common.compressors.base import (
    COMPRESSORS,
    Compressor,
    check_int,
    check_layer_sizes,
    row_generator,
)
from byzps.common.sparse import SparseBatch, SparseVector, dense_indices

#: The largest finite float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: The smallest positive normal float32, 2^-126: natural compression's smallest power of two.
NATURAL_TINY = 2.0**-126
#: Its largest, 2^127 (rounding up from there would overflow to inf).
NATURAL_HUGE = 2.0**127


class Quantizer(Compressor):
    """A dense compressor whose values are a packed code (see byzps.common.compressors.codes)."""

    packed = True

    def __init__(self, dim: int, *, layer_sizes: Sequence[int] | None = None) -> None:
        super().__init__(dim)
        self.layer_sizes = check_layer_sizes(dim, layer_sizes)
        #: Payload bytes of one message (`payload_bytes`), measured on the first one packed.
        self._row_bytes: int | None = None

    @property
    def k(self) -> int:
        return self.dim

    @property
    def levels(self) -> int:
        """The level count a message declares (QSGD's s; 0 for codes without levels)."""
        return 0

    def _batch(self, z: Tensor, values: Tensor, scales: Tensor | None = None) -> SparseBatch:
        idx = dense_indices(z.shape[0], self.dim, z.device)
        return SparseBatch(idx, values.to(z.dtype), self.dim, None, scales)

    def pack(self, vec: SparseVector) -> tuple[float | None, bytes]:
        """(scale or None, packed codes) of one dense row."""
        if vec.dim != self.dim or vec.nnz != self.dim:
            raise ValueError(f"{self.name} packs dense rows of dim {self.dim}")
        return self._pack(vec.values.detach().to(device="cpu", dtype=torch.float32), vec.scale)

    def _pack(self, values: Tensor, scale: float | None) -> tuple[float | None, bytes]:
        raise NotImplementedError

    def payload_bytes(self, batch: SparseBatch) -> int:
        """The packed codes plus the float32 scale, per row: the same for every row of this
        quantizer (d codes of a fixed width; a scale always or never), so measured on the first
        row once and cached."""
        if batch.num_rows == 0:
            return 0
        if self._row_bytes is None:
            scale, packed = self.pack(batch.row(0))
            self._row_bytes = len(packed) + (0 if scale is None else 4)
        return self._row_bytes * batch.num_rows


def _row_uniforms(seeds: Sequence[int], dim: int, device: torch.device) -> Tensor:
    """(w, d) float64 uniforms in [0, 1), one seeded stream per row (drawn on the CPU)."""
    rows = [torch.rand(dim, generator=row_generator(s), dtype=torch.float64) for s in seeds]
    return torch.stack(rows).to(device)


def _norm_ratios(z: Tensor, what: str) -> tuple[Tensor, Tensor, Tensor]:
    """(z in float64, the float32 norms ‖z_i‖₂, r = |z|/‖z_i‖ ∈ [0, 1]) of rows z: the
    normalisation QSGD and natural dithering share (r = 0 in a zero row)."""
    z64 = z.detach().to(torch.float64)
    scale = _float32_scale(z64.norm(dim=1), what)
    denom = scale.to(torch.float64).clamp(min=torch.finfo(torch.float64).tiny)[:, None]
    return z64, scale, (z64.abs() / denom).clamp(max=1.0)


def _float32_scale(scale: Tensor, what: str) -> Tensor:
    """float64 scales as float32, or ValueError when one is not finite in float32."""
    if not bool((scale <= FLOAT32_MAX).all()):
        raise ValueError(f"{what} exceeds the largest float32; the input is not finite-scaled")
    return scale.to(torch.float32)


@COMPRESSORS.register("qsgd")
class QSGD(Quantizer):
    r"""QSGD (Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: communication-efficient SGD via
    gradient quantization and encoding", NeurIPS 2017) with s levels:

    .. math::
        Q(z)_j = \|z\|_2 \,\mathrm{sign}(z_j)\, \xi_j / s,\qquad
        \xi_j = \ell + \mathbb{1}[u_j < r_j - \ell],\quad r_j = s|z_j|/\|z\|_2,\; \ell = \lfloor
        r_j \rfloor,\; u_j \sim U[0, 1).

    Unbiased (E ξ_j = r_j). Variance: Σ_j (‖z‖/s)² p_j(1 − p_j) with p_j = r_j − ℓ, and
    p(1 − p) ≤ min(1/4, r_j), so E‖Q(z) − z‖² ≤ ‖z‖² min(d/(4s²), ‖r‖₁/s²) ≤ ‖z‖² min(d/s², √d/s)
    (‖r‖₁ ≤ s√d): byzps declares the paper's ω = min(d/s², √d/s). On the wire: the norm as a
    float32 scale and d codes of 1 + ⌈log2(s + 1)⌉ bits. The uniforms come from the row's seed
    derive_seed(run seed, "qsgd", worker, round), so the simulator and a worker send the same
    bytes; the seed does not travel (the server has nothing to check against it).
    """

    unbiased = True
    seeded = True

    def __init__(
        self,
        dim: int,
        *,
        levels: int = 1,
        layer_sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dim, layer_sizes=layer_sizes)
        self._levels = check_int("levels", levels, 1, codes.MAX_LEVELS)

    @property
    def levels(self) -> int:
        return self._levels

    @property
    def omega(self) -> float:
        s, d = self._levels, self.dim
        return min(d / s**2, math.sqrt(d) / s)

    def _compress(
        self, z: Tensor, seeds: Sequence[int] | None, workers: Sequence[int] | None
    ) -> SparseBatch:
        del workers
        assert seeds is not None  # checked by compress
        z64, scale, ratio = _norm_ratios(z, "qsgd: ‖z‖₂")
        s = self._levels
        r = ratio * s
        low = r.floor()
        level = low + (_row_uniforms(seeds, self.dim, z.device) < r - low).to(torch.float64)
        signed = torch.where(z64 < 0, -level, level).to(torch.int64)  # ints: no −0.0
        values = codes.qsgd_values(scale[:, None], signed, s)
        return self._batch(z, values, scale)

    def scaled(self, batch: SparseBatch, factor: float) -> SparseBatch:
        """The same levels under the scales times `factor` (values recomputed from the code, so
        they stay exactly what the receiver decodes)."""
        assert batch.scales is not None
        scales = (batch.scales * factor).to(torch.float32)
        denom = batch.scales.to(torch.float64).clamp(min=torch.finfo(torch.float64).tiny)[:, None]
        signed = torch.round(batch.values.to(torch.float64) / denom * self._levels)
        values = codes.qsgd_values(scales[:, None], signed.to(torch.int64), self._levels)
        return SparseBatch(batch.indices, values.to(batch.values.dtype), batch.dim, None, scales)

    def _pack(self, values: Tensor, scale: float | None) -> tuple[float | None, bytes]:
        """Levels round(s·v/scale); without a scale (a rescaled row) scale = max|v|."""
        v = values.numpy().astype(np.float64)
        if scale is None:
            scale = float(np.abs(v).max(initial=0.0))
        s = self._levels
        signed = np.zeros(v.shape, dtype=np.int64) if scale == 0 else np.rint(v / scale * s)
        signed = np.clip(signed, -s, s).astype(np.int64)
        return float(np.float32(scale)), codes.pack_levels(signed, s)


@COMPRESSORS.register("natural")
class Natural(Quantizer):
    r"""Natural compression (Horváth, Ho, Horváth, Sahu, Canini, Richtárik, "Natural compression
    for distributed deep learning", MSML 2022; arXiv 2019): each value is rounded at random to
    one of the two powers of two around it:

    .. math::
        C(z)_j = \mathrm{sign}(z_j)\, 2^{e}\,(1 + \mathbb{1}[u_j < |z_j|/2^{e} - 1]),\qquad
        2^{e} \le |z_j| < 2^{e+1}.

    Unbiased; for t = |z_j|/2^e ∈ [1, 2) the variance is (2 − t)(t − 1)·4^e ≤ z_j²/8 (maximal at
    t = 4/3), so ω = 1/8. On the wire only the float32 sign and exponent (9 bits). Two edges of
    float32, both far outside any gradient: below 2^-126 a value is rounded between 0 and 2^-126
    (variance ≤ 2^-254 per coordinate, not relative), and a value that would round up past
    2^127 stays at 2^127 (saturation: 2^128 is inf, which the server refuses).
    """

    unbiased = True
    seeded = True

    @property
    def omega(self) -> float:
        return 1.0 / 8.0

    def _compress(
        self, z: Tensor, seeds: Sequence[int] | None, workers: Sequence[int] | None
    ) -> SparseBatch:
        del workers
        assert seeds is not None  # checked by compress
        a = z.detach().to(torch.float64).abs()
        low = torch.exp2(torch.floor(torch.log2(a.clamp(min=NATURAL_TINY))))
        low = torch.where(a < NATURAL_TINY, torch.zeros_like(a), low)
        step = torch.where(a < NATURAL_TINY, torch.full_like(a, NATURAL_TINY), low)
        up = _row_uniforms(seeds, self.dim, z.device) * step < a - low
        mag = torch.where(up & (low < NATURAL_HUGE), low + step, low)
        values = torch.where(z < 0, -mag, mag).to(torch.float32)
        return self._batch(z, values)

    def _pack(self, values: Tensor, scale: float | None) -> tuple[float | None, bytes]:
        del scale
        return None, codes.natural_pack(values.numpy())


@COMPRESSORS.register("sign")
class ScaledSign(Quantizer):
    r"""Scaled sign (Karimireddy, Rebjock, Stich, Jaggi, "Error feedback fixes SignSGD and other
    gradient compression schemes", ICML 2019):

    .. math::
        C(z) = \frac{\|z\|_1}{d}\,\mathrm{sign}(z),\qquad \mathrm{sign}(0) := +1.

    Contractive and deterministic: ⟨C(z), z⟩ = ‖z‖₁²/d = ‖C(z)‖², so
    ‖C(z) − z‖² = ‖z‖² − ‖z‖₁²/d = (1 − α(z))‖z‖² with α(z) = ‖z‖₁²/(d‖z‖₂²) ∈ [1/d, 1]
    (Cauchy–Schwarz gives ≤ 1; ‖z‖₁ ≥ ‖z‖₂ gives ≥ 1/d, reached by a 1-sparse z). byzps
    declares the worst case α = 1/d. On the wire: the scale as a float32 and one bit per
    coordinate.
    """

    unbiased = False

    @property
    def alpha(self) -> float:
        return 1.0 / self.dim

    def _compress(
        self, z: Tensor, seeds: Sequence[int] | None, workers: Sequence[int] | None
    ) -> SparseBatch:
        del seeds, workers
        z64 = z.detach().to(torch.float64)
        scale = _float32_scale(z64.abs().sum(dim=1) / self.dim, "sign: ‖z‖₁/d")
        values = codes.sign_values(scale[:, None], z64 < 0)
        return self._batch(z, values, scale)

    def _pack(self, values: Tensor, scale: float | None) -> tuple[float | None, bytes]:
        """Sign bits; without a scale (a rescaled row) scale = mean|v|, the least-squares fit."""
        if scale is None:
            scale = float(values.abs().to(torch.float64).mean())
        return float(np.float32(scale)), codes.sign_pack(values.numpy())


@COMPRESSORS.register("natural-dithering")
class NaturalDithering(Quantizer):
    r"""Natural dithering (Horváth et al., "Natural compression for distributed deep learning",
    same paper as `natural`) with s levels: dithering of r_j = |z_j|/‖z‖₂ ∈ [0, 1] on the grid
    {0, 2^(1−s), 2^(2−s), …, 1/2, 1} of powers of two, rounding to a neighbour at random so that
    the mean is r_j:

    .. math::
        Q(z)_j = \|z\|_2\,\mathrm{sign}(z_j)\,\xi_j,\qquad
        \xi_j \in \{a, b\},\; \Pr[\xi_j = b] = (r_j - a)/(b - a),\; a \le r_j \le b
        \text{ adjacent grid points}.

    Unbiased. Between two powers of two the variance is ≤ r_j²/8 as in natural compression;
    in [0, T), T = 2^(1−s), it is r_j(T − r_j) ≤ min(T r_j, T²/4). Summing with ‖r‖₂ = 1,
    ‖r‖₁ ≤ √d: E‖Q(z) − z‖² ≤ ‖z‖² (1/8 + min(T√d, dT²/4)) ≤ ‖z‖² (1/8 + T√d min(1, √d T)),
    the paper's ω (Theorem 7, p = 2). On the wire the same codes as QSGD (sign and level
    l ∈ [0, s], value ±‖z‖ 2^(l−s), 0 for l = 0) and the float32 norm; s ≤ 64.
    """

    unbiased = True
    seeded = True

    def __init__(
        self, dim: int, *, levels: int = 8, layer_sizes: Sequence[int] | None = None
    ) -> None:
        super().__init__(dim, layer_sizes=layer_sizes)
        self._levels = check_int("levels", levels, 1, 64)

    @property
    def levels(self) -> int:
        return self._levels

    @property
    def omega(self) -> float:
        t = 2.0 ** (1 - self._levels)
        root = math.sqrt(self.dim)
        return 1.0 / 8.0 + t * root * min(1.0, root * t)

    def _compress(
        self, z: Tensor, seeds: Sequence[int] | None, workers: Sequence[int] | None
    ) -> SparseBatch:
        del workers
        assert seeds is not None  # checked by compress
        z64, scale, r = _norm_ratios(z, "natural-dithering: ‖z‖₂")
        s = self._levels
        tiny = 2.0 ** (1 - s)
        e = torch.floor(torch.log2(r.clamp(min=tiny)))  # in [1 − s, 0]
        low = torch.where(r < tiny, torch.zeros_like(r), torch.exp2(e))
        high = torch.where(r < tiny, torch.full_like(r, tiny), torch.exp2(e + 1))
        low_level = torch.where(r < tiny, torch.zeros_like(r), e + s)
        up = _row_uniforms(seeds, self.dim, z.device) * (high - low) < r - low
        level = torch.where(up, low_level + 1, low_level).clamp(max=s)
        signed = torch.where(z64 < 0, -level, level).to(torch.int64)
        values = codes.dithering_values(scale[:, None], signed, s)
        return self._batch(z, values, scale)

    def scaled(self, batch: SparseBatch, factor: float) -> SparseBatch:
        """The same levels under the scales times `factor` (see QSGD.scaled)."""
        assert batch.scales is not None
        scales = (batch.scales * factor).to(torch.float32)
        signed = torch.from_numpy(self._levels_of(batch.values, batch.scales))
        values = codes.dithering_values(scales[:, None], signed, self._levels)
        return SparseBatch(batch.indices, values.to(batch.values.dtype), batch.dim, None, scales)

    def _levels_of(self, values: Tensor, scales: Tensor) -> np.ndarray:
        """Signed levels: the nearest grid point of |v|/scale (0, or 2^(l − s))."""
        v = values.detach().cpu().to(torch.float64).numpy()
        sc = scales.detach().cpu().to(torch.float64).numpy().reshape(-1, *([1] * (v.ndim - 1)))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(sc > 0, np.abs(v) / np.where(sc > 0, sc, 1.0), 0.0)
            level = np.rint(np.log2(np.maximum(r, 2.0 ** -(self._levels + 1)))) + self._levels
        level = np.where(r < 2.0 ** (-self._levels), 0, np.clip(level, 1, self._levels))
        return np.where(v < 0, -level, level).astype(np.int64)

    def _pack(self, values: Tensor, scale: float | None) -> tuple[float | None, bytes]:
        """Levels of the nearest grid point; without a scale (a rescaled row) scale = max|v|."""
        if scale is None:
            scale = float(values.abs().max()) if values.numel() else 0.0
        signed = self._levels_of(values, torch.tensor([scale], dtype=torch.float64))
        return float(np.float32(scale)), codes.pack_levels(signed, self._levels)
