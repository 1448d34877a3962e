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
//!
//! ## Decoding from a Rust host
//!
//! Host memory enters through borrowed views ([`HostTensor`], [`HostTensorMut`], [`Workspace::host`]): safe code
//! cannot hand the library an address, and every call is validated once, before any memory is touched. Device
//! memory enters the same way through the views of `flashmla::cuda` (feature `cuda`: `DeviceTensor`,
//! `DeviceTensorMut`, `DeviceWorkspace` over cudarc buffers, `examples/cuda_decode.rs`), or through the `unsafe`
//! [`TensorDesc::from_raw`], whose contract the caller upholds. A step is two calls, `get_mla_metadata` (once per
//! step) and `decode` (once per layer):
//!
//! ```
//! use flashmla::{DType, DecodeArgs, DecodeShape, Device, HostTensor, HostTensorMut, MetadataArgs, Stream, Workspace};
//! use half::bf16;
//!
//! # fn main() -> flashmla::Result<()> {
//! // Picked at run time; host views need a backend that runs on host memory.
//! let mut backend = flashmla::open_backend("auto", 0)?;
//! if backend.capabilities().device != Device::Host {
//!     backend = flashmla::open_backend("cpu", 0)?;
//! }
//!
//! // One request of 10 cached tokens, one query token, 8 query heads over one KV head, page size 64.
//! let shape = DecodeShape { batch: 1, s_q: 1, h_q: 8, h_kv: 1, dtype: DType::Bf16 };
//! let q = vec![bf16::from_f32(0.5); 8 * 576];
//! let mut k_cache = vec![bf16::from_f32(0.25); 64 * 576];
//! k_cache[3 * 576] = bf16::from_f32(1.0); // token 3 differs in its first column: it gets a larger weight
//! let (block_table, seqlens) = (vec![0i32], vec![10i32]);
//!
//! let parts = backend.num_sm_parts(shape.q_seq_per_hk(), shape.h_kv);
//! let (mut metadata, mut num_splits) = (vec![0i32; parts * 8], vec![0i32; 2]);
//! backend.get_mla_metadata(
//!     &MetadataArgs {
//!         cache_seqlens: HostTensor::new(&seqlens, &[1])?.desc(),
//!         q_seq_per_hk: shape.q_seq_per_hk(),
//!         h_kv: 1,
//!         tile_scheduler_metadata: HostTensorMut::new(&mut metadata, &[parts, 8])?.desc(),
//!         num_splits: HostTensorMut::new(&mut num_splits, &[2])?.desc(),
//!     },
//!     Stream::DEFAULT,
//! )?;
//!
//! let (mut out, mut lse) = (vec![bf16::ZERO; 8 * 512], vec![0f32; 8]);
//! let mut workspace = vec![0f32; backend.workspace_size(&shape)?.div_ceil(4)];
//! let args = DecodeArgs {
//!     q: HostTensor::new(&q, &[1, 1, 8, 576])?.desc(),
//!     k_cache: HostTensor::new(&k_cache, &[1, 64, 1, 576])?.desc(),
//!     block_table: HostTensor::new(&block_table, &[1, 1])?.desc(),
//!     cache_seqlens: HostTensor::new(&seqlens, &[1])?.desc(),
//!     head_dim_v: 512,
//!     tile_scheduler_metadata: HostTensor::new(&metadata, &[parts, 8])?.desc(),
//!     num_splits: HostTensor::new(&num_splits, &[2])?.desc(),
//!     softmax_scale: None,
//!     causal: false,
//!     descale_q: None,
//!     descale_k: None,
//!     out: HostTensorMut::new(&mut out, &[1, 1, 8, 512])?.desc(),
//!     lse: HostTensorMut::new(&mut lse, &[1, 8, 1])?.desc(),
//! };
//! backend.decode(&args, Workspace::host(&mut workspace), Stream::DEFAULT)?;
//!
//! // Scores: 0.5·0.25·576/24 = 3 for nine tokens, 3 + 0.5·0.75/24 for token 3. Column 0 of V is 1.0 for token 3
//! // and 0.25 for the others; every other column is 0.25.
//! let (s, s3): (f64, f64) = (3.0, 3.0 + 0.375 / 24.0);
//! let z = 9.0 * s.exp() + s3.exp();
//! let col0 = (9.0 * s.exp() * 0.25 + s3.exp()) / z;
//! for h in 0..8 {
//!     assert!((out[h * 512].to_f64() - col0).abs() <= col0 * 2f64.powi(-8));
//!     assert_eq!(out[h * 512 + 1], bf16::from_f32(0.25));
//!     assert!((lse[h] as f64 - z.ln()).abs() < 1e-5);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! `examples/host_decode.rs` is the same on a larger problem, checked against float64.
//!
//! The decode over FP8 caches (DeepSeek V3.2 and MODEL1 layouts, sparse top-k or dense) is re-exported too:
//! [`Fp8DecodeArgs`], [`Fp8Layout`], [`Fp8Cache`], [`Fp8Capabilities`], [`MlaBackend::fp8_get_metadata`],
//! [`MlaBackend::fp8_decode`] (docs/sparse-fp8.md).

pub mod registry;

pub use mla_core::*;
pub use mla_cpu::CpuBackend;
#[cfg(feature = "cuda")]
pub use mla_hopper::HopperBackend;
/// Safe views of CUDA device memory (cudarc buffers) for the Hopper backend, and a small device helper ([`cuda::Gpu`]).
#[cfg(feature = "cuda")]
pub use mla_hopper::device as cuda;
pub use registry::{BACKEND_NAMES, open_backend};
