//! The Rust API's argument validation: arbitrary descriptors (dtype, ndim, shapes, strides near overflow, device)
//! and arbitrary index-tensor contents through `MlaBackend::get_mla_metadata` and `decode` on the CPU backend.
//! Nothing may panic, and a call whose descriptors all stay inside their arenas runs for real (AddressSanitizer
//! catches any access outside them).
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::OnceLock;

use common::{Arenas, Reader, inside_arena};
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

/// A descriptor into arena `slot`, and whether it stays inside the arena.
fn desc<'a>(r: &mut Reader, arenas: &mut Arenas, slot: usize) -> (TensorDesc<'a>, bool) {
    let ndim = (r.u8() % 5) as usize;
    let dtype = DTYPES[r.u8() as usize % DTYPES.len()];
    let shape: Vec<i64> = (0..ndim).map(|_| r.int()).collect();
    let strides: Vec<i64> = match r.u8() % 2 {
        0 => mla_core::tensor::contiguous_strides(&shape)[..ndim].to_vec(),
        _ => (0..ndim).map(|_| r.int()).collect(),
    };
    let device = if r.u8() % 8 == 0 { Device::Cuda(0) } else { Device::Host };
    let inside = device == Device::Host && inside_arena(dtype.size_bytes(), &shape, &strides);
    // SAFETY: the descriptor is dereferenced only when `inside` holds (its bytes lie in the arena, which outlives
    // every call below); otherwise it only reaches validation, which inspects it.
    let d = unsafe { TensorDesc::from_raw(arenas.base(slot).cast(), dtype, &shape, &strides, device) };
    (d.expect("at most 4 dims, one stride each"), inside)
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader(data);
    let mut arenas = Arenas::new(&mut r);
    let be = backend();
    let caps = be.capabilities();

    let (seqlens, a) = desc(&mut r, &mut arenas, 3);
    let (meta, b) = desc(&mut r, &mut arenas, 4);
    let (splits, c) = desc(&mut r, &mut arenas, 5);
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
        let (d, inside) = desc(r, &mut arenas, slot);
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
