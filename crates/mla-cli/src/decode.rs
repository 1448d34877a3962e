//! `flashmla decode`: one decode step from `.npy` files to `.npy` files.
//!
//! | file | .npy dtype | shape |
//! |---|---|---|
//! | `--q` | float32/float16/float64, or raw `--dtype` elements ([`npy::read_elements`]) | `[b, s_q, h_q, 576]`; values are rounded to `--dtype` (e4m3: `e4m3(x / descale_q)`) |
//! | `--kv-cache` | as `--q` | `[num_blocks, page_size, h_kv, 576]`, rounded likewise with `descale_k` |
//! | `--block-table` | int32 or int64 | `[b, max_blocks_per_seq]` |
//! | `--seqlens` | int32 or int64 | `[b]` |
//! | `--out` (written) | float32 | `[b, s_q, h_q, 512]`: the out-dtype values, widened |
//! | `--lse` (written) | float32 | `[b, h_q, s_q]` |
//!
//! `--fp8-cache` reads a decode over an FP8 cache instead ([`crate::decode_fp8`]).

use std::path::Path;

use mla_core::{DType, Fp8Layout, HEAD_DIM_K, HEAD_DIM_V};
use mla_cpu::problem::{Elems, HostProblem};

use crate::args::{CliResult, DecodeArgs};
use crate::npy::Elements;
use crate::{cli_err, exec, npy};

/// Reads q or the KV cache (rank 4, last dimension 576) as `dtype` elements: values rounded (e4m3: divided by
/// `descale` first), raw elements taken as they are when their width is the dtype's.
fn read_input(path: &Path, what: &str, dtype: DType, descale: f32) -> CliResult<(Vec<usize>, Elems)> {
    let (shape, data) = npy::read_elements(path)?;
    let p = path.display();
    if shape.len() == 4 && matches!(data, Elements::Bits8(_)) && Fp8Layout::from_bytes_per_token(shape[3]).is_some() {
        return Err(cli_err!(
            "{p}: shape {shape:?} of bytes looks like an FP8 cache; pass --fp8-cache to read it as one"
        ));
    }
    if shape.len() != 4 || shape[3] != HEAD_DIM_K {
        return Err(cli_err!("{p}: expected an array of shape {what}, got shape {shape:?}"));
    }
    let elems = match (data, dtype) {
        (Elements::Values(v), _) => Elems::encode(dtype, &v, descale),
        (Elements::Bits16(v), DType::Bf16 | DType::F16) => Elems::U16(v),
        (Elements::Bits8(v), DType::E4M3) => Elems::U8(v),
        (Elements::Bits16(_), _) => {
            return Err(cli_err!("{p}: holds raw 2-byte elements (bf16 or fp16), but --dtype is {dtype}"));
        }
        (Elements::Bits8(_), _) => {
            return Err(cli_err!("{p}: holds raw 1-byte elements (e4m3 codes), but --dtype is {dtype}"));
        }
    };
    Ok((shape, elems))
}

pub fn read_i32(path: &Path, what: &str, rank: usize) -> CliResult<(Vec<usize>, Vec<i32>)> {
    let (shape, data) = npy::read_indices(path)?;
    if shape.len() != rank {
        return Err(cli_err!("{}: expected an integer array of shape {what}, got shape {shape:?}", path.display()));
    }
    Ok((shape, data))
}

pub fn positive_scale(name: &str, v: Option<f32>) -> CliResult<Option<f32>> {
    if let Some(x) = v
        && !(x.is_finite() && x > 0.0)
    {
        return Err(cli_err!("--{name}: expected a finite value > 0, got {x}"));
    }
    Ok(v)
}

/// `--name FILE: message`: an input file's error, naming the option it came from.
pub fn named<T>(flag: &str, r: CliResult<T>) -> CliResult<T> {
    r.map_err(|e| cli_err!("--{flag} {e}"))
}

/// The FP8-only options that were given (they need `--fp8-cache`).
fn fp8_only_given(args: &DecodeArgs) -> Option<&'static str> {
    [
        ("indices", args.indices.is_some()),
        ("topk-length", args.topk_length.is_some()),
        ("attn-sink", args.attn_sink.is_some()),
        ("extra-k-cache", args.extra_k_cache.is_some()),
        ("extra-indices", args.extra_indices.is_some()),
        ("extra-topk-length", args.extra_topk_length.is_some()),
    ]
    .into_iter()
    .find(|(_, given)| *given)
    .map(|(name, _)| name)
}

/// Runs `flashmla decode`.
pub fn run(args: &DecodeArgs) -> CliResult {
    if args.fp8_cache {
        return crate::decode_fp8::run(args);
    }
    if let Some(name) = fp8_only_given(args) {
        return Err(cli_err!("--{name} applies to a decode over an FP8 cache: give --fp8-cache too"));
    }
    let (Some(block_table_path), Some(seqlens_path)) = (&args.block_table, &args.seqlens) else {
        return Err(cli_err!("--block-table and --seqlens are required (dense decode)"));
    };
    let dtype = args.dtype.unwrap_or(DType::Bf16);
    let softmax_scale = positive_scale("softmax-scale", args.softmax_scale)?;
    let descale_q = positive_scale("descale-q", args.descale_q)?;
    let descale_k = positive_scale("descale-k", args.descale_k)?;
    if dtype != DType::E4M3 && (descale_q.is_some() || descale_k.is_some()) {
        return Err(cli_err!("--descale-q/--descale-k apply to --dtype e4m3 only (got --dtype {dtype})"));
    }
    let (q_path, kv_path) = (args.q.display().to_string(), args.kv_cache.display().to_string());
    let (bt_path, sl_path) = (block_table_path.display().to_string(), seqlens_path.display().to_string());
    let (out_path, lse_path) = (args.out.display().to_string(), args.lse.display().to_string());
    let causal = args.causal;
    let (dq, dk) = (descale_q.unwrap_or(1.0), descale_k.unwrap_or(1.0));

    let (qs, q) = named("q", read_input(&args.q, "[b, s_q, h_q, 576]", dtype, dq))?;
    let (ks, kv) = named("kv-cache", read_input(&args.kv_cache, "[num_blocks, page_size, h_kv, 576]", dtype, dk))?;
    let (bts, block_table) = named("block-table", read_i32(block_table_path, "[b, max_blocks_per_seq]", 2))?;
    let (sls, seqlens) = named("seqlens", read_i32(seqlens_path, "[b]", 1))?;
    let (b, s_q, h_q) = (qs[0], qs[1], qs[2]);
    let (num_blocks, page_size, h_kv) = (ks[0], ks[1], ks[2]);
    if b == 0 || s_q == 0 || h_q == 0 {
        return Err(cli_err!("{q_path}: every dimension must be >= 1, got shape {qs:?}"));
    }
    if num_blocks == 0 || page_size == 0 || h_kv == 0 {
        return Err(cli_err!("{kv_path}: every dimension must be >= 1, got shape {ks:?}"));
    }
    if !h_q.is_multiple_of(h_kv) {
        return Err(cli_err!("{kv_path}: h_kv = {h_kv} (dim 2) must divide h_q = {h_q} (dim 2 of {q_path})"));
    }
    if bts[0] != b {
        return Err(cli_err!("{bt_path}: expected {b} rows (the batch of {q_path}), got shape {bts:?}"));
    }
    if sls[0] != b {
        return Err(cli_err!("{sl_path}: expected {b} lengths (the batch of {q_path}), got shape {sls:?}"));
    }

    let host = HostProblem {
        dtype,
        batch: b,
        s_q,
        h_q,
        h_kv,
        page_size,
        num_blocks,
        max_blocks_per_seq: bts[1],
        q,
        kv,
        block_table,
        seqlens,
        causal,
        softmax_scale,
        descale_q: dq,
        descale_k: dk,
    };
    let backend = flashmla::open_backend(&args.backend, args.device)?;
    let outs = exec::run_decode(backend.as_ref(), &host)?;
    npy::write_f32(&args.out, &[b, s_q, h_q, HEAD_DIM_V], &outs.out)?;
    npy::write_f32(&args.lse, &[b, h_q, s_q], &outs.lse)?;
    println!(
        "decode on {} ({}): b={b} s_q={s_q} h_q={h_q} h_kv={h_kv} page_size={page_size} {dtype}{}; wrote {out_path} \
         [{b}, {s_q}, {h_q}, {HEAD_DIM_V}] and {lse_path} [{b}, {h_q}, {s_q}]",
        backend.name(),
        backend.capabilities().device_name,
        if causal { " causal" } else { "" },
    );
    Ok(())
}
