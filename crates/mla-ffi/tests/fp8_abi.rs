//! The decode over FP8 caches through the shared library, loaded as a plugin host loads it (ABI version 2): the
//! header declares every new entry point and struct; capabilities; quantisation through the C ABI equals the Rust
//! one byte for byte; a sparse and a dense decode through the C ABI equal the Rust API's bit for bit; and every
//! argument made wrong in turn (null and misshaped tensors, wrong bytes per token, lengths out of range, a stale
//! schedule, …) gives the right status, a message that starts with the function's name and names the argument,
//! and leaves the outputs untouched. Each suite first makes the unmodified call and requires it to succeed.

mod common;

use std::ffi::c_void;

use common::*;
use mla_core::Fp8Layout;
use mla_cpu::CpuBackend;
use mla_cpu::fp8problem::{ExtraSpec, Fp8HostMode, Fp8HostProblem, Fp8HostRun, Fp8RandomSpec, SparseSpec};
use mla_testkit::Rng;

const DTYPE_U8: i32 = 6;
const LAYOUT_V32: u32 = 1;
const LAYOUT_MODEL1: u32 = 2;
const ALL_SPARSE_FEATURES: u32 = 1 | 2 | 4 | 8;

/// `flashmla_fp8_decode_params`, as a plugin host declares it from the header.
#[repr(C)]
#[derive(Clone, Copy)]
struct Params {
    struct_size: u32,
    causal: i32,
    head_dim_v: i64,
    softmax_scale: f32,
    reserved: u32,
    q: *const Tensor,
    k_cache: *const Tensor,
    block_table: *const Tensor,
    cache_seqlens: *const Tensor,
    tile_scheduler_metadata: *const Tensor,
    num_splits: *const Tensor,
    indices: *const Tensor,
    attn_sink: *const Tensor,
    extra_k_cache: *const Tensor,
    extra_indices_in_kvcache: *const Tensor,
    topk_length: *const Tensor,
    extra_topk_length: *const Tensor,
    out: *const Tensor,
    lse: *const Tensor,
}

/// `flashmla_fp8_capabilities`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Fp8Caps {
    sparse_layouts: u32,
    dense_layouts: u32,
    sparse_features: [u32; 4],
}

type B = *const Backend;
type T = *const Tensor;

/// The ABI-2 entry points.
struct Fp8Api {
    _lib: libloading::Library,
    caps: unsafe extern "C" fn(B, *mut Fp8Caps) -> Status,
    num_sm_parts: unsafe extern "C" fn(B, i64, i64, *mut i64) -> Status,
    workspace_size: unsafe extern "C" fn(B, i64, i64, i64, *mut i64) -> Status,
    get_metadata: unsafe extern "C" fn(B, *const Params, *mut c_void) -> Status,
    decode: unsafe extern "C" fn(B, *const Params, *mut c_void, i64, *mut c_void) -> Status,
    quantize: unsafe extern "C" fn(T, T) -> Status,
    dequantize: unsafe extern "C" fn(T, T) -> Status,
}

macro_rules! sym {
    ($lib:expr, $name:literal) => {
        // SAFETY: the type is the one declared in include/flashmla.h for this symbol.
        *unsafe { $lib.get(concat!($name, "\0").as_bytes()) }.unwrap_or_else(|e| panic!("{}: {e}", $name))
    };
}

impl Fp8Api {
    fn load() -> Fp8Api {
        // SAFETY: the library has no initialisers with preconditions.
        let lib = unsafe { libloading::Library::new(library_path()) }.expect("dlopen libflashmla.so");
        Fp8Api {
            caps: sym!(lib, "flashmla_backend_fp8_capabilities"),
            num_sm_parts: sym!(lib, "flashmla_fp8_num_sm_parts"),
            workspace_size: sym!(lib, "flashmla_fp8_workspace_size"),
            get_metadata: sym!(lib, "flashmla_fp8_get_metadata"),
            decode: sym!(lib, "flashmla_fp8_decode"),
            quantize: sym!(lib, "flashmla_fp8_quantize"),
            dequantize: sym!(lib, "flashmla_fp8_dequantize"),
            _lib: lib,
        }
    }
}

/// A cache's descriptor: `[num_blocks, page_size, 1, bytes_per_token]` bytes with its block stride.
fn cache_tensor(c: &mla_core::Fp8Cache) -> Tensor {
    let mut t = Tensor::host(c.bytes.as_ptr().cast_mut().cast(), DTYPE_U8, &c.shape().map(|d| d as i64));
    for (s, v) in t.strides.iter_mut().zip(c.strides()) {
        *s = v as i64;
    }
    t
}

/// The caller-side buffers of one problem.
struct Bufs {
    p: Fp8HostProblem,
    meta: Vec<i32>,
    splits: Vec<i32>,
    out: Vec<u16>,
    lse: Vec<f32>,
}

const OUT_SENTINEL: u16 = 0x7E57;
const LSE_SENTINEL: f32 = -12345.0;

impl Bufs {
    fn poison(&mut self) {
        self.out.fill(OUT_SENTINEL);
        self.lse.fill(LSE_SENTINEL);
    }
    fn untouched(&self) -> bool {
        self.out.iter().all(|&x| x == OUT_SENTINEL) && self.lse.iter().all(|&x| x == LSE_SENTINEL)
    }
}

/// Every argument of the two calls; `None` is passed as NULL.
#[derive(Clone, Copy)]
struct Call {
    backend: B,
    params_null: bool,
    struct_size: u32,
    reserved: u32,
    causal: i32,
    head_dim_v: i64,
    scale: f32,
    t: [Option<Tensor>; 14],
    workspace_bytes: i64,
}

// Indices into Call::t, in the order of Params.
const Q: usize = 0;
const K: usize = 1;
const BT: usize = 2;
const SL: usize = 3;
const META: usize = 4;
const SPLITS: usize = 5;
const IND: usize = 6;
const SINK: usize = 7;
const XK: usize = 8;
const XIND: usize = 9;
const TOPK_LEN: usize = 10;
const XTOPK_LEN: usize = 11;
const OUT: usize = 12;
const LSE: usize = 13;

impl Call {
    fn new(backend: B, b: &mut Bufs, parts: usize) -> Call {
        let p = &b.p;
        let (bs, s_q, h_q, d) = (p.batch as i64, p.s_q as i64, p.h_q as i64, p.layout.head_dim_k() as i64);
        b.meta = vec![0; parts * 8];
        b.splits = vec![0; p.batch + 1];
        b.out = vec![0; (bs * s_q * h_q * 512) as usize];
        b.lse = vec![0.0; (bs * h_q * s_q) as usize];
        let mut t: [Option<Tensor>; 14] = [None; 14];
        t[Q] = Some(Tensor::host(p.q.as_ptr().cast_mut().cast(), DTYPE_BF16, &[bs, s_q, h_q, d]));
        t[META] = Some(Tensor::host(b.meta.as_mut_ptr().cast(), DTYPE_I32, &[parts as i64, 8]));
        t[SPLITS] = Some(Tensor::host(b.splits.as_mut_ptr().cast(), DTYPE_I32, &[bs + 1]));
        t[OUT] = Some(Tensor::host(b.out.as_mut_ptr().cast(), DTYPE_BF16, &[bs, s_q, h_q, 512]));
        t[LSE] = Some(Tensor::host(b.lse.as_mut_ptr().cast(), DTYPE_F32, &[bs, h_q, s_q]));
        let i32s = |v: &Vec<i32>, shape: &[i64]| Some(Tensor::host(v.as_ptr().cast_mut().cast(), DTYPE_I32, shape));
        let mut causal = 0;
        match &p.mode {
            Fp8HostMode::Sparse { main, extra, attn_sink } => {
                t[K] = Some(cache_tensor(&main.cache));
                t[IND] = i32s(&main.indices, &[bs, s_q, main.topk as i64]);
                t[TOPK_LEN] = main.topk_length.as_ref().and_then(|l| i32s(l, &[bs]));
                if let Some(e) = extra {
                    t[XK] = Some(cache_tensor(&e.cache));
                    t[XIND] = i32s(&e.indices, &[bs, s_q, e.topk as i64]);
                    t[XTOPK_LEN] = e.topk_length.as_ref().and_then(|l| i32s(l, &[bs]));
                }
                t[SINK] = attn_sink.as_ref().map(|s| Tensor::host(s.as_ptr().cast_mut().cast(), DTYPE_F32, &[h_q]));
            }
            Fp8HostMode::Dense { cache, block_table, max_blocks_per_seq, seqlens, causal: c } => {
                t[K] = Some(cache_tensor(cache));
                t[BT] = i32s(block_table, &[bs, *max_blocks_per_seq as i64]);
                t[SL] = i32s(seqlens, &[bs]);
                causal = *c as i32;
            }
        }
        Call {
            backend,
            params_null: false,
            struct_size: std::mem::size_of::<Params>() as u32,
            reserved: 0,
            causal,
            head_dim_v: 512,
            scale: f32::NAN,
            t,
            workspace_bytes: 0,
        }
    }

    fn with_params<R>(&self, f: impl FnOnce(*const Params) -> R) -> R {
        let ptr = |i: usize| self.t[i].as_ref().map_or(std::ptr::null(), |t| t as *const Tensor);
        let params = Params {
            struct_size: self.struct_size,
            causal: self.causal,
            head_dim_v: self.head_dim_v,
            softmax_scale: self.scale,
            reserved: self.reserved,
            q: ptr(Q),
            k_cache: ptr(K),
            block_table: ptr(BT),
            cache_seqlens: ptr(SL),
            tile_scheduler_metadata: ptr(META),
            num_splits: ptr(SPLITS),
            indices: ptr(IND),
            attn_sink: ptr(SINK),
            extra_k_cache: ptr(XK),
            extra_indices_in_kvcache: ptr(XIND),
            topk_length: ptr(TOPK_LEN),
            extra_topk_length: ptr(XTOPK_LEN),
            out: ptr(OUT),
            lse: ptr(LSE),
        };
        f(if self.params_null { std::ptr::null() } else { &params })
    }

    fn schedule(&self, api: &Fp8Api) -> Status {
        // SAFETY: every descriptor is NULL or describes live memory of the problem (possibly with wrong metadata,
        // which is what the library must reject before touching memory).
        self.with_params(|p| unsafe { (api.get_metadata)(self.backend, p, std::ptr::null_mut()) })
    }

    fn decode(&self, api: &Fp8Api) -> Status {
        // SAFETY: as in `schedule`; the CPU needs no workspace.
        self.with_params(|p| unsafe {
            (api.decode)(self.backend, p, std::ptr::null_mut(), self.workspace_bytes, std::ptr::null_mut())
        })
    }
}

fn sparse_problem(layout: Fp8Layout) -> Fp8HostProblem {
    let mut sp = SparseSpec::new(16);
    sp.topk_length = true;
    sp.attn_sink = true;
    sp.invalid = 0.1;
    sp.extra = Some(ExtraSpec { topk: 8, page_size: 3, mean_seqlen: 20, topk_length: true });
    Fp8HostProblem::random(&Fp8RandomSpec {
        layout,
        batch: 3,
        s_q: 2,
        h_q: 4,
        page_size: 7,
        mean_seqlen: 30,
        varlen: false,
        sparse: Some(sp),
        causal: false,
        seed: 17,
    })
    .unwrap()
}

fn dense_problem() -> Fp8HostProblem {
    Fp8HostProblem::random(&Fp8RandomSpec {
        layout: Fp8Layout::V32,
        batch: 3,
        s_q: 2,
        h_q: 4,
        page_size: 5,
        mean_seqlen: 30,
        varlen: false,
        sparse: None,
        causal: true,
        seed: 18,
    })
    .unwrap()
}

fn parts(api: &Fp8Api, backend: B, p: &Fp8HostProblem) -> usize {
    let mut n = 0i64;
    // SAFETY: a live handle and a writable out pointer.
    assert_eq!(unsafe { (api.num_sm_parts)(backend, p.s_q as i64, p.h_q as i64, &mut n) }, OK);
    n as usize
}

#[test]
fn header_declares_the_fp8_api() {
    let header = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../include/flashmla.h")).unwrap();
    for f in FP8_ENTRY_POINTS {
        assert!(header.contains(&format!("{f}(")), "{f} missing from include/flashmla.h");
    }
    for item in [
        "typedef struct flashmla_fp8_decode_params",
        "typedef struct flashmla_fp8_capabilities",
        "FLASHMLA_FP8_LAYOUT_V32 = 1",
        "FLASHMLA_FP8_LAYOUT_MODEL1 = 2",
        "FLASHMLA_DTYPE_U8 = 6",
        "#define FLASHMLA_SPARSE_EXTRA_TOPK_LENGTH 8",
    ] {
        assert!(header.contains(item), "{item} missing from include/flashmla.h");
    }
    assert_eq!(std::mem::size_of::<Params>(), 136);
}

#[test]
fn capabilities_and_sizes() {
    let (api, fp8) = (Api::load(), Fp8Api::load());
    // SAFETY: the library's version query has no preconditions.
    assert_eq!(unsafe { (api.abi_version)() }, 2);
    let cpu = api.open_cpu();
    let mut caps = Fp8Caps::default();
    // SAFETY: a live handle and a writable out pointer.
    assert_eq!(unsafe { (fp8.caps)(cpu, &mut caps) }, OK);
    assert_eq!(caps.sparse_layouts, (1 << LAYOUT_V32) | (1 << LAYOUT_MODEL1));
    assert_eq!(caps.dense_layouts, 1 << LAYOUT_V32);
    assert_eq!(caps.sparse_features, [0, ALL_SPARSE_FEATURES, ALL_SPARSE_FEATURES, 0]);
    let mut bytes = -1i64;
    // SAFETY: as above.
    assert_eq!(unsafe { (fp8.workspace_size)(cpu, 4, 2, 128, &mut bytes) }, OK);
    assert_eq!(bytes, 0, "the CPU keeps no partials");
    // SAFETY: as above.
    let s = unsafe { (fp8.workspace_size)(cpu, 0, 2, 128, &mut bytes) };
    assert_eq!((s, api.last_error().contains("`batch`")), (INVALID_ARGUMENT, true));
    let mut n = 0i64;
    // SAFETY: as above.
    assert_eq!(unsafe { (fp8.num_sm_parts)(cpu, 2, 128, &mut n) }, OK);
    assert_eq!(n, 8, "32 CPU parts / ceil(2 · 128 / 64)");
    // SAFETY: a NULL handle is rejected.
    assert_eq!(unsafe { (fp8.caps)(std::ptr::null(), &mut caps) }, INVALID_ARGUMENT);
    // SAFETY: a NULL out pointer is rejected.
    assert_eq!(unsafe { (fp8.num_sm_parts)(cpu, 2, 128, std::ptr::null_mut()) }, INVALID_ARGUMENT);
    // SAFETY: opened above, freed once.
    unsafe { (api.backend_free)(cpu) };
}

/// Quantisation through the C ABI writes exactly the bytes of the Rust API; dequantisation reads them back.
#[test]
fn quantize_and_dequantize_through_the_c_abi() {
    let (api, fp8) = (Api::load(), Fp8Api::load());
    let mut rng = Rng::new(5);
    for layout in Fp8Layout::ALL {
        let (nb, ps, d) = (3usize, 5usize, layout.head_dim_k());
        let values: Vec<f32> = (0..nb * ps * d).map(|_| rng.unit() * 3.0).collect();
        let want = mla_core::Fp8Cache::quantize(layout, nb, ps, &values).unwrap();
        let mut got = mla_core::Fp8Cache::zeroed(layout, nb, ps, None).unwrap();
        let vt = Tensor::host(values.as_ptr().cast_mut().cast(), DTYPE_F32, &[nb as i64, ps as i64, 1, d as i64]);
        let mut ct = cache_tensor(&got);
        ct.data = got.bytes.as_mut_ptr().cast();
        // SAFETY: both descriptors describe live host buffers of their shapes; the cache is writable.
        assert_eq!(unsafe { (fp8.quantize)(&vt, &ct) }, OK, "{}", api.last_error());
        assert_eq!(got.bytes, want.bytes, "{layout}");
        let mut back = vec![0u16; nb * ps * d];
        let bt = Tensor::host(back.as_mut_ptr().cast(), DTYPE_BF16, &[nb as i64, ps as i64, 1, d as i64]);
        // SAFETY: as above, `back` writable.
        assert_eq!(unsafe { (fp8.dequantize)(&ct, &bt) }, OK, "{}", api.last_error());
        let rust = want.dequantize().unwrap();
        assert!(back.iter().zip(&rust).all(|(&b, &r)| mla_core::dtype::bf16_to_f32(b) == r), "{layout}");
        // Bad inputs: a values shape that does not match, a cache of neither layout, device memory, overlap.
        let mut bad = vt;
        bad.shape[3] = 100;
        // SAFETY: rejected before any access.
        let s = unsafe { (fp8.quantize)(&bad, &ct) };
        assert!(s == INVALID_ARGUMENT && api.last_error().contains("`values.shape`"), "{}", api.last_error());
        let mut bad = ct;
        bad.shape[3] = 600;
        // SAFETY: rejected before any access.
        let s = unsafe { (fp8.dequantize)(&bad, &bt) };
        assert!(s == INVALID_ARGUMENT && api.last_error().contains("`cache.shape[3]`"), "{}", api.last_error());
        let mut bad = vt;
        bad.device_type = DEVICE_CUDA;
        // SAFETY: rejected before any access.
        let s = unsafe { (fp8.quantize)(&bad, &ct) };
        assert!(s == INVALID_ARGUMENT && api.last_error().contains("`values.device`"), "{}", api.last_error());
        // Values that start at the cache's own bytes.
        let mut bad = bt;
        bad.data = ct.data;
        let before = got.bytes.clone();
        // SAFETY: rejected before any access (the two overlap).
        let s = unsafe { (fp8.quantize)(&bad, &ct) };
        let msg = api.last_error();
        assert!(s == INVALID_ARGUMENT && msg.contains("`cache`: expected memory disjoint from `values`"), "{msg}");
        assert_eq!(got.bytes, before, "{layout}: a rejected call wrote the cache");
    }
}

/// A sparse (both layouts) and a dense decode through the C ABI equal the Rust API's results bit for bit.
#[test]
fn decode_through_the_c_abi_matches_rust() {
    let (api, fp8) = (Api::load(), Fp8Api::load());
    let cpu = api.open_cpu();
    let rust_be = CpuBackend::new();
    for p in [sparse_problem(Fp8Layout::V32), sparse_problem(Fp8Layout::Model1), dense_problem()] {
        let mut run = Fp8HostRun::new(&rust_be, &p).unwrap();
        run.decode().unwrap();
        let want = run.outputs();
        let (want_meta, want_splits) = (run.metadata().0.to_vec(), run.metadata().1.to_vec());
        let n = parts(&fp8, cpu, &p);
        let mut b = Bufs { p: p.clone(), meta: vec![], splits: vec![], out: vec![], lse: vec![] };
        let c = Call::new(cpu, &mut b, n);
        assert_eq!(c.schedule(&fp8), OK, "{}", api.last_error());
        assert_eq!((&b.meta, &b.splits), (&want_meta, &want_splits));
        assert_eq!(c.decode(&fp8), OK, "{}", api.last_error());
        let out: Vec<f32> = b.out.iter().map(|&x| mla_core::dtype::bf16_to_f32(x)).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&want.out));
        assert_eq!(bits(&b.lse), bits(&want.lse));
    }
    // SAFETY: opened above, freed once.
    unsafe { (api.backend_free)(cpu) };
}

type Mutation = fn(&mut Bufs, &mut Call);

fn t(c: &mut Call, i: usize) -> &mut Tensor {
    c.t[i].as_mut().expect("the unmodified call has this tensor")
}

/// Runs `cases` (argument named, mutation) on fresh problems from `make`; the mutation is applied after the
/// metadata step, and the decode must fail with `status` naming the argument, writing nothing.
fn decode_suite(make: fn() -> Fp8HostProblem, cases: &[(&str, Mutation)]) {
    let (api, fp8) = (Api::load(), Fp8Api::load());
    let cpu = api.open_cpu();
    let fresh = || {
        let p = make();
        let n = parts(&fp8, cpu, &p);
        let mut b = Box::new(Bufs { p, meta: vec![], splits: vec![], out: vec![], lse: vec![] });
        let c = Call::new(cpu, &mut b, n);
        assert_eq!(c.schedule(&fp8), OK, "{}", api.last_error());
        (b, c)
    };
    let (mut b, c) = fresh();
    b.poison();
    assert_eq!(c.decode(&fp8), OK, "the unmodified call fails: {}", api.last_error());
    assert!(!b.untouched());
    let mut failures = Vec::new();
    for (arg, mutate) in cases {
        let (mut b, mut c) = fresh();
        b.poison();
        mutate(&mut b, &mut c);
        let s = c.decode(&fp8);
        let msg = api.last_error();
        let named = msg.starts_with("flashmla_fp8_decode: ") && msg.contains(&format!("`{arg}`"));
        if s != INVALID_ARGUMENT || !named || !b.untouched() {
            failures.push(format!("`{arg}`: status {s}, outputs untouched: {}, message: {msg}", b.untouched()));
        }
    }
    // SAFETY: opened above, freed once.
    unsafe { (api.backend_free)(cpu) };
    assert!(failures.is_empty(), "{} bad decode case(s):\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn sparse_decode_rejects_every_bad_argument() {
    #[rustfmt::skip]
    let cases: Vec<(&str, Mutation)> = vec![
        ("backend", |_, c| c.backend = std::ptr::null()),
        ("params", |_, c| c.params_null = true),
        ("params.struct_size", |_, c| c.struct_size = 128),
        ("params.reserved", |_, c| c.reserved = 1),
        ("head_dim_v", |_, c| c.head_dim_v = 576),
        ("causal", |_, c| c.causal = 1),
        ("softmax_scale", |_, c| c.scale = -1.0),
        ("q", |_, c| c.t[Q] = None),
        ("q.dtype", |_, c| t(c, Q).dtype = DTYPE_F32),
        ("q.shape[3]", |_, c| t(c, Q).shape[3] = 512),
        ("q.strides[3]", |_, c| t(c, Q).strides[3] = 2),
        ("k_cache", |_, c| c.t[K] = None),
        ("k_cache.shape[3]", |_, c| t(c, K).shape[3] = 600),
        // A MODEL1-sized cache with a V3.2 query.
        ("q.shape[3]", |_, c| (t(c, K).shape[3], t(c, K).strides[1]) = (584, 584)),
        ("k_cache.dtype", |_, c| t(c, K).dtype = DTYPE_I32),
        ("k_cache.shape[2]", |_, c| t(c, K).shape[2] = 2),
        ("k_cache.strides[1]", |_, c| t(c, K).strides[1] = 700),
        ("k_cache.strides[0]", |_, c| t(c, K).strides[0] = 100),
        ("k_cache.data", |_, c| t(c, K).data = std::ptr::null_mut()),
        // Without indices the call is a dense decode, which needs a block table.
        ("block_table", |_, c| [IND, SINK, TOPK_LEN, XK, XIND, XTOPK_LEN].iter().for_each(|&i| c.t[i] = None)),
        ("indices.ndim", |_, c| t(c, IND).ndim = 2),
        ("indices.dtype", |_, c| t(c, IND).dtype = DTYPE_F32),
        ("indices.shape[0]", |_, c| t(c, IND).shape[0] = 2),
        ("indices.shape[1]", |_, c| t(c, IND).shape[1] = 1),
        ("indices.shape[2]", |_, c| t(c, IND).shape[2] = 0),
        ("indices.strides[2]", |_, c| t(c, IND).strides[2] = 2),
        ("indices.data", |_, c| t(c, IND).data = std::ptr::null_mut()),
        ("indices", |_, c| t(c, IND).strides[0] = i64::MAX / 2),
        ("topk_length.shape[0]", |_, c| t(c, TOPK_LEN).shape[0] = 4),
        ("topk_length.dtype", |_, c| t(c, TOPK_LEN).dtype = DTYPE_F32),
        ("topk_length[1]", |b, _| mode_topk_length(b, 1, 17)),
        ("topk_length[2]", |b, _| mode_topk_length(b, 2, -1)),
        ("extra_topk_length[0]", |b, _| extra_topk_length(b, 0, 9)),
        ("attn_sink.shape[0]", |_, c| t(c, SINK).shape[0] = 3),
        ("attn_sink.dtype", |_, c| t(c, SINK).dtype = DTYPE_BF16),
        ("extra_indices_in_kvcache", |_, c| c.t[XK] = None),
        ("extra_indices_in_kvcache", |_, c| c.t[XIND] = None),
        ("extra_k_cache.shape[3]", |_, c| (t(c, XK).shape[3], t(c, XK).strides[1]) = (584, 584)),
        ("extra_indices_in_kvcache.shape[1]", |_, c| t(c, XIND).shape[1] = 3),
        ("tile_scheduler_metadata", |_, c| c.t[META] = None),
        ("tile_scheduler_metadata.shape[0]", |_, c| t(c, META).shape[0] += 1),
        ("tile_scheduler_metadata[0]", |b, _| b.meta[2] += 1),
        ("num_splits[3]", |b, _| b.splits[3] += 1),
        ("out.dtype", |_, c| t(c, OUT).dtype = DTYPE_F32),
        ("out.shape[3]", |_, c| t(c, OUT).shape[3] = 576),
        ("lse.shape[1]", |_, c| t(c, LSE).shape[1] = 5),
        // Outputs that overlap another argument: `lse` inside `out`, `out` over `q`.
        ("out", |b, c| t(c, LSE).data = b.out.as_mut_ptr().cast()),
        ("out", |_, c| t(c, OUT).data = t(c, Q).data),
        ("workspace_bytes", |_, c| c.workspace_bytes = -1),
    ];
    decode_suite(|| sparse_problem(Fp8Layout::V32), &cases);
}

fn mode_topk_length(b: &mut Bufs, i: usize, v: i32) {
    let Fp8HostMode::Sparse { main, .. } = &mut b.p.mode else { unreachable!() };
    main.topk_length.as_mut().unwrap()[i] = v;
}

fn extra_topk_length(b: &mut Bufs, i: usize, v: i32) {
    let Fp8HostMode::Sparse { extra, .. } = &mut b.p.mode else { unreachable!() };
    extra.as_mut().unwrap().topk_length.as_mut().unwrap()[i] = v;
}

#[test]
fn model1_sparse_decode_rejects_a_v32_query() {
    #[rustfmt::skip]
    let cases: Vec<(&str, Mutation)> = vec![
        ("q.shape[3]", |_, c| t(c, Q).shape[3] = 576),
        ("k_cache.strides[1]", |_, c| t(c, K).strides[1] = 656),
    ];
    decode_suite(|| sparse_problem(Fp8Layout::Model1), &cases);
}

#[test]
fn dense_decode_rejects_every_bad_argument() {
    #[rustfmt::skip]
    let cases: Vec<(&str, Mutation)> = vec![
        ("block_table", |_, c| c.t[BT] = None),
        ("cache_seqlens", |_, c| c.t[SL] = None),
        ("block_table.shape[0]", |_, c| t(c, BT).shape[0] = 1),
        ("block_table.dtype", |_, c| t(c, BT).dtype = DTYPE_F32),
        ("block_table[1][0]", |b, _| dense_block(b, 1, 0, -3)),
        ("block_table[2][1]", |b, _| dense_block(b, 2, 1, 1000)),
        ("cache_seqlens[0]", |b, _| dense_seqlen(b, 0, 10_000)),
        ("cache_seqlens[1]", |b, _| dense_seqlen(b, 1, -1)),
        // Sparse-only arguments are refused without indices.
        ("attn_sink", |b, c| c.t[SINK] = Some(Tensor::host(b.lse.as_mut_ptr().cast(), DTYPE_F32, &[4]))),
        ("topk_length", |b, c| c.t[TOPK_LEN] = Some(Tensor::host(b.splits.as_mut_ptr().cast(), DTYPE_I32, &[3]))),
        // A length whose block count changed makes the schedule stale (one of 1 to 64 tokens would not).
        ("tile_scheduler_metadata[0]", |b, _| dense_seqlen(b, 0, 0)),
    ];
    decode_suite(dense_problem, &cases);
}

fn dense_block(b: &mut Bufs, i: usize, slot: usize, v: i32) {
    let Fp8HostMode::Dense { block_table, max_blocks_per_seq, .. } = &mut b.p.mode else { unreachable!() };
    block_table[i * *max_blocks_per_seq + slot] = v;
}

fn dense_seqlen(b: &mut Bufs, i: usize, v: i32) {
    let Fp8HostMode::Dense { seqlens, .. } = &mut b.p.mode else { unreachable!() };
    seqlens[i] = v;
}

#[test]
fn metadata_step_rejects_bad_lengths_and_writes_nothing() {
    let (api, fp8) = (Api::load(), Fp8Api::load());
    let cpu = api.open_cpu();
    let p = sparse_problem(Fp8Layout::Model1);
    let n = parts(&fp8, cpu, &p);
    let mut b = Box::new(Bufs { p, meta: vec![], splits: vec![], out: vec![], lse: vec![] });
    let c = Call::new(cpu, &mut b, n);
    mode_topk_length(&mut b, 0, 1 << 20);
    b.meta.fill(-7);
    assert_eq!(c.schedule(&fp8), INVALID_ARGUMENT);
    let msg = api.last_error();
    assert!(msg.starts_with("flashmla_fp8_get_metadata: ") && msg.contains("`topk_length[0]`"), "{msg}");
    assert!(b.meta.iter().all(|&x| x == -7));
    let mut null = c;
    null.params_null = true;
    assert_eq!(null.schedule(&fp8), INVALID_ARGUMENT);
    assert!(api.last_error().contains("`params`"));
    // SAFETY: opened above, freed once.
    unsafe { (api.backend_free)(cpu) };
}
