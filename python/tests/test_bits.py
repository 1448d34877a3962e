"""flashmla.bits (NumPy-only conversions) against ml_dtypes."""

import ml_dtypes
import numpy as np

from flashmla import bits


def test_bf16_round_trip_matches_ml_dtypes(rng):
    x = np.concatenate(
        [
            rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
            np.array([0.0, -0.0, 1.0, np.inf, -np.inf, 3.3895314e38, 1e-40], dtype=np.float32),
        ]
    ).astype(np.float32)
    want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(bits.float32_to_bf16(x), want)
    np.testing.assert_array_equal(bits.bf16_to_float32(want), want.view(ml_dtypes.bfloat16).astype(np.float32))
    nan_bits = bits.float32_to_bf16(np.array([np.nan], dtype=np.float32))
    assert np.isnan(bits.bf16_to_float32(nan_bits)).all()


def test_e4m3_matches_ml_dtypes(rng):
    every = np.arange(256, dtype=np.uint8)
    got = bits.e4m3_to_float32(every)
    want = every.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(want)])
    x = np.clip(rng.standard_normal(20000).astype(np.float32) * 50, -448, 448)
    x = np.concatenate([x, got[np.isfinite(got)], [0.0, -0.0, 448.0, -448.0]]).astype(np.float32)
    np.testing.assert_array_equal(bits.float32_to_e4m3(x), x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    # Midpoints between neighbours round to the even code.
    finite = np.sort(got[np.isfinite(got) & (got >= 0)])
    mids = ((finite[1:].astype(np.float64) + finite[:-1]) / 2).astype(np.float32)
    np.testing.assert_array_equal(bits.float32_to_e4m3(mids), mids.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))


def test_e4m3_saturates_and_keeps_nan():
    got = bits.float32_to_e4m3(np.array([1e6, -1e6, np.inf, np.nan], dtype=np.float32))
    assert got.tolist() == [0x7E, 0xFE, 0x7E, 0x7F]
    assert bits.e4m3_to_float32(got[:2]).tolist() == [448.0, -448.0]
