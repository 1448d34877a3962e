//! The crate's one error type, mapped into [`mla_core::Error`] at the API boundary.

use cudarc::driver::DriverError;

/// What can go wrong inside the Hopper backend.
#[derive(Debug, thiserror::Error)]
pub enum HopperError {
    /// The crate was built without nvcc.
    #[error("kernels not built ({0})")]
    KernelsNotBuilt(&'static str),
    /// `libcuda.so` could not be loaded.
    #[error("the CUDA driver library (libcuda.so.1) was not found")]
    NoDriver,
    /// The requested ordinal does not exist.
    #[error("no CUDA device {ordinal} (the driver reports {count} device(s))")]
    NoDevice {
        /// Requested ordinal.
        ordinal: i32,
        /// Devices present.
        count: i32,
    },
    /// The device is not a Hopper (sm_90) GPU.
    #[error("device {ordinal} ({name}) has compute capability {major}.{minor}; the kernels need sm_90 (Hopper)")]
    NotHopper {
        /// Ordinal.
        ordinal: i32,
        /// Device name.
        name: String,
        /// Compute capability major.
        major: i32,
        /// Compute capability minor.
        minor: i32,
    },
    /// A driver call failed while opening the device.
    #[error("opening the device: `{call}` failed: {source}")]
    Init {
        /// The call.
        call: &'static str,
        /// Driver status.
        source: DriverError,
    },
    /// A driver call failed after the device was opened (launch, tensor-map encoding, …).
    #[error("`{call}` failed: {source}")]
    Driver {
        /// The call.
        call: &'static str,
        /// Driver status.
        source: DriverError,
    },
    /// The split-kernel cubin named by [`crate::SPLITKV_CUBIN_ENV`] could not be read.
    #[error("reading the split-kernel cubin {path} (from ${var}): {source}")]
    KernelFile {
        /// The environment variable that named it.
        var: &'static str,
        /// The path it named.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A development switch of the environment has a value the backend does not know.
    #[error("${var}={value:?}: expected {expected}")]
    EnvValue {
        /// The environment variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// The values it takes.
        expected: &'static str,
    },
    /// The CUDA bindings panicked (e.g. a missing driver symbol); caught so callers never see a panic.
    #[error("the CUDA bindings panicked: {0}")]
    Panic(String),
}

impl From<HopperError> for mla_core::Error {
    fn from(e: HopperError) -> Self {
        let backend = "hopper".to_string();
        match e {
            HopperError::NotHopper { .. } => mla_core::Error::Unsupported { backend, reason: e.to_string() },
            HopperError::Driver { .. } => mla_core::Error::Backend { backend, message: e.to_string() },
            _ => mla_core::Error::Unavailable { backend, reason: e.to_string() },
        }
    }
}

/// Turns a driver status into a [`HopperError::Driver`] naming the call.
pub(crate) fn check(call: &'static str, r: cudarc::driver::sys::CUresult) -> Result<(), HopperError> {
    match r {
        cudarc::driver::sys::CUresult::CUDA_SUCCESS => Ok(()),
        status => Err(HopperError::Driver { call, source: DriverError(status) }),
    }
}

/// Formats a caught panic payload.
pub(crate) fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f` with panics from the driver bindings turned into [`HopperError::Panic`]: opening a device never
/// unwinds into the caller.
pub(crate) fn no_panic<T>(f: impl FnOnce() -> Result<T, HopperError>) -> mla_core::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(mla_core::Error::from),
        Err(p) => Err(HopperError::Panic(panic_message(p)).into()),
    }
}

/// The primary context of CUDA device `ordinal`: `NoDriver` / `NoDevice` where there is none.
pub(crate) fn open_primary_context(ordinal: i32) -> Result<std::sync::Arc<cudarc::driver::CudaContext>, HopperError> {
    use cudarc::driver::{CudaContext, result, sys};
    let init = |call| move |source| HopperError::Init { call, source };
    // SAFETY: probing for the library has no preconditions; it only dlopens candidate names.
    if !unsafe { sys::is_culib_present() } {
        return Err(HopperError::NoDriver);
    }
    result::init().map_err(init("cuInit"))?;
    let count = result::device::get_count().map_err(init("cuDeviceGetCount"))?;
    if ordinal < 0 || ordinal >= count {
        return Err(HopperError::NoDevice { ordinal, count });
    }
    CudaContext::new(ordinal as usize).map_err(init("cuDevicePrimaryCtxRetain"))
}
