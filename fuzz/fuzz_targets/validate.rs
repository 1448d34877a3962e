//! The Rust API's argument validation: arbitrary descriptors (dtype, ndim, shapes, strides near overflow, device)
//! and arbitrary index-tensor contents through `MlaBackend::get_mla_metadata` and `decode` on the CPU backend.
//! Nothing may panic, and a call whose descriptors all stay inside their arenas runs for real (AddressSanitizer
//! catches any access outside them).
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::OnceLock;

use common::{Arenas, Reader};
use libfuzzer_sys::fuzz_target;
use mla_core::{
    DecodeArgs, Device, HEAD_DIM_V, MetadataArgs, MlaBackend, ScalarType, Stream, TensorDesc, Workspace,
    validate_decode, validate_metadata,
};

const DTYPES: [ScalarType; 5] = [ScalarType::Bf16, ScalarType::F16, ScalarType::E4M3, ScalarType::F32, ScalarType::I32];

fn backend() -> &'static mla_cpu::CpuBackend {
    static CPU: OnceLock<mla_cpu::CpuBackend> = OnceLock::new();
    CPU.get_or_init(|| mla_cpu::CpuBackend::with_threads(1).expect("one thread"))
}

/// A consistent small problem (the `template` half of the inputs): shapes that pass validation, lengths and page
/// ids mostly in range, the metadata from the backend's own scheduler, then one word of the index tensors
/// overwritten. This is what reaches the CPU backend's own checks (`prepare`) and kernels.
fn template(r: &mut Reader, arenas: &mut Arenas) {
    let be = backend();
    let dtype = DTYPES[r.u8() as usize % 3];
    let (b, s_q, h_kv) = (1 + r.u8() as usize % 3, 1 + r.u8() as usize % 3, 1 + r.u8() as usize % 2);
    let h_q = h_kv * (1 + r.u8() as usize % 4);
    let page = [1usize, 4, 16][r.u8() as usize % 3];
    let (num_blocks, mbs) = (1 + r.u8() as usize % 3, 1 + r.u8() as usize % 3);
    let parts = be.num_sm_parts(s_q * h_q / h_kv, h_kv);
    let i32s = |arenas: &mut Arenas, slot: usize, n: usize| -> &mut [i32] {
        // SAFETY: the arena holds ARENA_BYTES >= 4·n bytes of initialised, 8-byte aligned memory for these sizes.
        unsafe { std::slice::from_raw_parts_mut(arenas.base(slot).cast::<i32>(), n) }
    };
    for x in i32s(arenas, 3, b) {
        *x = (r.u8() as usize % (mbs * page + 2)) as i32;
    }
    for x in i32s(arenas, 2, b * mbs) {
        *x = (r.u8() as usize % (num_blocks + 1)) as i32;
    }
    let i = |v: usize| v as i64;
    // SAFETY (every descriptor below): it addresses its own arena only, within ARENA_BYTES for these sizes, and the
    // arenas outlive the calls.
    let d = |arenas: &mut Arenas, slot: usize, dt: ScalarType, shape: &[i64]| unsafe {
        TensorDesc::from_raw_contiguous(arenas.base(slot).cast(), dt, shape, Device::Host).unwrap()
    };
    let margs = MetadataArgs {
        cache_seqlens: d(arenas, 3, ScalarType::I32, &[i(b)]),
        q_seq_per_hk: s_q * h_q / h_kv,
        h_kv,
        tile_scheduler_metadata: d(arenas, 4, ScalarType::I32, &[i(parts), 8]),
        num_splits: d(arenas, 5, ScalarType::I32, &[i(b) + 1]),
    };
    let _ = be.get_mla_metadata(&margs, Stream::DEFAULT);
    if r.u8() % 2 == 0 {
        let slot = 2 + r.u8() as usize % 4;
        let at = r.u8() as usize % 8;
        i32s(arenas, slot, 8)[at] = r.int() as i32;
    }
    let e4m3 = dtype == ScalarType::E4M3;
    let f32s = |arenas: &mut Arenas, slot: usize| {
        // SAFETY: as for `i32s`.
        unsafe { *arenas.base(slot).cast::<f32>() = 1.0 / 64.0 };
    };
    f32s(arenas, 6);
    f32s(arenas, 7);
    let out_dtype = if dtype == ScalarType::F16 { ScalarType::F16 } else { ScalarType::Bf16 };
    let args = DecodeArgs {
        q: d(arenas, 0, dtype, &[i(b), i(s_q), i(h_q), 576]),
        k_cache: d(arenas, 1, dtype, &[i(num_blocks), i(page), i(h_kv), 576]),
        block_table: d(arenas, 2, ScalarType::I32, &[i(b), i(mbs)]),
        cache_seqlens: d(arenas, 3, ScalarType::I32, &[i(b)]),
        head_dim_v: HEAD_DIM_V,
        tile_scheduler_metadata: d(arenas, 4, ScalarType::I32, &[i(parts), 8]),
        num_splits: d(arenas, 5, ScalarType::I32, &[i(b) + 1]),
        softmax_scale: None,
        causal: r.u8() % 2 == 0,
        descale_q: e4m3.then(|| d(arenas, 6, ScalarType::F32, &[1])),
        descale_k: e4m3.then(|| d(arenas, 7, ScalarType::F32, &[1])),
        out: d(arenas, 8, out_dtype, &[i(b), i(s_q), i(h_q), 512]),
        lse: d(arenas, 9, ScalarType::F32, &[i(b), i(h_q), i(s_q)]),
    };
    let need = be.workspace_size(&mla_core::DecodeShape { batch: b, s_q, h_q, h_kv, dtype: dtype.as_input().unwrap() });
    let mut ws = vec![0f32; need.unwrap_or(0).div_ceil(4)];
    let _ = be.decode(&args, Workspace::host(&mut ws), Stream::DEFAULT);
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader(data);
    let mut arenas = Arenas::new(&mut r);
    if r.u8() % 2 == 0 {
        return template(&mut r, &mut arenas);
    }
    let be = backend();
    let caps = be.capabilities();

    let (seqlens, a) = common::desc(&mut r, &mut arenas, 3, &DTYPES);
    let (meta, b) = common::desc(&mut r, &mut arenas, 4, &DTYPES);
    let (splits, c) = common::desc(&mut r, &mut arenas, 5, &DTYPES);
    let margs = MetadataArgs {
        cache_seqlens: seqlens,
        q_seq_per_hk: r.int() as usize,
        h_kv: r.int() as usize,
        tile_scheduler_metadata: meta,
        num_splits: splits,
    };
    let _ = validate_metadata(&margs, caps);
    if a && b && c {
        let _ = be.get_mla_metadata(&margs, Stream::DEFAULT);
    }

    let mut all_inside = true;
    let mut next = |slot: usize, r: &mut Reader| {
        let (d, inside) = common::desc(r, &mut arenas, slot, &DTYPES);
        all_inside &= inside;
        d
    };
    let (q, k_cache, block_table, cache_seqlens) = (next(0, &mut r), next(1, &mut r), next(2, &mut r), next(3, &mut r));
    let (tile_scheduler_metadata, num_splits) = (next(4, &mut r), next(5, &mut r));
    let descale_q = (r.u8() % 2 == 0).then(|| next(6, &mut r));
    let descale_k = (r.u8() % 2 == 0).then(|| next(7, &mut r));
    let (out, lse) = (next(8, &mut r), next(9, &mut r));
    let args = DecodeArgs {
        q,
        k_cache,
        block_table,
        cache_seqlens,
        head_dim_v: if r.u8() % 8 == 0 { r.int() as usize } else { HEAD_DIM_V },
        tile_scheduler_metadata,
        num_splits,
        softmax_scale: (r.u8() % 2 == 0).then(|| f32::from_bits(r.u64() as u32)),
        causal: r.u8() % 2 == 0,
        descale_q,
        descale_k,
        out,
        lse,
    };
    if let Ok(problem) = validate_decode(&args, caps) {
        let _ = be.workspace_size(&problem.shape);
    }
    if all_inside {
        let mut ws = vec![0f32; (r.u64() % (1 << 20)) as usize];
        let _ = be.decode(&args, Workspace::host(&mut ws), Stream::DEFAULT);
    }
});
