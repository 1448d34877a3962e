//! # mla-cpu
//!
//! The CPU reference backend of flashmla-rs: exact (f32 accumulation on the exactly widened inputs, no rounding of
//! intermediate probabilities), deterministic, and fast enough to be useful (rayon across work units, runtime
//! dispatched AVX2+FMA+F16C, K/V widened in registers).
//!
//! | step | where | what |
//! |---|---|---|
//! | validate | [`MlaBackend::decode`] (descriptors, workspace), `prepare` | every descriptor, length, page id, metadata row, workspace size: all before any write |
//! | schedule | the caller's `tile_scheduler_metadata` + `num_splits` (from [`MlaBackend::get_mla_metadata`]) | expanded by [`mla_core::scheduler::part_work`] into work items |
//! | attend | `kernel` | one rayon task per (work item, KV head): online softmax over 64-token blocks |
//! | combine | `kernel` | one rayon task per (split request, KV head): LSE merge of the workspace partials |
//!
//! The decode over FP8 caches (sparse top-k and dense, [`mla_core::sparse`]) is the `fp8` module: an exact
//! reference that dequantises each selected token row once; [`fp8problem`] holds its host problems.
//!
//! Also here: [`problem`] (owned host problems, random engine-like problems, a host runner) and [`roofline`] (this
//! machine's copy bandwidth and FMA peak, for the benchmarks).
//!
//! ## Determinism
//!
//! The metadata uses a fixed part count ([`SCHEDULER_PARTS`], not the thread count), every unit runs sequentially
//! in a fixed order, and the scalar and SIMD inner loops share one logical accumulation order (`simd` module docs).
//! Results are therefore bitwise identical for any thread count and instruction set.

mod fp8;
pub mod fp8problem;
mod kernel;
mod prepare;
pub mod problem;
pub mod roofline;
mod simd;

use std::sync::Arc;

pub use simd::Isa;

use mla_core::{
    Capabilities, DType, Device, Error, Fp8Capabilities, Fp8Shape, MlaBackend, PageSizes, Result, Stream,
    ValidatedDecode, ValidatedFp8Decode, ValidatedFp8Metadata, ValidatedMetadata,
};

/// The `sm_count` the CPU backend reports: the scheduler's parallelism. Fixed (not the thread count) so that the
/// metadata, and therefore every result bit, is the same on every machine and thread pool; 32 parts keep up to
/// 32 threads busy even for a batch of one.
pub const SCHEDULER_PARTS: usize = 32;

/// Construction options of [`CpuBackend`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuOptions {
    /// Worker threads (`None`: rayon's global pool).
    pub threads: Option<usize>,
    /// Instruction set (`None`: the best this CPU supports).
    pub isa: Option<Isa>,
}

/// The CPU backend.
pub struct CpuBackend {
    caps: Capabilities,
    isa: Isa,
    pool: Option<Arc<rayon::ThreadPool>>,
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

impl CpuBackend {
    /// A backend using rayon's global thread pool and the best instruction set of this CPU.
    pub fn new() -> Self {
        Self::with_options(CpuOptions::default()).expect("default CPU options are always valid")
    }

    /// A backend with its own pool of `threads` workers.
    pub fn with_threads(threads: usize) -> Result<Self> {
        Self::with_options(CpuOptions { threads: Some(threads), isa: None })
    }

    /// A backend with explicit options; errors if the instruction set is unavailable or the pool cannot start.
    pub fn with_options(opts: CpuOptions) -> Result<Self> {
        let isa = opts.isa.unwrap_or_else(Isa::detect);
        if !isa.is_available() {
            return Err(Error::Unsupported { backend: "cpu".into(), reason: format!("this CPU lacks {}", isa.name()) });
        }
        let pool = match opts.threads {
            None => None,
            Some(0) => return Err(Error::invalid("threads", ">= 1", 0)),
            Some(n) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("mla-cpu-{i}"))
                    .build()
                    .map_err(|e| Error::backend("cpu", format!("cannot start {n} threads: {e}")))?,
            )),
        };
        let threads = pool.as_ref().map_or_else(rayon::current_num_threads, |p| p.current_num_threads());
        let model = cpu_model().unwrap_or_else(|| std::env::consts::ARCH.to_string());
        Ok(CpuBackend {
            caps: Capabilities {
                backend: "cpu",
                device: Device::Host,
                device_name: format!("{model} ({threads} threads, {})", isa.name()),
                sm_count: SCHEDULER_PARTS,
                compute_capability: None,
                dtypes: DType::ALL.to_vec(),
                head_dims: vec![Capabilities::MLA_HEAD_DIMS],
                page_sizes: PageSizes::Any,
                fp8: Fp8Capabilities::full(),
            },
            isa,
            pool,
        })
    }

    /// The instruction set the kernels use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Runs `f` on this backend's thread pool (the global pool if it has none).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    /// Worker threads used by [`MlaBackend::decode`].
    pub fn threads(&self) -> usize {
        self.pool.as_ref().map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MlaBackend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn metadata_validated(&self, v: &ValidatedMetadata, _stream: Stream) -> Result<()> {
        let (args, batch, parts) = (v.args(), v.batch(), v.num_sm_parts());
        // SAFETY: validation checked dtype i32, shape [batch], contiguity, non-null host memory and that the outputs
        // are writable and overlap nothing; the descriptor's constructor (a borrowed host view, or the caller of the
        // unsafe `TensorDesc::from_raw`) guarantees live memory of that extent.
        let seqlens = unsafe { std::slice::from_raw_parts(args.cache_seqlens.data() as *const i32, batch) };
        let plan = mla_core::scheduler::plan(seqlens, parts)?;
        // SAFETY: as above for the two outputs, shapes [parts, 8] and [batch + 1], both contiguous.
        let (meta, splits) = unsafe {
            (
                std::slice::from_raw_parts_mut(args.tile_scheduler_metadata.data() as *mut i32, parts * 8),
                std::slice::from_raw_parts_mut(args.num_splits.data() as *mut i32, batch + 1),
            )
        };
        plan.write_into(meta, splits)
    }

    /// Synchronous: returns when `out` and `lse` are written. On any error nothing has been written.
    fn decode_validated(&self, v: &ValidatedDecode, _stream: Stream) -> Result<()> {
        let (args, prob, workspace) = (v.args(), v.problem(), v.workspace());
        let prep = prepare::prepare(args, prob, workspace)?;
        let (ws, isa, prep) = (kernel::SharedPtr(workspace.ptr().cast::<u8>()), self.isa, &prep);
        let args = kernel::SharedArgs(args);
        self.install(move || kernel::run(args, prob, prep, isa, ws));
        Ok(())
    }

    /// 0: the CPU computes each row in one pass and keeps no partials.
    fn fp8_workspace_size(&self, _shape: &Fp8Shape) -> Result<usize> {
        Ok(0)
    }

    fn fp8_metadata_validated(&self, v: &ValidatedFp8Metadata, _stream: Stream) -> Result<()> {
        fp8::get_metadata(v.args(), v.problem())
    }

    /// Synchronous: returns when `out` and `lse` are written. On any error nothing has been written. The metadata
    /// must be this problem's ([`MlaBackend::fp8_get_metadata`]); the workspace is not used.
    fn fp8_decode_validated(&self, v: &ValidatedFp8Decode, _stream: Stream) -> Result<()> {
        let args = v.args();
        let prep = fp8::prepare(args, v.problem())?;
        let (args, prep) = (fp8::SharedArgs(args), &prep);
        self.install(move || fp8::run(args, prep))
    }
}
