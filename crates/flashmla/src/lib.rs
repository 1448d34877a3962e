//! # flashmla
//!
//! Multi-head latent attention (MLA) decoding for DeepSeek-style models: the crate a Rust host depends on. It
//! re-exports the backend-independent API of [`mla_core`] and opens a backend by name at run time:
//!
//! | name | backend |
//! |---|---|
//! | `cpu` | [`CpuBackend`]: the exact, deterministic reference (rayon + SIMD) |
//! | `hopper` | `HopperBackend`: fused sm_90a kernels on an H100/H200/H800 (feature `cuda`, on by default) |
//! | `auto` | `hopper` if it opens, else `cpu` |
//!
//! Every front end (the C ABI, the CLI, the Python extension) opens its backends here, so this is the one place
//! that knows every backend crate.

pub mod registry;

pub use mla_core::*;
pub use mla_cpu::CpuBackend;
#[cfg(feature = "cuda")]
pub use mla_hopper::HopperBackend;
pub use registry::{BACKEND_NAMES, open_backend};
