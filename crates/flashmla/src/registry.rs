//! Backends by name: the one place that knows every backend crate.
//!
//! | name | opens |
//! |---|---|
//! | `cpu` | [`mla_cpu::CpuBackend`] |
//! | `hopper` | [`mla_hopper::HopperBackend`] on the given CUDA ordinal |
//! | `auto` | `hopper` if it opens, else `cpu` |
//!
//! Opening `hopper` never panics: cudarc panics (rather than returning an error) when `libcuda` or a symbol is
//! missing, so a panic while opening is turned into [`Error::Unavailable`] here.

use mla_core::{Error, MlaBackend, Result};

/// Every backend name [`open_backend`] accepts.
pub const BACKEND_NAMES: [&str; 3] = ["auto", "cpu", "hopper"];

/// Opens a backend by name; `ordinal` picks the CUDA device for GPU backends.
pub fn open_backend(name: &str, ordinal: i32) -> Result<Box<dyn MlaBackend>> {
    match name {
        "cpu" => Ok(Box::new(mla_cpu::CpuBackend::new())),
        "hopper" => Ok(Box::new(open_hopper(ordinal)?)),
        "auto" => match open_hopper(ordinal) {
            Ok(b) => Ok(Box::new(b)),
            Err(_) => Ok(Box::new(mla_cpu::CpuBackend::new())),
        },
        other => Err(Error::invalid("backend", format!("one of {BACKEND_NAMES:?}"), format!("{other:?}"))),
    }
}

/// [`mla_hopper::HopperBackend::new`], with a panic (missing CUDA library or symbol) reported as unavailable.
fn open_hopper(ordinal: i32) -> Result<mla_hopper::HopperBackend> {
    std::panic::catch_unwind(|| mla_hopper::HopperBackend::new(ordinal)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        Err(Error::Unavailable {
            backend: "hopper".into(),
            reason: format!("opening device {ordinal} panicked: {what}"),
        })
    })
}
