// Shared-memory plan of the split kernel (kernels/splitkv_mla.cu), per element kind: plain C++17, so that the host
// side can check its mirror (crates/mla-hopper/src/lib.rs, SMEM_16BIT / SMEM_E4M3) against the compiler's numbers
// (the layout test in crates/mla-hopper/src/params.rs). The kernel traps when launched with less than
// Smem<KIND>::DYNAMIC_BYTES of dynamic shared memory.
#pragma once

#include "mla_params.h"

namespace mla {

enum Kind : int { KIND_BF16 = 0, KIND_F16 = 1, KIND_E4M3 = 2 };

constexpr int CHUNK_BYTES = 8192;                    // 64 rows x 128 bytes, one SW128 atom column
constexpr int VT_ROW_BYTES = PAGE_TOKENS;            // e4m3 Vᵀ: one row per V column, one byte per token
constexpr int VT_BYTES = HEAD_DIM_V * VT_ROW_BYTES;  // 32 KiB
constexpr int SMEM_OPT_IN_LIMIT = 232448;            // sm_90's opt-in per-block limit (227 KiB)

template <int KIND>
struct Traits;
template <>
struct Traits<KIND_BF16> {
  static constexpr int ELEM_BYTES = 2;
  static constexpr int CHUNKS = 9;          // 576 columns / 64, all SW128
  static constexpr int COLS_PER_CHUNK = 64;
  static constexpr int TAIL_BYTES = 0;      // no SW64 tail
  static constexpr int NUM_BUFS = 2;        // 3 pages would not fit next to Q
  static constexpr bool FP8 = false;
  static constexpr bool OUT_F16 = false;
};
template <>
struct Traits<KIND_F16> {
  static constexpr int ELEM_BYTES = 2;
  static constexpr int CHUNKS = 9;
  static constexpr int COLS_PER_CHUNK = 64;
  static constexpr int TAIL_BYTES = 0;
  static constexpr int NUM_BUFS = 2;
  static constexpr bool FP8 = false;
  static constexpr bool OUT_F16 = true;
};
template <>
struct Traits<KIND_E4M3> {
  static constexpr int ELEM_BYTES = 1;
  static constexpr int CHUNKS = 4;          // 576 columns = 4 SW128 chunks of 128 + a 64-column SW64 tail
  static constexpr int COLS_PER_CHUNK = 128;
  static constexpr int TAIL_BYTES = 64 * 64;  // 64 rows x 64 bytes (the RoPE columns), SW64, own tensor map
  static constexpr int NUM_BUFS = 3;        // 36 KiB pages: three keep two loads in flight (four measured 1-3% slower)
  static constexpr bool FP8 = true;
  static constexpr bool OUT_F16 = false;
};

// Shared-memory plan (offsets from a 1024-aligned base).
template <int KIND>
struct Smem {
  static constexpr int TAIL = Traits<KIND>::CHUNKS * CHUNK_BYTES;        // offset of the SW64 tail in a tile
  static constexpr int TILE = TAIL + Traits<KIND>::TAIL_BYTES;           // one Q tile or one K page
  static constexpr int NB = Traits<KIND>::NUM_BUFS;
  static constexpr int Q = 0;
  static constexpr int K0 = TILE;                                        // page buffer b at K0 + b·TILE
  static constexpr int V = (1 + NB) * TILE;  // e4m3 only: the page's Vᵀ (K-major SW64)
  static constexpr int V_BYTES = Traits<KIND>::FP8 ? VT_BYTES : 0;
  static constexpr int P = V + V_BYTES;  // 64 x 64: 16-bit K-major SW128, or e4m3 K-major SW64 (first 4 KiB)
  static constexpr int SCALE = P + CHUNK_BYTES;        // 64 f32: per-row rescale of O for this page
  static constexpr int ROW_M = SCALE + BLOCK_M * 4;    // 64 f32: final running max (log2 domain)
  static constexpr int ROW_L = ROW_M + BLOCK_M * 4;    // 64 f32: final row sum
  static constexpr int BARS = ROW_L + BLOCK_M * 4;     // one mbarrier per page buffer
  static constexpr int END = BARS + 8 * NB;
  static constexpr int DYNAMIC_BYTES = END + 1024;     // + slack to align the base to 1024
};
static_assert(Smem<KIND_BF16>::DYNAMIC_BYTES <= SMEM_OPT_IN_LIMIT, "16-bit plan exceeds the 227 KiB opt-in limit");
static_assert(Smem<KIND_E4M3>::DYNAMIC_BYTES <= SMEM_OPT_IN_LIMIT, "e4m3 plan exceeds the 227 KiB opt-in limit");
static_assert(Smem<KIND_E4M3>::TILE % 1024 == 0 && Smem<KIND_E4M3>::TAIL % 512 == 0, "swizzle atoms need alignment");
static_assert(Smem<KIND_E4M3>::V % 1024 == 0 && Smem<KIND_E4M3>::P % 1024 == 0, "Vᵀ and sP are swizzled tiles");

}  // namespace mla
