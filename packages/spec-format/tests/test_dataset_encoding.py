"""Storage encodings of hidden states: fp8 e4m3 with per-row scales, byte shuffling, zstd frames.

Checked against references written independently here (nearest value by search over the code table),
and against torch's own conversions where torch is installed (it is not in the spec-format-only venv).
"""

import numpy as np
import pytest

from spec_format.dataset.encoding import (
    E4M3_VALUES,
    compress,
    decode_fp8,
    decompress,
    e4m3_to_float32,
    encode_fp8,
    float32_to_e4m3,
    shuffle_bytes,
    unshuffle_bytes,
)


def reference_e4m3(x: np.ndarray) -> np.ndarray:
    """Nearest e4m3fn code by searching the positive code values; ties to the even code; saturate at 448."""
    pos = E4M3_VALUES[:127].astype(np.float64)  # codes 0..126 ascend from 0 to 448
    a = np.minimum(np.abs(x.astype(np.float64)), 448.0)
    hi = np.clip(np.searchsorted(pos, a), 1, 126)
    lo = hi - 1
    d_lo, d_hi = a - pos[lo], pos[hi] - a
    code = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo).astype(np.uint8)
    return code | (np.signbit(x).astype(np.uint8) << 7)


def test_e4m3_table_matches_the_format():
    v = E4M3_VALUES
    assert v[0x7E] == 448 and v[0xFE] == -448  # largest finite
    assert v[0x08] == 2.0**-6 and v[0x01] == 2.0**-9  # smallest normal, smallest subnormal
    assert v[0x38] == 1.0 and v[0x39] == 1.125  # exponent bias 7, 3 mantissa bits
    assert np.isnan(v[0x7F]) and np.isnan(v[0xFF])  # fn: no infinities, one NaN code per sign
    assert v[0x80] == 0 and np.signbit(v[0x80])
    assert np.all(np.diff(v[:127]) > 0)


def test_e4m3_encodes_every_code_and_rounds_ties_to_even():
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], dtype=np.uint8)
    assert np.array_equal(float32_to_e4m3(e4m3_to_float32(codes)), codes)
    pos = E4M3_VALUES[:127]
    mid = ((pos[:-1].astype(np.float64) + pos[1:]) / 2).astype(np.float32)  # exact in float32
    got = float32_to_e4m3(mid)
    below = np.arange(126)
    assert np.array_equal(got, np.where(below % 2 == 0, below, below + 1))  # ties go to the even code
    eps = np.float32(1e-6)
    assert np.array_equal(float32_to_e4m3(mid * (1 + eps)), below + 1)
    assert np.array_equal(float32_to_e4m3(mid * (1 - eps)), below)


def test_e4m3_saturates_and_handles_subnormals():
    x = np.array(
        [448, 460, 464, 1e4, 3e38, -1e9, 2.0**-10, 2.0**-10 * 1.01, 3 * 2.0**-10, 1e-12, -0.0], np.float32
    )
    got = e4m3_to_float32(float32_to_e4m3(x))
    assert got.tolist() == [448, 448, 448, 448, 448, -448, 0, 2.0**-9, 2 * 2.0**-9, 0, 0]


def test_e4m3_random_values_match_reference():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000).astype(np.float32) * s for s in (1e-3, 0.1, 10, 300)])
    assert np.array_equal(float32_to_e4m3(x), reference_e4m3(x))


def test_e4m3_and_bf16_match_torch():
    torch = pytest.importorskip("torch")
    from spec_format.tensors import float32_to_bf16_bits

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(100_000).astype(np.float32) * s for s in (1e-3, 1, 400)])
    x = np.clip(x, -448, 448)  # torch turns out-of-range values into NaN instead of saturating
    want = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(float32_to_e4m3(x), want)
    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(E4M3_VALUES, table, equal_nan=True)
    y = rng.standard_normal(100_000).astype(np.float32) * 3e4
    assert np.array_equal(
        float32_to_bf16_bits(y), torch.from_numpy(y).to(torch.bfloat16).view(torch.uint16).numpy()
    )


def test_fp8_row_scale_keeps_outliers_and_small_values():
    rng = np.random.default_rng(2)
    h = rng.standard_normal((64, 3, 96)).astype(np.float32)
    h[:, 1, 7] = 25_000.0  # a massive-activation channel in one layer
    h[5] = 0.0  # an all-zero token stays exactly zero
    codes, scale = encode_fp8(h)
    assert codes.dtype == np.uint8 and codes.shape == h.shape and scale.shape == (64, 3)
    back = decode_fp8(codes, scale)
    assert np.all(back[5] == 0)
    np.testing.assert_allclose(np.delete(back[:, 1, 7], 5), 25_000.0, rtol=1e-6)
    # e4m3 keeps 3 mantissa bits: half a step is 2^-4 relative; subnormals are spaced 2^-9 * scale
    bound = np.maximum(np.abs(h) * 2.0**-4, 2.0**-10 * scale[..., None]) * (1 + 1e-5)
    assert np.all(np.abs(back - h) <= bound)
    # a row without outliers: the scale adapts to it, rel. L2 error of e4m3 is a few percent
    rel = np.linalg.norm(back[:, 0] - h[:, 0]) / np.linalg.norm(h[:, 0])
    assert 0.005 < rel < 0.04


@pytest.mark.parametrize("dtype", ["<u2", "<f4", "|u1"])
def test_byte_shuffle_and_zstd_round_trip(dtype):
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 255, size=(7, 3, 5)).astype(dtype)
    planes = shuffle_bytes(arr)
    n = arr.dtype.itemsize
    assert planes.dtype == np.uint8 and planes.size == arr.nbytes
    assert np.array_equal(planes[: arr.size], arr.reshape(-1).view(np.uint8)[::n])  # first plane: byte 0s
    assert np.array_equal(unshuffle_bytes(planes, arr.dtype), arr.reshape(-1))
    frame = compress(arr)
    assert np.array_equal(decompress(frame, arr.dtype, arr.size), arr.reshape(-1))
    damaged = bytearray(frame)
    damaged[len(damaged) // 2] ^= 0xFF
    with pytest.raises(ValueError):
        decompress(bytes(damaged), arr.dtype, arr.size)
