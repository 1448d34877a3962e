// Kernel parameter blocks, passed by value. crates/mla-hopper/src/params.rs mirrors them field for field
// (#[repr(C)]); keep the two in the same order. Strides are in elements.
#pragma once

#include <stdint.h>

namespace mla {

// Tile geometry shared by every kernel and by the host scheduler (mla_core::scheduler).
constexpr int BLOCK_M = 64;        // query rows (token x head-in-group) per CTA tile
constexpr int PAGE_TOKENS = 64;    // tokens per KV page = per KV tile (BLOCK_SIZE_N)
constexpr int HEAD_DIM_K = 576;    // 512 latent + 64 RoPE columns
constexpr int HEAD_DIM_V = 512;    // V = first 512 columns of K
constexpr int METADATA_WORDS = 8;  // int32 words per scheduler part
constexpr int FIXED_OVERHEAD_BLOCKS = 5;

// Split-KV decode (kernels/splitkv_mla.cu).
struct DecodeParams {
  const void* q;               // [b, s_q, h_q, 576]
  const int32_t* block_table;  // [b, max_blocks_per_seq]
  const int32_t* seqlens;      // [b]
  const int32_t* metadata;     // [num_sm_parts, 8]
  const int32_t* num_splits;   // [b + 1]
  void* out;                   // [b, s_q, h_q, 512]
  float* lse;                  // [b, h_q, s_q]
  float* lse_accum;            // [rows, h_kv, q_seq_per_hk]      (log2 domain)
  float* o_accum;              // [rows, h_kv, q_seq_per_hk, 512]
  const float* descale_q;      // [1], e4m3 only (else null)
  const float* descale_k;      // [1], e4m3 only (else null)
  int64_t q_stride_b, q_stride_t, q_stride_h;
  int64_t bt_stride_b;
  int64_t o_stride_b, o_stride_t, o_stride_h;
  int64_t lse_stride_b, lse_stride_h, lse_stride_t;
  float scale_log2;  // softmax_scale * log2(e)
  int32_t batch, s_q, h_q, h_kv;
  int32_t heads_per_kv;  // h_q / h_kv
  int32_t q_seq_per_hk;  // s_q * heads_per_kv
  int32_t max_blocks_per_seq;
  int32_t causal;
  int32_t pad0;
};

// Split combine (kernels/combine.cu).
struct CombineParams {
  const float* lse_accum;
  const float* o_accum;
  const int32_t* num_splits;
  void* out;
  float* lse;
  int64_t o_stride_b, o_stride_t, o_stride_h;
  int64_t lse_stride_b, lse_stride_h, lse_stride_t;
  int32_t batch, h_kv, heads_per_kv, q_seq_per_hk;
};

// Scheduler (kernels/get_metadata.cu).
struct MetadataParams {
  const int32_t* seqlens;  // [b]
  int32_t* metadata;       // [num_sm_parts, 8]
  int32_t* num_splits;     // [b + 1]
  int32_t batch;
  int32_t num_sm_parts;
  int32_t seqlens_in_smem;  // 1 if the launch reserved 2b + 1 int32 of dynamic shared memory (lengths, num_splits)
  int32_t pad0;
};

}  // namespace mla
