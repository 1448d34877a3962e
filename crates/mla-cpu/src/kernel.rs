//! The decode itself: one work unit per (work item, KV head), then the combine of split requests.
//!
//! ```text
//!  unit (item = request i, blocks [b0, b1), KV head g)          M = s_q·h_q/h_kv query rows, r = t·(h_q/h_kv) + h'
//!  (one rayon task per unit; with fused steps and h_kv > 1, one task per item running its heads' steps in turn)
//!    Q_g  [M, 576] f32  (widened once)
//!    for each step of n keys (tokens → pages through the block table, any page size): a 64-token block, or for
//!    memory-bound shapes a fused step of 8-12 keys inside a block (`step_keys`; the rows a few steps on are
//!    prefetched meanwhile, at a unit's end those of the next unit):
//!        S  = Q_g · K_stepᵀ           [M, n]   (simd::qk: each widened K chunk serves 6 query rows, e4m3 12)
//!        S *= scale;  causal / length mask → −inf
//!        m' = max(m, rowmax S);  f = exp(m − m');  P = exp(S − m');  l = l·f + Σ P
//!        O  = O·f + P · V_step        [M, 512] (simd::pv)
//!    no split:  out[i, t, h] = O / l (rounded RNE), lse = m + ln l     (nothing seen: out 0, lse +inf)
//!    split:     o_accum[row, g, r] = O / l (f32),  lse_accum = m + ln l (nothing seen: 0 and −inf)
//!  combine (request with ≥ 2 splits, KV head g): splitkv::combine_weights, out = Σ_s w_s · O_s in split order
//! ```
//!
//! For e4m3 the kernels work on the e4m3 values themselves (K/V in units of 2⁻⁸, see `simd`); `descale_q·descale_k`
//! (and 2⁸) is folded into the score scale and `descale_k` (and 2⁸) into the final `1/l`.

use mla_core::dtype::{f32_to_bf16, f32_to_f16};
use mla_core::scheduler::{BLOCK_SIZE_N, WorkItem};
use mla_core::splitkv::combine_weights;
use mla_core::{DType, DecodeArgs, DecodeProblem, HEAD_DIM_K, HEAD_DIM_V, ScalarType, TensorDesc};
use rayon::prelude::*;

use crate::prepare::Prepared;
use crate::simd::{self, Isa, Prefetch, QueryRows, S_STRIDE};

/// Prefetch distance (keys) of the fused steps (see [`step_keys`]).
const FUSED_AHEAD: usize = 16;

/// Keys per online-softmax step, and the prefetch distance in keys, for `m` query rows.
///
/// - Units of M ≤ 2 query rows (memory-bound; e4m3 M = 2 near the ridge) take **fused steps** of 8 (M = 1) or 12
///   (M = 2) keys, one or two `qk` key tiles: scores, softmax update and `P·V` of those keys while their rows are
///   in L1, and the rows [`FUSED_AHEAD`] keys on (into the next unit at the end) are prefetched into L1, spread over
///   `pv`'s column tiles.
/// - Everything else takes whole 64-key blocks and prefetches the next block into L2 during `qk` (reloading an
///   M×512 output tile every few keys would cost the compute-bound rows more than it saves).
///
/// The step is part of the arithmetic (each step rescales O by `exp(m − m')`), so it depends on the shape only,
/// never on the instruction set or the thread count.
fn step_keys(m: usize) -> (usize, usize) {
    match m {
        1 => (8, FUSED_AHEAD),
        2 => (12, FUSED_AHEAD),
        _ => (BLOCK_SIZE_N, BLOCK_SIZE_N),
    }
}

/// A raw pointer that may be shared between the rayon workers of one decode call.
#[derive(Clone, Copy)]
pub(crate) struct SharedPtr(pub(crate) *mut u8);
// SAFETY: the pointer is only dereferenced inside `run`, where every unit writes a disjoint set of rows (checked by
// `prepare`'s coverage validation) and the inputs are read-only for the call.
unsafe impl Send for SharedPtr {}
// SAFETY: as above.
unsafe impl Sync for SharedPtr {}

/// Byte address of an element of a strided tensor.
fn elem_addr(t: &TensorDesc, idx: &[usize]) -> SharedPtr {
    let off: i64 = idx.iter().zip(t.stride_slice()).map(|(&i, &s)| i as i64 * s).sum();
    SharedPtr((t.data() as *mut u8).wrapping_offset((off * t.dtype().size_bytes() as i64) as isize))
}

/// The arguments of one decode call, shared by that call's workers.
#[derive(Clone, Copy)]
pub(crate) struct SharedArgs<'a>(pub(crate) &'a DecodeArgs<'a>);
// SAFETY: descriptors are neither Send nor Sync so that safe code cannot hand one writable output to two concurrent
// calls. Inside this one call the workers read the descriptors' metadata and the inputs, and write disjoint output
// and workspace rows (prepare's coverage validation), so sharing the arguments between them races on nothing.
unsafe impl Send for SharedArgs<'_> {}
// SAFETY: as above.
unsafe impl Sync for SharedArgs<'_> {}

/// Everything a unit needs, shared read-only by all units.
struct Ctx<'a> {
    args: SharedArgs<'a>,
    prob: &'a DecodeProblem,
    prep: &'a Prepared,
    isa: Isa,
    /// Score scale (softmax scale, times both descales for e4m3).
    score_scale: f32,
    /// Multiplies O/l at the end (descale_k for e4m3, else 1).
    out_scale: f32,
    /// `lse_accum` and `o_accum` in the caller's workspace.
    lse_ws: SharedPtr,
    o_ws: SharedPtr,
}

/// Runs the whole decode (validation already done by `prepare`).
pub(crate) fn run(args: SharedArgs, prob: &DecodeProblem, prep: &Prepared, isa: Isa, ws: SharedPtr) {
    let ws = ws.0;
    let (dq, dk) = prep.descale;
    let (score_scale, out_scale) = match prob.shape.dtype {
        // K/V elements are widened in units of E4M3_KV_UNIT (2^-8): scale back by the exact power of two.
        DType::E4M3 => (prob.softmax_scale * dq * dk / simd::E4M3_KV_UNIT, dk / simd::E4M3_KV_UNIT),
        _ => (prob.softmax_scale, 1.0),
    };
    let ctx = Ctx {
        args,
        prob,
        prep,
        isa,
        score_scale,
        out_scale,
        lse_ws: SharedPtr(ws.wrapping_add(prep.layout.lse_offset)),
        o_ws: SharedPtr(ws.wrapping_add(prep.layout.o_offset)),
    };
    let h_kv = prob.shape.h_kv;
    let (step, _) = step_keys(prob.shape.q_seq_per_hk());
    if step < BLOCK_SIZE_N && h_kv > 1 {
        // Fused steps with several KV heads: one task per work item, its heads interleaved step by step.
        prep.items.par_iter().for_each(|item| attend_heads(&ctx, item));
    } else {
        let units: Vec<(usize, usize)> = (0..prep.items.len()).flat_map(|k| (0..h_kv).map(move |g| (k, g))).collect();
        // Each unit also prefetches the first rows of the unit after it, which the same thread usually runs next
        // (rayon hands out contiguous ranges): the short units of a memory-bound step would otherwise start cold.
        units.par_iter().enumerate().for_each(|(u, &(k, g))| {
            let next = units.get(u + 1).map(|&(k, g)| (&prep.items[k], g));
            attend(&ctx, &prep.items[k], g, next)
        });
    }

    let split_reqs: Vec<(usize, usize)> = (0..prob.shape.batch)
        .filter(|&i| prep.num_splits[i + 1] - prep.num_splits[i] > 1)
        .flat_map(|i| (0..h_kv).map(move |g| (i, g)))
        .collect();
    split_reqs.par_iter().for_each(|&(i, g)| combine(&ctx, i, g));
}

/// Writes one finished query row to `out`/`lse` (rounded to the out dtype).
///
/// # Safety
/// `out`/`lse` rows (i, t, h) belong to the calling unit alone.
unsafe fn write_out_row(ctx: &Ctx, i: usize, t: usize, h: usize, o: &[f32], lse: f32) {
    let out = &ctx.args.0.out;
    let base = elem_addr(out, &[i, t, h, 0]).0;
    let stride = out.stride_slice()[3] as usize;
    // SAFETY: (i, t, h, d) is inside the validated out shape; this unit owns the row.
    unsafe {
        match out.dtype() {
            ScalarType::F16 => {
                for (d, &x) in o.iter().enumerate() {
                    base.cast::<u16>().add(d * stride).write_unaligned(f32_to_f16(x));
                }
            }
            _ => {
                for (d, &x) in o.iter().enumerate() {
                    base.cast::<u16>().add(d * stride).write_unaligned(f32_to_bf16(x));
                }
            }
        }
        elem_addr(&ctx.args.0.lse, &[i, h, t]).0.cast::<f32>().write_unaligned(lse);
    }
}

/// The K rows of `item`'s keys for KV head `g`, in key order (at most `limit`).
fn unit_keys(ctx: &Ctx, item: &WorkItem, g: usize, limit: usize) -> Vec<*const u8> {
    let ps = ctx.prob.page_size;
    let pages = &ctx.prep.pages[item.req];
    let j_begin = item.begin_block * BLOCK_SIZE_N;
    let j_end =
        (item.end_block * BLOCK_SIZE_N).min(ctx.prep.seqlens[item.req] as usize).min(j_begin.saturating_add(limit));
    (j_begin..j_end)
        .map(|j| elem_addr(&ctx.args.0.k_cache, &[pages[j / ps] as usize, j % ps, g, 0]).0 as *const u8)
        .collect()
}

/// The state of one (work item, KV head) unit: attention of the M query rows of head group `g` over the item's
/// keys, one online-softmax step at a time.
struct Unit<'a> {
    item: &'a WorkItem,
    g: usize,
    q: QueryRows,
    o: Vec<f32>,
    s: Vec<f32>,
    row_max: Vec<f32>,
    row_sum: Vec<f32>,
    factor: Vec<f32>,
    /// The unit's K rows in key order (`n_keys` of them).
    keys: Vec<*const u8>,
    n_keys: usize,
}

impl<'a> Unit<'a> {
    fn new(ctx: &Ctx, item: &'a WorkItem, g: usize) -> Self {
        let sh = ctx.prob.shape;
        let (hpk, m, dt) = (sh.heads_per_kv(), sh.q_seq_per_hk(), sh.dtype);
        let mut q = vec![0f32; m * HEAD_DIM_K];
        for r in 0..m {
            let (t, h) = (r / hpk, g * hpk + r % hpk);
            let row = elem_addr(&ctx.args.0.q, &[item.req, t, h, 0]).0;
            // SAFETY: (i, t, h) is inside q's validated shape; the row's 576 elements are contiguous.
            unsafe { simd::widen_row(dt, row, &mut q[r * HEAD_DIM_K..][..HEAD_DIM_K]) };
        }
        let q = QueryRows::new(ctx.isa, dt, q);
        let o = vec![0f32; m * HEAD_DIM_V];
        let s = vec![0f32; m * S_STRIDE];
        let (row_max, row_sum, factor) = (vec![f32::NEG_INFINITY; m], vec![0f32; m], vec![1f32; m]);
        let keys = unit_keys(ctx, item, g, usize::MAX);
        Unit { item, g, q, o, s, row_max, row_sum, factor, n_keys: keys.len(), keys }
    }

    /// One step: keys `j..j + n` of the unit (inside one 64-token block), prefetching `pf` meanwhile (over `pv`'s
    /// column tiles for fused steps, over `qk`'s key tiles for block steps).
    fn step(&mut self, ctx: &Ctx, j: usize, n: usize, pf: Prefetch, fused: bool) {
        let prob = ctx.prob;
        let sh = prob.shape;
        let (hpk, m, dt) = (sh.heads_per_kv(), sh.q_seq_per_hk(), sh.dtype);
        let s_k = ctx.prep.seqlens[self.item.req] as usize;
        let j0 = self.item.begin_block * BLOCK_SIZE_N + j;
        let step_rows = &self.keys[j..j + n];
        let (pf_qk, pf_pv) = if fused { (Prefetch::NONE, pf) } else { (pf, Prefetch::NONE) };
        // SAFETY: every key pointer addresses a validated page (prepare), row < page_size and head g < h_kv: 576
        // contiguous readable elements. Buffer sizes match m.
        let nan_free = unsafe { simd::qk(ctx.isa, dt, &self.q, m, step_rows, &mut self.s, pf_qk) };
        for r in 0..m {
            // Keys this row may see in the step: all, or up to s_k − s_q + t (bottom-right causal).
            let visible = if prob.causal {
                let last = s_k as i64 - sh.s_q as i64 + (r / hpk) as i64; // inclusive
                (last + 1 - j0 as i64).clamp(0, n as i64) as usize
            } else {
                n
            };
            let row = &mut self.s[r * S_STRIDE..r * S_STRIDE + n];
            let mut step_max = f32::NEG_INFINITY;
            for x in row[..visible].iter_mut() {
                *x *= ctx.score_scale;
                step_max = step_max.max(*x);
            }
            let new_max = self.row_max[r].max(step_max);
            if new_max == f32::NEG_INFINITY {
                // Nothing seen yet: P = 0, O stays 0.
                row.fill(0.0);
                self.factor[r] = 1.0;
                continue;
            }
            self.factor[r] = (self.row_max[r] - new_max).exp(); // 0 on the first step seen, 1 if the max did not move
            let mut sum = self.row_sum[r] * self.factor[r];
            for x in row[..visible].iter_mut() {
                *x = (*x - new_max).exp();
                sum += *x;
            }
            row[visible..].fill(0.0);
            self.row_sum[r] = sum;
            self.row_max[r] = new_max;
        }
        // SAFETY: as for qk; the V rows are the first 512 elements of the same K rows.
        unsafe { simd::pv(ctx.isa, dt, &mut self.s, m, step_rows, &self.factor, &mut self.o, pf_pv, nan_free) };
    }

    /// Writes the unit's rows: `out`/`lse`, or its partial rows in the workspace.
    fn finish(mut self, ctx: &Ctx) {
        let sh = ctx.prob.shape;
        let (hpk, m) = (sh.heads_per_kv(), sh.q_seq_per_hk());
        let (item, g) = (self.item, self.g);
        for r in 0..m {
            let (t, h) = (r / hpk, g * hpk + r % hpk);
            let orow = &mut self.o[r * HEAD_DIM_V..(r + 1) * HEAD_DIM_V];
            let seen = self.row_sum[r] > 0.0;
            let lse = if seen { self.row_max[r] + self.row_sum[r].ln() } else { f32::NEG_INFINITY };
            if seen {
                let inv = ctx.out_scale / self.row_sum[r];
                orow.iter_mut().for_each(|x| *x *= inv);
            } else {
                orow.fill(0.0);
            }
            if item.is_split {
                let li = ctx.prep.layout.lse_index(item.split_row, g, r);
                let oi = ctx.prep.layout.o_index(item.split_row, g, r);
                // SAFETY: split_row < num_splits[b] <= layout.rows and the workspace holds layout.total_bytes
                // (prepare); partial row (split_row, g, r) is written by this unit only.
                unsafe {
                    ctx.lse_ws.0.cast::<f32>().add(li).write(lse);
                    std::ptr::copy_nonoverlapping(orow.as_ptr(), ctx.o_ws.0.cast::<f32>().add(oi), HEAD_DIM_V);
                }
            } else {
                let lse = if seen { lse } else { f32::INFINITY };
                // SAFETY: a request without splits is processed by exactly one item (prepare), so these rows are
                // ours.
                unsafe { write_out_row(ctx, item.req, t, h, orow, lse) };
            }
        }
    }
}

/// Length of the step at key `j` of a unit of `n_keys` keys starting at a block boundary: `step` keys, cut at the
/// unit's end and at 64-token block boundaries.
fn step_len(j: usize, n_keys: usize, step: usize) -> usize {
    (n_keys - j).min(step).min(BLOCK_SIZE_N - j % BLOCK_SIZE_N)
}

/// One (work item, KV head) unit; `next` is the unit to prefetch the first rows of (fused steps only).
fn attend(ctx: &Ctx, item: &WorkItem, g: usize, next: Option<(&WorkItem, usize)>) {
    let dt = ctx.prob.shape.dtype;
    let (step, ahead) = step_keys(ctx.prob.shape.q_seq_per_hk());
    let fused = step < BLOCK_SIZE_N;
    let mut u = Unit::new(ctx, item, g);
    // The unit's rows and then, for the prefetch only, the first rows of the next unit.
    let mut pf_keys = u.keys.clone();
    if let Some((item2, g2)) = next.filter(|_| fused) {
        pf_keys.extend(unit_keys(ctx, item2, g2, ahead));
    }
    let row_bytes = HEAD_DIM_K * dt.size_bytes();
    if fused {
        // The first steps' rows, at once (there is nothing yet to overlap them with).
        Prefetch { rows: &pf_keys[..ahead.min(pf_keys.len())], bytes: row_bytes, l1: true }.all();
    }
    let mut j = 0;
    while j < u.n_keys {
        let n = step_len(j, u.n_keys, step);
        // The rows `ahead` keys on stream in while this step computes: pages are scattered, which the hardware
        // prefetchers cannot follow, and a single core is otherwise latency-bound.
        let rows = &pf_keys[(j + ahead).min(pf_keys.len())..(j + ahead + n).min(pf_keys.len())];
        u.step(ctx, j, n, Prefetch { rows, bytes: row_bytes, l1: fused }, fused);
        j += n;
    }
    u.finish(ctx);
}

/// All KV heads of one work item, with fused steps: step j of head 0, of head 1, …, then step j + 1 of head 0, …
/// Each head's arithmetic is exactly that of its own unit ([`attend`]); only independent work is reordered. The K
/// rows of the heads of a token are adjacent in the cache, so a step of all heads reads whole 64-token pages
/// front to back (n rows of `h_kv·576` contiguous elements) instead of one row in every 4 KiB page.
fn attend_heads(ctx: &Ctx, item: &WorkItem) {
    let sh = ctx.prob.shape;
    let dt = sh.dtype;
    let (step, _) = step_keys(sh.q_seq_per_hk());
    let ahead = HEADS_AHEAD;
    let mut units: Vec<Unit> = (0..sh.h_kv).map(|g| Unit::new(ctx, item, g)).collect();
    let keys: Vec<Vec<*const u8>> = units.iter().map(|u| u.keys.clone()).collect();
    let n_keys = units[0].n_keys;
    let mut tasks = Vec::new(); // (key, keys, head) in processing order
    let mut j = 0;
    while j < n_keys {
        let n = step_len(j, n_keys, step);
        tasks.extend((0..sh.h_kv).map(|g| (j, n, g)));
        j += n;
    }
    let row_bytes = HEAD_DIM_K * dt.size_bytes();
    let rows = |t: usize| tasks.get(t).map_or(&[][..], |&(j, n, g)| &keys[g][j..j + n]);
    for t in 0..ahead {
        Prefetch { rows: rows(t), bytes: row_bytes, l1: true }.all();
    }
    for (t, &(j, n, g)) in tasks.iter().enumerate() {
        // The rows of the task `ahead` tasks on stream in while this one computes.
        units[g].step(ctx, j, n, Prefetch { rows: rows(t + ahead), bytes: row_bytes, l1: true }, true);
    }
    for u in units {
        u.finish(ctx);
    }
}

/// Prefetch distance of [`attend_heads`], in (head, step) tasks: the next task's rows are prefetched during this
/// one's `pv` (2 measured no better).
const HEADS_AHEAD: usize = 1;

/// Merges the partials of request `i`, KV head `g`, into `out`/`lse`.
fn combine(ctx: &Ctx, i: usize, g: usize) {
    let sh = ctx.prob.shape;
    let hpk = sh.heads_per_kv();
    let first = ctx.prep.num_splits[i] as usize;
    let n = ctx.prep.num_splits[i + 1] as usize - first;
    let lay = &ctx.prep.layout;
    let mut lses = vec![0f32; n];
    let mut w = vec![0f32; n];
    let mut acc = vec![0f32; HEAD_DIM_V];
    for r in 0..sh.q_seq_per_hk() {
        for (s, l) in lses.iter_mut().enumerate() {
            // SAFETY: rows first..first+n are inside the workspace (prepare) and were written by the units, which
            // finished before the combine started.
            *l = unsafe { ctx.lse_ws.0.cast::<f32>().add(lay.lse_index(first + s, g, r)).read() };
        }
        let lse = combine_weights(&lses, &mut w);
        acc.fill(0.0);
        for (s, &ws) in w.iter().enumerate() {
            if ws == 0.0 {
                continue; // an empty split (or one outweighed to zero) contributes nothing, even if it holds NaN
            }
            // SAFETY: as above, 512 floats of partial row (first + s, g, r).
            let part = unsafe {
                std::slice::from_raw_parts(ctx.o_ws.0.cast::<f32>().add(lay.o_index(first + s, g, r)), HEAD_DIM_V)
            };
            for (a, &x) in acc.iter_mut().zip(part) {
                *a += ws * x;
            }
        }
        let (t, h) = (r / hpk, g * hpk + r % hpk);
        // SAFETY: request i has splits, so no unit wrote its out rows; (i, g) is this combine task's alone.
        unsafe { write_out_row(ctx, i, t, h, &acc, lse) };
    }
}

#[cfg(test)]
mod tests {
    use mla_core::DType;

    use crate::problem::{HostOutputs, HostProblem, HostRun, RandomSpec};
    use crate::{CpuBackend, CpuOptions, Isa};

    fn run(p: &HostProblem, threads: usize, isa: Isa) -> HostOutputs {
        let be = CpuBackend::with_options(CpuOptions { threads: Some(threads), isa: Some(isa) }).unwrap();
        let mut r = HostRun::new(&be, p).unwrap();
        r.decode().unwrap();
        r.outputs()
    }

    /// The fused steps (M = 1 and M = 2, every dtype) and the block steps next to them (M = 3), with
    /// several KV heads (so units prefetch into their successors), varlen lengths, causal masks and page sizes that
    /// do not divide the 64-token blocks: the SIMD path on 1 and 2 threads equals the scalar path bit for bit.
    #[test]
    fn fused_steps_match_the_scalar_path() {
        let best = Isa::detect();
        for dtype in DType::ALL {
            for (s_q, h_q, h_kv) in [(1, 3, 3), (2, 4, 4), (1, 4, 2), (3, 2, 2)] {
                for page_size in [64, 5] {
                    let spec = RandomSpec {
                        batch: 3,
                        s_q,
                        h_q,
                        h_kv,
                        mean_seqlen: 150,
                        varlen: true,
                        page_size,
                        dtype,
                        causal: true,
                        seed: 7 + s_q as u64 + page_size as u64,
                    };
                    let p = HostProblem::random(&spec);
                    let golden = run(&p, 1, Isa::Scalar);
                    for threads in [1, 2] {
                        let got = run(&p, threads, best);
                        assert!(got.bitwise_eq(&golden), "{dtype} s_q {s_q} h_q {h_q} h_kv {h_kv} page {page_size}");
                    }
                }
            }
        }
    }
}
