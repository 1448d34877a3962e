//! Owned decode problems in host memory: what the CLI reads from `.npy` files, what the demo and the benches
//! generate, and a runner that drives any host backend through the whole protocol.
//!
//! | item | what |
//! |---|---|
//! | [`HostProblem`] | inputs in their stored encoding (bf16/fp16 bits, e4m3 codes), block table, lengths, flags |
//! | [`RandomSpec`] / [`HostProblem::random`] | an engine-like random problem: varlen, NaN-poisoned cache tails and unused pages, a permuted block table with garbage past each request's last page |
//! | [`HostRun`] | metadata + workspace + outputs sized once; [`HostRun::decode`] can be repeated for timing |
//! | [`HostProblem::flops`], [`HostProblem::bytes`] | upstream's formulas |

use mla_core::dtype::{E4M3_TO_F32, bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_e4m3, f32_to_f16};
use mla_core::{
    DType, DecodeArgs, DecodeShape, Device, Error, HEAD_DIM_K, HEAD_DIM_V, MetadataArgs, MlaBackend, Result,
    ScalarType, Stream, TensorDesc, Workspace,
};

/// Elements of an input tensor in their stored encoding.
#[derive(Clone, Debug, PartialEq)]
pub enum Elems {
    /// bf16 or fp16 bit patterns.
    U16(Vec<u16>),
    /// e4m3 codes.
    U8(Vec<u8>),
}

impl Elems {
    /// Rounds f32 values to `dtype` (round to nearest even; e4m3 stores `e4m3(x / descale)`, saturating to ±448).
    pub fn encode(dtype: DType, x: &[f32], descale: f32) -> Elems {
        match dtype {
            DType::Bf16 => Elems::U16(x.iter().map(|&v| f32_to_bf16(v)).collect()),
            DType::F16 => Elems::U16(x.iter().map(|&v| f32_to_f16(v)).collect()),
            DType::E4M3 => Elems::U8(x.iter().map(|&v| f32_to_e4m3(v / descale)).collect()),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Elems::U16(v) => v.len(),
            Elems::U8(v) => v.len(),
        }
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` widened exactly (stored value, descale not applied).
    pub fn get(&self, dtype: DType, i: usize) -> f32 {
        match (self, dtype) {
            (Elems::U16(v), DType::Bf16) => bf16_to_f32(v[i]),
            (Elems::U16(v), _) => f16_to_f32(v[i]),
            (Elems::U8(v), _) => E4M3_TO_F32[v[i] as usize],
        }
    }
}

/// A decode problem whose data lives in host memory.
#[derive(Clone, Debug)]
pub struct HostProblem {
    /// Input dtype.
    pub dtype: DType,
    /// Requests.
    pub batch: usize,
    /// Query tokens per request.
    pub s_q: usize,
    /// Query heads.
    pub h_q: usize,
    /// KV heads.
    pub h_kv: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// Pages in the cache.
    pub num_blocks: usize,
    /// Columns of the block table.
    pub max_blocks_per_seq: usize,
    /// `[b, s_q, h_q, 576]`.
    pub q: Elems,
    /// `[num_blocks, page_size, h_kv, 576]`.
    pub kv: Elems,
    /// `[b, max_blocks_per_seq]`.
    pub block_table: Vec<i32>,
    /// `[b]`.
    pub seqlens: Vec<i32>,
    /// Bottom-right causal mask.
    pub causal: bool,
    /// `None`: `576^-0.5`.
    pub softmax_scale: Option<f32>,
    /// e4m3 only (ignored otherwise).
    pub descale_q: f32,
    /// e4m3 only (ignored otherwise).
    pub descale_k: f32,
}

/// Parameters of [`HostProblem::random`].
#[derive(Clone, Debug)]
pub struct RandomSpec {
    /// Requests.
    pub batch: usize,
    /// Query tokens per request.
    pub s_q: usize,
    /// Query heads.
    pub h_q: usize,
    /// KV heads.
    pub h_kv: usize,
    /// Mean length.
    pub mean_seqlen: usize,
    /// Lengths `max(N(mean, mean/2), s_q)` (upstream's varlen) instead of all equal to the mean.
    pub varlen: bool,
    /// Tokens per page.
    pub page_size: usize,
    /// Input dtype.
    pub dtype: DType,
    /// Bottom-right causal mask.
    pub causal: bool,
    /// Seed.
    pub seed: u64,
}

/// SplitMix64.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// Approximately standard normal: a centred sum of four uniforms (Irwin–Hall), cheap enough to fill
    /// gigabyte caches quickly; the tails end at ±3.46σ.
    pub(crate) fn normal(&mut self) -> f64 {
        let x = self.next();
        let u = |k: u32| ((x >> (16 * k)) & 0xFFFF) as f64 / 65536.0;
        (u(0) + u(1) + u(2) + u(3) - 2.0) * 3f64.sqrt()
    }
}

impl HostProblem {
    /// The sizes fixing buffer shapes.
    pub fn shape(&self) -> DecodeShape {
        DecodeShape { batch: self.batch, s_q: self.s_q, h_q: self.h_q, h_kv: self.h_kv, dtype: self.dtype }
    }

    /// Σ lengths.
    pub fn total_seqlen(&self) -> u64 {
        self.seqlens.iter().map(|&s| s.max(0) as u64).sum()
    }

    /// Upstream's FLOPs: `2·s_q·Σs_k·h_q·(576 + 512)` (mask ignored).
    pub fn flops(&self) -> f64 {
        2.0 * self.s_q as f64 * self.total_seqlen() as f64 * self.h_q as f64 * (HEAD_DIM_K + HEAD_DIM_V) as f64
    }

    /// Upstream's bytes: `elt·(Σs_k·h_kv·576 + b·s_q·h_q·576) + out_elt·b·s_q·h_q·512`.
    pub fn bytes(&self) -> f64 {
        let elt = self.dtype.size_bytes() as f64;
        let out_elt = self.dtype.out_dtype().size_bytes() as f64;
        let rows = (self.batch * self.s_q * self.h_q) as f64;
        elt * (self.total_seqlen() as f64 * self.h_kv as f64 * HEAD_DIM_K as f64 + rows * HEAD_DIM_K as f64)
            + out_elt * rows * HEAD_DIM_V as f64
    }

    /// An engine-like random problem. q and valid cache rows are `clamp(N(0, 0.1²), ±1)` (upstream's test data;
    /// e4m3 uses descales 1/64 and 1/128 so the codes span their range); cache rows past each length and pages no
    /// request uses are NaN; the block table is a random permutation of pages, with out-of-range garbage after
    /// each request's last page.
    pub fn random(spec: &RandomSpec) -> HostProblem {
        let mut rng = Rng(spec.seed ^ 0x005E_ED0F_F1A5);
        let (b, ps) = (spec.batch, spec.page_size.max(1));
        let mean = spec.mean_seqlen as f64;
        let seqlens: Vec<i32> = (0..b)
            .map(|_| {
                let s = if spec.varlen { (mean + rng.normal() * mean / 2.0).round() } else { mean };
                s.max(spec.s_q as f64).min(i32::MAX as f64 / 2.0) as i32
            })
            .collect();
        let pages: Vec<usize> = seqlens.iter().map(|&s| (s as usize).div_ceil(ps)).collect();
        let used: usize = pages.iter().sum();
        let num_blocks = used + 2; // two pages nobody references
        let max_blocks_per_seq = pages.iter().copied().max().unwrap_or(0) + 1;
        let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.below(i + 1));
        }
        let mut block_table = vec![i32::MAX; b * max_blocks_per_seq];
        let mut next = ids.iter();
        for i in 0..b {
            for p in 0..pages[i] {
                block_table[i * max_blocks_per_seq + p] = *next.next().expect("enough pages");
            }
        }
        let (dq, dk) = if spec.dtype == DType::E4M3 { (1.0 / 64.0, 1.0 / 128.0) } else { (1.0, 1.0) };
        let mut val = || (rng.normal() * 0.1).clamp(-1.0, 1.0) as f32;
        let qv: Vec<f32> = (0..b * spec.s_q * spec.h_q * HEAD_DIM_K).map(|_| val()).collect();
        let row = spec.h_kv * HEAD_DIM_K;
        let mut kv = vec![f32::NAN; num_blocks * ps * row];
        for i in 0..b {
            for j in 0..seqlens[i] as usize {
                let page = block_table[i * max_blocks_per_seq + j / ps] as usize;
                let at = (page * ps + j % ps) * row;
                kv[at..at + row].iter_mut().for_each(|x| *x = val());
            }
        }
        HostProblem {
            dtype: spec.dtype,
            batch: b,
            s_q: spec.s_q,
            h_q: spec.h_q,
            h_kv: spec.h_kv,
            page_size: ps,
            num_blocks,
            max_blocks_per_seq,
            q: Elems::encode(spec.dtype, &qv, dq),
            kv: Elems::encode(spec.dtype, &kv, dk),
            block_table,
            seqlens,
            causal: spec.causal,
            softmax_scale: None,
            descale_q: dq,
            descale_k: dk,
        }
    }

    /// Query element, dequantized (descale applied for e4m3).
    pub fn q_at(&self, i: usize, t: usize, h: usize, d: usize) -> f32 {
        let v = self.q.get(self.dtype, ((i * self.s_q + t) * self.h_q + h) * HEAD_DIM_K + d);
        if self.dtype == DType::E4M3 { v * self.descale_q } else { v }
    }

    /// Cache element `d` of token `j` of request `i`, KV head `g`, dequantized. Panics on an invalid page.
    pub fn k_at(&self, i: usize, j: usize, g: usize, d: usize) -> f32 {
        let page = self.block_table[i * self.max_blocks_per_seq + j / self.page_size] as usize;
        let v =
            self.kv.get(self.dtype, ((page * self.page_size + j % self.page_size) * self.h_kv + g) * HEAD_DIM_K + d);
        if self.dtype == DType::E4M3 { v * self.descale_k } else { v }
    }
}

/// Outputs of one run: `out [b, s_q, h_q, 512]` widened from the out dtype, `lse [b, h_q, s_q]`.
#[derive(Clone, Debug, PartialEq)]
pub struct HostOutputs {
    /// The out-dtype values, widened to f32.
    pub out: Vec<f32>,
    /// Natural-log LSE (`+inf` for rows that saw nothing).
    pub lse: Vec<f32>,
}

impl HostOutputs {
    /// Bitwise equality (NaN payloads included).
    pub fn bitwise_eq(&self, other: &HostOutputs) -> bool {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        bits(&self.out) == bits(&other.out) && bits(&self.lse) == bits(&other.lse)
    }
}

/// One problem bound to one host backend: metadata computed, workspace and outputs allocated.
pub struct HostRun<'a> {
    backend: &'a dyn MlaBackend,
    problem: &'a HostProblem,
    metadata: Vec<i32>,
    num_splits: Vec<i32>,
    workspace: Vec<f32>,
    workspace_bytes: usize,
    out: Vec<u16>,
    lse: Vec<f32>,
    descales: [f32; 2],
}

/// A descriptor of a buffer the backend only reads.
fn desc<'b, T>(v: &'b [T], dtype: ScalarType, shape: &[usize]) -> Result<TensorDesc<'b>> {
    check_len(v.len(), dtype, std::mem::size_of::<T>(), shape)?;
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    // SAFETY: the slice holds exactly the contiguous shape's elements of `dtype` (checked above) and is borrowed
    // for 'b; HostRun passes only these read-only buffers as inputs.
    unsafe { TensorDesc::from_raw_contiguous(v.as_ptr().cast_mut().cast(), dtype, &shape, Device::Host) }
}

/// A descriptor of a buffer the backend writes (the pointer comes from a unique borrow).
fn desc_mut<'b, T>(v: &'b mut [T], dtype: ScalarType, shape: &[usize]) -> Result<TensorDesc<'b>> {
    check_len(v.len(), dtype, std::mem::size_of::<T>(), shape)?;
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    // SAFETY: as in `desc`, and the slice is borrowed uniquely for 'b, so writes through it are allowed.
    unsafe { TensorDesc::from_raw_contiguous(v.as_mut_ptr().cast(), dtype, &shape, Device::Host) }
}

/// The buffer holds exactly the shape's elements, stored as `dtype` (the element type of the slice may be the
/// bit pattern's integer type: `u16` for bf16/fp16, `u8` for e4m3).
fn check_len(len: usize, dtype: ScalarType, elem_bytes: usize, shape: &[usize]) -> Result<()> {
    let need: usize = shape.iter().product();
    if len != need || elem_bytes != dtype.size_bytes() {
        return Err(Error::invalid("host buffer", format!("{need} elements of {dtype} for shape {shape:?}"), len));
    }
    Ok(())
}

impl<'a> HostRun<'a> {
    /// Runs the scheduler step and sizes every buffer. The backend must live on the host.
    pub fn new(backend: &'a dyn MlaBackend, problem: &'a HostProblem) -> Result<Self> {
        if backend.capabilities().device != Device::Host {
            return Err(Error::Unsupported {
                backend: backend.name().into(),
                reason: "HostRun drives host backends only (device buffers need the backend's own allocator)".into(),
            });
        }
        let sh = problem.shape();
        if sh.h_kv == 0 || !sh.h_q.is_multiple_of(sh.h_kv) {
            return Err(Error::invalid("h_q", format!("a multiple of h_kv = {}", sh.h_kv), sh.h_q));
        }
        let b = problem.batch;
        let parts = backend.num_sm_parts(sh.q_seq_per_hk(), sh.h_kv);
        let mut metadata = vec![0i32; parts * 8];
        let mut num_splits = vec![0i32; b + 1];
        let args = MetadataArgs {
            cache_seqlens: desc(&problem.seqlens, ScalarType::I32, &[b])?,
            q_seq_per_hk: sh.q_seq_per_hk(),
            h_kv: sh.h_kv,
            tile_scheduler_metadata: desc_mut(&mut metadata, ScalarType::I32, &[parts, 8])?,
            num_splits: desc_mut(&mut num_splits, ScalarType::I32, &[b + 1])?,
        };
        backend.get_mla_metadata(&args, Stream::DEFAULT)?;
        let workspace_bytes = backend.workspace_size(&sh)?;
        Ok(HostRun {
            backend,
            problem,
            metadata,
            num_splits,
            workspace: vec![0f32; workspace_bytes.div_ceil(4)],
            workspace_bytes,
            out: vec![0u16; b * problem.s_q * problem.h_q * HEAD_DIM_V],
            lse: vec![0f32; b * problem.h_q * problem.s_q],
            descales: [problem.descale_q, problem.descale_k],
        })
    }

    /// `tile_scheduler_metadata` (flattened) and `num_splits` as computed by the backend.
    pub fn metadata(&self) -> (&[i32], &[i32]) {
        (&self.metadata, &self.num_splits)
    }

    /// One decode call (synchronous on host backends).
    pub fn decode(&mut self) -> Result<()> {
        let p = self.problem;
        let (b, dt) = (p.batch, p.dtype);
        let e4m3 = dt == DType::E4M3;
        let args = DecodeArgs {
            q: desc_elems(&p.q, dt, &[b, p.s_q, p.h_q, HEAD_DIM_K])?,
            k_cache: desc_elems(&p.kv, dt, &[p.num_blocks, p.page_size, p.h_kv, HEAD_DIM_K])?,
            block_table: desc(&p.block_table, ScalarType::I32, &[b, p.max_blocks_per_seq])?,
            cache_seqlens: desc(&p.seqlens, ScalarType::I32, &[b])?,
            head_dim_v: HEAD_DIM_V,
            tile_scheduler_metadata: desc(&self.metadata, ScalarType::I32, &[self.metadata.len() / 8, 8])?,
            num_splits: desc(&self.num_splits, ScalarType::I32, &[b + 1])?,
            softmax_scale: p.softmax_scale,
            causal: p.causal,
            descale_q: if e4m3 { Some(desc(&self.descales[..1], ScalarType::F32, &[1])?) } else { None },
            descale_k: if e4m3 { Some(desc(&self.descales[1..], ScalarType::F32, &[1])?) } else { None },
            out: desc_mut(&mut self.out, dt.out_dtype(), &[b, p.s_q, p.h_q, HEAD_DIM_V])?,
            lse: desc_mut(&mut self.lse, ScalarType::F32, &[b, p.h_q, p.s_q])?,
        };
        let ws = Workspace::host(&mut self.workspace[..self.workspace_bytes.div_ceil(4)]);
        self.backend.decode(&args, ws, Stream::DEFAULT)
    }

    /// The outputs of the last [`HostRun::decode`], widened.
    pub fn outputs(&self) -> HostOutputs {
        let out = match self.problem.dtype.out_dtype() {
            ScalarType::F16 => self.out.iter().map(|&x| f16_to_f32(x)).collect(),
            _ => self.out.iter().map(|&x| bf16_to_f32(x)).collect(),
        };
        HostOutputs { out, lse: self.lse.clone() }
    }
}

fn desc_elems<'b>(e: &'b Elems, dt: DType, shape: &[usize]) -> Result<TensorDesc<'b>> {
    match (e, dt) {
        (Elems::U8(v), DType::E4M3) => desc(v, dt.scalar(), shape),
        (Elems::U16(v), DType::Bf16 | DType::F16) => desc(v, dt.scalar(), shape),
        _ => Err(Error::invalid("host buffer", format!("{dt} elements"), "another encoding")),
    }
}
