//! Kernel parameter blocks: `#[repr(C)]` mirrors of `kernels/mla_params.h`, passed to the kernels by value.
//!
//! Device addresses are `u64`, strides are in elements. Field order and types must match the C structs exactly;
//! the size assertions below catch a drift in either file.

/// `mla::DecodeParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DecodeParams {
    pub q: u64,
    pub block_table: u64,
    pub seqlens: u64,
    pub metadata: u64,
    pub num_splits: u64,
    pub out: u64,
    pub lse: u64,
    pub lse_accum: u64,
    pub o_accum: u64,
    pub descale_q: u64,
    pub descale_k: u64,
    pub q_stride_b: i64,
    pub q_stride_t: i64,
    pub q_stride_h: i64,
    pub bt_stride_b: i64,
    pub o_stride_b: i64,
    pub o_stride_t: i64,
    pub o_stride_h: i64,
    pub lse_stride_b: i64,
    pub lse_stride_h: i64,
    pub lse_stride_t: i64,
    pub scale_log2: f32,
    pub batch: i32,
    pub s_q: i32,
    pub h_q: i32,
    pub h_kv: i32,
    pub heads_per_kv: i32,
    pub q_seq_per_hk: i32,
    pub max_blocks_per_seq: i32,
    pub causal: i32,
    pub pad0: i32,
}

/// `mla::CombineParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CombineParams {
    pub lse_accum: u64,
    pub o_accum: u64,
    pub num_splits: u64,
    pub out: u64,
    pub lse: u64,
    pub o_stride_b: i64,
    pub o_stride_t: i64,
    pub o_stride_h: i64,
    pub lse_stride_b: i64,
    pub lse_stride_h: i64,
    pub lse_stride_t: i64,
    pub batch: i32,
    pub h_kv: i32,
    pub heads_per_kv: i32,
    pub q_seq_per_hk: i32,
}

/// `mla::MetadataParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MetadataParams {
    pub seqlens: u64,
    pub metadata: u64,
    pub num_splits: u64,
    pub batch: i32,
    pub num_sm_parts: i32,
    pub seqlens_in_smem: i32,
    pub pad0: i32,
}

// 11 pointers + 10 strides (8 B each) + 10 four-byte fields.
const _: () = assert!(std::mem::size_of::<DecodeParams>() == 21 * 8 + 10 * 4);
const _: () = assert!(std::mem::size_of::<CombineParams>() == 11 * 8 + 4 * 4);
const _: () = assert!(std::mem::size_of::<MetadataParams>() == 3 * 8 + 4 * 4);
