//! Decode over an FP8 KV cache (upstream HEAD's `flash_mla_with_kvcache(…, is_fp8_kvcache=True, …)`): its
//! arguments, the validation every backend runs before touching memory, what a backend supports, and the
//! scheduler and workspace math.
//!
//! Two modes share one argument struct, [`Fp8DecodeArgs`], as they share upstream's one call:
//!
//! - **sparse** (`indices` given): every query token attends to its own top-k selection of the cache. An index is
//!   `page · page_size + offset`; entries outside `[0, num_blocks · page_size)` (−1 above all) are skipped, and
//!   only the first `topk_length[i]` entries of request `i` count. An optional extra cache with its own indices is
//!   attended in addition; an optional `attn_sink[h]` scales the output by `exp(lse) / (exp(lse) + exp(sink))`.
//!   Both layouts of [`crate::fp8`]. `block_table` and `cache_seqlens` are ignored, as upstream.
//! - **dense** (no `indices`; `block_table` + `cache_seqlens`): attention over each request's first
//!   `cache_seqlens[i]` tokens, the dense decode of [`crate::problem`] with the V3.2 layout's dequantisation.
//!
//! | argument | shape | dtype | mode |
//! |---|---|---|---|
//! | `q` | `[b, s_q, h_q, d_qk]` (576 V3.2, 512 MODEL1) | bf16 | both |
//! | `k_cache` | `[num_blocks, page_size, 1, bytes_per_token]` (656 V3.2, 584 MODEL1) | e4m3 (bytes) | both |
//! | `block_table` | `[b, max_blocks_per_seq]` | i32 | dense |
//! | `cache_seqlens` | `[b]` | i32 | dense |
//! | `indices` | `[b, s_q, topk]`, `topk >= 1`, last dim contiguous | i32 | sparse |
//! | `topk_length` | `[b]`, values in `[0, topk]` | i32 | sparse, optional |
//! | `attn_sink` | `[h_q]` (any value; +inf zeroes the row's output, −inf has no effect) | f32 | sparse, optional |
//! | `extra_k_cache` | like `k_cache`, same layout, own page size | e4m3 (bytes) | sparse, optional |
//! | `extra_indices_in_kvcache` | `[b, s_q, extra_topk]`; required with `extra_k_cache` | i32 | sparse |
//! | `extra_topk_length` | `[b]`, values in `[0, extra_topk]`; only with `extra_k_cache` | i32 | sparse, optional |
//! | `tile_scheduler_metadata`, `num_splits` | `[num_sm_parts, 8]`, `[b + 1]` ([`num_sm_parts`]) | i32 | both |
//! | `out` | `[b, s_q, h_q, 512]`, last dim contiguous | bf16 | both |
//! | `lse` | `[b, h_q, s_q]`, natural log; a row that attends to nothing: `out = 0`, `lse = +inf` | f32 | both |
//!
//! The cache's tokens of one page block are contiguous (`k_cache.strides[1] == bytes_per_token`); blocks may be
//! any distance apart that keeps them from overlapping.
//!
//! **Validation, once.** [`crate::MlaBackend::fp8_get_metadata`] and [`crate::MlaBackend::fp8_decode`] are
//! provided methods: they run [`validate_fp8_metadata`] / [`validate_fp8_decode`] (and, for the decode, the
//! workspace checks) and hand a [`ValidatedFp8Metadata`] / [`ValidatedFp8Decode`] to the backend's
//! `fp8_metadata_validated` / `fp8_decode_validated`, as the dense decode does (docs/architecture.md).
//!
//! **Scheduling.** The scheduler of [`crate::scheduler`] runs unchanged on per-request *work lengths*: in dense mode
//! the lengths themselves; in sparse mode a request's work is its selection, not its context:
//! `w = max(topk_length, 1)`, and with an extra cache (`extra_topk > 0`) `w = ceil(w / 64) · 64 + extra_topk_length`
//! (`topk` / `extra_topk` where no length tensor is given), exactly upstream's scheduler (docs/sparse-fp8.md). Parts:
//! `max(1, sm_count / ceil(s_q · h_q / 64))`; the workspace is [`WorkspaceLayout`] with `h_kv = 1`.

use crate::backend::{Capabilities, Workspace};
use crate::dtype::ScalarType;
use crate::error::{Error, Result};
use crate::fp8::Fp8Layout;
use crate::problem::{
    HEAD_DIM_V, Region, Regions, check_dim, check_disjoint, check_dtype, check_index_vector, check_last_contiguous,
    check_memory, check_metadata_buffers, check_ndim, check_workspace_of, check_writable, positive_dim,
};
use crate::scheduler::{self, BLOCK_SIZE_N, SchedulePlan};
use crate::splitkv::WorkspaceLayout;
use crate::tensor::{Device, TensorDesc};

/// Which optional features a backend's sparse decode supports for one layout (upstream's `DecodeFeatures`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SparseSupport {
    /// The cache layout.
    pub layout: Fp8Layout,
    /// `attn_sink`.
    pub attn_sink: bool,
    /// `topk_length`.
    pub topk_length: bool,
    /// `extra_k_cache` + `extra_indices_in_kvcache`.
    pub extra_cache: bool,
    /// `extra_topk_length`.
    pub extra_topk_length: bool,
}

impl SparseSupport {
    /// Every feature, for `layout`.
    pub const fn full(layout: Fp8Layout) -> Self {
        SparseSupport { layout, attn_sink: true, topk_length: true, extra_cache: true, extra_topk_length: true }
    }
}

/// What a backend supports of the decode over FP8 caches; the default supports nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fp8Capabilities {
    /// Sparse decode: one entry per supported layout.
    pub sparse: Vec<SparseSupport>,
    /// Dense decode: the supported layouts (only V3.2 exists).
    pub dense: Vec<Fp8Layout>,
}

impl Fp8Capabilities {
    /// Nothing supported.
    pub fn none() -> Self {
        Self::default()
    }

    /// Both layouts with every sparse feature, and dense decode over V3.2 (the CPU reference).
    pub fn full() -> Self {
        Fp8Capabilities { sparse: Fp8Layout::ALL.map(SparseSupport::full).to_vec(), dense: vec![Fp8Layout::V32] }
    }

    /// The sparse features supported for `layout`, if any.
    pub fn sparse_support(&self, layout: Fp8Layout) -> Option<&SparseSupport> {
        self.sparse.iter().find(|s| s.layout == layout)
    }

    /// True if anything at all is supported.
    pub fn any(&self) -> bool {
        !self.sparse.is_empty() || !self.dense.is_empty()
    }
}

/// The error of a backend that does not implement the decode over FP8 caches.
pub fn unsupported(backend: &str) -> Error {
    Error::Unsupported {
        backend: backend.into(),
        reason: "decode over an FP8 KV cache (sparse or dense) is not implemented by this backend yet; \
                 the `cpu` backend runs it"
            .into(),
    }
}

/// Arguments of the decode over an FP8 cache, in the order of upstream's `flash_mla_with_kvcache`, plus the
/// outputs. `indices` picks the mode (module docs).
#[derive(Clone, Copy, Debug)]
pub struct Fp8DecodeArgs<'a> {
    /// Queries `[b, s_q, h_q, d_qk]`, bf16.
    pub q: TensorDesc<'a>,
    /// The cache `[num_blocks, page_size, 1, bytes_per_token]`, bytes (dtype e4m3).
    pub k_cache: TensorDesc<'a>,
    /// Dense mode: `[b, max_blocks_per_seq]` i32 page ids. Ignored in sparse mode.
    pub block_table: Option<TensorDesc<'a>>,
    /// Dense mode: `[b]` i32 lengths. Ignored in sparse mode.
    pub cache_seqlens: Option<TensorDesc<'a>>,
    /// Must be 512.
    pub head_dim_v: usize,
    /// From [`crate::MlaBackend::fp8_get_metadata`], `[num_sm_parts, 8]` i32.
    pub tile_scheduler_metadata: TensorDesc<'a>,
    /// From [`crate::MlaBackend::fp8_get_metadata`], `[b + 1]` i32.
    pub num_splits: TensorDesc<'a>,
    /// `None`: `d_qk^-0.5`.
    pub softmax_scale: Option<f32>,
    /// Dense mode only: bottom-right aligned causal mask (no effect when `s_q == 1`). Must be false with indices.
    pub causal: bool,
    /// Sparse mode: `[b, s_q, topk]` i32.
    pub indices: Option<TensorDesc<'a>>,
    /// Sparse mode, optional: `[h_q]` f32.
    pub attn_sink: Option<TensorDesc<'a>>,
    /// Sparse mode, optional: a second cache, same layout.
    pub extra_k_cache: Option<TensorDesc<'a>>,
    /// Sparse mode, with `extra_k_cache`: `[b, s_q, extra_topk]` i32 indices into it.
    pub extra_indices_in_kvcache: Option<TensorDesc<'a>>,
    /// Sparse mode, optional: `[b]` i32.
    pub topk_length: Option<TensorDesc<'a>>,
    /// Sparse mode, optional, with `extra_k_cache`: `[b]` i32.
    pub extra_topk_length: Option<TensorDesc<'a>>,
    /// Output `[b, s_q, h_q, 512]` bf16.
    pub out: TensorDesc<'a>,
    /// Output `[b, h_q, s_q]` f32.
    pub lse: TensorDesc<'a>,
}

/// The sizes that fix buffer shapes (`h_kv` is 1 in both layouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8Shape {
    /// Requests.
    pub batch: usize,
    /// Query tokens per request.
    pub s_q: usize,
    /// Query heads.
    pub h_q: usize,
}

impl Fp8Shape {
    /// Query rows sharing the one KV head: `s_q · h_q` (row `r = t · h_q + h`).
    pub fn q_rows(&self) -> usize {
        self.s_q.saturating_mul(self.h_q)
    }

    /// Where the split partials live for `num_sm_parts` parts.
    pub fn workspace_layout(&self, num_sm_parts: usize) -> Result<WorkspaceLayout> {
        WorkspaceLayout::new(self.batch, self.q_rows(), 1, num_sm_parts)
    }
}

/// Scheduler parts of a decode over an FP8 cache: `max(1, sm_count / ceil(s_q · h_q / 64))` (upstream's Hopper
/// formula `sm_count / s_q / (h_q / 64)` for its `h_q` ∈ {64, 128}).
pub fn num_sm_parts(sm_count: usize, s_q: usize, h_q: usize) -> usize {
    scheduler::num_sm_parts(sm_count, s_q.saturating_mul(h_q), 1)
}

/// A cache argument, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheGeometry {
    /// Page blocks.
    pub num_blocks: usize,
    /// Tokens per page block.
    pub page_size: usize,
    /// Bytes from one block's start to the next.
    pub block_stride: usize,
}

impl CacheGeometry {
    /// Tokens addressable by an index: `num_blocks · page_size` (valid indices are below it).
    pub fn num_tokens(&self) -> usize {
        self.num_blocks.saturating_mul(self.page_size)
    }
}

/// The extra cache of a sparse problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtraProblem {
    /// The extra cache.
    pub cache: CacheGeometry,
    /// `extra_indices_in_kvcache.shape[2]` (may be 0).
    pub topk: usize,
    /// `extra_topk_length` given.
    pub has_topk_length: bool,
}

/// The mode of a validated problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Mode {
    /// Top-k indices.
    Sparse {
        /// `indices.shape[2]`.
        topk: usize,
        /// `topk_length` given.
        has_topk_length: bool,
        /// `attn_sink` given.
        has_attn_sink: bool,
        /// The extra cache, if given.
        extra: Option<ExtraProblem>,
    },
    /// Block table and lengths.
    Dense {
        /// Columns of the block table.
        max_blocks_per_seq: usize,
        /// Effective causal flag (false when `s_q == 1`).
        causal: bool,
    },
}

/// A validated decode over an FP8 cache.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fp8Problem {
    /// The cache layout (from `k_cache.shape[3]`).
    pub layout: Fp8Layout,
    /// Sizes.
    pub shape: Fp8Shape,
    /// The main cache.
    pub cache: CacheGeometry,
    /// Sparse or dense, with the mode's sizes.
    pub mode: Fp8Mode,
    /// Softmax scale (default applied).
    pub softmax_scale: f32,
    /// Rows of the metadata.
    pub num_sm_parts: usize,
}

/// Per-request lengths read on the host, to compute work lengths ([`Fp8Problem::work_lengths`]).
#[derive(Clone, Copy, Debug)]
pub enum Fp8Lengths<'a> {
    /// Sparse mode: the two optional length tensors.
    Sparse {
        /// `topk_length`, if given.
        topk_length: Option<&'a [i32]>,
        /// `extra_topk_length`, if given.
        extra_topk_length: Option<&'a [i32]>,
    },
    /// Dense mode: `cache_seqlens`.
    Dense {
        /// `cache_seqlens`.
        cache_seqlens: &'a [i32],
    },
}

/// Work tokens of one sparse request (module docs): `topk_length` and, with an extra cache, `extra_topk_length`.
pub fn sparse_work_tokens(topk_length: usize, extra: Option<usize>) -> usize {
    let w = topk_length.max(1);
    match extra {
        Some(e) => w.div_ceil(BLOCK_SIZE_N) * BLOCK_SIZE_N + e,
        None => w,
    }
}

/// Checks a length value: `0 <= v <= max`.
fn length_value(name: &str, i: usize, v: i32, max: usize, what: &str) -> Result<usize> {
    usize::try_from(v)
        .ok()
        .filter(|&v| v <= max)
        .ok_or_else(|| Error::invalid(format!("{name}[{i}]"), format!("a length in [0, {max}] ({what})"), v))
}

fn check_len(name: &str, v: &[i32], batch: usize) -> Result<()> {
    if v.len() != batch {
        return Err(Error::invalid(name, format!("{batch} host values"), v.len()));
    }
    Ok(())
}

impl Fp8Problem {
    /// True in sparse mode.
    pub fn is_sparse(&self) -> bool {
        matches!(self.mode, Fp8Mode::Sparse { .. })
    }

    /// The partial buffers' layout in the workspace.
    pub fn workspace_layout(&self) -> Result<WorkspaceLayout> {
        self.shape.workspace_layout(self.num_sm_parts)
    }

    /// Per-request work lengths for the scheduler, from the host copies of the length tensors; validates every
    /// length (`topk_length[i]` in `[0, topk]`, `cache_seqlens[i]` in `[0, max_blocks_per_seq · page_size]`, …).
    pub fn work_lengths(&self, lengths: Fp8Lengths<'_>) -> Result<Vec<i32>> {
        let b = self.shape.batch;
        let work: Vec<usize> = match (self.mode, lengths) {
            (
                Fp8Mode::Sparse { topk, has_topk_length, extra, .. },
                Fp8Lengths::Sparse { topk_length, extra_topk_length },
            ) => {
                let presence = [
                    ("topk_length", has_topk_length, topk_length.is_some()),
                    ("extra_topk_length", extra.is_some_and(|e| e.has_topk_length), extra_topk_length.is_some()),
                ];
                for (name, want, got) in presence {
                    if want != got {
                        let say = |p: bool| if p { "host values" } else { "none" };
                        return Err(Error::invalid(name, say(want), say(got)));
                    }
                }
                if let Some(v) = topk_length {
                    check_len("topk_length", v, b)?;
                }
                if let Some(v) = extra_topk_length {
                    check_len("extra_topk_length", v, b)?;
                }
                (0..b)
                    .map(|i| {
                        let t = match topk_length {
                            Some(v) => length_value("topk_length", i, v[i], topk, "topk = indices.shape[2]")?,
                            None => topk,
                        };
                        // Upstream counts the extra cache only when its selection has a width (`extra_topk != 0`).
                        let e = match extra.filter(|e| e.topk > 0) {
                            None => None,
                            Some(e) => Some(match extra_topk_length {
                                Some(v) => length_value(
                                    "extra_topk_length",
                                    i,
                                    v[i],
                                    e.topk,
                                    "extra_topk = extra_indices_in_kvcache.shape[2]",
                                )?,
                                None => e.topk,
                            }),
                        };
                        Ok(sparse_work_tokens(t, e))
                    })
                    .collect::<Result<_>>()?
            }
            (Fp8Mode::Dense { max_blocks_per_seq, .. }, Fp8Lengths::Dense { cache_seqlens }) => {
                check_len("cache_seqlens", cache_seqlens, b)?;
                let max = max_blocks_per_seq.saturating_mul(self.cache.page_size);
                let what = format!("max_blocks_per_seq {max_blocks_per_seq} × page_size {}", self.cache.page_size);
                (0..b).map(|i| length_value("cache_seqlens", i, cache_seqlens[i], max, &what)).collect::<Result<_>>()?
            }
            (_, l) => {
                let want = if self.is_sparse() { "sparse (topk lengths)" } else { "dense (cache_seqlens)" };
                return Err(Error::invalid("lengths", want, format!("{l:?}")));
            }
        };
        work.into_iter()
            .enumerate()
            .map(|(i, w)| {
                i32::try_from(w)
                    .map_err(|_| Error::invalid(format!("request {i}"), "a work length that fits in int32", w))
            })
            .collect()
    }

    /// The schedule of this problem (the host reference of the metadata step).
    pub fn plan(&self, lengths: Fp8Lengths<'_>) -> Result<SchedulePlan> {
        scheduler::plan(&self.work_lengths(lengths)?, self.num_sm_parts)
    }
}

/// Validates a cache argument named `name` (`k_cache`, `extra_k_cache`, …); returns its layout and geometry.
pub fn validate_cache(name: &str, t: &TensorDesc, device: Device) -> Result<(Fp8Layout, CacheGeometry)> {
    check_ndim(name, t, 4, "[num_blocks, page_size, 1, bytes_per_token]")?;
    if t.dtype() != ScalarType::E4M3 {
        return Err(Error::invalid(format!("{name}.dtype"), "e4m3 (the cache's bytes)", t.dtype()));
    }
    let bytes = t.dims()[3];
    let layout = usize::try_from(bytes).ok().and_then(Fp8Layout::from_bytes_per_token).ok_or_else(|| {
        let want = format!(
            "{} (V3.2 layout) or {} (MODEL1 layout) bytes per token",
            Fp8Layout::V32.bytes_per_token(),
            Fp8Layout::Model1.bytes_per_token()
        );
        Error::invalid(format!("{name}.shape[3]"), want, bytes)
    })?;
    let num_blocks = positive_dim(name, t, 0, "num_blocks")?;
    let page_size = positive_dim(name, t, 1, "page_size")?;
    if t.dims()[2] != 1 {
        return Err(Error::invalid(format!("{name}.shape[2]"), "1 (h_kv: FP8 caches hold one KV head)", t.dims()[2]));
    }
    check_last_contiguous(name, t)?;
    let bpt = layout.bytes_per_token() as i64;
    if page_size > 1 && t.stride_slice()[1] != bpt {
        return Err(Error::invalid(
            format!("{name}.strides[1]"),
            format!("{bpt} (the tokens of a page block are contiguous)"),
            t.stride_slice()[1],
        ));
    }
    let block = layout
        .block_bytes(page_size)
        .ok_or_else(|| Error::invalid(format!("{name}.shape[1]"), "a page block size that fits in usize", page_size))?;
    if num_blocks > 1 && (t.stride_slice()[0] < 0 || (t.stride_slice()[0] as u64) < block as u64) {
        return Err(Error::invalid(
            format!("{name}.strides[0]"),
            format!(">= {block} (page_size × bytes_per_token: page blocks may not overlap)"),
            t.stride_slice()[0],
        ));
    }
    check_memory(name, t, device)?;
    let block_stride = if num_blocks > 1 { t.stride_slice()[0] as usize } else { block };
    Ok((layout, CacheGeometry { num_blocks, page_size, block_stride }))
}

/// Validates a `[b, s_q, k]` index tensor; returns `k` (at least `min_k`).
fn check_indices(name: &str, t: &TensorDesc, batch: usize, s_q: usize, min_k: usize, device: Device) -> Result<usize> {
    let k_name = if name == "indices" { "topk" } else { "extra_topk" };
    check_ndim(name, t, 3, format_args!("[b, s_q, {k_name}]"))?;
    check_dtype(name, t, ScalarType::I32)?;
    check_dim(name, t, 0, batch)?;
    check_dim(name, t, 1, s_q)?;
    let k = t.dims()[2];
    if k < min_k as i64 {
        return Err(Error::invalid(format!("{name}.shape[2]"), format!("{k_name} >= {min_k}"), k));
    }
    check_last_contiguous(name, t)?;
    check_memory(name, t, device)?;
    Ok(k as usize)
}

/// Rejects an argument that the mode does not take.
fn absent(name: &str, t: &Option<TensorDesc>, why: &str) -> Result<()> {
    match t {
        Some(_) => Err(Error::invalid(name, format!("none ({why})"), "a tensor")),
        None => Ok(()),
    }
}

fn unsupported_by(caps: &Capabilities, what: String) -> Error {
    Error::Unsupported { backend: caps.backend.into(), reason: what }
}

/// The checks both steps share: every descriptor's shape, dtype, strides, device and memory, the mode, and the
/// capabilities; not which outputs are written.
fn validate_fp8_args(args: &Fp8DecodeArgs, caps: &Capabilities) -> Result<Fp8Problem> {
    let device = caps.device;
    if args.head_dim_v != HEAD_DIM_V {
        return Err(Error::invalid("head_dim_v", HEAD_DIM_V, args.head_dim_v));
    }

    // q: [b, s_q, h_q, d_qk] bf16 (d_qk checked against the layout below)
    let q = &args.q;
    check_ndim("q", q, 4, "[b, s_q, h_q, d_qk]")?;
    if q.dtype() != ScalarType::Bf16 {
        return Err(Error::invalid("q.dtype", "bf16 (decode over an FP8 cache takes bfloat16 queries)", q.dtype()));
    }
    let batch = positive_dim("q", q, 0, "batch size")?;
    let s_q = positive_dim("q", q, 1, "s_q")?;
    let h_q = positive_dim("q", q, 2, "h_q")?;

    let (layout, cache) = validate_cache("k_cache", &args.k_cache, device)?;
    if q.dims()[3] != layout.head_dim_k() as i64 {
        return Err(Error::invalid(
            "q.shape[3]",
            format!(
                "{} (d_qk of the {} layout, from k_cache.shape[3] = {})",
                layout.head_dim_k(),
                layout.name(),
                layout.bytes_per_token()
            ),
            q.dims()[3],
        ));
    }
    check_last_contiguous("q", q)?;
    check_memory("q", q, device)?;

    let mode = match &args.indices {
        Some(indices) => {
            if args.causal {
                return Err(Error::invalid("causal", "false with indices (sparse decode has no causal mask)", true));
            }
            let support = caps.fp8.sparse_support(layout).ok_or_else(|| {
                unsupported_by(caps, format!("sparse decode over a {} cache (layout from k_cache.shape[3])", layout))
            })?;
            let features = [
                ("attn_sink", args.attn_sink.is_some(), support.attn_sink),
                ("topk_length", args.topk_length.is_some(), support.topk_length),
                ("extra_k_cache", args.extra_k_cache.is_some(), support.extra_cache),
                ("extra_topk_length", args.extra_topk_length.is_some(), support.extra_topk_length),
            ];
            if let Some((name, ..)) = features.iter().find(|(_, given, ok)| *given && !ok) {
                return Err(unsupported_by(caps, format!("`{name}` with the {layout} layout")));
            }
            let topk = check_indices("indices", indices, batch, s_q, 1, device)?;
            if let Some(t) = &args.topk_length {
                check_index_vector("topk_length", t, batch, device)?;
            }
            if let Some(t) = &args.attn_sink {
                check_ndim("attn_sink", t, 1, format_args!("[{h_q}]"))?;
                check_dtype("attn_sink", t, ScalarType::F32)?;
                check_dim("attn_sink", t, 0, h_q)?;
                if h_q > 1 && t.stride_slice()[0] != 1 {
                    return Err(Error::invalid("attn_sink.strides[0]", "1 (contiguous)", t.stride_slice()[0]));
                }
                check_memory("attn_sink", t, device)?;
            }
            let extra = match (&args.extra_k_cache, &args.extra_indices_in_kvcache) {
                (None, _) => {
                    absent("extra_indices_in_kvcache", &args.extra_indices_in_kvcache, "no extra_k_cache given")?;
                    absent("extra_topk_length", &args.extra_topk_length, "no extra_k_cache given")?;
                    None
                }
                (Some(_), None) => {
                    return Err(Error::invalid(
                        "extra_indices_in_kvcache",
                        "a [b, s_q, extra_topk] i32 tensor (required with extra_k_cache)",
                        "none",
                    ));
                }
                (Some(c), Some(ei)) => {
                    let (extra_layout, geometry) = validate_cache("extra_k_cache", c, device)?;
                    if extra_layout != layout {
                        return Err(Error::invalid(
                            "extra_k_cache.shape[3]",
                            format!("{} (bytes_per_token of k_cache)", layout.bytes_per_token()),
                            extra_layout.bytes_per_token(),
                        ));
                    }
                    let topk = check_indices("extra_indices_in_kvcache", ei, batch, s_q, 0, device)?;
                    if let Some(t) = &args.extra_topk_length {
                        check_index_vector("extra_topk_length", t, batch, device)?;
                    }
                    Some(ExtraProblem { cache: geometry, topk, has_topk_length: args.extra_topk_length.is_some() })
                }
            };
            Fp8Mode::Sparse {
                topk,
                has_topk_length: args.topk_length.is_some(),
                has_attn_sink: args.attn_sink.is_some(),
                extra,
            }
        }
        None => {
            if !caps.fp8.dense.contains(&layout) {
                return Err(unsupported_by(caps, format!("dense decode over a {layout} cache (no indices given)")));
            }
            for (name, t) in [
                ("attn_sink", &args.attn_sink),
                ("topk_length", &args.topk_length),
                ("extra_k_cache", &args.extra_k_cache),
                ("extra_indices_in_kvcache", &args.extra_indices_in_kvcache),
                ("extra_topk_length", &args.extra_topk_length),
            ] {
                absent(name, t, "dense decode: no indices given")?;
            }
            let bt = args.block_table.as_ref().ok_or_else(|| {
                Error::invalid("block_table", "a [b, max_blocks_per_seq] i32 tensor (dense decode: no indices)", "none")
            })?;
            check_ndim("block_table", bt, 2, "[b, max_blocks_per_seq]")?;
            check_dtype("block_table", bt, ScalarType::I32)?;
            check_dim("block_table", bt, 0, batch)?;
            check_last_contiguous("block_table", bt)?;
            check_memory("block_table", bt, device)?;
            let seqlens = args.cache_seqlens.as_ref().ok_or_else(|| {
                Error::invalid("cache_seqlens", "a [b] i32 tensor (dense decode: no indices)", "none")
            })?;
            check_index_vector("cache_seqlens", seqlens, batch, device)?;
            Fp8Mode::Dense { max_blocks_per_seq: bt.dims()[1].max(0) as usize, causal: args.causal && s_q > 1 }
        }
    };

    let shape = Fp8Shape { batch, s_q, h_q };
    let parts = num_sm_parts(caps.sm_count, s_q, h_q);
    check_metadata_buffers(&args.tile_scheduler_metadata, &args.num_splits, batch, parts, device)?;

    let softmax_scale = args.softmax_scale.unwrap_or_else(|| layout.default_softmax_scale());
    if !(softmax_scale.is_finite() && softmax_scale > 0.0) {
        return Err(Error::invalid("softmax_scale", "a finite value > 0", softmax_scale));
    }

    let out = &args.out;
    check_ndim("out", out, 4, "[b, s_q, h_q, 512]")?;
    check_dtype("out", out, ScalarType::Bf16)?;
    for (i, want) in [batch, s_q, h_q, HEAD_DIM_V].into_iter().enumerate() {
        check_dim("out", out, i, want)?;
    }
    check_last_contiguous("out", out)?;
    check_memory("out", out, device)?;

    let lse = &args.lse;
    check_ndim("lse", lse, 3, "[b, h_q, s_q]")?;
    check_dtype("lse", lse, ScalarType::F32)?;
    for (i, want) in [batch, h_q, s_q].into_iter().enumerate() {
        check_dim("lse", lse, i, want)?;
    }
    check_memory("lse", lse, device)?;

    Ok(Fp8Problem { layout, shape, cache, mode, softmax_scale, num_sm_parts: parts })
}

/// Which step a call is: it decides which buffers are written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Writes `tile_scheduler_metadata` and `num_splits`.
    Metadata,
    /// Writes `out` and `lse` (and the workspace).
    Decode,
}

/// Every memory argument the validated mode reads or writes, the step's outputs marked. In sparse mode
/// `block_table` and `cache_seqlens` are ignored (and not validated), so they are left out.
fn fp8_regions(args: &Fp8DecodeArgs, mode: &Fp8Mode, step: Step) -> Regions {
    let meta = step == Step::Metadata;
    let mut r = Regions::new();
    for (name, t, written) in [
        ("q", &args.q, false),
        ("k_cache", &args.k_cache, false),
        ("tile_scheduler_metadata", &args.tile_scheduler_metadata, meta),
        ("num_splits", &args.num_splits, meta),
        ("out", &args.out, !meta),
        ("lse", &args.lse, !meta),
    ] {
        r.push(Region::of(name, t, written));
    }
    let optional: &[(&'static str, &Option<TensorDesc>)] = match mode {
        Fp8Mode::Sparse { .. } => &[
            ("indices", &args.indices),
            ("attn_sink", &args.attn_sink),
            ("extra_k_cache", &args.extra_k_cache),
            ("extra_indices_in_kvcache", &args.extra_indices_in_kvcache),
            ("topk_length", &args.topk_length),
            ("extra_topk_length", &args.extra_topk_length),
        ],
        Fp8Mode::Dense { .. } => &[("block_table", &args.block_table), ("cache_seqlens", &args.cache_seqlens)],
    };
    for (name, t) in optional {
        if let Some(t) = t {
            r.push(Region::of(name, t, false));
        }
    }
    r
}

/// Validates a decode over an FP8 cache against a backend's capabilities: every descriptor, and that `out` and
/// `lse` are writable and overlap no other argument.
pub fn validate_fp8_decode(args: &Fp8DecodeArgs, caps: &Capabilities) -> Result<Fp8Problem> {
    validate_fp8_step(args, caps, Step::Decode).map(|(problem, _)| problem)
}

/// Validates the scheduler step of a decode over an FP8 cache: the decode's descriptor checks
/// ([`validate_fp8_decode`]), with `tile_scheduler_metadata` and `num_splits` as the outputs (writable, overlapping
/// no other argument) instead of `out` and `lse`.
pub fn validate_fp8_metadata(args: &Fp8DecodeArgs, caps: &Capabilities) -> Result<Fp8Problem> {
    validate_fp8_step(args, caps, Step::Metadata).map(|(problem, _)| problem)
}

/// The checks of one step: the descriptors, then the step's outputs writable and overlapping no other argument.
/// Also returns the call's regions, for the decode's workspace check, so that a call builds them once.
fn validate_fp8_step(args: &Fp8DecodeArgs, caps: &Capabilities, step: Step) -> Result<(Fp8Problem, Regions)> {
    let problem = validate_fp8_args(args, caps)?;
    let outputs = match step {
        Step::Metadata => {
            [("tile_scheduler_metadata", &args.tile_scheduler_metadata), ("num_splits", &args.num_splits)]
        }
        Step::Decode => [("out", &args.out), ("lse", &args.lse)],
    };
    for (name, t) in outputs {
        check_writable(name, t)?;
    }
    let regions = fp8_regions(args, &problem.mode, step);
    check_disjoint(regions.as_slice())?;
    Ok((problem, regions))
}

/// A scheduler-step call over an FP8 cache that passed [`validate_fp8_metadata`] against the capabilities of the
/// backend it is handed to. Only [`crate::MlaBackend::fp8_get_metadata`] makes one, so a backend's
/// [`crate::MlaBackend::fp8_metadata_validated`] may rely on every check (shapes, dtypes, devices, writable and
/// disjoint metadata buffers) without repeating it.
#[derive(Debug)]
pub struct ValidatedFp8Metadata<'a> {
    args: Fp8DecodeArgs<'a>,
    problem: Fp8Problem,
}

impl<'a> ValidatedFp8Metadata<'a> {
    /// Validates `args` against `caps`.
    pub(crate) fn new(args: &Fp8DecodeArgs<'a>, caps: &Capabilities) -> Result<Self> {
        let problem = validate_fp8_metadata(args, caps)?;
        Ok(ValidatedFp8Metadata { args: *args, problem })
    }

    /// The arguments.
    pub fn args(&self) -> &Fp8DecodeArgs<'a> {
        &self.args
    }

    /// The validated problem (layout, shape, caches, mode, `num_sm_parts`, …).
    pub fn problem(&self) -> &Fp8Problem {
        &self.problem
    }
}

/// A decode over an FP8 cache that passed [`validate_fp8_decode`] and the workspace checks against the backend it
/// is handed to. Only [`crate::MlaBackend::fp8_decode`] makes one, so a backend's
/// [`crate::MlaBackend::fp8_decode_validated`] may rely on every descriptor check and on a workspace of at least
/// its `fp8_workspace_size` bytes on its device, disjoint from every tensor; it adds only what is its own (the
/// contents of the index tensors, say).
#[derive(Debug)]
pub struct ValidatedFp8Decode<'a> {
    args: Fp8DecodeArgs<'a>,
    problem: Fp8Problem,
    workspace: Workspace<'a>,
}

impl<'a> ValidatedFp8Decode<'a> {
    /// Validates `args` against `caps` ([`validate_fp8_decode`]), then the workspace against `workspace_size` (the
    /// backend's `fp8_workspace_size`, asked for the validated shape).
    pub(crate) fn new(
        args: &Fp8DecodeArgs<'a>,
        workspace: Workspace<'a>,
        caps: &Capabilities,
        workspace_size: impl FnOnce(&Fp8Shape) -> Result<usize>,
    ) -> Result<Self> {
        let (problem, regions) = validate_fp8_step(args, caps, Step::Decode)?;
        let need = workspace_size(&problem.shape)?;
        check_workspace_of(regions, &workspace, need, "fp8_workspace_size", caps.device)?;
        Ok(ValidatedFp8Decode { args: *args, problem, workspace })
    }

    /// The arguments.
    pub fn args(&self) -> &Fp8DecodeArgs<'a> {
        &self.args
    }

    /// The validated problem (layout, shape, caches, mode, `num_sm_parts`, …).
    pub fn problem(&self) -> &Fp8Problem {
        &self.problem
    }

    /// The workspace (at least `fp8_workspace_size` bytes on the backend's device).
    pub fn workspace(&self) -> Workspace<'a> {
        self.workspace
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::tests::test_caps;

    #[test]
    fn work_tokens_follow_upstream() {
        // No extra cache: the selection, at least 1.
        assert_eq!(sparse_work_tokens(0, None), 1);
        assert_eq!(sparse_work_tokens(2048, None), 2048);
        // Extra cache: the main part rounded up to 64-token blocks, then the extra selection.
        assert_eq!(sparse_work_tokens(0, Some(0)), 64);
        assert_eq!(sparse_work_tokens(65, Some(10)), 138);
        assert_eq!(sparse_work_tokens(128, Some(512)), 640);
    }

    #[test]
    fn parts_match_upstream_for_its_head_counts() {
        for sms in [132usize, 78, 114] {
            for s_q in 1..=4 {
                for h_q in [64, 128] {
                    assert_eq!(num_sm_parts(sms, s_q, h_q), (sms / s_q / (h_q / 64)).max(1));
                }
            }
        }
        assert_eq!(num_sm_parts(32, 1, 16), 32);
        assert_eq!(num_sm_parts(32, 3, 100), 6);
    }

    fn sparse_problem(topk: usize, has_topk_length: bool, extra: Option<(usize, bool)>) -> Fp8Problem {
        let cache = CacheGeometry { num_blocks: 4, page_size: 64, block_stride: 64 * 656 };
        Fp8Problem {
            layout: Fp8Layout::V32,
            shape: Fp8Shape { batch: 3, s_q: 2, h_q: 64 },
            cache,
            mode: Fp8Mode::Sparse {
                topk,
                has_topk_length,
                has_attn_sink: false,
                extra: extra.map(|(topk, has_topk_length)| ExtraProblem { cache, topk, has_topk_length }),
            },
            softmax_scale: 0.1,
            num_sm_parts: 2,
        }
    }

    #[test]
    fn work_lengths_of_sparse_and_dense_problems() {
        let p = sparse_problem(128, true, Some((512, true)));
        let l = Fp8Lengths::Sparse { topk_length: Some(&[0, 65, 128]), extra_topk_length: Some(&[0, 10, 512]) };
        assert_eq!(p.work_lengths(l).unwrap(), vec![64, 138, 640]);
        // Without length tensors: topk and extra_topk for every request.
        let p = sparse_problem(100, false, Some((7, false)));
        let l = Fp8Lengths::Sparse { topk_length: None, extra_topk_length: None };
        assert_eq!(p.work_lengths(l).unwrap(), vec![135; 3]);
        // An extra cache of width 0 is not counted (upstream: `if (extra_topk)`).
        let p = sparse_problem(100, false, Some((0, false)));
        assert_eq!(p.work_lengths(l).unwrap(), vec![100; 3]);
        let dense = Fp8Problem { mode: Fp8Mode::Dense { max_blocks_per_seq: 2, causal: false }, ..p };
        assert_eq!(dense.work_lengths(Fp8Lengths::Dense { cache_seqlens: &[0, 128, 5] }).unwrap(), vec![0, 128, 5]);
        // The schedule runs on those lengths: 3 requests of 1, 3 and 10 blocks over 2 parts.
        let p = sparse_problem(128, true, Some((512, true)));
        let l = Fp8Lengths::Sparse { topk_length: Some(&[0, 65, 128]), extra_topk_length: Some(&[0, 10, 512]) };
        assert_eq!(p.plan(l).unwrap(), scheduler::plan(&[64, 138, 640], 2).unwrap());
    }

    #[test]
    fn bad_lengths_are_named() {
        let err = |p: &Fp8Problem, l| p.work_lengths(l).unwrap_err().to_string();
        let p = sparse_problem(16, true, Some((8, true)));
        let e = err(&p, Fp8Lengths::Sparse { topk_length: Some(&[0, 17, 0]), extra_topk_length: Some(&[0; 3]) });
        assert!(e.contains("`topk_length[1]`: expected a length in [0, 16]") && e.ends_with("got 17"), "{e}");
        let e = err(&p, Fp8Lengths::Sparse { topk_length: Some(&[0, 0, 0]), extra_topk_length: Some(&[0, 0, -1]) });
        assert!(e.contains("`extra_topk_length[2]`: expected a length in [0, 8]"), "{e}");
        let e = err(&p, Fp8Lengths::Sparse { topk_length: None, extra_topk_length: Some(&[0; 3]) });
        assert!(e.contains("`topk_length`: expected host values, got none"), "{e}");
        let e = err(&p, Fp8Lengths::Sparse { topk_length: Some(&[0; 2]), extra_topk_length: Some(&[0; 3]) });
        assert!(e.contains("`topk_length`: expected 3 host values, got 2"), "{e}");
        let e = err(&p, Fp8Lengths::Dense { cache_seqlens: &[0; 3] });
        assert!(e.contains("`lengths`"), "{e}");
        let dense = Fp8Problem { mode: Fp8Mode::Dense { max_blocks_per_seq: 2, causal: false }, ..p };
        let e = err(&dense, Fp8Lengths::Dense { cache_seqlens: &[0, 129, 0] });
        assert!(e.contains("`cache_seqlens[1]`: expected a length in [0, 128]"), "{e}");
        let big = sparse_problem(i32::MAX as usize, false, Some((64, false)));
        let e = err(&big, Fp8Lengths::Sparse { topk_length: None, extra_topk_length: None });
        assert!(e.contains("`request 0`: expected a work length that fits in int32"), "{e}");
    }

    #[test]
    fn workspace_matches_upstream_buffers() {
        // Upstream allocates lse_accum [b + parts, s_q, h_q] and o_accum [b + parts, s_q, h_q, 512], float32.
        let l = Fp8Shape { batch: 4, s_q: 2, h_q: 128 }.workspace_layout(33).unwrap();
        assert_eq!(l.rows, 37);
        assert_eq!(l.o_offset, (37 * 256 * 4usize).next_multiple_of(256));
        assert_eq!(l.total_bytes, l.o_offset + 37 * 256 * 512 * 4);
        assert_eq!(l.lse_index(5, 0, 3 * 128 + 7), 5 * 256 + 3 * 128 + 7);
    }

    /// The buffers of a one-request, one-token, one-head sparse decode over a MODEL1 cache of 2 tokens.
    struct Bufs {
        q: Vec<half::bf16>,
        cache: Vec<u8>,
        ind: Vec<i32>,
        sink: Vec<f32>,
        meta: Vec<i32>,
        splits: Vec<i32>,
        out: Vec<half::bf16>,
        lse: Vec<f32>,
    }

    impl Bufs {
        fn new() -> Self {
            Bufs {
                q: vec![half::bf16::ZERO; 512],
                cache: vec![0u8; 2 * 584],
                ind: vec![0i32; 3],
                sink: vec![0f32; 1],
                meta: vec![0i32; 4 * 8],
                splits: vec![0i32; 2],
                out: vec![half::bf16::ZERO; 512],
                lse: vec![0f32; 1],
            }
        }

        fn args(&mut self) -> Fp8DecodeArgs<'_> {
            use crate::tensor::{HostTensor, HostTensorMut};
            Fp8DecodeArgs {
                q: HostTensor::new(&self.q, &[1, 1, 1, 512]).unwrap().desc(),
                k_cache: HostTensor::new(&self.cache, &[1, 2, 1, 584]).unwrap().desc(),
                block_table: None,
                cache_seqlens: None,
                head_dim_v: 512,
                tile_scheduler_metadata: HostTensorMut::new(&mut self.meta, &[4, 8]).unwrap().desc(),
                num_splits: HostTensorMut::new(&mut self.splits, &[2]).unwrap().desc(),
                softmax_scale: None,
                causal: false,
                indices: Some(HostTensor::new(&self.ind, &[1, 1, 3]).unwrap().desc()),
                attn_sink: Some(HostTensor::new(&self.sink, &[1]).unwrap().desc()),
                extra_k_cache: None,
                extra_indices_in_kvcache: None,
                topk_length: None,
                extra_topk_length: None,
                out: HostTensorMut::new(&mut self.out, &[1, 1, 1, 512]).unwrap().desc(),
                lse: HostTensorMut::new(&mut self.lse, &[1, 1, 1]).unwrap().desc(),
            }
        }
    }

    #[test]
    fn capabilities_gate_layouts_modes_and_features() {
        let caps = test_caps;
        let mut bufs = Bufs::new();
        let args = bufs.args();
        let p = validate_fp8_decode(&args, &caps(Fp8Capabilities::full())).unwrap();
        assert_eq!((p.layout, p.softmax_scale, p.num_sm_parts), (Fp8Layout::Model1, 512f32.sqrt().recip(), 4));
        assert_eq!(p.mode, Fp8Mode::Sparse { topk: 3, has_topk_length: false, has_attn_sink: true, extra: None });
        let unsupported = |fp8| match validate_fp8_decode(&args, &caps(fp8)) {
            Err(Error::Unsupported { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert!(unsupported(Fp8Capabilities::none()).contains("sparse decode over a model1 cache"));
        let no_sink = SparseSupport { attn_sink: false, ..SparseSupport::full(Fp8Layout::Model1) };
        let r = unsupported(Fp8Capabilities { sparse: vec![no_sink], dense: vec![] });
        assert!(r.contains("`attn_sink` with the model1 layout"), "{r}");
        // Dense mode (no indices) over a MODEL1 cache: not a mode any backend has.
        let dense = Fp8DecodeArgs { indices: None, attn_sink: None, ..args };
        match validate_fp8_decode(&dense, &caps(Fp8Capabilities::full())) {
            Err(Error::Unsupported { reason, .. }) => {
                assert!(reason.contains("dense decode over a model1"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// A backend that implements only the required methods: every FP8 method is the trait's default.
    struct Plain(Capabilities);

    /// A backend with FP8 support: needs `WORKSPACE` bytes and counts the calls that reach it.
    struct Counting(Capabilities, std::sync::atomic::AtomicUsize);

    const WORKSPACE: usize = 64;

    impl crate::MlaBackend for Plain {
        fn name(&self) -> &'static str {
            "plain"
        }
        fn capabilities(&self) -> &Capabilities {
            &self.0
        }
        fn metadata_validated(&self, _: &crate::ValidatedMetadata, _: crate::Stream) -> Result<()> {
            Ok(())
        }
        fn decode_validated(&self, _: &crate::ValidatedDecode, _: crate::Stream) -> Result<()> {
            Ok(())
        }
    }

    impl crate::MlaBackend for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn capabilities(&self) -> &Capabilities {
            &self.0
        }
        fn metadata_validated(&self, _: &crate::ValidatedMetadata, _: crate::Stream) -> Result<()> {
            Ok(())
        }
        fn decode_validated(&self, _: &crate::ValidatedDecode, _: crate::Stream) -> Result<()> {
            Ok(())
        }
        fn fp8_workspace_size(&self, _: &Fp8Shape) -> Result<usize> {
            Ok(WORKSPACE)
        }
        fn fp8_metadata_validated(&self, _: &ValidatedFp8Metadata, _: crate::Stream) -> Result<()> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        fn fp8_decode_validated(&self, v: &ValidatedFp8Decode, _: crate::Stream) -> Result<()> {
            assert!(v.workspace().bytes() >= WORKSPACE);
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
    }

    #[test]
    fn the_fullest_call_fits_the_inline_regions() {
        use crate::Workspace;
        let mut bufs = Bufs::new();
        let lengths = vec![0i32; 1];
        let args = bufs.args();
        let len = crate::tensor::HostTensor::new(&lengths, &[1]).unwrap().desc();
        // Every optional tensor of the sparse mode (read-only aliases may overlap): 12 regions, then the workspace.
        let full = Fp8DecodeArgs {
            extra_k_cache: Some(args.k_cache),
            extra_indices_in_kvcache: args.indices,
            topk_length: Some(len),
            extra_topk_length: Some(len),
            ..args
        };
        let mode = Fp8Mode::Sparse { topk: 3, has_topk_length: true, has_attn_sink: true, extra: None };
        let regions = fp8_regions(&full, &mode, Step::Decode);
        assert_eq!(regions.as_slice().len(), 12);
        let mut ws = vec![0f32; WORKSPACE / 4];
        check_workspace_of(regions, &Workspace::host(&mut ws), WORKSPACE, "fp8_workspace_size", Device::Host).unwrap();
    }

    #[test]
    fn defaults_answer_unsupported() {
        use crate::{MlaBackend, Stream, Workspace};
        let mut bufs = Bufs::new();
        let args = bufs.args();
        let reason = |r: Result<()>| match r {
            Err(Error::Unsupported { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        // No FP8 capabilities: validation says which mode and layout.
        let none = Plain(test_caps(Fp8Capabilities::none()));
        assert!(reason(none.fp8_get_metadata(&args, Stream::DEFAULT)).contains("sparse decode over a model1 cache"));
        assert!(reason(none.fp8_decode(&args, Workspace::EMPTY, Stream::DEFAULT)).contains("model1"));
        // Capabilities claimed but the methods not implemented: the defaults answer.
        let claims = Plain(test_caps(Fp8Capabilities::full()));
        assert!(reason(claims.fp8_get_metadata(&args, Stream::DEFAULT)).contains("not implemented by this backend"));
        assert!(reason(claims.fp8_decode(&args, Workspace::EMPTY, Stream::DEFAULT)).contains("not implemented"));
        assert!(claims.fp8_workspace_size(&Fp8Shape { batch: 1, s_q: 1, h_q: 1 }).is_err());
    }

    #[test]
    fn provided_methods_validate_outputs_and_workspace_once() {
        use crate::tensor::{HostTensor, TensorDesc};
        use crate::{MlaBackend, Stream, Workspace};
        use std::sync::atomic::Ordering::Relaxed;
        let be = Counting(test_caps(Fp8Capabilities::full()), Default::default());
        let calls = || be.1.load(Relaxed);
        let err = |r: Result<()>| r.unwrap_err().to_string();
        let mut bufs = Bufs::new();
        let (out_ro, meta_ro) = (bufs.out.clone(), bufs.meta.clone());
        let out_ptr = bufs.out.as_mut_ptr();
        let args = bufs.args();
        let mut ws = vec![0f32; WORKSPACE / 4];

        be.fp8_decode(&args, Workspace::host(&mut ws), Stream::DEFAULT).unwrap();
        be.fp8_get_metadata(&args, Stream::DEFAULT).unwrap();
        assert_eq!(calls(), 2);

        // The workspace: size from fp8_workspace_size, and no overlap with an argument.
        let e = err(be.fp8_decode(&args, Workspace::host(&mut ws[..WORKSPACE / 8]), Stream::DEFAULT));
        assert!(e.contains("`workspace_bytes`: expected >= 64 (fp8_workspace_size for this shape), got 32"), "{e}");
        // SAFETY: validation rejects this workspace (it overlaps `out`) before anything is read or written.
        let overlapping = unsafe { Workspace::from_raw(out_ptr.cast(), WORKSPACE, Device::Host) };
        let e = err(be.fp8_decode(&args, overlapping, Stream::DEFAULT));
        assert!(e.contains("`out`: expected memory disjoint from `workspace`"), "{e}");

        // Each step's outputs must be writable; the other step's need not be.
        let ro_out = Fp8DecodeArgs { out: HostTensor::new(&out_ro, &[1, 1, 1, 512]).unwrap().desc(), ..args };
        let e = err(be.fp8_decode(&ro_out, Workspace::host(&mut ws), Stream::DEFAULT));
        assert!(e.contains("`out`: expected a writable tensor"), "{e}");
        be.fp8_get_metadata(&ro_out, Stream::DEFAULT).unwrap();
        let ro_meta =
            Fp8DecodeArgs { tile_scheduler_metadata: HostTensor::new(&meta_ro, &[4, 8]).unwrap().desc(), ..args };
        let e = err(be.fp8_get_metadata(&ro_meta, Stream::DEFAULT));
        assert!(e.contains("`tile_scheduler_metadata`: expected a writable tensor"), "{e}");
        be.fp8_decode(&ro_meta, Workspace::host(&mut ws), Stream::DEFAULT).unwrap();
        assert_eq!(calls(), 4);

        // Outputs may not overlap: `lse` inside `out`.
        // SAFETY: validation rejects the call (the descriptor overlaps `out`) before any memory is touched.
        let lse =
            unsafe { TensorDesc::from_raw(out_ptr.cast(), ScalarType::F32, &[1, 1, 1], &[1, 1, 1], Device::Host) };
        let aliased = Fp8DecodeArgs { lse: lse.unwrap(), ..args };
        let e = err(be.fp8_decode(&aliased, Workspace::host(&mut ws), Stream::DEFAULT));
        assert!(e.contains("`out`: expected memory disjoint from `lse`"), "{e}");
        // The metadata buffers may not overlap an input in the metadata step: `num_splits` inside `q`.
        let q_ptr = args.q.data();
        // SAFETY: as above.
        let splits = unsafe { TensorDesc::from_raw(q_ptr, ScalarType::I32, &[2], &[1], Device::Host) };
        let aliased = Fp8DecodeArgs { num_splits: splits.unwrap(), ..args };
        let e = err(be.fp8_get_metadata(&aliased, Stream::DEFAULT));
        assert!(e.contains("`num_splits`: expected memory disjoint from `q`"), "{e}");
        assert_eq!(calls(), 4, "no rejected call reached the backend");
    }
}
