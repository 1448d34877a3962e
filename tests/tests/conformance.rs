//! The conformance suite: fixed cases (each dtype, split and unsplit requests, zero length, causal s_q > 1,
//! h_kv > 1) run on every backend that opens here ([`for_each_backend`] with [`any_memory`]: a CUDA backend gets
//! each problem uploaded to its device by [`run`]), each checked against the float64 reference with the one
//! tolerance rule at the bar of the backend's arithmetic ([`Bar::of`]); a backend that lacks a case's page size
//! runs it with its own ([`Case::fit_to`]). The CPU backend is bitwise deterministic, so its results are also
//! pinned by insta snapshots (`snapshots/`): a digest of every bit of `out` and `lse` plus a few readable values,
//! so any change in the numbers shows up as a snapshot diff to review (`cargo insta review`).

use mla_core::DType;
use mla_testkit::{
    Bar, Case, Outputs, Problem, any_memory, check_against_reference_at, digest, for_each_backend, run, run_host,
};

/// The fixed cases, by snapshot name.
fn cases() -> Vec<(&'static str, Case)> {
    let with = |seqlens: &[i32], s_q: usize, h_q: usize, f: &dyn Fn(&mut Case)| {
        let mut c = Case::new(seqlens, s_q, h_q);
        f(&mut c);
        c
    };
    let e4m3 = |c: &mut Case| {
        c.dtype = DType::E4M3;
        c.descale_q = 1.0 / 64.0;
        c.descale_k = 1.0 / 128.0;
    };
    vec![
        // Short requests: one split each (the scheduler leaves them whole).
        ("bf16_unsplit", with(&[64, 20, 1], 1, 16, &|_| {})),
        ("f16_unsplit", with(&[64, 20, 1], 1, 16, &|c| c.dtype = DType::F16)),
        ("e4m3_unsplit", with(&[64, 20, 1], 1, 16, &e4m3)),
        // One long request: cut into many splits, merged by the combine.
        ("bf16_split", with(&[3000], 1, 16, &|_| {})),
        ("f16_split", with(&[3000], 1, 16, &|c| c.dtype = DType::F16)),
        ("e4m3_split", with(&[3000], 1, 16, &e4m3)),
        // A request of length 0 next to a split one: out = 0, lse = +inf for the empty one.
        ("zero_length", with(&[0, 1500, 0], 1, 16, &|_| {})),
        // Causal with s_q = 3: the bottom-right aligned mask, including a request shorter than s_q whose first
        // query rows see nothing.
        ("causal_s_q_3", with(&[130, 2, 700], 3, 8, &|c| c.causal = true)),
        // Two KV heads of four query heads each, and a page size other than 64.
        (
            "h_kv_2",
            with(&[200, 1000], 1, 8, &|c| {
                c.h_kv = 2;
                c.page_size = 16;
            }),
        ),
    ]
}

/// What a snapshot keeps of one run: the case, the split counts, the digest and a few values.
fn summary(case: &Case, got: &Outputs) -> String {
    let first = |v: &[f32]| format!("{:?}", &v[..v.len().min(4)]);
    let last = |v: &[f32]| format!("{:?}", &v[v.len().saturating_sub(4)..]);
    let mid = |v: &[f32]| format!("{:?}", &v[v.len() / 2..(v.len() / 2 + 4).min(v.len())]);
    format!(
        "dtype: {}\nseqlens: {:?}\ns_q: {}, h_q: {}, h_kv: {}, page_size: {}, causal: {}\nnum_splits: {:?}\n\
         digest(out, lse): {}\nout[..4]: {}\nout[mid..mid + 4]: {}\nout[-4..]: {}\nlse[..4]: {}\n\
         lse[mid..mid + 4]: {}\nlse[-4..]: {}\n",
        case.dtype,
        case.seqlens,
        case.s_q,
        case.h_q,
        case.h_kv,
        case.page_size,
        case.causal,
        got.metadata.1,
        digest(&got.out, &got.lse),
        first(&got.out),
        mid(&got.out),
        last(&got.out),
        first(&got.lse),
        mid(&got.lse),
        last(&got.lse),
    )
}

#[test]
fn conformance() {
    let ran = for_each_backend(any_memory, |be| {
        let caps = be.capabilities();
        for (name, case) in cases() {
            let Some(case) = case.fit_to(caps) else {
                eprintln!("conformance: {name} skipped on {} (dtype {} unsupported)", be.name(), case.dtype);
                continue;
            };
            let p = Problem::generate(&case);
            let got = run(be, &p).unwrap_or_else(|e| panic!("{name} on {}: {e}", be.name()));
            if let Err(e) = check_against_reference_at(&p, &got, Bar::of(caps, case.dtype)) {
                panic!("{name} on {}: {e}", be.name());
            }
            if be.name() == "cpu" {
                insta::assert_snapshot!(name, summary(&case, &got));
            }
        }
    });
    assert!(ran.contains(&"cpu"), "the CPU backend always runs: {ran:?}");
}

/// The cases cover what the suite claims: both split and unsplit requests (as the CPU backend's scheduler cuts
/// them), a zero length, causal s_q > 1 and h_kv > 1, and every dtype.
#[test]
fn the_cases_cover_their_claims() {
    let cpu = mla_cpu::CpuBackend::new();
    let (mut split, mut unsplit) = (false, false);
    for (_, case) in cases() {
        let got = run_host(&cpu, &Problem::generate(&case)).unwrap();
        let ns = &got.metadata.1;
        for w in ns.windows(2) {
            split |= w[1] - w[0] > 1;
            unsplit |= w[1] - w[0] == 1;
        }
    }
    assert!(split && unsplit, "split {split}, unsplit {unsplit}");
    let cs = cases();
    assert!(cs.iter().any(|(_, c)| c.seqlens.contains(&0)));
    assert!(cs.iter().any(|(_, c)| c.causal && c.s_q > 1));
    assert!(cs.iter().any(|(_, c)| c.h_kv > 1));
    assert!(DType::ALL.iter().all(|d| cs.iter().any(|(_, c)| c.dtype == *d)));
}
