//! The CPU backend's decode over FP8 caches against an independent float64 reference (issue 14): both layouts,
//! sparse selections with invalid entries (−1, other negatives, past the cache), duplicates, `topk_length`
//! (including 0, and NaN tokens behind every entry past it), all-invalid rows, `attn_sink` with ±inf, an extra cache
//! with its own page size and lengths; dense decode over a V3.2 cache, causal or not; and the identities that pin
//! the semantics down exactly (duplicates count twice, sinks of ±inf, dense = sparse over the whole context).
//!
//! The reference reads the caches' bytes with its own decoding, written from the layout tables of
//! docs/sparse-fp8.md (no mla-core dequantisation), and follows upstream's `ref_sparse_attn_decode` in f64.

use mla_core::{Fp8Cache, Fp8Layout, HEAD_DIM_V};
use mla_cpu::CpuBackend;
use mla_cpu::fp8problem::{ExtraSpec, Fp8HostMode, Fp8HostProblem, Fp8HostRun, Fp8RandomSpec, SparseSpec};
use mla_cpu::problem::HostOutputs;
use mla_testkit::{Rng, Tol, check_close, decode_f64, round_to_out};

use mla_core::DType;

/// Token `index` of `cache`, decoded from its bytes in f64 (the layout tables, written out again).
fn token_f64(cache: &Fp8Cache, index: usize) -> Vec<f64> {
    let ps = cache.page_size;
    let block = &cache.bytes[index / ps * cache.block_stride..];
    let t = index % ps;
    let e4m3 = |b: u8| decode_f64(DType::E4M3, b as u32);
    let bf16 = |lo: u8, hi: u8| decode_f64(DType::Bf16, u16::from_le_bytes([lo, hi]) as u32);
    let pow2 = |s: f64| {
        // The quantiser only writes powers of two, so e4m3 · scale is exact and needs no rounding to bf16.
        assert!(s.is_nan() || s == 2f64.powi(s.log2().round() as i32), "scale {s} is not a power of two");
        s
    };
    match cache.layout {
        Fp8Layout::V32 => {
            let rec = &block[t * 656..][..656];
            let scale = |k: usize| pow2(f32::from_le_bytes(rec[512 + 4 * k..][..4].try_into().unwrap()) as f64);
            let mut row: Vec<f64> = (0..512).map(|c| e4m3(rec[c]) * scale(c / 128)).collect();
            row.extend((0..64).map(|c| bf16(rec[528 + 2 * c], rec[529 + 2 * c])));
            row
        }
        Fp8Layout::Model1 => {
            let rec = &block[t * 576..][..576];
            let scales = &block[ps * 576 + t * 8..][..7];
            let scale = |k: usize| if scales[k] == 0xFF { f64::NAN } else { 2f64.powi(scales[k] as i32 - 127) };
            let mut row: Vec<f64> = (0..448).map(|c| e4m3(rec[c]) * scale(c / 64)).collect();
            row.extend((0..64).map(|c| bf16(rec[448 + 2 * c], rec[449 + 2 * c])));
            row
        }
    }
}

/// The float64 reference: `out [b, s_q, h_q, 512]` (rounded to bf16) and `lse [b, h_q, s_q]`.
fn reference(p: &Fp8HostProblem) -> (Vec<f64>, Vec<f64>) {
    let (b, s_q, h_q, d) = (p.batch, p.s_q, p.h_q, p.layout.head_dim_k());
    let scale = p.softmax_scale.map_or(1.0 / (d as f64).sqrt(), |s| s as f64);
    let mut out = vec![0f64; b * s_q * h_q * HEAD_DIM_V];
    let mut lse = vec![0f64; b * h_q * s_q];
    for i in 0..b {
        for t in 0..s_q {
            // The K rows this query token attends to, in order.
            let mut rows: Vec<Vec<f64>> = Vec::new();
            let mut sink = None;
            match &p.mode {
                Fp8HostMode::Sparse { main, extra, attn_sink } => {
                    for sel in std::iter::once(main).chain(extra) {
                        let len = sel.topk_length.as_ref().map_or(sel.topk, |l| l[i] as usize);
                        let num_tokens = (sel.cache.num_blocks * sel.cache.page_size) as i64;
                        for k in 0..len {
                            let index = sel.indices[(i * s_q + t) * sel.topk + k] as i64;
                            if (0..num_tokens).contains(&index) {
                                rows.push(token_f64(&sel.cache, index as usize));
                            }
                        }
                    }
                    sink = attn_sink.clone();
                }
                Fp8HostMode::Dense { cache, block_table, max_blocks_per_seq, seqlens, causal } => {
                    let s_k = seqlens[i] as usize;
                    let visible = if *causal { (s_k + t + 1).saturating_sub(s_q).min(s_k) } else { s_k };
                    let ps = cache.page_size;
                    for j in 0..visible {
                        let page = block_table[i * max_blocks_per_seq + j / ps] as usize;
                        rows.push(token_f64(cache, page * ps + j % ps));
                    }
                }
            }
            for h in 0..h_q {
                let s: Vec<f64> = rows
                    .iter()
                    .map(|r| scale * (0..d).map(|c| p.q_at(i, t, h, c) as f64 * r[c]).sum::<f64>())
                    .collect();
                let o = &mut out[((i * s_q + t) * h_q + h) * HEAD_DIM_V..][..HEAD_DIM_V];
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let l_at = (i * h_q + h) * s_q + t;
                if m == f64::NEG_INFINITY {
                    lse[l_at] = f64::INFINITY;
                    continue;
                }
                let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let row_lse = m + l.ln();
                let factor = sink.as_ref().map_or(1.0, |sk| 1.0 / (1.0 + (sk[h] as f64 - row_lse).exp()));
                for (r, x) in rows.iter().zip(&s) {
                    let w = (x - m).exp() / l * factor;
                    for (oc, v) in o.iter_mut().zip(r) {
                        *oc += w * v;
                    }
                }
                lse[l_at] = row_lse;
            }
        }
    }
    (out.into_iter().map(|x| round_to_out(DType::Bf16, x)).collect(), lse)
}

fn run(p: &Fp8HostProblem, threads: usize) -> HostOutputs {
    let be = CpuBackend::with_threads(threads).unwrap();
    let mut r = Fp8HostRun::new(&be, p).unwrap_or_else(|e| panic!("metadata: {e}"));
    r.decode().unwrap_or_else(|e| panic!("decode: {e}"));
    r.outputs()
}

fn check(p: &Fp8HostProblem, what: &str) -> HostOutputs {
    let got = run(p, 2);
    let (out, lse) = reference(p);
    // f32 accumulation over up to a few hundred rows: within upstream's bf16 tolerance and a tight lse one.
    let lse_tol = Tol { abs: 1e-5, rel: 1e-5, cos: 1e-9 };
    if let Err(e) =
        check_close("out", &got.out, &out, Tol::out(DType::Bf16)).and(check_close("lse", &got.lse, &lse, lse_tol))
    {
        panic!("{what}: {e}");
    }
    got
}

fn spec(layout: Fp8Layout, sparse: Option<SparseSpec>, seed: u64) -> Fp8RandomSpec {
    Fp8RandomSpec {
        layout,
        batch: 3,
        s_q: 2,
        h_q: 5,
        page_size: 7,
        mean_seqlen: 60,
        varlen: true,
        sparse,
        causal: false,
        seed,
    }
}

#[test]
fn sparse_every_layout_and_feature() {
    let mut rng = Rng::new(21);
    for layout in Fp8Layout::ALL {
        for (page_size, topk, h_q, s_q) in [(1, 8, 1, 1), (2, 64, 16, 3), (61, 40, 5, 2), (64, 128, 3, 1)] {
            for features in 0..8u32 {
                let mut sp = SparseSpec::new(topk);
                sp.topk_length = features & 1 != 0;
                sp.attn_sink = features & 2 != 0;
                if features & 4 != 0 {
                    let extra_page = [3, 64, 5][rng.below(3)];
                    sp.extra = Some(ExtraSpec {
                        topk: topk / 2,
                        page_size: extra_page,
                        mean_seqlen: 50,
                        topk_length: sp.topk_length,
                    });
                }
                sp.invalid = 0.15;
                sp.duplicates = 0.15;
                sp.empty_rows = 0.1;
                let mut s = spec(layout, Some(sp), rng.next_u64());
                (s.page_size, s.h_q, s.s_q, s.mean_seqlen) = (page_size, h_q, s_q, 2 * topk);
                let p = Fp8HostProblem::random(&s).unwrap();
                check(
                    &p,
                    &format!("{layout} page {page_size} topk {topk} h_q {h_q} s_q {s_q} features {features:03b}"),
                );
            }
        }
    }
}

#[test]
fn sparse_softmax_scale_and_short_contexts() {
    for layout in Fp8Layout::ALL {
        let mut s = spec(layout, Some(SparseSpec::new(32)), 5);
        s.mean_seqlen = 10; // most rows select fewer than topk tokens (the rest is −1)
        let mut p = Fp8HostProblem::random(&s).unwrap();
        p.softmax_scale = Some(0.3);
        check(&p, &format!("{layout} scale 0.3"));
    }
}

#[test]
fn all_invalid_rows_and_zero_topk_length_give_zero_and_plus_inf() {
    for layout in Fp8Layout::ALL {
        for case in 0..3 {
            let mut sp = SparseSpec::new(16);
            sp.attn_sink = true;
            match case {
                0 => sp.empty_rows = 1.0,
                1 => sp.topk_length = true,
                _ => {
                    sp.empty_rows = 1.0;
                    sp.extra = Some(ExtraSpec { topk: 8, page_size: 4, mean_seqlen: 20, topk_length: true });
                }
            }
            let mut p = Fp8HostProblem::random(&spec(layout, Some(sp), 40 + case)).unwrap();
            if let Fp8HostMode::Sparse { main, extra, .. } = &mut p.mode {
                if case >= 1 {
                    main.topk_length = main.topk_length.as_ref().map(|l| vec![0; l.len()]);
                }
                if let Some(e) = extra {
                    e.topk_length = Some(vec![0; p.batch]);
                }
            }
            let got = check(&p, &format!("{layout} empty case {case}"));
            assert!(got.out.iter().all(|&x| x == 0.0), "{layout} case {case}: out must be 0");
            assert!(got.lse.iter().all(|&l| l == f32::INFINITY), "{layout} case {case}: lse must be +inf");
        }
    }
}

#[test]
fn attn_sink_infinities_and_lse() {
    for layout in Fp8Layout::ALL {
        let p = Fp8HostProblem::random(&spec(layout, Some(SparseSpec::new(24)), 9)).unwrap();
        let plain = run(&p, 1);
        let with = |v: f32| {
            let mut q = p.clone();
            if let Fp8HostMode::Sparse { attn_sink, .. } = &mut q.mode {
                *attn_sink = Some(vec![v; q.h_q]);
            }
            run(&q, 1)
        };
        // −inf has no effect at all; +inf zeroes every output; neither changes lse.
        assert!(with(f32::NEG_INFINITY).bitwise_eq(&plain), "{layout}");
        let inf = with(f32::INFINITY);
        assert!(inf.out.iter().all(|&x| x == 0.0), "{layout}");
        assert_eq!(inf.lse, plain.lse, "{layout}");
        // A finite sink equal to the row's lse halves the output.
        let mut q = p.clone();
        if let Fp8HostMode::Sparse { attn_sink, .. } = &mut q.mode {
            *attn_sink = Some((0..q.h_q).map(|h| plain.lse[h * q.s_q]).collect());
        }
        let half = run(&q, 1);
        for h in 0..q.h_q {
            for c in 0..HEAD_DIM_V {
                let (a, b) = (half.out[h * HEAD_DIM_V + c], plain.out[h * HEAD_DIM_V + c]);
                assert!((a - b / 2.0).abs() <= b.abs() / 128.0 + 1e-7, "{layout} head {h} col {c}: {a} vs {b}/2");
            }
        }
    }
}

#[test]
fn duplicates_count_twice() {
    for layout in Fp8Layout::ALL {
        let mut s = spec(layout, Some(SparseSpec::new(1)), 13);
        s.mean_seqlen = 30;
        s.varlen = false;
        let single = Fp8HostProblem::random(&s).unwrap();
        // The same selection, each entry written twice: softmax weights unchanged, lse up by ln 2.
        let mut double = single.clone();
        if let Fp8HostMode::Sparse { main, .. } = &mut double.mode {
            main.indices = main.indices.iter().flat_map(|&x| [x, x]).collect();
            main.topk = 2;
        }
        let (a, b) = (run(&single, 1), run(&double, 1));
        assert_eq!(a.out, b.out, "{layout}");
        for (x, y) in a.lse.iter().zip(&b.lse) {
            assert!((y - x - 2f32.ln()).abs() < 1e-5, "{layout}: {y} vs {x} + ln 2");
        }
        check(&double, &format!("{layout} duplicates"));
    }
}

#[test]
fn dense_v32_cache() {
    let mut rng = Rng::new(31);
    for causal in [false, true] {
        for (page_size, s_q, h_q) in [(64, 1, 16), (5, 3, 4), (1, 2, 3), (100, 4, 2)] {
            let mut s = spec(Fp8Layout::V32, None, rng.next_u64());
            (s.page_size, s.s_q, s.h_q, s.causal, s.mean_seqlen) = (page_size, s_q, h_q, causal, 90);
            let p = Fp8HostProblem::random(&s).unwrap();
            check(&p, &format!("dense page {page_size} s_q {s_q} h_q {h_q} causal {causal}"));
        }
    }
}

/// What engines do with upstream's sparse kernel for a dense FP8 cache: indices over the whole context. The two
/// modes read the same rows in the same order, so they agree bit for bit.
#[test]
fn dense_equals_sparse_over_the_whole_context() {
    let mut s = spec(Fp8Layout::V32, None, 77);
    s.s_q = 2;
    let dense = Fp8HostProblem::random(&s).unwrap();
    let Fp8HostMode::Dense { cache, block_table, max_blocks_per_seq, seqlens, .. } = &dense.mode else {
        unreachable!()
    };
    let topk = *seqlens.iter().max().unwrap() as usize;
    let ps = cache.page_size;
    let mut indices = vec![-1i32; dense.batch * dense.s_q * topk];
    for i in 0..dense.batch {
        for t in 0..dense.s_q {
            for j in 0..seqlens[i] as usize {
                let page = block_table[i * max_blocks_per_seq + j / ps];
                indices[(i * dense.s_q + t) * topk + j] = page * ps as i32 + (j % ps) as i32;
            }
        }
    }
    let mut sparse = dense.clone();
    sparse.mode = Fp8HostMode::Sparse {
        main: mla_cpu::fp8problem::Fp8Selection { cache: cache.clone(), indices, topk, topk_length: None },
        extra: None,
        attn_sink: None,
    };
    assert!(run(&dense, 2).bitwise_eq(&run(&sparse, 2)));
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let mut sp = SparseSpec::new(64);
    sp.topk_length = true;
    sp.attn_sink = true;
    sp.invalid = 0.1;
    sp.extra = Some(ExtraSpec { topk: 32, page_size: 16, mean_seqlen: 100, topk_length: true });
    for layout in Fp8Layout::ALL {
        let mut s = spec(layout, Some(sp.clone()), 3);
        (s.h_q, s.batch) = (20, 4);
        let p = Fp8HostProblem::random(&s).unwrap();
        let one = run(&p, 1);
        for threads in [2, 3] {
            assert!(run(&p, threads).bitwise_eq(&one), "{layout} {threads} threads");
        }
    }
}

/// The worked example of docs/sparse-fp8.md: every number quoted there is checked here.
#[test]
fn worked_example_of_the_docs() {
    use mla_cpu::fp8problem::Fp8Selection;
    // Two pages of two tokens, V3.2; token n has every NoPE column equal to [1.0, 0.5, -1.0, 2.0][n], RoPE 0.
    let nope = [1.0f32, 0.5, -1.0, 2.0];
    let values: Vec<f32> = nope.iter().flat_map(|&v| (0..576).map(move |c| if c < 512 { v } else { 0.0 })).collect();
    let cache = Fp8Cache::quantize(Fp8Layout::V32, 2, 2, &values).unwrap();
    // Token 0: 512 codes 0x78 (256), four scales 2^-8 = 0x3B800000 little-endian, 128 zero bytes of RoPE.
    assert!(cache.bytes[..512].iter().all(|&b| b == 0x78));
    assert_eq!(&cache.bytes[512..528], &[0x00, 0x00, 0x80, 0x3B].repeat(4)[..]);
    assert!(cache.bytes[528..656].iter().all(|&b| b == 0));
    // Token 2 (-1.0): codes 0xF8, scale 2^-8; token 3 (2.0): codes 0x78, scale 2^-7 = 0x3C000000.
    assert_eq!((cache.bytes[2 * 656], cache.bytes[3 * 656]), (0xF8, 0x78));
    assert_eq!(&cache.bytes[3 * 656 + 512..3 * 656 + 516], &[0x00, 0x00, 0x00, 0x3C]);
    assert_eq!(cache.dequantize().unwrap(), values);
    let m1 = Fp8Cache::quantize(
        Fp8Layout::Model1,
        2,
        2,
        &values[..].chunks(576).flat_map(|r| &r[64..]).copied().collect::<Vec<_>>(),
    )
    .unwrap();
    // MODEL1, the same tokens cut to 512 columns: token 1's scales at 2·576 + 8 = 1160, UE8M0 2^-9 = 118.
    assert_eq!(m1.block_stride, 1728);
    assert_eq!(&m1.bytes[1160..1168], &[118, 118, 118, 118, 118, 118, 118, 0]);

    // One request, one query token, one head; q = 2^-9 on every NoPE column, 0 on RoPE; softmax_scale 1, so the
    // score of token n is exactly nope[n].
    let q: Vec<u16> = (0..576).map(|c| if c < 512 { 0x3B00 } else { 0 }).collect(); // bf16 2^-9
    let sparse = |sink: Option<f32>| Fp8HostProblem {
        layout: Fp8Layout::V32,
        batch: 1,
        s_q: 1,
        h_q: 1,
        q: q.clone(),
        mode: Fp8HostMode::Sparse {
            main: Fp8Selection { cache: cache.clone(), indices: vec![0, 2, -1, 5], topk: 4, topk_length: None },
            extra: None,
            attn_sink: sink.map(|s| vec![s]),
        },
        softmax_scale: Some(1.0),
    };
    // Tokens 0 and 2 (−1 and 5 are skipped): out = (e·1 + e⁻¹·(−1)) / (e + e⁻¹) = tanh 1, lse = ln(e + e⁻¹).
    let r = run(&sparse(None), 1);
    assert_eq!(r.out[0], 0.761_718_75); // tanh 1 = 0.761594… in bfloat16
    assert!(r.out.iter().all(|&x| x == r.out[0]));
    assert!((r.lse[0] - 1.126_928).abs() < 1e-6, "{}", r.lse[0]);
    // attn_sink 0: out *= 1 / (1 + e^(0 − lse)) = 0.755272…; lse unchanged.
    let s = run(&sparse(Some(0.0)), 1);
    assert_eq!((s.out[0], s.lse[0]), (0.574_218_75, r.lse[0])); // 0.575210… in bfloat16
    // Dense: cache_seqlens [3], block_table [[0, 1]]: tokens 0, 1, 2 with scores 1, 0.5, −1.
    let dense = Fp8HostProblem {
        mode: Fp8HostMode::Dense {
            cache: cache.clone(),
            block_table: vec![0, 1],
            max_blocks_per_seq: 2,
            seqlens: vec![3],
            causal: false,
        },
        ..sparse(None)
    };
    let d = run(&dense, 1);
    assert_eq!(d.out[0], 0.671_875); // 0.670505… in bfloat16
    assert!((d.lse[0] - 1.554_957).abs() < 1e-6, "{}", d.lse[0]);
}
