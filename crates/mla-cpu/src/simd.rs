//! The two inner loops of the decode, once in plain scalar code and once in AVX2+FMA(+F16C), with one logical
//! arithmetic order so that both produce bitwise identical results.
//!
//! | loop | shape | logical order (identical in every path) |
//! |---|---|---|
//! | `qk` | `S[r, j] = q_r · k_j`, 576 long | 8 lane accumulators: `acc[l] = fma(q[8c+l], k[8c+l], acc[l])` for `c = 0..72` in order, then the tree `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))` |
//! | `pv` | `O[r, d] = O[r, d]·f_r + Σ_j P[r, j]·v_j[d]` | `O·f` first, then one `fma(P[r, j], v_j[d], ·)` per key `j`, in key order |
//!
//! Every product is a correctly rounded fused multiply-add (`f32::mul_add` in the scalar path, `vfmadd` in the
//! vector path), so the two paths agree to the bit; the accumulation order depends on neither the thread count nor
//! the instruction set.
//!
//! Cache elements are widened in registers, never copied: bf16 by a 16-bit shift, fp16 by `vcvtph2ps` (exact),
//! e4m3 by a shift into fp16 bits and `vcvtph2ps`. That last step yields the e4m3 value times 2⁻⁸ (exactly, for
//! normals and subnormals; the NaN code is patched), so for e4m3 the K/V elements are in units of
//! [`E4M3_KV_UNIT`] in every path, scalar included, and the kernel folds 2⁸ back into its scales (a power of two:
//! the results are the same bits as without the scaling, barring sub-2⁻¹²⁶ underflow). Cross-checked against the
//! [`mla_core::dtype::E4M3_TO_F32`] table.

use mla_core::dtype::{E4M3_TO_F32, bf16_to_f32, f16_to_f32};
use mla_core::{DType, HEAD_DIM_K, HEAD_DIM_V};

/// Logical accumulator lanes of the 576-long dot products.
pub const LANES: usize = 8;
/// Row stride of the score / probability tile (one scheduler block of keys).
pub const S_STRIDE: usize = mla_core::scheduler::BLOCK_SIZE_N;

/// The instruction set the compute kernels run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable scalar code (the golden path; slow where the CPU lacks hardware FMA).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C, 8 f32 lanes.
    Avx2,
}

impl Isa {
    /// The fastest instruction set this CPU supports (runtime detection; nothing is fixed at build time).
    pub fn detect() -> Isa {
        if Isa::Avx2.is_available() { Isa::Avx2 } else { Isa::Scalar }
    }

    /// Can this instruction set run on this CPU?
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                // pulp's x86-64-v3 token covers AVX2, FMA, BMI and friends; F16C is not part of it.
                pulp::x86::V3::is_available() && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 => false,
        }
    }

    /// Short name (`scalar`, `avx2`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2+fma+f16c",
        }
    }
}

/// e4m3 K/V elements are widened to `value · E4M3_KV_UNIT` (see the module docs).
pub const E4M3_KV_UNIT: f32 = 1.0 / 256.0;

/// Element encodings, as const-generic tags so that each kernel is compiled once per dtype.
pub(crate) const DT_BF16: u8 = 0;
pub(crate) const DT_F16: u8 = 1;
pub(crate) const DT_E4M3: u8 = 2;
/// e4m3 for a block known to hold no NaN code (AVX2 path only): the widening skips the NaN patch.
pub(crate) const DT_E4M3_FINITE: u8 = 3;

pub(crate) fn dt_tag(d: DType) -> u8 {
    match d {
        DType::Bf16 => DT_BF16,
        DType::F16 => DT_F16,
        DType::E4M3 => DT_E4M3,
    }
}

const fn elt_bytes(dt: u8) -> usize {
    if dt >= DT_E4M3 { 1 } else { 2 }
}

/// Widens element `i` of a row (scalar path, exact).
///
/// # Safety
/// `row` must point at a readable row of at least `i + 1` elements of encoding `DT`.
#[inline(always)]
pub(crate) unsafe fn widen1<const DT: u8>(row: *const u8, i: usize) -> f32 {
    // SAFETY: the caller guarantees element `i` is readable; unaligned reads are used for 16-bit elements because
    // a strided cache row need not be 2-byte aligned.
    unsafe {
        match DT {
            DT_BF16 => bf16_to_f32(row.add(2 * i).cast::<u16>().read_unaligned()),
            DT_F16 => f16_to_f32(row.add(2 * i).cast::<u16>().read_unaligned()),
            _ => E4M3_TO_F32[row.add(i).read() as usize],
        }
    }
}

/// Widens K/V element `i` of a row as the kernels see it (scalar path): exact, e4m3 in units of [`E4M3_KV_UNIT`].
///
/// # Safety
/// As [`widen1`].
#[inline(always)]
unsafe fn widen1_kv<const DT: u8>(row: *const u8, i: usize) -> f32 {
    // SAFETY: forwarded from the caller.
    let v = unsafe { widen1::<DT>(row, i) };
    if DT == DT_E4M3 { v * E4M3_KV_UNIT } else { v }
}

/// Widens a row of `out.len()` elements into f32 (used for the few query rows only).
///
/// # Safety
/// `row` must point at `out.len()` readable elements of dtype `dt`.
pub(crate) unsafe fn widen_row(dt: DType, row: *const u8, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        // SAFETY: i < out.len(), which the caller guarantees is readable.
        *o = unsafe {
            match dt {
                DType::Bf16 => widen1::<DT_BF16>(row, i),
                DType::F16 => widen1::<DT_F16>(row, i),
                DType::E4M3 => widen1::<DT_E4M3>(row, i),
            }
        };
    }
}

/// Cache lines (64 bytes) spanned by the `bytes` bytes at `r`: a row need not start on a line (a cache buffer
/// from `malloc` is 16-byte aligned), and its last line must be fetched too.
#[inline(always)]
pub(crate) fn row_lines(r: *const u8, bytes: usize) -> usize {
    ((r as usize & 63) + bytes).div_ceil(64)
}

/// Prefetches line `l` (0-based, 64-byte lines from the one holding `r`) of the row at `r`: into L1 (`T0`) for rows
/// needed within a few key tiles, into L2 (`T1`) for rows a whole block ahead. No effect on results; a no-op off
/// x86-64.
#[inline(always)]
pub(crate) fn prefetch_line<const L1: bool>(r: *const u8, l: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};
        let p = r.wrapping_sub(r as usize & 63).wrapping_add(64 * l).cast();
        // SAFETY: prefetch never faults, whatever the address; `wrapping_*` keeps the arithmetic defined.
        unsafe { if L1 { _mm_prefetch::<_MM_HINT_T0>(p) } else { _mm_prefetch::<_MM_HINT_T1>(p) } };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (r, l);
}

/// The fixed reduction tree of the 8 lane accumulators.
#[inline(always)]
fn tree8(a: [f32; LANES]) -> f32 {
    let h = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let q = [h[0] + h[2], h[1] + h[3]];
    q[0] + q[1]
}

/// The query rows of one unit, widened once, in the forms the kernels need.
pub(crate) struct QueryRows {
    /// `m` rows of 576 f32 (stride 576).
    pub(crate) q: Vec<f32>,
    /// `q · 2^112` for the AVX2 e4m3 path on NaN-free blocks (empty otherwise): scaled once per unit, not per call.
    q_hi: Vec<f32>,
}

impl QueryRows {
    /// Wraps widened query rows for kernels of `isa` on `dt` caches.
    pub(crate) fn new(isa: Isa, dt: DType, q: Vec<f32>) -> Self {
        let q_hi = if isa == Isa::Avx2 && dt == DType::E4M3 {
            q.iter().map(|&x| x * E4M3_FINITE_QP_SCALE).collect()
        } else {
            Vec::new()
        };
        QueryRows { q, q_hi }
    }
}

/// The e4m3 AVX2 path widens NaN-free K/V blocks to value·2^-120 instead of value·2^-8 (= [`E4M3_KV_UNIT`]): the
/// other factor of each product (Q, P) is scaled by 2^112, exactly (|Q| <= 448, P <= 1).
const E4M3_FINITE_QP_SCALE: f32 = 5_192_296_858_534_827_628_530_496_329_220_096.0; // 2^112

/// Rows to prefetch while a kernel runs, their length in bytes, and the cache level (L1 for rows needed within a
/// few key tiles, L2 for rows a block ahead).
#[derive(Clone, Copy)]
pub(crate) struct Prefetch<'a> {
    pub(crate) rows: &'a [*const u8],
    pub(crate) bytes: usize,
    pub(crate) l1: bool,
}

impl Prefetch<'_> {
    /// No prefetch.
    pub(crate) const NONE: Prefetch<'static> = Prefetch { rows: &[], bytes: 0, l1: false };

    /// Prefetches line `l` of row `r`.
    #[inline(always)]
    fn line(&self, r: *const u8, l: usize) {
        if self.l1 { prefetch_line::<true>(r, l) } else { prefetch_line::<false>(r, l) }
    }

    /// Every line of row `r`.
    #[inline(always)]
    fn row(&self, r: *const u8) {
        for l in 0..row_lines(r, self.bytes) {
            self.line(r, l);
        }
    }

    /// Share `t` of `parts` of the rows (for spreading them over a loop), at once.
    #[inline(always)]
    fn part(&self, t: usize, parts: usize) {
        let n = self.rows.len();
        for &r in &self.rows[t * n / parts..(t + 1) * n / parts] {
            self.row(r);
        }
    }

    /// Every line of the rows, at once.
    pub(crate) fn all(&self) {
        for &r in self.rows {
            self.row(r);
        }
    }
}

/// Scores of up to one block of keys: `s[r·S_STRIDE + j] = q_r · k_j` (unscaled) for `r < m`, `j < keys.len()`.
/// The rows of `prefetch` are prefetched a share per key tile, so that their loads overlap this call's arithmetic
/// (`pv` spreads its `prefetch` rows over its column tiles in the same way).
///
/// Returns true when it found that the rows hold no e4m3 NaN code (AVX2 e4m3 only; false means "not known"): `pv`
/// on the same rows can then skip its own scan.
///
/// # Safety
/// Every `keys[j]` points at a readable K row of 576 elements of dtype `dt`; `q.q.len() >= m·576`,
/// `s.len() >= m·S_STRIDE`, `keys.len() <= S_STRIDE`.
pub(crate) unsafe fn qk(
    isa: Isa,
    dt: DType,
    q: &QueryRows,
    m: usize,
    keys: &[*const u8],
    s: &mut [f32],
    prefetch: Prefetch,
) -> bool {
    assert!(q.q.len() >= m * HEAD_DIM_K && s.len() >= m * S_STRIDE && keys.len() <= S_STRIDE);
    if isa == Isa::Scalar || keys.is_empty() {
        prefetch.all();
    }
    match isa {
        // SAFETY: forwarded from the caller.
        Isa::Scalar => unsafe {
            match dt_tag(dt) {
                DT_BF16 => qk_scalar::<DT_BF16>(&q.q, m, keys, s),
                DT_F16 => qk_scalar::<DT_F16>(&q.q, m, keys, s),
                _ => qk_scalar::<DT_E4M3>(&q.q, m, keys, s),
            }
            false
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Isa::Avx2` value only reaches here from a backend that checked `Isa::is_available` (see
        // `CpuBackend::with_options`); the pointer contract is forwarded from the caller.
        Isa::Avx2 => unsafe { avx2::qk(dt, q, m, keys, s, prefetch) },
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 => unreachable!("AVX2 is never selected off x86-64"),
    }
}

/// `o[r] = o[r]·factor[r] + Σ_j p[r·S_STRIDE + j]·v_j` for `r < m`, where `v_j` is the first 512 elements of
/// `keys[j]`.
///
/// # Safety
/// As [`qk`]; `o.len() >= m·512`, `factor.len() >= m`, `p.len() >= m·S_STRIDE`. `p` is scratch: the AVX2 e4m3
/// path scales its first `keys.len()` columns in place. `nan_free`: what [`qk`] returned for the same rows (true
/// only if they hold no e4m3 NaN code).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pv(
    isa: Isa,
    dt: DType,
    p: &mut [f32],
    m: usize,
    keys: &[*const u8],
    factor: &[f32],
    o: &mut [f32],
    prefetch: Prefetch,
    nan_free: bool,
) {
    assert!(o.len() >= m * HEAD_DIM_V && p.len() >= m * S_STRIDE && factor.len() >= m && keys.len() <= S_STRIDE);
    if isa == Isa::Scalar {
        prefetch.all();
    }
    match isa {
        // SAFETY: forwarded from the caller.
        Isa::Scalar => unsafe {
            match dt_tag(dt) {
                DT_BF16 => pv_scalar::<DT_BF16>(p, m, keys, factor, o),
                DT_F16 => pv_scalar::<DT_F16>(p, m, keys, factor, o),
                _ => pv_scalar::<DT_E4M3>(p, m, keys, factor, o),
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `qk`.
        Isa::Avx2 => unsafe { avx2::pv(dt, p, m, keys, factor, o, prefetch, nan_free) },
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 => unreachable!("AVX2 is never selected off x86-64"),
    }
}

/// # Safety
/// See [`qk`].
unsafe fn qk_scalar<const DT: u8>(q: &[f32], m: usize, keys: &[*const u8], s: &mut [f32]) {
    for r in 0..m {
        let qr = &q[r * HEAD_DIM_K..(r + 1) * HEAD_DIM_K];
        for (j, &k) in keys.iter().enumerate() {
            let mut acc = [0f32; LANES];
            for c in 0..HEAD_DIM_K / LANES {
                for (l, a) in acc.iter_mut().enumerate() {
                    let i = c * LANES + l;
                    // SAFETY: i < 576 and the caller guarantees 576 readable elements.
                    let kv = unsafe { widen1_kv::<DT>(k, i) };
                    *a = qr[i].mul_add(kv, *a);
                }
            }
            s[r * S_STRIDE + j] = tree8(acc);
        }
    }
}

/// # Safety
/// See [`pv`].
unsafe fn pv_scalar<const DT: u8>(p: &[f32], m: usize, keys: &[*const u8], factor: &[f32], o: &mut [f32]) {
    for r in 0..m {
        let or = &mut o[r * HEAD_DIM_V..(r + 1) * HEAD_DIM_V];
        let f = factor[r];
        or.iter_mut().for_each(|x| *x *= f);
        for (j, &k) in keys.iter().enumerate() {
            let pj = p[r * S_STRIDE + j];
            for (d, x) in or.iter_mut().enumerate() {
                // SAFETY: d < 512 < 576, readable by the caller's guarantee.
                let v = unsafe { widen1_kv::<DT>(k, d) };
                *x = pj.mul_add(v, *x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2 path. Register tiles: `qk` keeps 6 query rows × 2 keys of 8-lane accumulators (12 of the 16 ymm
    //! registers; 1 × 8 … 4 × 3 when M is small; 12 rows × 1 key for e4m3, whose widening is the expensive part),
    //! so each widened K chunk feeds 6 (12) FMAs; `pv` keeps 6 rows × 16 output columns (1 row × 64 columns when M
    //! is small; 12 rows × 8 columns with pre-broadcast probabilities for e4m3) and streams the block's V rows
    //! through them.

    use std::arch::x86_64::*;

    use super::{
        DT_BF16, DT_E4M3, DT_E4M3_FINITE, DT_F16, E4M3_FINITE_QP_SCALE, HEAD_DIM_K, HEAD_DIM_V, LANES, Prefetch,
        QueryRows, S_STRIDE, dt_tag, elt_bytes,
    };
    use mla_core::DType;

    const QK_ROWS: usize = 6;
    const PV_ROWS: usize = 6;

    /// Eight elements starting at `p`, widened to f32.
    ///
    /// # Safety
    /// `p` must point at 8 readable elements of encoding `DT`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen8<const DT: u8>(p: *const u8) -> __m256 {
        match DT {
            DT_BF16 => {
                // SAFETY: 16 readable bytes (8 × bf16); loadu has no alignment requirement.
                let h = unsafe { _mm_loadu_si128(p.cast()) };
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            DT_F16 => {
                // SAFETY: 16 readable bytes (8 × fp16).
                let h = unsafe { _mm_loadu_si128(p.cast()) };
                _mm256_cvtph_ps(h)
            }
            DT_E4M3_FINITE => {
                // No NaN code among these (checked by the caller): straight to f32 bits. Sign-extend each code to 32
                // bits and shift by 20: the 7 magnitude bits land on the low 4 exponent bits and the top 3 mantissa
                // bits (value · 2^-120, e4m3 subnormals as f32 subnormals, exactly); keep them and the sign (bit 31).
                // SAFETY: 8 readable bytes (8 × e4m3).
                let b = unsafe { _mm_loadl_epi64(p.cast()) };
                let y = _mm256_slli_epi32::<20>(_mm256_cvtepi8_epi32(b));
                _mm256_castsi256_ps(_mm256_and_si256(y, _mm256_set1_epi32(0x87F0_0000_u32 as i32)))
            }
            _ => {
                // SAFETY: 8 readable bytes (8 × e4m3); loadl reads exactly 8 bytes, unaligned.
                let b = unsafe { _mm_loadl_epi64(p.cast()) };
                // Sign-extend each code to 16 bits and shift by 7: the 7 magnitude bits land on the fp16 exponent and
                // mantissa (value · 2^-8, subnormals included), the sign on bit 15; bit 14 (set only by the sign
                // extension of negative codes) is cleared.
                let y = _mm_and_si128(_mm_slli_epi16::<7>(_mm_cvtepi8_epi16(b)), _mm_set1_epi16(0xBFFF_u16 as i16));
                // The NaN code (magnitude 0x7F) would read as 1.875·2^-8·2^8: turn it into an fp16 NaN.
                let nan = _mm_cmpeq_epi16(_mm_and_si128(y, _mm_set1_epi16(0x7FFF)), _mm_set1_epi16(0x3F80));
                _mm256_cvtph_ps(_mm_or_si128(y, nan))
            }
        }
    }

    /// Does any of the first `bytes` bytes (a multiple of 32) of any row hold an e4m3 NaN code (0x7F / 0xFF)?
    /// An add and an unsigned max per 32 codes: doubling a code drops its sign bit, so the NaN codes become 0xFE
    /// and every other code at most 0xFC. Far cheaper than patching NaN in every widened chunk, which a block
    /// without NaN (the norm) then skips.
    ///
    /// # Safety
    /// Every row has `bytes` readable bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn e4m3_any_nan(rows: &[*const u8], bytes: usize) -> bool {
        let mut max = _mm256_setzero_si256();
        for &r in rows {
            for off in (0..bytes).step_by(32) {
                // SAFETY: off + 32 <= bytes readable bytes of the row.
                let x = unsafe { _mm256_loadu_si256(r.add(off).cast()) };
                max = _mm256_max_epu8(max, _mm256_add_epi8(x, x));
            }
        }
        let nan = _mm256_cmpeq_epi8(max, _mm256_set1_epi8(0xFEu8 as i8));
        _mm256_testz_si256(nan, nan) == 0
    }

    /// The fixed tree of [`super::tree8`], on a vector.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v)); // lanes l + (l+4)
        let q = _mm_add_ps(h, _mm_movehl_ps(h, h)); // lanes 0: h0+h2, 1: h1+h3
        _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps::<0b01>(q, q))) // q0 + q1
    }

    /// `R × C` dot products of 576.
    ///
    /// # Safety
    /// `q` points at `R` rows of 576 f32 (stride 576), every `keys[k]` at 576 readable elements, `s` at `R` rows of
    /// at least `C` floats (stride `S_STRIDE`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn qk_tile<const DT: u8, const R: usize, const C: usize>(q: *const f32, keys: &[*const u8], s: *mut f32) {
        let e = elt_bytes(DT);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for c in 0..HEAD_DIM_K / LANES {
            // Each accumulator takes one FMA per chunk whatever the loop order, so the order only decides what is
            // live: the R·C accumulators and either the C widened keys and one Q chunk, or the R Q chunks and one
            // widened key, whichever is fewer (more than the 16 ymm registers spills accumulators to the stack).
            if R < C {
                // SAFETY: row r < R of q has 576 floats.
                let qv: [__m256; R] =
                    std::array::from_fn(|r| unsafe { _mm256_loadu_ps(q.add(r * HEAD_DIM_K + c * LANES)) });
                for k in 0..C {
                    // SAFETY: c·8 + 8 <= 576 elements of key row k.
                    let kv = unsafe { widen8::<DT>(keys[k].add(c * LANES * e)) };
                    for (acc_r, qr) in acc.iter_mut().zip(&qv) {
                        acc_r[k] = _mm256_fmadd_ps(*qr, kv, acc_r[k]);
                    }
                }
            } else {
                // SAFETY: c·8 + 8 <= 576 elements of key row k.
                let kv: [__m256; C] = std::array::from_fn(|k| unsafe { widen8::<DT>(keys[k].add(c * LANES * e)) });
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    // SAFETY: row r < R of q has 576 floats.
                    let qv = unsafe { _mm256_loadu_ps(q.add(r * HEAD_DIM_K + c * LANES)) };
                    for k in 0..C {
                        acc_r[k] = _mm256_fmadd_ps(qv, kv[k], acc_r[k]);
                    }
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (k, a) in acc_r.iter().enumerate() {
                // SAFETY: r < R rows, k < C columns of s.
                unsafe { *s.add(r * S_STRIDE + k) = hsum(*a) };
            }
        }
    }

    /// Keys per `qk` tile for a tile of `rows` query rows of dtype `dt`: at most 12 accumulators, fewer rows →
    /// more keys, so that even a single query row keeps 8 independent FMA chains in flight. The finite e4m3
    /// widening keeps its mask in a register, so its 3- and 4-row tiles take fewer keys: 12 accumulators + 3 + 1
    /// live values + the mask would be 17 of the 16 ymm registers and spill (a tile does 1/keys Q loads and 1/rows
    /// widenings per FMA, so only the cheap Q loads rise).
    const fn qk_keys(dt: u8, rows: usize) -> usize {
        match rows {
            1 => 8,
            2 => 6,
            3 if dt == DT_E4M3_FINITE => 3,
            3 => 4,
            4 if dt == DT_E4M3_FINITE => 2,
            4 => 3,
            5 | 6 => 2,
            _ => 1,
        }
    }

    /// # Safety
    /// See [`super::qk`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn qk_dt<const DT: u8>(q: &[f32], m: usize, keys: &[*const u8], s: &mut [f32], prefetch: Prefetch) {
        let n = keys.len();
        // e4m3 widening costs 4-8 uops per 8 elements: reuse each widened K chunk for up to 12 query rows.
        let max_rows = if DT >= DT_E4M3 { 12 } else { QK_ROWS };
        // During the first row tile, each key tile also prefetches its share of the next block.
        let share = prefetch.rows.len().div_ceil(n.max(1));
        let mut r0 = 0;
        while r0 < m {
            let rows = (m - r0).min(max_rows);
            let qp = q[r0 * HEAD_DIM_K..].as_ptr();
            let mut j0 = 0;
            while j0 < n {
                let cols = (n - j0).min(qk_keys(DT, rows));
                let sp = s[r0 * S_STRIDE + j0..].as_mut_ptr();
                let kk = &keys[j0..j0 + cols];
                if r0 == 0 {
                    let from = (j0 * share).min(prefetch.rows.len());
                    let to = ((j0 + cols) * share).min(prefetch.rows.len());
                    Prefetch { rows: &prefetch.rows[from..to], ..prefetch }.all();
                }
                macro_rules! tiles {
                    ($r:literal: $($c:literal)*) => {
                        match cols {
                            $($c => qk_tile::<DT, $r, $c>(qp, kk, sp),)*
                            _ => unreachable!("cols <= qk_keys(DT, rows)"),
                        }
                    };
                }
                // SAFETY: rows/cols bound the tile inside q, keys and s (asserted sizes in `super::qk`).
                unsafe {
                    match rows {
                        12 => tiles!(12: 1),
                        11 => tiles!(11: 1),
                        10 => tiles!(10: 1),
                        9 => tiles!(9: 1),
                        8 => tiles!(8: 1),
                        7 => tiles!(7: 1),
                        6 => tiles!(6: 1 2),
                        5 => tiles!(5: 1 2),
                        4 => tiles!(4: 1 2 3),
                        3 => tiles!(3: 1 2 3 4),
                        2 => tiles!(2: 1 2 3 4 5 6),
                        _ => tiles!(1: 1 2 3 4 5 6 7 8),
                    }
                }
                j0 += cols;
            }
            r0 += rows;
        }
    }

    /// # Safety
    /// The CPU supports AVX2, FMA and F16C; otherwise as [`super::qk`].
    pub(super) unsafe fn qk(
        dt: DType,
        q: &QueryRows,
        m: usize,
        keys: &[*const u8],
        s: &mut [f32],
        prefetch: Prefetch,
    ) -> bool {
        // SAFETY: CPU features and pointer contract from the caller.
        unsafe {
            match dt_tag(dt) {
                DT_BF16 => qk_dt::<DT_BF16>(&q.q, m, keys, s, prefetch),
                DT_F16 => qk_dt::<DT_F16>(&q.q, m, keys, s, prefetch),
                _ if e4m3_any_nan(keys, HEAD_DIM_K) => qk_dt::<DT_E4M3>(&q.q, m, keys, s, prefetch),
                _ => {
                    // K is widened to value·2^-120 here: Q·2^112 keeps every product the same real number as in the
                    // other paths (value·2^-8), so the same bits.
                    qk_dt::<DT_E4M3_FINITE>(&q.q_hi, m, keys, s, prefetch);
                    return true;
                }
            }
        }
        false
    }

    /// `R` output rows × `8·W` columns starting at column `d0`.
    ///
    /// # Safety
    /// `o` points at `R` rows of 512 f32, `p` at `R` rows (stride `S_STRIDE`) of `keys.len()` floats, every key at
    /// 512 readable elements, `f` at `R` floats; `d0 + 8·W <= 512`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pv_tile<const DT: u8, const R: usize, const W: usize>(
        p: *const f32,
        keys: &[*const u8],
        f: *const f32,
        o: *mut f32,
        d0: usize,
    ) {
        let e = elt_bytes(DT);
        let mut acc = [[_mm256_setzero_ps(); W]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            // SAFETY: r < R rows of o and f; columns d0..d0+8W <= 512.
            unsafe {
                let fr = _mm256_set1_ps(*f.add(r));
                for (w, x) in a.iter_mut().enumerate() {
                    *x = _mm256_mul_ps(_mm256_loadu_ps(o.add(r * HEAD_DIM_V + d0 + 8 * w)), fr);
                }
            }
        }
        let mut v = [_mm256_setzero_ps(); W];
        for (j, &k) in keys.iter().enumerate() {
            for (w, x) in v.iter_mut().enumerate() {
                // SAFETY: columns d0..d0+8W of a V row of 512.
                *x = unsafe { widen8::<DT>(k.add((d0 + 8 * w) * e)) };
            }
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: p has R rows of at least keys.len() floats.
                let pr = unsafe { _mm256_broadcast_ss(&*p.add(r * S_STRIDE + j)) };
                for (x, vw) in a.iter_mut().zip(&v) {
                    *x = _mm256_fmadd_ps(pr, *vw, *x);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (w, x) in a.iter().enumerate() {
                // SAFETY: as for the loads above.
                unsafe { _mm256_storeu_ps(o.add(r * HEAD_DIM_V + d0 + 8 * w), *x) };
            }
        }
    }

    /// Rows of the e4m3 `pv` tile: one widened V chunk feeds 12 FMAs.
    const PV_ROWS_E4M3: usize = 12;

    /// `R` output rows × 8 columns starting at `d0`, with the probabilities pre-broadcast (`pb`, stride `S_STRIDE`
    /// vectors per row) so that they enter the FMAs as memory operands.
    ///
    /// # Safety
    /// As [`pv_tile`], with `pb` holding `R` rows of `keys.len()` vectors.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pv_tile_narrow<const DT: u8, const R: usize>(
        pb: *const __m256,
        keys: &[*const u8],
        f: *const f32,
        o: *mut f32,
        d0: usize,
    ) {
        let e = elt_bytes(DT);
        let mut acc = [_mm256_setzero_ps(); R];
        for (r, a) in acc.iter_mut().enumerate() {
            // SAFETY: r < R rows of o and f; columns d0..d0+8 <= 512.
            unsafe { *a = _mm256_mul_ps(_mm256_loadu_ps(o.add(r * HEAD_DIM_V + d0)), _mm256_set1_ps(*f.add(r))) };
        }
        for (j, &k) in keys.iter().enumerate() {
            // SAFETY: columns d0..d0+8 of a V row of 512.
            let v = unsafe { widen8::<DT>(k.add(d0 * e)) };
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: pb has R rows of at least keys.len() vectors.
                *a = _mm256_fmadd_ps(unsafe { *pb.add(r * S_STRIDE + j) }, v, *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: as for the loads above.
            unsafe { _mm256_storeu_ps(o.add(r * HEAD_DIM_V + d0), *a) };
        }
    }

    /// The e4m3 `pv`: tall, narrow tiles (see [`PV_ROWS_E4M3`]).
    ///
    /// # Safety
    /// See [`super::pv`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pv_e4m3<const DT: u8>(
        p: &[f32],
        m: usize,
        keys: &[*const u8],
        factor: &[f32],
        o: &mut [f32],
        pf: Prefetch,
    ) {
        let n = keys.len();
        if m < 7 {
            // Short tiles only (all of a small M): the wide tiles, and no 24 KiB broadcast buffer to set up.
            // SAFETY: forwarded.
            return unsafe { pv_dt::<DT>(p, m, keys, factor, o, pf) };
        }
        pf.all();
        let mut pb = [_mm256_setzero_ps(); PV_ROWS_E4M3 * S_STRIDE];
        let mut r0 = 0;
        while r0 < m {
            let rows = (m - r0).min(PV_ROWS_E4M3);
            if rows < 7 {
                // Short remainders: the wide tiles.
                // SAFETY: forwarded; the sub-slices start at row r0.
                unsafe {
                    let (pr, fr, or) = (&p[r0 * S_STRIDE..], &factor[r0..], &mut o[r0 * HEAD_DIM_V..]);
                    pv_dt::<DT>(pr, rows, keys, fr, or, Prefetch { rows: &[], ..pf })
                };
                break;
            }
            for r in 0..rows {
                for j in 0..n {
                    pb[r * S_STRIDE + j] = _mm256_set1_ps(p[(r0 + r) * S_STRIDE + j]);
                }
            }
            let (pp, fp, op) = (pb.as_ptr(), factor[r0..].as_ptr(), o[r0 * HEAD_DIM_V..].as_mut_ptr());
            for d0 in (0..HEAD_DIM_V).step_by(8) {
                // SAFETY: rows bound the tile inside pb, factor and o; d0 + 8 <= 512.
                unsafe {
                    match rows {
                        12 => pv_tile_narrow::<DT, 12>(pp, keys, fp, op, d0),
                        11 => pv_tile_narrow::<DT, 11>(pp, keys, fp, op, d0),
                        10 => pv_tile_narrow::<DT, 10>(pp, keys, fp, op, d0),
                        9 => pv_tile_narrow::<DT, 9>(pp, keys, fp, op, d0),
                        8 => pv_tile_narrow::<DT, 8>(pp, keys, fp, op, d0),
                        _ => pv_tile_narrow::<DT, 7>(pp, keys, fp, op, d0),
                    }
                }
            }
            r0 += rows;
        }
    }

    /// # Safety
    /// See [`super::pv`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pv_dt<const DT: u8>(
        p: &[f32],
        m: usize,
        keys: &[*const u8],
        factor: &[f32],
        o: &mut [f32],
        pf: Prefetch,
    ) {
        let mut r0 = 0;
        while r0 < m {
            let rows = (m - r0).min(PV_ROWS);
            let pp = p[r0 * S_STRIDE..].as_ptr();
            let fp = factor[r0..].as_ptr();
            let op = o[r0 * HEAD_DIM_V..].as_mut_ptr();
            // Columns per tile: 8 (or 12) accumulators whatever the row count; every width divides 512.
            let cols = match rows {
                4..=6 => 16,
                3 | 2 => 32,
                _ => 64,
            };
            for d0 in (0..HEAD_DIM_V).step_by(cols) {
                if r0 == 0 {
                    // The prefetch rows, spread over the first row tile's column tiles.
                    pf.part(d0 / cols, HEAD_DIM_V / cols);
                }
                // SAFETY: rows bound the tile inside p, factor and o (asserted sizes in `super::pv`); d0 + cols <= 512.
                unsafe {
                    match rows {
                        6 => pv_tile::<DT, 6, 2>(pp, keys, fp, op, d0),
                        5 => pv_tile::<DT, 5, 2>(pp, keys, fp, op, d0),
                        4 => pv_tile::<DT, 4, 2>(pp, keys, fp, op, d0),
                        3 => pv_tile::<DT, 3, 4>(pp, keys, fp, op, d0),
                        2 => pv_tile::<DT, 2, 4>(pp, keys, fp, op, d0),
                        _ => pv_tile::<DT, 1, 8>(pp, keys, fp, op, d0),
                    }
                }
            }
            r0 += rows;
        }
    }

    /// # Safety
    /// The CPU supports AVX2, FMA and F16C; otherwise as [`super::pv`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pv(
        dt: DType,
        p: &mut [f32],
        m: usize,
        keys: &[*const u8],
        factor: &[f32],
        o: &mut [f32],
        pf: Prefetch,
        nan_free: bool,
    ) {
        // SAFETY: CPU features and pointer contract from the caller.
        unsafe {
            match dt_tag(dt) {
                DT_BF16 => pv_dt::<DT_BF16>(p, m, keys, factor, o, pf),
                DT_F16 => pv_dt::<DT_F16>(p, m, keys, factor, o, pf),
                // V is the first 512 elements of K: no scan if qk found no NaN code in the whole rows.
                _ if !nan_free && e4m3_any_nan(keys, HEAD_DIM_V) => pv_e4m3::<DT_E4M3>(p, m, keys, factor, o, pf),
                _ => {
                    // V is widened to value·2^-120: P·2^112 (exact, P <= 1) keeps every product as in the other paths.
                    for r in 0..m {
                        p[r * S_STRIDE..][..keys.len()].iter_mut().for_each(|x| *x *= E4M3_FINITE_QP_SCALE);
                    }
                    pv_e4m3::<DT_E4M3_FINITE>(p, m, keys, factor, o, pf)
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use mla_core::dtype::pow2_f32;

        #[test]
        fn e4m3_widening_matches_the_table_for_every_code() {
            if !super::super::Isa::Avx2.is_available() {
                return;
            }
            let codes: Vec<u8> = (0..=255u8).collect();
            for chunk in codes.chunks_exact(8) {
                let mut got = [0f32; 8];
                // SAFETY: AVX2 is available (checked above); `chunk` holds 8 bytes; `got` holds 8 floats.
                unsafe { _mm256_storeu_ps(got.as_mut_ptr(), widen8::<DT_E4M3>(chunk.as_ptr())) };
                for (g, &c) in got.iter().zip(chunk) {
                    let want = mla_core::dtype::E4M3_TO_F32[c as usize] * super::super::E4M3_KV_UNIT;
                    assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "code {c:#04x}: {g}");
                }
            }
        }

        #[test]
        fn finite_e4m3_widening_is_exact_in_units_of_2_pow_minus_120() {
            if !super::super::Isa::Avx2.is_available() {
                return;
            }
            let codes: Vec<u8> = (0..=255u8).filter(|c| c & 0x7F != 0x7F).collect();
            for chunk in codes.chunks(8) {
                let mut c8 = [0u8; 8];
                c8[..chunk.len()].copy_from_slice(chunk);
                let mut got = [0f32; 8];
                // SAFETY: AVX2 is available (checked above); `c8` holds 8 bytes; `got` holds 8 floats.
                unsafe { _mm256_storeu_ps(got.as_mut_ptr(), widen8::<DT_E4M3_FINITE>(c8.as_ptr())) };
                for (g, &c) in got.iter().zip(chunk) {
                    let want = mla_core::dtype::E4M3_TO_F32[c as usize];
                    // Exact: scaling back up by 2^120 (two exact steps) gives the table value.
                    assert_eq!((g * pow2_f32(60) * pow2_f32(60)).to_bits(), want.to_bits(), "code {c:#04x}");
                    assert_eq!((g * E4M3_FINITE_QP_SCALE).to_bits(), (want * super::super::E4M3_KV_UNIT).to_bits());
                }
            }
        }

        #[test]
        fn nan_scan_finds_exactly_the_nan_codes() {
            if !super::super::Isa::Avx2.is_available() {
                return;
            }
            for code in 0..=255u8 {
                for at in [0, 31, 32, 575] {
                    let mut row = [0xFEu8; HEAD_DIM_K]; // −448, the largest finite magnitude
                    row[at] = code;
                    let rows = [row.as_ptr()];
                    // SAFETY: AVX2 is available (checked above); the row holds 576 readable bytes.
                    let got = unsafe { e4m3_any_nan(&rows, HEAD_DIM_K) };
                    assert_eq!(got, code & 0x7F == 0x7F, "code {code:#04x} at {at}");
                }
            }
        }

        #[test]
        fn sixteen_bit_widening_is_exact() {
            if !super::super::Isa::Avx2.is_available() {
                return;
            }
            for base in (0..=u16::MAX as u32).step_by(8) {
                let bits: Vec<u16> = (base..base + 8).map(|x| x as u16).collect();
                let (mut b, mut h) = ([0f32; 8], [0f32; 8]);
                // SAFETY: AVX2/F16C available; 8 u16 readable; 8 floats writable.
                unsafe {
                    _mm256_storeu_ps(b.as_mut_ptr(), widen8::<DT_BF16>(bits.as_ptr().cast()));
                    _mm256_storeu_ps(h.as_mut_ptr(), widen8::<DT_F16>(bits.as_ptr().cast()));
                }
                for i in 0..8 {
                    let wb = mla_core::dtype::bf16_to_f32(bits[i]);
                    let wh = mla_core::dtype::f16_to_f32(bits[i]);
                    assert!(b[i].to_bits() == wb.to_bits() || (b[i].is_nan() && wb.is_nan()), "bf16 {:#x}", bits[i]);
                    assert!(h[i].to_bits() == wh.to_bits() || (h[i].is_nan() && wh.is_nan()), "f16 {:#x}", bits[i]);
                }
            }
        }

        #[test]
        fn hsum_uses_the_scalar_tree() {
            if !super::super::Isa::Avx2.is_available() {
                return;
            }
            // Values whose sum depends on the association order.
            let a = [1e8f32, 1.0, -1e8, 3.5, 0.25, 1e-3, 7.0, -2.0];
            // SAFETY: AVX2 available; 8 readable floats.
            let got = unsafe { hsum(_mm256_loadu_ps(a.as_ptr())) };
            assert_eq!(got.to_bits(), super::super::tree8(a).to_bits());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// e4m3 blocks with and without a NaN code: the AVX2 path (which skips the NaN patch for blocks without one)
    /// matches the scalar path bit for bit, and NaN propagates into exactly the same scores and outputs.
    #[test]
    fn e4m3_nan_blocks_match_the_scalar_path() {
        if !Isa::Avx2.is_available() {
            return;
        }
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let n = 37;
        for nan_at in [None, Some((5, 3)), Some((36, 575)), Some((0, 511)), Some((12, 513))] {
            let mut cache: Vec<u8> = (0..n * HEAD_DIM_K)
                .map(|_| {
                    let c = (next() & 0xFF) as u8;
                    if c & 0x7F == 0x7F { c & 0xF0 } else { c }
                })
                .collect();
            if let Some((j, d)) = nan_at {
                cache[j * HEAD_DIM_K + d] = if d % 2 == 0 { 0x7F } else { 0xFF };
            }
            let keys: Vec<*const u8> = (0..n).map(|j| cache[j * HEAD_DIM_K..].as_ptr()).collect();
            for m in [1, 2, 5, 13] {
                let q: Vec<f32> = (0..m * HEAD_DIM_K).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
                let p: Vec<f32> = (0..m * S_STRIDE).map(|_| (next() % 1000) as f32 / 1000.0).collect();
                let f: Vec<f32> = (0..m).map(|r| 0.5 + r as f32 / 8.0).collect();
                let run = |isa| {
                    let mut s = vec![0f32; m * S_STRIDE];
                    let mut o: Vec<f32> = (0..m * HEAD_DIM_V).map(|i| (i % 7) as f32).collect();
                    let qr = QueryRows::new(isa, DType::E4M3, q.clone());
                    let mut p = p.clone();
                    // SAFETY: every key row has 576 readable bytes; buffer sizes match m.
                    unsafe {
                        let nan_free = qk(isa, DType::E4M3, &qr, m, &keys, &mut s, Prefetch::NONE);
                        assert!(!nan_free || nan_at.is_none(), "qk: NaN at {nan_at:?} reported as absent");
                        pv(isa, DType::E4M3, &mut p, m, &keys, &f, &mut o, Prefetch::NONE, nan_free);
                    }
                    (s, o)
                };
                let (ss, os) = run(Isa::Scalar);
                let (sv, ov) = run(Isa::Avx2);
                let same = |a: &f32, b: &f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
                assert!(ss.iter().zip(&sv).all(|(a, b)| same(a, b)), "qk, NaN at {nan_at:?}, m = {m}");
                assert!(os.iter().zip(&ov).all(|(a, b)| same(a, b)), "pv, NaN at {nan_at:?}, m = {m}");
                let nans = sv[..n].iter().filter(|x| x.is_nan()).count();
                assert_eq!(nans, usize::from(nan_at.is_some()), "NaN at {nan_at:?}: {nans} NaN scores");
                let v_nan = matches!(nan_at, Some((_, d)) if d < HEAD_DIM_V);
                assert_eq!(ov.iter().any(|x| x.is_nan()), v_nan, "NaN at {nan_at:?}, m = {m}");
            }
        }
    }
}
