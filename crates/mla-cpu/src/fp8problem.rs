//! Decode problems over FP8 caches in host memory ([`mla_core::sparse`]): what tests, the CLI and the benches
//! generate, and a runner that drives any host backend through the whole protocol (metadata step, decode).
//!
//! | item | what |
//! |---|---|
//! | [`Fp8HostProblem`] | bf16 queries, quantised caches, and the sparse selections or the dense block table |
//! | [`Fp8RandomSpec`] / [`Fp8HostProblem::random`] | upstream-test-like random problems: varlen contexts, NaN-poisoned tokens nobody may read (page tails, an unreferenced page, and every token a selection points at past its `topk_length`), invalid and duplicate indices, all-invalid rows, ±inf sinks, an extra cache |
//! | [`Fp8HostRun`] | metadata, workspace and outputs sized once; [`Fp8HostRun::decode`] can be repeated for timing |

use mla_core::dtype::{bf16_to_f32, f32_to_bf16};
use mla_core::{
    Device, Error, Fp8Cache, Fp8DecodeArgs, Fp8Layout, Fp8Shape, HEAD_DIM_V, HostTensor, HostTensorMut, MlaBackend,
    Result, Stream, Workspace,
};

use crate::problem::{HostOutputs, Rng};

/// One cache and the selection into it (sparse mode).
#[derive(Clone, Debug)]
pub struct Fp8Selection {
    /// The cache.
    pub cache: Fp8Cache,
    /// `[b, s_q, topk]` indices (`page · page_size + offset`; others are skipped).
    pub indices: Vec<i32>,
    /// Last dimension of `indices`.
    pub topk: usize,
    /// `[b]`, if given.
    pub topk_length: Option<Vec<i32>>,
}

/// The mode of a host problem.
#[derive(Clone, Debug)]
pub enum Fp8HostMode {
    /// Top-k selections.
    Sparse {
        /// `k_cache` with `indices` and `topk_length`.
        main: Fp8Selection,
        /// `extra_k_cache` with `extra_indices_in_kvcache` and `extra_topk_length`.
        extra: Option<Fp8Selection>,
        /// `[h_q]`, if given.
        attn_sink: Option<Vec<f32>>,
    },
    /// Block table and lengths (V3.2 layout).
    Dense {
        /// `k_cache`.
        cache: Fp8Cache,
        /// `[b, max_blocks_per_seq]`.
        block_table: Vec<i32>,
        /// Columns of the block table.
        max_blocks_per_seq: usize,
        /// `[b]`.
        seqlens: Vec<i32>,
        /// Bottom-right causal mask.
        causal: bool,
    },
}

/// A decode over FP8 caches whose data lives in host memory.
#[derive(Clone, Debug)]
pub struct Fp8HostProblem {
    /// The caches' layout.
    pub layout: Fp8Layout,
    /// Requests.
    pub batch: usize,
    /// Query tokens per request.
    pub s_q: usize,
    /// Query heads.
    pub h_q: usize,
    /// `[b, s_q, h_q, d_qk]` bf16 bits.
    pub q: Vec<u16>,
    /// Sparse or dense, with its data.
    pub mode: Fp8HostMode,
    /// `None`: `d_qk^-0.5`.
    pub softmax_scale: Option<f32>,
}

/// The extra cache of a [`SparseSpec`].
#[derive(Clone, Debug)]
pub struct ExtraSpec {
    /// Selected entries per query token.
    pub topk: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// Mean context length of the extra cache.
    pub mean_seqlen: usize,
    /// Give `extra_topk_length` (random in `[0, topk]`).
    pub topk_length: bool,
}

/// The sparse part of an [`Fp8RandomSpec`].
#[derive(Clone, Debug)]
pub struct SparseSpec {
    /// Selected entries per query token.
    pub topk: usize,
    /// Give `topk_length` (random in `[0, topk]`).
    pub topk_length: bool,
    /// Give `attn_sink` (N(0, 1), about a third +inf and a third −inf, as upstream's tests).
    pub attn_sink: bool,
    /// An extra cache.
    pub extra: Option<ExtraSpec>,
    /// Fraction of selected entries replaced by invalid ones (−1, other negatives, `>= num_blocks · page_size`).
    pub invalid: f64,
    /// Fraction of selected entries replaced by a copy of an earlier entry of the same row.
    pub duplicates: f64,
    /// Fraction of (request, token) rows whose every entry is invalid.
    pub empty_rows: f64,
}

impl SparseSpec {
    /// A plain selection of `topk` valid, distinct entries (padded with −1 when a context is shorter).
    pub fn new(topk: usize) -> Self {
        SparseSpec {
            topk,
            topk_length: false,
            attn_sink: false,
            extra: None,
            invalid: 0.0,
            duplicates: 0.0,
            empty_rows: 0.0,
        }
    }
}

/// Parameters of [`Fp8HostProblem::random`].
#[derive(Clone, Debug)]
pub struct Fp8RandomSpec {
    /// The caches' layout (dense mode needs V3.2).
    pub layout: Fp8Layout,
    /// Requests.
    pub batch: usize,
    /// Query tokens per request.
    pub s_q: usize,
    /// Query heads.
    pub h_q: usize,
    /// Tokens per page of the main cache.
    pub page_size: usize,
    /// Mean context length of the main cache.
    pub mean_seqlen: usize,
    /// Lengths `max(N(mean, mean/2), 0)` instead of all equal to the mean.
    pub varlen: bool,
    /// Sparse mode; `None` is dense mode.
    pub sparse: Option<SparseSpec>,
    /// Dense mode: bottom-right causal mask.
    pub causal: bool,
    /// Seed.
    pub seed: u64,
}

/// Block-table entries past a request's last page, never read (as upstream's tests).
const GARBAGE_PAGES: [i32; 3] = [-1, i32::MAX, 2_147_480_000];

/// One generated cache: contexts laid out through a permuted block table, every other token NaN.
struct Contexts {
    cache: Fp8Cache,
    seqlens: Vec<i32>,
    block_table: Vec<i32>,
    max_blocks_per_seq: usize,
    /// A token whose values are NaN (nobody may read it).
    poisoned: usize,
}

impl Contexts {
    fn generate(
        rng: &mut Rng,
        layout: Fp8Layout,
        batch: usize,
        page_size: usize,
        mean: usize,
        varlen: bool,
    ) -> Result<Self> {
        if page_size == 0 {
            return Err(Error::invalid("page_size", ">= 1", 0));
        }
        let seqlens: Vec<i32> = (0..batch)
            .map(|_| {
                let s = if varlen { mean as f64 + rng.normal() * mean as f64 / 2.0 } else { mean as f64 };
                s.round().clamp(0.0, (i32::MAX / 2) as f64) as i32
            })
            .collect();
        let pages: Vec<usize> = seqlens.iter().map(|&s| (s as usize).div_ceil(page_size)).collect();
        let num_blocks = pages.iter().sum::<usize>() + 1; // the last page of the permutation is nobody's
        let max_blocks_per_seq = pages.iter().copied().max().unwrap_or(0) + 1;
        let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.below(i + 1));
        }
        let mut block_table = vec![0i32; batch * max_blocks_per_seq];
        let mut next = 0;
        for i in 0..batch {
            for p in 0..max_blocks_per_seq {
                block_table[i * max_blocks_per_seq + p] = if p < pages[i] {
                    next += 1;
                    ids[next - 1]
                } else {
                    GARBAGE_PAGES[rng.below(GARBAGE_PAGES.len())]
                };
            }
        }
        let d = layout.head_dim_k();
        let mut values = vec![f32::NAN; num_blocks * page_size * d];
        for i in 0..batch {
            for j in 0..seqlens[i] as usize {
                let page = block_table[i * max_blocks_per_seq + j / page_size] as usize;
                for x in &mut values[(page * page_size + j % page_size) * d..][..d] {
                    // Upstream's test data: N(0, 1) / 10, clamped to ±1, in bfloat16.
                    *x = bf16_to_f32(f32_to_bf16((rng.normal() / 10.0).clamp(-1.0, 1.0) as f32));
                }
            }
        }
        let poisoned = ids[num_blocks - 1] as usize * page_size + rng.below(page_size);
        let cache = Fp8Cache::quantize(layout, num_blocks, page_size, &values)?;
        Ok(Contexts { cache, seqlens, block_table, max_blocks_per_seq, poisoned })
    }

    /// The index of token `j` of request `i`'s context.
    fn index(&self, i: usize, j: usize) -> i32 {
        let ps = self.cache.page_size;
        self.block_table[i * self.max_blocks_per_seq + j / ps] * ps as i32 + (j % ps) as i32
    }

    /// A random selection of `topk` entries per (request, token) row, with the spec's defects.
    #[allow(clippy::too_many_arguments)]
    fn select(
        self,
        rng: &mut Rng,
        s_q: usize,
        topk: usize,
        with_length: bool,
        invalid: f64,
        duplicates: f64,
        empty_rows: f64,
    ) -> Fp8Selection {
        let b = self.seqlens.len();
        let num_tokens = (self.cache.num_blocks * self.cache.page_size) as i64;
        let bad = [-1i64, -2, i32::MIN as i64, num_tokens, num_tokens + 7, i32::MAX as i64];
        let pick_bad = |rng: &mut Rng| bad[rng.below(bad.len())].clamp(i32::MIN as i64, i32::MAX as i64) as i32;
        let uniform = |rng: &mut Rng| (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
        let topk_length: Option<Vec<i32>> = with_length.then(|| (0..b).map(|_| rng.below(topk + 1) as i32).collect());
        let mut indices = vec![-1i32; b * s_q * topk];
        for i in 0..b {
            let s_k = self.seqlens[i] as usize;
            for t in 0..s_q {
                let row = &mut indices[(i * s_q + t) * topk..][..topk];
                // min(topk, s_k) distinct context positions in random order (a partial Fisher–Yates), then −1.
                let mut pos: Vec<usize> = (0..s_k).collect();
                for k in 0..topk.min(s_k) {
                    pos.swap(k, k + rng.below(s_k - k));
                    row[k] = self.index(i, pos[k]);
                }
                if uniform(rng) < empty_rows {
                    row.iter_mut().for_each(|x| *x = pick_bad(rng));
                    continue;
                }
                for k in 0..topk {
                    let u = uniform(rng);
                    if u < invalid {
                        row[k] = pick_bad(rng);
                    } else if u < invalid + duplicates && k > 0 {
                        row[k] = row[rng.below(k)];
                    }
                }
                // Past topk_length: valid indices of a NaN token, so that reading one would show.
                if let Some(len) = &topk_length {
                    row[len[i] as usize..].iter_mut().for_each(|x| *x = self.poisoned as i32);
                }
            }
        }
        Fp8Selection { cache: self.cache, indices, topk, topk_length }
    }
}

impl Fp8HostProblem {
    /// An upstream-test-like random problem (module docs).
    pub fn random(spec: &Fp8RandomSpec) -> Result<Fp8HostProblem> {
        let mut rng = Rng(spec.seed ^ 0x0F8_5EED);
        let layout = spec.layout;
        let (b, s_q, h_q) = (spec.batch, spec.s_q, spec.h_q);
        let ctx = Contexts::generate(&mut rng, layout, b, spec.page_size, spec.mean_seqlen, spec.varlen)?;
        let mode = match &spec.sparse {
            Some(sp) => {
                let main = ctx.select(&mut rng, s_q, sp.topk, sp.topk_length, sp.invalid, sp.duplicates, sp.empty_rows);
                let extra = match &sp.extra {
                    None => None,
                    Some(e) => {
                        Some(Contexts::generate(&mut rng, layout, b, e.page_size, e.mean_seqlen, spec.varlen)?.select(
                            &mut rng,
                            s_q,
                            e.topk,
                            e.topk_length,
                            sp.invalid,
                            sp.duplicates,
                            sp.empty_rows,
                        ))
                    }
                };
                let attn_sink = sp.attn_sink.then(|| {
                    (0..h_q)
                        .map(|_| match rng.normal() {
                            u if u > 0.5 => f32::INFINITY,
                            u if u < -0.5 => f32::NEG_INFINITY,
                            _ => rng.normal() as f32,
                        })
                        .collect()
                });
                Fp8HostMode::Sparse { main, extra, attn_sink }
            }
            None => Fp8HostMode::Dense {
                cache: ctx.cache,
                block_table: ctx.block_table,
                max_blocks_per_seq: ctx.max_blocks_per_seq,
                seqlens: ctx.seqlens,
                causal: spec.causal,
            },
        };
        let q = (0..b * s_q * h_q * layout.head_dim_k())
            .map(|_| f32_to_bf16(rng.normal().clamp(-1.0, 1.0) as f32))
            .collect();
        Ok(Fp8HostProblem { layout, batch: b, s_q, h_q, q, mode, softmax_scale: None })
    }

    /// The sizes fixing buffer shapes.
    pub fn shape(&self) -> Fp8Shape {
        Fp8Shape { batch: self.batch, s_q: self.s_q, h_q: self.h_q }
    }

    /// Query element `q[i, t, h, c]`, widened.
    pub fn q_at(&self, i: usize, t: usize, h: usize, c: usize) -> f32 {
        bf16_to_f32(self.q[((i * self.s_q + t) * self.h_q + h) * self.layout.head_dim_k() + c])
    }
}

/// One problem bound to one host backend: metadata computed, workspace and outputs allocated.
pub struct Fp8HostRun<'a> {
    backend: &'a dyn MlaBackend,
    problem: &'a Fp8HostProblem,
    metadata: Vec<i32>,
    num_splits: Vec<i32>,
    workspace: Vec<u8>,
    out: Vec<u16>,
    lse: Vec<f32>,
}

/// The tensors of a selection: cache, indices, lengths.
fn selection_tensors<'s>(
    sel: &'s Fp8Selection,
    b: usize,
    s_q: usize,
) -> Result<(HostTensor<'s>, HostTensor<'s>, Option<HostTensor<'s>>)> {
    Ok((
        sel.cache.tensor()?,
        HostTensor::new(&sel.indices, &[b, s_q, sel.topk])?,
        sel.topk_length.as_ref().map(|l| HostTensor::new(l, &[b])).transpose()?,
    ))
}

impl<'a> Fp8HostRun<'a> {
    /// Runs the metadata step and sizes every buffer. The backend must live on the host.
    pub fn new(backend: &'a dyn MlaBackend, problem: &'a Fp8HostProblem) -> Result<Self> {
        if backend.capabilities().device != Device::Host {
            return Err(Error::Unsupported {
                backend: backend.name().into(),
                reason: "Fp8HostRun drives host backends only (device buffers need the backend's own allocator)".into(),
            });
        }
        let p = problem;
        let parts = backend.fp8_num_sm_parts(p.s_q, p.h_q);
        let ws = backend.fp8_workspace_size(&p.shape())?;
        let mut run = Fp8HostRun {
            backend,
            problem,
            metadata: vec![0; parts * 8],
            num_splits: vec![0; p.batch + 1],
            workspace: vec![0; ws],
            out: vec![0; p.batch * p.s_q * p.h_q * HEAD_DIM_V],
            lse: vec![0.0; p.batch * p.h_q * p.s_q],
        };
        run.call(true)?;
        Ok(run)
    }

    /// Builds the arguments and calls the metadata step (`metadata`) or the decode.
    fn call(&mut self, metadata: bool) -> Result<()> {
        let p = self.problem;
        let (b, s_q, h_q) = (p.batch, p.s_q, p.h_q);
        let parts = self.metadata.len() / 8;
        let q = HostTensor::new::<half::bf16>(bf16s(&p.q), &[b, s_q, h_q, p.layout.head_dim_k()])?;
        let meta = HostTensorMut::new(&mut self.metadata, &[parts, 8])?;
        let splits = HostTensorMut::new(&mut self.num_splits, &[b + 1])?;
        let out = HostTensorMut::new::<half::bf16>(bf16s_mut(&mut self.out), &[b, s_q, h_q, HEAD_DIM_V])?;
        let lse = HostTensorMut::new(&mut self.lse, &[b, h_q, s_q])?;
        let mut args = Fp8DecodeArgs {
            q: q.desc(),
            k_cache: q.desc(),
            block_table: None,
            cache_seqlens: None,
            head_dim_v: HEAD_DIM_V,
            tile_scheduler_metadata: meta.desc(),
            num_splits: splits.desc(),
            softmax_scale: p.softmax_scale,
            causal: false,
            indices: None,
            attn_sink: None,
            extra_k_cache: None,
            extra_indices_in_kvcache: None,
            topk_length: None,
            extra_topk_length: None,
            out: out.desc(),
            lse: lse.desc(),
        };
        match &p.mode {
            Fp8HostMode::Sparse { main, extra, attn_sink } => {
                let (k, ind, len) = selection_tensors(main, b, s_q)?;
                args.k_cache = k.desc();
                args.indices = Some(ind.desc());
                args.topk_length = len.map(|t| t.desc());
                if let Some(e) = extra {
                    let (k, ind, len) = selection_tensors(e, b, s_q)?;
                    args.extra_k_cache = Some(k.desc());
                    args.extra_indices_in_kvcache = Some(ind.desc());
                    args.extra_topk_length = len.map(|t| t.desc());
                }
                let sink = attn_sink.as_ref().map(|s| HostTensor::new(s, &[h_q])).transpose()?;
                args.attn_sink = sink.map(|t| t.desc());
            }
            Fp8HostMode::Dense { cache, block_table, max_blocks_per_seq, seqlens, causal } => {
                args.k_cache = cache.tensor()?.desc();
                let bt = HostTensor::new(block_table, &[b, *max_blocks_per_seq])?;
                let sl = HostTensor::new(seqlens, &[b])?;
                args.block_table = Some(bt.desc());
                args.cache_seqlens = Some(sl.desc());
                args.causal = *causal;
            }
        }
        // Every descriptor points into the problem (which outlives this call) or into this run's own buffers.
        if metadata {
            self.backend.fp8_get_metadata(&args, Stream::DEFAULT)
        } else {
            self.backend.fp8_decode(&args, Workspace::host(&mut self.workspace), Stream::DEFAULT)
        }
    }

    /// `tile_scheduler_metadata` (flattened) and `num_splits` as computed by the backend.
    pub fn metadata(&self) -> (&[i32], &[i32]) {
        (&self.metadata, &self.num_splits)
    }

    /// One decode call (synchronous on host backends).
    pub fn decode(&mut self) -> Result<()> {
        self.call(false)
    }

    /// The outputs of the last [`Fp8HostRun::decode`], widened.
    pub fn outputs(&self) -> HostOutputs {
        HostOutputs { out: self.out.iter().map(|&x| bf16_to_f32(x)).collect(), lse: self.lse.clone() }
    }
}

/// bf16 bit patterns as `half::bf16` (same layout).
fn bf16s(v: &[u16]) -> &[half::bf16] {
    // SAFETY: half::bf16 is repr(transparent) over u16.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) }
}

/// Mutable [`bf16s`].
fn bf16s_mut(v: &mut [u16]) -> &mut [half::bf16] {
    // SAFETY: half::bf16 is repr(transparent) over u16; the borrow is unique.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;

    fn spec(layout: Fp8Layout, sparse: Option<SparseSpec>) -> Fp8RandomSpec {
        Fp8RandomSpec {
            layout,
            batch: 3,
            s_q: 2,
            h_q: 4,
            page_size: 7,
            mean_seqlen: 40,
            varlen: true,
            sparse,
            causal: true,
            seed: 3,
        }
    }

    #[test]
    fn runs_both_modes_and_is_deterministic() {
        let be = CpuBackend::new();
        let be2 = CpuBackend::with_threads(1).unwrap();
        let mut sp = SparseSpec::new(16);
        sp.topk_length = true;
        sp.attn_sink = true;
        sp.invalid = 0.2;
        sp.duplicates = 0.2;
        sp.extra = Some(ExtraSpec { topk: 8, page_size: 3, mean_seqlen: 20, topk_length: true });
        for (layout, sparse) in
            [(Fp8Layout::V32, Some(sp.clone())), (Fp8Layout::Model1, Some(sp)), (Fp8Layout::V32, None)]
        {
            let p = Fp8HostProblem::random(&spec(layout, sparse)).unwrap();
            let mut run = Fp8HostRun::new(&be, &p).unwrap();
            run.decode().unwrap();
            let a = run.outputs();
            let mut run2 = Fp8HostRun::new(&be2, &p).unwrap();
            run2.decode().unwrap();
            assert!(a.bitwise_eq(&run2.outputs()), "{layout}");
            assert!(a.lse.iter().all(|l| !l.is_nan()), "{layout}: a NaN token was read");
        }
    }
}
