//! `flashmla decode`: one decode step from `.npy` files to `.npy` files.
//!
//! | file | .npy dtype | shape |
//! |---|---|---|
//! | `--q` | float32 | `[b, s_q, h_q, 576]`, rounded to `--dtype` (e4m3: `e4m3(x / descale_q)`) |
//! | `--kv-cache` | float32 | `[num_blocks, page_size, h_kv, 576]`, rounded likewise with `descale_k` |
//! | `--block-table` | int32 | `[b, max_blocks_per_seq]` |
//! | `--seqlens` | int32 | `[b]` |
//! | `--out` (written) | float32 | `[b, s_q, h_q, 512]`: the out-dtype values, widened |
//! | `--lse` (written) | float32 | `[b, h_q, s_q]` |

use std::path::Path;

use mla_core::{DType, HEAD_DIM_K, HEAD_DIM_V};
use mla_cpu::problem::{Elems, HostProblem};

use crate::args::{Args, CliResult};
use crate::{cli_err, exec, npy};

/// Reads a float32 array of rank `rank` whose last dimension (if `last` is set) is fixed.
fn read_f32(path: &str, what: &str, rank: usize, last: Option<usize>) -> CliResult<(Vec<usize>, Vec<f32>)> {
    let p = Path::new(path);
    let (shape, data) = npy::read(p)?.into_f32(p)?;
    if shape.len() != rank || last.is_some_and(|l| shape[rank - 1] != l) {
        return Err(cli_err!("{path}: expected a float32 array of shape {what}, got shape {shape:?}"));
    }
    Ok((shape, data))
}

fn read_i32(path: &str, what: &str, rank: usize) -> CliResult<(Vec<usize>, Vec<i32>)> {
    let p = Path::new(path);
    let (shape, data) = npy::read(p)?.into_i32(p)?;
    if shape.len() != rank {
        return Err(cli_err!("{path}: expected an int32 array of shape {what}, got shape {shape:?}"));
    }
    Ok((shape, data))
}

fn positive_scale(args: &Args, name: &str) -> CliResult<Option<f32>> {
    let v: Option<f32> = args.parsed(name)?;
    if let Some(x) = v
        && !(x.is_finite() && x > 0.0)
    {
        return Err(cli_err!("--{name}: expected a finite value > 0, got {x}"));
    }
    Ok(v)
}

/// Runs `flashmla decode`.
pub fn run(args: &Args) -> CliResult {
    let backend_name = args.value("backend").unwrap_or("auto").to_string();
    let ordinal: i32 = args.parsed_or("device", 0)?;
    let dtype = args.dtype()?;
    let q_path = args.required("q")?.to_string();
    let kv_path = args.required("kv-cache")?.to_string();
    let bt_path = args.required("block-table")?.to_string();
    let sl_path = args.required("seqlens")?.to_string();
    let out_path = args.required("out")?.to_string();
    let lse_path = args.required("lse")?.to_string();
    let causal = args.flag("causal");
    let softmax_scale = positive_scale(args, "softmax-scale")?;
    let descale_q = positive_scale(args, "descale-q")?;
    let descale_k = positive_scale(args, "descale-k")?;
    args.finish()?;
    if dtype != DType::E4M3 && (descale_q.is_some() || descale_k.is_some()) {
        return Err(cli_err!("--descale-q/--descale-k apply to --dtype e4m3 only (got --dtype {dtype})"));
    }

    let (qs, q) = read_f32(&q_path, "[b, s_q, h_q, 576]", 4, Some(HEAD_DIM_K))?;
    let (ks, kv) = read_f32(&kv_path, "[num_blocks, page_size, h_kv, 576]", 4, Some(HEAD_DIM_K))?;
    let (bts, block_table) = read_i32(&bt_path, "[b, max_blocks_per_seq]", 2)?;
    let (sls, seqlens) = read_i32(&sl_path, "[b]", 1)?;
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

    let (dq, dk) = (descale_q.unwrap_or(1.0), descale_k.unwrap_or(1.0));
    let host = HostProblem {
        dtype,
        batch: b,
        s_q,
        h_q,
        h_kv,
        page_size,
        num_blocks,
        max_blocks_per_seq: bts[1],
        q: Elems::encode(dtype, &q, dq),
        kv: Elems::encode(dtype, &kv, dk),
        block_table,
        seqlens,
        causal,
        softmax_scale,
        descale_q: dq,
        descale_k: dk,
    };
    let backend = flashmla::open_backend(&backend_name, ordinal)?;
    let outs = exec::run_decode(backend.as_ref(), &host)?;
    npy::write_f32(Path::new(&out_path), &[b, s_q, h_q, HEAD_DIM_V], &outs.out)?;
    npy::write_f32(Path::new(&lse_path), &[b, h_q, s_q], &outs.lse)?;
    println!(
        "decode on {} ({}): b={b} s_q={s_q} h_q={h_q} h_kv={h_kv} page_size={page_size} {dtype}{}; wrote {out_path} \
         [{b}, {s_q}, {h_q}, {HEAD_DIM_V}] and {lse_path} [{b}, {h_q}, {s_q}]",
        backend.name(),
        backend.capabilities().device_name,
        if causal { " causal" } else { "" },
    );
    Ok(())
}
