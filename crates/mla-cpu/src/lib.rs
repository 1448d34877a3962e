//! CPU reference backend. Interface fixed here; the numerics land under issue 3.

use mla_core::{
    Capabilities, DType, DecodeArgs, Device, Error, MetadataArgs, MlaBackend, PageSizes, Result, Stream, Workspace,
};

/// The CPU backend.
pub struct CpuBackend {
    caps: Capabilities,
}

impl CpuBackend {
    /// A backend using rayon's global thread pool.
    pub fn new() -> Self {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        CpuBackend {
            caps: Capabilities {
                backend: "cpu",
                device: Device::Host,
                device_name: "host CPU".into(),
                sm_count: threads,
                compute_capability: None,
                dtypes: DType::ALL.to_vec(),
                head_dims: vec![Capabilities::MLA_HEAD_DIMS],
                page_sizes: PageSizes::Any,
            },
        }
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

    fn get_mla_metadata(&self, args: &MetadataArgs, _stream: Stream) -> Result<()> {
        let (batch, parts) = mla_core::validate_metadata(args, &self.caps)?;
        // SAFETY: validation checked dtype i32, shape [batch], contiguity and non-null host memory; the caller of
        // the trait guarantees the descriptor points at live memory of that extent.
        let seqlens = unsafe { std::slice::from_raw_parts(args.cache_seqlens.data as *const i32, batch) };
        let plan = mla_core::scheduler::plan(seqlens, parts)?;
        // SAFETY: as above for the two outputs, shapes [parts, 8] and [batch + 1], both contiguous.
        let (meta, splits) = unsafe {
            (
                std::slice::from_raw_parts_mut(args.tile_scheduler_metadata.data as *mut i32, parts * 8),
                std::slice::from_raw_parts_mut(args.num_splits.data as *mut i32, batch + 1),
            )
        };
        plan.write_into(meta, splits)
    }

    fn decode(&self, args: &DecodeArgs, _workspace: Workspace, _stream: Stream) -> Result<()> {
        mla_core::validate_decode(args, &self.caps)?;
        Err(Error::backend("cpu", "not implemented yet"))
    }
}
