"""The comparator-network band mean as a Triton GPU kernel, generated per network.

`ops.band_mean` on a CUDA tensor comes here when Triton is importable. Each program holds a block
of columns of all n rows in registers (one value per row and thread), runs the network's
comparators as branch-free selects and writes the band's mean: one read of the n rows and one
write of the result, so it runs at a fraction of the plain mean's bandwidth instead of
torch.median's ~2 %.

Why generated source: the network is a fixed list of (i, j) wire pairs that must become straight-
line code over n named registers; Triton compiles Python source it can read from a file, so the
source is written once per (n, band, dtype) into a cache directory and imported from there.

Up to NETWORK_ROWS rows, bit-exact with the CPU kernel (`_kernels.band_mean`) on the same rows:
NaN becomes +inf, a comparator swaps exactly when hi < lo, the band is summed in float64 in rank
order, multiplied by 1/(b − a) (read from memory as a float64, not a float32 literal) and rounded
once. Past it, a sort kernel (`_SORT_SOURCE`) that agrees up to float64 rounding.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

#: Up to this many rows the comparator network becomes straight-line code. Past it the code, and
#: Triton's compile time with it, grows too fast (n = 100: ~900 comparators, minutes), so the
#: columns are sorted with tl.sort instead (`_SORT_SOURCE`).
NETWORK_ROWS = 32
#: Columns per program and warps of the network kernel (H200, n = 20: 0.37 ms at (20, 1e7), the
#: best of blocks 128–512 × 4/8 warps; benchmarks/bench_band_kernel.py).
_NETWORK_BLOCK, _NETWORK_WARPS = 128, 4
#: Columns per program and warps of the sort kernel (BLOCK × next_pow2(n) keys per program).
#: H200, n = 100, d = 1e7: 69 ms at 64 × 4, the best of blocks 16–64 × 4/8 warps (83–183 ms
#: elsewhere) — still only ~1.5 % of the read bandwidth: tl.sort is far from a register network.
_SORT_BLOCK, _SORT_WARPS = 64, 4

#: The band mean for n > NETWORK_ROWS float32 rows: the rows of a block of columns as
#: order-preserving int32 keys (a float's bits with the magnitude bits flipped when negative),
#: sorted per column by tl.sort (a bitonic network on registers) and mapped back. Keys, not
#: floats: tl.sort selects by multiplying with 0/1 masks, and inf · 0 is NaN. The band is then
#: summed as a float64 tree, not rank by rank, so it may differ from the CPU's sum in its last
#: bits (and in the sign of a zero, which the network never swaps).
_SORT_SOURCE = """\
import triton
import triton.language as tl


@triton.jit(do_not_specialize=['stride'])
def band_mean(x_ptr, out_ptr, inv_ptr, n, d, stride, A: tl.constexpr, B: tl.constexpr,
              NP: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ranks = tl.arange(0, NP)
    inside = (ranks[:, None] < n) & (cols[None, :] < d)
    offsets = ranks[:, None].to(tl.int64) * stride.to(tl.int64) + cols[None, :]
    v = tl.load(x_ptr + offsets, mask=inside, other=float('inf'))
    v = tl.where(v < float('inf'), v, float('inf'))
    bits = v.to(tl.int32, bitcast=True)
    keys = tl.sort(tl.trans(bits ^ ((bits >> 31) & 0x7FFFFFFF)), 1)
    bits = keys ^ ((keys >> 31) & 0x7FFFFFFF)
    ordered = bits.to(tl.float32, bitcast=True).to(tl.float64)
    band = (ranks[None, :] >= A) & (ranks[None, :] < B)
    acc = tl.sum(tl.where(band, ordered, 0.0), axis=1) * tl.load(inv_ptr)
    tl.store(out_ptr + cols, acc.to(tl.float32), mask=cols < d)
"""


def available() -> bool:
    """True when Triton is importable and a CUDA device is visible."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _source(n: int, network: np.ndarray, a: int, b: int) -> str:
    """Python/Triton source of the kernel for n rows, `network`'s comparators and band [a, b)."""
    lines = [
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit(do_not_specialize=['stride'])",
        "def band_mean(x_ptr, out_ptr, inv_ptr, d, stride, BLOCK: tl.constexpr):",
        "    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
        "    mask = cols < d",
        "    step = stride.to(tl.int64)",
    ]
    for r in range(n):
        lines.append(f"    r{r} = tl.load(x_ptr + {r} * step + cols, mask=mask, other=0.0)")
        lines.append(f"    r{r} = tl.where(r{r} < float('inf'), r{r}, float('inf'))")
    for i, j in network.tolist():
        lines.append(f"    s = r{j} < r{i}")
        lines.append(f"    r{i}, r{j} = tl.where(s, r{j}, r{i}), tl.where(s, r{i}, r{j})")
    lines.append(f"    acc = r{a}.to(tl.float64)")
    lines += [f"    acc = acc + r{r}.to(tl.float64)" for r in range(a + 1, b)]
    lines.append("    acc = acc * tl.load(inv_ptr)")
    lines.append("    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)")
    return "\n".join(lines) + "\n"


def _cache_dir() -> Path:
    root = os.environ.get("BYZPS_TRITON_CACHE") or Path(tempfile.gettempdir()) / "byzps-triton"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@lru_cache(maxsize=64)
def _kernel_module(source: str) -> ModuleType:
    """Import `source` from a file named by its hash (written atomically, so concurrent
    processes never read half a file)."""
    name = "byzps_band_" + hashlib.sha256(source.encode()).hexdigest()[:20]
    path = _cache_dir() / f"{name}.py"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=64)
def _network_kernel(n: int, network: bytes, a: int, b: int) -> object:
    """The compiled-on-first-launch kernel of one network, looked up without regenerating its
    source on every call (the network's bytes key the cache)."""
    comparators = np.frombuffer(network, dtype=np.int64).reshape(-1, 2)
    return _kernel_module(_source(n, comparators, a, b)).band_mean


def supports(n: int, dtype: torch.dtype) -> bool:
    """Whether `band_mean` has a kernel for n rows of `dtype` (the sort kernel is float32's)."""
    return dtype in (torch.float32, torch.float64) and (n <= NETWORK_ROWS or dtype == torch.float32)


def band_mean(
    rows: Tensor,
    network: np.ndarray,
    a: int,
    b: int,
    block: int | None = None,
    warps: int | None = None,
) -> Tensor:
    """Per column of the (n, d) CUDA tensor `rows`, the mean of its values of rank a..b-1 (NaN
    as +inf): `ops.band_mean` on unmixed rows, on the GPU (`supports` says for which n, dtype).
    `network` is the comparator list for n ≤ NETWORK_ROWS."""
    import triton

    n, d = rows.shape
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    out = torch.empty(d, dtype=rows.dtype, device=rows.device)
    inv = torch.tensor([1.0 / (b - a)], dtype=torch.float64, device=rows.device)
    if n <= NETWORK_ROWS:
        kernel = _network_kernel(n, network.tobytes(), a, b)
        block, warps = block or _NETWORK_BLOCK, warps or _NETWORK_WARPS
        grid = (triton.cdiv(d, block),)
        kernel[grid](rows, out, inv, d, rows.stride(0), BLOCK=block, num_warps=warps)
        return out
    kernel = _kernel_module(_SORT_SOURCE).band_mean
    block, warps = block or _SORT_BLOCK, warps or _SORT_WARPS
    width = 1 << (n - 1).bit_length()
    grid = (triton.cdiv(d, block),)
    kernel[grid](
        rows, out, inv, n, d, rows.stride(0), A=a, B=b, NP=width, BLOCK=block, num_warps=warps
    )
    return out
