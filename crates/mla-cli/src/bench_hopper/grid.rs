//! The configurations of `bench --backend hopper`: upstream's grid and the small batches, their lengths, each one's
//! weight in the estimate of the time left, and `--dry-run`.

use mla_core::{DType, HEAD_DIM_K, HEAD_DIM_V};

use super::Options;
use super::report::lengths_label;
use crate::anchors::AnchorSet;

/// Which configurations to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grid {
    Upstream,
    Small,
}

/// xorshift64* with Box-Muller normals: seedable, fast, good enough for benchmark inputs. Kept rather than
/// `rand`/`rand_distr`: the varlen lengths and page permutations of a seed are part of the recorded results
/// (docs/log/performance.md, docs/bench/), and another generator would draw other batches for the same `--seed`.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Spread small seeds over the state (0 would be a fixed point).
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15).wrapping_mul(0xBF58_476D_1CE4_E5B9).max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// The lengths of one upstream-grid configuration: `s_k` each, or `max(N(s_k, s_k/2), 2)` (upstream's varlen
/// draw). The same for every dtype of a run.
pub fn upstream_lengths(batch: usize, s_k: usize, varlen: bool, seed: u64) -> Vec<i32> {
    let mut rng = Rng::new(seed ^ (s_k as u64).rotate_left(32));
    (0..batch)
        .map(|_| if varlen { ((s_k as f64 + rng.normal() * s_k as f64 / 2.0) as i32).max(2) } else { s_k as i32 })
        .collect()
}

/// Issue 6's small and imbalanced batches: (lengths, s_q, h_q).
pub fn small_configs() -> Vec<(Vec<i32>, usize, usize)> {
    let mut configs = vec![(vec![4641, 45118, 1730, 1696], 4, 16)];
    for b in [1usize, 2, 4, 8] {
        for s_k in [1024, 4096, 16384, 65536] {
            configs.push((vec![s_k; b], 1, 128));
        }
    }
    configs
}

/// Upstream's FLOPs and bytes of one decode (h_kv = 1).
pub fn flops_bytes(dtype: DType, total_seqlen: usize, batch: usize, s_q: usize, h_q: usize) -> (f64, f64) {
    let flops = 2.0 * (s_q * total_seqlen * h_q) as f64 * (HEAD_DIM_K + HEAD_DIM_V) as f64;
    let rows = batch * s_q * h_q;
    let bytes = (dtype.size_bytes() * (total_seqlen * HEAD_DIM_K + rows * HEAD_DIM_K) + 2 * rows * HEAD_DIM_V) as f64;
    (flops, bytes)
}

/// FLOP per byte at which a row's time is taken to turn from its bytes to its FLOPs, for the estimate of the time
/// left only (about an H100's or H200's dense BF16 peak over its bandwidth).
pub const NOMINAL_RIDGE: f64 = 250.0;

/// Each configuration's weight in the estimate of the time left, in run order: its bytes, or its FLOPs over
/// [`NOMINAL_RIDGE`] where more.
pub fn costs(opts: &Options) -> Vec<f64> {
    let cost = |dtype, total, b, s_q, h_q| {
        let (flops, bytes) = flops_bytes(dtype, total, b, s_q, h_q);
        bytes.max(flops / NOMINAL_RIDGE)
    };
    let mut out = Vec::new();
    for &dtype in &opts.dtypes {
        match opts.grid {
            Grid::Upstream => {
                for &s_k in &opts.sks {
                    for _ in &opts.modes {
                        for &h_q in &opts.hqs {
                            for &s_q in &opts.sqs {
                                out.push(cost(dtype, opts.batch * s_k, opts.batch, s_q, h_q));
                            }
                        }
                    }
                }
            }
            Grid::Small => {
                for (seqlens, s_q, h_q) in small_configs() {
                    let total = seqlens.iter().map(|&s| s as usize).sum();
                    out.push(cost(dtype, total, seqlens.len(), s_q, h_q));
                }
            }
        }
    }
    out
}

/// `--dry-run`: the configurations and their anchors, without a device.
pub fn dry_run(opts: &Options, anchors: &AnchorSet) {
    let mut n = 0;
    match opts.grid {
        Grid::Upstream => {
            println!(
                "{:<5} {:>6} {:>4} {:>3} {:<6} {:>3} {:>5} {:>9}",
                "dtype", "s_k", "h_q", "s_q", "mode", "cau", "b", "anchor"
            );
            for &dtype in &opts.dtypes {
                for &s_k in &opts.sks {
                    for &varlen in &opts.modes {
                        for &h_q in &opts.hqs {
                            for &s_q in &opts.sqs {
                                let causal = opts.causal(dtype, anchors);
                                let a = anchors.anchor(dtype, opts.batch, s_k, h_q, s_q, varlen, causal);
                                println!(
                                    "{:<5} {:>6} {:>4} {:>3} {:<6} {:>3} {:>5} {:>9}",
                                    dtype.name(),
                                    s_k,
                                    h_q,
                                    s_q,
                                    if varlen { "varlen" } else { "fixed" },
                                    causal as u8,
                                    opts.batch,
                                    a.map_or("-".into(), |a| format!("{a:.3}"))
                                );
                                n += 1;
                            }
                        }
                    }
                }
            }
        }
        Grid::Small => {
            println!("{:<5} {:>2} {:>3} {:>4} {:<28} {:>3}", "dtype", "b", "s_q", "h_q", "lengths", "cau");
            for &dtype in &opts.dtypes {
                for (seqlens, s_q, h_q) in small_configs() {
                    let label = lengths_label(&seqlens);
                    let causal = opts.causal(dtype, anchors) as u8;
                    println!("{:<5} {:>2} {:>3} {:>4} {label:<28} {causal:>3}", dtype.name(), seqlens.len(), s_q, h_q);
                    n += 1;
                }
            }
        }
    }
    println!(
        "dry run: {n} configurations, {} launches each after as many warm-ups, {} input sets",
        opts.iters, opts.sets
    );
}
