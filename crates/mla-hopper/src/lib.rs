//! Hopper (sm_90a) backend: fused MLA decode kernels on the tensor cores (wgmma + TMA), launched through cudarc.
//!
//! A decoding step is three kernels on the caller's stream, none of which allocates or talks to the host:
//!
//! | step | kernel (`kernels/`) | grid | what it does |
//! |---|---|---|---|
//! | [`MlaBackend::get_mla_metadata`] | `get_metadata.cu` | 1 CTA | device `cache_seqlens` → per-part work ranges, `num_splits` (= `mla_core::scheduler::plan`) |
//! | [`MlaBackend::decode`] (1) | `splitkv_mla.cu` | (⌈q_seq_per_hk/64⌉, h_kv, parts) | attention over each part's pages; whole requests write `out`/`lse`, splits write partials |
//! | [`MlaBackend::decode`] (2) | `combine.cu` | (b, ⌈h_kv·q_seq_per_hk/8⌉) | merges the partials of split requests (log2-domain LSE) |
//!
//! The workspace is mla-core's default [`mla_core::WorkspaceLayout`]; `lse_accum` holds **base-2** log-sum-exps
//! (`m + log2 l` of the log2-scaled logits). The `lse` output is natural log, as everywhere in the API.
//!
//! Runtime: the CUDA driver is loaded dynamically (cudarc `dynamic-loading`); nothing links against CUDA at build
//! time. The cubins are compiled by `build.rs` with nvcc 13.0 and embedded; without nvcc the crate still builds and
//! [`HopperBackend::new`] reports `Unavailable` ("kernels not built").
//!
//! Argument requirements beyond mla-core's validation (each violation is an `InvalidArgument` naming it):
//! 64-token pages; `q` and `k_cache` 16-byte aligned with strides that are multiples of 16 bytes (TMA and 16-byte
//! loads); `out` 4-byte aligned with even strides; a workspace of at least [`MlaBackend::workspace_size`] bytes,
//! 16-byte aligned. Tokens past `max_blocks_per_seq · 64` are never read, even if `cache_seqlens` claims more.

use std::panic::catch_unwind;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, result, sys};
use mla_core::{
    Capabilities, DType, Device, Error, Fp8Capabilities, MlaBackend, PageSizes, Result, Stream, TensorDesc,
    ValidatedDecode, ValidatedMetadata, WorkspaceLayout,
};

pub mod device;
mod error;
mod params;
mod tma;

pub use error::HopperError;
use error::check;
use params::{CombineParams, DecodeParams, MetadataParams};

/// Whether the sm_90a kernels were compiled into this build.
pub const KERNELS_BUILT: bool = cfg!(not(mla_no_kernels));

/// One line describing how the kernels were built (compiler version), or why they were not.
pub fn build_info() -> &'static str {
    env!("MLA_BUILD_INFO")
}

/// The embedded cubins (one per kernel file).
#[cfg(not(mla_no_kernels))]
mod cubins {
    pub(crate) const SPLITKV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/splitkv_mla.cubin"));
    pub(crate) const COMBINE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/combine.cubin"));
    pub(crate) const METADATA: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/get_metadata.cubin"));
}

/// Development hook for A/B measurements of kernel variants: when set, the split kernels are loaded from this cubin
/// file (compiled from `kernels/splitkv_mla.cu` with other compile-time switches, same entry points and same
/// shared-memory plan) instead of the embedded one. `docs/gpu.md` describes the workflow.
pub const SPLITKV_CUBIN_ENV: &str = "FLASHMLA_HOPPER_SPLITKV_CUBIN";

/// Development switch for A/B measurements of programmatic dependent launch: `1` launches the three kernels with
/// `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`, so that each may be scheduled while the previous kernel
/// on the stream finishes (every kernel waits for it with `griddepcontrol.wait` before touching global memory, and
/// the split kernel lets the combine be scheduled before its epilogue); unset or `0` launches them plainly. Off by
/// default until it has been measured on a GPU (`docs/gpu.md`).
pub const PDL_ENV: &str = "FLASHMLA_HOPPER_PDL";

/// [`PDL_ENV`]'s value: unset, empty or `0` is off, `1` on; anything else an error naming the variable.
fn pdl_switch(value: Option<String>) -> Result<bool, HopperError> {
    match value.as_deref() {
        None | Some("" | "0") => Ok(false),
        Some("1") => Ok(true),
        Some(_) => Err(HopperError::EnvValue { var: PDL_ENV, value: value.unwrap_or_default(), expected: "0 or 1" }),
    }
}

/// Tokens per KV page: one kernel tile, one scheduler block (`PAGE_TOKENS` of kernels/mla_params.h).
pub const PAGE_SIZE: usize = mla_core::scheduler::BLOCK_SIZE_N;
/// Threads per CTA of the split kernel (two warpgroups).
const SPLITKV_THREADS: u32 = 256;
/// Rows (warps) per CTA of the combine kernel, 32 threads each.
const COMBINE_ROWS_PER_CTA: u32 = 8;
/// Splits per request from which the combine keeps several splits' rows in flight per warp (measured on the H100:
/// 3-16% faster on batches of 1-4 long requests, 1-3% slower at b = 128 with 2-3 splits).
const MANY_SPLITS: usize = 4;
/// Threads of the scheduler kernel.
const SCHED_THREADS: u32 = 256;
/// One SW128 tile chunk: 64 rows × 128 bytes (`CHUNK_BYTES` of kernels/smem_plan.h).
pub(crate) const CHUNK_BYTES: u32 = 8192;
/// Shared memory of the split kernel: `Smem<KIND>::DYNAMIC_BYTES` of kernels/smem_plan.h, which the kernel traps
/// without (the layout test in src/params.rs checks these against the C++ compiler). Q tile + `bufs` page buffers
/// (+ e4m3: the 32 KiB transposed V tile) + P + 3 × 64 f32 + one mbarrier per buffer + 1024 bytes to align the base.
const fn splitkv_smem_bytes(tile: u32, bufs: u32, fp8: bool) -> u32 {
    (1 + bufs) * tile + if fp8 { 4 * CHUNK_BYTES } else { 0 } + CHUNK_BYTES + 3 * 64 * 4 + 8 * bufs + 1024
}
/// 16-bit: 9 SW128 chunks per tile, two page buffers.
pub(crate) const SMEM_16BIT: u32 = splitkv_smem_bytes(9 * CHUNK_BYTES, 2, false);
/// e4m3: 4 SW128 chunks + a 4 KiB SW64 tail per tile, three page buffers.
pub(crate) const SMEM_E4M3: u32 = splitkv_smem_bytes(4 * CHUNK_BYTES + 4096, 3, true);
/// The opt-in per-block shared-memory limit of sm_90 (`SMEM_OPT_IN_LIMIT` of kernels/smem_plan.h).
pub(crate) const SMEM_OPT_IN_LIMIT: u32 = 232_448;
/// Dynamic shared memory the scheduler kernel may use: the default per-block limit, so that no launch needs more.
const SCHED_SMEM_BYTES: usize = 48 * 1024;
/// Largest batch whose lengths and `num_splits` (2b + 1 int32) the scheduler stages in shared memory (else it
/// works on global memory directly, slower but the same results).
const SCHED_SMEM_MAX_BATCH: usize = (SCHED_SMEM_BYTES / 4 - 1) / 2;
/// `log2(e)`: logits are computed in the log2 domain.
const LOG2_E: f32 = std::f32::consts::LOG2_E;

/// Number of CUDA devices, or 0 when there is no driver (never panics).
pub fn device_count() -> usize {
    catch_unwind(|| {
        // SAFETY: probing for the library has no preconditions; it only dlopens candidate names.
        if !unsafe { sys::is_culib_present() } {
            return 0;
        }
        result::init().ok().and_then(|_| result::device::get_count().ok()).map_or(0, |n| n.max(0) as usize)
    })
    .unwrap_or(0)
}

struct Kernels {
    _modules: Vec<Arc<CudaModule>>,
    splitkv: [CudaFunction; 3],
    /// `[output: bf16, f16][splits per request: few, many]` (kernels/combine.cu, `SPLITS_IN_FLIGHT_*`).
    combine: [[CudaFunction; 2]; 2],
    metadata: CudaFunction,
}

/// The Hopper backend, bound to one CUDA device.
pub struct HopperBackend {
    caps: Capabilities,
    ctx: Arc<CudaContext>,
    kernels: Kernels,
    /// Launch with programmatic dependent launch ([`PDL_ENV`]).
    pdl: bool,
}

impl HopperBackend {
    /// Opens CUDA device `ordinal`. Errors with `Unavailable` (no driver, no device, kernels not built) or
    /// `Unsupported` (not sm_90), never panics.
    pub fn new(ordinal: i32) -> Result<Self> {
        if !KERNELS_BUILT {
            return Err(HopperError::KernelsNotBuilt(build_info()).into());
        }
        error::no_panic(|| Self::open(ordinal))
    }

    fn open(ordinal: i32) -> Result<Self, HopperError> {
        let init = |call| move |source| HopperError::Init { call, source };
        let ctx = error::open_primary_context(ordinal)?;
        // SAFETY: called right after creating the context, before any allocation; the backend orders all its
        // work on the caller's stream itself (and needs no events, which would break graph capture).
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(init("cuDeviceGetName"))?;
        let (major, minor) = ctx.compute_capability().map_err(init("cuDeviceGetAttribute"))?;
        if (major, minor) != (9, 0) {
            return Err(HopperError::NotHopper { ordinal, name, major, minor });
        }
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(init("cuDeviceGetAttribute"))?;
        let pdl = pdl_switch(std::env::var(PDL_ENV).ok())?;
        let kernels = Self::load_kernels(&ctx)?;
        let caps = Capabilities {
            backend: "hopper",
            device: Device::Cuda(ordinal),
            device_name: name,
            sm_count: sm_count.max(1) as usize,
            compute_capability: Some((major as u32, minor as u32)),
            dtypes: DType::ALL.to_vec(),
            head_dims: vec![Capabilities::MLA_HEAD_DIMS],
            page_sizes: PageSizes::Only(vec![PAGE_SIZE]),
            fp8: Fp8Capabilities::none(),
        };
        Ok(HopperBackend { caps, ctx, kernels, pdl })
    }

    #[cfg(mla_no_kernels)]
    fn load_kernels(_ctx: &Arc<CudaContext>) -> Result<Kernels, HopperError> {
        Err(HopperError::KernelsNotBuilt(build_info()))
    }

    #[cfg(not(mla_no_kernels))]
    fn load_kernels(ctx: &Arc<CudaContext>) -> Result<Kernels, HopperError> {
        use cudarc::nvrtc::Ptx;
        let init = |call| move |source| HopperError::Init { call, source };
        let load = |bytes: &[u8]| ctx.load_module(Ptx::from_binary(bytes.to_vec())).map_err(init("cuModuleLoadData"));
        let split_bytes = match std::env::var_os(SPLITKV_CUBIN_ENV).filter(|p| !p.is_empty()) {
            Some(path) => std::fs::read(&path).map_err(|source| HopperError::KernelFile {
                var: SPLITKV_CUBIN_ENV,
                path: path.to_string_lossy().into_owned(),
                source,
            })?,
            None => cubins::SPLITKV.to_vec(),
        };
        let (split_mod, combine_mod, meta_mod) = (load(&split_bytes)?, load(cubins::COMBINE)?, load(cubins::METADATA)?);
        let func = |m: &Arc<CudaModule>, name| m.load_function(name).map_err(init("cuModuleGetFunction"));
        let splitkv = [
            func(&split_mod, "mla_splitkv_bf16")?,
            func(&split_mod, "mla_splitkv_f16")?,
            func(&split_mod, "mla_splitkv_e4m3")?,
        ];
        let smem_attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        for (f, bytes) in splitkv.iter().zip([SMEM_16BIT, SMEM_16BIT, SMEM_E4M3]) {
            f.set_attribute(smem_attr, bytes as i32).map_err(init("cuFuncSetAttribute"))?;
        }
        let metadata = func(&meta_mod, "mla_get_metadata")?;
        metadata.set_attribute(smem_attr, SCHED_SMEM_BYTES as i32).map_err(init("cuFuncSetAttribute"))?;
        Ok(Kernels {
            combine: [
                [func(&combine_mod, "mla_combine_bf16")?, func(&combine_mod, "mla_combine_bf16_many")?],
                [func(&combine_mod, "mla_combine_f16")?, func(&combine_mod, "mla_combine_f16_many")?],
            ],
            metadata,
            splitkv,
            _modules: vec![split_mod, combine_mod, meta_mod],
        })
    }

    /// Launches `f` with `params` (pointers to each argument) on `stream`, with programmatic dependent launch when
    /// [`PDL_ENV`] asked for it (through `cuLaunchKernelEx`, since cudarc's launch builder takes no launch
    /// attributes).
    fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        stream: Stream,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<(), HopperError> {
        let raw_stream = stream.as_raw() as sys::CUstream;
        if !self.pdl {
            // SAFETY: `params` points at live, correctly typed argument values that match the kernel's signature
            // (checked by the size assertions in params.rs); the stream is the caller's (null = legacy default) and
            // belongs to this device's primary context, which is current on this thread.
            let r = unsafe {
                sys::cuLaunchKernel(
                    f.cu_function(),
                    grid.0,
                    grid.1,
                    grid.2,
                    block,
                    1,
                    1,
                    smem,
                    raw_stream,
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            };
            return check("cuLaunchKernel", r);
        }
        // SAFETY: a plain C struct and union of integers and pointers, for which all-zero bytes are a valid value.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: raw_stream,
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as for cuLaunchKernel above; `config` and the attribute it points to outlive the call, and every
        // kernel of this crate waits for its prerequisite grids (`griddepcontrol.wait`) before its first
        // global-memory access, which is what the attribute requires of it.
        let r = unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) };
        check("cuLaunchKernelEx", r)
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|source| HopperError::Driver { call: "cuCtxSetCurrent", source }.into())
    }
}

fn addr(t: &TensorDesc) -> u64 {
    t.data() as u64
}

/// Checks that `t`'s base is `align`-byte aligned and its strides (in bytes, over dims of extent > 1, the last
/// excluded) are multiples of `align`.
fn check_alignment(name: &str, t: &TensorDesc, align: u64, why: &str) -> Result<()> {
    if !addr(t).is_multiple_of(align) {
        return Err(Error::invalid(
            format!("{name}.data"),
            format!("a {align}-byte aligned address ({why})"),
            format!("{:#x}", addr(t)),
        ));
    }
    let elem = t.dtype().size_bytes() as u64;
    for i in 0..t.ndim().saturating_sub(1) {
        if t.dims()[i] > 1 && !(t.stride_slice()[i] as u64 * elem).is_multiple_of(align) {
            return Err(Error::invalid(
                format!("{name}.strides[{i}]"),
                format!("a multiple of {} elements ({align} bytes: {why})", align / elem),
                t.stride_slice()[i],
            ));
        }
    }
    Ok(())
}

impl MlaBackend for HopperBackend {
    fn name(&self) -> &'static str {
        "hopper"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn metadata_validated(&self, v: &ValidatedMetadata, stream: Stream) -> Result<()> {
        let (args, batch, parts) = (v.args(), v.batch(), v.num_sm_parts());
        let batch_i32 = i32::try_from(batch).map_err(|_| Error::invalid("cache_seqlens.shape[0]", "< 2^31", batch))?;
        let in_smem = batch <= SCHED_SMEM_MAX_BATCH;
        let mut p = MetadataParams {
            seqlens: addr(&args.cache_seqlens),
            metadata: addr(&args.tile_scheduler_metadata),
            num_splits: addr(&args.num_splits),
            batch: batch_i32,
            num_sm_parts: parts as i32,
            seqlens_in_smem: in_smem as i32,
            pad0: 0,
        };
        self.bind()?;
        let smem = if in_smem { ((2 * batch + 1) * 4) as u32 } else { 0 };
        let mut argv = [&mut p as *mut MetadataParams as *mut std::ffi::c_void];
        self.launch(&self.kernels.metadata, (1, 1, 1), SCHED_THREADS, smem, stream, &mut argv)?;
        Ok(())
    }

    fn decode_validated(&self, v: &ValidatedDecode, stream: Stream) -> Result<()> {
        // Arguments and the workspace's size were validated once, by `MlaBackend::decode`; what is left is Hopper's.
        let (args, prob, workspace) = (v.args(), *v.problem(), v.workspace());
        let shape = prob.shape;
        check_alignment("q", &args.q, 16, "16-byte loads")?;
        check_alignment("k_cache", &args.k_cache, tma::TMA_ALIGN, "TMA")?;
        check_alignment("out", &args.out, 4, "paired stores")?;
        let layout = WorkspaceLayout::new(shape.batch, shape.q_seq_per_hk(), shape.h_kv, prob.num_sm_parts)?;
        if !(workspace.ptr() as u64).is_multiple_of(16) {
            return Err(Error::invalid("workspace.ptr", "a 16-byte aligned address", format!("{:p}", workspace.ptr())));
        }
        let too_big = |what: &str, v: usize| Error::invalid(what, "a value < 2^31", v);
        let qsph = shape.q_seq_per_hk();
        for (what, v) in
            [("batch", shape.batch), ("q_seq_per_hk", qsph), ("max_blocks_per_seq", prob.max_blocks_per_seq)]
        {
            if v > i32::MAX as usize {
                return Err(too_big(what, v));
            }
        }

        let k = &args.k_cache;
        let geometry = tma::KvGeometry {
            base: addr(k),
            elem_bytes: shape.dtype.size_bytes() as u64,
            num_blocks: prob.num_blocks as u64,
            page_size: prob.page_size as u64,
            h_kv: shape.h_kv as u64,
            strides: [k.stride_slice()[0], k.stride_slice()[1], k.stride_slice()[2]],
        };
        let map = tma::encode_kv_map(&geometry, tma::KvBox::Main).map_err(Error::from)?;
        // e4m3 reads the 64 RoPE columns through their own SW64 map; the 16-bit kernels ignore the argument.
        let tail = if shape.dtype == DType::E4M3 {
            tma::encode_kv_map(&geometry, tma::KvBox::E4m3Tail).map_err(Error::from)?
        } else {
            map
        };

        let ws = workspace.ptr() as u64;
        let (q, out, lse) = (&args.q, &args.out, &args.lse);
        let mut p = DecodeParams {
            q: addr(q),
            block_table: addr(&args.block_table),
            seqlens: addr(&args.cache_seqlens),
            metadata: addr(&args.tile_scheduler_metadata),
            num_splits: addr(&args.num_splits),
            out: addr(out),
            lse: addr(lse),
            lse_accum: ws + layout.lse_offset as u64,
            o_accum: ws + layout.o_offset as u64,
            descale_q: args.descale_q.as_ref().map_or(0, addr),
            descale_k: args.descale_k.as_ref().map_or(0, addr),
            q_stride_b: q.stride_slice()[0],
            q_stride_t: q.stride_slice()[1],
            q_stride_h: q.stride_slice()[2],
            bt_stride_b: args.block_table.stride_slice()[0],
            o_stride_b: out.stride_slice()[0],
            o_stride_t: out.stride_slice()[1],
            o_stride_h: out.stride_slice()[2],
            lse_stride_b: lse.stride_slice()[0],
            lse_stride_h: lse.stride_slice()[1],
            lse_stride_t: lse.stride_slice()[2],
            scale_log2: prob.softmax_scale * LOG2_E,
            batch: shape.batch as i32,
            s_q: shape.s_q as i32,
            h_q: shape.h_q as i32,
            h_kv: shape.h_kv as i32,
            heads_per_kv: shape.heads_per_kv() as i32,
            q_seq_per_hk: qsph as i32,
            max_blocks_per_seq: prob.max_blocks_per_seq as i32,
            causal: prob.causal as i32,
            pad0: 0,
        };
        let mut c = CombineParams {
            lse_accum: p.lse_accum,
            o_accum: p.o_accum,
            num_splits: p.num_splits,
            out: p.out,
            lse: p.lse,
            o_stride_b: p.o_stride_b,
            o_stride_t: p.o_stride_t,
            o_stride_h: p.o_stride_h,
            lse_stride_b: p.lse_stride_b,
            lse_stride_h: p.lse_stride_h,
            lse_stride_t: p.lse_stride_t,
            batch: p.batch,
            h_kv: p.h_kv,
            heads_per_kv: p.heads_per_kv,
            q_seq_per_hk: p.q_seq_per_hk,
        };
        // A long request is cut into about num_sm_parts / batch splits: from MANY_SPLITS on, the combine variant that
        // loads several splits' rows per warp at once (faster there; with 2-3 splits its registers cost occupancy).
        let many_splits = usize::from(prob.num_sm_parts >= MANY_SPLITS * shape.batch);
        let (split_fn, smem, combine_fn) = match shape.dtype {
            DType::Bf16 => (&self.kernels.splitkv[0], SMEM_16BIT, &self.kernels.combine[0][many_splits]),
            DType::F16 => (&self.kernels.splitkv[1], SMEM_16BIT, &self.kernels.combine[1][many_splits]),
            DType::E4M3 => (&self.kernels.splitkv[2], SMEM_E4M3, &self.kernels.combine[0][many_splits]),
        };
        debug_assert!(smem <= SMEM_OPT_IN_LIMIT);
        let m_blocks = qsph.div_ceil(mla_core::scheduler::BLOCK_SIZE_M);
        let grid_y =
            |v: usize, what: &str| u32::try_from(v).ok().filter(|&v| v <= 65_535).ok_or_else(|| too_big(what, v));
        let split_grid = (
            u32::try_from(m_blocks).map_err(|_| too_big("q_seq_per_hk", qsph))?,
            grid_y(shape.h_kv, "h_kv")?,
            grid_y(prob.num_sm_parts, "num_sm_parts")?,
        );
        let combine_grid = (
            shape.batch as u32,
            grid_y((shape.h_kv * qsph).div_ceil(COMBINE_ROWS_PER_CTA as usize), "h_kv * q_seq_per_hk / 8")?,
            1,
        );

        self.bind()?;
        let (mut map, mut tail) = (map, tail);
        let mut argv = [
            &mut map as *mut tma::TensorMap as *mut std::ffi::c_void,
            &mut tail as *mut tma::TensorMap as *mut std::ffi::c_void,
            &mut p as *mut DecodeParams as *mut std::ffi::c_void,
        ];
        self.launch(split_fn, split_grid, SPLITKV_THREADS, smem, stream, &mut argv)?;
        let mut argv = [&mut c as *mut CombineParams as *mut std::ffi::c_void];
        self.launch(combine_fn, combine_grid, COMBINE_ROWS_PER_CTA * 32, 0, stream, &mut argv)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdl_switch_takes_0_or_1_and_names_the_variable_otherwise() {
        assert!(!pdl_switch(None).unwrap());
        assert!(!pdl_switch(Some(String::new())).unwrap());
        assert!(!pdl_switch(Some("0".into())).unwrap());
        assert!(pdl_switch(Some("1".into())).unwrap());
        let e = pdl_switch(Some("yes".into())).unwrap_err().to_string();
        assert_eq!(e, "$FLASHMLA_HOPPER_PDL=\"yes\": expected 0 or 1");
    }
}
