//! `libflashmla.so` loaded with `libloading`, exactly as a plugin host loads it, checked against `mla-cpu` called
//! directly through Rust: the scheduler output and `out`/`lse` must be bitwise identical (the CPU backend is
//! deterministic), over problems covering every dtype, page sizes 1 to 128, `s_q` > 1 with the causal mask,
//! grouped KV heads, zero-length requests, explicit and default softmax scales. Also: one handle shared by many
//! threads, and opening GPU backends on a machine that may have none.

mod common;

use std::ffi::CStr;

use common::*;
use mla_core::{DType, Device, MlaBackend, ScalarType, Stream, TensorDesc, Workspace};

/// Scheduler + decode through the shared library; returns the first failing status with its message.
fn run_ffi(api: &Api, backend: *const Backend, p: &mut Problem) -> Result<(), String> {
    let t = p.tensors();
    let (spec, ws_bytes, ws) = (p.spec.clone(), p.workspace.bytes, p.workspace.ptr());
    // SAFETY: every descriptor describes a live buffer of `p`; the handle is live.
    let s = unsafe {
        let s = api.metadata(backend, &t, &spec, std::ptr::null_mut());
        if s != OK { s } else { api.decode(backend, &t.q, &t, &spec, ws, ws_bytes, std::ptr::null_mut()) }
    };
    if s == OK { Ok(()) } else { Err(format!("status {s}: {}", api.last_error())) }
}

/// What mla-cpu computes for the same inputs, called directly (its own output buffers).
struct Reference {
    meta: Vec<i32>,
    splits: Vec<i32>,
    out: Vec<u8>,
    lse: Vec<f32>,
}

fn run_direct(p: &Problem) -> Reference {
    let s = &p.spec;
    let cpu = mla_cpu::CpuBackend::new();
    let (b, sq, hq, hkv) = (s.batch() as i64, s.s_q as i64, s.h_q as i64, s.h_kv as i64);
    let parts = cpu.num_sm_parts(s.q_seq_per_hk(), s.h_kv);
    assert_eq!(parts, p.num_sm_parts, "the library and mla-cpu disagree on num_sm_parts");
    let mut r = Reference {
        meta: vec![0; parts * 8],
        splits: vec![0; s.batch() + 1],
        out: vec![0; p.out.bytes],
        lse: vec![0.0; p.lse.len()],
    };
    // SAFETY (every descriptor below): the pointer is the start of a host buffer of `p` or `r` holding exactly
    // the shape's elements of `dt`; all outlive `args`, and only `r`'s buffers (out, lse, meta, splits) are written,
    // through pointers taken from unique borrows.
    let d = |ptr: *const u8, dt: ScalarType, shape: &[i64]| {
        // SAFETY: see above.
        unsafe { TensorDesc::from_raw_contiguous(ptr.cast_mut().cast(), dt, shape, Device::Host) }.unwrap()
    };
    let input = s.dtype.scalar();
    let seqlens = d(p.seqlens.as_ptr().cast(), ScalarType::I32, &[b]);
    let meta = d(r.meta.as_mut_ptr().cast(), ScalarType::I32, &[parts as i64, 8]);
    let splits = d(r.splits.as_mut_ptr().cast(), ScalarType::I32, &[b + 1]);
    let margs = mla_core::MetadataArgs {
        cache_seqlens: seqlens,
        q_seq_per_hk: s.q_seq_per_hk(),
        h_kv: s.h_kv,
        tile_scheduler_metadata: meta,
        num_splits: splits,
    };
    cpu.get_mla_metadata(&margs, Stream::DEFAULT).unwrap();
    let mut ws = vec![0u64; p.workspace.bytes.div_ceil(8)];
    let args = mla_core::DecodeArgs {
        q: d(p.q.as_bytes().as_ptr(), input, &[b, sq, hq, 576]),
        k_cache: d(p.kv.as_bytes().as_ptr(), input, &[p.num_blocks as i64, s.page as i64, hkv, 576]),
        block_table: d(p.block_table.as_ptr().cast(), ScalarType::I32, &[b, p.max_blocks as i64]),
        cache_seqlens: seqlens,
        head_dim_v: 512,
        tile_scheduler_metadata: meta,
        num_splits: splits,
        softmax_scale: s.scale,
        causal: s.causal,
        descale_q: (s.dtype == DType::E4M3).then(|| d(p.descale_q.as_ptr().cast(), ScalarType::F32, &[1])),
        descale_k: (s.dtype == DType::E4M3).then(|| d(p.descale_k.as_ptr().cast(), ScalarType::F32, &[1])),
        out: d(r.out.as_mut_ptr(), s.dtype.out_dtype(), &[b, sq, hq, 512]),
        lse: d(r.lse.as_mut_ptr().cast(), ScalarType::F32, &[b, hq, sq]),
    };
    // SAFETY: `ws` holds at least `p.workspace.bytes` bytes and is used by nothing else during the call.
    let workspace = unsafe { Workspace::from_raw(ws.as_mut_ptr().cast(), p.workspace.bytes, Device::Host) };
    cpu.decode(&args, workspace, Stream::DEFAULT).unwrap();
    r
}

fn specs() -> Vec<Spec> {
    let base = Spec {
        seqlens: vec![],
        s_q: 1,
        h_q: 16,
        h_kv: 1,
        page: 64,
        dtype: DType::Bf16,
        causal: false,
        scale: None,
        seed: 0,
    };
    vec![
        Spec { seqlens: vec![0, 1, 63, 64, 65, 300], seed: 1, ..base.clone() },
        Spec {
            seqlens: vec![7, 0, 130],
            s_q: 2,
            h_q: 8,
            h_kv: 2,
            page: 16,
            dtype: DType::F16,
            causal: true,
            scale: Some(0.1),
            seed: 2,
        },
        Spec {
            seqlens: vec![33, 5, 2],
            s_q: 3,
            h_q: 6,
            h_kv: 3,
            page: 1,
            dtype: DType::E4M3,
            causal: true,
            seed: 3,
            ..base.clone()
        },
        Spec { seqlens: vec![700, 17], h_q: 128, page: 128, scale: Some(0.03), seed: 4, ..base.clone() },
        Spec { seqlens: vec![40; 9], s_q: 4, h_q: 5, page: 32, dtype: DType::E4M3, seed: 5, ..base },
    ]
}

fn assert_matches(p: &Problem, r: &Reference, what: &str) {
    let s = &p.spec;
    let plan = mla_core::scheduler::plan(&s.seqlens, p.num_sm_parts).unwrap();
    let words: Vec<i32> = plan.parts.iter().flat_map(|m| m.to_words()).collect();
    assert_eq!(p.meta, words, "{what}: tile_scheduler_metadata differs from mla_core::scheduler::plan");
    assert_eq!(p.splits, plan.num_splits, "{what}: num_splits differs from mla_core::scheduler::plan");
    assert_eq!(r.meta, words, "{what}: mla-cpu's metadata differs from the plan");
    assert!(p.out.as_bytes() == r.out.as_slice(), "{what}: out differs from mla-cpu called directly");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&p.lse), bits(&r.lse), "{what}: lse differs from mla-cpu called directly");
    // Not vacuous: a row that sees no key (zero length, or masked away: query t sees keys j <= len - s_q + t) is
    // +inf, every other row finite.
    for (i, &len) in s.seqlens.iter().enumerate() {
        for h in 0..s.h_q {
            for t in 0..s.s_q {
                let x = p.lse[(i * s.h_q + h) * s.s_q + t];
                let blind = len == 0 || (s.causal && (len as i64) - (s.s_q as i64) + (t as i64) < 0);
                assert!(if blind { x == f32::INFINITY } else { x.is_finite() }, "{what}: lse[{i}, {h}, {t}] = {x}");
            }
        }
    }
}

#[test]
fn results_match_mla_cpu_called_directly() {
    let api = Api::load();
    // SAFETY: no arguments.
    assert_eq!(unsafe { (api.abi_version)() }, 2);
    // SAFETY: static string.
    let version = unsafe { CStr::from_ptr((api.version)()) }.to_str().unwrap();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    let backend = api.open_cpu();
    for spec in specs() {
        let what = format!("{spec:?}");
        let mut p = Problem::for_backend(&api, backend, spec);
        run_ffi(&api, backend, &mut p).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(api.last_error(), "");
        let r = run_direct(&p);
        assert_matches(&p, &r, &what);
    }
    // SAFETY: live handle, freed once.
    unsafe { (api.backend_free)(backend) };
}

/// One handle, many threads, different problems at once; every result equals the single-threaded one.
#[test]
fn one_handle_many_threads() {
    struct Shared(*mut Backend);
    // SAFETY: the library documents handles as usable from any number of threads at once.
    unsafe impl Sync for Shared {}
    let api = Api::load();
    let backend = Shared(api.open_cpu());
    let specs = specs();
    let expected: Vec<Reference> = specs
        .iter()
        .map(|s| {
            let mut p = Problem::for_backend(&api, backend.0, s.clone());
            run_ffi(&api, backend.0, &mut p).unwrap();
            Reference {
                meta: p.meta.clone(),
                splits: p.splits.clone(),
                out: p.out.as_bytes().to_vec(),
                lse: p.lse.clone(),
            }
        })
        .collect();
    std::thread::scope(|scope| {
        for t in 0..8 {
            let (api, backend, specs, expected) = (&api, &backend, &specs, &expected);
            scope.spawn(move || {
                for round in 0..6 {
                    let i = (t + round) % specs.len();
                    let mut p = Problem::for_backend(api, backend.0, specs[i].clone());
                    run_ffi(api, backend.0, &mut p).unwrap_or_else(|e| panic!("thread {t}: {e}"));
                    let what = format!("thread {t} round {round} problem {i}");
                    assert_eq!(p.meta, expected[i].meta, "{what}");
                    assert_eq!(p.splits, expected[i].splits, "{what}");
                    assert!(p.out.as_bytes() == expected[i].out.as_slice(), "{what}: out");
                    assert!(p.lse.iter().zip(&expected[i].lse).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}");
                    // Errors stay on their own thread.
                    let (s, _) = api.open("nope", 0);
                    assert_eq!(s, INVALID_ARGUMENT);
                    assert!(api.last_error().contains("backend_name"), "{what}: {}", api.last_error());
                }
            });
        }
    });
    // SAFETY: every thread has joined; freed once.
    unsafe { (api.backend_free)(backend.0) };
}

/// No GPU, or no CUDA driver: a status, never an abort or a panic status; `auto` falls back to the CPU.
#[test]
fn gpu_backends_open_or_say_why() {
    let api = Api::load();
    let (s, b) = api.open("hopper", 0);
    let msg = api.last_error();
    match s {
        OK => {
            let mut caps = std::mem::MaybeUninit::<Caps>::uninit();
            // SAFETY: live handle, writable out pointer.
            assert_eq!(unsafe { (api.backend_capabilities)(b, caps.as_mut_ptr()) }, OK);
            // SAFETY: initialised by the successful call.
            let caps = unsafe { caps.assume_init() };
            assert_eq!(caps.device_type, DEVICE_CUDA);
            assert!(caps.compute_capability_major >= 9);
            // SAFETY: live handle.
            unsafe { (api.backend_free)(b) };
        }
        UNAVAILABLE | UNSUPPORTED => {
            assert!(b.is_null());
            assert!(msg.starts_with("flashmla_backend_open: backend `hopper`"), "{msg}");
        }
        other => panic!("opening hopper gave status {other}: {msg}"),
    }
    let (s, b) = api.open("auto", 0);
    assert_eq!(s, OK, "{}", api.last_error());
    let mut caps = std::mem::MaybeUninit::<Caps>::uninit();
    // SAFETY: live handle, writable out pointer.
    assert_eq!(unsafe { (api.backend_capabilities)(b, caps.as_mut_ptr()) }, OK);
    // SAFETY: initialised by the successful call.
    let caps = unsafe { caps.assume_init() };
    // SAFETY: owned by the live handle.
    let name = unsafe { CStr::from_ptr(caps.backend) }.to_str().unwrap().to_owned();
    assert!(name == "cpu" || name == "hopper", "{name}");
    // SAFETY: live handle.
    unsafe { (api.backend_free)(b) };
}
