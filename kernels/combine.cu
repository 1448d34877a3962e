// Split-KV combine: merges the partials of every request that the scheduler cut into more than one split.
//
// One warp per (request, KV head, folded query row); a request with a single split was written directly by the
// split kernel and is skipped. Partial LSEs are in the log2 domain (lse_s = m_s + log2 l_s, −inf for a split that
// saw nothing), so the merge uses exp2/log2 and converts the final lse to natural log:
//
//   M = max_s lse_s            G = M + log2 Σ_s 2^(lse_s − M)         out = Σ_s 2^(lse_s − G) · O_s
//   lse = G · ln 2             (M = −inf: the row saw nothing → out = 0, lse = +inf)
#include "mla_params.h"
#include "mla_ptx.cuh"

namespace mla {

constexpr int COMBINE_WARPS = 8;                       // rows per CTA
constexpr int COLS_PER_LANE_STEP = 4;                  // one float4 per lane per step
constexpr int COMBINE_STEPS = HEAD_DIM_V / (32 * COLS_PER_LANE_STEP);  // 4 float4 per lane
constexpr float LN2_F = 0.69314718055994530942f;
// Splits whose rows a warp loads before adding them: one for batches whose requests have a few splits (more warps
// fit per SM), four where requests have many (small batches: one split at a time ran at ~60% of the DRAM peak).
constexpr int SPLITS_IN_FLIGHT_FEW = 1;
constexpr int SPLITS_IN_FLIGHT_MANY = 4;

template <bool OUT_F16, int SPLITS_IN_FLIGHT>
__device__ __forceinline__ void combine_body(const CombineParams& p) {
  grid_dependency_wait();  // the partials come from the split kernel, num_splits from the scheduler
  const int req = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_id = blockIdx.y * COMBINE_WARPS + warp;  // kv_head * q_seq_per_hk + folded row
  if (row_id >= p.h_kv * p.q_seq_per_hk) return;
  const int first = p.num_splits[req];
  const int n = p.num_splits[req + 1] - first;
  if (n <= 1) return;
  const int kv_head = row_id / p.q_seq_per_hk;
  const int rg = row_id % p.q_seq_per_hk;
  const int64_t rows_per_split = static_cast<int64_t>(p.h_kv) * p.q_seq_per_hk;
  const float* lse_row = p.lse_accum + static_cast<int64_t>(first) * rows_per_split + row_id;

  float mx = -INFINITY;
  for (int s = lane; s < n; s += 32) mx = fmaxf(mx, lse_row[s * rows_per_split]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
  float sum = 0.0f;
  if (mx != -INFINITY) {
    for (int s = lane; s < n; s += 32) sum += exp2f(lse_row[s * rows_per_split] - mx);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
  }
  const bool empty = !(sum > 0.0f);
  const float g = empty ? INFINITY : mx + log2f(sum);

  float4 acc[COMBINE_STEPS];
#pragma unroll
  for (int i = 0; i < COMBINE_STEPS; ++i) acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (!empty) {
    // SPLITS_IN_FLIGHT splits' rows are loaded before any is added; the sum still goes split by split, in order, so
    // both variants give the same bits.
    for (int s0 = 0; s0 < n; s0 += SPLITS_IN_FLIGHT) {
      float w[SPLITS_IN_FLIGHT];
      float4 v[SPLITS_IN_FLIGHT][COMBINE_STEPS];
#pragma unroll
      for (int u = 0; u < SPLITS_IN_FLIGHT; ++u) {
        const int s = s0 + u;
        const bool live = s < n;
        w[u] = live ? exp2f(lse_row[s * rows_per_split] - g) : 0.0f;
        const float* o_row = p.o_accum + ((first + (live ? s : 0)) * rows_per_split + row_id) * HEAD_DIM_V;
#pragma unroll
        for (int i = 0; i < COMBINE_STEPS; ++i) {
          v[u][i] = live ? *reinterpret_cast<const float4*>(o_row + (i * 32 + lane) * COLS_PER_LANE_STEP)
                         : make_float4(0.f, 0.f, 0.f, 0.f);
        }
      }
#pragma unroll
      for (int u = 0; u < SPLITS_IN_FLIGHT; ++u) {
        if (s0 + u >= n) break;
#pragma unroll
        for (int i = 0; i < COMBINE_STEPS; ++i) {
          acc[i].x += w[u] * v[u][i].x;
          acc[i].y += w[u] * v[u][i].y;
          acc[i].z += w[u] * v[u][i].z;
          acc[i].w += w[u] * v[u][i].w;
        }
      }
    }
  }

  const int t = rg / p.heads_per_kv;
  const int head = kv_head * p.heads_per_kv + rg % p.heads_per_kv;
  using Out = typename std::conditional<OUT_F16, __half, __nv_bfloat16>::type;
  Out* orow = static_cast<Out*>(p.out) + req * p.o_stride_b + t * p.o_stride_t + head * p.o_stride_h;
#pragma unroll
  for (int i = 0; i < COMBINE_STEPS; ++i) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(orow + (i * 32 + lane) * COLS_PER_LANE_STEP);
    dst[0] = OUT_F16 ? pack_f16x2(acc[i].x, acc[i].y) : pack_bf16x2(acc[i].x, acc[i].y);
    dst[1] = OUT_F16 ? pack_f16x2(acc[i].z, acc[i].w) : pack_bf16x2(acc[i].z, acc[i].w);
  }
  if (lane == 0) p.lse[req * p.lse_stride_b + head * p.lse_stride_h + t * p.lse_stride_t] = g * LN2_F;
}

}  // namespace mla

#define MLA_COMBINE_ENTRY(name, out_f16, in_flight)                                              \
  extern "C" __global__ void __launch_bounds__(mla::COMBINE_WARPS * 32)                            \
      name(const __grid_constant__ mla::CombineParams p) {                                        \
    mla::combine_body<out_f16, in_flight>(p);                                                     \
  }

MLA_COMBINE_ENTRY(mla_combine_bf16, false, mla::SPLITS_IN_FLIGHT_FEW)
MLA_COMBINE_ENTRY(mla_combine_f16, true, mla::SPLITS_IN_FLIGHT_FEW)
MLA_COMBINE_ENTRY(mla_combine_bf16_many, false, mla::SPLITS_IN_FLIGHT_MANY)
MLA_COMBINE_ENTRY(mla_combine_f16_many, true, mla::SPLITS_IN_FLIGHT_MANY)
