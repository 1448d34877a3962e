//! Element types and exact conversions.
//!
//! | type | bits | f32 → type | type → f32 |
//! |---|---|---|---|
//! | BF16 | 16 | round to nearest even (`half`) | exact |
//! | FP16 | 16 | round to nearest even (`half`) | exact |
//! | E4M3 (OCP E4M3FN) | 8 | round to nearest even, saturating to ±448, NaN → NaN | exact, by a 256-entry table |
//!
//! E4M3FN has bias 7, three mantissa bits, no infinities, and a single NaN pattern per sign (`0x7F`/`0xFF`).
//! The largest finite value is 448 (`0x7E`), the smallest subnormal 2⁻⁹.

use std::fmt;

/// Largest finite E4M3FN value.
pub const E4M3_MAX: f32 = 448.0;

/// Input precision of a decode problem (the dtype of `q` and the KV cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// bfloat16 inputs, bfloat16 output.
    Bf16,
    /// IEEE half inputs, half output.
    F16,
    /// FP8 E4M3FN inputs with per-tensor descales, bfloat16 output.
    E4M3,
}

impl DType {
    /// Every input dtype, in a stable order.
    pub const ALL: [DType; 3] = [DType::Bf16, DType::F16, DType::E4M3];

    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        self.scalar().size_bytes()
    }

    /// The dtype of `out` for inputs of this dtype (E4M3 in → BF16 out).
    pub const fn out_dtype(self) -> ScalarType {
        match self {
            DType::Bf16 | DType::E4M3 => ScalarType::Bf16,
            DType::F16 => ScalarType::F16,
        }
    }

    /// The same type as a [`ScalarType`].
    pub const fn scalar(self) -> ScalarType {
        match self {
            DType::Bf16 => ScalarType::Bf16,
            DType::F16 => ScalarType::F16,
            DType::E4M3 => ScalarType::E4M3,
        }
    }

    /// Short lowercase name: `bf16`, `fp16`, `e4m3`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "fp16",
            DType::E4M3 => "e4m3",
        }
    }

    /// Parses `bf16`, `fp16`/`f16`, `e4m3`/`fp8`.
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Some(DType::Bf16),
            "fp16" | "f16" | "half" | "float16" => Some(DType::F16),
            "e4m3" | "fp8" | "float8_e4m3fn" => Some(DType::E4M3),
            _ => None,
        }
    }

    /// Whether this dtype requires `descale_q` / `descale_k`.
    pub const fn needs_descale(self) -> bool {
        matches!(self, DType::E4M3)
    }

    /// Rounds an f32 to this dtype and widens it back (the value a kernel sees).
    pub fn round_trip(self, x: f32) -> f32 {
        match self {
            DType::Bf16 => bf16_to_f32(f32_to_bf16(x)),
            DType::F16 => f16_to_f32(f32_to_f16(x)),
            DType::E4M3 => e4m3_to_f32(f32_to_e4m3(x)),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Element type of any tensor crossing the API (inputs, outputs, index tensors, descales).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScalarType {
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// FP8 E4M3FN.
    E4M3,
    /// IEEE single.
    F32,
    /// 32-bit signed integer.
    I32,
}

impl ScalarType {
    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            ScalarType::E4M3 => 1,
            ScalarType::Bf16 | ScalarType::F16 => 2,
            ScalarType::F32 | ScalarType::I32 => 4,
        }
    }

    /// Short lowercase name.
    pub const fn name(self) -> &'static str {
        match self {
            ScalarType::Bf16 => "bf16",
            ScalarType::F16 => "fp16",
            ScalarType::E4M3 => "e4m3",
            ScalarType::F32 => "f32",
            ScalarType::I32 => "i32",
        }
    }

    /// The input dtype this scalar type denotes, if any.
    pub const fn as_input(self) -> Option<DType> {
        match self {
            ScalarType::Bf16 => Some(DType::Bf16),
            ScalarType::F16 => Some(DType::F16),
            ScalarType::E4M3 => Some(DType::E4M3),
            ScalarType::F32 | ScalarType::I32 => None,
        }
    }
}

impl fmt::Display for ScalarType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One FP8 E4M3FN value, stored as its bit pattern.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct E4M3(pub u8);

impl E4M3 {
    /// Quantizes with round-to-nearest-even, saturating to ±448.
    pub fn from_f32(x: f32) -> Self {
        E4M3(f32_to_e4m3(x))
    }

    /// Exact widening.
    pub fn to_f32(self) -> f32 {
        e4m3_to_f32(self.0)
    }
}

/// Bits of an f32 below its exponent field.
pub(crate) const F32_MANTISSA_BITS: u32 = f32::MANTISSA_DIGITS - 1;
/// The exponent of the smallest normal f32 (`f32::MIN_EXP` counts from a mantissa in [0.5, 1)).
const F32_MIN_NORMAL_EXP: i32 = f32::MIN_EXP - 1;
/// The f32 exponent bias.
const F32_EXP_BIAS: i32 = f32::MAX_EXP - 1;

/// `2^k`, exact for every `k` from −149 (the smallest subnormal) to 127, built from its bits. Rust does not promise
/// that `powi` is exact (its precision is documented as non-deterministic, and Miri models that), while the rounding
/// of [`f32_to_e4m3`] and the FP8 caches' UE8M0 scales need the exact power.
///
/// # Panics
/// When `2^k` is not a finite nonzero f32.
pub const fn pow2_f32(k: i32) -> f32 {
    assert!(k >= F32_MIN_NORMAL_EXP - F32_MANTISSA_BITS as i32 && k <= F32_EXP_BIAS, "2^k is not a finite nonzero f32");
    if k >= F32_MIN_NORMAL_EXP {
        f32::from_bits(((k + F32_EXP_BIAS) as u32) << F32_MANTISSA_BITS)
    } else {
        f32::from_bits(1 << (k - F32_MIN_NORMAL_EXP + F32_MANTISSA_BITS as i32))
    }
}

/// `2^k` in f64 for the normal range, exact (tests compare against it).
#[cfg(test)]
pub(crate) fn pow2_f64(k: i32) -> f64 {
    let (bias, mantissa_bits) = (f64::MAX_EXP - 1, f64::MANTISSA_DIGITS - 1);
    assert!((1 - bias..=bias).contains(&k));
    f64::from_bits(((k + bias) as u64) << mantissa_bits)
}

/// Exact bf16 → f32.
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 → bf16, round to nearest even (NaN stays NaN).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// Exact f16 → f32.
#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// f32 → f16, round to nearest even (overflow → ±inf, as IEEE).
#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

const fn e4m3_decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((code >> 3) & 0x0F) as i32;
    let man = (code & 0x07) as i32;
    if exp == 0x0F && man == 0x07 {
        return f32::NAN;
    }
    // value = man · 2^-9 for subnormals, (8 + man) · 2^(exp - 10) otherwise; both are exact in f32.
    let (int, shift) = if exp == 0 { (man, -9) } else { (8 + man, exp - 10) };
    let mut v = int as f32;
    let mut s = shift;
    while s < 0 {
        v /= 2.0;
        s += 1;
    }
    while s > 0 {
        v *= 2.0;
        s -= 1;
    }
    sign * v
}

const fn e4m3_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_decode(i as u8);
        i += 1;
    }
    t
}

/// Every E4M3FN code decoded to f32, computed at compile time.
pub static E4M3_TO_F32: [f32; 256] = e4m3_table();

/// Exact E4M3FN → f32.
#[inline]
pub fn e4m3_to_f32(code: u8) -> f32 {
    E4M3_TO_F32[code as usize]
}

/// f32 → E4M3FN: round to nearest even, saturate finite and infinite overflow to ±448, NaN → `0x7F`/`0xFF`.
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return 0x7F | sign;
    }
    let a = x.abs();
    if a >= E4M3_MAX {
        return 0x7E | sign;
    }
    // The binade exponent, with every subnormal sharing the spacing of the lowest normal binade (2^-6).
    let exp = ((a.to_bits() >> 23) & 0xFF) as i32 - 127;
    let e = exp.max(-6);
    // In units of the spacing 2^(e-3) the value lies in [8, 16) (or [0, 8) for subnormals); scaling by a power of
    // two is exact, so the only rounding is this one.
    let units = (a * pow2_f32(3 - e)).round_ties_even() as i32;
    // A carry to 16 units lands exactly on the next binade's code, so one formula covers every case.
    let code = ((e + 7) << 3) + units - 8;
    sign | code as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Independent decoder: from the definition, in f64.
    fn decode_f64(code: u8) -> f64 {
        let s = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((code >> 3) & 15) as i32;
        let m = (code & 7) as f64;
        if e == 15 && m == 7.0 {
            return f64::NAN;
        }
        if e == 0 { s * m / 8.0 * pow2_f64(-6) } else { s * (1.0 + m / 8.0) * pow2_f64(e - 7) }
    }

    /// Brute-force nearest code with ties to the even mantissa, saturating.
    fn encode_brute(x: f32) -> u8 {
        if x.is_nan() {
            return if x.is_sign_negative() { 0xFF } else { 0x7F };
        }
        let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
        let a = (x as f64).abs().min(448.0);
        let mut best = 0u8;
        let mut best_d = f64::INFINITY;
        for c in 0u8..0x7F {
            let d = (decode_f64(c) - a).abs();
            if d < best_d || (d == best_d && c % 2 == 0) {
                best = c;
                best_d = d;
            }
        }
        best | sign
    }

    #[test]
    fn pow2_f32_is_exact_over_the_whole_range() {
        assert_eq!(pow2_f32(0), 1.0);
        assert_eq!(pow2_f32(127).to_bits(), 0x7F00_0000);
        assert_eq!(pow2_f32(-126), f32::MIN_POSITIVE);
        assert_eq!(pow2_f32(-149).to_bits(), 1);
        for k in -149..127 {
            assert_eq!(pow2_f32(k + 1), 2.0 * pow2_f32(k), "k = {k}"); // doubling is exact
        }
    }

    #[test]
    fn e4m3_decode_is_exact_for_all_codes() {
        for c in 0..=255u8 {
            let want = decode_f64(c);
            let got = e4m3_to_f32(c) as f64;
            if want.is_nan() {
                assert!(got.is_nan(), "code {c:#04x}");
            } else {
                assert_eq!(got, want, "code {c:#04x}");
            }
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), pow2_f32(-9));
        assert_eq!(E4M3_TO_F32.iter().filter(|v| v.is_nan()).count(), 2);
    }

    #[test]
    fn e4m3_encode_round_trips_every_code() {
        for c in 0..=255u8 {
            let v = e4m3_to_f32(c);
            let back = f32_to_e4m3(v);
            if v.is_nan() {
                assert_eq!(back & 0x7F, 0x7F);
            } else {
                assert_eq!(back, c, "code {c:#04x} value {v}");
            }
        }
    }

    #[test]
    fn e4m3_encode_rounds_midpoints_to_even_and_saturates() {
        // Every midpoint between adjacent positive codes, and a hair either side of it.
        for c in 0u8..0x7E {
            let lo = decode_f64(c);
            let hi = decode_f64(c + 1);
            let mid = (lo + hi) / 2.0;
            let even = if c % 2 == 0 { c } else { c + 1 };
            assert_eq!(f32_to_e4m3(mid as f32), even, "midpoint after {c:#04x}");
            assert_eq!(f32_to_e4m3(-mid as f32), even | 0x80);
            let below = f32::from_bits((mid as f32).to_bits() - 1);
            let above = f32::from_bits((mid as f32).to_bits() + 1);
            assert_eq!(f32_to_e4m3(below), c);
            assert_eq!(f32_to_e4m3(above), c + 1);
        }
        for x in [448.0f32, 460.0, 464.0, 1000.0, 1e30, f32::INFINITY] {
            assert_eq!(f32_to_e4m3(x), 0x7E, "{x}");
            assert_eq!(f32_to_e4m3(-x), 0xFE, "{x}");
        }
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7F);
        assert_eq!(f32_to_e4m3(pow2_f32(-11)), 0); // below half the smallest subnormal: to zero (even)
        assert_eq!(f32_to_e4m3(-0.0), 0x80);
    }

    #[test]
    fn e4m3_encode_matches_brute_force_on_a_sweep() {
        // Every f32 bit pattern with the low 12 bits zero: about a million values over the whole range.
        for hi in 0u32..(1 << 20) {
            let x = f32::from_bits(hi << 12);
            assert_eq!(f32_to_e4m3(x), encode_brute(x), "x = {x:e} ({:#010x})", x.to_bits());
        }
    }

    #[test]
    fn sixteen_bit_conversions_round_to_nearest_even() {
        // 1 + 2^-8 is the midpoint between bf16 1.0 and its successor: ties go to the even (1.0).
        assert_eq!(f32_to_bf16(1.0 + pow2_f32(-8)), 0x3F80);
        assert_eq!(f32_to_bf16(1.0 + 3.0 * pow2_f32(-8)), 0x3F82);
        assert_eq!(bf16_to_f32(0x3F80), 1.0);
        assert_eq!(f32_to_f16(1.0 + pow2_f32(-11)), 0x3C00);
        assert_eq!(f16_to_f32(0x3C01), 1.0 + pow2_f32(-10));
        for bits in 0..=u16::MAX {
            let b = bf16_to_f32(bits);
            if !b.is_nan() {
                assert_eq!(f32_to_bf16(b), bits);
            }
            let h = f16_to_f32(bits);
            if !h.is_nan() {
                assert_eq!(f32_to_f16(h), bits);
            }
        }
    }

    #[test]
    fn dtype_rules() {
        assert_eq!(DType::E4M3.out_dtype(), ScalarType::Bf16);
        assert_eq!(DType::F16.out_dtype(), ScalarType::F16);
        assert_eq!(DType::E4M3.size_bytes(), 1);
        assert_eq!(DType::parse("FP8"), Some(DType::E4M3));
        assert_eq!(DType::parse("int8"), None);
    }
}
