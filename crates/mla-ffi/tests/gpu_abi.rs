//! The C ABI with device memory: `libflashmla.so` loaded as a plugin host loads it, the `hopper` backend opened by
//! name, CUDA tensors described with `kDLCUDA`, a caller-owned stream, the scheduler and decode steps enqueued on
//! it, and the results compared with the CPU backend of the same library on the same inputs.
//!
//! Without a usable GPU the test prints why and passes (CI is CPU-only), unless `FLASHMLA_REQUIRE_GPU=1`.

mod common;

use std::ffi::{CStr, c_void};
use std::sync::Arc;

use common::*;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use mla_core::DType;

/// A device copy of a host buffer, and its address.
struct Dev {
    slice: CudaSlice<u8>,
    ptr: *mut c_void,
}

fn upload(stream: &Arc<CudaStream>, bytes: &[u8]) -> Dev {
    let mut v = bytes.to_vec();
    v.resize(bytes.len().max(256), 0);
    let slice = stream.clone_htod(&v).expect("upload");
    let ptr = slice.device_ptr(stream).0 as *mut c_void;
    Dev { slice, ptr }
}

fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: i32/f32 slices: plain numbers without padding.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

fn on_device(mut t: Tensor, d: &Dev) -> Tensor {
    t.data = d.ptr;
    t.device_type = DEVICE_CUDA;
    t.device_id = 0;
    t
}

fn widen(dtype: DType, b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| {
            let bits = u16::from_le_bytes([c[0], c[1]]);
            if dtype == DType::F16 { half::f16::from_bits(bits).to_f32() } else { half::bf16::from_bits(bits).to_f32() }
        })
        .collect()
}

#[test]
fn hopper_through_the_c_abi_matches_cpu() {
    let api = Api::load();
    let (s, gpu) = api.open("hopper", 0);
    if s != OK {
        let msg = api.last_error();
        assert!(s == UNAVAILABLE || s == UNSUPPORTED, "status {s}: {msg}");
        assert!(
            !std::env::var("FLASHMLA_REQUIRE_GPU").is_ok_and(|v| v == "1"),
            "FLASHMLA_REQUIRE_GPU=1 but hopper did not open: {msg}"
        );
        eprintln!("SKIP hopper_through_the_c_abi_matches_cpu: {msg}");
        return;
    }
    let mut caps = std::mem::MaybeUninit::<Caps>::uninit();
    // SAFETY: live handle, writable out pointer.
    assert_eq!(unsafe { (api.backend_capabilities)(gpu, caps.as_mut_ptr()) }, OK);
    // SAFETY: written by the successful call.
    let caps = unsafe { caps.assume_init() };
    // SAFETY: owned by the live handle.
    let name = unsafe { CStr::from_ptr(caps.device_name) }.to_string_lossy().into_owned();
    eprintln!(
        "hopper: {name}, {} SMs, sm_{}{}, page sizes {:?}",
        caps.sm_count,
        caps.compute_capability_major,
        caps.compute_capability_minor,
        &caps.page_sizes[..caps.num_page_sizes as usize]
    );
    assert_eq!((caps.device_type, caps.device_id), (DEVICE_CUDA, 0));
    assert_eq!(caps.compute_capability_major, 9);
    let page = if caps.any_page_size == 1 { 64 } else { caps.page_sizes[0] as usize };

    let cpu = api.open_cpu();
    let ctx = CudaContext::new(0).expect("CUDA context");
    let stream = ctx.new_stream().expect("stream");
    let raw_stream = stream.cu_stream() as *mut c_void;

    let base = Spec {
        seqlens: vec![],
        s_q: 1,
        h_q: 16,
        h_kv: 1,
        page,
        dtype: DType::Bf16,
        causal: false,
        scale: None,
        seed: 0,
    };
    let specs = [
        Spec { seqlens: vec![0, 1, 64, 65, 700, 3000], h_q: 128, seed: 21, ..base.clone() },
        Spec {
            seqlens: vec![200, 0, 129],
            s_q: 2,
            h_q: 16,
            dtype: DType::F16,
            causal: true,
            scale: Some(0.05),
            seed: 22,
            ..base.clone()
        },
        Spec { seqlens: vec![513, 90], h_q: 64, dtype: DType::E4M3, seed: 23, ..base },
    ];
    for spec in specs {
        let what = format!("{spec:?}");
        // The same inputs (same seed) sized for each backend; the CPU result is the reference.
        let mut host = Problem::for_backend(&api, cpu, spec.clone());
        let mut p = Problem::for_backend(&api, gpu, spec.clone());
        let ht = host.tensors();
        let pt = p.tensors();
        // SAFETY: host descriptors of live buffers; live handle.
        let s = unsafe {
            api.metadata(cpu, &ht, &spec, std::ptr::null_mut());
            api.decode(cpu, &ht.q, &ht, &spec, host.workspace.ptr(), host.workspace.bytes, std::ptr::null_mut())
        };
        assert_eq!(s, OK, "{what}: cpu: {}", api.last_error());

        let d_q = upload(&stream, p.q.as_bytes());
        let d_kv = upload(&stream, p.kv.as_bytes());
        let d_bt = upload(&stream, bytes_of(&p.block_table));
        let d_sl = upload(&stream, bytes_of(&p.seqlens));
        let d_meta = upload(&stream, bytes_of(&p.meta));
        let d_splits = upload(&stream, bytes_of(&p.splits));
        let d_dq = upload(&stream, bytes_of(&p.descale_q));
        let d_dk = upload(&stream, bytes_of(&p.descale_k));
        let d_out = upload(&stream, p.out.as_bytes());
        let d_lse = upload(&stream, bytes_of(&p.lse));
        let d_ws = upload(&stream, &vec![0u8; p.workspace.bytes]);
        let t = Tensors {
            q: on_device(pt.q, &d_q),
            k_cache: on_device(pt.k_cache, &d_kv),
            block_table: on_device(pt.block_table, &d_bt),
            cache_seqlens: on_device(pt.cache_seqlens, &d_sl),
            meta: on_device(pt.meta, &d_meta),
            splits: on_device(pt.splits, &d_splits),
            descale_q: pt.descale_q.map(|d| on_device(d, &d_dq)),
            descale_k: pt.descale_k.map(|d| on_device(d, &d_dk)),
            out: on_device(pt.out, &d_out),
            lse: on_device(pt.lse, &d_lse),
        };

        // A host tensor handed to the GPU backend is refused before anything is enqueued.
        // SAFETY: device descriptors of live allocations, plus one host descriptor under test.
        let s = unsafe { api.decode(gpu, &pt.q, &t, &spec, d_ws.ptr, p.workspace.bytes, raw_stream) };
        assert_eq!(s, INVALID_ARGUMENT);
        assert!(api.last_error().contains("`q.device`"), "{}", api.last_error());

        // SAFETY: device descriptors of live allocations on device 0; `raw_stream` belongs to that device.
        let s = unsafe {
            let s = api.metadata(gpu, &t, &spec, raw_stream);
            assert_eq!(s, OK, "{what}: metadata: {}", api.last_error());
            api.decode(gpu, &t.q, &t, &spec, d_ws.ptr, p.workspace.bytes, raw_stream)
        };
        assert_eq!(s, OK, "{what}: decode: {}", api.last_error());
        stream.synchronize().expect("synchronize");

        let meta: Vec<i32> = stream
            .clone_dtoh(&d_meta.slice)
            .unwrap()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let splits: Vec<i32> = stream
            .clone_dtoh(&d_splits.slice)
            .unwrap()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let plan = mla_core::scheduler::plan(&spec.seqlens, p.num_sm_parts).unwrap();
        let words: Vec<i32> = plan.parts.iter().flat_map(|m| m.to_words()).collect();
        assert_eq!(&meta[..words.len()], &words[..], "{what}: device metadata differs from the host plan");
        assert_eq!(&splits[..plan.num_splits.len()], &plan.num_splits[..], "{what}: num_splits");

        let out_dtype = if spec.dtype == DType::F16 { DType::F16 } else { DType::Bf16 };
        let out_bytes = stream.clone_dtoh(&d_out.slice).unwrap();
        let got = widen(out_dtype, &out_bytes[..p.out.bytes]);
        let want = widen(out_dtype, host.out.as_bytes());
        let lse: Vec<f32> = stream
            .clone_dtoh(&d_lse.slice)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mut worst = 0f32;
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max((g - w).abs() / (1.0 + w.abs()));
        }
        assert!(worst <= 2e-2, "{what}: out differs from the CPU backend by {worst}");
        for (i, (g, w)) in lse.iter().zip(&host.lse).enumerate() {
            let ok = if w.is_infinite() { g == w } else { (g - w).abs() <= 1e-3 * (1.0 + w.abs()) };
            assert!(ok, "{what}: lse[{i}] = {g}, cpu {w}");
        }
        eprintln!("{what}: ok (worst out difference {worst:.2e})");
    }
    // SAFETY: live handles, freed once, after the stream is idle.
    unsafe {
        (api.backend_free)(gpu);
        (api.backend_free)(cpu);
    }
}
