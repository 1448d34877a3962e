//! The split-KV tile scheduler: the host reference of `get_mla_metadata`.
//!
//! The decode kernel runs `num_sm_parts` "parts" per (64-row M tile, KV head). Every part owns one contiguous
//! range of the flattened work list (request 0's 64-token blocks, then request 1's, …), cut so that the parts cost
//! about the same:
//!
//! ```text
//! cost(request) = max(1, ceil(s_k / 64)) + FIXED_OVERHEAD_BLOCKS        (a zero-length request costs 1 block)
//! payload       = ceil(Σ cost / num_sm_parts) + FIXED_OVERHEAD_BLOCKS   (the most one part may take)
//! ```
//!
//! A request cut across several parts has several *splits*; each split writes a float32 partial that the combine
//! step merges. `num_splits` is the exclusive prefix sum of splits per request, so split `k` of request `i` lives
//! in partial row `num_splits[i] + k`. The metadata layout is documented in `docs/scheduler-metadata.md`.

use crate::error::{Error, Result};

/// Tokens per scheduler block (the kernel's KV tile).
pub const BLOCK_SIZE_N: usize = 64;
/// Query rows per M tile.
pub const BLOCK_SIZE_M: usize = 64;
/// Per-(request, split) cost in blocks: Q load, pipeline fill, epilogue and combine work.
pub const FIXED_OVERHEAD_BLOCKS: i64 = 5;
/// int32 words per part in `tile_scheduler_metadata`.
pub const METADATA_WORDS: usize = 8;

/// Number of scheduler parts: `max(1, sm_count / h_kv / ceil(q_seq_per_hk / 64))`.
///
/// `q_seq_per_hk = s_q · h_q / h_kv` is the number of query rows that share one KV head.
pub fn num_sm_parts(sm_count: usize, q_seq_per_hk: usize, h_kv: usize) -> usize {
    let m_blocks = q_seq_per_hk.div_ceil(BLOCK_SIZE_M).max(1);
    (sm_count / h_kv.max(1) / m_blocks).max(1)
}

/// One row of `tile_scheduler_metadata`: the work range of one part.
///
/// A part with no work has `begin_req > end_req` (`begin_req == batch`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartMetadata {
    /// First request (inclusive).
    pub begin_req: i32,
    /// Last request (inclusive).
    pub end_req: i32,
    /// First block of `begin_req` that this part processes.
    pub begin_block: i32,
    /// One past the last block of `end_req` that this part processes (0 for a zero-length request).
    pub end_block: i32,
    /// Split ordinal of `begin_req` inside this part.
    pub begin_split: i32,
    /// 1 if `begin_req` has more than one split.
    pub is_first_req_split: i32,
    /// 1 if `end_req` has more than one split.
    pub is_last_req_split: i32,
    /// Always 0 (keeps rows 32-byte aligned).
    pub pad: i32,
}

impl PartMetadata {
    /// The row as 8 int32 words, in memory order.
    pub fn to_words(self) -> [i32; METADATA_WORDS] {
        [
            self.begin_req,
            self.end_req,
            self.begin_block,
            self.end_block,
            self.begin_split,
            self.is_first_req_split,
            self.is_last_req_split,
            self.pad,
        ]
    }

    /// Reads a row back from 8 words.
    pub fn from_words(w: [i32; METADATA_WORDS]) -> Self {
        PartMetadata {
            begin_req: w[0],
            end_req: w[1],
            begin_block: w[2],
            end_block: w[3],
            begin_split: w[4],
            is_first_req_split: w[5],
            is_last_req_split: w[6],
            pad: w[7],
        }
    }

    /// True if this part has nothing to do.
    pub fn is_empty(&self) -> bool {
        self.begin_req > self.end_req
    }
}

/// The scheduler's output for one decoding step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulePlan {
    /// One row per part.
    pub parts: Vec<PartMetadata>,
    /// `[b + 1]`: exclusive prefix sum of splits per request.
    pub num_splits: Vec<i32>,
}

impl SchedulePlan {
    /// Number of parts.
    pub fn num_sm_parts(&self) -> usize {
        self.parts.len()
    }

    /// Total number of splits (= partial rows used).
    pub fn total_splits(&self) -> usize {
        *self.num_splits.last().unwrap_or(&0) as usize
    }

    /// Writes the metadata words and `num_splits` into caller buffers of exactly the right lengths.
    pub fn write_into(&self, metadata: &mut [i32], num_splits: &mut [i32]) -> Result<()> {
        let want = self.parts.len() * METADATA_WORDS;
        if metadata.len() != want {
            return Err(Error::invalid("tile_scheduler_metadata", format!("{want} int32"), metadata.len()));
        }
        if num_splits.len() != self.num_splits.len() {
            return Err(Error::invalid("num_splits", format!("{} int32", self.num_splits.len()), num_splits.len()));
        }
        for (row, part) in metadata.chunks_exact_mut(METADATA_WORDS).zip(&self.parts) {
            row.copy_from_slice(&part.to_words());
        }
        num_splits.copy_from_slice(&self.num_splits);
        Ok(())
    }
}

/// Blocks a request really has: `ceil(s_k / 64)`.
pub fn data_blocks(seqlen: i32) -> i64 {
    (seqlen.max(0) as u64).div_ceil(BLOCK_SIZE_N as u64) as i64
}

/// Blocks a request is charged: a zero-length request counts as one.
pub fn cost_blocks(seqlen: i32) -> i64 {
    data_blocks(seqlen).max(1)
}

/// Runs the scheduler on host-resident sequence lengths.
///
/// Errors if `seqlens` is empty, holds a negative length, or `num_sm_parts` is 0.
pub fn plan(seqlens: &[i32], num_sm_parts: usize) -> Result<SchedulePlan> {
    let b = seqlens.len();
    if b == 0 {
        return Err(Error::invalid("cache_seqlens.shape[0]", "batch size >= 1", 0));
    }
    if b >= i32::MAX as usize {
        return Err(Error::invalid("cache_seqlens.shape[0]", format!("batch size < {}", i32::MAX), b));
    }
    if num_sm_parts == 0 {
        return Err(Error::invalid("num_sm_parts", ">= 1", 0));
    }
    if let Some((i, &s)) = seqlens.iter().enumerate().find(|(_, s)| **s < 0) {
        return Err(Error::invalid(format!("cache_seqlens[{i}]"), "a length >= 0", s));
    }
    let fo = FIXED_OVERHEAD_BLOCKS;
    let cost: Vec<i64> = seqlens.iter().map(|&s| cost_blocks(s)).collect();
    let total: i64 = cost.iter().map(|c| c + fo).sum();
    let payload = (total as u64).div_ceil(num_sm_parts as u64) as i64 + fo;

    let mut num_splits = vec![0i32; b + 1];
    let mut raw = Vec::with_capacity(num_sm_parts);
    let (mut idx, mut blk, mut split, mut cum) = (0usize, 0i64, 0i64, 0i64);
    for _ in 0..num_sm_parts {
        let begin = (idx, blk, split);
        let mut rem = payload;
        while idx < b {
            let need = cost[idx] - blk + fo;
            if rem >= need {
                cum += split + 1;
                num_splits[idx + 1] = cum as i32;
                rem -= need;
                idx += 1;
                blk = 0;
                split = 0;
            } else {
                if rem - fo > 0 {
                    blk += rem - fo;
                    split += 1;
                }
                break;
            }
        }
        let end = if blk > 0 {
            (idx, blk)
        } else if idx > 0 {
            (idx - 1, data_blocks(seqlens[idx - 1]))
        } else {
            (0, 0)
        };
        raw.push((begin, end));
    }
    if idx != b || blk != 0 || split != 0 {
        return Err(Error::backend("scheduler", format!("internal: schedule ended at request {idx} block {blk}")));
    }
    let is_split = |r: usize| num_splits[r + 1] - num_splits[r] > 1;
    let parts = raw
        .into_iter()
        .map(|((bi, bb, bs), (ei, eb))| {
            if bi >= b {
                return PartMetadata { begin_req: b as i32, end_req: b as i32 - 1, ..Default::default() };
            }
            PartMetadata {
                begin_req: bi as i32,
                end_req: ei as i32,
                begin_block: bb as i32,
                end_block: eb as i32,
                begin_split: bs as i32,
                is_first_req_split: is_split(bi) as i32,
                is_last_req_split: is_split(ei) as i32,
                pad: 0,
            }
        })
        .collect();
    Ok(SchedulePlan { parts, num_splits })
}

/// One contiguous piece of work: blocks `[begin_block, end_block)` of request `req`, written to partial row
/// `split_row` when `is_split`, else straight to `out`/`lse`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkItem {
    /// Request index.
    pub req: usize,
    /// First block (inclusive).
    pub begin_block: usize,
    /// Last block (exclusive).
    pub end_block: usize,
    /// True if the request has more than one split.
    pub is_split: bool,
    /// Partial row (`num_splits[req] + split ordinal`); meaningful when `is_split`.
    pub split_row: usize,
}

/// Expands one metadata row into the work items its part processes, in order. This is the walk every backend's
/// kernel does; the CPU backend uses it directly.
pub fn part_work(part: &PartMetadata, seqlens: &[i32], num_splits: &[i32]) -> Vec<WorkItem> {
    let mut items = Vec::new();
    if part.is_empty() {
        return items;
    }
    for req in part.begin_req as usize..=part.end_req as usize {
        let first = req == part.begin_req as usize;
        let last = req == part.end_req as usize;
        let begin_block = if first { part.begin_block as usize } else { 0 };
        let end_block = if last { part.end_block as usize } else { data_blocks(seqlens[req]) as usize };
        let split_ord = if first { part.begin_split as usize } else { 0 };
        let n = (num_splits[req + 1] - num_splits[req]) as usize;
        items.push(WorkItem {
            req,
            begin_block,
            end_block,
            is_split: n > 1,
            split_row: num_splits[req] as usize + split_ord,
        });
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(plan: &SchedulePlan) -> String {
        let rows: Vec<String> = plan.parts.iter().map(|p| format!("{:?}", p.to_words())).collect();
        format!(
            "num_sm_parts: {}\nmetadata:\n  {}\nnum_splits: {:?}\n",
            plan.parts.len(),
            rows.join("\n  "),
            plan.num_splits
        )
    }

    #[test]
    fn num_sm_parts_formula() {
        assert_eq!(num_sm_parts(132, 64, 1), 132);
        assert_eq!(num_sm_parts(132, 128, 1), 66);
        assert_eq!(num_sm_parts(132, 192, 1), 44);
        assert_eq!(num_sm_parts(132, 256, 1), 33);
        // The case that divides by zero upstream before the clamp: s_q=1024, h_q=16, h_kv=8.
        assert_eq!(num_sm_parts(132, 1024 * 16 / 8, 8), 1);
    }

    #[test]
    fn worked_example_from_the_notes() {
        // The worked example of docs/scheduler-metadata.md (P = 4, block units, zero length counted as one block).
        let plan = plan(&[1000, 64, 0, 3000, 130], 4).unwrap();
        assert_eq!(plan.num_splits, vec![0, 1, 2, 3, 6, 7]);
        insta::assert_snapshot!("notes_example_p4", json(&plan));
    }

    #[test]
    fn realistic_examples() {
        insta::assert_snapshot!("uniform_8192_h128", json(&plan(&[8192; 128], 66).unwrap()));
        insta::assert_snapshot!("cli_example_p132", json(&plan(&[1000, 64, 0, 3000, 130], 132).unwrap()));
        insta::assert_snapshot!("all_zero", json(&plan(&[0, 0, 0], 2).unwrap()));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(plan(&[], 4).is_err());
        let e = plan(&[5, -1], 4).unwrap_err();
        assert!(e.to_string().contains("cache_seqlens[1]"), "{e}");
        assert!(plan(&[5], 0).is_err());
    }
}
