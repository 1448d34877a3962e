//! Bitwise determinism of the CPU backend: the scalar path, the dispatched SIMD path, one thread and several
//! threads all produce the same bits (issue 3: a fixed logical accumulation order everywhere).

use mla_core::DType;
use mla_cpu::{CpuBackend, CpuOptions, Isa};
use mla_testkit::{Case, Outputs, Problem, run_host};

fn run(p: &Problem, threads: usize, isa: Isa) -> Outputs {
    let be = CpuBackend::with_options(CpuOptions { threads: Some(threads), isa: Some(isa) }).unwrap();
    run_host(&be, p).unwrap()
}

#[test]
fn scalar_simd_and_thread_counts_agree_bitwise() {
    let best = Isa::detect();
    // (h_q, h_kv, s_q): M = s_q·h_q/h_kv = 6, 1, 9, 15, 5 and 16 query rows per KV head, so every register-tile
    // shape (row tiles of 1 to 6) and key/column remainder of the SIMD path is compared with the scalar path.
    let shapes = [(6, 2, 2), (3, 3, 1), (9, 1, 1), (5, 1, 3), (5, 1, 1), (8, 1, 2)];
    for (k, (dtype, (h_q, h_kv, s_q))) in DType::ALL.into_iter().flat_map(|d| shapes.map(|s| (d, s))).enumerate() {
        // A split request, causal rows, a zero length, page size 16.
        let mut c = Case::new(&[900, 0, 130], s_q, h_q);
        c.h_kv = h_kv;
        c.dtype = dtype;
        c.causal = true;
        c.page_size = 16;
        c.spread = 0.5;
        c.seed = 7 + k as u64;
        if dtype == DType::E4M3 {
            c.descale_q = 0.03;
            c.descale_k = 0.002;
        }
        let p = Problem::generate(&c);
        let golden = run(&p, 1, Isa::Scalar);
        assert!(golden.metadata.1[1] > 1, "the long request should be split: {:?}", golden.metadata.1);
        for (threads, isa) in [(3, Isa::Scalar), (1, best), (2, best), (5, best)] {
            let got = run(&p, threads, isa);
            assert!(got.bitwise_eq(&golden), "{dtype}: {threads} threads on {isa:?} differ from 1 scalar thread");
        }
        // The default constructor (global pool, detected ISA) too.
        assert!(run_host(&CpuBackend::new(), &p).unwrap().bitwise_eq(&golden));
    }
}

#[test]
fn unavailable_isa_is_an_error_not_a_crash() {
    if !Isa::Avx2.is_available() {
        let e = CpuBackend::with_options(CpuOptions { threads: None, isa: Some(Isa::Avx2) }).err().unwrap();
        assert!(e.to_string().contains("lacks"), "{e}");
    }
    assert!(CpuBackend::with_threads(0).is_err());
}
