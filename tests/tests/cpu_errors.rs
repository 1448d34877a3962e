//! Errors of the CPU backend: every bad input is an `InvalidArgument` naming the culprit, nothing is written to
//! `out`/`lse` when a call fails, and entries that must never be read (block table past a request's last page)
//! do not matter.

use mla_core::MlaBackend;
use mla_cpu::CpuBackend;
use mla_testkit::{Buffers, Case, Problem, UNUSED_PAGE};

fn setup() -> (CpuBackend, Problem, Buffers) {
    let mut c = Case::new(&[150, 0, 700, 64], 1, 4);
    c.page_size = 16;
    let be = CpuBackend::new();
    let p = Problem::generate(&c);
    let bufs = Buffers::new(&be, &p).unwrap();
    (be, p, bufs)
}

fn expect_err(be: &dyn MlaBackend, p: &Problem, bufs: &mut Buffers, needle: &str) {
    let e = bufs.decode(be, p).expect_err("decode should fail");
    assert!(e.is_invalid_argument(), "{e}");
    assert!(e.to_string().contains(needle), "error `{e}` should name `{needle}`");
    assert!(bufs.untouched(), "out/lse were written although the call failed ({e})");
}

#[test]
fn out_of_range_page_ids_that_are_read() {
    let (be, p, mut bufs) = setup();
    let m = p.max_blocks_per_seq;
    // Request 2 (length 700, page 16) reads pages 0..44; corrupt page 43, then a negative one.
    bufs.block_table[2 * m + 43] = p.num_blocks as i32;
    expect_err(&be, &p, &mut bufs, "block_table[2][43]");
    bufs.block_table[2 * m + 43] = -5;
    expect_err(&be, &p, &mut bufs, "block_table[2][43]");
}

#[test]
fn entries_past_the_last_page_are_never_read() {
    let (be, p, mut bufs) = setup();
    let m = p.max_blocks_per_seq;
    for i in 0..4 {
        let used = (p.case.seqlens[i] as usize).div_ceil(16);
        for e in &mut bufs.block_table[i * m + used..(i + 1) * m] {
            *e = UNUSED_PAGE;
        }
    }
    bufs.decode(&be, &p).unwrap();
    assert!(!bufs.untouched());
}

#[test]
fn lengths_beyond_the_block_table_and_negative() {
    let (be, p, mut bufs) = setup();
    bufs.seqlens[3] = (p.max_blocks_per_seq * 16 + 1) as i32;
    expect_err(&be, &p, &mut bufs, "cache_seqlens[3]");
    bufs.seqlens[3] = -1;
    expect_err(&be, &p, &mut bufs, "cache_seqlens[3]");
}

#[test]
fn corrupt_metadata() {
    let (be, p, bufs0) = setup();
    // Every single-word corruption of a real row is rejected (or, if harmless, gives the right answer).
    let mut rejected = 0;
    // The first 12 parts hold all the work of this problem and some empty parts.
    for w in 0..bufs0.metadata.len().min(12 * 8) {
        for delta in [1, -1, 1000, i32::MIN / 2] {
            let mut bufs = Buffers::new(&be, &p).unwrap();
            bufs.metadata[w] = bufs.metadata[w].wrapping_add(delta);
            match bufs.decode(&be, &p) {
                Err(e) => {
                    assert!(e.to_string().contains("tile_scheduler_metadata"), "{e}");
                    assert!(bufs.untouched());
                    rejected += 1;
                }
                Ok(()) => {
                    // Only the padding word or unused fields of an empty part may change without consequence.
                    let mut good = Buffers::new(&be, &p).unwrap();
                    good.decode(&be, &p).unwrap();
                    assert!(bufs.outputs(&p).bitwise_eq(&good.outputs(&p)), "word {w} += {delta} changed the result");
                }
            }
        }
    }
    assert!(rejected > 0);
    // num_splits must be a prefix sum with at least one split per request, within the workspace rows.
    let mut bufs = Buffers::new(&be, &p).unwrap();
    bufs.num_splits[2] = bufs.num_splits[1];
    expect_err(&be, &p, &mut bufs, "num_splits");
    let mut bufs = Buffers::new(&be, &p).unwrap();
    bufs.num_splits[0] = 1;
    expect_err(&be, &p, &mut bufs, "num_splits[0]");
    let mut bufs = Buffers::new(&be, &p).unwrap();
    *bufs.num_splits.last_mut().unwrap() = 1 << 20;
    expect_err(&be, &p, &mut bufs, "num_splits[4]");
}

#[test]
fn short_or_missing_workspace() {
    let (be, p, mut bufs) = setup();
    bufs.workspace_bytes -= 4;
    expect_err(&be, &p, &mut bufs, "workspace");
    bufs.workspace_bytes = 0;
    expect_err(&be, &p, &mut bufs, "workspace");
}

#[test]
fn non_finite_descale() {
    let mut c = Case::new(&[10], 1, 2);
    c.dtype = mla_core::DType::E4M3;
    c.descale_k = f32::NAN;
    let be = CpuBackend::new();
    let p = Problem::generate(&c);
    let mut bufs = Buffers::new(&be, &p).unwrap();
    expect_err(&be, &p, &mut bufs, "descale_k");
}
