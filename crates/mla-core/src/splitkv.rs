//! Split-KV partials: workspace sizing and the log-sum-exp merge.
//!
//! Each split of a request writes, per query row, its own normalised output `O_s` (float32, 512 wide) and
//! `lse_s = ln Σ exp(scores)` over its blocks (−inf if it saw nothing). The combine step merges them:
//!
//! ```text
//! M   = max_s lse_s                        (all −inf → the row saw nothing: out = 0, lse = +inf)
//! lse = M + ln Σ_s exp(lse_s − M)
//! out = Σ_s exp(lse_s − lse) · O_s
//! ```
//!
//! Workspace layout (one caller-owned byte buffer, `rows = b + num_sm_parts` ≥ total splits):
//!
//! | region | shape | type | offset |
//! |---|---|---|---|
//! | `lse_accum` | `[rows, h_kv, q_seq_per_hk]` | f32 | 0 |
//! | `o_accum` | `[rows, h_kv, q_seq_per_hk, 512]` | f32 | `lse_accum` bytes rounded up to 256 |

use crate::error::{Error, Result};
use crate::problem::HEAD_DIM_V;

/// Alignment of every workspace region, in bytes.
pub const WORKSPACE_ALIGN: usize = 256;

/// Where the partials live inside the caller's workspace buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkspaceLayout {
    /// Partial rows reserved: `batch + num_sm_parts`.
    pub rows: usize,
    /// Query rows per KV head (`s_q · h_q / h_kv`).
    pub q_seq_per_hk: usize,
    /// KV heads.
    pub h_kv: usize,
    /// Byte offset of `lse_accum`.
    pub lse_offset: usize,
    /// Byte offset of `o_accum`.
    pub o_offset: usize,
    /// Total bytes needed.
    pub total_bytes: usize,
}

impl WorkspaceLayout {
    /// The layout for a problem; errors on size overflow.
    pub fn new(batch: usize, q_seq_per_hk: usize, h_kv: usize, num_sm_parts: usize) -> Result<Self> {
        let overflow = || Error::invalid("workspace size", "a size that fits in usize", "overflow");
        let rows = batch.checked_add(num_sm_parts).ok_or_else(overflow)?;
        let lse_elems = rows.checked_mul(h_kv).and_then(|x| x.checked_mul(q_seq_per_hk)).ok_or_else(overflow)?;
        let lse_bytes = lse_elems.checked_mul(4).ok_or_else(overflow)?;
        let o_offset = lse_bytes.checked_next_multiple_of(WORKSPACE_ALIGN).ok_or_else(overflow)?;
        let o_bytes = lse_elems.checked_mul(HEAD_DIM_V * 4).ok_or_else(overflow)?;
        let total_bytes = o_offset.checked_add(o_bytes).ok_or_else(overflow)?;
        Ok(WorkspaceLayout { rows, q_seq_per_hk, h_kv, lse_offset: 0, o_offset, total_bytes })
    }

    /// Element index of `lse_accum[row, kv_head, r]`.
    pub fn lse_index(&self, row: usize, kv_head: usize, r: usize) -> usize {
        (row * self.h_kv + kv_head) * self.q_seq_per_hk + r
    }

    /// Element index of the first of 512 floats of `o_accum[row, kv_head, r, :]`.
    pub fn o_index(&self, row: usize, kv_head: usize, r: usize) -> usize {
        self.lse_index(row, kv_head, r) * HEAD_DIM_V
    }
}

/// Merges split LSEs: fills `weights[s] = exp(lse_s − lse)` and returns the merged `lse` (natural log).
///
/// If every split is empty (all −inf), the weights are 0 and the result is `+inf`, the marker of a row that saw
/// nothing.
pub fn combine_weights(lse_parts: &[f32], weights: &mut [f32]) -> f32 {
    debug_assert_eq!(lse_parts.len(), weights.len());
    let m = lse_parts.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY || m.is_nan() {
        weights.iter_mut().for_each(|w| *w = 0.0);
        return f32::INFINITY;
    }
    let sum: f32 = lse_parts.iter().map(|&l| (l - m).exp()).sum();
    let lse = m + sum.ln();
    for (w, &l) in weights.iter_mut().zip(lse_parts) {
        *w = (l - lse).exp();
    }
    lse
}

/// Merges `parts` (each `(lse_s, O_s)`) into `out`; returns the merged lse. `out` is zeroed first.
pub fn combine_rows(parts: &[(f32, &[f32])], out: &mut [f32]) -> f32 {
    let lses: Vec<f32> = parts.iter().map(|p| p.0).collect();
    let mut w = vec![0f32; parts.len()];
    let lse = combine_weights(&lses, &mut w);
    out.iter_mut().for_each(|o| *o = 0.0);
    for (wi, (_, o)) in w.iter().zip(parts) {
        if *wi != 0.0 {
            for (acc, &x) in out.iter_mut().zip(o.iter()) {
                *acc += wi * x;
            }
        }
    }
    lse
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned_and_sized() {
        let l = WorkspaceLayout::new(128, 128, 1, 66).unwrap();
        assert_eq!(l.rows, 194);
        assert_eq!(l.o_offset % WORKSPACE_ALIGN, 0);
        assert_eq!(l.total_bytes, l.o_offset + 194 * 128 * 512 * 4);
        assert!(WorkspaceLayout::new(usize::MAX, 2, 1, 1).is_err());
    }

    #[test]
    fn combine_matches_a_direct_softmax() {
        // Two splits over scores [1, 2] and [3]; V rows are one-hot so O is the softmax itself.
        let s: [f64; 3] = [1.0, 2.0, 3.0];
        let l1 = (s[0].exp() + s[1].exp()).ln() as f32;
        let l2 = s[2] as f32;
        let o1 = [(s[0] - l1 as f64).exp() as f32, (s[1] - l1 as f64).exp() as f32, 0.0];
        let o2 = [0.0, 0.0, 1.0];
        let mut out = [9.0f32; 3];
        let lse = combine_rows(&[(l1, &o1), (l2, &o2)], &mut out);
        let want_lse = s.iter().map(|x| x.exp()).sum::<f64>().ln();
        assert!((lse as f64 - want_lse).abs() < 1e-6);
        for (i, o) in out.iter().enumerate() {
            let want = (s[i] - want_lse).exp();
            assert!((*o as f64 - want).abs() < 1e-6, "{i}: {o} vs {want}");
        }
    }

    #[test]
    fn combine_of_empty_splits_is_the_empty_marker() {
        let mut out = [1.0f32; 2];
        let lse = combine_rows(&[(f32::NEG_INFINITY, &[5.0, 5.0]), (f32::NEG_INFINITY, &[1.0, 1.0])], &mut out);
        assert_eq!(lse, f32::INFINITY);
        assert_eq!(out, [0.0, 0.0]);
        // An empty split next to a real one contributes nothing.
        let lse = combine_rows(&[(f32::NEG_INFINITY, &[f32::NAN, 5.0]), (0.5, &[1.0, 2.0])], &mut out);
        assert_eq!(lse, 0.5);
        assert_eq!(out, [1.0, 2.0]);
    }
}
