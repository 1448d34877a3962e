//! The C ABI's tensor descriptors: arbitrary `flashmla_tensor` fields (ndim, dtype and device codes, shapes and
//! strides near overflow) and integer arguments through `flashmla_num_sm_parts`, `flashmla_workspace_size`,
//! `flashmla_get_mla_metadata` and `flashmla_with_kvcache` on the CPU backend. Every call must return a status
//! (never panic or crash); calls whose descriptors all stay inside their arenas run for real.
#![no_main]
#![allow(dead_code, unused_imports, missing_docs)]

#[path = "common.rs"]
mod common;

// The C ABI's own sources, compiled into this target (the C-ABI crate has no rlib to link against).
#[path = "../../crates/mla-ffi/src/api.rs"]
pub mod api;
#[path = "../../crates/mla-ffi/src/status.rs"]
pub mod status;
#[path = "../../crates/mla-ffi/src/tensor.rs"]
pub mod tensor;

use std::sync::OnceLock;

use common::{Arenas, Reader, inside_arena};
use libfuzzer_sys::fuzz_target;
use status::flashmla_status;
use tensor::{FLASHMLA_MAX_NDIM, flashmla_dtype, flashmla_tensor};

/// The ABI boundary turns a panic into a status; for the fuzzer that is a finding like any crash.
fn no_panic(s: flashmla_status) {
    assert!(s != flashmla_status::Panic, "a panic was caught at the ABI boundary");
}

/// The CPU backend's handle, opened once (as an address, so it can live in a static).
fn backend() -> usize {
    static CPU: OnceLock<usize> = OnceLock::new();
    *CPU.get_or_init(|| {
        let mut b = std::ptr::null_mut();
        // SAFETY: a valid C string and a writable out pointer.
        let s = unsafe { api::flashmla_backend_open(c"cpu".as_ptr(), 0, &mut b) };
        assert!(s == flashmla_status::Ok && !b.is_null(), "cannot open the CPU backend");
        b as usize
    })
}

/// A descriptor into arena `slot`, and whether the described bytes stay inside it (for host descriptors of a
/// valid dtype code; anything else the library must reject before touching memory).
fn tensor(r: &mut Reader, arenas: &mut Arenas, slot: usize) -> (flashmla_tensor, bool) {
    let ndim = match r.u8() % 8 {
        0 => r.int() as i32,
        k => (k as i32 - 1).min(FLASHMLA_MAX_NDIM as i32),
    };
    let dtype = if r.u8() % 8 == 0 { r.int() as i32 } else { 1 + (r.u8() % 5) as i32 };
    let (device_type, device_id) = match r.u8() % 8 {
        0 => (r.int() as i32, r.int() as i32),
        1 => (2, 0),
        _ => (1, 0),
    };
    let mut t = flashmla_tensor {
        data: if r.u8() % 16 == 0 { std::ptr::null_mut() } else { arenas.base(slot).cast() },
        device_type,
        device_id,
        dtype,
        ndim,
        shape: [0; FLASHMLA_MAX_NDIM],
        strides: [0; FLASHMLA_MAX_NDIM],
    };
    for i in 0..FLASHMLA_MAX_NDIM {
        t.shape[i] = r.int();
        t.strides[i] = r.int();
    }
    let n = usize::try_from(ndim).ok().filter(|&n| n <= FLASHMLA_MAX_NDIM);
    let elem = flashmla_dtype::from_code(dtype).map(|d| d.scalar().size_bytes());
    let inside = match (n, elem) {
        (Some(n), Some(e)) if device_type == 1 => inside_arena(e, &t.shape[..n], &t.strides[..n]),
        _ => false,
    };
    (t, inside)
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader(data);
    let mut arenas = Arenas::new(&mut r);
    let b = backend() as *const api::flashmla_backend;

    let mut parts = 0i64;
    // SAFETY: a live handle and a writable out pointer.
    no_panic(unsafe { api::flashmla_num_sm_parts(b, r.int(), r.int(), &mut parts) });
    let mut bytes = 0i64;
    // SAFETY: as above.
    no_panic(unsafe {
        api::flashmla_workspace_size(b, r.int(), r.int(), r.int(), r.int(), r.int() as i32, &mut bytes)
    });

    let mut ts = Vec::new();
    let mut all_inside = true;
    for slot in 0..common::SLOTS {
        let (t, inside) = tensor(&mut r, &mut arenas, slot);
        // Conversion alone inspects the fields and never dereferences.
        // SAFETY: the converted descriptor is dropped unused.
        let _ = unsafe { t.to_desc("x") };
        all_inside &= inside || t.data.is_null();
        ts.push(t);
    }
    if !all_inside {
        return;
    }
    // SAFETY: every descriptor is NULL-data or addresses bytes inside its own arena, which outlives the calls; the
    // workspace is a live buffer of `ws.len() * 4` bytes; the stream is NULL (unused by the CPU backend).
    unsafe {
        let t = |i: usize| &ts[i] as *const flashmla_tensor;
        let opt = |i: usize, present: bool| if present { t(i) } else { std::ptr::null() };
        no_panic(api::flashmla_get_mla_metadata(b, t(3), r.int(), r.int(), t(4), t(5), std::ptr::null_mut()));
        let mut ws = vec![0f32; (r.u64() % (1 << 20)) as usize];
        let ws_bytes = if r.u8() % 8 == 0 { r.int() } else { (ws.len() * 4) as i64 };
        let ws_bytes = ws_bytes.min((ws.len() * 4) as i64);
        no_panic(api::flashmla_with_kvcache(
            b,
            t(0),
            t(1),
            t(2),
            t(3),
            if r.u8() % 8 == 0 { r.int() } else { 512 },
            t(4),
            t(5),
            f32::from_bits(r.u64() as u32),
            r.u8() as i32 % 2,
            opt(6, r.u8() % 2 == 0),
            opt(7, r.u8() % 2 == 0),
            t(8),
            t(9),
            ws.as_mut_ptr().cast(),
            ws_bytes,
            std::ptr::null_mut(),
        ));
    }
});
