"""The packed value codes of the quantizers, as they travel in SparseUpdate.packed.

Each quantizer maps every coordinate to a code of b bits; the codes of one message are
concatenated least-significant bit first (code i occupies bits i·b … i·b + b − 1 of the little-
endian bit stream) and padded with zero bits to whole bytes, so a message of d codes is exactly
⌈d·b/8⌉ bytes. Unpacking checks that length, the zero padding and every code's range, and raises
ValueError naming the rule and the numbers involved (the codec turns it into WireFormatError).

    qsgd     b = 1 + ⌈log2(s + 1)⌉: sign bit (1 = negative) above the level l ∈ [0, s];
             value = ±scale · (l/s), scale = ‖z‖₂ (float32)
    natural-dithering  the same codes; value = ±scale · 2^(l − s) for l ≥ 1, 0 for l = 0
    natural  b = 9: the sign and exponent bits of a float32 power of two (the mantissa is 0),
             value = the float32 with those bits; exponent 255 (inf, NaN) is refused
    sign     b = 1: 1 = negative; value = ±scale, scale = ‖z‖₁/d (float32)

Pure numpy and torch on the CPU: the decoder needs nothing but the message.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: Bits of one natural-compression code: a float32's sign and 8 exponent bits.
NATURAL_BITS = 9
#: Largest level count a QSGD message may declare (16 level bits, 17 per code).
MAX_LEVELS = 2**16 - 1


def level_bits(levels: int) -> int:
    """Bits of one level code (QSGD, natural dithering): 1 sign bit + ⌈log2(s + 1)⌉ level bits
    (= s.bit_length())."""
    return 1 + int(levels).bit_length()


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of `count` codes of `bits` bits: ⌈count·bits/8⌉."""
    return -(-count * bits // 8)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Concatenate `codes` (non-negative, each < 2**bits ≤ 2**32) as described in the module doc.

    Vectorised through bit planes: the little-endian bytes of each code are spread into bits
    (np.unpackbits), the low `bits` columns kept, and the whole stream packed again."""
    c = np.ascontiguousarray(codes, dtype="<u4").view(np.uint8).reshape(-1, 4)
    planes = np.unpackbits(c[:, : _word_bytes(bits)], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_codes(raw: bytes, count: int, bits: int, field: str = "packed") -> np.ndarray:
    """The `count` codes of `bits` bits in `raw` (uint32), after checking length and padding."""
    expected = packed_bytes(count, bits)
    if len(raw) != expected:
        raise ValueError(f"{field}: {len(raw)} bytes, expected ⌈{count}·{bits}/8⌉ = {expected}")
    stream = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    if stream[count * bits :].any():
        raise ValueError(f"{field}: the padding bits after code {count - 1} must be 0")
    planes = stream[: count * bits].reshape(count, bits)
    out = np.zeros(count, dtype=np.uint32)
    for j in range(bits):  # one pass per bit column: faster than a (count, bits) reduction
        out |= planes[:, j].astype(np.uint32) << np.uint32(j)
    return out


def _word_bytes(bits: int) -> int:
    """Bytes of the smallest little-endian word (1, 2 or 4 bytes) that holds a `bits`-bit code."""
    return 1 if bits <= 8 else 2 if bits <= 16 else 4


def check_scale(scale: float) -> None:
    """A message scale must be finite and non-negative (0 only encodes the zero vector)."""
    if not np.isfinite(scale) or scale < 0:
        raise ValueError(f"scale: {scale} is not a finite non-negative number")


# ----------------------------------------------------------------------------------------------
# Level codes: QSGD and natural dithering
# ----------------------------------------------------------------------------------------------


def qsgd_values(scale: Tensor, signed_levels: Tensor, levels: int) -> Tensor:
    """float32 values ±scale · (l/s) of signed levels (shape (w, d)) and scales (shape (w, 1)).

    The one definition the compressor and the decoder share, so they agree to the bit; l/s ≤ 1
    first, so a finite scale never overflows."""
    return scale.to(torch.float32) * (signed_levels.to(torch.float32) / float(levels))


def dithering_values(scale: Tensor, signed_levels: Tensor, levels: int) -> Tensor:
    """float32 values ±scale · 2^(l − s) (0 for l = 0) of natural dithering, shaped like
    `qsgd_values`. The powers of two come from a table (exact), not from exp2."""
    table = torch.tensor([0.0] + [2.0 ** (lv - levels) for lv in range(1, levels + 1)])
    mag = scale.to(torch.float32) * table.to(torch.float32)[signed_levels.abs().long()]
    return torch.where(signed_levels < 0, -mag, mag)


def pack_levels(signed_levels: np.ndarray, levels: int) -> bytes:
    """Codes (sign bit above the level) of one row's signed levels in [−s, s]."""
    mag = np.abs(signed_levels).astype(np.uint32)
    neg = (signed_levels < 0).astype(np.uint32)
    return pack_codes((neg << np.uint32(int(levels).bit_length())) | mag, level_bits(levels))


def unpack_levels(raw: bytes, dim: int, levels: int) -> np.ndarray:
    """Signed levels (int32) of a packed level-code row; every level must be ≤ s."""
    if not 1 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels: {levels} is outside [1, {MAX_LEVELS}]")
    width = int(levels).bit_length()
    codes = unpack_codes(raw, dim, width + 1)
    mag = (codes & np.uint32((1 << width) - 1)).astype(np.int32)
    over = mag > levels
    if over.any():
        pos = int(np.flatnonzero(over)[0])
        raise ValueError(f"packed: level[{pos}] = {int(mag[pos])} exceeds levels s = {levels}")
    return np.where(codes >> np.uint32(width) != 0, -mag, mag)


# ----------------------------------------------------------------------------------------------
# Natural compression
# ----------------------------------------------------------------------------------------------


def natural_pack(values: np.ndarray) -> bytes:
    """9-bit codes (sign, exponent) of float32 values; a mantissa, if any, is dropped (rounding
    toward zero to a power of two: exact for the values natural compression produces)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return pack_codes(bits >> np.uint32(23), NATURAL_BITS)


def natural_unpack(raw: bytes, dim: int) -> np.ndarray:
    """float32 values ±2^e (or ±0) of a packed natural-compression row; no inf or NaN."""
    codes = unpack_codes(raw, dim, NATURAL_BITS)
    special = (codes & np.uint32(0xFF)) == 0xFF
    if special.any():
        pos = int(np.flatnonzero(special)[0])
        raise ValueError(f"packed: code[{pos}] has exponent 255 (inf or NaN)")
    return (codes << np.uint32(23)).view(np.float32)


# ----------------------------------------------------------------------------------------------
# Scaled sign
# ----------------------------------------------------------------------------------------------


def sign_values(scale: Tensor, negative: Tensor) -> Tensor:
    """float32 values ±scale (shape (w, d)) from scales (w, 1) and sign bits."""
    s = scale.to(torch.float32).expand(negative.shape)
    return torch.where(negative, -s, s)


def sign_pack(values: np.ndarray) -> bytes:
    return pack_codes(np.signbit(values).astype(np.uint32), 1)


def sign_unpack(raw: bytes, dim: int) -> np.ndarray:
    """Sign bits (bool, True = negative) of a packed scaled-sign row."""
    return unpack_codes(raw, dim, 1).astype(bool)
