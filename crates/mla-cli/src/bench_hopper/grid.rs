//! The configurations of `bench --backend hopper`: upstream's grid and the small batches as one list of batches
//! (each timed at one or more head shapes), their lengths, each configuration's weight in the estimate of the time
//! left, and `--dry-run`. The run, the estimate and the dry run all walk [`batches`], so they list the same
//! configurations in the same order.

use mla_core::{DType, HEAD_DIM_K, HEAD_DIM_V};

use super::Options;
use super::report;
use crate::anchors::AnchorSet;

/// Which configurations to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grid {
    Upstream,
    Small,
}

impl Grid {
    /// The `--grid` value, as the JSON names the grid.
    pub fn name(self) -> &'static str {
        match self {
            Grid::Upstream => "upstream",
            Grid::Small => "small",
        }
    }
}

/// The state of [`Rng::new`] for seed 0 (splitmix64's increment, the golden ratio), mixed into every seed.
const SEED_MIX: u64 = 0x9E37_79B9_7F4A_7C15;
/// splitmix64's first multiplier, which spreads small seeds over the state.
const SEED_SPREAD: u64 = 0xBF58_476D_1CE4_E5B9;
/// xorshift64*'s output multiplier.
const XORSHIFT_STAR: u64 = 0x2545_F491_4F6C_DD1D;
/// Bits of a uniform draw (an f64's significand).
const UNIFORM_BITS: u32 = f64::MANTISSA_DIGITS;
/// Floor of the Box-Muller draw whose logarithm is taken (a draw of 0 would give an infinite normal).
const NORMAL_FLOOR: f64 = 1e-300;

/// xorshift64* with Box-Muller normals: seedable, fast, good enough for benchmark inputs. Kept rather than
/// `rand`/`rand_distr`: the varlen lengths and page permutations of a seed are part of the recorded results
/// (docs/log/performance.md, docs/bench/), and another generator would draw other batches for the same `--seed`.
pub struct Rng(u64);

impl Rng {
    /// The generator of `seed`.
    pub fn new(seed: u64) -> Self {
        // 0 would be a fixed point of the shifts.
        Rng((seed ^ SEED_MIX).wrapping_mul(SEED_SPREAD).max(1))
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*'s (12, 25, 27) shifts.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(XORSHIFT_STAR)
    }

    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> (u64::BITS - UNIFORM_BITS)) as f64 / (1u64 << UNIFORM_BITS) as f64
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    /// N(0, 1).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(NORMAL_FLOOR);
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

/// The small and imbalanced batches (docs/log/performance.md, "small and imbalanced batches"): (lengths, s_q, h_q).
pub fn small_configs() -> Vec<(Vec<i32>, usize, usize)> {
    let mut configs = vec![(vec![4641, 45118, 1730, 1696], 4, 16)];
    for b in [1usize, 2, 4, 8] {
        for s_k in [1024, 4096, 16384, 65536] {
            configs.push((vec![s_k; b], 1, 128));
        }
    }
    configs
}

/// One batch of requests: its caches are built once per dtype and timed at every head shape.
pub struct Batch {
    pub grid: Grid,
    pub seqlens: Vec<i32>,
    /// Upstream grid: the nominal s_k; small grid: the common length, if all are equal.
    pub s_k: Option<usize>,
    /// `fixed`, `varlen`, or (small grid) `list`.
    pub mode: &'static str,
    /// (h_q, s_q) of each configuration, in run order.
    pub heads: Vec<(usize, usize)>,
}

impl Batch {
    /// Upstream's figure for this batch at `h_q` and `s_q`, on the upstream grid.
    pub fn anchor(&self, anchors: &AnchorSet, dtype: DType, h_q: usize, s_q: usize, causal: bool) -> Option<f64> {
        match (self.grid, self.s_k) {
            (Grid::Upstream, Some(s_k)) => {
                anchors.anchor(dtype, self.seqlens.len(), s_k, h_q, s_q, self.mode == "varlen", causal)
            }
            _ => None,
        }
    }
}

/// The batches of a run, in run order (the same for every dtype): upstream's s_k × {fixed, varlen}, each at every
/// h_q × s_q; or the small batches, each at its own shape.
pub fn batches(opts: &Options) -> Vec<Batch> {
    match opts.grid {
        Grid::Upstream => {
            let heads: Vec<_> = opts.hqs.iter().flat_map(|&h_q| opts.sqs.iter().map(move |&s_q| (h_q, s_q))).collect();
            let mut out = Vec::new();
            for &s_k in &opts.sks {
                for &varlen in &opts.modes {
                    out.push(Batch {
                        grid: Grid::Upstream,
                        seqlens: upstream_lengths(opts.batch, s_k, varlen, opts.seed),
                        s_k: Some(s_k),
                        mode: if varlen { "varlen" } else { "fixed" },
                        heads: heads.clone(),
                    });
                }
            }
            out
        }
        Grid::Small => small_configs()
            .into_iter()
            .map(|(seqlens, s_q, h_q)| {
                let uniform = seqlens.iter().all(|&s| s == seqlens[0]);
                Batch {
                    grid: Grid::Small,
                    s_k: uniform.then_some(seqlens[0] as usize),
                    mode: if uniform { "fixed" } else { "list" },
                    seqlens,
                    heads: vec![(h_q, s_q)],
                }
            })
            .collect(),
    }
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
const NOMINAL_RIDGE: f64 = 250.0;

/// Each configuration's weight in the estimate of the time left, in run order: its bytes, or its FLOPs over
/// [`NOMINAL_RIDGE`] where more, at the nominal lengths (b·s_k: the varlen draw does not matter here).
pub fn costs(opts: &Options) -> Vec<f64> {
    let batches = batches(opts);
    let mut out = Vec::new();
    for &dtype in &opts.dtypes {
        for batch in &batches {
            let b = batch.seqlens.len();
            let total = batch.s_k.map_or_else(|| batch.seqlens.iter().map(|&s| s as usize).sum(), |s_k| b * s_k);
            for &(h_q, s_q) in &batch.heads {
                let (flops, bytes) = flops_bytes(dtype, total, b, s_q, h_q);
                out.push(bytes.max(flops / NOMINAL_RIDGE));
            }
        }
    }
    out
}

/// `--dry-run`: the configurations and their anchors, without a device.
pub fn dry_run(opts: &Options, anchors: &AnchorSet) {
    let batches = batches(opts);
    println!("{}", report::dry_run_table(opts.grid).header());
    let mut n = 0;
    for &dtype in &opts.dtypes {
        let causal = opts.causal(dtype, anchors);
        for batch in &batches {
            for &(h_q, s_q) in &batch.heads {
                let anchor = batch.anchor(anchors, dtype, h_q, s_q, causal);
                println!("{}", report::dry_run_line(batch, dtype, h_q, s_q, causal, anchor));
                n += 1;
            }
        }
    }
    println!(
        "dry run: {n} configurations, {} launches each after as many warm-ups, {} input sets",
        opts.iters, opts.sets
    );
}
