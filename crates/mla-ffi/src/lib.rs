//! # flashmla (mla-ffi): the stable C ABI of flashmla-rs
//!
//! Built as `libflashmla.so` / `libflashmla.a` with the header `include/flashmla.h` (generated from this crate by
//! cbindgen, checked by `tests/header.rs`). Backends are opened by name through the `flashmla` crate's registry.
//!
//! | C entry point | does |
//! |---|---|
//! | `flashmla_abi_version`, `flashmla_version` | ABI number (`FLASHMLA_ABI_VERSION`) and library version |
//! | `flashmla_last_error_message`, `flashmla_status_name` | the calling thread's last error; status names |
//! | `flashmla_backend_open` / `_free` | opaque `flashmla_backend` handle (`"auto"`, `"cpu"`, `"hopper"`) |
//! | `flashmla_backend_capabilities` | dtypes, head dims, page sizes, device, SM count, compute capability |
//! | `flashmla_num_sm_parts`, `flashmla_workspace_size` | buffer sizes for the two steps |
//! | `flashmla_get_mla_metadata` | scheduler step (once per decoding step) |
//! | `flashmla_with_kvcache` | decode step (once per layer) |
//! | `flashmla_backend_fp8_capabilities`, `flashmla_fp8_*` | decode over FP8 caches, sparse or dense (ABI 2, [`fp8`]) |
//!
//! Conventions, as in rustls-ffi: every fallible call returns a [`flashmla_status`] and runs inside a panic
//! boundary ([`status`]); tensors are DLPack-shaped [`flashmla_tensor`] descriptors ([`tensor`]); every buffer,
//! including the workspace, is owned by the caller; GPU work goes on the caller's stream. Handles may be shared
//! between threads. See `docs/c-api.md` for a complete C example.

pub mod api;
pub mod fp8;
pub mod status;
pub mod tensor;

pub use api::*;
pub use fp8::*;
pub use status::{flashmla_last_error_message, flashmla_status, flashmla_status_name, status_of};
pub use tensor::{FLASHMLA_MAX_NDIM, flashmla_device_type, flashmla_dtype, flashmla_tensor};
