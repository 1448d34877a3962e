// Split-KV MLA decode for bf16/f16 on sm_90a: one CTA per (64-row query tile, KV head, scheduler part), two
// warpgroups, two pages in flight ("seesaw", notes §3.2).
//
// Pages are taken in pairs (a, b) = (2j, 2j+1): page a lives in buffer K0 and its softmax belongs to WG0, page b in
// K1 and belongs to WG1. Each warpgroup keeps half of O (WG0 columns 0..255 = V_L, WG1 256..511 = V_R) and needs
// both pages' P, so the warpgroups trade P through shared memory, and while one does softmax arithmetic the other
// keeps the tensor cores busy:
//
//   WG0: softmax(a) → sP0 ─A─► O_L += P_a·V0_L ─────────── B ─► O_L += sP1·V1_L ─► Q·K(a+2)
//   WG1:                   A ─► O_R += sP0·V0_R, softmax(b) → sP1 ─B─► O_R += P_b·V1_R ─► Q·K(b+2)
//
// (─A─► / ─B─►: named barriers, arrive on one side and sync on the other.) The running row max m lives in shared
// memory and is raised in order: by WG0 for page a (s0 = 2^(m_old − m_a)), then by WG1 for page b
// (s1 = 2^(m_a − m_b)). Each warpgroup applies O = O·s0 + P_a·V_a, then O = O·s1 + P_b·V_b to its half, so WG1
// multiplies P_a·V0_R while it computes page b's softmax, and V0_R is free early. Row sums follow the same
// recurrence per warpgroup and are added in the epilogue. This is the online-softmax recurrence, unchanged.
//
// Each page buffer has one transaction mbarrier per 64-column chunk, so a chunk is refilled as soon as its last
// reader is done and Q·Kᵀ waits chunk by chunk:
//
//   chunks  readers                               refilled by (for the next pair)
//   0..3    Q·K owner, V_L (WG0)                  WG0, after P_a·V0_L (K0) or P_b·V1_L (K1)
//   4..7    Q·K owner, V_R (WG1)                  WG1, after P_a·V0_R (K0) or P_b·V1_R (K1)
//   8       K0: Q·K(a);  K1: Q·K(b), then sP1     K0: with 4..7;  K1: with 0..3
//
// Shared memory is full (Q + two pages + sP0 = 224 KiB), so sP1 lives in K1's RoPE chunk, which is dead once
// Q·K(b) is done; that chunk is therefore refilled by sP1's last reader, WG0.
//
// Logits are kept in the log2 domain (scale · log2 e folded in) and masked by select, never by adding, so NaN in K
// rows past the request's end never leaks; V rows past the end are zeroed before P·V reads them.
#include "splitkv_common.cuh"

namespace mla {
namespace seesaw {

constexpr int CHUNKS = HEAD_DIM_K / 64;  // 9 SW128 chunks per 16-bit tile
constexpr int ROPE_CHUNK = 8;            // columns 512..575
constexpr int V_CHUNKS_END = 8;          // chunks 0..7 hold V
constexpr int V_L_CHUNKS = 4;            // chunks 0..3: V columns 0..255
constexpr int TILE = CHUNKS * CHUNK_BYTES;
constexpr int K_STEPS = 4;               // k16 steps per 64-column chunk

// Named barriers (ids 1..8). Cross-warpgroup ones count all 256 threads (one side arrives, the other syncs); a
// warpgroup's two refill points use two ids, so a fast warp can never arrive twice before its warp 0 has synced.
constexpr int BAR_A = 1;              // WG0 → WG1: page a's max (sM), rescale (sScale0) and P (sP0); V0 tail zeroed
constexpr int BAR_B = 2;              // WG1 → WG0: page b's max, rescale (sScale1) and P (sP1); V1 tail zeroed
constexpr int BAR_WG0_TAIL = 3;       // WG0 only: its V0 tail zeroing is complete
constexpr int BAR_WG1_TAIL = 4;       // WG1 only: its V1 tail zeroing is complete
constexpr int BAR_WG0_RELEASE_A = 5;  // WG0 only: every warp is done reading V0_L (warp 0 then refills it)
constexpr int BAR_WG0_RELEASE_B = 6;  // WG0 only: every warp is done reading V1_L and sP1
constexpr int BAR_WG1_RELEASE_A = 7;  // WG1 only: every warp is done reading V0_R
constexpr int BAR_WG1_RELEASE_B = 8;  // WG1 only: every warp is done reading V1_R

// Shared-memory plan (offsets from a 1024-aligned base).
struct Smem {
  static constexpr int Q = 0;
  static constexpr int K0 = TILE;
  static constexpr int K1 = 2 * TILE;
  static constexpr int P0 = 3 * TILE;                        // 64 x 64 K-major SW128
  static constexpr int P1 = K1 + ROPE_CHUNK * CHUNK_BYTES;   // aliases K1's RoPE chunk once Q·K(b) is done
  static constexpr int M = P0 + CHUNK_BYTES;                 // 64 f32: running row max (log2 domain)
  static constexpr int SCALE0 = M + BLOCK_M * 4;             // 64 f32: s0 of the current pair
  static constexpr int SCALE1 = SCALE0 + BLOCK_M * 4;        // 64 f32: s1 of the current pair
  static constexpr int L0 = SCALE1 + BLOCK_M * 4;            // 64 f32: WG0's final row sums
  static constexpr int L1 = L0 + BLOCK_M * 4;                // 64 f32: WG1's final row sums
  static constexpr int BARS = L1 + BLOCK_M * 4;              // mbarrier of chunk c of buffer k at BARS + 8(9k + c)
  static constexpr int END = BARS + 8 * 2 * CHUNKS;
  static constexpr int DYNAMIC_BYTES = END + 1024;           // + slack to align the base to 1024
};
static_assert(Smem::DYNAMIC_BYTES <= 232448, "seesaw plan exceeds the 227 KiB opt-in limit");
static_assert(Smem::P0 % 1024 == 0 && Smem::P1 % 1024 == 0, "sP0 and sP1 are swizzled tiles");

// One thread: TMA chunks [C0, C1) of `page` into a buffer, each on its own barrier.
template <int C0, int C1>
__device__ __forceinline__ void load_chunks(const CUtensorMap* tmap, uint32_t tile, uint32_t bars, int kv_head,
                                            int page) {
#pragma unroll
  for (int c = C0; c < C1; ++c) {
    mbar_arrive_expect_tx(bars + 8 * c, CHUNK_BYTES);
    tma_load_4d(tile + c * CHUNK_BYTES, tmap, c * 64, kv_head, 0, page, bars + 8 * c);
  }
}

template <int C0, int C1>
__device__ __forceinline__ void wait_chunks(uint32_t bars, uint32_t parity) {
#pragma unroll
  for (int c = C0; c < C1; ++c) mbar_wait(bars + 8 * c, parity);
}

// Issues S += Q·Kᵀ over chunks [C0, C1) (FIRST: the first chunk overwrites S), waiting for each chunk's barrier
// just before its four k-steps. The caller commits and waits.
template <int KIND, int C0, int C1, bool FIRST>
__device__ __forceinline__ void issue_qk_chunks(float (&s)[32], uint32_t sq, uint32_t sk, uint32_t bars,
                                                uint32_t parity) {
#pragma unroll
  for (int c = C0; c < C1; ++c) {
    mbar_wait(bars + 8 * c, parity);
    wgmma_fence();  // after the wait's branch: ptxas would insert its own and serialise (C7520)
#pragma unroll
    for (int k = 0; k < K_STEPS; ++k) {
      const int acc = (FIRST && c == C0 && k == 0) ? 0 : 1;
      const uint64_t da = make_smem_desc(sq + c * CHUNK_BYTES + k * 32, KMAJOR_LBO, SW128_SBO);
      const uint64_t db = make_smem_desc(sk + c * CHUNK_BYTES + k * 32, KMAJOR_LBO, SW128_SBO);
      if constexpr (KIND == KIND_BF16) {
        wgmma_m64n64k16_ss_bf16(s, da, db, acc);
      } else {
        wgmma_m64n64k16_ss_f16(s, da, db, acc);
      }
    }
  }
}

// Page b's buffer is read by WG1's Q·K in the order 4..7 (WG1 refills them), 0..3, 8 (WG0 refills them).
__device__ __forceinline__ void load_k1_page(const CUtensorMap* tmap, uint32_t tile, uint32_t bars, int kv_head,
                                             int page) {
  load_chunks<V_L_CHUNKS, V_CHUNKS_END>(tmap, tile, bars, kv_head, page);
  load_chunks<0, V_L_CHUNKS>(tmap, tile, bars, kv_head, page);
  load_chunks<ROPE_CHUNK, CHUNKS>(tmap, tile, bars, kv_head, page);
}

template <int KIND>
__device__ __forceinline__ void issue_qk_k1(float (&s)[32], uint32_t sq, uint32_t k1, uint32_t bars, uint32_t parity) {
  issue_qk_chunks<KIND, V_L_CHUNKS, V_CHUNKS_END, true>(s, sq, k1, bars, parity);
  issue_qk_chunks<KIND, 0, V_L_CHUNKS, false>(s, sq, k1, bars, parity);
  issue_qk_chunks<KIND, ROPE_CHUNK, CHUNKS, false>(s, sq, k1, bars, parity);
}

// O[64x256] += P (registers, A fragments) · V half (MN-major view of a page); the caller commits and waits.
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
}

// O[64x256] += sP (shared, K-major SW128) · V half; the caller commits and waits.
template <int KIND>
__device__ __forceinline__ void issue_pv_ss(float (&o)[128], uint32_t sp, uint32_t sv_half) {
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
}

// Register q of k-step k of a P fragment → its place in a 64 x 64 K-major SW128 tile (row row_a + 8(q&1), columns
// 16k + 8(q>>1) + 2·quad and +1).
__device__ __forceinline__ void store_p_fragment(uint8_t* tile, uint32_t v, int k, int q, int row_a, int quad) {
  const int row = row_a + 8 * (q & 1);
  const int col = 16 * k + 8 * (q >> 1) + 2 * quad;
  *reinterpret_cast<uint32_t*>(tile + swz128(row, col / 8) + (col % 8) * 2) = v;
}

// P (the accumulator of a 64 x 64 S tile) → A fragments (accumulator element 8k + 2q + e is A element (k, q, e)),
// and, with STORE, also into a K-major SW128 tile for the other warpgroup.
template <int KIND, bool STORE>
__device__ __forceinline__ void pack_p_tile(uint32_t (&pa)[4][4], const float (&s)[32], uint8_t* tile, int row_a,
                                            int quad) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      pa[k][q] = pack_p<KIND>(s[8 * k + 2 * q], s[8 * k + 2 * q + 1]);
      if constexpr (STORE) store_p_fragment(tile, pa[k][q], k, q, row_a, quad);
    }
  }
}

// Online softmax of one page for this thread's two rows: masks (when `mask`) and scales the logits into the log2
// domain, raises the row max from m_old to m_new, turns S into P = 2^(s − m_new) in place and returns the rescale
// 2^(m_old − m_new) of everything accumulated so far. `sum` gets the rows' partial sums (this thread's 16 columns).
// Accumulator element j: row row_a + 8·((j>>1)&1), column 8·(j>>2) + 2·quad + (j&1).
__device__ __forceinline__ void page_softmax(float (&s)[32], float c_log2, bool mask, int tok0, const int (&limit)[2],
                                             const float (&m_old)[2], float (&m_new)[2], float (&rescale)[2],
                                             float (&sum)[2], int quad) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = -INFINITY;
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = 4 * jj + 2 * h + e;
        const int tok = tok0 + 8 * jj + 2 * quad + e;
        s[j] = (!mask || tok < limit[h]) ? s[j] * c_log2 : -INFINITY;  // select: NaN past the end never leaks
        mx = fmaxf(mx, s[j]);
      }
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
    m_new[h] = fmaxf(m_old[h], mx);
    const float m_use = m_new[h] == -INFINITY ? 0.0f : m_new[h];  // a row that saw nothing yet stays at 0
    rescale[h] = exp2_approx(m_old[h] - m_use);
    float acc = 0.0f;
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = 4 * jj + 2 * h + e;
        s[j] = exp2_approx(s[j] - m_use);
        acc += s[j];
      }
    }
    sum[h] = acc;
  }
}

// Gives S a new value where no Q·Kᵀ wrote one (the last pair), so the previous page's logits are dead after their
// softmax on every path: otherwise ptxas keeps them alive across P·V and spills.
__device__ __forceinline__ void clear(float (&s)[32]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] = 0.0f;
}

__device__ __forceinline__ void scale_rows(float (&o)[128], const float (&sc)[2]) {
#pragma unroll
  for (int j = 0; j < 128; ++j) o[j] *= sc[(j >> 1) & 1];
}

// The warp that refills a buffer first waits for the other three warps of its warpgroup to finish reading it (each
// warp's wgmma.wait covers only its own share of the operands); the other warps only signal.
__device__ __forceinline__ void release_to_warp0(int bar, int warp) {
  if (warp == 0) {
    named_barrier_sync(bar, WG_THREADS);
  } else {
    named_barrier_arrive(bar, WG_THREADS);
  }
}

template <int KIND>
__device__ __forceinline__ void body(const CUtensorMap* tmap_k, const DecodeParams& p) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* gbase = smem_raw + (base - raw);
  {
    uint32_t dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < static_cast<uint32_t>(Smem::DYNAMIC_BYTES)) __trap();  // host/kernel plan mismatch
  }
  float* s_m = reinterpret_cast<float*>(gbase + Smem::M);
  float* s_scale0 = reinterpret_cast<float*>(gbase + Smem::SCALE0);
  float* s_scale1 = reinterpret_cast<float*>(gbase + Smem::SCALE1);
  float* s_l0 = reinterpret_cast<float*>(gbase + Smem::L0);
  float* s_l1 = reinterpret_cast<float*>(gbase + Smem::L1);
  uint8_t* g_p0 = gbase + Smem::P0;
  const uint32_t sq = base + Smem::Q;
  const uint32_t k0 = base + Smem::K0, k1 = base + Smem::K1;
  const uint32_t bars0 = base + Smem::BARS, bars1 = bars0 + 8 * CHUNKS;

  const int tid = threadIdx.x;
  const int wg = tid / WG_THREADS;
  const int tw = tid % WG_THREADS;
  const int warp = tw / 32;
  const int lane = tid % 32;
  const int quad = lane % 4;
  const int row_a = 16 * warp + lane / 4;  // this thread's rows of the tile: row_a and row_a + 8

  const int kv_head = blockIdx.y;
  const int32_t* md = p.metadata + blockIdx.z * METADATA_WORDS;
  const int begin_req = md[0], end_req = md[1];
  if (begin_req > end_req) return;  // an empty part

  if (tid == 0) {
    for (int b = 0; b < 2 * CHUNKS; ++b) mbar_init(bars0 + 8 * b, 1);
    fence_mbar_init();
    tma_prefetch_desc(tmap_k);
  }
  __syncthreads();

  const float c_log2 = p.scale_log2;
  const int tile_row0 = blockIdx.x * BLOCK_M;
  const int rows_in_tile = min(BLOCK_M, p.q_seq_per_hk - tile_row0);
  uint32_t phase = 0;  // bit k: parity of the next completion of buffer k's chunk barriers (all chunks move together)

  for (int req = begin_req; req <= end_req; ++req) {
    const RequestSlice r = request_slice(p, md, req, tile_row0, rows_in_tile);
    const int nblk = r.nblk;
    if (tid == 0) {
      if (nblk > 0) load_chunks<0, CHUNKS>(tmap_k, k0, bars0, kv_head, r.bt[r.blk_begin]);
      if (nblk > 1) load_k1_page(tmap_k, k1, bars1, kv_head, r.bt[r.blk_begin + 1]);
    }
    if (tid < BLOCK_M) s_m[tid] = -INFINITY;
    load_q_tile<2, CHUNKS, 0>(sq, p, req, kv_head, tile_row0);
    fence_proxy_async();
    __syncthreads();

    const int limit[2] = {row_limit(p, r.s_k, tile_row0 + row_a), row_limit(p, r.s_k, tile_row0 + row_a + 8)};
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.0f;
    float l_run[2] = {0.0f, 0.0f};
    float s[32];

    // Prologue: each warpgroup's Q·Kᵀ of its first page.
    if (wg == 0 && nblk > 0) {
      issue_qk_chunks<KIND, 0, CHUNKS, true>(s, sq, k0, bars0, phase & 1);
      wgmma_commit();
      wgmma_wait<0>();
      pin_regs(s);
    }
    if (wg == 1 && nblk > 1) {
      issue_qk_k1<KIND>(s, sq, k1, bars1, (phase >> 1) & 1);
      wgmma_commit();
      wgmma_wait<0>();
      pin_regs(s);
    }

    if (wg == 0) {
      for (int a = 0; a < nblk; a += 2) {
        const bool has_b = a + 1 < nblk;
        const int blk_a = r.blk_begin + a;
        const uint32_t par1 = (phase >> 1) & 1;
        // Softmax of page a; publish its max, rescale and P (unscaled) for WG1.
        const float m_old[2] = {s_m[row_a], s_m[row_a + 8]};
        float m_new[2], s0[2], sum[2];
        page_softmax(s, c_log2, (blk_a + 1) * PAGE_TOKENS > r.min_limit, blk_a * PAGE_TOKENS, limit, m_old, m_new, s0,
                     sum, quad);
        __syncwarp();  // every lane of the quad has read the old max
        if (quad == 0) {
          s_m[row_a] = m_new[0];
          s_m[row_a + 8] = m_new[1];
          s_scale0[row_a] = s0[0];
          s_scale0[row_a + 8] = s0[1];
        }
        uint32_t pa[4][4];
        pack_p_tile<KIND, true>(pa, s, g_p0, row_a, quad);
        const int valid = min(PAGE_TOKENS, r.s_k - blk_a * PAGE_TOKENS);
        if (valid < PAGE_TOKENS) zero_v_tail(gbase + Smem::K0, valid, tw);  // the request's last page
        fence_proxy_async();
        named_barrier_arrive(BAR_A, NUM_THREADS);
        if (valid < PAGE_TOKENS) named_barrier_sync(BAR_WG0_TAIL, WG_THREADS);  // all of V0_L zeroed
        // O_L = O_L·s0 + P_a·V0_L; then K0's chunks 0..3 are dead (Q·K(a) and both V0_L reads done).
        scale_rows(o, s0);
        l_run[0] = l_run[0] * s0[0] + sum[0];
        l_run[1] = l_run[1] * s0[1] + sum[1];
        issue_pv_rs<KIND>(o, pa, k0);
        wgmma_commit();
        wgmma_wait<0>();
        pin_regs(o);
        if (a + 2 < nblk) {
          release_to_warp0(BAR_WG0_RELEASE_A, warp);
          if (tw == 0) load_chunks<0, V_L_CHUNKS>(tmap_k, k0, bars0, kv_head, r.bt[blk_a + 2]);
        }
        if (has_b) {
          // O_L = O_L·s1 + P_b·V1_L, P_b and s1 from WG1.
          named_barrier_sync(BAR_B, NUM_THREADS);
          const float s1[2] = {s_scale1[row_a], s_scale1[row_a + 8]};
          scale_rows(o, s1);
          l_run[0] *= s1[0];
          l_run[1] *= s1[1];
          wait_chunks<0, V_L_CHUNKS>(bars1, par1);  // complete already (WG1 waited); orders the reads
          issue_pv_ss<KIND>(o, base + Smem::P1, k1);
          wgmma_commit();
        }
        if (a + 2 < nblk) {
          // Q·Kᵀ of page a+2: chunks 0..3 (refilled above) while P_b·V1_L runs, then 4..8 (refilled by WG1).
          issue_qk_chunks<KIND, 0, V_L_CHUNKS, true>(s, sq, k0, bars0, (phase & 1) ^ 1);
          wgmma_commit();
          wgmma_wait<1>();
          if (a + 3 < nblk) {  // V1_L and sP1 (K1's RoPE chunk) are dead
            release_to_warp0(BAR_WG0_RELEASE_B, warp);
            if (tw == 0) {
              load_chunks<0, V_L_CHUNKS>(tmap_k, k1, bars1, kv_head, r.bt[blk_a + 3]);
              load_chunks<ROPE_CHUNK, CHUNKS>(tmap_k, k1, bars1, kv_head, r.bt[blk_a + 3]);
            }
          }
          issue_qk_chunks<KIND, V_L_CHUNKS, CHUNKS, false>(s, sq, k0, bars0, (phase & 1) ^ 1);
          wgmma_commit();
          wgmma_wait<0>();  // inside the branch: waiting after the join makes ptxas serialise every wgmma (C7515)
          pin_regs(s);
        } else {
          wgmma_wait<0>();
          clear(s);
        }
        pin_regs(o);
        phase ^= has_b ? 3u : 1u;
      }
    } else {
      for (int a = 0; a < nblk; a += 2) {
        const bool has_b = a + 1 < nblk;
        const int blk_b = r.blk_begin + a + 1;
        const uint32_t par0 = phase & 1;
        // O_R = O_R·s0 + P_a·V0_R as soon as WG0 has published page a; page b's softmax runs meanwhile.
        named_barrier_sync(BAR_A, NUM_THREADS);
        const float s0[2] = {s_scale0[row_a], s_scale0[row_a + 8]};
        scale_rows(o, s0);
        l_run[0] *= s0[0];
        l_run[1] *= s0[1];
        wait_chunks<V_L_CHUNKS, V_CHUNKS_END>(bars0, par0);  // complete already (WG0 waited); orders the reads
        issue_pv_ss<KIND>(o, base + Smem::P0, k0 + V_HALF_BYTES);
        wgmma_commit();
        float s1[2] = {1.0f, 1.0f};
        float sum[2] = {0.0f, 0.0f};
        uint32_t pb[4][4];
        int valid = PAGE_TOKENS;
        if (has_b) {
          const float m_old[2] = {s_m[row_a], s_m[row_a + 8]};
          float m_new[2];
          page_softmax(s, c_log2, (blk_b + 1) * PAGE_TOKENS > r.min_limit, blk_b * PAGE_TOKENS, limit, m_old, m_new,
                       s1, sum, quad);
          __syncwarp();
          if (quad == 0) {
            s_m[row_a] = m_new[0];
            s_m[row_a + 8] = m_new[1];
            s_scale1[row_a] = s1[0];
            s_scale1[row_a + 8] = s1[1];
          }
          pack_p_tile<KIND, true>(pb, s, gbase + Smem::P1, row_a, quad);  // Q·K(b) is done: K1's RoPE chunk is free
          valid = min(PAGE_TOKENS, r.s_k - blk_b * PAGE_TOKENS);
          if (valid < PAGE_TOKENS) zero_v_tail(gbase + Smem::K1, valid, tw);
          fence_proxy_async();
          named_barrier_arrive(BAR_B, NUM_THREADS);
        }
        wgmma_wait<0>();
        pin_regs(o);
        if (a + 2 < nblk) {  // K0's chunks 4..8 are dead (Q·K(a) and V0_R read)
          release_to_warp0(BAR_WG1_RELEASE_A, warp);
          if (tw == 0) load_chunks<V_L_CHUNKS, CHUNKS>(tmap_k, k0, bars0, kv_head, r.bt[blk_b + 1]);
        }
        if (has_b) {
          // O_R = O_R·s1 + P_b·V1_R; then K1's chunks 4..7 are dead.
          if (valid < PAGE_TOKENS) named_barrier_sync(BAR_WG1_TAIL, WG_THREADS);  // all of V1_R zeroed
          scale_rows(o, s1);
          l_run[0] = l_run[0] * s1[0] + sum[0];
          l_run[1] = l_run[1] * s1[1] + sum[1];
          issue_pv_rs<KIND>(o, pb, k1 + V_HALF_BYTES);
          wgmma_commit();
          wgmma_wait<0>();
          pin_regs(o);
        }
        if (a + 3 < nblk) {
          release_to_warp0(BAR_WG1_RELEASE_B, warp);
          if (tw == 0) load_chunks<V_L_CHUNKS, V_CHUNKS_END>(tmap_k, k1, bars1, kv_head, r.bt[blk_b + 2]);
          // Q·Kᵀ of page b+2: chunks 4..7 (refilled just now), then those WG0 refills after its P_b·V1_L.
          issue_qk_k1<KIND>(s, sq, k1, bars1, ((phase >> 1) & 1) ^ 1);
          wgmma_commit();
          wgmma_wait<0>();
          pin_regs(s);
        } else {
          clear(s);
        }
        phase ^= has_b ? 3u : 1u;
      }
    }
    // Epilogue: the row sums of both warpgroups are in the final max's scale.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = l_run[h];
      l += __shfl_xor_sync(0xffffffff, l, 1);
      l += __shfl_xor_sync(0xffffffff, l, 2);
      if (quad == 0) (wg == 0 ? s_l0 : s_l1)[row_a + 8 * h] = l;
    }
    __syncthreads();
    const float m[2] = {s_m[row_a], s_m[row_a + 8]};
    const float l[2] = {s_l0[row_a] + s_l1[row_a], s_l0[row_a + 8] + s_l1[row_a + 8]};
    store_rows<KIND == KIND_F16>(o, p, r, req, kv_head, tile_row0, row_a, quad, wg, m, l, 1.0f);
    __syncthreads();  // sQ, sM, sL and the page buffers are reused by the next request
  }
}

}  // namespace seesaw
}  // namespace mla

// tmap_tail is unused (the e4m3 kernel's RoPE map); kept so both split kernels take the same arguments.
#define MLA_SEESAW_ENTRY(name, kind)                                                                           \
  extern "C" __global__ void __launch_bounds__(mla::NUM_THREADS, 1)                                             \
      name(const __grid_constant__ CUtensorMap tmap_k, const __grid_constant__ CUtensorMap tmap_tail,           \
           const __grid_constant__ mla::DecodeParams p) {                                                       \
    mla::seesaw::body<kind>(&tmap_k, p);                                                                         \
  }

MLA_SEESAW_ENTRY(mla_splitkv_seesaw_bf16, mla::KIND_BF16)
MLA_SEESAW_ENTRY(mla_splitkv_seesaw_f16, mla::KIND_F16)
