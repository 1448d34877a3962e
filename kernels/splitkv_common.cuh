// The split kernel's building blocks that do not depend on the dtype's pipeline: the CTA shape, swizzled tile
// addressing, the query-tile load, the part → request bookkeeping and the epilogue that writes out/lse (whole
// request) or a partial (split). kernels/splitkv_mla.cu holds the pipeline itself.
//
// 256 threads (two warpgroups); warpgroup w owns output columns [256w, 256w + 256) of the 64 x 512 tile, and thread
// t of a warpgroup holds rows row_a = 16·(t/32) + (t%32)/4 and row_a + 8 of every wgmma accumulator.
#pragma once

#include <type_traits>

#include "mla_params.h"
#include "smem_plan.h"
#include "mla_ptx.cuh"

namespace mla {

constexpr int NUM_THREADS = 256;    // two warpgroups
constexpr int WG_THREADS = 128;     // one warpgroup
constexpr int ROW_BYTES = 128;      // a swizzled tile row
constexpr int SW128_SBO = 1024;     // 8 rows x 128 B: stride between 8-row groups
constexpr int SW64_SBO = 512;       // 8 rows x 64 B (the e4m3 SW64 tail)
constexpr int KMAJOR_LBO = 16;      // ignored for swizzled K-major operands
constexpr int V_HALF_COLS = 256;    // output columns per warpgroup
constexpr int V_CHUNKS = HEAD_DIM_V / 64;           // 16-bit V chunks (8)
constexpr int V_HALF_BYTES = 4 * CHUNK_BYTES;       // start of V columns 256..511 in a 16-bit tile
constexpr int V_K16_STEP_BYTES = 16 * ROW_BYTES;    // 16 tokens down the MN-major V view
constexpr int V_MN_LBO = CHUNK_BYTES;               // MN-major: stride between 64-column blocks
constexpr float LN2 = 0.69314718055994530942f;

// SW64 tile of 64-byte rows: 16-byte vector j of `row` (the XOR takes row bits 1-2: the SW64 pattern).
__device__ __forceinline__ uint32_t swz64(int row, int vec16) {
  return static_cast<uint32_t>(row * 64 + ((vec16 ^ ((row >> 1) & 3)) << 4));
}

__device__ __forceinline__ uint32_t swz128(int row, int vec16) {
  return static_cast<uint32_t>(row * ROW_BYTES + ((vec16 ^ (row & 7)) << 4));
}

// All 256 threads copy the 64 x 576 query tile into the swizzled K-major layout (zeros past the last row) with
// cp.async, so all of a thread's 16-byte pieces are in flight at once (a load → store loop would serialise ~18
// DRAM round trips per request: 7% of the kernel's stall samples in ncu before this). The first SW128_CHUNKS·128
// bytes of a row go to SW128 chunks; the rest (e4m3: the 64 RoPE bytes) to the SW64 tail at TAIL.
template <int ELEM_BYTES, int SW128_CHUNKS, int TAIL>
__device__ __forceinline__ void load_q_tile(uint32_t sq, const DecodeParams& p, int req, int kv_head, int tile_row0) {
  constexpr int VEC_PER_ROW = HEAD_DIM_K * ELEM_BYTES / 16;
  constexpr int SW128_VECS = SW128_CHUNKS * 8;
  const uint8_t* q = static_cast<const uint8_t*>(p.q);
  for (int idx = threadIdx.x; idx < BLOCK_M * VEC_PER_ROW; idx += NUM_THREADS) {
    const int row = idx / VEC_PER_ROW;
    const int v = idx % VEC_PER_ROW;
    const int rg = tile_row0 + row;
    const uint8_t* src = q;
    uint32_t bytes = 0;
    if (rg < p.q_seq_per_hk) {
      const int t = rg / p.heads_per_kv;
      const int h = kv_head * p.heads_per_kv + rg % p.heads_per_kv;
      src = q + (req * p.q_stride_b + t * p.q_stride_t + h * p.q_stride_h) * ELEM_BYTES + v * 16;
      bytes = 16;
    }
    const uint32_t dst = v < SW128_VECS ? (v / 8) * CHUNK_BYTES + swz128(row, v % 8) : TAIL + swz64(row, v - SW128_VECS);
    cp_async_16(sq + dst, src, bytes);
  }
  cp_async_wait_all();
}

// 16-bit tiles: zero V rows valid..63 of a page (NaN or garbage past the request's end; P is 0 there, but 0 · NaN is
// NaN), 128 threads.
__device__ __forceinline__ void zero_v_tail(uint8_t* sk, int valid, int tw) {
  constexpr int VEC_PER_V_ROW = V_CHUNKS * 8;
  for (int idx = tw; idx < (PAGE_TOKENS - valid) * VEC_PER_V_ROW; idx += WG_THREADS) {
    const int row = valid + idx / VEC_PER_V_ROW;
    const int v = idx % VEC_PER_V_ROW;
    *reinterpret_cast<uint4*>(sk + (v / 8) * CHUNK_BYTES + row * ROW_BYTES + (v % 8) * 16) = make_uint4(0, 0, 0, 0);
  }
}

template <int KIND>
__device__ __forceinline__ uint32_t pack_p(float lo, float hi) {
  if constexpr (KIND == KIND_BF16) {
    return pack_bf16x2(lo, hi);
  } else {
    return pack_f16x2(lo, hi);
  }
}

// The sum of the two values pack_p packed, as the tensor cores read them (after rounding).
template <int KIND>
__device__ __forceinline__ float packed_sum(uint32_t v) {
  if constexpr (KIND == KIND_BF16) {
    return __uint_as_float(v << 16) + __uint_as_float(v & 0xffff0000u);
  } else {
    const __half2 h = *reinterpret_cast<const __half2*>(&v);
    return __low2float(h) + __high2float(h);
  }
}

// The slice of one request that a CTA's scheduler part covers, and where its result goes.
struct RequestSlice {
  int s_k;          // the request's length (0 for a negative length)
  int blk_begin;    // first page of the slice
  int nblk;         // pages in the slice, after the causal and block-table clips
  bool is_split;    // the request has more than one split: write a partial to the workspace
  int split_row;    // workspace row of this split
  const int32_t* bt;
};

// md: the part's metadata row {begin_req, end_req, first_block, last_end_block, first_split, ...}.
__device__ __forceinline__ RequestSlice request_slice(const DecodeParams& p, const int32_t* md, int req, int tile_row0,
                                                      int rows_in_tile) {
  const int begin_req = md[0], end_req = md[1];
  RequestSlice r;
  r.s_k = max(p.seqlens[req], 0);
  r.blk_begin = req == begin_req ? md[2] : 0;
  int blk_end = req == end_req ? md[3] : (r.s_k + PAGE_TOKENS - 1) / PAGE_TOKENS;
  const int split_base = p.num_splits[req];
  r.is_split = p.num_splits[req + 1] - split_base > 1;
  r.split_row = split_base + (req == begin_req ? md[4] : 0);
  // Keys the tile's last row can see: pages past them are skipped (causal), and the block table is never read past
  // max_blocks_per_seq. Bottom-right causal: token t sees keys j <= s_k - s_q + t.
  int tile_limit = r.s_k;
  if (p.causal) {
    const int t_max = (tile_row0 + rows_in_tile - 1) / p.heads_per_kv;
    tile_limit = min(r.s_k, max(0, r.s_k - p.s_q + t_max + 1));
  }
  blk_end = min(blk_end, min((tile_limit + PAGE_TOKENS - 1) / PAGE_TOKENS, p.max_blocks_per_seq));
  r.nblk = max(0, blk_end - r.blk_begin);
  r.bt = p.block_table + req * p.bt_stride_b;
  return r;
}

// Keys visible to folded query row `rg` of a request of length s_k.
__device__ __forceinline__ int row_limit(const DecodeParams& p, int s_k, int rg) {
  return p.causal ? min(s_k, s_k - p.s_q + rg / p.heads_per_kv + 1) : s_k;
}

// Writes this thread's two rows of its warpgroup's 256 output columns: O / l (times v_scale, the e4m3 V descale)
// to out and lse = ln(2^m · l) for a whole request, or the normalised partial and its log2-domain lse to the
// workspace for a split. A row with l = 0 (or NaN) saw nothing: out = 0, lse = +inf (partial lse = −inf).
// `l` normalises O; `l_lse` (WG0's; the same as `l` unless MLA_ROUNDED_SUM_NORM) goes into lse.
template <bool OUT_F16>
__device__ __forceinline__ void store_rows(const float (&o)[128], const DecodeParams& p, const RequestSlice& r, int req,
                                           int kv_head, int tile_row0, int row_a, int quad, int wg, const float (&m)[2],
                                           const float (&l)[2], const float (&l_lse)[2], float v_scale) {
  using Out = typename std::conditional<OUT_F16, __half, __nv_bfloat16>::type;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int rg = tile_row0 + row_a + 8 * h;
    if (rg >= p.q_seq_per_hk) continue;
    const bool empty = !(l[h] > 0.0f);  // nothing seen (or an underflowed / NaN sum)
    const float inv = empty ? 0.0f : v_scale / l[h];
    const int col0 = wg * V_HALF_COLS + 2 * quad;
    if (!r.is_split) {
      const int t = rg / p.heads_per_kv;
      const int head = kv_head * p.heads_per_kv + rg % p.heads_per_kv;
      Out* orow = static_cast<Out*>(p.out) + req * p.o_stride_b + t * p.o_stride_t + head * p.o_stride_h;
#pragma unroll
      for (int jj = 0; jj < 32; ++jj) {
        const float a = o[4 * jj + 2 * h] * inv, b = o[4 * jj + 2 * h + 1] * inv;
        const uint32_t packed = OUT_F16 ? pack_f16x2(a, b) : pack_bf16x2(a, b);
        *reinterpret_cast<uint32_t*>(orow + col0 + 8 * jj) = packed;
      }
      if (wg == 0 && quad == 0) {
        p.lse[req * p.lse_stride_b + head * p.lse_stride_h + t * p.lse_stride_t] =
            empty ? INFINITY : (m[h] + log2f(l_lse[h])) * LN2;
      }
    } else {
      const int64_t prow = (static_cast<int64_t>(r.split_row) * p.h_kv + kv_head) * p.q_seq_per_hk + rg;
      float* orow = p.o_accum + prow * HEAD_DIM_V;
#pragma unroll
      for (int jj = 0; jj < 32; ++jj) {
        *reinterpret_cast<float2*>(orow + col0 + 8 * jj) =
            make_float2(o[4 * jj + 2 * h] * inv, o[4 * jj + 2 * h + 1] * inv);
      }
      if (wg == 0 && quad == 0) p.lse_accum[prow] = empty ? -INFINITY : m[h] + log2f(l_lse[h]);
    }
  }
}

}  // namespace mla
