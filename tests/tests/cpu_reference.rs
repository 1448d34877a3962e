//! The CPU backend against the independent float64 reference, on randomized cases that cover every semantic rule
//! of issue 3: dtypes (e4m3 with non-unit descales), h_kv ∈ {1, 2, 3, 8} with odd h_q, page sizes 1/16/64/128 and
//! odd ones, causal s_q ∈ {2, 3, 4} including rows that see nothing, zero lengths, NaN-poisoned cache tails and
//! unreferenced pages, permuted block tables with garbage past the end, strided caches, and long requests that the
//! scheduler splits (so the workspace partials and the combine are checked too).

use mla_core::DType;
use mla_cpu::CpuBackend;
use mla_testkit::{Case, Problem, Rng, check_against_reference, run_host};

fn check(case: &Case) {
    let be = CpuBackend::new();
    let p = Problem::generate(case);
    let got = run_host(&be, &p).unwrap_or_else(|e| panic!("{case:?}: {e}"));
    if let Err(e) = check_against_reference(&p, &got) {
        panic!("{e}\ncase: {case:?}");
    }
}

/// Random lengths: about a quarter zero, the rest in [1, max].
fn lengths(rng: &mut Rng, b: usize, max: usize) -> Vec<i32> {
    (0..b).map(|_| if rng.below(4) == 0 { 0 } else { 1 + rng.below(max) as i32 }).collect()
}

#[test]
fn every_dtype_and_head_grouping() {
    let mut rng = Rng::new(11);
    for dtype in DType::ALL {
        for (h_q, h_kv) in [(1, 1), (7, 1), (16, 1), (6, 2), (9, 3), (8, 8), (24, 8)] {
            let mut c = Case::new(&lengths(&mut rng, 3, 200), 1, h_q);
            c.h_kv = h_kv;
            c.dtype = dtype;
            c.seed = rng.next_u64();
            if dtype == DType::E4M3 {
                c.descale_q = 0.0125;
                c.descale_k = 0.004;
            }
            check(&c);
        }
    }
}

#[test]
fn page_sizes() {
    let mut rng = Rng::new(12);
    for page_size in [1, 16, 64, 128, 5, 100] {
        let mut c = Case::new(&lengths(&mut rng, 4, 300), 1, 4);
        c.page_size = page_size;
        c.h_kv = 2;
        c.seed = rng.next_u64();
        check(&c);
    }
}

#[test]
fn causal_multi_token_queries() {
    let mut rng = Rng::new(13);
    for s_q in [2, 3, 4] {
        for dtype in DType::ALL {
            // Include lengths below s_q (rows that see nothing) and exactly s_q.
            let mut lens = lengths(&mut rng, 4, 150);
            lens[0] = (s_q - 1) as i32;
            lens[1] = s_q as i32;
            let mut c = Case::new(&lens, s_q, 3);
            c.causal = true;
            c.dtype = dtype;
            c.h_kv = if s_q == 3 { 3 } else { 1 };
            c.page_size = [16, 64, 1][s_q - 2];
            c.seed = rng.next_u64();
            if dtype == DType::E4M3 {
                c.descale_q = 0.5;
                c.descale_k = 0.0078125;
            }
            check(&c);
            // The same problem without the mask.
            c.causal = false;
            check(&c);
        }
    }
}

#[test]
fn zero_lengths_everywhere() {
    let mut c = Case::new(&[0, 0, 0], 2, 4);
    c.causal = true;
    check(&c);
    let mut c = Case::new(&[0, 77, 0, 1], 1, 5);
    c.dtype = DType::F16;
    check(&c);
}

#[test]
fn long_requests_are_split_and_combined() {
    // One long request among short ones: the scheduler cuts it into several splits.
    for dtype in DType::ALL {
        let mut c = Case::new(&[3000, 40, 0, 700], 2, 8);
        c.causal = true;
        c.dtype = dtype;
        c.h_kv = 2;
        c.page_size = 32;
        c.seed = 99;
        if dtype == DType::E4M3 {
            c.descale_q = 0.02;
            c.descale_k = 0.003;
        }
        let be = CpuBackend::new();
        let p = Problem::generate(&c);
        let got = run_host(&be, &p).unwrap();
        let splits = &got.metadata.1;
        assert!(splits[1] - splits[0] > 1, "request 0 was not split: num_splits {splits:?}");
        check_against_reference(&p, &got).unwrap_or_else(|e| panic!("{e}\ncase {c:?}"));
    }
}

#[test]
fn peaky_softmax_and_explicit_scale() {
    // Large scores make the running max move between blocks (rescaling) and underflow most probabilities.
    let mut c = Case::new(&[500, 129, 64], 1, 4);
    c.spread = 1.0;
    c.softmax_scale = Some(0.3);
    check(&c);
    c.dtype = DType::E4M3;
    c.descale_q = 0.01;
    c.descale_k = 0.01;
    check(&c);
}

#[test]
fn strided_cache_rows() {
    let mut c = Case::new(&[130, 5], 2, 6);
    c.h_kv = 3;
    c.row_pad = 40;
    c.page_size = 16;
    c.causal = true;
    check(&c);
}

#[test]
fn randomized_sweep() {
    let mut rng = Rng::new(2026);
    for _ in 0..12 {
        let h_kv = [1, 2, 3, 8][rng.below(4)];
        let h_q = h_kv * (1 + rng.below(4));
        let s_q = 1 + rng.below(4);
        let b = 1 + rng.below(4);
        let mut c = Case::new(&lengths(&mut rng, b, 260), s_q, h_q);
        c.h_kv = h_kv;
        c.dtype = DType::ALL[rng.below(3)];
        c.causal = rng.below(2) == 0;
        c.page_size = [1, 16, 64, 128, 7][rng.below(5)];
        c.seed = rng.next_u64();
        if c.dtype == DType::E4M3 {
            c.descale_q = 0.5f32.powi(rng.below(8) as i32);
            c.descale_k = 0.5f32.powi(rng.below(8) as i32) * 1.5;
        }
        check(&c);
    }
}

#[test]
fn the_check_itself_rejects_small_errors() {
    // Guards the guard: a correct result passes, and a 3-ulp error in one output, a wrong lse or a spurious NaN
    // fail.
    let mut c = Case::new(&[100, 0], 1, 2);
    c.seed = 5;
    let p = Problem::generate(&c);
    let got = run_host(&CpuBackend::new(), &p).unwrap();
    check_against_reference(&p, &got).unwrap();
    let k = got.out.iter().position(|x| x.abs() > 1e-3).expect("a sizeable output");
    let mut bad = got.clone();
    bad.out[k] = half::bf16::from_bits(half::bf16::from_f32(bad.out[k]).to_bits() + 3).to_f32();
    assert!(check_against_reference(&p, &bad).is_err());
    let mut bad = got.clone();
    bad.lse[0] += 1e-3;
    assert!(check_against_reference(&p, &bad).is_err());
    let mut bad = got.clone();
    bad.lse[2] = f32::NAN; // request 1 is empty: +inf expected
    assert!(check_against_reference(&p, &bad).is_err());
}

#[test]
fn upstream_head_counts() {
    // M = s_q·h_q/h_kv up to 256 rows per KV head: every row tile and its remainder (6-row tiles; 12-row e4m3
    // tiles, 256 = 21·12 + 4).
    for (dtype, h_q, s_q) in [(DType::Bf16, 128, 2), (DType::E4M3, 128, 2), (DType::F16, 64, 1)] {
        let mut c = Case::new(&[150, 0, 65], s_q, h_q);
        c.dtype = dtype;
        c.causal = true;
        c.seed = h_q as u64 + s_q as u64;
        if dtype == DType::E4M3 {
            c.descale_q = 0.03;
            c.descale_k = 0.005;
        }
        check(&c);
    }
}
