// The split-KV scheduler on the device: cache_seqlens (device) → tile_scheduler_metadata, num_splits, with no
// host round trip. Bit-identical to the host reference mla_core::scheduler::plan:
//
//   cost(i)  = max(1, ceil(s_k[i] / 64)) + FIXED_OVERHEAD_BLOCKS
//   payload  = ceil(Σ cost / num_sm_parts) + FIXED_OVERHEAD_BLOCKS
//   greedy: each part takes whole requests while they fit, else a partial chunk of (remaining − overhead) blocks.
//
// One CTA: all threads stage the lengths in shared memory and reduce the total; thread 0 runs the (inherently
// sequential, O(b + parts)) greedy cut; then all threads fill the parts left empty and the split flags from
// num_splits. That serial loop is the kernel's whole cost (its instructions' latency, one thread: 11.5-28.8 µs on the
// H200 with 64-bit arithmetic and every part walked), so it works in 32-bit integers whenever the total cost fits,
// stops at the first part past the last request, and writes shared memory, copied out by all threads at the end.
// Batches too large to stage (see the host's SCHED_SMEM_MAX_BATCH) and more parts than SCHED_SMEM_MAX_PARTS work on
// global memory directly; the results are the same.
// Negative lengths are treated as 0 (the host plan rejects them; a kernel cannot report).
#include <climits>

#include "mla_params.h"
#include "mla_ptx.cuh"

namespace mla {

constexpr int SCHED_THREADS = 256;
// Metadata rows kept in static shared memory (8 KiB): every Hopper part has at most 144 SMs, so parts ≤ 144.
constexpr int SCHED_SMEM_MAX_PARTS = 256;

// ceil(len / PAGE_TOKENS), without the overflow of len + PAGE_TOKENS − 1 near INT_MAX.
__device__ __forceinline__ int ceil_blocks(int len) { return len / PAGE_TOKENS + (len % PAGE_TOKENS != 0); }

// The greedy cut, by one thread. I is int when the total cost fits in it (then so does every quantity below: each is
// at most the payload, which is at most the total), else long long. Writes words 0-4 of the rows of the parts that
// get work, and num_splits; returns the index of the first part left empty (num_sm_parts if none).
template <typename I>
__device__ int greedy_cut(const MetadataParams& p, long long total_ll, const int32_t* s_len, bool staged,
                          int32_t* splits, int32_t* rows) {
  const int b = p.batch;
  const I fo = FIXED_OVERHEAD_BLOCKS;
  const I total = static_cast<I>(total_ll);
  const I payload = (total + p.num_sm_parts - 1) / p.num_sm_parts + fo;
  auto length = [&](int i) { return staged ? s_len[i] : max(p.seqlens[i], 0); };
  int idx = 0, cum = 0;
  I blk = 0;
  int split = 0;
  // The current request's block count travels in a register from part to part (a long request spans many
  // parts), so a part's first step does not wait for a shared-memory load; prev_blocks is the last finished
  // request's block count, for end_blk.
  int cur_blocks = b > 0 ? ceil_blocks(length(0)) : 0, prev_blocks = 0;
  splits[0] = 0;
  for (int part = 0; part < p.num_sm_parts; ++part) {
    if (idx >= b) return part;
    const int begin_idx = idx, begin_split = split;
    const I begin_blk = blk;
    I rem = payload;
    while (idx < b) {
      const I need = static_cast<I>(max(1, cur_blocks)) - blk + fo;
      if (rem >= need) {
        cum += split + 1;
        splits[idx + 1] = cum;
        rem -= need;
        ++idx;
        blk = 0;
        split = 0;
        prev_blocks = cur_blocks;
        cur_blocks = idx < b ? ceil_blocks(length(idx)) : 0;
      } else {
        if (rem - fo > 0) {
          blk += rem - fo;
          ++split;
        }
        break;
      }
    }
    int end_idx;
    I end_blk;
    if (blk > 0) {
      end_idx = idx;
      end_blk = blk;
    } else {
      end_idx = idx - 1;  // idx > begin_idx ≥ 0 here: a part that takes no whole request ends in a chunk (blk > 0)
      end_blk = prev_blocks;
    }
    int32_t* row = rows + part * METADATA_WORDS;
    row[0] = begin_idx;
    row[1] = end_idx;
    row[2] = static_cast<int32_t>(begin_blk);
    row[3] = static_cast<int32_t>(end_blk);
    row[4] = begin_split;
  }
  return p.num_sm_parts;
}

}  // namespace mla

extern "C" __global__ void __launch_bounds__(mla::SCHED_THREADS)
    mla_get_metadata(const __grid_constant__ mla::MetadataParams p) {
  using namespace mla;
  // Dynamic: b lengths, then b + 1 entries of num_splits, when the launch reserved them (seqlens_in_smem).
  extern __shared__ int32_t s_dyn[];
  __shared__ int32_t s_rows[SCHED_SMEM_MAX_PARTS * METADATA_WORDS];
  __shared__ long long s_partial[SCHED_THREADS / 32];
  __shared__ int s_first_empty;
  const int b = p.batch;
  const int tid = threadIdx.x;
  const bool staged = p.seqlens_in_smem != 0;
  const bool rows_staged = p.num_sm_parts <= SCHED_SMEM_MAX_PARTS;
  int32_t* const s_len = s_dyn;
  // Generic pointers: shared memory where staged, else the outputs themselves.
  int32_t* const splits = staged ? s_dyn + b : p.num_splits;
  int32_t* const rows = rows_staged ? s_rows : p.metadata;

  // cache_seqlens may come from the previous kernel; the split kernel that follows waits for this whole grid.
  grid_dependency_wait();
  allow_dependent_launch();
  long long mine = 0;
  for (int i = tid; i < b; i += SCHED_THREADS) {
    const int len = max(p.seqlens[i], 0);
    if (staged) s_len[i] = len;
    mine += max(1, ceil_blocks(len)) + FIXED_OVERHEAD_BLOCKS;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mine += __shfl_xor_sync(0xffffffff, mine, o);
  if (tid % 32 == 0) s_partial[tid / 32] = mine;
  __syncthreads();

  if (tid == 0) {
    long long total = 0;
    for (int w = 0; w < SCHED_THREADS / 32; ++w) total += s_partial[w];
    // The payload adds FIXED_OVERHEAD_BLOCKS to the rounded-up share, so leave room for it in 32 bits.
    s_first_empty = total < INT_MAX - FIXED_OVERHEAD_BLOCKS - p.num_sm_parts
                        ? greedy_cut<int>(p, total, s_len, staged, splits, rows)
                        : greedy_cut<long long>(p, total, s_len, staged, splits, rows);
  }
  __syncthreads();

  // Empty parts, then the split flags (they need the complete num_splits).
  const int first_empty = s_first_empty;
  for (int part = tid; part < p.num_sm_parts; part += SCHED_THREADS) {
    int32_t* row = rows + part * METADATA_WORDS;
    if (part >= first_empty) {
      row[0] = b;
      row[1] = b - 1;
      row[2] = row[3] = row[4] = row[5] = row[6] = 0;
    } else {
      const int first = row[0], last = row[1];
      row[5] = splits[first + 1] - splits[first] > 1;
      row[6] = splits[last + 1] - splits[last] > 1;
    }
    row[7] = 0;
  }
  if (!staged && !rows_staged) return;
  __syncthreads();
  if (rows_staged) {
    for (int i = tid; i < p.num_sm_parts * METADATA_WORDS; i += SCHED_THREADS) p.metadata[i] = s_rows[i];
  }
  if (staged) {
    for (int i = tid; i <= b; i += SCHED_THREADS) p.num_splits[i] = splits[i];
  }
}
