//! Decode over FP8 caches (sparse and dense, both layouts): arbitrary descriptors through `validate_fp8_decode`
//! and, when they stay inside their arenas, `fp8_get_metadata` + `fp8_decode` on the CPU backend; and a template
//! half that builds a valid small problem and then feeds the index tensors (indices, topk lengths, block table,
//! lengths) and the cache bytes (codes, scales: NaN and infinities included) arbitrary values, which is what the
//! reference's own gathering must survive. Nothing may panic; AddressSanitizer catches any access outside the
//! arenas.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::OnceLock;

use common::{Arenas, Reader};
use libfuzzer_sys::fuzz_target;
use mla_core::sparse::{Fp8DecodeArgs, Fp8Shape, validate_fp8_decode};
use mla_core::{Device, Fp8Layout, MlaBackend, ScalarType, Stream, TensorDesc, Workspace};

/// Argument slots: q, k_cache, block_table, cache_seqlens, metadata, num_splits, indices, attn_sink, extra_k_cache,
/// extra_indices, topk_length, extra_topk_length, out, lse.
const FP8_SLOTS: usize = 14;
const DTYPES: [ScalarType; 5] = [ScalarType::Bf16, ScalarType::E4M3, ScalarType::I32, ScalarType::F32, ScalarType::F16];
/// Upstream's V (and output) width.
const D_V: i64 = 512;

fn backend() -> &'static mla_cpu::CpuBackend {
    static CPU: OnceLock<mla_cpu::CpuBackend> = OnceLock::new();
    CPU.get_or_init(|| mla_cpu::CpuBackend::with_threads(1).expect("one thread"))
}

/// A valid small problem, then arbitrary index values and cache bytes.
fn template(r: &mut Reader, arenas: &mut Arenas) {
    let be = backend();
    let layout = Fp8Layout::ALL[r.u8() as usize % 2];
    let (b, s_q, h_q) = (1 + r.u8() as usize % 2, 1 + r.u8() as usize % 2, 1 + r.u8() as usize % 4);
    let page = [1usize, 4, 16][r.u8() as usize % 3];
    let num_blocks = 1 + r.u8() as usize % 3;
    let block_stride = layout.padded_block_bytes(page).expect("small pages");
    let sparse = r.u8() % 4 != 0 || layout == Fp8Layout::Model1; // dense decode exists for V3.2 only
    let topk = 1 + r.u8() as usize % 8;
    let extra = sparse && r.u8() % 2 == 0;
    let (topk_len, extra_len, sink) = (r.u8() % 2 == 0, extra && r.u8() % 2 == 0, sparse && r.u8() % 2 == 0);
    let i = |v: usize| v as i64;
    let d_qk = layout.head_dim_k();
    let bpt = layout.bytes_per_token();

    // Arbitrary contents for the index tensors and the caches' bytes (the arenas start with small values).
    for slot in [1usize, 2, 3, 6, 8, 9, 10, 11] {
        for _ in 0..(r.u8() % 16) {
            let at = r.u64() as usize % (common::ARENA_BYTES / 4);
            let v = r.int() as i32;
            // SAFETY: `at` is a 4-byte word inside the arena (ARENA_BYTES bytes, 8-byte aligned).
            unsafe { *arenas.base(slot).cast::<i32>().add(at) = v };
        }
    }
    // SAFETY (every descriptor below): it addresses its own arena only, within ARENA_BYTES for these sizes (at most
    // 3 blocks of 16 tokens of 656 bytes), and the arenas outlive the calls.
    let d = |arenas: &mut Arenas, slot: usize, dt: ScalarType, shape: &[i64]| unsafe {
        TensorDesc::from_raw_contiguous(arenas.base(slot).cast(), dt, shape, Device::Host).unwrap()
    };
    let cache = |arenas: &mut Arenas, slot: usize| unsafe {
        // SAFETY: as above; the block stride is upstream's (MODEL1 blocks padded to 576 bytes).
        TensorDesc::from_raw(
            arenas.base(slot).cast(),
            ScalarType::E4M3,
            &[i(num_blocks), i(page), 1, i(bpt)],
            &[i(block_stride), i(bpt), i(bpt), 1],
            Device::Host,
        )
        .unwrap()
    };
    let parts = be.fp8_num_sm_parts(s_q, h_q);
    let args = Fp8DecodeArgs {
        q: d(arenas, 0, ScalarType::Bf16, &[i(b), i(s_q), i(h_q), i(d_qk)]),
        k_cache: cache(arenas, 1),
        block_table: (!sparse).then(|| d(arenas, 2, ScalarType::I32, &[i(b), 3])),
        cache_seqlens: (!sparse).then(|| d(arenas, 3, ScalarType::I32, &[i(b)])),
        head_dim_v: D_V as usize,
        tile_scheduler_metadata: d(arenas, 4, ScalarType::I32, &[i(parts), 8]),
        num_splits: d(arenas, 5, ScalarType::I32, &[i(b) + 1]),
        softmax_scale: None,
        causal: !sparse && r.u8() % 2 == 0,
        indices: sparse.then(|| d(arenas, 6, ScalarType::I32, &[i(b), i(s_q), i(topk)])),
        attn_sink: sink.then(|| d(arenas, 7, ScalarType::F32, &[i(h_q)])),
        extra_k_cache: extra.then(|| cache(arenas, 8)),
        extra_indices_in_kvcache: extra.then(|| d(arenas, 9, ScalarType::I32, &[i(b), i(s_q), i(topk)])),
        topk_length: topk_len.then(|| d(arenas, 10, ScalarType::I32, &[i(b)])),
        extra_topk_length: extra_len.then(|| d(arenas, 11, ScalarType::I32, &[i(b)])),
        out: d(arenas, 12, ScalarType::Bf16, &[i(b), i(s_q), i(h_q), D_V]),
        lse: d(arenas, 13, ScalarType::F32, &[i(b), i(h_q), i(s_q)]),
    };
    let _ = be.fp8_get_metadata(&args, Stream::DEFAULT);
    let need = be.fp8_workspace_size(&Fp8Shape { batch: b, s_q, h_q }).unwrap_or(0);
    let mut ws = vec![0f32; need.div_ceil(4)];
    let _ = be.fp8_decode(&args, Workspace::host(&mut ws), Stream::DEFAULT);
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader(data);
    let mut arenas = Arenas::with_slots(&mut r, FP8_SLOTS);
    if r.u8() % 2 == 0 {
        return template(&mut r, &mut arenas);
    }
    let be = backend();
    let mut all_inside = true;
    // An argument (`optional`: absent half of the time) described into its arena.
    let mut next = |slot: usize, optional: bool, r: &mut Reader| {
        if optional && r.u8() % 2 == 0 {
            return None;
        }
        let (d, inside) = common::desc(r, &mut arenas, slot, &DTYPES);
        all_inside &= inside;
        Some(d)
    };
    let (q, k_cache) = (next(0, false, &mut r).unwrap(), next(1, false, &mut r).unwrap());
    let (block_table, cache_seqlens) = (next(2, true, &mut r), next(3, true, &mut r));
    let (tile_scheduler_metadata, num_splits) = (next(4, false, &mut r).unwrap(), next(5, false, &mut r).unwrap());
    let (indices, attn_sink, extra_k_cache) = (next(6, true, &mut r), next(7, true, &mut r), next(8, true, &mut r));
    let extra_indices_in_kvcache = next(9, true, &mut r);
    let (topk_length, extra_topk_length) = (next(10, true, &mut r), next(11, true, &mut r));
    let (out, lse) = (next(12, false, &mut r).unwrap(), next(13, false, &mut r).unwrap());
    let args = Fp8DecodeArgs {
        q,
        k_cache,
        block_table,
        cache_seqlens,
        head_dim_v: if r.u8() % 8 == 0 { r.int() as usize } else { D_V as usize },
        tile_scheduler_metadata,
        num_splits,
        softmax_scale: (r.u8() % 2 == 0).then(|| f32::from_bits(r.u64() as u32)),
        causal: r.u8() % 2 == 0,
        indices,
        attn_sink,
        extra_k_cache,
        extra_indices_in_kvcache,
        topk_length,
        extra_topk_length,
        out,
        lse,
    };
    let _ = validate_fp8_decode(&args, be.capabilities());
    if all_inside {
        let _ = be.fp8_get_metadata(&args, Stream::DEFAULT);
        let mut ws = vec![0f32; (r.u64() % (1 << 20)) as usize];
        let _ = be.fp8_decode(&args, Workspace::host(&mut ws), Stream::DEFAULT);
    }
});
