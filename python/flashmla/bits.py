"""Raw-bit conversions for NumPy users without ``ml_dtypes``.

NumPy has no bfloat16 or float8 dtype. :func:`flashmla.flash_mla_with_kvcache` accepts their raw bits in
``uint16`` / ``uint8`` arrays together with ``dtype="bf16"`` / ``"e4m3"``, and then returns ``out`` as ``uint16``
bfloat16 bits. These helpers convert between float32 and those bits (vectorised, any shape)::

    q_bits = flashmla.bits.float32_to_bf16(q_f32)          # uint16
    out_bits, lse = flashmla.flash_mla_with_kvcache(q_bits, k_bits, ..., dtype="bf16")
    out = flashmla.bits.bf16_to_float32(out_bits)           # float32

Rounding is to nearest, ties to even, as in PyTorch and ml_dtypes. :func:`float32_to_e4m3` saturates values
beyond the largest finite E4M3 value (448) to +-448 (E4M3FN has no infinity); NaN maps to NaN.
"""

from __future__ import annotations

import numpy as np

__all__ = ["float32_to_bf16", "bf16_to_float32", "float32_to_e4m3", "e4m3_to_float32", "E4M3_MAX"]

#: Largest finite float8_e4m3fn value.
E4M3_MAX = 448.0


def float32_to_bf16(x) -> np.ndarray:
    """float32 values to bfloat16 bits (``uint16``), rounding to nearest even; NaN stays a (quiet) NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def bf16_to_float32(bits) -> np.ndarray:
    """bfloat16 bits (``uint16`` or ``int16``) to float32 (exact)."""
    b = np.ascontiguousarray(bits)
    if b.dtype.itemsize != 2:
        raise ValueError(f"bf16_to_float32: expected 16-bit integers, got {b.dtype}")
    return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = (codes & 0x7).astype(np.float64)
    normal = (1.0 + man / 8.0) * np.exp2(exp.astype(np.float64) - 7.0)
    subnormal = (man / 8.0) * 2.0**-6
    vals = sign * np.where(exp == 0, subnormal, normal)
    vals[(codes & 0x7F) == 0x7F] = np.nan
    return vals.astype(np.float32)


_E4M3_VALUES = _e4m3_table()
# Non-negative finite codes 0x00..0x7E in increasing value order (the encoding is monotonic).
_E4M3_POS = _E4M3_VALUES[:0x7F].astype(np.float64)


def e4m3_to_float32(bits) -> np.ndarray:
    """float8_e4m3fn bits (``uint8`` or ``int8``) to float32 (exact)."""
    b = np.ascontiguousarray(bits)
    if b.dtype.itemsize != 1:
        raise ValueError(f"e4m3_to_float32: expected 8-bit integers, got {b.dtype}")
    return _E4M3_VALUES[b.view(np.uint8)]


def float32_to_e4m3(x) -> np.ndarray:
    """float32 values to float8_e4m3fn bits (``uint8``): nearest, ties to even; saturates at +-448."""
    x = np.asarray(x, dtype=np.float32)
    a = np.minimum(np.abs(x.astype(np.float64)), E4M3_MAX)
    hi = np.searchsorted(_E4M3_POS, a, side="left").clip(0, 0x7E)  # first code with value >= a
    lo = (hi - 1).clip(0, 0x7E)
    d_hi = _E4M3_POS[hi] - a
    d_lo = a - _E4M3_POS[lo]
    take_lo = (d_lo < d_hi) | ((d_lo == d_hi) & (lo % 2 == 0))
    code = np.where(take_lo, lo, hi).astype(np.uint8)
    code = np.where(np.signbit(x), code | 0x80, code).astype(np.uint8)
    code[np.isnan(x)] = 0x7F
    return code
