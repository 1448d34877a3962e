//! # mla-core
//!
//! The backend-independent half of flashmla-rs: element types, tensor descriptors, argument validation, the
//! split-KV scheduler, the partial-combine math and the [`MlaBackend`] trait.
//!
//! | module | what it holds |
//! |---|---|
//! | [`dtype`] | `DType` (bf16/fp16/e4m3), exact conversions, the e4m3 table |
//! | [`tensor`] | DLPack-shaped [`TensorDesc`], safe host views |
//! | [`problem`] | decode/metadata arguments, [`validate_decode`] |
//! | [`scheduler`] | host reference of `get_mla_metadata` |
//! | [`splitkv`] | workspace layout, log-sum-exp merge of partials |
//! | [`backend`] | the object-safe [`MlaBackend`] trait and [`Capabilities`] |
//! | [`fp8`] | the FP8 KV-cache layouts (V3.2, MODEL1): byte offsets, exact quantise/dequantise |
//! | [`sparse`] | decode over an FP8 cache (sparse top-k or dense): arguments, [`validate_fp8_decode`], scheduler math |
//!
//! The math, per request `i`, query token `t`, head `h` (KV head `g = h / (h_q / h_kv)`):
//! `out = softmax(scale · q · Kᵀ) · V`, with K rows 576 wide and V their first 512 columns, over the request's
//! `cache_seqlens[i]` tokens of the paged cache; `lse` is the natural-log normaliser. A row that attends to
//! nothing has `out = 0`, `lse = +inf`.

pub mod backend;
pub mod dtype;
mod error;
pub mod fp8;
pub mod problem;
pub mod scheduler;
pub mod sparse;
pub mod splitkv;
pub mod tensor;

pub use backend::{Capabilities, MlaBackend, PageSizes, Stream, Workspace};
pub use dtype::{DType, E4M3, ScalarType};
pub use error::{Error, Result};
pub use fp8::{Fp8Cache, Fp8Layout};
pub use problem::{
    DecodeArgs, DecodeProblem, DecodeShape, HEAD_DIM_K, HEAD_DIM_V, MetadataArgs, ValidatedDecode, ValidatedMetadata,
    default_softmax_scale, validate_decode, validate_metadata,
};
pub use scheduler::{PartMetadata, SchedulePlan};
pub use sparse::{
    Fp8Capabilities, Fp8DecodeArgs, Fp8Lengths, Fp8Mode, Fp8Problem, Fp8Shape, SparseSupport, ValidatedFp8Decode,
    ValidatedFp8Metadata, validate_fp8_decode, validate_fp8_metadata,
};
pub use splitkv::WorkspaceLayout;
pub use tensor::{Device, Element, HostTensor, HostTensorMut, TensorDesc};
