//! `flashmla decode --fp8-cache`: one decode over FP8 caches (docs/sparse-fp8.md), `.npy` files in and out.
//!
//! | option | .npy dtype | shape | mode |
//! |---|---|---|---|
//! | `--q` | float32/float16/float64 (rounded to bf16), or raw 2-byte bf16 | `[b, s_q, h_q, d_qk]` (576 V3.2, 512 MODEL1) | both |
//! | `--kv-cache` | uint8, int8 or `'|V1'` (the cache's bytes) | `[num_blocks, page_size, 1, 656 \| 584]`: the last dimension names the layout | both |
//! | `--indices` | int32 or int64 (each value range-checked into int32) | `[b, s_q, topk]` | sparse |
//! | `--topk-length` | int32 or int64 | `[b]` | sparse, optional |
//! | `--attn-sink` | float32 (float16/float64 converted) | `[h_q]` | sparse, optional |
//! | `--extra-k-cache` | as `--kv-cache`, same layout | `[num_blocks', page_size', 1, bytes_per_token]` | sparse, optional |
//! | `--extra-indices` | int32 or int64 | `[b, s_q, extra_topk]`; required with `--extra-k-cache` | sparse |
//! | `--extra-topk-length` | int32 or int64 | `[b]` | sparse, optional |
//! | `--block-table`, `--seqlens` | int32 or int64 | `[b, max_blocks_per_seq]`, `[b]` | dense (V3.2) |
//! | `--out` (written) | float32 | `[b, s_q, h_q, 512]`: the bf16 values, widened | both |
//! | `--lse` (written) | float32 | `[b, h_q, s_q]` | both |
//!
//! A `.npy` array is C-ordered, so a cache read here has its page blocks back to back (`page_size · bytes_per_token`
//! apart). That holds every byte of a MODEL1 block too: upstream's padding to 576 bytes lies past a block's
//! `584 · page_size` bytes (docs/sparse-fp8.md), so a contiguous copy of its `[num_blocks, page_size, 1, 584]` view
//! loses nothing the decode reads.

use std::path::Path;

use mla_core::dtype::f32_to_bf16;
use mla_core::{DType, Fp8Cache, Fp8Layout, HEAD_DIM_V};
use mla_cpu::fp8problem::{Fp8HostMode, Fp8HostProblem, Fp8Selection};

use crate::args::{CliResult, DecodeArgs};
use crate::decode::{named, positive_scale, read_i32};
use crate::npy::{self, Elements};
use crate::{cli_err, exec};

/// The cache layouts' sizes, for messages.
fn layouts_text() -> String {
    Fp8Layout::ALL.map(|l| format!("{} ({})", l.bytes_per_token(), l.name())).join(" or ")
}

/// Reads an FP8 cache: the bytes of `[num_blocks, page_size, 1, bytes_per_token]`, layout from the last dimension.
fn read_cache(path: &Path) -> CliResult<Fp8Cache> {
    let (shape, data) = npy::read_elements(path)?;
    let p = path.display();
    let Elements::Bits8(bytes) = data else {
        return Err(cli_err!(
            "{p}: expected the cache's bytes (uint8, int8 or '|V1' elements), got {}",
            match data {
                Elements::Values(_) => "floating-point values (quantise them first: docs/sparse-fp8.md)",
                _ => "2-byte elements",
            }
        ));
    };
    let layout = match shape.as_slice() {
        [_, _, _, bpt] => Fp8Layout::from_bytes_per_token(*bpt),
        _ => None,
    };
    let Some(layout) = layout else {
        return Err(cli_err!(
            "{p}: expected an array of shape [num_blocks, page_size, 1, bytes_per_token] with bytes_per_token {}, got \
             shape {shape:?}",
            layouts_text()
        ));
    };
    let (num_blocks, page_size) = (shape[0], shape[1]);
    if num_blocks == 0 || page_size == 0 || shape[2] != 1 {
        return Err(cli_err!(
            "{p}: expected num_blocks >= 1, page_size >= 1 and 1 KV head (dim 2), got shape {shape:?}"
        ));
    }
    // C order: page blocks back to back (module docs).
    let block_stride = page_size * layout.bytes_per_token();
    Ok(Fp8Cache { layout, num_blocks, page_size, block_stride, bytes })
}

/// Reads the bf16 queries `[b, s_q, h_q, d_qk]` of `layout`: floats rounded to nearest even, raw 2-byte elements
/// taken as bf16 bits.
fn read_q(path: &Path, layout: Fp8Layout) -> CliResult<(Vec<usize>, Vec<u16>)> {
    let (shape, data) = npy::read_elements(path)?;
    let p = path.display();
    let d = layout.head_dim_k();
    if shape.len() != 4 || shape[3] != d {
        return Err(cli_err!(
            "{p}: expected an array of shape [b, s_q, h_q, {d}] (d_qk of the {} layout of --kv-cache), got shape \
             {shape:?}",
            layout.name()
        ));
    }
    if shape[..3].contains(&0) {
        return Err(cli_err!("{p}: every dimension must be >= 1, got shape {shape:?}"));
    }
    let bits = match data {
        Elements::Values(v) => v.into_iter().map(f32_to_bf16).collect(),
        Elements::Bits16(v) => v,
        Elements::Bits8(_) => {
            return Err(cli_err!("{p}: holds raw 1-byte elements; queries over an FP8 cache are bf16"));
        }
    };
    Ok((shape, bits))
}

/// Reads an index file `[b, s_q, k]` whose first two dimensions must match q's.
fn read_selection(path: &Path, what: &str, b: usize, s_q: usize) -> CliResult<(usize, Vec<i32>)> {
    let (shape, v) = read_i32(path, &format!("[b, s_q, {what}]"), 3)?;
    if shape[0] != b || shape[1] != s_q {
        return Err(cli_err!(
            "{}: expected shape [{b}, {s_q}, {what}] (b and s_q of --q), got shape {shape:?}",
            path.display()
        ));
    }
    Ok((shape[2], v))
}

/// Reads a per-request length file `[b]`.
fn read_lengths(path: &Path, b: usize) -> CliResult<Vec<i32>> {
    let (shape, v) = read_i32(path, "[b]", 1)?;
    if shape[0] != b {
        return Err(cli_err!("{}: expected {b} lengths (the batch of --q), got shape {shape:?}", path.display()));
    }
    Ok(v)
}

/// Reads the sinks `[h_q]`.
fn read_sink(path: &Path, h_q: usize) -> CliResult<Vec<f32>> {
    let (shape, data) = npy::read_elements(path)?;
    let p = path.display();
    let Elements::Values(v) = data else {
        return Err(cli_err!("{p}: expected a float32 array (float16 and float64 are converted), got raw elements"));
    };
    if shape != [h_q] {
        return Err(cli_err!("{p}: expected shape [{h_q}] (h_q of --q), got shape {shape:?}"));
    }
    Ok(v)
}

/// The mode's arguments that do not apply: `(option, given)`, rejected by name.
fn reject(mode: &str, options: &[(&str, bool)]) -> CliResult {
    match options.iter().find(|(_, given)| *given) {
        Some((name, _)) => Err(cli_err!("--{name} does not apply to {mode}")),
        None => Ok(()),
    }
}

/// Runs `flashmla decode --fp8-cache`.
pub fn run(args: &DecodeArgs) -> CliResult {
    if let Some(d) = args.dtype
        && d != DType::Bf16
    {
        return Err(cli_err!("--dtype: a decode over an FP8 cache takes bf16 queries, got --dtype {d}"));
    }
    reject(
        "a decode over an FP8 cache (its scales are in the cache)",
        &[("descale-q", args.descale_q.is_some()), ("descale-k", args.descale_k.is_some())],
    )?;
    let softmax_scale = positive_scale("softmax-scale", args.softmax_scale)?;
    let cache = named("kv-cache", read_cache(&args.kv_cache))?;
    let layout = cache.layout;
    let (qs, q) = named("q", read_q(&args.q, layout))?;
    let (b, s_q, h_q) = (qs[0], qs[1], qs[2]);

    let mode = match &args.indices {
        Some(indices) => {
            reject(
                "a sparse decode (--indices)",
                &[
                    ("block-table", args.block_table.is_some()),
                    ("seqlens", args.seqlens.is_some()),
                    ("causal", args.causal),
                ],
            )?;
            let (topk, indices) = named("indices", read_selection(indices, "topk", b, s_q))?;
            let topk_length =
                args.topk_length.as_ref().map(|p| named("topk-length", read_lengths(p, b))).transpose()?;
            let attn_sink = args.attn_sink.as_ref().map(|p| named("attn-sink", read_sink(p, h_q))).transpose()?;
            let extra = match (&args.extra_k_cache, &args.extra_indices) {
                (None, None) => {
                    reject(
                        "a decode without --extra-k-cache",
                        &[("extra-topk-length", args.extra_topk_length.is_some())],
                    )?;
                    None
                }
                (None, Some(_)) => return Err(cli_err!("--extra-indices needs --extra-k-cache")),
                (Some(_), None) => return Err(cli_err!("--extra-k-cache needs --extra-indices (its selection)")),
                (Some(kv), Some(ind)) => {
                    let cache = named("extra-k-cache", read_cache(kv))?;
                    if cache.layout != layout {
                        return Err(cli_err!(
                            "--extra-k-cache {}: a {} cache, but --kv-cache is {} (both must have one layout)",
                            kv.display(),
                            cache.layout.name(),
                            layout.name()
                        ));
                    }
                    let (topk, indices) = named("extra-indices", read_selection(ind, "extra_topk", b, s_q))?;
                    let topk_length = args
                        .extra_topk_length
                        .as_ref()
                        .map(|p| named("extra-topk-length", read_lengths(p, b)))
                        .transpose()?;
                    Some(Fp8Selection { cache, indices, topk, topk_length })
                }
            };
            Fp8HostMode::Sparse { main: Fp8Selection { cache, indices, topk, topk_length }, extra, attn_sink }
        }
        None => {
            if let Some(name) = [
                ("topk-length", args.topk_length.is_some()),
                ("attn-sink", args.attn_sink.is_some()),
                ("extra-k-cache", args.extra_k_cache.is_some()),
                ("extra-indices", args.extra_indices.is_some()),
                ("extra-topk-length", args.extra_topk_length.is_some()),
            ]
            .into_iter()
            .find_map(|(n, given)| given.then_some(n))
            {
                return Err(cli_err!("--{name} applies to a sparse decode: give --indices too"));
            }
            let (Some(bt), Some(sl)) = (&args.block_table, &args.seqlens) else {
                return Err(cli_err!("--block-table and --seqlens are required (dense decode: no --indices)"));
            };
            let (bts, block_table) = named("block-table", read_i32(bt, "[b, max_blocks_per_seq]", 2))?;
            if bts[0] != b {
                return Err(cli_err!(
                    "--block-table {}: expected {b} rows (the batch of --q), got shape {bts:?}",
                    bt.display()
                ));
            }
            let seqlens = named("seqlens", read_lengths(sl, b))?;
            Fp8HostMode::Dense { cache, block_table, max_blocks_per_seq: bts[1], seqlens, causal: args.causal }
        }
    };
    let sparse = matches!(mode, Fp8HostMode::Sparse { .. });
    let host = Fp8HostProblem { layout, batch: b, s_q, h_q, q, mode, softmax_scale };
    let backend = flashmla::open_backend(&args.backend, args.device)?;
    let outs = exec::run_fp8(backend.as_ref(), &host)?;
    npy::write_f32(&args.out, &[b, s_q, h_q, HEAD_DIM_V], &outs.out)?;
    npy::write_f32(&args.lse, &[b, h_q, s_q], &outs.lse)?;
    println!(
        "decode on {} ({}): {} over an FP8 {} cache, b={b} s_q={s_q} h_q={h_q}{}; wrote {} [{b}, {s_q}, {h_q}, \
         {HEAD_DIM_V}] and {} [{b}, {h_q}, {s_q}]",
        backend.name(),
        backend.capabilities().device_name,
        if sparse { "sparse" } else { "dense" },
        layout.name(),
        if args.causal { " causal" } else { "" },
        args.out.display(),
        args.lse.display(),
    );
    Ok(())
}
