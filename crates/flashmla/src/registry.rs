//! Backends by name: the one place that knows every backend crate.
//!
//! | name | opens |
//! |---|---|
//! | `cpu` | [`mla_cpu::CpuBackend`] |
//! | `hopper` | `mla_hopper::HopperBackend` on the given CUDA ordinal (feature `cuda`; without it, unavailable) |
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
        "hopper" => open_hopper(ordinal),
        "auto" => open_hopper(ordinal).or_else(|_| Ok(Box::new(mla_cpu::CpuBackend::new()))),
        other => Err(Error::invalid("backend", format!("one of {BACKEND_NAMES:?}"), format!("{other:?}"))),
    }
}

/// `mla_hopper::HopperBackend::new`, with a panic (missing CUDA library or symbol) reported as unavailable.
#[cfg(feature = "cuda")]
fn open_hopper(ordinal: i32) -> Result<Box<dyn MlaBackend>> {
    let opened = std::panic::catch_unwind(|| mla_hopper::HopperBackend::new(ordinal)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        Err(Error::Unavailable {
            backend: "hopper".into(),
            reason: format!("opening device {ordinal} panicked: {what}"),
        })
    });
    Ok(Box::new(opened?))
}

/// Built without the `cuda` feature: no Hopper backend to open.
#[cfg(not(feature = "cuda"))]
fn open_hopper(ordinal: i32) -> Result<Box<dyn MlaBackend>> {
    Err(Error::Unavailable {
        backend: "hopper".into(),
        reason: format!("device {ordinal}: built without the `cuda` feature"),
    })
}

#[cfg(all(test, not(feature = "cuda")))]
mod tests {
    #[test]
    fn without_cuda_hopper_is_unavailable_and_auto_is_the_cpu() {
        let err = super::open_backend("hopper", 0).err().expect("no hopper backend").to_string();
        assert!(err.contains("built without the `cuda` feature"), "{err}");
        assert_eq!(super::open_backend("auto", 0).unwrap().name(), "cpu");
    }
}
