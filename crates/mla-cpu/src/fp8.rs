//! The CPU reference of the decode over FP8 caches ([`mla_core::sparse`]): sparse top-k and dense.
//!
//! | step | what |
//! |---|---|
//! | validate | [`mla_core::MlaBackend::fp8_decode`] ([`mla_core::validate_fp8_decode`] and the workspace): every descriptor, once, before any read |
//! | lengths | `topk_length` / `extra_topk_length` / `cache_seqlens` read and range-checked; the dense block table's used entries checked |
//! | metadata | recomputed ([`mla_core::Fp8Problem::plan`]) and compared with the caller's: a stale schedule is an error, not a silent wrong answer on another backend |
//! | gather | per unit, each selected token row dequantised once ([`mla_core::Fp8Layout::dequantize_parts`]) into f32 |
//! | attend | two-pass softmax per head in f32 over the gathered rows, heads in groups sharing each row |
//! | write | every unit's rows, after all units finished: on any error nothing is written |
//!
//! A unit is a (request, query token) in sparse mode, a request in dense mode (its rows serve every query token).
//! The split-KV schedule is only checked: each row is computed in one pass, so the CPU needs no workspace.
//!
//! Per query row (head `h`, selected rows `K_j`, in order: the main selection, then the extra one):
//! `s_j = scale · q_h · K_j`, `m = max s_j`, `p_j = exp(s_j − m)`, `l = Σ p_j`, `out = (Σ p_j V_j) / l` with `V_j`
//! the first 512 columns of `K_j`, `lse = m + ln l`; then `out *= 1 / (1 + exp(attn_sink[h] − lse))`. No row
//! selected (or every score −inf): `out = 0`, `lse = +inf`. A NaN score makes the row NaN. Every sum runs in a
//! fixed order, so results are bitwise identical for any thread count.

use mla_core::dtype::{bf16_to_f32, f32_to_bf16};
use mla_core::fp8::TokenBytes;
use mla_core::sparse::{CacheGeometry, Fp8Mode};
use mla_core::{Error, Fp8DecodeArgs, Fp8Layout, Fp8Lengths, Fp8Problem, HEAD_DIM_V, Result, SchedulePlan, TensorDesc};
use rayon::prelude::*;

/// Heads that share each gathered row while it is in L1.
const HEAD_GROUP: usize = 8;
/// Independent accumulators of a dot product (a fixed, vectorisable summation order).
const LANES: usize = 8;

/// Reads element `idx` of a strided host tensor of `T`.
///
/// # Safety
/// `t` describes live host memory holding `T`s, and `idx` lies inside its validated shape.
unsafe fn read<T: Copy>(t: &TensorDesc, idx: &[usize]) -> T {
    let off: i64 = idx.iter().zip(t.stride_slice()).map(|(&i, &s)| i as i64 * s).sum();
    // SAFETY: inside the validated extent (caller's contract); host tensors may be unaligned.
    unsafe { (t.data() as *const T).offset(off as isize).read_unaligned() }
}

/// Copies a contiguous `[n]` i32 host vector.
///
/// # Safety
/// As [`read`], for a tensor of `n` elements.
unsafe fn read_vec_i32(t: &TensorDesc, n: usize) -> Vec<i32> {
    // SAFETY: forwarded.
    (0..n).map(|i| unsafe { read::<i32>(t, &[i]) }).collect()
}

/// Host copies of everything small the decode reads, all checked.
pub(crate) struct Prepared {
    prob: Fp8Problem,
    topk_length: Option<Vec<i32>>,
    extra_topk_length: Option<Vec<i32>>,
    seqlens: Vec<i32>,
    /// Dense mode: per request, the page of each of its `ceil(s_k / page_size)` slots (all in range).
    pages: Vec<Vec<usize>>,
    attn_sink: Option<Vec<f32>>,
    plan: SchedulePlan,
}

impl Prepared {
    fn lengths(&self) -> Fp8Lengths<'_> {
        if self.prob.is_sparse() {
            Fp8Lengths::Sparse {
                topk_length: self.topk_length.as_deref(),
                extra_topk_length: self.extra_topk_length.as_deref(),
            }
        } else {
            Fp8Lengths::Dense { cache_seqlens: &self.seqlens }
        }
    }
}

/// The arguments of one decode call, shared by that call's workers.
#[derive(Clone, Copy)]
pub(crate) struct SharedArgs<'a>(pub(crate) &'a Fp8DecodeArgs<'a>);
// SAFETY: descriptors are neither Send nor Sync so that safe code cannot hand one writable output to two concurrent
// calls. Inside this one call the workers only read the descriptors and the inputs; the outputs are written by the
// calling thread after every worker has finished (`run`), so sharing the arguments between them races on nothing.
unsafe impl Send for SharedArgs<'_> {}
// SAFETY: as above.
unsafe impl Sync for SharedArgs<'_> {}

impl<'a> SharedArgs<'a> {
    /// The arguments (a method, so that closures capture the whole `Sync` wrapper, not its field).
    fn get(self) -> &'a Fp8DecodeArgs<'a> {
        self.0
    }
}

/// Reads the lengths of a validated problem (`prob` is what validation returned for `args`); computes the schedule.
pub(crate) fn prepare(args: &Fp8DecodeArgs, prob: &Fp8Problem) -> Result<Prepared> {
    let prob = *prob;
    let b = prob.shape.batch;
    // Every read below: validation checked dtype, shape, strides and non-null host memory of the tensor; the
    // descriptor's constructor (a borrowed host view, or the caller of the unsafe `TensorDesc::from_raw`)
    // guarantees live memory of that extent.
    // SAFETY: [b] contiguous i32 tensors.
    let vec = |t: &Option<TensorDesc>| t.as_ref().map(|t| unsafe { read_vec_i32(t, b) });
    let mut p = Prepared {
        prob,
        topk_length: vec(&args.topk_length),
        extra_topk_length: vec(&args.extra_topk_length),
        seqlens: Vec::new(),
        pages: Vec::new(),
        attn_sink: None,
        plan: SchedulePlan { parts: Vec::new(), num_splits: Vec::new() },
    };
    match prob.mode {
        Fp8Mode::Sparse { has_attn_sink, .. } => {
            if has_attn_sink {
                let t = args.attn_sink.as_ref().expect("validated: attn_sink given");
                // SAFETY: [h_q] f32.
                p.attn_sink = Some((0..prob.shape.h_q).map(|h| unsafe { read::<f32>(t, &[h]) }).collect());
            }
        }
        Fp8Mode::Dense { .. } => {
            p.seqlens = vec(&args.cache_seqlens).expect("validated: cache_seqlens given");
        }
    }
    let plan = prob.plan(p.lengths())?;
    p.plan = plan;
    if let Fp8Mode::Dense { .. } = prob.mode {
        let bt = args.block_table.as_ref().expect("validated: block_table given");
        let ps = prob.cache.page_size;
        for (i, &s) in p.seqlens.iter().enumerate() {
            // plan() checked 0 <= s <= max_blocks_per_seq · page_size.
            let row = (0..(s as usize).div_ceil(ps))
                .map(|slot| {
                    // SAFETY: slot < max_blocks_per_seq (the length check above).
                    let id = unsafe { read::<i32>(bt, &[i, slot]) };
                    usize::try_from(id).ok().filter(|&id| id < prob.cache.num_blocks).ok_or_else(|| {
                        Error::invalid(
                            format!("block_table[{i}][{slot}]"),
                            format!(
                                "a page id in [0, {}) (page {slot} of request {i}, length {s})",
                                prob.cache.num_blocks
                            ),
                            id,
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            p.pages.push(row);
        }
    }
    Ok(p)
}

/// The metadata step of a validated problem: writes the schedule into the caller's buffers.
pub(crate) fn get_metadata(args: &Fp8DecodeArgs, prob: &Fp8Problem) -> Result<()> {
    let p = prepare(args, prob)?;
    let parts = p.prob.num_sm_parts;
    // SAFETY: validated contiguous i32 host tensors of shapes [parts, 8] and [b + 1], writable and overlapping no
    // other argument (`validate_fp8_metadata`); their constructors guarantee live memory of that extent.
    let (meta, splits) = unsafe {
        (
            std::slice::from_raw_parts_mut(args.tile_scheduler_metadata.data() as *mut i32, parts * 8),
            std::slice::from_raw_parts_mut(args.num_splits.data() as *mut i32, p.prob.shape.batch + 1),
        )
    };
    p.plan.write_into(meta, splits)
}

/// Checks that the caller's metadata is the schedule of these arguments.
fn check_metadata(args: &Fp8DecodeArgs, p: &Prepared) -> Result<()> {
    let parts = p.prob.num_sm_parts;
    let b = p.prob.shape.batch;
    let mut want_meta = vec![0i32; parts * 8];
    let mut want_splits = vec![0i32; b + 1];
    p.plan.write_into(&mut want_meta, &mut want_splits)?;
    // SAFETY: validated contiguous i32 host tensors of these shapes.
    let got_meta = unsafe { std::slice::from_raw_parts(args.tile_scheduler_metadata.data() as *const i32, parts * 8) };
    // SAFETY: as above.
    let got_splits = unsafe { std::slice::from_raw_parts(args.num_splits.data() as *const i32, b + 1) };
    let stale = "the output of fp8_get_metadata for these arguments (run it again when the shapes, topk_length, \
                 extra_topk_length or cache_seqlens change)";
    if let Some(r) = (0..parts).find(|&r| got_meta[r * 8..][..8] != want_meta[r * 8..][..8]) {
        return Err(Error::invalid(
            format!("tile_scheduler_metadata[{r}]"),
            format!("{:?}, {stale}", &want_meta[r * 8..][..8]),
            format!("{:?}", &got_meta[r * 8..][..8]),
        ));
    }
    if let Some(i) = (0..=b).find(|&i| got_splits[i] != want_splits[i]) {
        return Err(Error::invalid(format!("num_splits[{i}]"), format!("{}, {stale}", want_splits[i]), got_splits[i]));
    }
    Ok(())
}

/// A cache argument with its validated geometry.
#[derive(Clone, Copy)]
struct Cache<'a> {
    t: &'a TensorDesc<'a>,
    geo: CacheGeometry,
    layout: Fp8Layout,
}

// SAFETY: as for `SharedArgs`: the workers of one call only read the cache through it.
unsafe impl Sync for Cache<'_> {}

impl Cache<'_> {
    /// True if `index` names a token of this cache.
    fn valid(&self, index: i32) -> bool {
        usize::try_from(index).is_ok_and(|x| x < self.geo.num_tokens())
    }

    /// Dequantises token `token` (`< num_tokens`) into `out` (`d_qk` values).
    fn dequantize(&self, token: usize, out: &mut [f32]) {
        let (page, off) = (token / self.geo.page_size, token % self.geo.page_size);
        let o = self.layout.token_offsets(self.geo.page_size, off);
        let block = (self.t.data() as *const u8).wrapping_add(page * self.geo.block_stride);
        let part = |at: usize, len: usize| {
            // SAFETY: page < num_blocks and every part lies in [0, page_size · bytes_per_token) of its block, inside
            // the extent validation checked (blocks are block_stride apart, each spans page_size · bytes_per_token).
            unsafe { std::slice::from_raw_parts(block.add(at), len) }
        };
        let l = self.layout;
        let parts = TokenBytes {
            nope: part(o.nope, l.nope_dim()),
            scales: part(o.scales, l.num_scales() * l.scale_format().bytes()),
            rope: part(o.rope, mla_core::fp8::ROPE_BYTES),
        };
        l.dequantize_parts(parts, out).expect("part lengths follow the layout");
    }
}

/// One unit's results: `rows` query rows of 512 outputs and their lse, in (token, head) order.
struct UnitOut {
    out: Vec<f32>,
    lse: Vec<f32>,
}

/// Runs the decode (after [`prepare`]) and writes `out` and `lse`.
pub(crate) fn run(shared: SharedArgs, p: &Prepared) -> Result<()> {
    let args = shared.get();
    check_metadata(args, p)?;
    let prob = &p.prob;
    let (b, s_q, h_q) = (prob.shape.batch, prob.shape.s_q, prob.shape.h_q);
    let main = Cache { t: &args.k_cache, geo: prob.cache, layout: prob.layout };
    let units: Vec<UnitOut> = match prob.mode {
        Fp8Mode::Sparse { topk, extra, .. } => {
            let extra = extra.map(|e| {
                let t = args.extra_k_cache.as_ref().expect("validated: extra_k_cache given");
                (Cache { t, geo: e.cache, layout: prob.layout }, e.topk)
            });
            (0..b * s_q)
                .into_par_iter()
                .map(|u| sparse_unit(shared.get(), p, u / s_q, u % s_q, &main, topk, extra.as_ref()))
                .collect()
        }
        Fp8Mode::Dense { causal, .. } => {
            (0..b).into_par_iter().map(|i| dense_unit(shared.get(), p, i, &main, causal)).collect()
        }
    };
    // Writes, after every unit finished.
    let out = &args.out;
    for (u, unit) in units.iter().enumerate() {
        let rows = unit.lse.len();
        for r in 0..rows {
            let (i, t, h) = if prob.is_sparse() { (u / s_q, u % s_q, r) } else { (u, r / h_q, r % h_q) };
            let off: i64 = [i, t, h].iter().zip(out.stride_slice()).map(|(&x, &s)| x as i64 * s).sum();
            let base = (out.data() as *mut u16).wrapping_offset(off as isize);
            for (d, &x) in unit.out[r * HEAD_DIM_V..][..HEAD_DIM_V].iter().enumerate() {
                // SAFETY: (i, t, h, d) is inside out's validated shape; the last dimension is contiguous.
                unsafe { base.add(d).write_unaligned(f32_to_bf16(x)) };
            }
            let lse = &args.lse;
            let off: i64 = [i, h, t].iter().zip(lse.stride_slice()).map(|(&x, &s)| x as i64 * s).sum();
            // SAFETY: (i, h, t) is inside lse's validated shape.
            unsafe { (lse.data() as *mut f32).wrapping_offset(off as isize).write_unaligned(unit.lse[r]) };
        }
    }
    Ok(())
}

/// The query rows `q[i, t, 0..h_q, :]`, widened.
fn query_rows(args: &Fp8DecodeArgs, d: usize, h_q: usize, i: usize, t: usize) -> Vec<f32> {
    let mut q = vec![0f32; h_q * d];
    for (h, row) in q.chunks_exact_mut(d).enumerate() {
        for (c, x) in row.iter_mut().enumerate() {
            // SAFETY: (i, t, h, c) is inside q's validated bf16 shape.
            *x = bf16_to_f32(unsafe { read::<u16>(&args.q, &[i, t, h, c]) });
        }
    }
    q
}

/// Sparse unit: request `i`, query token `t`, every head.
fn sparse_unit(
    args: &Fp8DecodeArgs,
    p: &Prepared,
    i: usize,
    t: usize,
    main: &Cache,
    topk: usize,
    extra: Option<&(Cache, usize)>,
) -> UnitOut {
    let prob = &p.prob;
    let d = prob.layout.head_dim_k();
    let mut rows: Vec<f32> = Vec::new();
    let mut gather = |cache: &Cache, indices: &TensorDesc, len: usize| {
        for k in 0..len {
            // SAFETY: k < len <= the tensor's last extent (lengths checked against it), (i, t) inside its shape.
            let index = unsafe { read::<i32>(indices, &[i, t, k]) };
            if cache.valid(index) {
                let at = rows.len();
                rows.resize(at + d, 0.0);
                cache.dequantize(index as usize, &mut rows[at..]);
            }
        }
    };
    let len = p.topk_length.as_ref().map_or(topk, |v| v[i] as usize);
    gather(main, args.indices.as_ref().expect("validated: indices given"), len);
    if let Some((cache, extra_topk)) = extra {
        let len = p.extra_topk_length.as_ref().map_or(*extra_topk, |v| v[i] as usize);
        gather(cache, args.extra_indices_in_kvcache.as_ref().expect("validated: extra indices given"), len);
    }
    let q = query_rows(args, d, prob.shape.h_q, i, t);
    attend(&q, &rows, d, prob.softmax_scale, p.attn_sink.as_deref())
}

/// Dense unit: request `i`, every query token and head; the request's rows are dequantised once for all of them.
fn dense_unit(args: &Fp8DecodeArgs, p: &Prepared, i: usize, main: &Cache, causal: bool) -> UnitOut {
    let prob = &p.prob;
    let (d, ps) = (prob.layout.head_dim_k(), prob.cache.page_size);
    let (s_q, h_q) = (prob.shape.s_q, prob.shape.h_q);
    let s_k = p.seqlens[i] as usize;
    let mut rows = vec![0f32; s_k * d];
    for (j, row) in rows.chunks_exact_mut(d).enumerate() {
        main.dequantize(p.pages[i][j / ps] * ps + j % ps, row);
    }
    let mut unit = UnitOut { out: Vec::with_capacity(s_q * h_q * HEAD_DIM_V), lse: Vec::with_capacity(s_q * h_q) };
    for t in 0..s_q {
        // Bottom-right aligned: token t sees keys [0, s_k − s_q + t].
        let visible = if causal { (s_k + t + 1).saturating_sub(s_q).min(s_k) } else { s_k };
        let q = query_rows(args, d, h_q, i, t);
        let r = attend(&q, &rows[..visible * d], d, prob.softmax_scale, None);
        unit.out.extend(r.out);
        unit.lse.extend(r.lse);
    }
    unit
}

/// `Σ a_i b_i` with [`LANES`] accumulators, reduced in a fixed order.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (a8, a_rest) = a.split_at(a.len() / LANES * LANES);
    let (b8, b_rest) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(LANES).zip(b8.chunks_exact(LANES)) {
        for k in 0..LANES {
            acc[k] += x[k] * y[k];
        }
    }
    for (k, (x, y)) in a_rest.iter().zip(b_rest).enumerate() {
        acc[k] += x * y;
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for k in 0..width {
            acc[k] += acc[k + width];
        }
    }
    acc[0]
}

/// Attention of the query rows `q` (`H × d`) over the gathered rows (`n × d`); `sink[h]` if given.
fn attend(q: &[f32], rows: &[f32], d: usize, scale: f32, sink: Option<&[f32]>) -> UnitOut {
    let heads = q.len() / d;
    let mut out = vec![0f32; heads * HEAD_DIM_V];
    let mut lse = vec![0f32; heads];
    out.par_chunks_mut(HEAD_GROUP * HEAD_DIM_V)
        .zip(lse.par_chunks_mut(HEAD_GROUP))
        .zip(q.par_chunks(HEAD_GROUP * d))
        .enumerate()
        .for_each(|(g, ((out, lse), q))| {
            let sink = sink.map(|s| &s[g * HEAD_GROUP..][..lse.len()]);
            attend_group(q, rows, d, scale, sink, out, lse)
        });
    UnitOut { out, lse }
}

/// [`attend`] for up to [`HEAD_GROUP`] heads: each row is read once for all of them.
fn attend_group(q: &[f32], rows: &[f32], d: usize, scale: f32, sink: Option<&[f32]>, out: &mut [f32], lse: &mut [f32]) {
    let (heads, n) = (lse.len(), rows.len() / d);
    let mut s = vec![0f32; heads * n];
    for (j, row) in rows.chunks_exact(d).enumerate() {
        for h in 0..heads {
            s[h * n + j] = scale * dot(&q[h * d..][..d], row);
        }
    }
    // Per head: normalise its scores into probabilities, leaving 1 / l (or why there is no output) behind.
    let mut inv_l = vec![0f32; heads];
    for h in 0..heads {
        let sh = &mut s[h * n..][..n];
        // The maximum, with NaN propagating (f32::max would skip it).
        let m = sh.iter().fold(f32::NEG_INFINITY, |m, &x| if m.is_nan() || x.is_nan() { f32::NAN } else { m.max(x) });
        if m == f32::NEG_INFINITY {
            // Nothing selected, or every score −inf: upstream's "lonely" row.
            sh.fill(0.0);
            lse[h] = f32::INFINITY;
            continue;
        }
        let mut l = 0f32;
        for x in sh.iter_mut() {
            *x = (*x - m).exp();
            l += *x;
        }
        lse[h] = m + l.ln();
        inv_l[h] = 1.0 / l;
    }
    out.fill(0.0);
    for (j, row) in rows.chunks_exact(d).enumerate() {
        let v = &row[..HEAD_DIM_V];
        for h in 0..heads {
            let pj = s[h * n + j];
            for (o, &x) in out[h * HEAD_DIM_V..][..HEAD_DIM_V].iter_mut().zip(v) {
                *o += pj * x;
            }
        }
    }
    for h in 0..heads {
        let o = &mut out[h * HEAD_DIM_V..][..HEAD_DIM_V];
        if lse[h] == f32::INFINITY {
            o.fill(0.0);
            continue;
        }
        // exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink − lse)): 0 for sink = +inf, 1 for sink = −inf.
        let sink_factor = sink.map_or(1.0, |s| 1.0 / (1.0 + (s[h] - lse[h]).exp()));
        let f = inv_l[h] * sink_factor;
        o.iter_mut().for_each(|x| *x *= f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_sums_in_a_fixed_order() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.25).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-4);
        assert_eq!(dot(&[], &[]), 0.0);
    }

    #[test]
    fn attend_handles_empty_nan_and_sinks() {
        let d = 512;
        let q = vec![0.01f32; 2 * d];
        // No rows: out 0, lse +inf.
        let r = attend(&q, &[], d, 1.0, Some(&[0.0, f32::INFINITY]));
        assert!(r.out.iter().all(|&x| x == 0.0) && r.lse.iter().all(|&l| l == f32::INFINITY));
        // Two equal rows of ones: out 1, lse = s + ln 2; sink +inf zeroes head 1, sink −inf leaves head 0.
        let rows = vec![1f32; 2 * d];
        let r = attend(&q, &rows, d, 0.5, Some(&[f32::NEG_INFINITY, f32::INFINITY]));
        let s = 0.5 * 0.01 * d as f32;
        assert!((r.lse[0] - (s + 2f32.ln())).abs() < 1e-5);
        assert_eq!(r.lse[0], r.lse[1], "the sink does not change lse");
        assert!(r.out[..d].iter().all(|&x| (x - 1.0).abs() < 1e-6));
        assert!(r.out[d..].iter().all(|&x| x == 0.0));
        // A NaN in a row poisons every head.
        let mut rows = rows;
        rows[3] = f32::NAN;
        let r = attend(&q, &rows, d, 0.5, None);
        assert!(r.lse.iter().all(|l| l.is_nan()) && r.out.iter().all(|x| x.is_nan()));
    }
}
