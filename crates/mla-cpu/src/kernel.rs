//! The decode itself: one work unit per (work item, KV head), then the combine of split requests.
//!
//! ```text
//!  unit (item = request i, blocks [b0, b1), KV head g)          M = s_q·h_q/h_kv query rows, r = t·(h_q/h_kv) + h'
//!    Q_g  [M, 576] f32  (widened once)
//!    for each 64-token block (tokens → pages through the block table, any page size):
//!        S  = Q_g · K_blkᵀ            [M, n]   (simd::qk: each widened K chunk serves 6 query rows, e4m3 12)
//!        S *= scale;  causal / length mask → −inf
//!        m' = max(m, rowmax S);  f = exp(m − m');  P = exp(S − m');  l = l·f + Σ P
//!        O  = O·f + P · V_blk         [M, 512] (simd::pv)
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
use crate::simd::{self, Isa, S_STRIDE};

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
    SharedPtr((t.data as *mut u8).wrapping_offset((off * t.dtype.size_bytes() as i64) as isize))
}

/// Everything a unit needs, shared read-only by all units.
struct Ctx<'a> {
    args: &'a DecodeArgs,
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
pub(crate) fn run(args: &DecodeArgs, prob: &DecodeProblem, prep: &Prepared, isa: Isa, ws: SharedPtr) {
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
    let units: Vec<(usize, usize)> = (0..prep.items.len()).flat_map(|k| (0..h_kv).map(move |g| (k, g))).collect();
    units.par_iter().for_each(|&(k, g)| attend(&ctx, &prep.items[k], g));

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
    let out = &ctx.args.out;
    let base = elem_addr(out, &[i, t, h, 0]).0;
    let stride = out.strides[3] as usize;
    // SAFETY: (i, t, h, d) is inside the validated out shape; this unit owns the row.
    unsafe {
        match out.dtype {
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
        elem_addr(&ctx.args.lse, &[i, h, t]).0.cast::<f32>().write_unaligned(lse);
    }
}

/// One (work item, KV head) unit: attention of the M query rows of head group `g` over the item's blocks.
fn attend(ctx: &Ctx, item: &WorkItem, g: usize) {
    let prob = ctx.prob;
    let sh = prob.shape;
    let hpk = sh.heads_per_kv();
    let m = sh.q_seq_per_hk();
    let i = item.req;
    let s_k = ctx.prep.seqlens[i] as usize;
    let dt = sh.dtype;

    let mut q = vec![0f32; m * HEAD_DIM_K];
    for r in 0..m {
        let (t, h) = (r / hpk, g * hpk + r % hpk);
        // SAFETY: (i, t, h) is inside q's validated shape; the row's 576 elements are contiguous.
        unsafe { simd::widen_row(dt, elem_addr(&ctx.args.q, &[i, t, h, 0]).0, &mut q[r * HEAD_DIM_K..][..HEAD_DIM_K]) };
    }
    let mut o = vec![0f32; m * HEAD_DIM_V];
    let mut s = vec![0f32; m * S_STRIDE];
    let mut row_max = vec![f32::NEG_INFINITY; m];
    let mut row_sum = vec![0f32; m];
    let mut factor = vec![1f32; m];
    let pages = &ctx.prep.pages[i];
    let kc = &ctx.args.k_cache;
    let block_keys = |blk: usize, keys: &mut Vec<*const u8>| {
        keys.clear();
        for j in blk * BLOCK_SIZE_N..((blk + 1) * BLOCK_SIZE_N).min(s_k) {
            let page = pages[j / prob.page_size] as usize;
            keys.push(elem_addr(kc, &[page, j % prob.page_size, g, 0]).0 as *const u8);
        }
    };
    let mut keys: Vec<*const u8> = Vec::with_capacity(BLOCK_SIZE_N);
    let mut next: Vec<*const u8> = Vec::with_capacity(BLOCK_SIZE_N);
    if item.begin_block < item.end_block {
        block_keys(item.begin_block, &mut next);
    }

    for blk in item.begin_block..item.end_block {
        let j0 = blk * BLOCK_SIZE_N;
        std::mem::swap(&mut keys, &mut next);
        next.clear();
        if blk + 1 < item.end_block {
            // The next block's rows are prefetched while this block computes: pages are scattered, which the
            // hardware prefetchers cannot follow, and a single core is otherwise latency-bound.
            block_keys(blk + 1, &mut next);
        }
        let n = keys.len();
        // SAFETY: every key pointer addresses a validated page (prepare), row < page_size and head g < h_kv: 576
        // contiguous readable elements. Buffer sizes match m.
        unsafe { simd::qk(ctx.isa, dt, &q, m, &keys, &mut s, &next) };
        for r in 0..m {
            // Keys this row may see in the block: all, or up to s_k − s_q + t (bottom-right causal).
            let visible = if prob.causal {
                let last = s_k as i64 - sh.s_q as i64 + (r / hpk) as i64; // inclusive
                (last + 1 - j0 as i64).clamp(0, n as i64) as usize
            } else {
                n
            };
            let row = &mut s[r * S_STRIDE..r * S_STRIDE + n];
            let mut blk_max = f32::NEG_INFINITY;
            for x in row[..visible].iter_mut() {
                *x *= ctx.score_scale;
                blk_max = blk_max.max(*x);
            }
            let new_max = row_max[r].max(blk_max);
            if new_max == f32::NEG_INFINITY {
                // Nothing seen yet: P = 0, O stays 0.
                row.fill(0.0);
                factor[r] = 1.0;
                continue;
            }
            factor[r] = (row_max[r] - new_max).exp(); // 0 on the first block seen, 1 if the max did not move
            let mut sum = row_sum[r] * factor[r];
            for x in row[..visible].iter_mut() {
                *x = (*x - new_max).exp();
                sum += *x;
            }
            row[visible..].fill(0.0);
            row_sum[r] = sum;
            row_max[r] = new_max;
        }
        // SAFETY: as for qk; the V rows are the first 512 elements of the same K rows.
        unsafe { simd::pv(ctx.isa, dt, &s, m, &keys, &factor, &mut o) };
    }

    for r in 0..m {
        let (t, h) = (r / hpk, g * hpk + r % hpk);
        let orow = &mut o[r * HEAD_DIM_V..(r + 1) * HEAD_DIM_V];
        let seen = row_sum[r] > 0.0;
        let lse = if seen { row_max[r] + row_sum[r].ln() } else { f32::NEG_INFINITY };
        if seen {
            let inv = ctx.out_scale / row_sum[r];
            orow.iter_mut().for_each(|x| *x *= inv);
        } else {
            orow.fill(0.0);
        }
        if item.is_split {
            let li = ctx.prep.layout.lse_index(item.split_row, g, r);
            let oi = ctx.prep.layout.o_index(item.split_row, g, r);
            // SAFETY: split_row < num_splits[b] <= layout.rows and the workspace holds layout.total_bytes (prepare);
            // partial row (split_row, g, r) is written by this unit only.
            unsafe {
                ctx.lse_ws.0.cast::<f32>().add(li).write(lse);
                std::ptr::copy_nonoverlapping(orow.as_ptr(), ctx.o_ws.0.cast::<f32>().add(oi), HEAD_DIM_V);
            }
        } else {
            let lse = if seen { lse } else { f32::INFINITY };
            // SAFETY: a request without splits is processed by exactly one item (prepare), so these rows are ours.
            unsafe { write_out_row(ctx, i, t, h, orow, lse) };
        }
    }
}

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
