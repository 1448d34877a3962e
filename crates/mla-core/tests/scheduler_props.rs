//! Property tests of the host scheduler on random batches: coverage, prefix sums, load bound.

use mla_core::scheduler::{self, FIXED_OVERHEAD_BLOCKS, PartMetadata, cost_blocks, data_blocks, part_work};

/// xorshift64*: small, seeded, good enough to draw test cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Checks every invariant of a plan and returns the number of splits.
fn check(seqlens: &[i32], parts: usize) {
    let plan = scheduler::plan(seqlens, parts).unwrap();
    let b = seqlens.len();
    assert_eq!(plan.parts.len(), parts);
    assert_eq!(plan.num_splits.len(), b + 1);
    assert_eq!(plan.num_splits[0], 0);

    // Prefix sums: every request has >= 1 split; total <= b + parts - 1.
    for i in 0..b {
        assert!(plan.num_splits[i + 1] > plan.num_splits[i], "request {i} has no split");
    }
    assert!(plan.total_splits() < b + parts, "{} splits for b={b} P={parts}", plan.total_splits());

    let total: i64 = seqlens.iter().map(|&s| cost_blocks(s) + FIXED_OVERHEAD_BLOCKS).sum();
    let payload = (total as u64).div_ceil(parts as u64) as i64 + FIXED_OVERHEAD_BLOCKS;

    // Coverage: walking the parts in order visits each request's blocks exactly once, in order, and each split
    // row exactly once.
    let mut next_block = vec![0usize; b];
    let mut splits_seen = vec![0usize; b];
    let mut rows_seen = vec![false; plan.total_splits()];
    let mut prev_end: Option<(i32, i32)> = None;
    for part in &plan.parts {
        if part.is_empty() {
            assert_eq!(*part, PartMetadata { begin_req: b as i32, end_req: b as i32 - 1, ..Default::default() });
            continue;
        }
        assert_eq!(part.pad, 0);
        let mut cost = 0i64;
        for w in part_work(part, seqlens, &plan.num_splits) {
            assert_eq!(w.begin_block, next_block[w.req], "request {} resumes at the wrong block", w.req);
            assert!(w.end_block >= w.begin_block);
            assert!(w.end_block as i64 <= data_blocks(seqlens[w.req]));
            next_block[w.req] = w.end_block;
            let n = (plan.num_splits[w.req + 1] - plan.num_splits[w.req]) as usize;
            assert_eq!(w.is_split, n > 1);
            assert_eq!(w.split_row, plan.num_splits[w.req] as usize + splits_seen[w.req]);
            assert!(!rows_seen[w.split_row], "split row {} used twice", w.split_row);
            rows_seen[w.split_row] = true;
            splits_seen[w.req] += 1;
            cost += (w.end_block - w.begin_block).max(if seqlens[w.req] == 0 { 1 } else { 0 }) as i64
                + FIXED_OVERHEAD_BLOCKS;
        }
        assert!(cost <= payload, "part cost {cost} exceeds payload {payload}");
        let first = plan.num_splits[part.begin_req as usize + 1] - plan.num_splits[part.begin_req as usize] > 1;
        let last = plan.num_splits[part.end_req as usize + 1] - plan.num_splits[part.end_req as usize] > 1;
        assert_eq!(part.is_first_req_split, first as i32);
        assert_eq!(part.is_last_req_split, last as i32);
        if let Some(prev) = prev_end {
            assert!((part.begin_req, part.begin_block) >= prev, "parts out of order");
        }
        prev_end = Some((part.end_req, part.end_block));
    }
    for i in 0..b {
        assert_eq!(next_block[i] as i64, data_blocks(seqlens[i]), "request {i} not fully covered");
        assert_eq!(splits_seen[i] as i32, plan.num_splits[i + 1] - plan.num_splits[i]);
    }
    assert!(rows_seen.iter().all(|&x| x));
}

#[test]
fn random_batches_satisfy_every_invariant() {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    for case in 0..400 {
        let b = match case % 4 {
            0 => 1 + rng.below(8) as usize,
            1 => 1 + rng.below(200) as usize,
            2 => 1 + rng.below(2000) as usize,
            _ => 1 + rng.below(16384) as usize,
        };
        let max_len = [64u64, 5000, 100_000, 1_000_001][(case / 4) % 4];
        let zero_frac = rng.below(4);
        let seqlens: Vec<i32> =
            (0..b).map(|_| if rng.below(8) < zero_frac { 0 } else { rng.below(max_len) as i32 }).collect();
        let parts = 1 + rng.below(300) as usize;
        check(&seqlens, parts);
    }
}

#[test]
fn edge_shapes() {
    check(&[0], 1);
    check(&[0], 132);
    check(&[1_000_000], 132);
    check(&[1_000_000; 16384], 132);
    check(&[64, 65, 63, 1, 0, 128, 129], 3);
    check(&vec![0; 16384], 7);
}
