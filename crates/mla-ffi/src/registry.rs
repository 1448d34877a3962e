//! Backends by name: the one place that knows every backend crate.
//!
//! | name | opens |
//! |---|---|
//! | `cpu` | [`mla_cpu::CpuBackend`] |
//! | `hopper` | [`mla_hopper::HopperBackend`] on the given CUDA ordinal |
//! | `auto` | `hopper` if it opens, else `cpu` |

use mla_core::{Error, MlaBackend, Result};

/// Every backend name [`open_backend`] accepts.
pub const BACKEND_NAMES: [&str; 3] = ["auto", "cpu", "hopper"];

/// Opens a backend by name; `ordinal` picks the CUDA device for GPU backends.
pub fn open_backend(name: &str, ordinal: i32) -> Result<Box<dyn MlaBackend>> {
    match name {
        "cpu" => Ok(Box::new(mla_cpu::CpuBackend::new())),
        "hopper" => Ok(Box::new(mla_hopper::HopperBackend::new(ordinal)?)),
        "auto" => match mla_hopper::HopperBackend::new(ordinal) {
            Ok(b) => Ok(Box::new(b)),
            Err(_) => Ok(Box::new(mla_cpu::CpuBackend::new())),
        },
        other => Err(Error::invalid("backend", format!("one of {BACKEND_NAMES:?}"), format!("{other:?}"))),
    }
}
