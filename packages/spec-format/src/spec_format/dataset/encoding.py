"""How hidden states are stored: fp32, bf16 or fp8 (e4m3 with a per-row scale), optionally byte-shuffled
and zstd-compressed. numpy only: numpy has no bf16 or fp8 dtype, so the bit patterns are computed here and
held as uint16 / uint8.

fp8 is OCP e4m3fn (torch.float8_e4m3fn): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits, no infinity,
largest finite value 448, code 0x7F/0xFF is NaN. Each row hidden[t, l, :] gets one float32 scale =
absmax / 448, so the row's largest value maps to 448 and nothing saturates; the residual stream of real
models has outliers near 25,000 that a single per-tensor scale would crush the other channels under.
"""

from __future__ import annotations

import numpy as np
import zstandard

from spec_format.tensors import bf16_bits_to_float32, float32_to_bf16_bits

DTYPES = ("fp32", "bf16", "fp8")
COMPRESSIONS = (None, "zstd")
FP8_MAX = 448.0
# numpy dtype of the stored hidden bits for each storage dtype
STORED_DTYPE = {"fp32": np.dtype("<f4"), "bf16": np.dtype("<u2"), "fp8": np.dtype("u1")}

_MIN_NORMAL = np.float32(2.0**-6)  # smallest normal e4m3 value; below it the spacing is 2^-9


def _e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn codes (NaN for 0x7F and 0xFF)."""
    code = np.arange(256, dtype=np.uint32)
    exp, mant = (code >> 3) & 0xF, (code & 7).astype(np.float32)
    mag = np.where(exp == 0, mant * np.float32(2.0**-9), (1 + mant / 8) * np.exp2(exp.astype(np.float32) - 7))
    mag[(code & 0x7F) == 0x7F] = np.nan
    return np.where(code >= 128, -mag, mag).astype(np.float32)


E4M3_VALUES = _e4m3_table()


def float32_to_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> e4m3fn codes (uint8), rounding to nearest even and saturating to +-448 (finite input).

    Normal range: round the float32 mantissa to 3 bits on the bit pattern (a carry into the exponent is
    the correct next binade); the e4m3 code is then the rounded (exponent, mantissa) minus the bias
    difference 127 - 7 = 120. Below 2^-6 the codes 0..8 are evenly spaced by 2^-9, so the code is
    rint(|x| * 2^9) (rint rounds half to even).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    a = np.abs(x)
    u = a.view(np.uint32)
    rounded = (u + np.uint32(0x7FFFF) + ((u >> 20) & np.uint32(1))) >> 20
    normal = np.minimum(rounded.astype(np.int64) - (120 << 3), 0x7E)  # 0x7E = 448, the largest finite
    sub = np.rint(np.minimum(a, _MIN_NORMAL) * np.float32(2.0**9)).astype(np.int64)
    code = np.where(a < _MIN_NORMAL, sub, normal).astype(np.uint8)
    return code | (np.signbit(x).astype(np.uint8) << 7)


def e4m3_to_float32(code: np.ndarray) -> np.ndarray:
    return E4M3_VALUES[code]


def encode_fp8(hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """hidden float32 [T, L, H] -> (codes uint8 [T, L, H], scale float32 [T, L]) with scale = absmax / 448
    per row (1.0 for an all-zero row, which stays exactly zero)."""
    absmax = np.abs(hidden).max(axis=-1)
    scale = np.where(absmax > 0, absmax / np.float32(FP8_MAX), np.float32(1)).astype(np.float32)
    return float32_to_e4m3(hidden / scale[..., None]), scale


def decode_fp8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return E4M3_VALUES[codes] * scale[..., None]


def encode_hidden(hidden: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 [T, L, H] -> (stored bits, fp8 scale [T, L] or None)."""
    if dtype == "fp32":
        return np.ascontiguousarray(hidden, dtype=np.float32), None
    if dtype == "bf16":
        return float32_to_bf16_bits(hidden), None
    return encode_fp8(hidden)


def decode_hidden(stored: np.ndarray, scale: np.ndarray | None, dtype: str) -> np.ndarray:
    """Stored bits -> float32 (a zero-copy view for fp32)."""
    if dtype == "fp32":
        return stored
    if dtype == "bf16":
        return bf16_bits_to_float32(stored)
    return decode_fp8(stored, scale)


def shuffle_bytes(arr: np.ndarray) -> np.ndarray:
    """Byte planes of a contiguous array, as uint8: all byte-0s of every element, then all byte-1s, ...
    For bf16 that puts the low-entropy sign/exponent bytes together, which zstd compresses far better."""
    n = arr.dtype.itemsize
    return np.ascontiguousarray(arr.reshape(-1).view(np.uint8).reshape(-1, n).T).reshape(-1)


def unshuffle_bytes(planes: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of shuffle_bytes: uint8 byte planes -> flat array of `dtype`."""
    n = np.dtype(dtype).itemsize
    return np.ascontiguousarray(planes.reshape(n, -1).T).view(dtype).reshape(-1)


def compress(arr: np.ndarray, level: int = 3) -> bytes:
    """Byte-shuffle then zstd (with zstd's own frame checksum, so a damaged frame fails to decode)."""
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cctx.compress(shuffle_bytes(arr))


def decompress(data, dtype: np.dtype, count: int) -> np.ndarray:
    """zstd frame -> flat array of `count` elements of `dtype`; raises ValueError on a damaged frame."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as e:
        raise ValueError(f"zstd frame does not decode ({e})") from None
    if len(raw) != count * np.dtype(dtype).itemsize:
        raise ValueError(f"zstd frame holds {len(raw)} bytes, expected {count * np.dtype(dtype).itemsize}")
    return unshuffle_bytes(np.frombuffer(raw, dtype=np.uint8), dtype)
