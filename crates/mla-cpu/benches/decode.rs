//! Criterion benchmark of the CPU decode: upstream's grid scaled to a small machine (h_q ∈ {16, 32, 64, 128},
//! s_q ∈ {1, 2}, h_kv = 1, every dtype) plus memory-bound rows (h_q = h_kv = 16), with throughput in upstream's
//! bytes (`elt·(Σs_k·h_kv·576 + b·s_q·h_q·576) + out_elt·b·s_q·h_q·512`). `flashmla bench` prints the same grid
//! with GFLOP/s and the machine's measured ceilings next to it.
//!
//! `cargo bench -p mla-cpu --bench decode [-- FILTER]`, e.g. `-- bf16/h16`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mla_core::DType;
use mla_cpu::CpuBackend;
use mla_cpu::problem::{HostProblem, HostRun, RandomSpec};

fn spec(dtype: DType, h_q: usize, h_kv: usize, s_q: usize, seqlen: usize) -> RandomSpec {
    RandomSpec {
        batch: 8,
        s_q,
        h_q,
        h_kv,
        mean_seqlen: seqlen,
        varlen: false,
        page_size: 64,
        dtype,
        causal: true,
        seed: 1,
    }
}

fn decode(c: &mut Criterion) {
    let backend = CpuBackend::new();
    let mut group = c.benchmark_group("decode");
    group.sample_size(10);
    let mut configs = Vec::new();
    for dtype in DType::ALL {
        for h_q in [16, 32, 64, 128] {
            for s_q in [1, 2] {
                configs.push((format!("{dtype}/h{h_q}_s{s_q}"), spec(dtype, h_q, 1, s_q, 2048)));
            }
        }
        for s_q in [1, 2] {
            configs.push((format!("{dtype}/mem_h16_kv16_s{s_q}"), spec(dtype, 16, 16, s_q, 256)));
        }
    }
    for (name, sp) in configs {
        let problem = HostProblem::random(&sp);
        let mut run = HostRun::new(&backend, &problem).expect("a valid problem");
        group.throughput(Throughput::Bytes(problem.bytes() as u64));
        group.bench_function(name, |b| b.iter(|| run.decode().expect("decode")));
    }
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
