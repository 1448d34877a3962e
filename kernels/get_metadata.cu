// The split-KV scheduler on the device: cache_seqlens (device) → tile_scheduler_metadata, num_splits, with no
// host round trip. Bit-identical to the host reference mla_core::scheduler::plan:
//
//   cost(i)  = max(1, ceil(s_k[i] / 64)) + FIXED_OVERHEAD_BLOCKS
//   payload  = ceil(Σ cost / num_sm_parts) + FIXED_OVERHEAD_BLOCKS
//   greedy: each part takes whole requests while they fit, else a partial chunk of (remaining − overhead) blocks.
//
// One CTA: all threads stage the lengths in shared memory and reduce the total; thread 0 runs the (inherently
// sequential, O(b + parts)) greedy cut; then one thread per part fills the split flags from num_splits.
// Thread 0 writes its rows and num_splits into shared memory and all threads copy them out afterwards (writing
// global memory from the serial cut, the step took 11.5-28.8 µs of GPU time on the H200, growing with the parts
// that get work).
// Batches too large to stage (see the host's SCHED_SMEM_MAX_BATCH) and more parts than SCHED_SMEM_MAX_PARTS write
// global memory directly; the results are the same.
// Negative lengths are treated as 0 (the host plan rejects them; a kernel cannot report).
#include "mla_params.h"
#include "mla_ptx.cuh"

namespace mla {

constexpr int SCHED_THREADS = 256;
// Metadata rows kept in static shared memory (8 KiB): every Hopper part has at most 144 SMs, so parts ≤ 144.
constexpr int SCHED_SMEM_MAX_PARTS = 256;

}  // namespace mla

extern "C" __global__ void __launch_bounds__(mla::SCHED_THREADS)
    mla_get_metadata(const __grid_constant__ mla::MetadataParams p) {
  using namespace mla;
  // Dynamic: b lengths, then b + 1 entries of num_splits, when the launch reserved them (seqlens_in_smem).
  extern __shared__ int32_t s_dyn[];
  __shared__ int32_t s_rows[SCHED_SMEM_MAX_PARTS * METADATA_WORDS];
  __shared__ long long s_partial[SCHED_THREADS / 32];
  const int b = p.batch;
  const int tid = threadIdx.x;
  const bool staged = p.seqlens_in_smem != 0;
  const bool rows_staged = p.num_sm_parts <= SCHED_SMEM_MAX_PARTS;
  int32_t* const s_len = s_dyn;
  // Generic pointers: shared memory where staged, else the outputs themselves.
  int32_t* const splits = staged ? s_dyn + b : p.num_splits;
  int32_t* const rows = rows_staged ? s_rows : p.metadata;

  long long mine = 0;
  for (int i = tid; i < b; i += SCHED_THREADS) {
    const int len = max(p.seqlens[i], 0);
    if (staged) s_len[i] = len;
    mine += max(1, (len + PAGE_TOKENS - 1) / PAGE_TOKENS) + FIXED_OVERHEAD_BLOCKS;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mine += __shfl_xor_sync(0xffffffff, mine, o);
  if (tid % 32 == 0) s_partial[tid / 32] = mine;
  __syncthreads();

  if (tid == 0) {
    long long total = 0;
    for (int w = 0; w < SCHED_THREADS / 32; ++w) total += s_partial[w];
    const long long fo = FIXED_OVERHEAD_BLOCKS;
    const long long payload = (total + p.num_sm_parts - 1) / p.num_sm_parts + fo;
    auto length = [&](int i) { return staged ? s_len[i] : max(p.seqlens[i], 0); };
    int idx = 0;
    long long blk = 0, split = 0, cum = 0;
    splits[0] = 0;
    for (int part = 0; part < p.num_sm_parts; ++part) {
      const int begin_idx = idx;
      const long long begin_blk = blk, begin_split = split;
      long long rem = payload;
      while (idx < b) {
        const int len = length(idx);
        const long long cost = max(1, (len + PAGE_TOKENS - 1) / PAGE_TOKENS);
        const long long need = cost - blk + fo;
        if (rem >= need) {
          cum += split + 1;
          splits[idx + 1] = static_cast<int32_t>(cum);
          rem -= need;
          ++idx;
          blk = 0;
          split = 0;
        } else {
          if (rem - fo > 0) {
            blk += rem - fo;
            ++split;
          }
          break;
        }
      }
      int32_t* row = rows + part * METADATA_WORDS;
      if (begin_idx >= b) {
        row[0] = b;
        row[1] = b - 1;
        row[2] = row[3] = row[4] = 0;
      } else {
        int end_idx;
        long long end_blk;
        if (blk > 0) {
          end_idx = idx;
          end_blk = blk;
        } else if (idx > 0) {
          end_idx = idx - 1;
          end_blk = (length(idx - 1) + PAGE_TOKENS - 1) / PAGE_TOKENS;
        } else {
          end_idx = 0;
          end_blk = 0;
        }
        row[0] = begin_idx;
        row[1] = end_idx;
        row[2] = static_cast<int32_t>(begin_blk);
        row[3] = static_cast<int32_t>(end_blk);
        row[4] = static_cast<int32_t>(begin_split);
      }
      row[5] = row[6] = row[7] = 0;
    }
  }
  __syncthreads();

  // Split flags need the complete num_splits.
  for (int part = tid; part < p.num_sm_parts; part += SCHED_THREADS) {
    int32_t* row = rows + part * METADATA_WORDS;
    if (row[0] >= b) continue;
    const int first = row[0], last = row[1];
    row[5] = splits[first + 1] - splits[first] > 1;
    row[6] = splits[last + 1] - splits[last] > 1;
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
