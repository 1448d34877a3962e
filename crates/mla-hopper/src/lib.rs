//! Hopper (sm_90a) backend. Interface fixed here; kernels land under issue 5.

use mla_core::{Capabilities, DecodeArgs, Error, MetadataArgs, MlaBackend, Result, Stream, Workspace};

/// Whether the sm_90a kernels were compiled into this build.
pub const KERNELS_BUILT: bool = false;

/// One line describing how the kernels were built (compiler version), or why they were not.
pub fn build_info() -> &'static str {
    "kernels not built"
}

/// The Hopper backend, bound to one CUDA device.
pub struct HopperBackend {
    caps: Capabilities,
}

impl HopperBackend {
    /// Opens CUDA device `ordinal`. Errors with `Unavailable` (no driver, no device, kernels not built) or
    /// `Unsupported` (not sm_90), never panics.
    pub fn new(ordinal: i32) -> Result<Self> {
        Err(Error::Unavailable { backend: "hopper".into(), reason: format!("device {ordinal}: kernels not built") })
    }
}

impl MlaBackend for HopperBackend {
    fn name(&self) -> &'static str {
        "hopper"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn get_mla_metadata(&self, args: &MetadataArgs, _stream: Stream) -> Result<()> {
        mla_core::validate_metadata(args, &self.caps)?;
        Err(Error::backend("hopper", "not implemented yet"))
    }

    fn decode(&self, args: &DecodeArgs, _workspace: Workspace, _stream: Stream) -> Result<()> {
        mla_core::validate_decode(args, &self.caps)?;
        Err(Error::backend("hopper", "not implemented yet"))
    }
}
