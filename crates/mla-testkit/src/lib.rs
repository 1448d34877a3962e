//! # mla-testkit
//!
//! The one test kit of flashmla-rs (dev-only, never published): what every test crate used to carry its own copy
//! of. A seeded random generator, random decode problems shaped like the ones real engines pass (varlen,
//! NaN-poisoned cache tails, permuted block tables with garbage past the end), a driver that runs any host backend
//! through the full protocol (metadata → workspace → decode), an independent float64 reference, one tolerance rule
//! (upstream FlashMLA's test scheme), one `cos_diff`, a digest for snapshots, and [`for_each_backend`].
//!
//! | helper | what |
//! |---|---|
//! | [`Rng`] | SplitMix64, seeded: every case is reproducible from its seed |
//! | [`Case`] / [`Problem`] | a problem description and its generated host data |
//! | [`run_host`] | `get_mla_metadata` + `workspace_size` + `decode` on a host backend |
//! | [`reference()`] | naive float64 attention from the definition (no online softmax, no splits) |
//! | [`Tol`], [`check_close`], [`cos_diff`] | anomaly positions equal, elementwise abs-or-rel, then `cos_diff` |
//! | [`digest`] | FNV-1a of the bits of `out` and `lse`, for snapshots of bitwise-deterministic backends |
//! | [`for_each_backend`] | runs a test body on every backend that opens here and passes a capability filter |

use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use mla_core::{
    Capabilities, DType, DecodeArgs, DecodeShape, Device, HEAD_DIM_K, HEAD_DIM_V, HostTensor, HostTensorMut,
    MetadataArgs, MlaBackend, Result, Stream, Workspace, dtype::E4M3,
};

/// SplitMix64: tiny, seedable, good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in `[0, n)` (`n >= 1`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// Uniform in `[-1, 1)`.
    pub fn unit(&mut self) -> f32 {
        (self.uniform() * 2.0 - 1.0) as f32
    }

    /// One element of `v` (non-empty).
    pub fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// A decode problem description.
#[derive(Clone, Debug)]
pub struct Case {
    /// Query tokens per request.
    pub s_q: usize,
    /// Query heads.
    pub h_q: usize,
    /// KV heads.
    pub h_kv: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// Input dtype.
    pub dtype: DType,
    /// Causal flag as passed.
    pub causal: bool,
    /// Per-request lengths (the batch size is their count).
    pub seqlens: Vec<i32>,
    /// `None`: the default `576^-0.5`.
    pub softmax_scale: Option<f32>,
    /// e4m3 only.
    pub descale_q: f32,
    /// e4m3 only.
    pub descale_k: f32,
    /// Standard deviation of the real q/k values (upstream: 0.1, clamped to ±1); larger gives peaky softmaxes.
    pub spread: f64,
    /// Extra elements after each cache row (a strided, non-contiguous cache).
    pub row_pad: usize,
    /// Seed of the data.
    pub seed: u64,
}

impl Case {
    /// A case with upstream-like defaults: one KV head, page 64, bf16, no causal, spread 0.1.
    pub fn new(seqlens: &[i32], s_q: usize, h_q: usize) -> Self {
        Case {
            s_q,
            h_q,
            h_kv: 1,
            page_size: 64,
            dtype: DType::Bf16,
            causal: false,
            seqlens: seqlens.to_vec(),
            softmax_scale: None,
            descale_q: 1.0,
            descale_k: 1.0,
            spread: 0.1,
            row_pad: 0,
            seed: 1,
        }
    }

    /// The batch size.
    pub fn batch(&self) -> usize {
        self.seqlens.len()
    }

    /// The shape fixing buffer sizes.
    pub fn shape(&self) -> DecodeShape {
        DecodeShape { batch: self.batch(), s_q: self.s_q, h_q: self.h_q, h_kv: self.h_kv, dtype: self.dtype }
    }
}

/// Elements of one input tensor, typed.
#[derive(Clone, Debug)]
pub enum Elems {
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
    /// fp16 bit patterns.
    F16(Vec<u16>),
    /// e4m3 codes.
    E4M3(Vec<u8>),
}

/// Independent exact decoding of one element to f64 (no shared code with mla-core's tables).
pub fn decode_f64(dtype: DType, bits: u32) -> f64 {
    match dtype {
        DType::Bf16 => f32::from_bits(bits << 16) as f64,
        DType::F16 => {
            let (s, e, m) = ((bits >> 15) & 1, (bits >> 10) & 0x1F, bits & 0x3FF);
            let sign = if s == 1 { -1.0 } else { 1.0 };
            match e {
                0 => sign * m as f64 * 2f64.powi(-24),
                31 => {
                    if m == 0 {
                        sign * f64::INFINITY
                    } else {
                        f64::NAN
                    }
                }
                _ => sign * (1024 + m) as f64 * 2f64.powi(e as i32 - 25),
            }
        }
        DType::E4M3 => {
            let (s, e, m) = ((bits >> 7) & 1, (bits >> 3) & 0xF, bits & 7);
            let sign = if s == 1 { -1.0 } else { 1.0 };
            if e == 15 && m == 7 {
                f64::NAN
            } else if e == 0 {
                sign * m as f64 * 2f64.powi(-9)
            } else {
                sign * (8 + m) as f64 * 2f64.powi(e as i32 - 10)
            }
        }
    }
}

impl Elems {
    fn encode(dtype: DType, vals: &[f32], descale: f32) -> Elems {
        match dtype {
            DType::Bf16 => Elems::Bf16(vals.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()),
            DType::F16 => Elems::F16(vals.iter().map(|&x| f16::from_f32(x).to_bits()).collect()),
            DType::E4M3 => Elems::E4M3(vals.iter().map(|&x| E4M3::from_f32(x / descale).0).collect()),
        }
    }

    /// The stored bytes, little-endian (what a C or device buffer of this tensor holds).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Elems::Bf16(v) | Elems::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Elems::E4M3(v) => v.clone(),
        }
    }

    /// Element `i` decoded to f64 (the stored value, before any descale).
    pub fn get(&self, dtype: DType, i: usize) -> f64 {
        match self {
            Elems::Bf16(v) | Elems::F16(v) => decode_f64(dtype, v[i] as u32),
            Elems::E4M3(v) => decode_f64(dtype, v[i] as u32),
        }
    }

    /// A host tensor view.
    pub fn tensor(&self, shape: &[usize], strides: Option<&[usize]>) -> Result<HostTensor<'_>> {
        match self {
            Elems::Bf16(v) => HostTensor::strided::<bf16>(v.reinterpret_cast(), shape, strides),
            Elems::F16(v) => HostTensor::strided::<f16>(v.reinterpret_cast(), shape, strides),
            Elems::E4M3(v) => {
                // SAFETY: E4M3 is repr(transparent) over u8, so the slices have identical layout.
                let s = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<E4M3>(), v.len()) };
                HostTensor::strided::<E4M3>(s, shape, strides)
            }
        }
    }
}

/// The value of a block-table entry that is never read: the same sentinel upstream's tests use.
pub const UNUSED_PAGE: i32 = 2_147_480_000;

/// Generated host data of a [`Case`].
#[derive(Clone, Debug)]
pub struct Problem {
    /// The description.
    pub case: Case,
    /// `[b, s_q, h_q, 576]`.
    pub q: Elems,
    /// `[num_blocks, page_size, h_kv, 576]`; each page row holds `h_kv·576 + row_pad` elements.
    pub cache: Elems,
    /// Pages in the cache.
    pub num_blocks: usize,
    /// `[b, max_blocks_per_seq]`, permuted page ids, garbage past each request's last page.
    pub block_table: Vec<i32>,
    /// Columns of the block table.
    pub max_blocks_per_seq: usize,
}

impl Problem {
    /// Generates the data: q and valid cache rows ~ clamp(N(0, spread²), ±1); every other cache row NaN.
    pub fn generate(case: &Case) -> Problem {
        let mut rng = Rng::new(case.seed);
        let (b, ps) = (case.batch(), case.page_size);
        let pages_of: Vec<usize> = case.seqlens.iter().map(|&s| (s.max(0) as usize).div_ceil(ps)).collect();
        let used: usize = pages_of.iter().sum();
        let num_blocks = used + 1 + rng.below(3); // a few pages nobody references (NaN)
        let max_blocks_per_seq = pages_of.iter().copied().max().unwrap_or(0) + 1 + rng.below(2);
        let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
        rng.shuffle(&mut ids);
        let mut block_table = vec![0i32; b * max_blocks_per_seq];
        let mut next = 0;
        for i in 0..b {
            for p in 0..max_blocks_per_seq {
                block_table[i * max_blocks_per_seq + p] = if p < pages_of[i] {
                    next += 1;
                    ids[next - 1]
                } else {
                    // Never read: out of range on purpose, or negative, or a real page.
                    [UNUSED_PAGE, -1, i32::MAX, ids[rng.below(num_blocks)]][rng.below(4)]
                };
            }
        }
        let val = |rng: &mut Rng| (rng.normal() * case.spread).clamp(-1.0, 1.0) as f32;
        let qn = b * case.s_q * case.h_q * HEAD_DIM_K;
        let qv: Vec<f32> = (0..qn).map(|_| val(&mut rng)).collect();
        let row = case.h_kv * HEAD_DIM_K + case.row_pad;
        let mut kv = vec![f32::NAN; num_blocks * ps * row];
        for i in 0..b {
            for j in 0..case.seqlens[i].max(0) as usize {
                let page = block_table[i * max_blocks_per_seq + j / ps] as usize;
                let base = (page * ps + j % ps) * row;
                for x in &mut kv[base..base + case.h_kv * HEAD_DIM_K] {
                    *x = val(&mut rng);
                }
            }
        }
        Problem {
            case: case.clone(),
            q: Elems::encode(case.dtype, &qv, case.descale_q),
            cache: Elems::encode(case.dtype, &kv, case.descale_k),
            num_blocks,
            block_table,
            max_blocks_per_seq,
        }
    }

    /// Shape and element strides of the cache.
    pub fn cache_layout(&self) -> ([usize; 4], [usize; 4]) {
        let c = &self.case;
        let row = c.h_kv * HEAD_DIM_K + c.row_pad;
        ([self.num_blocks, c.page_size, c.h_kv, HEAD_DIM_K], [c.page_size * row, row, HEAD_DIM_K, 1])
    }

    /// Cache element `d` of token `j` of request `i`, KV head `g`, dequantized, in f64.
    pub fn k(&self, i: usize, j: usize, g: usize, d: usize) -> f64 {
        let c = &self.case;
        let page = self.block_table[i * self.max_blocks_per_seq + j / c.page_size] as usize;
        let (_, st) = self.cache_layout();
        let idx = page * st[0] + (j % c.page_size) * st[1] + g * st[2] + d;
        self.cache.get(c.dtype, idx) * if c.dtype == DType::E4M3 { c.descale_k as f64 } else { 1.0 }
    }

    /// Query element, dequantized, in f64.
    pub fn q(&self, i: usize, t: usize, h: usize, d: usize) -> f64 {
        let c = &self.case;
        let idx = ((i * c.s_q + t) * c.h_q + h) * HEAD_DIM_K + d;
        self.q.get(c.dtype, idx) * if c.dtype == DType::E4M3 { c.descale_q as f64 } else { 1.0 }
    }
}

/// Outputs of a run, widened to f32: `out [b, s_q, h_q, 512]`, `lse [b, h_q, s_q]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Outputs {
    /// The out-dtype values, widened.
    pub out: Vec<f32>,
    /// Natural-log LSE.
    pub lse: Vec<f32>,
    /// The metadata rows used (flattened) and `num_splits`.
    pub metadata: (Vec<i32>, Vec<i32>),
}

impl Outputs {
    /// True if `other` is bitwise identical (NaN payloads included).
    pub fn bitwise_eq(&self, other: &Outputs) -> bool {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        bits(&self.out) == bits(&other.out) && bits(&self.lse) == bits(&other.lse)
    }
}

/// Caller-side buffers of one decode call, so tests can corrupt any of them before running.
pub struct Buffers {
    /// `tile_scheduler_metadata`, flattened.
    pub metadata: Vec<i32>,
    /// `num_splits`.
    pub num_splits: Vec<i32>,
    /// Workspace (as f32 words, so it is 4-byte aligned).
    pub workspace: Vec<f32>,
    /// Bytes of the workspace passed to decode.
    pub workspace_bytes: usize,
    /// Output bit patterns (bf16 or fp16), prefilled with a sentinel.
    pub out: Vec<u16>,
    /// LSE, prefilled with a sentinel.
    pub lse: Vec<f32>,
    /// The block table passed (a copy that tests may corrupt).
    pub block_table: Vec<i32>,
    /// The lengths passed.
    pub seqlens: Vec<i32>,
}

/// Sentinel the output buffers are prefilled with (bf16/fp16 bits and lse), to detect writes on error.
pub const OUT_SENTINEL: u16 = 0x7E57;
/// See [`OUT_SENTINEL`].
pub const LSE_SENTINEL: f32 = -12345.0;

impl Buffers {
    /// Runs the scheduler step and sizes every buffer for `p` on `be`.
    pub fn new(be: &dyn MlaBackend, p: &Problem) -> Result<Buffers> {
        let c = &p.case;
        let b = c.batch();
        let sh = c.shape();
        let parts = be.num_sm_parts(sh.q_seq_per_hk(), c.h_kv);
        let mut metadata = vec![0i32; parts * 8];
        let mut num_splits = vec![0i32; b + 1];
        {
            let seq = HostTensor::new(&c.seqlens, &[b])?;
            let meta = HostTensorMut::new(&mut metadata, &[parts, 8])?;
            let ns = HostTensorMut::new(&mut num_splits, &[b + 1])?;
            let args = MetadataArgs {
                cache_seqlens: seq.desc(),
                q_seq_per_hk: sh.q_seq_per_hk(),
                h_kv: c.h_kv,
                tile_scheduler_metadata: meta.desc(),
                num_splits: ns.desc(),
            };
            be.get_mla_metadata(&args, Stream::DEFAULT)?;
        }
        let workspace_bytes = be.workspace_size(&sh)?;
        Ok(Buffers {
            metadata,
            num_splits,
            workspace: vec![0f32; workspace_bytes.div_ceil(4)],
            workspace_bytes,
            out: vec![OUT_SENTINEL; b * c.s_q * c.h_q * HEAD_DIM_V],
            lse: vec![LSE_SENTINEL; b * c.h_q * c.s_q],
            block_table: p.block_table.clone(),
            seqlens: c.seqlens.clone(),
        })
    }

    /// Calls `decode` with these buffers.
    pub fn decode(&mut self, be: &dyn MlaBackend, p: &Problem) -> Result<()> {
        let c = &p.case;
        let b = c.batch();
        let (kshape, kstrides) = p.cache_layout();
        let q = p.q.tensor(&[b, c.s_q, c.h_q, HEAD_DIM_K], None)?;
        let k = p.cache.tensor(&kshape, Some(&kstrides))?;
        let bt = HostTensor::new(&self.block_table, &[b, p.max_blocks_per_seq])?;
        let seq = HostTensor::new(&self.seqlens, &[b])?;
        let parts = self.metadata.len() / 8;
        let meta = HostTensor::new(&self.metadata, &[parts, 8])?;
        let ns = HostTensor::new(&self.num_splits, &[b + 1])?;
        let dq = [c.descale_q];
        let dk = [c.descale_k];
        let (dq_t, dk_t) = (HostTensor::new(&dq[..], &[1])?, HostTensor::new(&dk[..], &[1])?);
        let out_shape = [b, c.s_q, c.h_q, HEAD_DIM_V];
        let out = match c.dtype {
            DType::F16 => HostTensorMut::new::<f16>(self.out.reinterpret_cast_mut(), &out_shape)?,
            _ => HostTensorMut::new::<bf16>(self.out.reinterpret_cast_mut(), &out_shape)?,
        };
        let lse = HostTensorMut::new(&mut self.lse, &[b, c.h_q, c.s_q])?;
        let e4m3 = c.dtype == DType::E4M3;
        let args = DecodeArgs {
            q: q.desc(),
            k_cache: k.desc(),
            block_table: bt.desc(),
            cache_seqlens: seq.desc(),
            head_dim_v: HEAD_DIM_V,
            tile_scheduler_metadata: meta.desc(),
            num_splits: ns.desc(),
            softmax_scale: c.softmax_scale,
            causal: c.causal,
            descale_q: e4m3.then(|| dq_t.desc()),
            descale_k: e4m3.then(|| dk_t.desc()),
            out: out.desc(),
            lse: lse.desc(),
        };
        // Whole f32 words: workspace sizes are multiples of 4 bytes, and tests shorten it by whole words.
        let ws = Workspace::host(&mut self.workspace[..self.workspace_bytes / 4]);
        be.decode(&args, ws, Stream::DEFAULT)
    }

    /// The outputs, widened.
    pub fn outputs(&self, dtype: DType) -> Outputs {
        let out = match dtype {
            DType::F16 => self.out.iter().map(|&x| f16::from_bits(x).to_f32()).collect(),
            _ => self.out.iter().map(|&x| bf16::from_bits(x).to_f32()).collect(),
        };
        Outputs { out, lse: self.lse.clone(), metadata: (self.metadata.clone(), self.num_splits.clone()) }
    }

    /// True if no output element was written.
    pub fn untouched(&self) -> bool {
        self.out.iter().all(|&x| x == OUT_SENTINEL) && self.lse.iter().all(|&x| x == LSE_SENTINEL)
    }
}

/// The whole protocol on a host backend: metadata, workspace, decode.
pub fn run_host(be: &dyn MlaBackend, p: &Problem) -> Result<Outputs> {
    let mut bufs = Buffers::new(be, p)?;
    bufs.decode(be, p)?;
    Ok(bufs.outputs(p.case.dtype))
}

/// The float64 reference: `out [b, s_q, h_q, 512]` and `lse [b, h_q, s_q]` straight from the definition.
pub fn reference(p: &Problem) -> (Vec<f64>, Vec<f64>) {
    let c = &p.case;
    let b = c.batch();
    let hpk = c.h_q / c.h_kv;
    let scale = c.softmax_scale.map_or(1.0 / (HEAD_DIM_K as f64).sqrt(), |s| s as f64);
    let mut out = vec![0f64; b * c.s_q * c.h_q * HEAD_DIM_V];
    let mut lse = vec![0f64; b * c.h_q * c.s_q];
    for i in 0..b {
        let s_k = c.seqlens[i].max(0) as usize;
        // The request's keys, dequantized once: kd[(j·h_kv + g)·576 + d].
        let kd: Vec<f64> = (0..s_k)
            .flat_map(|j| (0..c.h_kv).flat_map(move |g| (0..HEAD_DIM_K).map(move |d| (j, g, d))))
            .map(|(j, g, d)| p.k(i, j, g, d))
            .collect();
        let krow = |j: usize, g: usize| &kd[(j * c.h_kv + g) * HEAD_DIM_K..][..HEAD_DIM_K];
        for t in 0..c.s_q {
            let visible = if c.causal && c.s_q > 1 {
                (s_k as i64 - c.s_q as i64 + t as i64 + 1).clamp(0, s_k as i64) as usize
            } else {
                s_k
            };
            for h in 0..c.h_q {
                let g = h / hpk;
                let li = (i * c.h_q + h) * c.s_q + t;
                let oi = ((i * c.s_q + t) * c.h_q + h) * HEAD_DIM_V;
                if visible == 0 {
                    lse[li] = f64::INFINITY;
                    continue;
                }
                let q: Vec<f64> = (0..HEAD_DIM_K).map(|d| p.q(i, t, h, d)).collect();
                let scores: Vec<f64> =
                    (0..visible).map(|j| scale * q.iter().zip(krow(j, g)).map(|(a, b)| a * b).sum::<f64>()).collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                lse[li] = m + z.ln();
                for (j, s) in scores.iter().enumerate() {
                    let w = (s - m).exp() / z;
                    for (o, v) in out[oi..oi + HEAD_DIM_V].iter_mut().zip(krow(j, g)) {
                        *o += w * v;
                    }
                }
            }
        }
    }
    (out, lse)
}

/// Tolerances of one comparison (upstream HEAD's `check_is_allclose` scheme).
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    /// Elementwise: pass if `|a − r| < abs`…
    pub abs: f64,
    /// …or `|a − r| / (|r| + 1e-6) < rel`.
    pub rel: f64,
    /// `|cos_diff| <= cos`.
    pub cos: f64,
}

impl Tol {
    /// For `out`: at most one ulp of the out dtype apart after both sides are rounded to it (upstream allows two
    /// bf16 ulp and abs 8e-4), abs 1e-5, cos 1e-6 (upstream 5e-6).
    pub fn out(dtype: DType) -> Tol {
        let ulp = if dtype == DType::F16 { 1.0 / 1024.0 } else { 1.0 / 128.0 };
        Tol { abs: 1e-5, rel: 1.01 * ulp, cos: 1e-6 }
    }

    /// For `lse`: upstream's abs 1e-6, rel 8.01/65536, cos 1e-7.
    pub fn lse() -> Tol {
        Tol { abs: 1e-6, rel: 8.01 / 65536.0, cos: 1e-7 }
    }
}

/// Rounds a reference value to what an exact kernel would store in the out dtype.
pub fn round_to_out(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F16 => f16::from_f64(x).to_f64(),
        _ => bf16::from_f64(x).to_f64(),
    }
}

/// `1 − 2·Σxy / Σ(x² + y²)` in f64 (upstream's `cos_diff`): 0 for identical vectors, 1 for orthogonal ones, 2 for
/// opposite ones.
///
/// Both all-zero (a request that sees no key writes `out = 0`, and the reference agrees) is identical: 0, where
/// upstream's formula, which clamps the denominator, would report 1. One all-zero and the other not is as far
/// apart as orthogonal vectors: 1. No threshold: tiny nonzero vectors are compared like any others.
pub fn cos_diff(a: &[f64], r: &[f64]) -> f64 {
    let (mut xy, mut sq) = (0f64, 0f64);
    for (x, y) in a.iter().zip(r) {
        xy += x * y;
        sq += x * x + y * y;
    }
    if sq == 0.0 {
        return 0.0;
    }
    1.0 - 2.0 * xy / sq
}

/// Upstream's check: the positions of ±inf and NaN match exactly, then elementwise abs-or-rel, then `cos_diff`.
/// Returns a description of the first failure.
pub fn check_close(what: &str, actual: &[f32], want: &[f64], tol: Tol) -> std::result::Result<(), String> {
    if actual.len() != want.len() {
        return Err(format!("{what}: {} elements, reference has {}", actual.len(), want.len()));
    }
    let mut a64 = Vec::with_capacity(actual.len());
    let mut r64 = Vec::with_capacity(actual.len());
    for (k, (&a, &r)) in actual.iter().zip(want).enumerate() {
        let a = a as f64;
        let class = |x: f64| (x.is_nan(), x == f64::INFINITY, x == f64::NEG_INFINITY);
        if class(a) != class(r) {
            return Err(format!("{what}[{k}]: got {a}, reference {r} (anomaly positions differ)"));
        }
        if !a.is_finite() {
            a64.push(0.0);
            r64.push(0.0);
            continue;
        }
        let err = (a - r).abs();
        if !(err < tol.abs || err / (r.abs() + 1e-6) < tol.rel) {
            return Err(format!("{what}[{k}]: got {a:e}, reference {r:e}, |err| {err:e} (tolerance {tol:?})"));
        }
        a64.push(a);
        r64.push(r);
    }
    let cd = cos_diff(&a64, &r64);
    if cd.abs() > tol.cos {
        return Err(format!("{what}: cos_diff {cd:e} > {}", tol.cos));
    }
    Ok(())
}

/// Checks a backend's outputs for `p` against the float64 reference.
pub fn check_against_reference(p: &Problem, got: &Outputs) -> std::result::Result<(), String> {
    let (out, lse) = reference(p);
    let dt = p.case.dtype;
    let out: Vec<f64> = out.iter().map(|&x| round_to_out(dt, x)).collect();
    check_close("out", &got.out, &out, Tol::out(dt))?;
    check_close("lse", &got.lse, &lse, Tol::lse())
}

/// FNV-1a's offset basis and prime (64-bit).
const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01B3;

/// A 64-bit FNV-1a digest of the length of `out`, then the bit patterns of `out` and `lse` (all little-endian),
/// written as 16 hex digits: any change in any bit of a result changes it (with overwhelming likelihood), so
/// snapshots of a bitwise deterministic backend pin every number.
pub fn digest(out: &[f32], lse: &[f32]) -> String {
    let words = out.iter().chain(lse).map(|x| x.to_bits().to_le_bytes());
    let bytes = (out.len() as u64).to_le_bytes().into_iter().chain(words.flatten());
    let h = bytes.fold(FNV_OFFSET, |h, byte| (h ^ byte as u64).wrapping_mul(FNV_PRIME));
    format!("{h:016x}")
}

/// Every backend name the registry knows, except `auto` (which is one of the others).
fn backend_names() -> impl Iterator<Item = &'static str> {
    flashmla::BACKEND_NAMES.into_iter().filter(|&n| n != "auto")
}

/// Runs `body` on every backend that opens on this machine (device 0 for GPU backends) and whose capabilities
/// pass `filter`; returns the names it ran on, in registry order. A backend that does not open here is skipped
/// with a line on stderr, unless `FLASHMLA_REQUIRE_GPU=1` asks for every backend (a GPU machine's run), in which
/// case that panics. In the spirit of candle's `test_device!`: one test body, every device the machine has.
pub fn for_each_backend(
    filter: impl Fn(&Capabilities) -> bool,
    mut body: impl FnMut(&dyn MlaBackend),
) -> Vec<&'static str> {
    let require_all = std::env::var("FLASHMLA_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let mut ran = Vec::new();
    for name in backend_names() {
        let backend = match flashmla::open_backend(name, 0) {
            Ok(b) => b,
            Err(e) if !require_all => {
                eprintln!("for_each_backend: skipping `{name}`: {e}");
                continue;
            }
            Err(e) => panic!("FLASHMLA_REQUIRE_GPU=1 but backend `{name}` does not open: {e}"),
        };
        if !filter(backend.capabilities()) {
            eprintln!("for_each_backend: `{name}` filtered out by its capabilities");
            continue;
        }
        body(backend.as_ref());
        ran.push(name);
    }
    ran
}

/// The filter of tests whose buffers live in host memory ([`Buffers`], [`run_host`]).
pub fn host_memory(caps: &Capabilities) -> bool {
    caps.device == Device::Host
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cos_diff_of_zero_identical_opposite_and_orthogonal_vectors() {
        assert_eq!(cos_diff(&[0.0; 4], &[0.0; 4]), 0.0, "both all-zero: identical");
        assert_eq!(cos_diff(&[0.0; 2], &[1.0, -2.0]), 1.0, "one all-zero: as far as orthogonal");
        assert_eq!(cos_diff(&[1.0, -2.0], &[0.0; 2]), 1.0);
        assert_eq!(cos_diff(&[1.5, -2.0, 3.0], &[1.5, -2.0, 3.0]), 0.0);
        assert_eq!(cos_diff(&[1.0, 2.0], &[-1.0, -2.0]), 2.0);
        assert_eq!(cos_diff(&[1.0, 0.0], &[0.0, 1.0]), 1.0);
        // Tiny vectors are compared, not waved through.
        assert_eq!(cos_diff(&[1e-150, 0.0], &[0.0, 1e-150]), 1.0);
    }

    #[test]
    fn digest_sees_every_bit_and_the_split_between_out_and_lse() {
        let d = digest(&[1.0, 2.0], &[3.0]);
        assert_eq!(d.len(), 16);
        assert_ne!(d, digest(&[1.0, f32::from_bits(2f32.to_bits() ^ 1)], &[3.0]));
        assert_ne!(d, digest(&[1.0, 2.0, 3.0], &[]));
        assert_eq!(digest(&[f32::NAN], &[]), digest(&[f32::NAN], &[]));
    }

    #[test]
    fn rng_is_reproducible_and_in_range() {
        let (mut a, mut b) = (Rng::new(5), Rng::new(5));
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
            let u = a.unit();
            assert!((-1.0..1.0).contains(&u), "{u}");
            assert!(a.below(7) < 7);
            b.unit();
            b.below(7);
        }
        assert_ne!(Rng::new(5).next_u64(), Rng::new(6).next_u64());
    }

    #[test]
    fn the_cpu_backend_always_runs() {
        let ran = for_each_backend(host_memory, |be| assert_eq!(be.capabilities().device, Device::Host));
        assert_eq!(ran, ["cpu"]);
    }
}
