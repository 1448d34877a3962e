//! # mla-testkit
//!
//! The one test kit of flashmla-rs (dev-only, never published): what every test crate used to carry its own copy
//! of. A seeded random generator, random decode problems shaped like the ones real engines pass (varlen,
//! NaN-poisoned cache tails, permuted block tables with garbage past the end), drivers that run any backend through
//! the full protocol (metadata → workspace → decode) from host or device memory, an independent float64 reference,
//! one tolerance rule (upstream FlashMLA's test scheme, at the bar of the backend's arithmetic), one `cos_diff`, a
//! digest for snapshots, and [`for_each_backend`].
//!
//! | helper | what |
//! |---|---|
//! | [`Rng`] | SplitMix64, seeded: every case is reproducible from its seed |
//! | [`Case`] / [`Problem`] | a problem description and its generated host data |
//! | [`run_host`] / [`Buffers`] | `get_mla_metadata` + `workspace_size` + `decode` on a host backend |
//! | [`run`] / [`DeviceBuffers`] | the same on any backend: a CUDA one gets the problem uploaded through `flashmla::cuda` |
//! | [`reference()`] | naive float64 attention from the definition (no online softmax, no splits) |
//! | [`Tol`], [`Bar`], [`check_close`], [`cos_diff`] | anomaly positions equal, elementwise abs-or-rel, then `cos_diff` |
//! | [`digest`] | FNV-1a of the bits of `out` and `lse`, for snapshots of bitwise-deterministic backends |
//! | [`for_each_backend`] | runs a test body on every backend that opens here and passes a capability filter |

use std::sync::Arc;

use flashmla::cuda::{CudaSlice, CudaStream, DeviceTensor, DeviceTensorMut, DeviceWorkspace, Gpu, driver_error};
use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use mla_core::dtype::{E4M3, E4M3_MAX};
use mla_core::scheduler::METADATA_WORDS;
use mla_core::{
    Capabilities, DType, DecodeArgs, DecodeShape, Device, HEAD_DIM_K, HEAD_DIM_V, HostTensor, HostTensorMut,
    MetadataArgs, MlaBackend, Result, Stream, Workspace,
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
    /// The real q/k values are clamped to `±clamp` (upstream: 1; `f64::INFINITY`: not clamped).
    pub clamp: f64,
    /// e4m3 only: `descale_q` / `descale_k` become the largest |value| of each tensor over [`E4M3_MAX`], so that
    /// value lands on the format's largest code (upstream's accuracy script), instead of the fields' values.
    pub descale_from_amax: bool,
    /// Extra elements after each cache row (a strided, non-contiguous cache).
    pub row_pad: usize,
    /// Strided outputs: each head's row of `out` is followed by [`OUT_ROW_PAD`] unused elements, and `lse` is stored
    /// token-major (`[b, h_q, s_q]` with strides `[h_q·s_q, 1, h_q]`).
    pub strided_outputs: bool,
    /// Columns of the block table (`None`: each request's pages + 1 or 2, at random). At least the longest
    /// request's page count.
    pub block_table_width: Option<usize>,
    /// What every block-table entry past a request's last page holds (`None`: a random mix of [`UNUSED_PAGE`], -1,
    /// `i32::MAX` and real page ids, none of which may be read).
    pub block_table_fill: Option<i32>,
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
            clamp: 1.0,
            descale_from_amax: false,
            row_pad: 0,
            strided_outputs: false,
            block_table_width: None,
            block_table_fill: None,
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

/// `2^k` for a normal f64 exponent, from its bits: exact (Rust does not promise that `powi` is).
fn pow2(k: i32) -> f64 {
    let (bias, mantissa_bits) = (f64::MAX_EXP - 1, f64::MANTISSA_DIGITS - 1);
    assert!((1 - bias..=bias).contains(&k), "2^{k} is not a normal f64");
    f64::from_bits(((k + bias) as u64) << mantissa_bits)
}

/// Independent exact decoding of one element to f64 (no shared code with mla-core's tables).
pub fn decode_f64(dtype: DType, bits: u32) -> f64 {
    match dtype {
        DType::Bf16 => f32::from_bits(bits << 16) as f64,
        DType::F16 => {
            let (s, e, m) = ((bits >> 15) & 1, (bits >> 10) & 0x1F, bits & 0x3FF);
            let sign = if s == 1 { -1.0 } else { 1.0 };
            match e {
                0 => sign * m as f64 * pow2(-24),
                31 => {
                    if m == 0 {
                        sign * f64::INFINITY
                    } else {
                        f64::NAN
                    }
                }
                _ => sign * (1024 + m) as f64 * pow2(e as i32 - 25),
            }
        }
        DType::E4M3 => {
            let (s, e, m) = ((bits >> 7) & 1, (bits >> 3) & 0xF, bits & 7);
            let sign = if s == 1 { -1.0 } else { 1.0 };
            if e == 15 && m == 7 {
                f64::NAN
            } else if e == 0 {
                sign * m as f64 * pow2(-9)
            } else {
                sign * (8 + m) as f64 * pow2(e as i32 - 10)
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
    /// Generates the data: q and valid cache rows ~ clamp(N(0, spread²), ±clamp); every other cache row NaN.
    pub fn generate(case: &Case) -> Problem {
        let mut rng = Rng::new(case.seed);
        let (b, ps) = (case.batch(), case.page_size);
        let pages_of: Vec<usize> = case.seqlens.iter().map(|&s| (s.max(0) as usize).div_ceil(ps)).collect();
        let used: usize = pages_of.iter().sum();
        let num_blocks = used + 1 + rng.below(3); // a few pages nobody references (NaN)
        let most_pages = pages_of.iter().copied().max().unwrap_or(0);
        let max_blocks_per_seq = match case.block_table_width {
            Some(w) => {
                assert!(w >= most_pages, "block_table_width {w} < the {most_pages} pages of the longest request");
                w
            }
            None => most_pages + 1 + rng.below(2),
        };
        let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
        rng.shuffle(&mut ids);
        let mut block_table = vec![0i32; b * max_blocks_per_seq];
        let mut next = 0;
        for i in 0..b {
            for p in 0..max_blocks_per_seq {
                block_table[i * max_blocks_per_seq + p] = if p < pages_of[i] {
                    next += 1;
                    ids[next - 1]
                } else if let Some(fill) = case.block_table_fill {
                    fill
                } else {
                    // Never read: out of range on purpose, or negative, or a real page.
                    [UNUSED_PAGE, -1, i32::MAX, ids[rng.below(num_blocks)]][rng.below(4)]
                };
            }
        }
        let val = |rng: &mut Rng| (rng.normal() * case.spread).clamp(-case.clamp, case.clamp) as f32;
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
        let mut case = case.clone();
        if case.descale_from_amax && case.dtype == DType::E4M3 {
            // The largest finite |value| lands on the largest code (NaN rows are not values).
            let amax = |v: &[f32]| v.iter().filter(|x| x.is_finite()).fold(0f32, |m, x| m.max(x.abs()));
            case.descale_q = amax(&qv).max(f32::MIN_POSITIVE) / E4M3_MAX;
            case.descale_k = amax(&kv).max(f32::MIN_POSITIVE) / E4M3_MAX;
        }
        Problem {
            q: Elems::encode(case.dtype, &qv, case.descale_q),
            cache: Elems::encode(case.dtype, &kv, case.descale_k),
            case,
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

    /// Shape of `q`: `[b, s_q, h_q, 576]` (row-major).
    pub fn q_shape(&self) -> [usize; 4] {
        let c = &self.case;
        [c.batch(), c.s_q, c.h_q, HEAD_DIM_K]
    }

    /// Shape of `out`: `[b, s_q, h_q, 512]`.
    pub fn out_shape(&self) -> [usize; 4] {
        let c = &self.case;
        [c.batch(), c.s_q, c.h_q, HEAD_DIM_V]
    }

    /// Element strides of `out` (rows padded by [`OUT_ROW_PAD`] when [`Case::strided_outputs`]).
    pub fn out_strides(&self) -> [usize; 4] {
        let c = &self.case;
        let row = HEAD_DIM_V + if c.strided_outputs { OUT_ROW_PAD } else { 0 };
        [c.s_q * c.h_q * row, c.h_q * row, row, 1]
    }

    /// Shape of `lse`: `[b, h_q, s_q]`.
    pub fn lse_shape(&self) -> [usize; 3] {
        let c = &self.case;
        [c.batch(), c.h_q, c.s_q]
    }

    /// Element strides of `lse` (token-major when [`Case::strided_outputs`]).
    pub fn lse_strides(&self) -> [usize; 3] {
        let c = &self.case;
        let (h, s) = (c.h_q, c.s_q);
        if c.strided_outputs { [h * s, 1, h] } else { [h * s, s, 1] }
    }

    /// Elements of the `out` buffer (padding included).
    pub fn out_len(&self) -> usize {
        self.case.batch() * self.out_strides()[0]
    }

    /// Elements of the `lse` buffer.
    pub fn lse_len(&self) -> usize {
        self.case.batch() * self.lse_strides()[0]
    }

    /// The outputs as stored (`out` bit patterns and `lse` in this problem's strides, the metadata rows and
    /// `num_splits`), widened to f32 in the reference's row-major layout.
    pub fn gather_outputs(&self, out_bits: &[u16], lse: &[f32], metadata: Vec<i32>, num_splits: Vec<i32>) -> Outputs {
        let c = &self.case;
        let widen =
            |x: u16| if c.dtype == DType::F16 { f16::from_bits(x).to_f32() } else { bf16::from_bits(x).to_f32() };
        let (os, ls) = (self.out_strides(), self.lse_strides());
        let mut out = Vec::with_capacity(c.batch() * c.s_q * c.h_q * HEAD_DIM_V);
        let mut lse_rows = Vec::with_capacity(c.batch() * c.h_q * c.s_q);
        for i in 0..c.batch() {
            for t in 0..c.s_q {
                for h in 0..c.h_q {
                    let row = i * os[0] + t * os[1] + h * os[2];
                    out.extend(out_bits[row..row + HEAD_DIM_V].iter().map(|&x| widen(x)));
                }
            }
            for h in 0..c.h_q {
                lse_rows.extend((0..c.s_q).map(|t| lse[i * ls[0] + h * ls[1] + t * ls[2]]));
            }
        }
        Outputs { out, lse: lse_rows, metadata: (metadata, num_splits) }
    }
}

/// Unused elements after each head's row of `out` in a problem with [`Case::strided_outputs`] (an even count, so
/// rows stay 4-byte aligned for GPU backends' paired stores).
pub const OUT_ROW_PAD: usize = 8;

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
    /// Output bit patterns (bf16 or fp16) in the problem's strides ([`Problem::out_strides`]), prefilled with a
    /// sentinel.
    pub out: Vec<u16>,
    /// LSE in the problem's strides, prefilled with a sentinel.
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
/// What device metadata buffers are prefilled with, so that a row the scheduler kernel leaves unwritten differs
/// from the host plan.
pub const METADATA_SENTINEL: i32 = 0xABAB_ABABu32 as i32;
/// The byte a device workspace is prefilled with (all-ones: NaN partials), so that reading a partial nobody
/// wrote shows in the outputs.
pub const WORKSPACE_FILL: u8 = 0xFF;

impl Buffers {
    /// Runs the scheduler step and sizes every buffer for `p` on `be`.
    pub fn new(be: &dyn MlaBackend, p: &Problem) -> Result<Buffers> {
        let c = &p.case;
        let b = c.batch();
        let sh = c.shape();
        let parts = be.num_sm_parts(sh.q_seq_per_hk(), c.h_kv);
        let mut metadata = vec![0i32; parts * METADATA_WORDS];
        let mut num_splits = vec![0i32; b + 1];
        {
            let seq = HostTensor::new(&c.seqlens, &[b])?;
            let meta = HostTensorMut::new(&mut metadata, &[parts, METADATA_WORDS])?;
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
            out: vec![OUT_SENTINEL; p.out_len()],
            lse: vec![LSE_SENTINEL; p.lse_len()],
            block_table: p.block_table.clone(),
            seqlens: c.seqlens.clone(),
        })
    }

    /// Calls `decode` with these buffers.
    pub fn decode(&mut self, be: &dyn MlaBackend, p: &Problem) -> Result<()> {
        let c = &p.case;
        let b = c.batch();
        let (kshape, kstrides) = p.cache_layout();
        let q = p.q.tensor(&p.q_shape(), None)?;
        let k = p.cache.tensor(&kshape, Some(&kstrides))?;
        let bt = HostTensor::new(&self.block_table, &[b, p.max_blocks_per_seq])?;
        let seq = HostTensor::new(&self.seqlens, &[b])?;
        let parts = self.metadata.len() / METADATA_WORDS;
        let meta = HostTensor::new(&self.metadata, &[parts, METADATA_WORDS])?;
        let ns = HostTensor::new(&self.num_splits, &[b + 1])?;
        let dq = [c.descale_q];
        let dk = [c.descale_k];
        let (dq_t, dk_t) = (HostTensor::new(&dq[..], &[1])?, HostTensor::new(&dk[..], &[1])?);
        let (out_shape, out_strides) = (p.out_shape(), p.out_strides());
        let out = match c.dtype {
            DType::F16 => {
                HostTensorMut::strided::<f16>(self.out.reinterpret_cast_mut(), &out_shape, Some(&out_strides))?
            }
            _ => HostTensorMut::strided::<bf16>(self.out.reinterpret_cast_mut(), &out_shape, Some(&out_strides))?,
        };
        let lse = HostTensorMut::strided(&mut self.lse, &p.lse_shape(), Some(&p.lse_strides()))?;
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

    /// The outputs of `p` (the problem these buffers were made for), widened, in the reference's layout.
    pub fn outputs(&self, p: &Problem) -> Outputs {
        p.gather_outputs(&self.out, &self.lse, self.metadata.clone(), self.num_splits.clone())
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
    Ok(bufs.outputs(p))
}

/// The whole protocol on any backend: [`run_host`] on a host backend; on a CUDA backend the problem is uploaded to
/// its device through `flashmla::cuda` ([`DeviceBuffers`]), the metadata and decode steps run on the legacy
/// default stream, and the outputs and metadata come back.
pub fn run(be: &dyn MlaBackend, p: &Problem) -> Result<Outputs> {
    match be.capabilities().device {
        Device::Host => run_host(be, p),
        Device::Cuda(ordinal) => {
            let gpu = Gpu::open(ordinal)?;
            let mut dev = DeviceBuffers::upload(&gpu, be, p)?;
            dev.get_mla_metadata(be, p)?;
            dev.decode(be, p)?;
            dev.outputs(p)
        }
    }
}

/// The elements of one input tensor on a device, in their stored encoding.
#[derive(Debug)]
pub enum DeviceElems {
    /// bf16 or fp16 bit patterns.
    Bits16(CudaSlice<u16>),
    /// e4m3 codes.
    Bytes(CudaSlice<u8>),
}

impl DeviceElems {
    fn upload(stream: &Arc<CudaStream>, e: &Elems) -> Result<DeviceElems> {
        let up = driver_error("cuMemcpyHtoDAsync");
        Ok(match e {
            Elems::Bf16(v) | Elems::F16(v) => DeviceElems::Bits16(stream.clone_htod(v).map_err(up)?),
            Elems::E4M3(v) => DeviceElems::Bytes(stream.clone_htod(v).map_err(up)?),
        })
    }

    /// A read-only view as `dtype`, for work on `stream`.
    pub fn view<'a>(
        &'a self,
        stream: &'a CudaStream,
        dtype: DType,
        shape: &[usize],
        strides: Option<&[usize]>,
    ) -> Result<DeviceTensor<'a>> {
        match self {
            DeviceElems::Bits16(s) => DeviceTensor::with_dtype(stream, s, dtype.scalar(), shape, strides),
            DeviceElems::Bytes(s) => DeviceTensor::with_dtype(stream, s, dtype.scalar(), shape, strides),
        }
    }
}

/// A problem's buffers on a CUDA device, the device twin of [`Buffers`]: allocated on the legacy default stream of
/// a [`Gpu`], outputs prefilled with [`OUT_SENTINEL`] / [`LSE_SENTINEL`], metadata with [`METADATA_SENTINEL`], the
/// workspace with [`WORKSPACE_FILL`]. Tests may replace any buffer (e.g. an exact-size block table) or overwrite
/// one in place through [`DeviceBuffers::stream`] before a step.
#[derive(Debug)]
pub struct DeviceBuffers {
    /// `[b, s_q, h_q, 576]`.
    pub q: DeviceElems,
    /// The cache, in [`Problem::cache_layout`].
    pub cache: DeviceElems,
    /// `[b, max_blocks_per_seq]`.
    pub block_table: CudaSlice<i32>,
    /// `[b]`.
    pub seqlens: CudaSlice<i32>,
    /// `[1]`.
    pub descale_q: CudaSlice<f32>,
    /// `[1]`.
    pub descale_k: CudaSlice<f32>,
    /// `[parts, METADATA_WORDS]`.
    pub metadata: CudaSlice<i32>,
    /// `[b + 1]`.
    pub num_splits: CudaSlice<i32>,
    /// The workspace (at least one byte: an empty allocation has no address).
    pub workspace: CudaSlice<u8>,
    /// Output bit patterns in [`Problem::out_strides`].
    pub out: CudaSlice<u16>,
    /// LSE in [`Problem::lse_strides`].
    pub lse: CudaSlice<f32>,
    /// Rows of the metadata (`num_sm_parts` of the backend).
    pub parts: usize,
    stream: Arc<CudaStream>,
}

impl DeviceBuffers {
    /// Uploads `p` for `be` (which runs on `gpu`'s device), sizing metadata and workspace for it.
    pub fn upload(gpu: &Gpu, be: &dyn MlaBackend, p: &Problem) -> Result<DeviceBuffers> {
        let c = &p.case;
        let sh = c.shape();
        let parts = be.num_sm_parts(sh.q_seq_per_hk(), c.h_kv);
        let workspace_bytes = be.workspace_size(&sh)?;
        let stream = gpu.stream().clone();
        let up = driver_error("cuMemcpyHtoDAsync");
        Ok(DeviceBuffers {
            q: DeviceElems::upload(&stream, &p.q)?,
            cache: DeviceElems::upload(&stream, &p.cache)?,
            block_table: stream.clone_htod(&p.block_table).map_err(&up)?,
            seqlens: stream.clone_htod(&c.seqlens).map_err(&up)?,
            descale_q: stream.clone_htod(&[c.descale_q]).map_err(&up)?,
            descale_k: stream.clone_htod(&[c.descale_k]).map_err(&up)?,
            metadata: stream.clone_htod(&vec![METADATA_SENTINEL; parts * METADATA_WORDS]).map_err(&up)?,
            num_splits: stream.clone_htod(&vec![METADATA_SENTINEL; c.batch() + 1]).map_err(&up)?,
            workspace: stream.clone_htod(&vec![WORKSPACE_FILL; workspace_bytes.max(1)]).map_err(&up)?,
            out: stream.clone_htod(&vec![OUT_SENTINEL; p.out_len()]).map_err(&up)?,
            lse: stream.clone_htod(&vec![LSE_SENTINEL; p.lse_len()]).map_err(&up)?,
            parts,
            stream,
        })
    }

    /// The legacy default stream the buffers live on (and the views are taken for).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Views of the metadata step's arguments; the call goes on [`Stream::DEFAULT`] (or, under the caller's
    /// `unsafe` promise, another stream ordered with it).
    pub fn metadata_call(&mut self, p: &Problem) -> Result<MetadataCall<'_>> {
        let c = &p.case;
        let stream = &*self.stream;
        Ok(MetadataCall {
            seqlens: DeviceTensor::new(stream, &self.seqlens, &[c.batch()])?,
            metadata: DeviceTensorMut::new(stream, &mut self.metadata, &[self.parts, METADATA_WORDS])?,
            num_splits: DeviceTensorMut::new(stream, &mut self.num_splits, &[c.batch() + 1])?,
            q_seq_per_hk: c.shape().q_seq_per_hk(),
            h_kv: c.h_kv,
        })
    }

    /// Views of the decode step's arguments (same streams as [`DeviceBuffers::metadata_call`]).
    pub fn decode_call(&mut self, p: &Problem) -> Result<DecodeCall<'_>> {
        let c = &p.case;
        let b = c.batch();
        let stream = &*self.stream;
        let (kshape, kstrides) = p.cache_layout();
        let out = match c.dtype {
            DType::F16 => DeviceTensorMut::with_dtype(
                stream,
                &mut self.out,
                mla_core::ScalarType::F16,
                &p.out_shape(),
                Some(&p.out_strides()),
            )?,
            _ => DeviceTensorMut::with_dtype(
                stream,
                &mut self.out,
                mla_core::ScalarType::Bf16,
                &p.out_shape(),
                Some(&p.out_strides()),
            )?,
        };
        Ok(DecodeCall {
            q: self.q.view(stream, c.dtype, &p.q_shape(), None)?,
            k_cache: self.cache.view(stream, c.dtype, &kshape, Some(&kstrides))?,
            block_table: DeviceTensor::new(stream, &self.block_table, &[b, p.max_blocks_per_seq])?,
            seqlens: DeviceTensor::new(stream, &self.seqlens, &[b])?,
            metadata: DeviceTensor::new(stream, &self.metadata, &[self.parts, METADATA_WORDS])?,
            num_splits: DeviceTensor::new(stream, &self.num_splits, &[b + 1])?,
            descale_q: DeviceTensor::new(stream, &self.descale_q, &[1])?,
            descale_k: DeviceTensor::new(stream, &self.descale_k, &[1])?,
            out,
            lse: DeviceTensorMut::with_strides(stream, &mut self.lse, &p.lse_shape(), &p.lse_strides())?,
            workspace: DeviceWorkspace::new(stream, &mut self.workspace)?,
            softmax_scale: c.softmax_scale,
            causal: c.causal,
            e4m3: c.dtype == DType::E4M3,
        })
    }

    /// `get_mla_metadata` on [`Stream::DEFAULT`].
    pub fn get_mla_metadata(&mut self, be: &dyn MlaBackend, p: &Problem) -> Result<()> {
        let call = self.metadata_call(p)?;
        be.get_mla_metadata(&call.args(), Stream::DEFAULT)
    }

    /// `decode` on [`Stream::DEFAULT`].
    pub fn decode(&mut self, be: &dyn MlaBackend, p: &Problem) -> Result<()> {
        let call = self.decode_call(p)?;
        be.decode(&call.args(), call.workspace(), Stream::DEFAULT)
    }

    /// Downloads the outputs and metadata of `p` (waits for the stream), widened, in the reference's layout.
    pub fn outputs(&self, p: &Problem) -> Result<Outputs> {
        let down = driver_error("cuMemcpyDtoHAsync");
        let out = self.stream.clone_dtoh(&self.out).map_err(&down)?;
        let lse = self.stream.clone_dtoh(&self.lse).map_err(&down)?;
        let metadata = self.stream.clone_dtoh(&self.metadata).map_err(&down)?;
        let num_splits = self.stream.clone_dtoh(&self.num_splits).map_err(&down)?;
        Ok(p.gather_outputs(&out, &lse, metadata, num_splits))
    }
}

/// The views of one metadata step ([`DeviceBuffers::metadata_call`]).
#[derive(Debug)]
pub struct MetadataCall<'a> {
    seqlens: DeviceTensor<'a>,
    metadata: DeviceTensorMut<'a>,
    num_splits: DeviceTensorMut<'a>,
    q_seq_per_hk: usize,
    h_kv: usize,
}

impl MetadataCall<'_> {
    /// The arguments (they borrow the views).
    pub fn args(&self) -> MetadataArgs<'_> {
        MetadataArgs {
            cache_seqlens: self.seqlens.desc(),
            q_seq_per_hk: self.q_seq_per_hk,
            h_kv: self.h_kv,
            tile_scheduler_metadata: self.metadata.desc(),
            num_splits: self.num_splits.desc(),
        }
    }
}

/// The views of one decode step ([`DeviceBuffers::decode_call`]).
#[derive(Debug)]
pub struct DecodeCall<'a> {
    q: DeviceTensor<'a>,
    k_cache: DeviceTensor<'a>,
    block_table: DeviceTensor<'a>,
    seqlens: DeviceTensor<'a>,
    metadata: DeviceTensor<'a>,
    num_splits: DeviceTensor<'a>,
    descale_q: DeviceTensor<'a>,
    descale_k: DeviceTensor<'a>,
    out: DeviceTensorMut<'a>,
    lse: DeviceTensorMut<'a>,
    workspace: DeviceWorkspace<'a>,
    softmax_scale: Option<f32>,
    causal: bool,
    e4m3: bool,
}

impl DecodeCall<'_> {
    /// The arguments (they borrow the views; tests may replace any descriptor by one of a longer-lived view).
    pub fn args(&self) -> DecodeArgs<'_> {
        DecodeArgs {
            q: self.q.desc(),
            k_cache: self.k_cache.desc(),
            block_table: self.block_table.desc(),
            cache_seqlens: self.seqlens.desc(),
            head_dim_v: HEAD_DIM_V,
            tile_scheduler_metadata: self.metadata.desc(),
            num_splits: self.num_splits.desc(),
            softmax_scale: self.softmax_scale,
            causal: self.causal,
            descale_q: self.e4m3.then(|| self.descale_q.desc()),
            descale_k: self.e4m3.then(|| self.descale_k.desc()),
            out: self.out.desc(),
            lse: self.lse.desc(),
        }
    }

    /// The workspace (it borrows the view).
    pub fn workspace(&self) -> Workspace<'_> {
        self.workspace.workspace()
    }
}

/// The float64 reference: `out [b, s_q, h_q, 512]` and `lse [b, h_q, s_q]` straight from the definition.
///
/// Spread over the machine's threads (GPU grids have requests of 16k tokens and 128 heads); every value is computed
/// by the same sequential code whatever the split, so the result does not depend on the thread count.
pub fn reference(p: &Problem) -> (Vec<f64>, Vec<f64>) {
    reference_on(p, std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs `f(chunk index, chunk)` over `data` cut into `chunk`-element pieces, on up to `threads` scoped threads.
fn par_chunks<T: Send>(data: &mut [T], chunk: usize, threads: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunks: Vec<(usize, &mut [T])> = data.chunks_mut(chunk.max(1)).enumerate().collect();
    let per_thread = chunks.len().div_ceil(threads.max(1)).max(1);
    let mut groups: Vec<Vec<(usize, &mut [T])>> = Vec::new();
    let mut rest = chunks.into_iter().peekable();
    while rest.peek().is_some() {
        groups.push(rest.by_ref().take(per_thread).collect());
    }
    std::thread::scope(|scope| {
        for group in groups {
            let f = &f;
            scope.spawn(move || group.into_iter().for_each(|(k, c)| f(k, c)));
        }
    });
}

fn reference_on(p: &Problem, threads: usize) -> (Vec<f64>, Vec<f64>) {
    let c = &p.case;
    let b = c.batch();
    let hpk = c.h_q / c.h_kv;
    let scale = c.softmax_scale.map_or(1.0 / (HEAD_DIM_K as f64).sqrt(), |s| s as f64);
    let mut out = vec![0f64; b * c.s_q * c.h_q * HEAD_DIM_V];
    let mut lse = vec![0f64; b * c.h_q * c.s_q];
    // Rows of one request, in `out`'s order: (t, h).
    let rows = c.s_q * c.h_q;
    for i in 0..b {
        let s_k = c.seqlens[i].max(0) as usize;
        // The request's keys, dequantized once: kd[(j·h_kv + g)·576 + d].
        let row_k = c.h_kv * HEAD_DIM_K;
        let mut kd = vec![0f64; s_k * row_k];
        par_chunks(&mut kd, row_k, threads, |j, key| {
            for (x, (g, d)) in key.iter_mut().zip((0..c.h_kv).flat_map(|g| (0..HEAD_DIM_K).map(move |d| (g, d)))) {
                *x = p.k(i, j, g, d);
            }
        });
        let krow = |j: usize, g: usize| &kd[(j * c.h_kv + g) * HEAD_DIM_K..][..HEAD_DIM_K];
        // One chunk per (t, h) row: the 512 outputs, then the lse in the last slot.
        let mut rows_out = vec![0f64; rows * (HEAD_DIM_V + 1)];
        par_chunks(&mut rows_out, HEAD_DIM_V + 1, threads, |row, o| {
            let (t, h) = (row / c.h_q, row % c.h_q);
            let visible = if c.causal && c.s_q > 1 {
                (s_k as i64 - c.s_q as i64 + t as i64 + 1).clamp(0, s_k as i64) as usize
            } else {
                s_k
            };
            if visible == 0 {
                o[HEAD_DIM_V] = f64::INFINITY;
                return;
            }
            let g = h / hpk;
            let q: Vec<f64> = (0..HEAD_DIM_K).map(|d| p.q(i, t, h, d)).collect();
            let scores: Vec<f64> =
                (0..visible).map(|j| scale * q.iter().zip(krow(j, g)).map(|(a, b)| a * b).sum::<f64>()).collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
            o[HEAD_DIM_V] = m + z.ln();
            for (j, s) in scores.iter().enumerate() {
                let w = (s - m).exp() / z;
                for (x, v) in o[..HEAD_DIM_V].iter_mut().zip(krow(j, g)) {
                    *x += w * v;
                }
            }
        });
        for (row, o) in rows_out.chunks_exact(HEAD_DIM_V + 1).enumerate() {
            let (t, h) = (row / c.h_q, row % c.h_q);
            out[((i * c.s_q + t) * c.h_q + h) * HEAD_DIM_V..][..HEAD_DIM_V].copy_from_slice(&o[..HEAD_DIM_V]);
            lse[(i * c.h_q + h) * c.s_q + t] = o[HEAD_DIM_V];
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

    /// `out` of a tensor-core backend on 16-bit inputs: upstream's two bf16 ulps (rel 2.01/128), abs 8e-4,
    /// cos 5e-6.
    pub const TENSOR_CORE_OUT: Tol = Tol { abs: 8e-4, rel: 2.01 / 128.0, cos: 5e-6 };

    /// `out` of a tensor-core backend on e4m3 inputs: upstream's FP8 bar, `cos_diff < 1e-2` with the anomaly
    /// positions equal and no elementwise bound.
    pub const E4M3_TENSOR_CORE_OUT: Tol = Tol { abs: f64::INFINITY, rel: f64::INFINITY, cos: 1e-2 };

    /// `lse` of a tensor-core backend on e4m3 inputs: upstream's FP8 bar, `cos_diff < 1e-5`, no elementwise bound.
    pub const E4M3_TENSOR_CORE_LSE: Tol = Tol { abs: f64::INFINITY, rel: f64::INFINITY, cos: 1e-5 };

    /// The same for an lse of fewer than [`COS_MIN_VALUES`] finite values: each within 1e-2 (the FP8 tensor cores'
    /// reduced-precision accumulation of Q·Kᵀ costs about 1e-3 of a logit), no cosine.
    pub const E4M3_TENSOR_CORE_LSE_FEW: Tol = Tol { abs: 1e-2, rel: 0.0, cos: f64::INFINITY };
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

/// What one comparison found: the largest errors, `cos_diff`, and the first violation of its tolerance.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Largest `|a − r|` over the finite elements.
    pub max_abs: f64,
    /// Largest `|a − r| / (|r| + 1e-6)` over the finite elements.
    pub max_rel: f64,
    /// `cos_diff` over the finite elements (the anomalies count as 0 on both sides).
    pub cos_diff: f64,
    /// Finite elements compared.
    pub finite: usize,
    /// The first violation, if any.
    pub failure: Option<String>,
}

impl Report {
    /// `Ok` if nothing was violated, else the first violation.
    pub fn result(&self) -> std::result::Result<(), String> {
        self.failure.clone().map_or(Ok(()), Err)
    }
}

/// Upstream's check: the positions of ±inf and NaN match exactly, then elementwise abs-or-rel, then `cos_diff`;
/// every element is looked at, and the report keeps the first violation.
pub fn compare(what: &str, actual: &[f32], want: &[f64], tol: Tol) -> Report {
    let mut rep = Report { max_abs: 0.0, max_rel: 0.0, cos_diff: 0.0, finite: 0, failure: None };
    if actual.len() != want.len() {
        rep.failure = Some(format!("{what}: {} elements, reference has {}", actual.len(), want.len()));
        return rep;
    }
    let mut a64 = Vec::with_capacity(actual.len());
    let mut r64 = Vec::with_capacity(actual.len());
    for (k, (&a, &r)) in actual.iter().zip(want).enumerate() {
        let a = a as f64;
        let class = |x: f64| (x.is_nan(), x == f64::INFINITY, x == f64::NEG_INFINITY);
        if class(a) != class(r) {
            rep.failure
                .get_or_insert_with(|| format!("{what}[{k}]: got {a}, reference {r} (anomaly positions differ)"));
            a64.push(0.0);
            r64.push(0.0);
            continue;
        }
        if !a.is_finite() {
            a64.push(0.0);
            r64.push(0.0);
            continue;
        }
        let err = (a - r).abs();
        let rel = err / (r.abs() + 1e-6);
        rep.max_abs = rep.max_abs.max(err);
        rep.max_rel = rep.max_rel.max(rel);
        rep.finite += 1;
        if !(err < tol.abs || rel < tol.rel) {
            rep.failure.get_or_insert_with(|| {
                format!("{what}[{k}]: got {a:e}, reference {r:e}, |err| {err:e} (tolerance {tol:?})")
            });
        }
        a64.push(a);
        r64.push(r);
    }
    rep.cos_diff = cos_diff(&a64, &r64);
    if rep.cos_diff.abs() > tol.cos {
        rep.failure.get_or_insert_with(|| format!("{what}: cos_diff {:e} > {}", rep.cos_diff, tol.cos));
    }
    rep
}

/// [`compare`], as a result: a description of the first failure.
pub fn check_close(what: &str, actual: &[f32], want: &[f64], tol: Tol) -> std::result::Result<(), String> {
    compare(what, actual, want, tol).result()
}

/// How a backend computes, which sets the bar its results are held to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accuracy {
    /// f32 arithmetic throughout, softmax weights kept in f32 (the CPU backend): `out` within one ulp of the
    /// rounded reference.
    Exact,
    /// Tensor cores (GPU backends): softmax weights rounded to the input type before `P·V`, e4m3 products
    /// accumulated with fewer bits than f32; upstream FlashMLA's test bars.
    TensorCore,
}

impl Accuracy {
    /// Host backends compute exactly, device backends on tensor cores.
    pub fn of(caps: &Capabilities) -> Accuracy {
        if caps.device == Device::Host { Accuracy::Exact } else { Accuracy::TensorCore }
    }
}

/// Fewest finite lse values on which a `cos_diff` criterion means something: below it, a tensor is held to
/// [`Bar::lse_few`] (a cosine of one or two values is a ratio of two rounding errors).
pub const COS_MIN_VALUES: usize = 64;

/// The tolerances one backend's results in one dtype are held to against the float64 reference.
#[derive(Clone, Copy, Debug)]
pub struct Bar {
    /// For `out` (against the reference rounded to the out dtype).
    pub out: Tol,
    /// For `lse`.
    pub lse: Tol,
    /// For an `lse` with fewer than [`COS_MIN_VALUES`] finite values.
    pub lse_few: Tol,
}

impl Bar {
    /// The bar of a backend that computes as `accuracy` says, on inputs of `dtype`.
    pub fn new(accuracy: Accuracy, dtype: DType) -> Bar {
        match (accuracy, dtype) {
            (Accuracy::Exact, _) => Bar { out: Tol::out(dtype), lse: Tol::lse(), lse_few: Tol::lse() },
            (Accuracy::TensorCore, DType::E4M3) => Bar {
                out: Tol::E4M3_TENSOR_CORE_OUT,
                lse: Tol::E4M3_TENSOR_CORE_LSE,
                lse_few: Tol::E4M3_TENSOR_CORE_LSE_FEW,
            },
            (Accuracy::TensorCore, _) => Bar { out: Tol::TENSOR_CORE_OUT, lse: Tol::lse(), lse_few: Tol::lse() },
        }
    }

    /// The bar of the backend with these capabilities ([`Accuracy::of`]).
    pub fn of(caps: &Capabilities, dtype: DType) -> Bar {
        Bar::new(Accuracy::of(caps), dtype)
    }
}

/// Compares outputs with wanted values (`want_out` already in the out dtype's values), each at its tolerance of
/// `bar`: the reports for `out` and `lse`.
pub fn compare_outputs(got: &Outputs, want_out: &[f64], want_lse: &[f64], bar: Bar) -> (Report, Report) {
    let finite_lse = want_lse.iter().filter(|x| x.is_finite()).count();
    let lse_tol = if finite_lse < COS_MIN_VALUES { bar.lse_few } else { bar.lse };
    (compare("out", &got.out, want_out, bar.out), compare("lse", &got.lse, want_lse, lse_tol))
}

/// The float64 reference of `p` with `out` rounded to the out dtype: what an exact kernel would store.
pub fn rounded_reference(p: &Problem) -> (Vec<f64>, Vec<f64>) {
    let (out, lse) = reference(p);
    let dt = p.case.dtype;
    (out.iter().map(|&x| round_to_out(dt, x)).collect(), lse)
}

/// Checks a backend's outputs for `p` against the float64 reference at `bar`.
pub fn check_against_reference_at(p: &Problem, got: &Outputs, bar: Bar) -> std::result::Result<(), String> {
    let (out, lse) = rounded_reference(p);
    let (o, l) = compare_outputs(got, &out, &lse, bar);
    o.result().and(l.result())
}

/// Checks an exact backend's outputs for `p` against the float64 reference ([`Accuracy::Exact`]).
pub fn check_against_reference(p: &Problem, got: &Outputs) -> std::result::Result<(), String> {
    check_against_reference_at(p, got, Bar::new(Accuracy::Exact, p.case.dtype))
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

/// The filter of tests that run on host and device memory alike ([`run`], which uploads to a CUDA backend's
/// device): every backend.
pub fn any_memory(_caps: &Capabilities) -> bool {
    true
}

impl Case {
    /// This case as `caps`' backend can run it: the page size replaced by the backend's first one when it takes
    /// only others (the rest of the case is unchanged); `None` when it lacks the dtype.
    pub fn fit_to(&self, caps: &Capabilities) -> Option<Case> {
        if !caps.dtypes.contains(&self.dtype) {
            return None;
        }
        let mut c = self.clone();
        if !caps.page_sizes.accepts(c.page_size) {
            match &caps.page_sizes {
                mla_core::PageSizes::Only(sizes) => c.page_size = *sizes.first()?,
                mla_core::PageSizes::Any => return None,
            }
        }
        Some(c)
    }
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

    #[test]
    fn any_memory_adds_the_device_backends_that_open() {
        let ran = for_each_backend(any_memory, |_| {});
        assert_eq!(ran[0], "cpu");
        let gpu_opens = flashmla::open_backend("hopper", 0).is_ok();
        assert_eq!(ran.len(), 1 + usize::from(gpu_opens), "{ran:?}");
    }

    #[test]
    fn run_on_a_host_backend_is_run_host() {
        let cpu = flashmla::CpuBackend::new();
        let p = Problem::generate(&Case::new(&[70, 3], 2, 4));
        assert!(run(&cpu, &p).unwrap().bitwise_eq(&run_host(&cpu, &p).unwrap()));
    }

    #[test]
    fn strided_outputs_give_the_same_numbers() {
        let cpu = flashmla::CpuBackend::new();
        for dtype in [DType::Bf16, DType::F16] {
            let mut c = Case::new(&[130, 0, 9], 3, 4);
            c.dtype = dtype;
            c.causal = true;
            let compact = run_host(&cpu, &Problem::generate(&c)).unwrap();
            c.strided_outputs = true;
            let p = Problem::generate(&c);
            assert_eq!(p.out_strides(), [3 * 4 * (HEAD_DIM_V + OUT_ROW_PAD), 4 * (HEAD_DIM_V + OUT_ROW_PAD), 520, 1]);
            assert_eq!(p.lse_strides(), [12, 1, 4]);
            let mut bufs = Buffers::new(&cpu, &p).unwrap();
            bufs.decode(&cpu, &p).unwrap();
            assert!(bufs.outputs(&p).bitwise_eq(&compact), "{dtype}");
            // The padding is never written.
            let row = HEAD_DIM_V + OUT_ROW_PAD;
            assert!(bufs.out.chunks_exact(row).all(|r| r[HEAD_DIM_V..].iter().all(|&x| x == OUT_SENTINEL)));
        }
    }

    #[test]
    fn block_table_width_and_fill() {
        let mut c = Case::new(&[128, 1], 1, 2);
        c.block_table_width = Some(5);
        c.block_table_fill = Some(UNUSED_PAGE);
        let p = Problem::generate(&c);
        assert_eq!(p.max_blocks_per_seq, 5);
        assert!(p.block_table[2..5].iter().chain(&p.block_table[6..]).all(|&x| x == UNUSED_PAGE));
        assert!(p.block_table[..2].iter().chain(&p.block_table[5..6]).all(|&x| (0..p.num_blocks as i32).contains(&x)));
        let cpu = flashmla::CpuBackend::new();
        check_against_reference(&p, &run_host(&cpu, &p).unwrap()).unwrap();
    }

    #[test]
    #[should_panic(expected = "block_table_width 1 < the 2 pages")]
    fn a_block_table_narrower_than_a_request_is_refused() {
        let mut c = Case::new(&[65], 1, 1);
        c.block_table_width = Some(1);
        Problem::generate(&c);
    }

    #[test]
    fn e4m3_descales_from_amax_and_unclamped_values() {
        let mut c = Case::new(&[300, 40], 2, 8);
        c.dtype = DType::E4M3;
        c.spread = 3.0;
        c.clamp = f64::INFINITY;
        c.descale_from_amax = true;
        let p = Problem::generate(&c);
        let Elems::E4M3(q) = &p.q else { panic!("e4m3 q") };
        // The largest |q| lands on the largest code (0x7E, ±448).
        assert!(q.iter().any(|&x| x & 0x7F == 0x7E), "no code at ±448");
        assert!(p.case.descale_q > 1.0 / E4M3_MAX && p.case.descale_k > 1.0 / E4M3_MAX, "values beyond ±1");
        let cpu = flashmla::CpuBackend::new();
        check_against_reference(&p, &run_host(&cpu, &p).unwrap()).unwrap();
    }

    #[test]
    fn the_reference_does_not_depend_on_the_thread_count() {
        let mut c = Case::new(&[200, 0, 77], 2, 6);
        c.h_kv = 2;
        c.causal = true;
        let p = Problem::generate(&c);
        let one = reference_on(&p, 1);
        for threads in [2, 5, 64] {
            let (out, lse) = reference_on(&p, threads);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!((bits(&out), bits(&lse)), (bits(&one.0), bits(&one.1)), "{threads} threads");
        }
    }

    #[test]
    fn bars_of_exact_and_tensor_core_backends() {
        let cpu = flashmla::CpuBackend::new();
        assert_eq!(Accuracy::of(cpu.capabilities()), Accuracy::Exact);
        let tc = Bar::new(Accuracy::TensorCore, DType::Bf16);
        assert_eq!(tc.out.rel, 2.01 / 128.0);
        let e4 = Bar::new(Accuracy::TensorCore, DType::E4M3);
        let got = Outputs { out: vec![1.0; 4], lse: vec![2.0, f32::INFINITY], metadata: (vec![], vec![]) };
        // Few lse values: an absolute bound instead of a cosine.
        let (o, l) = compare_outputs(&got, &[1.001; 4], &[2.005, f64::INFINITY], e4);
        assert!(o.failure.is_none() && l.failure.is_none(), "{o:?} {l:?}");
        let (_, l) = compare_outputs(&got, &[1.0; 4], &[2.02, f64::INFINITY], e4);
        assert!(l.failure.is_some());
        // Anomaly positions must match whatever the bar.
        let (_, l) = compare_outputs(&got, &[1.0; 4], &[2.0, 3.0], e4);
        assert!(l.failure.unwrap().contains("anomaly"));
        let r = compare("x", &[1.0, 2.0], &[1.0, 2.5], Tol::lse());
        assert_eq!((r.finite, r.max_abs), (2, 0.5));
        assert!(r.failure.unwrap().contains("x[1]"));
    }

    #[test]
    fn fit_to_a_backend_with_only_64_token_pages() {
        let mut caps = flashmla::CpuBackend::new().capabilities().clone();
        caps.page_sizes = mla_core::PageSizes::Only(vec![64]);
        let mut c = Case::new(&[100], 1, 2);
        c.page_size = 16;
        assert_eq!(c.fit_to(&caps).unwrap().page_size, 64);
        caps.dtypes = vec![DType::Bf16];
        c.dtype = DType::F16;
        assert!(c.fit_to(&caps).is_none());
    }
}
