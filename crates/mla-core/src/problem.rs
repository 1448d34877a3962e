//! The decode problem: its arguments, and the validation every backend runs before touching memory.
//!
//! | argument | shape | dtype | layout |
//! |---|---|---|---|
//! | `q` | `[b, s_q, h_q, 576]` | bf16 / fp16 / e4m3 | last dim contiguous |
//! | `k_cache` | `[num_blocks, page_size, h_kv, 576]` | = q | last dim contiguous; V = first 512 columns |
//! | `block_table` | `[b, max_blocks_per_seq]` | i32 | last dim contiguous |
//! | `cache_seqlens` | `[b]` | i32 | contiguous |
//! | `tile_scheduler_metadata` | `[num_sm_parts, 8]` | i32 | contiguous |
//! | `num_splits` | `[b + 1]` | i32 | contiguous |
//! | `descale_q`, `descale_k` | `[1]` | f32 | required for e4m3, rejected otherwise |
//! | `out` | `[b, s_q, h_q, 512]` | bf16 (e4m3 in) / = q | last dim contiguous |
//! | `lse` | `[b, h_q, s_q]` | f32 | any strides |
//!
//! Every check produces [`Error::InvalidArgument`] naming the argument, the expected and the actual value.

use crate::backend::{Capabilities, Workspace};
use crate::dtype::{DType, ScalarType};
use crate::error::{Error, Result};
use crate::scheduler::{self, METADATA_WORDS};
use crate::tensor::{Device, TensorDesc};

/// Width of a K row (512 latent + 64 RoPE).
pub const HEAD_DIM_K: usize = 576;
/// Width of a V row: the first 512 columns of the K row.
pub const HEAD_DIM_V: usize = 512;
/// Page size of upstream FlashMLA's paged cache.
pub const DEFAULT_PAGE_SIZE: usize = 64;

/// Default `softmax_scale`: `576^-0.5`.
pub fn default_softmax_scale() -> f32 {
    1.0 / (HEAD_DIM_K as f32).sqrt()
}

/// The sizes that fix buffer shapes (metadata rows, workspace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeShape {
    /// Requests.
    pub batch: usize,
    /// Query tokens per request.
    pub s_q: usize,
    /// Query heads.
    pub h_q: usize,
    /// KV heads (divides `h_q`).
    pub h_kv: usize,
    /// Input dtype.
    pub dtype: DType,
}

impl DecodeShape {
    /// Query heads per KV head.
    pub fn heads_per_kv(&self) -> usize {
        self.h_q / self.h_kv.max(1)
    }

    /// Query rows sharing one KV head: `s_q · h_q / h_kv` (row `r = t · heads_per_kv + head_in_group`).
    pub fn q_seq_per_hk(&self) -> usize {
        self.s_q * self.heads_per_kv()
    }
}

/// Arguments of the scheduler step; `'a` is the lifetime of the memory its descriptors point at.
#[derive(Clone, Copy, Debug)]
pub struct MetadataArgs<'a> {
    /// `[b]` i32 sequence lengths.
    pub cache_seqlens: TensorDesc<'a>,
    /// `s_q · h_q / h_kv` (upstream's `num_heads_per_head_k`).
    pub q_seq_per_hk: usize,
    /// KV heads (upstream's `num_heads_k`).
    pub h_kv: usize,
    /// Output `[num_sm_parts, 8]` i32.
    pub tile_scheduler_metadata: TensorDesc<'a>,
    /// Output `[b + 1]` i32.
    pub num_splits: TensorDesc<'a>,
}

/// Arguments of the decode step (upstream's `flash_mla_with_kvcache`, plus the outputs); `'a` is the lifetime of
/// the memory its descriptors point at.
#[derive(Clone, Copy, Debug)]
pub struct DecodeArgs<'a> {
    /// Queries `[b, s_q, h_q, 576]`.
    pub q: TensorDesc<'a>,
    /// Paged cache `[num_blocks, page_size, h_kv, 576]`.
    pub k_cache: TensorDesc<'a>,
    /// Page ids `[b, max_blocks_per_seq]` i32.
    pub block_table: TensorDesc<'a>,
    /// `[b]` i32.
    pub cache_seqlens: TensorDesc<'a>,
    /// Must be 512.
    pub head_dim_v: usize,
    /// From the scheduler step.
    pub tile_scheduler_metadata: TensorDesc<'a>,
    /// From the scheduler step.
    pub num_splits: TensorDesc<'a>,
    /// `None`: `576^-0.5`.
    pub softmax_scale: Option<f32>,
    /// Bottom-right aligned causal mask (ignored when `s_q == 1`).
    pub causal: bool,
    /// `[1]` f32, e4m3 only: real q = q · descale_q.
    pub descale_q: Option<TensorDesc<'a>>,
    /// `[1]` f32, e4m3 only: real k (and v) = k · descale_k.
    pub descale_k: Option<TensorDesc<'a>>,
    /// Output `[b, s_q, h_q, 512]`.
    pub out: TensorDesc<'a>,
    /// Output `[b, h_q, s_q]` f32, natural log.
    pub lse: TensorDesc<'a>,
}

/// A validated decode problem.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeProblem {
    /// Sizes.
    pub shape: DecodeShape,
    /// Tokens per cache page.
    pub page_size: usize,
    /// Pages in the cache.
    pub num_blocks: usize,
    /// Columns of the block table.
    pub max_blocks_per_seq: usize,
    /// Softmax scale (default applied).
    pub softmax_scale: f32,
    /// Effective causal flag (false when `s_q == 1`).
    pub causal: bool,
    /// Rows of the metadata.
    pub num_sm_parts: usize,
}

/// `what` describes the expected shape for the message; it is formatted only on failure (a `format_args!`), since
/// every decode call runs these checks.
pub(crate) fn check_ndim(name: &str, t: &TensorDesc, n: usize, what: impl std::fmt::Display) -> Result<()> {
    if t.ndim() != n {
        return Err(Error::invalid(
            format!("{name}.ndim"),
            format!("{n} dims {what}"),
            format!("{} dims {}", t.ndim(), t.shape_string()),
        ));
    }
    Ok(())
}

pub(crate) fn check_dtype(name: &str, t: &TensorDesc, want: ScalarType) -> Result<()> {
    if t.dtype() != want {
        return Err(Error::invalid(format!("{name}.dtype"), want, t.dtype()));
    }
    Ok(())
}

pub(crate) fn check_dim(name: &str, t: &TensorDesc, i: usize, want: usize) -> Result<()> {
    if t.dims()[i] != want as i64 {
        return Err(Error::invalid(format!("{name}.shape[{i}]"), want, t.dims()[i]));
    }
    Ok(())
}

pub(crate) fn positive_dim(name: &str, t: &TensorDesc, i: usize, what: &str) -> Result<usize> {
    let d = t.dims()[i];
    if d < 1 {
        return Err(Error::invalid(format!("{name}.shape[{i}]"), format!("{what} >= 1"), d));
    }
    Ok(d as usize)
}

pub(crate) fn check_last_contiguous(name: &str, t: &TensorDesc) -> Result<()> {
    let last = t.ndim() - 1;
    if t.dims()[last] > 1 && t.stride_slice()[last] != 1 {
        return Err(Error::invalid(
            format!("{name}.strides[{last}]"),
            "1 (contiguous last dimension)",
            t.stride_slice()[last],
        ));
    }
    Ok(())
}

pub(crate) fn check_contiguous(name: &str, t: &TensorDesc) -> Result<()> {
    if !t.is_contiguous() {
        let want = crate::tensor::contiguous_strides(t.dims());
        return Err(Error::invalid(
            format!("{name}.strides"),
            format!("{:?} (contiguous)", &want[..t.ndim()]),
            format!("{:?}", t.stride_slice()),
        ));
    }
    Ok(())
}

/// Device, null pointer, negative stride and size-overflow checks shared by every tensor.
pub(crate) fn check_memory(name: &str, t: &TensorDesc, device: Device) -> Result<()> {
    if t.device() != device {
        return Err(Error::invalid(format!("{name}.device"), device, t.device()));
    }
    if let Some((i, s)) = t.stride_slice().iter().enumerate().find(|(_, s)| **s < 0) {
        return Err(Error::invalid(format!("{name}.strides[{i}]"), "a stride >= 0", s));
    }
    if let Some((i, d)) = t.dims().iter().enumerate().find(|(_, d)| **d < 0) {
        return Err(Error::invalid(format!("{name}.shape[{i}]"), "an extent >= 0", d));
    }
    let extent = t.extent_elements().and_then(|e| e.checked_mul(t.dtype().size_bytes() as i64)).ok_or_else(|| {
        Error::invalid(
            name,
            "a byte extent that fits in 63 bits",
            format!("shape {} strides {:?}", t.shape_string(), t.stride_slice()),
        )
    })?;
    if extent > 0 && t.data().is_null() {
        return Err(Error::invalid(format!("{name}.data"), "a non-null pointer", "null"));
    }
    if t.byte_range().is_none() {
        return Err(Error::invalid(format!("{name}.data"), "an address range inside the address space", "an overflow"));
    }
    Ok(())
}

/// An output must be writable: a [`crate::HostTensor`] view borrows its slice shared, so writing through it would
/// be undefined behaviour.
pub(crate) fn check_writable(name: &str, t: &TensorDesc) -> Result<()> {
    if !t.is_writable() {
        return Err(Error::invalid(
            name,
            "a writable tensor (HostTensorMut or TensorDesc::from_raw)",
            "a read-only view (HostTensor)",
        ));
    }
    Ok(())
}

/// The bytes a memory argument addresses, for the overlap check (empty ranges never overlap).
#[derive(Clone, Copy)]
pub(crate) struct Region {
    name: &'static str,
    range: (usize, usize),
    written: bool,
}

impl Region {
    pub(crate) fn of(name: &'static str, t: &TensorDesc, written: bool) -> Self {
        // check_memory has run on every tensor, so the range exists; an empty one never overlaps.
        Region { name, range: t.byte_range().unwrap_or((0, 0)), written }
    }
}

/// The most regions one call has: a sparse decode over an FP8 cache with every optional tensor (12) and the
/// workspace.
const MAX_REGIONS: usize = 13;

/// The regions of one call, held inline: every decode builds them, and validation allocates nothing on success.
/// A fixed array and a length written here, rather than an array-vector crate, as `push` and a slice are all it
/// needs.
pub(crate) struct Regions {
    items: [Region; MAX_REGIONS],
    len: usize,
}

impl Regions {
    pub(crate) fn new() -> Self {
        Regions { items: [Region { name: "", range: (0, 0), written: false }; MAX_REGIONS], len: 0 }
    }

    /// Panics past [`MAX_REGIONS`], which would be a call with more arguments than that constant counts.
    pub(crate) fn push(&mut self, r: Region) {
        self.items[self.len] = r;
        self.len += 1;
    }

    pub(crate) fn as_slice(&self) -> &[Region] {
        &self.items[..self.len]
    }
}

/// No memory the call writes may overlap any other argument's memory: the backends write outputs while reading
/// inputs, from many threads, and a copied writable descriptor must not alias itself in two roles.
pub(crate) fn check_disjoint(regions: &[Region]) -> Result<()> {
    for (k, a) in regions.iter().enumerate() {
        for b in &regions[k + 1..] {
            let overlap =
                a.range.0 < a.range.1 && b.range.0 < b.range.1 && a.range.0 < b.range.1 && b.range.0 < a.range.1;
            if overlap && (a.written || b.written) {
                let (w, other) = if a.written { (a, b) } else { (b, a) };
                return Err(Error::invalid(
                    w.name,
                    format!("memory disjoint from `{}` (it is written)", other.name),
                    format!(
                        "bytes {:#x}..{:#x} overlapping {:#x}..{:#x}",
                        w.range.0, w.range.1, other.range.0, other.range.1
                    ),
                ));
            }
        }
    }
    Ok(())
}

pub(crate) fn check_index_vector(name: &str, t: &TensorDesc, len: usize, device: Device) -> Result<()> {
    check_ndim(name, t, 1, format_args!("[{len}]"))?;
    check_dtype(name, t, ScalarType::I32)?;
    check_dim(name, t, 0, len)?;
    check_contiguous(name, t)?;
    check_memory(name, t, device)
}

pub(crate) fn check_metadata_buffers(
    meta: &TensorDesc,
    splits: &TensorDesc,
    batch: usize,
    parts: usize,
    device: Device,
) -> Result<()> {
    let name = "tile_scheduler_metadata";
    check_ndim(name, meta, 2, format_args!("[{parts}, {METADATA_WORDS}]"))?;
    check_dtype(name, meta, ScalarType::I32)?;
    check_dim(name, meta, 0, parts)?;
    check_dim(name, meta, 1, METADATA_WORDS)?;
    check_contiguous(name, meta)?;
    check_memory(name, meta, device)?;
    check_index_vector("num_splits", splits, batch + 1, device)
}

/// The metadata buffers are outputs of the scheduler step.
fn check_metadata_outputs(args: &MetadataArgs) -> Result<()> {
    check_writable("tile_scheduler_metadata", &args.tile_scheduler_metadata)?;
    check_writable("num_splits", &args.num_splits)?;
    check_disjoint(&[
        Region::of("cache_seqlens", &args.cache_seqlens, false),
        Region::of("tile_scheduler_metadata", &args.tile_scheduler_metadata, true),
        Region::of("num_splits", &args.num_splits, true),
    ])
}

/// Validates the scheduler step; returns the batch size and `num_sm_parts`.
pub fn validate_metadata(args: &MetadataArgs, caps: &Capabilities) -> Result<(usize, usize)> {
    let device = caps.device;
    let s = &args.cache_seqlens;
    check_ndim("cache_seqlens", s, 1, "[b]")?;
    let batch = positive_dim("cache_seqlens", s, 0, "batch size")?;
    check_index_vector("cache_seqlens", s, batch, device)?;
    if args.h_kv == 0 {
        return Err(Error::invalid("num_heads_k", ">= 1", 0));
    }
    if args.q_seq_per_hk == 0 {
        return Err(Error::invalid("num_heads_per_head_k", ">= 1", 0));
    }
    let parts = scheduler::num_sm_parts(caps.sm_count, args.q_seq_per_hk, args.h_kv);
    check_metadata_buffers(&args.tile_scheduler_metadata, &args.num_splits, batch, parts, device)?;
    check_metadata_outputs(args)?;
    Ok((batch, parts))
}

/// Every memory argument of a decode call, outputs marked.
fn decode_regions(args: &DecodeArgs) -> Regions {
    let mut r = Regions::new();
    for (name, t, written) in [
        ("q", &args.q, false),
        ("k_cache", &args.k_cache, false),
        ("block_table", &args.block_table, false),
        ("cache_seqlens", &args.cache_seqlens, false),
        ("tile_scheduler_metadata", &args.tile_scheduler_metadata, false),
        ("num_splits", &args.num_splits, false),
        ("out", &args.out, true),
        ("lse", &args.lse, true),
    ] {
        r.push(Region::of(name, t, written));
    }
    for (name, d) in [("descale_q", &args.descale_q), ("descale_k", &args.descale_k)] {
        if let Some(t) = d {
            r.push(Region::of(name, t, false));
        }
    }
    r
}

/// Validates a decode call against a backend's capabilities.
pub fn validate_decode(args: &DecodeArgs, caps: &Capabilities) -> Result<DecodeProblem> {
    validate_decode_regions(args, caps).map(|(problem, _)| problem)
}

/// [`validate_decode`], also returning the call's regions (checked disjoint) for the workspace check, so that a
/// call builds them once.
fn validate_decode_regions(args: &DecodeArgs, caps: &Capabilities) -> Result<(DecodeProblem, Regions)> {
    let device = caps.device;
    if args.head_dim_v != HEAD_DIM_V {
        return Err(Error::invalid("head_dim_v", HEAD_DIM_V, args.head_dim_v));
    }

    // q: [b, s_q, h_q, 576]
    let q = &args.q;
    check_ndim("q", q, 4, "[b, s_q, h_q, 576]")?;
    let dtype = q.dtype().as_input().ok_or_else(|| Error::invalid("q.dtype", "bf16, fp16 or e4m3", q.dtype()))?;
    if !caps.dtypes.contains(&dtype) {
        let names: Vec<&str> = caps.dtypes.iter().map(|d| d.name()).collect();
        return Err(Error::invalid("q.dtype", format!("one of {names:?} on backend `{}`", caps.backend), dtype));
    }
    let batch = positive_dim("q", q, 0, "batch size")?;
    let s_q = positive_dim("q", q, 1, "s_q")?;
    let h_q = positive_dim("q", q, 2, "h_q")?;
    check_dim("q", q, 3, HEAD_DIM_K)?;
    check_last_contiguous("q", q)?;
    check_memory("q", q, device)?;

    // k_cache: [num_blocks, page_size, h_kv, 576]
    let k = &args.k_cache;
    check_ndim("k_cache", k, 4, "[num_blocks, page_size, h_kv, 576]")?;
    if k.dtype() != q.dtype() {
        return Err(Error::invalid("k_cache.dtype", format!("{} (the dtype of q)", q.dtype()), k.dtype()));
    }
    let num_blocks = positive_dim("k_cache", k, 0, "num_blocks")?;
    let page_size = positive_dim("k_cache", k, 1, "page_size")?;
    if !caps.page_sizes.accepts(page_size) {
        return Err(Error::invalid(
            "k_cache.shape[1]",
            format!("{} on backend `{}`", caps.page_sizes.describe(), caps.backend),
            page_size,
        ));
    }
    let h_kv = positive_dim("k_cache", k, 2, "h_kv")?;
    check_dim("k_cache", k, 3, HEAD_DIM_K)?;
    check_last_contiguous("k_cache", k)?;
    check_memory("k_cache", k, device)?;
    if h_q % h_kv != 0 {
        return Err(Error::invalid("q.shape[2]", format!("a multiple of h_kv = {h_kv}"), h_q));
    }

    // block_table: [b, max_blocks_per_seq]
    let bt = &args.block_table;
    check_ndim("block_table", bt, 2, "[b, max_blocks_per_seq]")?;
    check_dtype("block_table", bt, ScalarType::I32)?;
    check_dim("block_table", bt, 0, batch)?;
    let max_blocks_per_seq = bt.dims()[1].max(0) as usize;
    check_last_contiguous("block_table", bt)?;
    check_memory("block_table", bt, device)?;

    check_index_vector("cache_seqlens", &args.cache_seqlens, batch, device)?;

    let shape = DecodeShape { batch, s_q, h_q, h_kv, dtype };
    let num_sm_parts = scheduler::num_sm_parts(caps.sm_count, shape.q_seq_per_hk(), h_kv);
    check_metadata_buffers(&args.tile_scheduler_metadata, &args.num_splits, batch, num_sm_parts, device)?;

    let softmax_scale = args.softmax_scale.unwrap_or_else(default_softmax_scale);
    if !(softmax_scale.is_finite() && softmax_scale > 0.0) {
        return Err(Error::invalid("softmax_scale", "a finite value > 0", softmax_scale));
    }

    for (name, d) in [("descale_q", &args.descale_q), ("descale_k", &args.descale_k)] {
        match (dtype.needs_descale(), d) {
            (true, None) => return Err(Error::invalid(name, "a [1] f32 tensor (required for e4m3 inputs)", "none")),
            (false, Some(_)) => {
                return Err(Error::invalid(
                    name,
                    format!("none (descales apply to e4m3 only, inputs are {dtype})"),
                    "a tensor",
                ));
            }
            (true, Some(t)) => {
                check_ndim(name, t, 1, "[1]")?;
                check_dtype(name, t, ScalarType::F32)?;
                check_dim(name, t, 0, 1)?;
                check_memory(name, t, device)?;
            }
            (false, None) => {}
        }
    }

    // out: [b, s_q, h_q, 512]
    let out = &args.out;
    check_ndim("out", out, 4, "[b, s_q, h_q, 512]")?;
    check_dtype("out", out, dtype.out_dtype())?;
    check_dim("out", out, 0, batch)?;
    check_dim("out", out, 1, s_q)?;
    check_dim("out", out, 2, h_q)?;
    check_dim("out", out, 3, HEAD_DIM_V)?;
    check_last_contiguous("out", out)?;
    check_memory("out", out, device)?;

    // lse: [b, h_q, s_q]
    let lse = &args.lse;
    check_ndim("lse", lse, 3, "[b, h_q, s_q]")?;
    check_dtype("lse", lse, ScalarType::F32)?;
    check_dim("lse", lse, 0, batch)?;
    check_dim("lse", lse, 1, h_q)?;
    check_dim("lse", lse, 2, s_q)?;
    check_memory("lse", lse, device)?;

    check_writable("out", out)?;
    check_writable("lse", lse)?;
    let regions = decode_regions(args);
    check_disjoint(regions.as_slice())?;

    let causal = args.causal && s_q > 1;
    let problem =
        DecodeProblem { shape, page_size, num_blocks, max_blocks_per_seq, softmax_scale, causal, num_sm_parts };
    Ok((problem, regions))
}

/// Checks a workspace against `need` bytes (`size_fn` names the backend method that gave it, for the message), its
/// address and device, and that it overlaps none of the call's `regions`.
pub(crate) fn check_workspace_of(
    mut regions: Regions,
    ws: &Workspace,
    need: usize,
    size_fn: &str,
    device: Device,
) -> Result<()> {
    if ws.bytes() < need {
        return Err(Error::invalid("workspace_bytes", format!(">= {need} ({size_fn} for this shape)"), ws.bytes()));
    }
    if need == 0 {
        return Ok(());
    }
    if ws.ptr().is_null() {
        return Err(Error::invalid("workspace", format!("a non-null pointer to {need} bytes"), "NULL"));
    }
    if ws.device() != device {
        return Err(Error::invalid("workspace.device", device, ws.device()));
    }
    let start = ws.ptr() as usize;
    let end = start.checked_add(ws.bytes()).ok_or_else(|| {
        Error::invalid(
            "workspace",
            "an address range inside the address space",
            format!("{:p} + {}", ws.ptr(), ws.bytes()),
        )
    })?;
    regions.push(Region { name: "workspace", range: (start, end), written: true });
    check_disjoint(regions.as_slice())
}

/// A scheduler-step call that passed [`validate_metadata`] against the capabilities of the backend it is handed
/// to. Only [`crate::MlaBackend::get_mla_metadata`] makes one, so a backend's
/// [`crate::MlaBackend::metadata_validated`] may rely on every check (shapes, dtypes, devices, writable and
/// disjoint outputs) without repeating it.
#[derive(Debug)]
pub struct ValidatedMetadata<'a> {
    args: MetadataArgs<'a>,
    batch: usize,
    num_sm_parts: usize,
}

impl<'a> ValidatedMetadata<'a> {
    /// Validates `args` against `caps`.
    pub(crate) fn new(args: &MetadataArgs<'a>, caps: &Capabilities) -> Result<Self> {
        let (batch, num_sm_parts) = validate_metadata(args, caps)?;
        Ok(ValidatedMetadata { args: *args, batch, num_sm_parts })
    }

    /// The arguments.
    pub fn args(&self) -> &MetadataArgs<'a> {
        &self.args
    }

    /// Requests (`cache_seqlens.shape[0]`).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Rows of `tile_scheduler_metadata`.
    pub fn num_sm_parts(&self) -> usize {
        self.num_sm_parts
    }
}

/// A decode call that passed [`validate_decode`] and the workspace checks against the backend it is handed to.
/// Only [`crate::MlaBackend::decode`] makes one, so a backend's [`crate::MlaBackend::decode_validated`] may rely on
/// every descriptor check and on a workspace of at least its `workspace_size` bytes on its device, disjoint from
/// every tensor; it adds only its own device-specific checks (alignment, say).
#[derive(Debug)]
pub struct ValidatedDecode<'a> {
    args: DecodeArgs<'a>,
    problem: DecodeProblem,
    workspace: Workspace<'a>,
}

impl<'a> ValidatedDecode<'a> {
    /// Validates `args` against `caps`, then the workspace against `workspace_size` (the backend's, asked for the
    /// validated shape).
    pub(crate) fn new(
        args: &DecodeArgs<'a>,
        workspace: Workspace<'a>,
        caps: &Capabilities,
        workspace_size: impl FnOnce(&DecodeShape) -> Result<usize>,
    ) -> Result<Self> {
        let (problem, regions) = validate_decode_regions(args, caps)?;
        let need = workspace_size(&problem.shape)?;
        check_workspace_of(regions, &workspace, need, "workspace_size", caps.device)?;
        Ok(ValidatedDecode { args: *args, problem, workspace })
    }

    /// The arguments.
    pub fn args(&self) -> &DecodeArgs<'a> {
        &self.args
    }

    /// The validated problem (shape, page size, scale, `num_sm_parts`, …).
    pub fn problem(&self) -> &DecodeProblem {
        &self.problem
    }

    /// The workspace (at least `workspace_size` bytes on the backend's device).
    pub fn workspace(&self) -> Workspace<'a> {
        self.workspace
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::PageSizes;
    use crate::sparse::Fp8Capabilities;
    use crate::tensor::{HostTensor, HostTensorMut};
    use half::bf16;

    const WORKSPACE: usize = 64;

    /// A host backend of 4 "SMs" taking every dtype and page size; `fp8` as given.
    pub(crate) fn test_caps(fp8: Fp8Capabilities) -> Capabilities {
        Capabilities {
            backend: "test",
            device: Device::Host,
            device_name: String::new(),
            sm_count: 4,
            compute_capability: None,
            dtypes: DType::ALL.to_vec(),
            head_dims: vec![Capabilities::MLA_HEAD_DIMS],
            page_sizes: PageSizes::Any,
            fp8,
        }
    }

    #[test]
    fn decode_workspace_is_checked_after_the_arguments() {
        // One request, one token, one head, a cache of one token; 4 SMs give 4 metadata rows.
        let (q, k) = (vec![bf16::ZERO; HEAD_DIM_K], vec![bf16::ZERO; HEAD_DIM_K]);
        let (bt, seqlens) = (vec![0i32; 1], vec![1i32; 1]);
        let (mut meta, mut splits) = (vec![0i32; 4 * METADATA_WORDS], vec![0i32; 2]);
        let (mut out, mut lse) = (vec![bf16::ZERO; HEAD_DIM_V], vec![0f32; 1]);
        let out_ptr = out.as_mut_ptr();
        let args = DecodeArgs {
            q: HostTensor::new(&q, &[1, 1, 1, HEAD_DIM_K]).unwrap().desc(),
            k_cache: HostTensor::new(&k, &[1, 1, 1, HEAD_DIM_K]).unwrap().desc(),
            block_table: HostTensor::new(&bt, &[1, 1]).unwrap().desc(),
            cache_seqlens: HostTensor::new(&seqlens, &[1]).unwrap().desc(),
            head_dim_v: HEAD_DIM_V,
            tile_scheduler_metadata: HostTensorMut::new(&mut meta, &[4, METADATA_WORDS]).unwrap().desc(),
            num_splits: HostTensorMut::new(&mut splits, &[2]).unwrap().desc(),
            softmax_scale: None,
            causal: false,
            descale_q: None,
            descale_k: None,
            out: HostTensorMut::new(&mut out, &[1, 1, 1, HEAD_DIM_V]).unwrap().desc(),
            lse: HostTensorMut::new(&mut lse, &[1, 1, 1]).unwrap().desc(),
        };
        let mut ws = vec![0f32; WORKSPACE / 4];
        let asked = std::cell::Cell::new(0);
        let size = |s: &DecodeShape| {
            assert_eq!((s.batch, s.s_q, s.h_q, s.h_kv), (1, 1, 1, 1));
            asked.set(asked.get() + 1);
            Ok(WORKSPACE)
        };
        let err = |r: Result<ValidatedDecode>| r.unwrap_err().to_string();
        let caps = test_caps(Fp8Capabilities::none());

        let v = ValidatedDecode::new(&args, Workspace::host(&mut ws), &caps, size).unwrap();
        assert_eq!((v.problem().num_sm_parts, v.workspace().bytes(), asked.get()), (4, WORKSPACE, 1));

        let e = err(ValidatedDecode::new(&args, Workspace::host(&mut ws[..WORKSPACE / 8]), &caps, size));
        assert!(e.contains("`workspace_bytes`: expected >= 64 (workspace_size for this shape), got 32"), "{e}");
        // SAFETY: validation rejects this workspace (it overlaps `out`) before anything is read or written.
        let overlapping = unsafe { Workspace::from_raw(out_ptr.cast(), WORKSPACE, Device::Host) };
        let e = err(ValidatedDecode::new(&args, overlapping, &caps, size));
        assert!(e.contains("`out`: expected memory disjoint from `workspace`"), "{e}");

        // Arguments that fail validation never reach the backend's workspace_size.
        let asked_before = asked.get();
        let bad = DecodeArgs { head_dim_v: 128, ..args };
        let e = err(ValidatedDecode::new(&bad, Workspace::host(&mut ws), &caps, size));
        assert!(e.contains("`head_dim_v`: expected 512, got 128"), "{e}");
        assert_eq!(asked.get(), asked_before);
    }
}
