//! `flash_mla_with_kvcache(..., is_fp8_kvcache=True)`: decode over an FP8 cache (DeepSeek V3.2's 656-byte or
//! MODEL1's 584-byte token layout, picked by `k_cache.shape[-1]`), upstream HEAD's call: sparse with `indices`
//! (top-k rows per query token, optional `attn_sink`, `topk_length` and an extra cache), or dense with
//! `block_table` and `cache_seqlens`. It maps one-to-one onto [`flashmla::MlaBackend::fp8_decode`]; the semantics are
//! in docs/sparse-fp8.md. The schedule is upstream HEAD's: a `FlashMLASchedMeta` that the first call fills (the
//! scheduler works on the selection lengths, which only the decode call sees).

use flashmla::sparse::{Fp8DecodeArgs, Fp8Shape};
use flashmla::{ScalarType, TensorDesc, Workspace};
use pyo3::prelude::*;

use crate::alloc::Allocator;
use crate::args::{Arg, Repr, describe, describe_opt};
use crate::errors::{OrRaise, invalid};
use crate::{FUNC_DECODE as FUNC, METADATA_WORDS, Schedule, ScheduleConfig, backend_for};

/// The sparse-mode arguments of upstream HEAD's `flash_mla_with_kvcache`, as the caller passed them.
pub struct SparseArgs<'a, 'py> {
    pub indices: Option<&'a Bound<'py, PyAny>>,
    pub attn_sink: Option<&'a Bound<'py, PyAny>>,
    pub extra_k_cache: Option<&'a Bound<'py, PyAny>>,
    pub extra_indices_in_kvcache: Option<&'a Bound<'py, PyAny>>,
    pub topk_length: Option<&'a Bound<'py, PyAny>>,
    pub extra_topk_length: Option<&'a Bound<'py, PyAny>>,
}

impl SparseArgs<'_, '_> {
    /// The first argument given (not None), by name: they only mean something over an FP8 cache.
    pub fn first_given(&self) -> Option<&'static str> {
        [
            ("indices", self.indices),
            ("attn_sink", self.attn_sink),
            ("extra_k_cache", self.extra_k_cache),
            ("extra_indices_in_kvcache", self.extra_indices_in_kvcache),
            ("topk_length", self.topk_length),
            ("extra_topk_length", self.extra_topk_length),
        ]
        .into_iter()
        .find(|(_, v)| v.is_some_and(|v| !v.is_none()))
        .map(|(name, _)| name)
    }
}

fn dim(a: &Option<Arg<'_>>, i: usize) -> Option<i64> {
    a.as_ref().and_then(|a| a.dims().get(i).copied())
}

fn last_dim(a: &Option<Arg<'_>>) -> Option<i64> {
    a.as_ref().and_then(|a| a.dims().last().copied())
}

/// Runs the FP8 decode; returns `(out, lse)` in `q`'s framework.
#[allow(clippy::too_many_arguments)] // upstream's signature
pub fn decode<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k_cache: &Bound<'py, PyAny>,
    block_table: &Bound<'py, PyAny>,
    cache_seqlens: &Bound<'py, PyAny>,
    head_dim_v: usize,
    tile_scheduler_metadata: &Bound<'py, PyAny>,
    num_splits: Option<&Bound<'py, PyAny>>,
    softmax_scale: Option<f32>,
    causal: bool,
    sparse: &SparseArgs<'_, 'py>,
    q_hint: Option<ScalarType>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    // The schedule depends on the selection lengths (topk_length, extra_topk_length), which get_mla_metadata's
    // 2025 form never sees: only upstream HEAD's schedule object fits.
    let Ok(sched) = tile_scheduler_metadata.cast::<Schedule>() else {
        return Err(invalid(
            py,
            FUNC,
            "tile_scheduler_metadata",
            "a FlashMLASchedMeta from get_mla_metadata() (FP8 caches use upstream HEAD's schedule)",
            tile_scheduler_metadata.get_type().name()?,
        ));
    };
    crate::no_num_splits_with_schedule(py, num_splits)?;
    // q is bf16 (raw uint16 bits allowed for NumPy); the caches are bytes: uint8/int8 or float8_e4m3fn.
    let qa = describe(py, FUNC, "q", q, q_hint.or(Some(ScalarType::Bf16)))?;
    let ka = describe(py, FUNC, "k_cache", k_cache, Some(ScalarType::E4M3))?;
    let bt = describe_opt(py, FUNC, "block_table", Some(block_table), None)?;
    let sl = describe_opt(py, FUNC, "cache_seqlens", Some(cache_seqlens), None)?;
    let indices = describe_opt(py, FUNC, "indices", sparse.indices, None)?;
    let sink = describe_opt(py, FUNC, "attn_sink", sparse.attn_sink, None)?;
    let extra_k = describe_opt(py, FUNC, "extra_k_cache", sparse.extra_k_cache, Some(ScalarType::E4M3))?;
    let extra_idx = describe_opt(py, FUNC, "extra_indices_in_kvcache", sparse.extra_indices_in_kvcache, None)?;
    let topk_len = describe_opt(py, FUNC, "topk_length", sparse.topk_length, None)?;
    let extra_len = describe_opt(py, FUNC, "extra_topk_length", sparse.extra_topk_length, None)?;

    // Output shapes come from q; a q the library will reject gets empty outputs, so that its message reaches the caller.
    let (b, s_q, h_q) = match qa.dims() {
        [b, s, h, _] => ((*b).max(0), (*s).max(0), (*h).max(0)),
        _ => (0, 0, 0),
    };
    let backend = backend_for(qa.desc.device()).or_raise(py, FUNC)?;
    let alloc = Allocator::new(py, FUNC, &qa)?;
    let out = alloc.empty("out", &[b, s_q, h_q, head_dim_v as i64], ScalarType::Bf16, qa.repr)?;
    let lse = alloc.empty("lse", &[b, h_q, s_q], ScalarType::F32, Repr::Native)?;
    let stream = alloc.stream()?;

    let args = |meta: TensorDesc<'py>, splits: TensorDesc<'py>| Fp8DecodeArgs {
        q: qa.desc,
        k_cache: ka.desc,
        block_table: bt.as_ref().map(|a| a.desc),
        cache_seqlens: sl.as_ref().map(|a| a.desc),
        head_dim_v,
        tile_scheduler_metadata: meta,
        num_splits: splits,
        softmax_scale,
        causal,
        indices: indices.as_ref().map(|a| a.desc),
        attn_sink: sink.as_ref().map(|a| a.desc),
        extra_k_cache: extra_k.as_ref().map(|a| a.desc),
        extra_indices_in_kvcache: extra_idx.as_ref().map(|a| a.desc),
        topk_length: topk_len.as_ref().map(|a| a.desc),
        extra_topk_length: extra_len.as_ref().map(|a| a.desc),
        out: out.desc,
        lse: lse.desc,
    };

    let want = ScheduleConfig {
        b,
        s_q,
        h_q,
        page_block_size: ka.dims().get(1).copied().unwrap_or(0),
        h_k: ka.dims().get(2).copied().unwrap_or(0),
        causal,
        device: qa.desc.device(),
        is_fp8_kvcache: true,
        topk: last_dim(&indices),
        extra_page_block_size: dim(&extra_k, 1),
        extra_topk: last_dim(&extra_idx),
    };
    let (meta_obj, splits_obj) = {
        let mut s = sched.borrow_mut();
        match s.config {
            Some(have) => {
                have.check_same(py, &want)?;
                let m = s.metadata.as_ref().map(|m| m.bind(py).clone()).expect("a filled schedule has metadata");
                let n = s.num_splits.as_ref().map(|m| m.bind(py).clone()).expect("a filled schedule has splits");
                (m, n)
            }
            None => {
                let parts = backend.fp8_num_sm_parts(s_q.max(1) as usize, h_q.max(1) as usize) as i64;
                let meta =
                    alloc.empty("tile_scheduler_metadata", &[parts, METADATA_WORDS], ScalarType::I32, Repr::Native)?;
                let splits = alloc.empty("num_splits", &[b + 1], ScalarType::I32, Repr::Native)?;
                backend.fp8_get_metadata(&args(meta.desc, splits.desc), stream).or_raise(py, FUNC)?;
                s.metadata = Some(meta.obj.clone().unbind());
                s.num_splits = Some(splits.obj.clone().unbind());
                s.config = Some(want);
                (meta.obj, splits.obj)
            }
        }
    };
    let meta = describe(py, FUNC, "tile_scheduler_metadata", &meta_obj, None)?;
    let splits = describe(py, FUNC, "num_splits", &splits_obj, None)?;

    // An invalid shape gets no workspace: the decode call below reports it in full.
    let shape = Fp8Shape { batch: b as usize, s_q: s_q as usize, h_q: h_q as usize };
    let bytes = if b > 0 && s_q > 0 && h_q > 0 { backend.fp8_workspace_size(&shape).unwrap_or(0) } else { 0 };
    let (_ws_owner, ws_ptr) = alloc.workspace(bytes)?;
    // SAFETY: `ws_ptr` is `bytes` bytes inside the buffer `_ws_owner` allocated above on q's device (or 0 with
    // `bytes` 0), held until the end of this function and referenced by nothing else.
    let workspace = unsafe { Workspace::from_raw(ws_ptr as *mut std::ffi::c_void, bytes, qa.desc.device()) };
    backend.fp8_decode(&args(meta.desc, splits.desc), workspace, stream).or_raise(py, FUNC)?;
    Ok((out.obj, lse.obj))
}
