//! Decodes over FP8 caches in the CLI (docs/sparse-fp8.md): what a call reads (for GB/s), a float64 reference of
//! one query row from the definition, and the problem written as `flashmla decode --fp8-cache` inputs.
//!
//! | figure | formula |
//! |---|---|
//! | selected rows | Σ over (request, token) of the entries that are read: `k < topk_length` and inside the cache, main and extra |
//! | bytes | `rows · bytes_per_token + 2·b·s_q·h_q·d_qk` (bf16 q) `+ 2·b·s_q·h_q·512` (bf16 out) |
//! | FLOPs | `2·h_q·rows·(d_qk + 512)` (scores and output, as the dense formula) |

use std::path::Path;

use mla_core::dtype::{bf16_to_f32, f32_to_bf16};
use mla_core::{Fp8Cache, HEAD_DIM_V};
use mla_cpu::fp8problem::{Fp8HostMode, Fp8HostProblem, Fp8Selection};
use mla_cpu::problem::HostOutputs;

use crate::args::CliResult;
use crate::{cli_err, npy};

/// Bytes of a bf16 element (q and out).
const BF16_BYTES: usize = 2;

/// The entries of request `i`'s row `t` that are read (docs/sparse-fp8.md: `k < topk_length[i]`, inside the cache).
fn read_entries(sel: &Fp8Selection, s_q: usize, i: usize, t: usize) -> impl Iterator<Item = usize> + '_ {
    let len = sel.topk_length.as_ref().map_or(sel.topk, |l| l[i].clamp(0, sel.topk as i32) as usize);
    let num_tokens = sel.cache.num_blocks * sel.cache.page_size;
    sel.indices[(i * s_q + t) * sel.topk..][..len]
        .iter()
        .filter_map(move |&x| usize::try_from(x).ok().filter(|&x| x < num_tokens))
}

/// The selections of a problem: main, then extra (none in dense mode).
fn selections(p: &Fp8HostProblem) -> Vec<&Fp8Selection> {
    match &p.mode {
        Fp8HostMode::Sparse { main, extra, .. } => std::iter::once(main).chain(extra.as_ref()).collect(),
        Fp8HostMode::Dense { .. } => Vec::new(),
    }
}

/// Token rows a call reads: every valid selected entry (a duplicate is read twice), or in dense mode the lengths.
pub fn rows_read(p: &Fp8HostProblem) -> u64 {
    match &p.mode {
        Fp8HostMode::Dense { seqlens, .. } => seqlens.iter().map(|&s| s.max(0) as u64).sum(),
        Fp8HostMode::Sparse { .. } => {
            let mut n = 0u64;
            for sel in selections(p) {
                for i in 0..p.batch {
                    for t in 0..p.s_q {
                        n += read_entries(sel, p.s_q, i, t).count() as u64;
                    }
                }
            }
            n
        }
    }
}

/// Bytes a call moves (module table).
pub fn bytes(p: &Fp8HostProblem) -> f64 {
    let rows_q = (p.batch * p.s_q * p.h_q) as f64;
    rows_read(p) as f64 * p.layout.bytes_per_token() as f64
        + rows_q * (BF16_BYTES * (p.layout.head_dim_k() + HEAD_DIM_V)) as f64
}

/// FLOPs of a call (module table).
pub fn flops(p: &Fp8HostProblem) -> f64 {
    2.0 * p.h_q as f64 * rows_read(p) as f64 * (p.layout.head_dim_k() + HEAD_DIM_V) as f64
}

/// Float64 reference of query row `(i, t, h)` of a sparse problem: its 512 outputs rounded to bf16 and its lse.
/// Keys are the library's dequantised rows (exact for the quantiser's power-of-two scales); every sum is float64.
pub fn reference_row(p: &Fp8HostProblem, i: usize, t: usize, h: usize) -> CliResult<(Vec<f64>, f64)> {
    let Fp8HostMode::Sparse { attn_sink, .. } = &p.mode else {
        return Err(cli_err!("the float64 reference covers sparse problems only"));
    };
    let d = p.layout.head_dim_k();
    let scale = p.softmax_scale.unwrap_or_else(|| p.layout.default_softmax_scale()) as f64;
    let q: Vec<f64> = (0..d).map(|c| p.q_at(i, t, h, c) as f64).collect();
    let mut keys: Vec<Vec<f32>> = Vec::new();
    for sel in selections(p) {
        for x in read_entries(sel, p.s_q, i, t) {
            let mut row = vec![0f32; d];
            let ps = sel.cache.page_size;
            sel.cache.dequantize_token(x / ps, x % ps, &mut row)?;
            keys.push(row);
        }
    }
    if keys.is_empty() {
        return Ok((vec![0.0; HEAD_DIM_V], f64::INFINITY));
    }
    let scores: Vec<f64> =
        keys.iter().map(|k| scale * q.iter().zip(k).map(|(&a, &b)| a * b as f64).sum::<f64>()).collect();
    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
    let lse = m + z.ln();
    let sink = attn_sink.as_ref().map_or(1.0, |s| 1.0 / (1.0 + (s[h] as f64 - lse).exp()));
    let mut out = vec![0f64; HEAD_DIM_V];
    for (k, s) in keys.iter().zip(&scores) {
        let w = (s - m).exp() / z;
        for (o, &v) in out.iter_mut().zip(k) {
            *o += w * v as f64;
        }
    }
    Ok((out.into_iter().map(|x| bf16_to_f32(f32_to_bf16((x * sink) as f32)) as f64).collect(), lse))
}

/// A cache's bytes as the `[num_blocks, page_size, 1, bytes_per_token]` C-ordered array `decode` reads: each page
/// block's `page_size · bytes_per_token` bytes, without the stride's padding (docs/sparse-fp8.md).
fn packed(c: &Fp8Cache) -> Vec<u8> {
    let len = c.page_size * c.layout.bytes_per_token();
    c.bytes.chunks(c.block_stride).flat_map(|b| &b[..len]).copied().collect()
}

/// Writes a sparse problem and the backend's outputs to `dir` as `flashmla decode --fp8-cache` inputs; returns
/// the decode options that read them back.
pub fn save(dir: &Path, p: &Fp8HostProblem, got: &HostOutputs) -> CliResult<String> {
    let Fp8HostMode::Sparse { main, extra, attn_sink } = &p.mode else {
        return Err(cli_err!("--save covers sparse problems only"));
    };
    std::fs::create_dir_all(dir).map_err(|e| cli_err!("{}: cannot create: {e}", dir.display()))?;
    let (b, s_q, h_q) = (p.batch, p.s_q, p.h_q);
    let f = |name: &str| dir.join(name);
    let q: Vec<f32> = p.q.iter().map(|&x| bf16_to_f32(x)).collect();
    npy::write_f32(&f("q.npy"), &[b, s_q, h_q, p.layout.head_dim_k()], &q)?;
    let mut opts = format!("--q {d}/q.npy", d = dir.display());
    for (sel, prefix, flag) in std::iter::once((main, "", "")).chain(extra.as_ref().map(|e| (e, "extra_", "extra-"))) {
        let c = &sel.cache;
        npy::write_u8(&f(&format!("{prefix}kv.npy")), &c.shape(), &packed(c))?;
        npy::write_i32(&f(&format!("{prefix}indices.npy")), &[b, s_q, sel.topk], &sel.indices)?;
        let d = dir.display();
        let kv_flag = if prefix.is_empty() { "kv-cache" } else { "extra-k-cache" };
        opts += &format!(" --{kv_flag} {d}/{prefix}kv.npy --{flag}indices {d}/{prefix}indices.npy");
        if let Some(len) = &sel.topk_length {
            npy::write_i32(&f(&format!("{prefix}topk_length.npy")), &[b], len)?;
            opts += &format!(" --{flag}topk-length {d}/{prefix}topk_length.npy");
        }
    }
    if let Some(sink) = attn_sink {
        npy::write_f32(&f("attn_sink.npy"), &[h_q], sink)?;
        opts += &format!(" --attn-sink {}/attn_sink.npy", dir.display());
    }
    npy::write_f32(&f("out.npy"), &[b, s_q, h_q, HEAD_DIM_V], &got.out)?;
    npy::write_f32(&f("lse.npy"), &[b, h_q, s_q], &got.lse)?;
    Ok(opts)
}
