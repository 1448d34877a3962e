// Split-KV MLA decode kernel for sm_90a: one CTA per (64-row query tile, KV head, scheduler part).
//
// Two warpgroups share the 64 x 512 output tile by columns and walk the part's 64-token pages in order:
//
//   TMA ──► page buffer (16-bit: 9 x 8 KiB SW128 chunks, 2 buffers; e4m3: 4 SW128 chunks + 4 KiB SW64 RoPE tail,
//           3 buffers), one transaction mbarrier per buffer; the Q tile comes in through cp.async per request
//   WG0: S = Q·Kᵀ (wgmma SS) ─► mask, online softmax ─► P (registers + sP) ─► O[:, 0:256]  += P·V  (wgmma RS)
//   WG1:                        (e4m3: V → Vᵀ tile)     wait P ──────────────► O[:, 256:512] += sP·V (wgmma SS)
//
// The warpgroups synchronise only through named barriers (see the main loop), so WG1's P·V of page i overlaps
// WG0's Q·Kᵀ of page i+1; WG1 refills a page buffer as soon as its last reader is done.
//
// V is the first 512 columns of the K page, read by wgmma as a transposed (MN-major) view of the same tile. For
// e4m3 inputs the FP8 wgmma cannot transpose, so WG1 writes the page's V transposed (Vᵀ[d][token], 512 rows of 64
// bytes, K-major SW64; docs/hopper-kernel.md §6) while WG0 runs Q·Kᵀ; P·V then runs on the FP8 tensor cores (m64n256k32) with P
// quantised to e4m3 (P in [0, 1], as upstream). The e4m3 A fragment does not match the accumulator's column pairs
// (docs/hopper-kernel.md §6), so P is packed straight from the accumulator and Vᵀ's token order is permuted the same way.
//
// e4m3 Q·Kᵀ runs as three 6-step chains into fresh accumulators, added in f32 (the FP8 tensor cores' accumulation
// is not f32-exact; see FP8_QK_CHAIN_STEPS).
//
// Logits are kept in the log2 domain (scale · log2 e folded in), masked by select (never by adding), so NaN in K
// rows past the request's end never leaks; V rows past the end are zeroed in shared memory before P·V (0 · NaN is
// NaN). Rows that see nothing give out = 0, lse = +inf. A request with one split writes out/lse directly; a split
// writes its normalised partial O and its log2-domain lse to the workspace for kernels/combine.cu.
#include "splitkv_common.cuh"

namespace mla {

constexpr int VT_HALF_BYTES = V_HALF_COLS * VT_ROW_BYTES;  // start of Vᵀ rows 256..511
constexpr int FP8_K_STEP_BYTES = 32;                // one k32 step of an e4m3 K-major operand
constexpr int FP8_PV_K_STEPS = PAGE_TOKENS / 32;    // 2
// Named barriers between the two warpgroups (all over 256 threads: one side arrives, the other syncs). Page i:
constexpr int BAR_P_READY = 1;   // WG0 → WG1: P(i) in sP, row scales in s_scale, V(i) tail zeroed
constexpr int BAR_SP_FREE = 2;   // WG1 → WG0: WG1 has read sP(i) and s_scale(i)
constexpr int BAR_L_DONE = 3;    // WG0 → WG1: WG0's P·V(i) is complete (page i / sV no longer read by WG0)
constexpr int BAR_V_READY = 4;   // WG1 → WG0 (e4m3): V(i) converted into sV
// Lazy rescaling: the softmax reference max follows the running max only when it falls behind by more than this
// (log2 units), so P <= 2^8 (exact in bf16/f16/e4m3 range) and O is rescaled on few pages instead of every page.
// Measured on the H200 for bf16: following the running max exactly (slack 0) cost 4-6% at h_q·s_q >= 128 and
// halved the largest output error at large logits (then equal to upstream's): with a stale reference, P of a row's
// dominant logit is above 1 and is rounded when packed to 16 bits, where exactly it would be 1.
constexpr float RESCALE_SLACK_LOG2 = 8.0f;
// A/B switch, off by default (not yet measured): with MLA_ROUNDED_SUM_NORM=1 the 16-bit kernels normalise O by the
// sum of P as packed to 16 bits (what the tensor cores multiply), so out is an exact convex combination of V rows
// and the rounding of a dominant P cancels; lse keeps the unrounded sum. Aimed at the accuracy cost of the slack
// above without its speed cost: ~64 more ALU instructions per thread and page in WG0's softmax.
#ifndef MLA_ROUNDED_SUM_NORM
#define MLA_ROUNDED_SUM_NORM 0
#endif
constexpr int SOFTMAX_ROW_ELEMS = 16;  // logits of one row per thread and page (64 tokens over a quad of lanes)
static_assert(SOFTMAX_ROW_ELEMS == 16, "the max tree below is written out for 16 logits");
constexpr int SOFTMAX_SUM_PARTS = 4;   // partial sums per row

template <int KIND>
__device__ __forceinline__ void issue_page_load(const CUtensorMap* tmap_k, const CUtensorMap* tmap_tail, uint32_t dst,
                                                uint32_t bar, int kv_head, int page) {
  using Tr = Traits<KIND>;
  mbar_arrive_expect_tx(bar, Smem<KIND>::TILE);
#pragma unroll
  for (int c = 0; c < Tr::CHUNKS; ++c) {
    tma_load_4d(dst + c * CHUNK_BYTES, tmap_k, c * Tr::COLS_PER_CHUNK, kv_head, 0, page, bar);
  }
  if constexpr (Tr::TAIL_BYTES > 0) {
    tma_load_4d(dst + Smem<KIND>::TAIL, tmap_tail, Tr::CHUNKS * Tr::COLS_PER_CHUNK, kv_head, 0, page, bar);
  }
}

// e4m3 Q·Kᵀ precision: the FP8 tensor cores add into their accumulator with reduced precision (measured on the H100), so
// one 576-long chain of 18 k32 steps loses ~1e-3 of a logit, and on large logits the lse misses 1e-3 + 1e-3·|lse|
// (H200: up to 1.7x that bound with q, k ~ N(0, 9)). The steps run instead as chains of FP8_QK_CHAIN_STEPS, each
// into a fresh accumulator, added in f32 registers. 6 steps (3 chains): the first two chains run back to back into
// two accumulators and only the third waits for their sum: one tensor-pipe bubble per page (H200: e4m3 4-5% slower
// than one chain, 1.5% at h_q·s_q = 256; lse error 0.40-0.55 of the bound over two draws, where one chain reached
// 1.6-1.7). Measured alternatives: 4 steps (0.28 of the bound, three bubbles, 10% slower), 8 steps (0.60, one
// bubble), a third accumulator that hides the bubble (44 bytes of spills: slower than the bubble).
#ifndef MLA_FP8_QK_CHAIN_STEPS
#define MLA_FP8_QK_CHAIN_STEPS 6
#endif
constexpr int FP8_QK_CHAIN_STEPS = MLA_FP8_QK_CHAIN_STEPS;
constexpr int FP8_QK_STEPS = 18;     // 576 columns / 32
constexpr int FP8_SW128_STEPS = 16;  // 4 SW128 chunks x 4 k32 steps; the last 2 are the SW64 tail

// One k32 step of the e4m3 S = Q·Kᵀ: steps 0-15 walk the 4 SW128 chunks (32 bytes per step), 16-17 the SW64 tail.
template <int KIND>
__device__ __forceinline__ void qk_step_e4m3(float (&acc)[32], uint32_t sq, uint32_t sk, int step, int accumulate) {
  if (step < FP8_SW128_STEPS) {
    const uint32_t off = (step / 4) * CHUNK_BYTES + (step % 4) * FP8_K_STEP_BYTES;
    wgmma_m64n64k32_ss_e4m3(acc, make_smem_desc(sq + off, KMAJOR_LBO, SW128_SBO),
                            make_smem_desc(sk + off, KMAJOR_LBO, SW128_SBO), accumulate);
  } else {
    const uint32_t off = Smem<KIND>::TAIL + (step - FP8_SW128_STEPS) * FP8_K_STEP_BYTES;
    wgmma_m64n64k32_ss_e4m3(acc, make_smem_desc_sw64(sq + off, KMAJOR_LBO, SW64_SBO),
                            make_smem_desc_sw64(sk + off, KMAJOR_LBO, SW64_SBO), accumulate);
  }
}

// Issues chain `c` (steps c·FP8_QK_CHAIN_STEPS ...) into a fresh accumulator as one wgmma group.
template <int KIND>
__device__ __forceinline__ void issue_qk_chain_e4m3(float (&acc)[32], uint32_t sq, uint32_t sk, int c) {
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < FP8_QK_CHAIN_STEPS; ++k) {
    const int step = c * FP8_QK_CHAIN_STEPS + k;
    if (step < FP8_QK_STEPS) qk_step_e4m3<KIND>(acc, sq, sk, step, k != 0);
  }
  wgmma_commit();
}

template <int N>
__device__ __forceinline__ void add_regs(float (&d)[N], const float (&a)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) d[i] += a[i];
}

// e4m3 S = Q·Kᵀ with the chains added in f32 (see FP8_QK_CHAIN_STEPS); returns with every wgmma complete. Chain 0
// goes to `s`, chains 1.. to `t`, the next one issued once `t` has been added.
template <int KIND>
__device__ __forceinline__ void gemm_qk_e4m3(float (&s)[32], uint32_t sq, uint32_t sk) {
  constexpr int CHAINS = (FP8_QK_STEPS + FP8_QK_CHAIN_STEPS - 1) / FP8_QK_CHAIN_STEPS;
  issue_qk_chain_e4m3<KIND>(s, sq, sk, 0);
  if constexpr (CHAINS == 1) {
    wgmma_wait<0>();
    pin_regs(s);
  } else {
    float t[32];
#pragma unroll
    for (int c = 1; c < CHAINS; ++c) {
      issue_qk_chain_e4m3<KIND>(t, sq, sk, c);
      wgmma_wait<0>();
      pin_regs(s);
      pin_regs(t);
      add_regs(s, t);
    }
  }
}

// Issues S[64x64] = Q · Kᵀ for one 16-bit page (WG0) as one wgmma group; the caller waits for it.
template <int KIND>
__device__ __forceinline__ void issue_qk(float (&s)[32], uint32_t sq, uint32_t sk) {
  wgmma_fence();
#pragma unroll
  for (int c = 0; c < Traits<KIND>::CHUNKS; ++c) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // four 16-column k-steps of 32 bytes per 128-byte row
      const uint32_t off = c * CHUNK_BYTES + k * 32;
      const uint64_t da = make_smem_desc(sq + off, KMAJOR_LBO, SW128_SBO);
      const uint64_t db = make_smem_desc(sk + off, KMAJOR_LBO, SW128_SBO);
      if constexpr (KIND == KIND_BF16) {
        wgmma_m64n64k16_ss_bf16(s, da, db, (c | k) != 0);
      } else {
        wgmma_m64n64k16_ss_f16(s, da, db, (c | k) != 0);
      }
    }
  }
  wgmma_commit();
}

// Issues O[64x256] += P (registers, A fragments) · V half (MN-major view); the caller waits. P is bf16 for bf16
// inputs, else f16.
template <int KIND>
__device__ __forceinline__ void issue_pv_rs(float (&o)[128], const uint32_t (&pa)[4][4], uint32_t sv_half) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint64_t db = make_smem_desc(sv_half + kk * V_K16_STEP_BYTES, V_MN_LBO, SW128_SBO);
    if constexpr (KIND == KIND_BF16) {
      wgmma_m64n256k16_rs_bf16(o, pa[kk], db, 1);
    } else {
      wgmma_m64n256k16_rs_f16(o, pa[kk], db, 1);
    }
  }
  wgmma_commit();
}

// O[64x256] += sP (shared, K-major) · V half (MN-major view).
template <int KIND>
__device__ __forceinline__ void gemm_pv_ss(float (&o)[128], uint32_t sp, uint32_t sv_half) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint64_t da = make_smem_desc(sp + kk * 32, KMAJOR_LBO, SW128_SBO);
    const uint64_t db = make_smem_desc(sv_half + kk * V_K16_STEP_BYTES, V_MN_LBO, SW128_SBO);
    if constexpr (KIND == KIND_BF16) {
      wgmma_m64n256k16_ss_bf16(o, da, db, 1);
    } else {
      wgmma_m64n256k16_ss_f16(o, da, db, 1);
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
  pin_regs(o);
}

// e4m3 only: P·V on the FP8 tensor cores. Pages of 64 tokens are two k32 steps; P's A fragment is packed from the
// accumulator (kk: k32 step, r: register, b: byte) as acc[16kk + 8(r>>1) + 2(r&1) + (b&1) + 4(b>>1)], so A position k
// of a k32 step holds token π(k) = 16(k>>4) + 2((k&15)>>2) + (k&1) + 8((k&3)>>1) of that step (wgmma fragment layout), and Vᵀ
// stores token π(k) at position k. In 16-token groups G: position 16G + 4c + b ↔ token 16G + 2c + (b&1) + 8(b>>1).

// O[64x256] += P (registers, e4m3 A fragments) · Vᵀ half (K-major SW64); the caller waits.
__device__ __forceinline__ void issue_pv_rs_e4m3(float (&o)[128], const uint32_t (&pa)[FP8_PV_K_STEPS][4],
                                                 uint32_t svt_half) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < FP8_PV_K_STEPS; ++kk) {
    wgmma_m64n256k32_rs_e4m3(o, pa[kk], make_smem_desc_sw64(svt_half + kk * FP8_K_STEP_BYTES, KMAJOR_LBO, SW64_SBO),
                             1);
  }
  wgmma_commit();
}

// O[64x256] += sP (e4m3, K-major SW64) · Vᵀ half (K-major SW64).
__device__ __forceinline__ void gemm_pv_ss_e4m3(float (&o)[128], uint32_t sp, uint32_t svt_half) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < FP8_PV_K_STEPS; ++kk) {
    wgmma_m64n256k32_ss_e4m3(o, make_smem_desc_sw64(sp + kk * FP8_K_STEP_BYTES, KMAJOR_LBO, SW64_SBO),
                             make_smem_desc_sw64(svt_half + kk * FP8_K_STEP_BYTES, KMAJOR_LBO, SW64_SBO), 1);
  }
  wgmma_commit();
  wgmma_wait<0>();
  pin_regs(o);
}

// e4m3 only (WG1): the page's first 512 columns → Vᵀ (512 rows of 64 token bytes, K-major SW64, tokens permuted as
// above); tokens >= valid are zero (P is 0 there, but 0 · NaN is NaN).
//
// A work unit is (token group G, position word c, 16-column vector v): the thread loads 16 bytes from each of the
// tokens 16G + 2c + {0, 1, 8, 9} (the four bytes of Vᵀ word 4G + c), transposes the 4 x 16 bytes with byte permutes
// and stores 16 words, one per Vᵀ row. Lanes: c = lane & 3, v parity = (lane >> 2) & 1, G = lane >> 3; warp step k
// takes v = 2(warp + 4k) + (v parity), i.e. SW128 chunk k and the same 16-byte vector of every row at every step,
// so all source and destination offsets are loop-invariant registers plus immediates (ncu on the first version: 600
// instructions per warp and page, a third of them address arithmetic, and the transpose on WG0's critical path).
// The loads are conflict-free (each 8-lane phase hits 8 distinct swizzled 16-byte slots), and so are the word
// stores: lanes of odd v store their rows in the order j ^ 1 (by swapping the last permute's selectors), so the 32
// lanes cover both row parities x 4 swizzled slots x 4 words.
__device__ __forceinline__ void transpose_v_e4m3(const uint8_t* __restrict__ sk, uint32_t svt, int valid, int tw) {
  constexpr int STEPS = (HEAD_DIM_V / 16) / 2 / (WG_THREADS / 32);  // 4: two 16-column vectors per warp step
  constexpr int VT_VEC_ROWS = 16;                                    // Vᵀ rows per 16-column vector
  // 4 x 4 byte transpose of words (x0, x1, x2, x3): output word i = bytes i of x0..x3 (x0 in byte 0).
  constexpr uint32_t SEL_LO_PAIRS = 0x5140, SEL_HI_PAIRS = 0x7362, SEL_LO_HALVES = 0x5410, SEL_HI_HALVES = 0x7632;
  const int warp = tw / 32, lane = tw % 32;
  const int c = lane & 3, vodd = (lane >> 2) & 1, g = lane >> 3;
  const int vin = 2 * warp + vodd;  // v % 8: the 16-byte vector within an SW128 row
  int src_off[4];
  bool live[4];
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const int tok = 16 * g + 2 * c + (t & 1) + 8 * (t >> 1);
    live[t] = tok < valid;
    src_off[t] = static_cast<int>(swz128(tok, vin));
  }
  // Odd-v lanes produce the row pair (2i, 2i+1) swapped: out[j] holds Vᵀ row 16v + (j ^ vodd).
  const uint32_t sel_even = vodd ? SEL_HI_HALVES : SEL_LO_HALVES;
  const uint32_t sel_odd = vodd ? SEL_LO_HALVES : SEL_HI_HALVES;
  // Vᵀ row 16v + (j ^ vodd), word 4G + c, SW64: (16v + (j ^ vodd))·64 + ((G ^ ((j >> 1) & 3)) << 4) + 4c, where
  // 16v·64 = 1024·vin + 8192k and 64(j ^ vodd) = 64j ± 64·vodd (+ for even j).
  uint32_t dst[2][4];
#pragma unroll
  for (int par = 0; par < 2; ++par) {
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      dst[par][m] = svt + VT_VEC_ROWS * VT_ROW_BYTES * vin + (par ? -VT_ROW_BYTES : VT_ROW_BYTES) * vodd +
                    ((g ^ m) << 4) + 4 * c;
    }
  }
  // Step k's four 16-byte loads are issued a step ahead, under step k-1's permutes and stores: on their own, the
  // first PRMT after each LDS.128 waited for it (short-scoreboard stalls, ~7% of v4b's samples).
  const auto load_step = [&](int k, uint4 (&x)[4]) {
    const uint8_t* src = sk + k * CHUNK_BYTES;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      x[t] = live[t] ? *reinterpret_cast<const uint4*>(src + src_off[t]) : make_uint4(0, 0, 0, 0);
    }
  };
  uint4 x[4];
  load_step(0, x);
#pragma unroll
  for (int k = 0; k < STEPS; ++k) {
    uint4 next[4];
    if (k + 1 < STEPS) load_step(k + 1, next);
    const uint32_t kofs = k * 2 * VT_VEC_ROWS * VT_ROW_BYTES * (WG_THREADS / 32);  // 8192k
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint32_t a0 = (&x[0].x)[w], a1 = (&x[1].x)[w], a2 = (&x[2].x)[w], a3 = (&x[3].x)[w];
      const uint32_t t0 = prmt(a0, a1, SEL_LO_PAIRS), t1 = prmt(a0, a1, SEL_HI_PAIRS);
      const uint32_t t2 = prmt(a2, a3, SEL_LO_PAIRS), t3 = prmt(a2, a3, SEL_HI_PAIRS);
      const uint32_t out[4] = {prmt(t0, t2, sel_even), prmt(t0, t2, sel_odd), prmt(t1, t3, sel_even),
                               prmt(t1, t3, sel_odd)};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int j = 4 * w + i;
        sts32(dst[j & 1][(j >> 1) & 3] + kofs + VT_ROW_BYTES * j, out[i]);
      }
    }
    if (k + 1 < STEPS) {
#pragma unroll
      for (int t = 0; t < 4; ++t) x[t] = next[t];
    }
  }
}

// A page in its shared-memory buffer: shared-window addresses of its barrier, its tile and where P·V reads V (the tile
// itself, or e4m3's Vᵀ tile), and a generic pointer to the tile for plain loads and stores.
struct PageSlot {
  int blk;    // page index in the request
  int valid;  // tokens of the page before the request's end
  uint32_t bar, sk, sv;
  uint8_t* gk;
};

template <int KIND>
__device__ __forceinline__ void splitkv_body(const CUtensorMap* tmap_k, const CUtensorMap* tmap_tail,
                                             const DecodeParams& p) {
  using Tr = Traits<KIND>;
  using Sm = Smem<KIND>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* gbase = smem_raw + (base - raw);
  {
    uint32_t dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < static_cast<uint32_t>(Sm::DYNAMIC_BYTES)) __trap();  // host/kernel plan mismatch
  }
  float* s_scale = reinterpret_cast<float*>(gbase + Sm::SCALE);
  float* s_row_m = reinterpret_cast<float*>(gbase + Sm::ROW_M);
  float* s_row_l = reinterpret_cast<float*>(gbase + Sm::ROW_L);
  const uint32_t bars = base + Sm::BARS;  // full barrier of page buffer b at bars + 8b

  const int tid = threadIdx.x;
  const int wg = tid / WG_THREADS;
  const int tw = tid % WG_THREADS;
  const int warp = tw / 32;
  const int lane = tid % 32;
  const int quad = lane % 4;
  const int row_a = 16 * warp + lane / 4;  // this thread's rows of the tile: row_a and row_a + 8

  const int m_block = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int32_t* md = p.metadata + blockIdx.z * METADATA_WORDS;
  grid_dependency_wait();  // the metadata, Q and the cache may come from the previous kernels on the stream
  const int begin_req = md[0], end_req = md[1];
  if (begin_req > end_req) return;  // an empty part

  if (tid == 0) {
    for (int b = 0; b < Sm::NB; ++b) mbar_init(bars + 8 * b, 1);
    fence_mbar_init();
    tma_prefetch_desc(tmap_k);
    if constexpr (Tr::TAIL_BYTES > 0) tma_prefetch_desc(tmap_tail);
  }
  __syncthreads();

  float c_log2 = p.scale_log2;  // logit scale in the log2 domain
  float v_scale = 1.0f;         // dequantisation of V, folded into the final normalisation
  if constexpr (Tr::FP8) {
    const float dk = *p.descale_k;
    c_log2 *= *p.descale_q * dk;
    v_scale = dk;
  }

  const int tile_row0 = m_block * BLOCK_M;
  const int rows_in_tile = min(BLOCK_M, p.q_seq_per_hk - tile_row0);
  const uint32_t sq = base + Sm::Q;
  const uint32_t sp = base + Sm::P;
  uint32_t phase = 0;  // bit b: parity of the next completion of K buffer b

  for (int req = begin_req; req <= end_req; ++req) {
    const RequestSlice r = request_slice(p, md, req, tile_row0, rows_in_tile);
    const int s_k = r.s_k, blk_begin = r.blk_begin, nblk = r.nblk;
    const int32_t* bt = r.bt;

    if (tid == 0) {
      for (int b = 0; b < min(nblk, Sm::NB); ++b) {
        issue_page_load<KIND>(tmap_k, tmap_tail, base + Sm::K0 + b * Sm::TILE, bars + 8 * b, kv_head, bt[blk_begin + b]);
      }
    }
    load_q_tile<Tr::ELEM_BYTES, Tr::CHUNKS, Sm::TAIL>(sq, p, req, kv_head, tile_row0);
    fence_proxy_async();
    __syncthreads();

    // Keys visible to each of this thread's two rows (bottom-right causal: token t sees j <= s_k - s_q + t).
    const int limit[2] = {row_limit(p, s_k, tile_row0 + row_a), row_limit(p, s_k, tile_row0 + row_a + 8)};

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.0f;
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.0f, 0.0f};
    float l_norm[2] = {0.0f, 0.0f};  // MLA_ROUNDED_SUM_NORM: the sum of the packed P, same reference as l_run

    // Page i of the slice in buffer `buf`, once its load has landed (both warpgroups wait for every page).
    const auto wait_page = [&](int i, int buf) {
      const int blk = blk_begin + i;
      const uint32_t bar = bars + 8 * buf;
      const uint32_t sk = base + Sm::K0 + buf * Sm::TILE;
      mbar_wait(bar, (phase >> buf) & 1);
      phase ^= 1u << buf;
      return PageSlot{blk, min(PAGE_TOKENS, s_k - blk * PAGE_TOKENS), bar, sk, Tr::FP8 ? base + Sm::V : sk,
                      gbase + Sm::K0 + buf * Sm::TILE};
    };

    // The warpgroups run decoupled, synchronised only by named barriers (no CTA-wide barrier per page):
    //   WG0: wait page i ─ Q·Kᵀ(i) ─ softmax(i) ─ SP_FREE(i−1) ─ sP(i) → P_READY ─ P·V_L(i) → L_DONE
    //   WG1: (e4m3: convert V(i) → V_READY) ─ P_READY ─ P·V_R(i) ─ L_DONE ─ refill page i+NB ─ SP_FREE
    // so WG1's P·V_R(i) and WG0's Q·Kᵀ(i+1) share the tensor cores instead of running back to back.
    if (wg == 0) {
      for (int i = 0, buf = 0; i < nblk; ++i, buf = buf + 1 == Sm::NB ? 0 : buf + 1) {
        const auto [blk, valid, bar_buf, sk_buf, sv, gk] = wait_page(i, buf);
        float s[32];
#pragma unroll
        for (int j = 0; j < 32; ++j) s[j] = 0.0f;
        if constexpr (Tr::FP8) {
          gemm_qk_e4m3<KIND>(s, sq, sk_buf);
        } else {
          issue_qk<KIND>(s, sq, sk_buf);
          wgmma_wait<0>();
          pin_regs(s);
        }

        float row_scale[2];
        // Accumulator element j: row row_a + 8·((j>>1)&1), column 8·(j>>2) + 2·quad + (j&1).
        // Interior pages (every token visible to both of the thread's rows, in every lane of the warp) skip the
        // mask, and with a positive logit scale (always, except e4m3 descales <= 0) the scale moves out of the max
        // (c·max s = max c·s exactly) and into the exponent as one FFMA: 2^(c·s − m).
        const int tok0 = blk * PAGE_TOKENS + 2 * quad;  // first token of this thread's column pairs
        const auto softmax = [&](auto interior_tag) {
          constexpr bool INTERIOR = decltype(interior_tag)::value;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float v[SOFTMAX_ROW_ELEMS];  // this thread's 16 logits of row h
#pragma unroll
            for (int jj = 0; jj < 8; ++jj) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int j = 4 * jj + 2 * h + e;
                if constexpr (!INTERIOR) {
                  const int tok = tok0 + 8 * jj + e;
                  s[j] = tok < limit[h] ? s[j] * c_log2 : -INFINITY;  // select: NaN past the end never leaks
                }
                v[2 * jj + e] = s[j];
              }
            }
            // Tree reduction: 4 dependent steps instead of 15.
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] = fmaxf(v[k], v[k + 8]);
#pragma unroll
            for (int k = 0; k < 4; ++k) v[k] = fmaxf(v[k], v[k + 4]);
            float mx = fmaxf(fmaxf(v[0], v[2]), fmaxf(v[1], v[3]));
            if constexpr (INTERIOR) mx *= c_log2;
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            // The reference max moves only when the page's max exceeds it by more than RESCALE_SLACK_LOG2 (the
            // first finite max always moves it: −inf + slack = −inf), so most pages leave O alone. P = 2^(s − m)
            // is then at most 2^RESCALE_SLACK_LOG2; O and l share the reference, so the result is unchanged.
            const bool raise = fmaxf(m_run[h], mx) > m_run[h] + RESCALE_SLACK_LOG2;
            const float m_ref = raise ? mx : m_run[h];
            const float m_use = m_ref == -INFINITY ? 0.0f : m_ref;  // a row that saw nothing yet stays at 0
            row_scale[h] = raise ? exp2_approx(m_run[h] - m_use) : 1.0f;
            m_run[h] = m_ref;
            float part[SOFTMAX_SUM_PARTS] = {};  // independent partial sums, not one 16-long dependent chain
#pragma unroll
            for (int jj = 0; jj < 8; ++jj) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int j = 4 * jj + 2 * h + e;
                s[j] = exp2_approx(INTERIOR ? fmaf(s[j], c_log2, -m_use) : s[j] - m_use);
                part[(2 * jj + e) % SOFTMAX_SUM_PARTS] += s[j];
              }
            }
            float sum = 0.0f;
#pragma unroll
            for (int k = 0; k < SOFTMAX_SUM_PARTS; ++k) sum += part[k];
            l_run[h] = l_run[h] * row_scale[h] + sum;
          }
        };
        if (c_log2 > 0.0f && __all_sync(0xffffffff, (blk + 1) * PAGE_TOKENS <= min(limit[0], limit[1]))) {
          softmax(std::true_type{});
        } else {
          softmax(std::false_type{});
        }
        if constexpr (!Tr::FP8) {
          if (valid < PAGE_TOKENS) zero_v_tail(gk, valid, tw);  // WG1 reads V(i) only after P_READY
        }
        if (i > 0) named_barrier_sync(BAR_SP_FREE, NUM_THREADS);  // WG1 is done with sP(i−1), s_scale(i−1)
        // 16-bit: the accumulator of k-step kk is exactly the A fragment of P for tokens 16kk..16kk+15. e4m3: the A
        // fragment of k32 step kk is packed from the accumulator with the token permutation of transpose_v_e4m3.
        uint32_t pa[4][4];
        uint32_t pa8[FP8_PV_K_STEPS][4];
        uint8_t* gp = gbase + Sm::P;
        if constexpr (Tr::FP8) {
#pragma unroll
          for (int kk = 0; kk < FP8_PV_K_STEPS; ++kk) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              const int j = 16 * kk + 8 * (r >> 1) + 2 * (r & 1);
              pa8[kk][r] = pack_e4m3x4(s[j], s[j + 1], s[j + 4], s[j + 5]);
              // A position 32kk + 16(r>>1) + 4·quad of row row_a + 8(r&1): 16-byte vector 2kk + (r>>1) of the row.
              *reinterpret_cast<uint32_t*>(gp + swz64(row_a + 8 * (r & 1), 2 * kk + (r >> 1)) + 4 * quad) =
                  pa8[kk][r];
            }
          }
        } else {
          float rounded[2] = {0.0f, 0.0f};
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              pa[kk][q] = pack_p<KIND>(s[8 * kk + 2 * q], s[8 * kk + 2 * q + 1]);
              const int row = row_a + 8 * (q & 1);
              const int col = 16 * kk + 8 * (q >> 1) + 2 * quad;
              *reinterpret_cast<uint32_t*>(gp + swz128(row, col / 8) + (col % 8) * 2) = pa[kk][q];
              if constexpr (MLA_ROUNDED_SUM_NORM) rounded[q & 1] += packed_sum<KIND>(pa[kk][q]);
            }
          }
          if constexpr (MLA_ROUNDED_SUM_NORM) {
#pragma unroll
            for (int h = 0; h < 2; ++h) l_norm[h] = l_norm[h] * row_scale[h] + rounded[h];
          }
        }
        if (quad == 0) {
          s_scale[row_a] = row_scale[0];
          s_scale[row_a + 8] = row_scale[1];
        }
        fence_proxy_async();
        named_barrier_arrive(BAR_P_READY, NUM_THREADS);
        if constexpr (Tr::FP8) named_barrier_sync(BAR_V_READY, NUM_THREADS);
        if (__any_sync(0xffffffff, row_scale[0] != 1.0f || row_scale[1] != 1.0f)) {  // warp-uniform skip of × 1
#pragma unroll
          for (int j = 0; j < 128; ++j) o[j] *= row_scale[(j >> 1) & 1];
        }
        if constexpr (Tr::FP8) {
          issue_pv_rs_e4m3(o, pa8, sv);
        } else {
          issue_pv_rs<KIND>(o, pa, sv);
        }
        // Waiting here (not during the next Q·Kᵀ) keeps the accumulators out of flight across the loop edge, which
        // ptxas would otherwise answer by serialising every wgmma (C7514); WG1's P·V_R keeps the tensor cores busy.
        wgmma_wait<0>();
        pin_regs(o);
        named_barrier_arrive(BAR_L_DONE, NUM_THREADS);
      }
    } else {
      for (int i = 0, buf = 0; i < nblk; ++i, buf = buf + 1 == Sm::NB ? 0 : buf + 1) {
        const auto [blk, valid, bar_buf, sk_buf, sv, gk] = wait_page(i, buf);
        if constexpr (Tr::FP8) {
          transpose_v_e4m3(gk, base + Sm::V, valid, tw);  // WG0's P·V_L(i−1) finished: L_DONE of the last page
          fence_proxy_async();
          named_barrier_arrive(BAR_V_READY, NUM_THREADS);
        }
        named_barrier_sync(BAR_P_READY, NUM_THREADS);
        if constexpr (Tr::FP8) {
          // e4m3: Q·Kᵀ(i) is done (before P_READY) and V(i) lives in sVᵀ, so the page buffer is free already.
          if (tid == WG_THREADS && i + Sm::NB < nblk) {
            issue_page_load<KIND>(tmap_k, tmap_tail, sk_buf, bar_buf, kv_head, bt[blk + Sm::NB]);
          }
        }
        const float sc0 = s_scale[row_a], sc1 = s_scale[row_a + 8];
        if (__any_sync(0xffffffff, sc0 != 1.0f || sc1 != 1.0f)) {
#pragma unroll
          for (int j = 0; j < 128; ++j) o[j] *= ((j >> 1) & 1) ? sc1 : sc0;
        }
        if constexpr (Tr::FP8) {
          gemm_pv_ss_e4m3(o, sp, sv + VT_HALF_BYTES);
        } else {
          gemm_pv_ss<KIND>(o, sp, sv + V_HALF_BYTES);
        }
        named_barrier_sync(BAR_L_DONE, NUM_THREADS);  // both halves of P·V(i) are complete
        if constexpr (!Tr::FP8) {
          if (tid == WG_THREADS && i + Sm::NB < nblk) {
            issue_page_load<KIND>(tmap_k, tmap_tail, sk_buf, bar_buf, kv_head, bt[blk + Sm::NB]);
          }
        }
        // The last page's sP is protected by the end-of-request __syncthreads instead (WG0 never waits for it).
        if (i + 1 < nblk) named_barrier_arrive(BAR_SP_FREE, NUM_THREADS);
      }
    }

    // The combine may be scheduled once every CTA is this far (it waits for the whole grid before reading).
    if (req == end_req) allow_dependent_launch();

    // Epilogue: WG0 owns the softmax statistics; both warpgroups write their 256 columns.
    // ROW_L holds the normaliser of O (the packed-P sum under MLA_ROUNDED_SUM_NORM); WG0 keeps the unrounded sum
    // for lse.
    constexpr bool ROUNDED_NORM = MLA_ROUNDED_SUM_NORM && !Tr::FP8;
    float l_lse[2] = {0.0f, 0.0f};
    if (wg == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float l = l_run[h];
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        l_lse[h] = l;
        if constexpr (ROUNDED_NORM) {
          l = l_norm[h];
          l += __shfl_xor_sync(0xffffffff, l, 1);
          l += __shfl_xor_sync(0xffffffff, l, 2);
        }
        if (quad == 0) {
          s_row_m[row_a + 8 * h] = m_run[h];
          s_row_l[row_a + 8 * h] = l;
        }
      }
    }
    __syncthreads();
    const float m[2] = {s_row_m[row_a], s_row_m[row_a + 8]};
    const float l[2] = {s_row_l[row_a], s_row_l[row_a + 8]};
    if constexpr (ROUNDED_NORM) {
      store_rows<Tr::OUT_F16>(o, p, r, req, kv_head, tile_row0, row_a, quad, wg, m, l, l_lse, v_scale);
    } else {
      store_rows<Tr::OUT_F16>(o, p, r, req, kv_head, tile_row0, row_a, quad, wg, m, l, l, v_scale);
    }
    __syncthreads();  // s_row_m / s_row_l and sQ are reused by the next request
  }
}

}  // namespace mla

#define MLA_SPLITKV_ENTRY(name, kind)                                                                          \
  extern "C" __global__ void __launch_bounds__(mla::NUM_THREADS, 1)                                             \
      name(const __grid_constant__ CUtensorMap tmap_k, const __grid_constant__ CUtensorMap tmap_tail,           \
           const __grid_constant__ mla::DecodeParams p) {                                                       \
    mla::splitkv_body<kind>(&tmap_k, &tmap_tail, p);                                                            \
  }

// tmap_tail: e4m3 only (the 64 RoPE columns, SW64 boxes); the 16-bit kernels ignore it.
MLA_SPLITKV_ENTRY(mla_splitkv_bf16, mla::KIND_BF16)
MLA_SPLITKV_ENTRY(mla_splitkv_f16, mla::KIND_F16)
MLA_SPLITKV_ENTRY(mla_splitkv_e4m3, mla::KIND_E4M3)
