//! This machine's ceilings, measured in the same process as the benchmark so the percentages are honest.
//!
//! | ceiling | how | counted |
//! |---|---|---|
//! | memory bandwidth | STREAM-like copy of a 256 MiB f32 array into another, split over the worker threads, best of 5 ([`measure`]; [`measure_quick`]: 96 MiB, best of 3) | bytes read + bytes written |
//! | FMA peak | 12 independent 8-lane FMA chains per thread (AVX2), or `mul_add` chains on the scalar path | 2 flops per lane per FMA |

use std::time::Instant;

use rayon::prelude::*;

use crate::{CpuBackend, Isa};

/// Measured ceilings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ceilings {
    /// Copy bandwidth, GB/s (10⁹ bytes per second, read + write counted).
    pub copy_gbs: f64,
    /// FMA throughput of all worker threads, GFLOP/s.
    pub fma_gflops: f64,
    /// Worker threads used.
    pub threads: usize,
}

/// Measures both ceilings on `backend`'s thread pool and instruction set (about a second).
pub fn measure(backend: &CpuBackend) -> Ceilings {
    backend.install(|| Ceilings {
        copy_gbs: copy_bandwidth(256 << 20, 5),
        fma_gflops: fma_peak(backend.isa(), 20_000_000),
        threads: rayon::current_num_threads(),
    })
}

/// A shorter measurement (about a quarter second: 96 MiB copies, 3× the usual L3, and a shorter FMA loop), to
/// re-measure next to every benchmark row on a machine whose load changes.
pub fn measure_quick(backend: &CpuBackend) -> Ceilings {
    backend.install(|| Ceilings {
        copy_gbs: copy_bandwidth(96 << 20, 3),
        fma_gflops: fma_peak(backend.isa(), 4_000_000),
        threads: rayon::current_num_threads(),
    })
}

/// Best-of-`reps` parallel copy bandwidth for arrays of `bytes` bytes each, GB/s (read + write).
pub fn copy_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = bytes / 4;
    let src: Vec<f32> = (0..n).into_par_iter().map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let chunk = n.div_ceil(rayon::current_num_threads() * 4).max(1 << 14);
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    2.0 * (n * 4) as f64 / best / 1e9
}

/// Best-of-`reps` parallel read bandwidth (a sum over `bytes` bytes of f32), GB/s. Not one of the reported ceilings:
/// a diagnostic for read-dominated kernels such as decode.
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = bytes / 4;
    let src: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 7) as f32).collect();
    let chunk = n.div_ceil(rayon::current_num_threads() * 4).max(1 << 14);
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let s: f32 = src
            .par_chunks(chunk)
            .map(|c| {
                // 32 independent lanes: vectorisable without reassociation.
                let mut acc = [0f32; 32];
                for block in c.chunks_exact(32) {
                    for (a, x) in acc.iter_mut().zip(block) {
                        *a += x;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 4) as f64 / best / 1e9
}

/// Best-of-3 FMA throughput of every worker thread over `iters` iterations of 12 FMAs, GFLOP/s.
pub fn fma_peak(isa: Isa, iters: u64) -> f64 {
    let threads = rayon::current_num_threads();
    let iters = if isa == Isa::Scalar { iters / 10 } else { iters };
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let sink: f32 = (0..threads).into_par_iter().map(|k| fma_chains(isa, iters, k as f32)).sum();
        std::hint::black_box(sink);
        best = best.min(t.elapsed().as_secs_f64());
    }
    let per_iter = match isa {
        Isa::Scalar => 12.0 * 2.0,
        Isa::Avx2 => 12.0 * 8.0 * 2.0,
    };
    threads as f64 * iters as f64 * per_iter / best / 1e9
}

fn fma_chains(isa: Isa, iters: u64, seed: f32) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Isa::Avx2` value is only obtained after checking the CPU supports it.
        Isa::Avx2 => unsafe { fma_chains_avx2(iters, seed) },
        _ => {
            let mut acc = [seed; 12];
            let (a, b) = (std::hint::black_box(0.999_999f32), std::hint::black_box(1e-7f32));
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = x.mul_add(a, b);
                }
            }
            acc.iter().sum()
        }
    }
}

/// # Safety
/// The CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(iters: u64, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(std::hint::black_box(0.999_999));
    let b = _mm256_set1_ps(std::hint::black_box(1e-7));
    let mut acc = [_mm256_set1_ps(seed); 12];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut s = _mm256_setzero_ps();
    for x in acc {
        s = _mm256_add_ps(s, x);
    }
    let mut out = [0f32; 8];
    // SAFETY: `out` holds 8 floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
    out.iter().sum()
}
