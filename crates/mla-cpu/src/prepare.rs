//! Everything the CPU backend checks and reads on the host before it writes a single output byte.
//!
//! | input | check | error names |
//! |---|---|---|
//! | descriptors, workspace size and device | [`mla_core::MlaBackend::decode`] (once, before this) | the argument |
//! | `cache_seqlens[i]` | `>= 0`, and `ceil(s_k / page_size) <= max_blocks_per_seq` | `cache_seqlens[i]` |
//! | `block_table[i][p]`, `p < ceil(s_k / page_size)` | in `[0, num_blocks)`; entries past the last page are never read | `block_table[i][p]` |
//! | `descale_q/k` | finite | `descale_q` / `descale_k` |
//! | `num_splits` | `[0] = 0`, each request ≥ 1 split, total ≤ workspace rows | `num_splits[i]` |
//! | `tile_scheduler_metadata` | fields in range; the parts cover every request's blocks exactly once, in order, each split once | `tile_scheduler_metadata[p]` |
//! | workspace | 4-byte aligned | `workspace.ptr` |
//!
//! The coverage check is what makes the parallel writes sound: every output row and every partial row is written
//! by exactly one work unit.

use mla_core::scheduler::{self, PartMetadata, WorkItem, data_blocks};
use mla_core::{DecodeArgs, DecodeProblem, Error, Result, TensorDesc, Workspace, WorkspaceLayout};

/// Host copies of the small index tensors, validated.
pub(crate) struct Prepared {
    /// Per request: its length.
    pub seqlens: Vec<i32>,
    /// Per request: the page of each of its `ceil(s_k / page_size)` page slots (all in range).
    pub pages: Vec<Vec<u32>>,
    /// The work items of every part, in part order.
    pub items: Vec<WorkItem>,
    /// `num_splits` as read.
    pub num_splits: Vec<i32>,
    /// `descale_q`, `descale_k` (1.0 unless e4m3).
    pub descale: (f32, f32),
    /// Where partials go.
    pub layout: WorkspaceLayout,
}

/// Reads element `idx` of an i32 host tensor with strides.
///
/// # Safety
/// `t` describes live host memory and `idx` lies inside its shape.
unsafe fn read_i32(t: &TensorDesc, idx: &[usize]) -> i32 {
    let off: i64 = idx.iter().zip(t.stride_slice()).map(|(&i, &s)| i as i64 * s).sum();
    // SAFETY: inside the validated extent (caller's contract).
    unsafe { *(t.data() as *const i32).offset(off as isize) }
}

fn read_scale(name: &str, t: &Option<TensorDesc>) -> Result<f32> {
    let Some(t) = t else { return Ok(1.0) };
    // SAFETY: validate_decode checked a [1] f32 host tensor with a non-null pointer.
    let v = unsafe { *(t.data() as *const f32) };
    if !v.is_finite() {
        return Err(Error::invalid(name, "a finite value", v));
    }
    Ok(v)
}

/// Validates and reads everything the kernels need.
pub(crate) fn prepare(args: &DecodeArgs, prob: &DecodeProblem, ws: Workspace) -> Result<Prepared> {
    let b = prob.shape.batch;
    let ps = prob.page_size;

    // Every read below: validate_decode checked dtype, shape, strides and non-null host memory of the tensor, and
    // the indices stay inside the validated shapes.
    let seqlens: Vec<i32> = (0..b)
        // SAFETY: i < b = cache_seqlens.shape[0].
        .map(|i| unsafe { read_i32(&args.cache_seqlens, &[i]) })
        .collect();
    let mut pages = Vec::with_capacity(b);
    for (i, &s) in seqlens.iter().enumerate() {
        if s < 0 {
            return Err(Error::invalid(format!("cache_seqlens[{i}]"), "a length >= 0", s));
        }
        let need = (s as usize).div_ceil(ps);
        if need > prob.max_blocks_per_seq {
            return Err(Error::invalid(
                format!("cache_seqlens[{i}]"),
                format!(
                    "a length <= {} (max_blocks_per_seq {} × page_size {ps})",
                    prob.max_blocks_per_seq * ps,
                    prob.max_blocks_per_seq
                ),
                s,
            ));
        }
        let mut row = Vec::with_capacity(need);
        for p in 0..need {
            // SAFETY: p < need <= max_blocks_per_seq.
            let id = unsafe { read_i32(&args.block_table, &[i, p]) };
            if id < 0 || id as usize >= prob.num_blocks {
                return Err(Error::invalid(
                    format!("block_table[{i}][{p}]"),
                    format!("a page id in [0, {}) (page {p} of request {i}, length {s})", prob.num_blocks),
                    id,
                ));
            }
            row.push(id as u32);
        }
        pages.push(row);
    }

    let descale = (read_scale("descale_q", &args.descale_q)?, read_scale("descale_k", &args.descale_k)?);

    // The size, the address and the device of the workspace were checked by `MlaBackend::decode`; the partials
    // are f32, hence the alignment.
    let layout = WorkspaceLayout::new(b, prob.shape.q_seq_per_hk(), prob.shape.h_kv, prob.num_sm_parts)?;
    if !(ws.ptr() as usize).is_multiple_of(std::mem::align_of::<f32>()) {
        return Err(Error::invalid("workspace.ptr", "a 4-byte aligned host pointer", format!("{:p}", ws.ptr())));
    }

    let num_splits: Vec<i32> = (0..=b)
        // SAFETY: [b + 1] contiguous i32, validated.
        .map(|i| unsafe { read_i32(&args.num_splits, &[i]) })
        .collect();
    if num_splits[0] != 0 {
        return Err(Error::invalid("num_splits[0]", 0, num_splits[0]));
    }
    for i in 0..b {
        let n = num_splits[i + 1] as i64 - num_splits[i] as i64;
        if n < 1 {
            return Err(Error::invalid(
                format!("num_splits[{}]", i + 1),
                format!("> num_splits[{i}] = {} (every request has at least one split)", num_splits[i]),
                num_splits[i + 1],
            ));
        }
    }
    if num_splits[b] as usize > layout.rows {
        return Err(Error::invalid(
            format!("num_splits[{b}]"),
            format!("<= {} partial rows (batch + num_sm_parts)", layout.rows),
            num_splits[b],
        ));
    }

    let mut items = Vec::new();
    for p in 0..prob.num_sm_parts {
        let mut w = [0i32; scheduler::METADATA_WORDS];
        for (k, x) in w.iter_mut().enumerate() {
            // SAFETY: [num_sm_parts, 8] contiguous i32, validated.
            *x = unsafe { read_i32(&args.tile_scheduler_metadata, &[p, k]) };
        }
        let part = PartMetadata::from_words(w);
        if part.is_empty() {
            continue;
        }
        let bad = |what: &str| {
            Error::invalid(format!("tile_scheduler_metadata[{p}]"), what.to_string(), format!("{:?}", part.to_words()))
        };
        if part.begin_req < 0 || part.end_req as i64 >= b as i64 {
            return Err(bad(&format!("requests in [0, {b})")));
        }
        if part.begin_block < 0 || part.end_block < 0 || part.begin_split < 0 {
            return Err(bad("non-negative block and split fields"));
        }
        items.extend(scheduler::part_work(&part, &seqlens, &num_splits));
    }

    // Coverage: per request, its items (in part order) tile [0, data_blocks) and number its splits 0, 1, 2, …
    let mut next_block = vec![0usize; b];
    let mut seen = vec![0usize; b];
    for it in &items {
        let i = it.req;
        let n = (num_splits[i + 1] - num_splits[i]) as usize;
        let want_row = num_splits[i] as usize + seen[i];
        let err = |what: String| Error::invalid("tile_scheduler_metadata", what, format!("{it:?}"));
        if it.begin_block != next_block[i] || it.end_block < it.begin_block {
            return Err(err(format!("request {i}'s next work to start at block {}", next_block[i])));
        }
        if it.end_block as i64 > data_blocks(seqlens[i]) {
            return Err(err(format!("request {i}'s blocks to end by {}", data_blocks(seqlens[i]))));
        }
        if seen[i] >= n || (n > 1 && it.split_row != want_row) {
            return Err(err(format!("request {i}'s split {} of {n} (partial row {want_row})", seen[i])));
        }
        next_block[i] = it.end_block;
        seen[i] += 1;
    }
    for i in 0..b {
        let n = (num_splits[i + 1] - num_splits[i]) as usize;
        if seen[i] != n || next_block[i] as i64 != data_blocks(seqlens[i]) {
            return Err(Error::invalid(
                "tile_scheduler_metadata",
                format!("request {i} covered by {n} split(s) up to block {}", data_blocks(seqlens[i])),
                format!("{} split(s) up to block {}", seen[i], next_block[i]),
            ));
        }
    }

    Ok(Prepared { seqlens, pages, items, num_splits, descale, layout })
}
