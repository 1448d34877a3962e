//! What safe code can hand the CPU backend: only borrowed host views and host workspaces. Every way those can still
//! describe a bad call (an output that is a shared borrow, an output overlapping another argument, a workspace on
//! another device or too small) is refused before anything is read or written. (That safe code cannot build a
//! descriptor from an address is the compile-fail test of the `flashmla` crate.)

use half::bf16;
use mla_core::{
    DecodeArgs, Device, HEAD_DIM_K, HEAD_DIM_V, HostTensor, HostTensorMut, MetadataArgs, MlaBackend, Stream, Workspace,
};
use mla_cpu::CpuBackend;

/// One request of 10 tokens, one query head, page 64: everything a decode needs, in host vectors.
struct Small {
    q: Vec<bf16>,
    kv: Vec<bf16>,
    block_table: Vec<i32>,
    seqlens: Vec<i32>,
    meta: Vec<i32>,
    splits: Vec<i32>,
    out: Vec<bf16>,
    lse: Vec<f32>,
    ws: Vec<f32>,
}

impl Small {
    fn new(be: &CpuBackend) -> Small {
        let parts = be.num_sm_parts(1, 1);
        let mut s = Small {
            q: vec![bf16::from_f32(0.1); HEAD_DIM_K],
            kv: vec![bf16::from_f32(0.2); 64 * HEAD_DIM_K],
            block_table: vec![0],
            seqlens: vec![10],
            meta: vec![0; parts * 8],
            splits: vec![0; 2],
            out: vec![bf16::ZERO; HEAD_DIM_V],
            lse: vec![0.0],
            ws: vec![],
        };
        let shape = mla_core::DecodeShape { batch: 1, s_q: 1, h_q: 1, h_kv: 1, dtype: mla_core::DType::Bf16 };
        s.ws = vec![0.0; be.workspace_size(&shape).unwrap().div_ceil(4)];
        let seq = HostTensor::new(&s.seqlens, &[1]).unwrap();
        let meta = HostTensorMut::new(&mut s.meta, &[parts, 8]).unwrap();
        let splits = HostTensorMut::new(&mut s.splits, &[2]).unwrap();
        let args = MetadataArgs {
            cache_seqlens: seq.desc(),
            q_seq_per_hk: 1,
            h_kv: 1,
            tile_scheduler_metadata: meta.desc(),
            num_splits: splits.desc(),
        };
        be.get_mla_metadata(&args, Stream::DEFAULT).unwrap();
        s
    }
}

/// Calls decode on `s`'s inputs with the given outputs and workspace (so tests can substitute bad ones).
fn decode_with<'a>(
    be: &CpuBackend,
    s: &'a Small,
    out: mla_core::TensorDesc<'a>,
    lse: mla_core::TensorDesc<'a>,
    ws: Workspace<'a>,
) -> mla_core::Result<()> {
    let parts = s.meta.len() / 8;
    let args = DecodeArgs {
        q: HostTensor::new(&s.q, &[1, 1, 1, HEAD_DIM_K]).unwrap().desc(),
        k_cache: HostTensor::new(&s.kv, &[1, 64, 1, HEAD_DIM_K]).unwrap().desc(),
        block_table: HostTensor::new(&s.block_table, &[1, 1]).unwrap().desc(),
        cache_seqlens: HostTensor::new(&s.seqlens, &[1]).unwrap().desc(),
        head_dim_v: HEAD_DIM_V,
        tile_scheduler_metadata: HostTensor::new(&s.meta, &[parts, 8]).unwrap().desc(),
        num_splits: HostTensor::new(&s.splits, &[2]).unwrap().desc(),
        softmax_scale: None,
        causal: false,
        descale_q: None,
        descale_k: None,
        out,
        lse,
    };
    be.decode(&args, ws, Stream::DEFAULT)
}

fn expect_invalid(r: mla_core::Result<()>, needle: &str) {
    let e = r.expect_err("the call should be refused");
    assert!(e.is_invalid_argument() && e.to_string().contains(needle), "error `{e}` should name `{needle}`");
}

#[test]
fn host_views_decode() {
    let be = CpuBackend::new();
    let s = Small::new(&be);
    let (mut out, mut lse, mut ws) = (s.out.clone(), s.lse.clone(), s.ws.clone());
    let o = HostTensorMut::new(&mut out, &[1, 1, 1, HEAD_DIM_V]).unwrap();
    let l = HostTensorMut::new(&mut lse, &[1, 1, 1]).unwrap();
    decode_with(&be, &s, o.desc(), l.desc(), Workspace::host(&mut ws)).unwrap();
    // All keys equal: the output is the value row, 0.2 in bf16, and lse = ln 10 + the (common) scaled score.
    assert!(out.iter().all(|&x| x == bf16::from_f32(0.2)), "{:?}", &out[..4]);
    let score = 576.0 * bf16::from_f32(0.1).to_f64() * bf16::from_f32(0.2).to_f64() / 24.0;
    assert!((lse[0] as f64 - (score + 10f64.ln())).abs() < 1e-5, "lse {}", lse[0]);
}

#[test]
fn read_only_views_are_refused_as_outputs() {
    let be = CpuBackend::new();
    let mut s = Small::new(&be);
    let (out, mut lse, mut ws) = (s.out.clone(), s.lse.clone(), std::mem::take(&mut s.ws));
    let o = HostTensor::new(&out, &[1, 1, 1, HEAD_DIM_V]).unwrap();
    let l = HostTensorMut::new(&mut lse, &[1, 1, 1]).unwrap();
    expect_invalid(decode_with(&be, &s, o.desc(), l.desc(), Workspace::host(&mut ws)), "`out`");
    assert!(out.iter().all(|&x| x == bf16::ZERO), "a read-only view was written");

    // The scheduler step's outputs likewise.
    let seq = HostTensor::new(&s.seqlens, &[1]).unwrap();
    let parts = s.meta.len() / 8;
    let meta = HostTensor::new(&s.meta, &[parts, 8]).unwrap();
    let mut splits = vec![0; 2];
    let sp = HostTensorMut::new(&mut splits, &[2]).unwrap();
    let args = MetadataArgs {
        cache_seqlens: seq.desc(),
        q_seq_per_hk: 1,
        h_kv: 1,
        tile_scheduler_metadata: meta.desc(),
        num_splits: sp.desc(),
    };
    expect_invalid(be.get_mla_metadata(&args, Stream::DEFAULT), "`tile_scheduler_metadata`");
}

#[test]
fn outputs_and_workspace_may_not_overlap_other_arguments() {
    // Safe code cannot alias an output (the shapes and dtypes of the argument slots differ, and a writable view
    // borrows its slice uniquely); a C or Python caller can, so the check is exercised through `from_raw`, with
    // descriptors that describe live memory correctly and overlap.
    let be = CpuBackend::new();
    let s = Small::new(&be);
    let (mut lse, mut ws) = (s.lse.clone(), s.ws.clone());
    // SAFETY: the first 512 elements of `s.q` (576 bf16), live for the call; the call is refused before writing.
    let out_over_q = unsafe {
        mla_core::TensorDesc::from_raw_contiguous(
            s.q.as_ptr().cast_mut().cast(),
            mla_core::ScalarType::Bf16,
            &[1, 1, 1, HEAD_DIM_V as i64],
            Device::Host,
        )
    }
    .unwrap();
    let l = HostTensorMut::new(&mut lse, &[1, 1, 1]).unwrap();
    expect_invalid(decode_with(&be, &s, out_over_q, l.desc(), Workspace::host(&mut ws)), "disjoint from `q`");
    assert!(s.q.iter().all(|&x| x == bf16::from_f32(0.1)), "q was written");

    // `lse` inside the workspace.
    let mut out = s.out.clone();
    let o = HostTensorMut::new(&mut out, &[1, 1, 1, HEAD_DIM_V]).unwrap();
    let base = ws.as_mut_ptr();
    // SAFETY: element 0 of `ws` and the whole of `ws`, both live for the call, which is refused before writing.
    let (lse_in_ws, whole) = unsafe {
        (
            mla_core::TensorDesc::from_raw_contiguous(base.cast(), mla_core::ScalarType::F32, &[1, 1, 1], Device::Host)
                .unwrap(),
            Workspace::from_raw(base.cast(), ws.len() * 4, Device::Host),
        )
    };
    expect_invalid(decode_with(&be, &s, o.desc(), lse_in_ws, whole), "`workspace`");
}

#[test]
fn workspace_is_checked_once_for_size_and_device() {
    let be = CpuBackend::new();
    let s = Small::new(&be);
    let (mut out, mut lse, mut ws) = (s.out.clone(), s.lse.clone(), s.ws.clone());
    let o = HostTensorMut::new(&mut out, &[1, 1, 1, HEAD_DIM_V]).unwrap();
    let l = HostTensorMut::new(&mut lse, &[1, 1, 1]).unwrap();
    let short = ws.len() - 1;
    expect_invalid(decode_with(&be, &s, o.desc(), l.desc(), Workspace::host(&mut ws[..short])), "`workspace_bytes`");
    expect_invalid(decode_with(&be, &s, o.desc(), l.desc(), Workspace::EMPTY), "`workspace_bytes`");
    // SAFETY: a host buffer described as device memory: refused (device mismatch) before any access.
    let elsewhere = unsafe { Workspace::from_raw(ws.as_mut_ptr().cast(), ws.len() * 4, Device::Cuda(0)) };
    expect_invalid(decode_with(&be, &s, o.desc(), l.desc(), elsewhere), "`workspace.device`");
    assert!(out.iter().all(|&x| x == bf16::ZERO) && lse[0] == 0.0, "a refused call wrote its outputs");
}
