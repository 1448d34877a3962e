//! The bad-input suite, through the shared library loaded as a plugin host loads it: every argument of every entry
//! point made wrong in turn (null pointers, ndim, dtype codes, device, shapes, strides, negative and overflowing
//! sizes, bad values inside index tensors). Each call must return the right status, a message that starts with the
//! function's name and names the argument, and leave every output buffer exactly as it was (sentinel-filled).
//! Each suite first makes the unmodified call and requires it to succeed, so a case can only fail for its own
//! mutation.

mod common;

use std::ffi::c_void;

use common::*;
use mla_core::DType;

/// Every argument of `flashmla_with_kvcache`; `None` is passed as NULL.
#[derive(Clone, Copy)]
struct Call {
    backend: *const Backend,
    q: Option<Tensor>,
    k_cache: Option<Tensor>,
    block_table: Option<Tensor>,
    cache_seqlens: Option<Tensor>,
    head_dim_v: i64,
    meta: Option<Tensor>,
    splits: Option<Tensor>,
    scale: f32,
    causal: i32,
    descale_q: Option<Tensor>,
    descale_k: Option<Tensor>,
    out: Option<Tensor>,
    lse: Option<Tensor>,
    workspace: *mut c_void,
    workspace_bytes: i64,
    num_heads_per_head_k: i64,
    num_heads_k: i64,
}

impl Call {
    fn new(backend: *const Backend, p: &mut Problem) -> Call {
        let t = p.tensors();
        Call {
            backend,
            q: Some(t.q),
            k_cache: Some(t.k_cache),
            block_table: Some(t.block_table),
            cache_seqlens: Some(t.cache_seqlens),
            head_dim_v: 512,
            meta: Some(t.meta),
            splits: Some(t.splits),
            scale: f32::NAN,
            causal: 1,
            descale_q: t.descale_q,
            descale_k: t.descale_k,
            out: Some(t.out),
            lse: Some(t.lse),
            workspace: p.workspace.ptr(),
            workspace_bytes: p.workspace.bytes as i64,
            num_heads_per_head_k: p.spec.q_seq_per_hk() as i64,
            num_heads_k: p.spec.h_kv as i64,
        }
    }

    fn decode(&self, api: &Api) -> Status {
        // SAFETY: every descriptor is NULL or describes memory of the live problem (possibly with wrong metadata,
        // which is what the library must reject before touching memory).
        unsafe {
            (api.with_kvcache)(
                self.backend,
                opt(&self.q),
                opt(&self.k_cache),
                opt(&self.block_table),
                opt(&self.cache_seqlens),
                self.head_dim_v,
                opt(&self.meta),
                opt(&self.splits),
                self.scale,
                self.causal,
                opt(&self.descale_q),
                opt(&self.descale_k),
                opt(&self.out),
                opt(&self.lse),
                self.workspace,
                self.workspace_bytes,
                std::ptr::null_mut(),
            )
        }
    }

    fn schedule(&self, api: &Api) -> Status {
        // SAFETY: as in `decode`.
        unsafe {
            (api.get_mla_metadata)(
                self.backend,
                opt(&self.cache_seqlens),
                self.num_heads_per_head_k,
                self.num_heads_k,
                opt(&self.meta),
                opt(&self.splits),
                std::ptr::null_mut(),
            )
        }
    }
}

type Mutation = fn(&mut Problem, &mut Call);

fn spec(dtype: DType) -> Spec {
    Spec { seqlens: vec![5, 0, 70], s_q: 2, h_q: 4, h_kv: 2, page: 16, dtype, causal: true, scale: None, seed: 11 }
}

fn t(o: &mut Option<Tensor>) -> &mut Tensor {
    o.as_mut().unwrap()
}

/// Runs decode cases on fresh problems of `dtype`: (argument named in the message, mutation).
fn decode_suite(api: &Api, backend: *const Backend, dtype: DType, cases: &[(&str, Mutation)]) {
    let fresh = || {
        let mut p = Problem::for_backend(api, backend, spec(dtype));
        let c = Call::new(backend, &mut p);
        assert_eq!(c.schedule(api), OK, "{}", api.last_error());
        (p, c)
    };
    let (mut p, c) = fresh();
    assert_eq!(c.decode(api), OK, "the unmodified {dtype} call fails: {}", api.last_error());
    assert!(!p.outputs_untouched());
    p.poison_outputs();

    let mut failures = Vec::new();
    for (arg, mutate) in cases {
        let (mut p, mut c) = fresh();
        p.poison_outputs();
        mutate(&mut p, &mut c);
        let s = c.decode(api);
        let msg = api.last_error();
        let named = msg.starts_with("flashmla_with_kvcache: invalid argument ") && msg.contains(&format!("`{arg}`"));
        if s != INVALID_ARGUMENT || !named || !p.outputs_untouched() {
            failures.push(format!(
                "{dtype} `{arg}`: status {s}, outputs untouched: {}, message: {msg}",
                p.outputs_untouched()
            ));
        }
    }
    assert!(failures.is_empty(), "{} bad decode case(s):\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn decode_rejects_every_bad_argument() {
    let api = Api::load();
    let backend = api.open_cpu();
    #[rustfmt::skip]
    let cases: Vec<(&str, Mutation)> = vec![
        ("backend", |_, c| c.backend = std::ptr::null()),
        ("q", |_, c| c.q = None),
        ("k_cache", |_, c| c.k_cache = None),
        ("block_table", |_, c| c.block_table = None),
        ("cache_seqlens", |_, c| c.cache_seqlens = None),
        ("tile_scheduler_metadata", |_, c| c.meta = None),
        ("num_splits", |_, c| c.splits = None),
        ("out", |_, c| c.out = None),
        ("lse", |_, c| c.lse = None),
        // The descriptor fields this layer decodes.
        ("q.ndim", |_, c| t(&mut c.q).ndim = 5),
        ("q.ndim", |_, c| t(&mut c.q).ndim = -1),
        ("q.ndim", |_, c| t(&mut c.q).ndim = 3),
        ("q.dtype", |_, c| t(&mut c.q).dtype = 0),
        ("q.dtype", |_, c| t(&mut c.q).dtype = 77),
        ("q.dtype", |_, c| t(&mut c.q).dtype = DTYPE_F32),
        ("q.device_type", |_, c| t(&mut c.q).device_type = 0),
        ("q.device_type", |_, c| t(&mut c.q).device_type = 3),
        ("q.device", |_, c| t(&mut c.q).device_type = DEVICE_CUDA),
        ("q.device_id", |_, c| t(&mut c.q).device_id = 2),
        // Shapes, strides, sizes, pointers.
        ("q.shape[3]", |_, c| t(&mut c.q).shape[3] = 512),
        ("q.shape[1]", |_, c| t(&mut c.q).shape[1] = 0),
        ("q.shape[2]", |_, c| t(&mut c.q).shape[2] = -4),
        ("q.strides[3]", |_, c| t(&mut c.q).strides[3] = 2),
        ("q.strides[0]", |_, c| t(&mut c.q).strides[0] = -1),
        ("q", |_, c| t(&mut c.q).strides[0] = i64::MAX / 2),
        ("q.data", |_, c| t(&mut c.q).data = std::ptr::null_mut()),
        ("k_cache.dtype", |_, c| t(&mut c.k_cache).dtype = DTYPE_FP16),
        ("k_cache.shape[3]", |_, c| t(&mut c.k_cache).shape[3] = 575),
        ("k_cache.shape[1]", |_, c| t(&mut c.k_cache).shape[1] = 0),
        ("q.shape[2]", |_, c| t(&mut c.k_cache).shape[2] = 3),
        ("k_cache.strides[3]", |_, c| t(&mut c.k_cache).strides[3] = 0),
        ("k_cache.data", |_, c| t(&mut c.k_cache).data = std::ptr::null_mut()),
        ("k_cache", |_, c| t(&mut c.k_cache).shape[0] = i64::MAX / 1000),
        ("block_table.dtype", |_, c| t(&mut c.block_table).dtype = DTYPE_F32),
        ("block_table.shape[0]", |_, c| t(&mut c.block_table).shape[0] = 2),
        ("block_table.ndim", |_, c| t(&mut c.block_table).ndim = 1),
        ("block_table.strides[1]", |_, c| t(&mut c.block_table).strides[1] = 2),
        ("cache_seqlens.shape[0]", |_, c| t(&mut c.cache_seqlens).shape[0] = 2),
        ("cache_seqlens.dtype", |_, c| t(&mut c.cache_seqlens).dtype = DTYPE_BF16),
        ("cache_seqlens.strides", |_, c| t(&mut c.cache_seqlens).strides[0] = 2),
        ("head_dim_v", |_, c| c.head_dim_v = 576),
        ("head_dim_v", |_, c| c.head_dim_v = -1),
        ("tile_scheduler_metadata.shape[0]", |_, c| t(&mut c.meta).shape[0] += 1),
        ("tile_scheduler_metadata.shape[1]", |_, c| t(&mut c.meta).shape[1] = 4),
        ("tile_scheduler_metadata.dtype", |_, c| t(&mut c.meta).dtype = DTYPE_F32),
        ("num_splits.shape[0]", |_, c| t(&mut c.splits).shape[0] = 3),
        ("num_splits.ndim", |_, c| t(&mut c.splits).ndim = 2),
        ("softmax_scale", |_, c| c.scale = 0.0),
        ("softmax_scale", |_, c| c.scale = -0.5),
        ("softmax_scale", |_, c| c.scale = f32::INFINITY),
        ("descale_q", |p, c| c.descale_q = Some(Tensor::host(p.lse.as_mut_ptr().cast(), DTYPE_F32, &[1]))),
        ("out.dtype", |_, c| t(&mut c.out).dtype = DTYPE_FP16),
        ("out.shape[3]", |_, c| t(&mut c.out).shape[3] = 576),
        ("out.shape[1]", |_, c| t(&mut c.out).shape[1] = 1),
        ("out.strides[3]", |_, c| t(&mut c.out).strides[3] = 3),
        ("out.device_type", |_, c| t(&mut c.out).device_type = 9),
        ("out.data", |_, c| t(&mut c.out).data = std::ptr::null_mut()),
        ("lse.dtype", |_, c| t(&mut c.lse).dtype = DTYPE_BF16),
        ("lse.shape[1]", |_, c| t(&mut c.lse).shape[1] = 5),
        ("lse.ndim", |_, c| t(&mut c.lse).ndim = 9),
        ("lse.data", |_, c| t(&mut c.lse).data = std::ptr::null_mut()),
        ("lse.strides[0]", |_, c| t(&mut c.lse).strides[0] = -8),
        ("workspace_bytes", |_, c| c.workspace_bytes -= 1),
        ("workspace_bytes", |_, c| c.workspace_bytes = -1),
        ("workspace", |_, c| c.workspace = std::ptr::null_mut()),
        // Values inside the index tensors, read by the backend before it writes anything.
        ("cache_seqlens[1]", |p, _| p.seqlens[1] = -3),
        ("cache_seqlens[2]", |p, _| p.seqlens[2] = 100_000),
        ("block_table[0][0]", |p, _| p.block_table[0] = p.num_blocks as i32),
        ("block_table[2][4]", |p, _| p.block_table[2 * p.max_blocks + 4] = -1),
        ("num_splits[0]", |p, _| p.splits[0] = 5),
    ];
    decode_suite(&api, backend, DType::Bf16, &cases);

    #[rustfmt::skip]
    let e4m3: Vec<(&str, Mutation)> = vec![
        ("descale_q", |_, c| c.descale_q = None),
        ("descale_k", |_, c| c.descale_k = None),
        ("descale_q.dtype", |_, c| t(&mut c.descale_q).dtype = DTYPE_I32),
        ("descale_k.shape[0]", |_, c| t(&mut c.descale_k).shape[0] = 2),
        ("descale_k.ndim", |_, c| t(&mut c.descale_k).ndim = 0),
        ("descale_q.data", |_, c| t(&mut c.descale_q).data = std::ptr::null_mut()),
        ("descale_q", |p, _| p.descale_q[0] = f32::NAN),
        ("out.dtype", |_, c| t(&mut c.out).dtype = DTYPE_E4M3),
    ];
    decode_suite(&api, backend, DType::E4M3, &e4m3);
    // SAFETY: live handle, freed once.
    unsafe { (api.backend_free)(backend) };
}

#[test]
fn scheduler_rejects_every_bad_argument() {
    let api = Api::load();
    let backend = api.open_cpu();
    let fresh = || {
        let mut p = Problem::for_backend(&api, backend, spec(DType::Bf16));
        let c = Call::new(backend, &mut p);
        (p, c)
    };
    let (p, c) = fresh();
    assert_eq!(c.schedule(&api), OK, "the unmodified call fails: {}", api.last_error());
    assert!(!p.metadata_untouched());

    #[rustfmt::skip]
    let cases: Vec<(&str, Mutation)> = vec![
        ("backend", |_, c| c.backend = std::ptr::null()),
        ("cache_seqlens", |_, c| c.cache_seqlens = None),
        ("tile_scheduler_metadata", |_, c| c.meta = None),
        ("num_splits", |_, c| c.splits = None),
        ("num_heads_per_head_k", |_, c| c.num_heads_per_head_k = 0),
        ("num_heads_per_head_k", |_, c| c.num_heads_per_head_k = -4),
        ("num_heads_k", |_, c| c.num_heads_k = 0),
        ("num_heads_k", |_, c| c.num_heads_k = i64::MIN),
        ("tile_scheduler_metadata.shape[0]", |_, c| t(&mut c.meta).shape[0] += 1),
        ("tile_scheduler_metadata.shape[1]", |_, c| t(&mut c.meta).shape[1] = 4),
        ("tile_scheduler_metadata.strides", |_, c| t(&mut c.meta).strides[1] = 2),
        ("tile_scheduler_metadata.ndim", |_, c| t(&mut c.meta).ndim = 7),
        ("num_splits.dtype", |_, c| t(&mut c.splits).dtype = DTYPE_FP16),
        ("num_splits.shape[0]", |_, c| t(&mut c.splits).shape[0] = 3),
        ("num_splits.data", |_, c| t(&mut c.splits).data = std::ptr::null_mut()),
        ("cache_seqlens.shape[0]", |_, c| t(&mut c.cache_seqlens).shape[0] = 0),
        ("cache_seqlens.device", |_, c| t(&mut c.cache_seqlens).device_type = DEVICE_CUDA),
        ("cache_seqlens.dtype", |_, c| t(&mut c.cache_seqlens).dtype = -1),
        ("cache_seqlens[1]", |p, _| p.seqlens[1] = -1),
    ];
    let mut failures = Vec::new();
    for (arg, mutate) in &cases {
        let (mut p, mut c) = fresh();
        mutate(&mut p, &mut c);
        let s = c.schedule(&api);
        let msg = api.last_error();
        let named =
            msg.starts_with("flashmla_get_mla_metadata: invalid argument ") && msg.contains(&format!("`{arg}`"));
        if s != INVALID_ARGUMENT || !named || !p.metadata_untouched() {
            failures
                .push(format!("`{arg}`: status {s}, outputs untouched: {}, message: {msg}", p.metadata_untouched()));
        }
    }
    assert!(failures.is_empty(), "{} bad scheduler case(s):\n{}", failures.len(), failures.join("\n"));
    // SAFETY: live handle, freed once.
    unsafe { (api.backend_free)(backend) };
}

/// Checks one call of a query: INVALID_ARGUMENT, the message, and the out-parameter left alone.
fn expect_invalid(api: &Api, func: &str, arg: &str, s: Status, out_untouched: bool, failures: &mut Vec<String>) {
    let msg = api.last_error();
    let ok = s == INVALID_ARGUMENT
        && msg.starts_with(&format!("{func}: invalid argument "))
        && msg.contains(&format!("`{arg}`"))
        && out_untouched;
    if !ok {
        failures.push(format!("{func} `{arg}`: status {s}, out untouched: {out_untouched}, message: {msg}"));
    }
}

#[test]
fn handles_and_size_queries_reject_bad_arguments() {
    let api = Api::load();
    let cpu = api.open_cpu();
    let mut f = Vec::new();

    // flashmla_backend_open: the handle is NULL after any failure.
    let open = |name: Option<&[u8]>, ordinal: i32| {
        let name = name.map(|n| std::ffi::CString::new(n).unwrap());
        let mut b = 8usize as *mut Backend; // dangling sentinel, must be overwritten with NULL
        // SAFETY: NULL or a valid C string; a writable out pointer.
        let s = unsafe { (api.backend_open)(name.as_ref().map_or(std::ptr::null(), |n| n.as_ptr()), ordinal, &mut b) };
        (s, b.is_null())
    };
    for (name, ordinal, arg) in [
        (None, 0, "backend_name"),
        (Some(&b"CPU"[..]), 0, "backend_name"),
        (Some(&b""[..]), 0, "backend_name"),
        (Some(&b"\xff\xfe"[..]), 0, "backend_name"),
        (Some(&b"cpu"[..]), -1, "device_ordinal"),
    ] {
        let (s, cleared) = open(name, ordinal);
        expect_invalid(&api, "flashmla_backend_open", arg, s, cleared, &mut f);
    }
    // SAFETY: NULL out pointer is the case under test.
    let s = unsafe { (api.backend_open)(c"cpu".as_ptr(), 0, std::ptr::null_mut()) };
    expect_invalid(&api, "flashmla_backend_open", "out_backend", s, true, &mut f);

    // flashmla_backend_capabilities
    let mut caps = std::mem::MaybeUninit::<Caps>::zeroed();
    // SAFETY: NULL handle / NULL out pointer are the cases under test.
    let s = unsafe { (api.backend_capabilities)(std::ptr::null(), caps.as_mut_ptr()) };
    // SAFETY: zero-initialised plain data.
    let untouched = unsafe { caps.assume_init() }.backend.is_null();
    expect_invalid(&api, "flashmla_backend_capabilities", "backend", s, untouched, &mut f);
    // SAFETY: as above.
    let s = unsafe { (api.backend_capabilities)(cpu, std::ptr::null_mut()) };
    expect_invalid(&api, "flashmla_backend_capabilities", "out_caps", s, true, &mut f);

    // flashmla_num_sm_parts
    for (b, rows, heads, arg) in [
        (std::ptr::null(), 4, 1, "backend"),
        (cpu as *const Backend, 0, 1, "num_heads_per_head_k"),
        (cpu, -1, 1, "num_heads_per_head_k"),
        (cpu, 4, 0, "num_heads_k"),
        (cpu, 4, -7, "num_heads_k"),
    ] {
        let mut out = -7i64;
        // SAFETY: NULL or live handle; writable out pointer.
        let s = unsafe { (api.num_sm_parts)(b, rows, heads, &mut out) };
        expect_invalid(&api, "flashmla_num_sm_parts", arg, s, out == -7, &mut f);
    }
    // SAFETY: NULL out pointer is the case under test.
    let s = unsafe { (api.num_sm_parts)(cpu, 4, 1, std::ptr::null_mut()) };
    expect_invalid(&api, "flashmla_num_sm_parts", "out_num_sm_parts", s, true, &mut f);

    // flashmla_workspace_size
    let m = i64::MAX;
    for (b, shape, dtype, arg) in [
        (std::ptr::null(), [2, 1, 16, 1], DTYPE_BF16, "backend"),
        (cpu as *const Backend, [0, 1, 16, 1], DTYPE_BF16, "batch"),
        (cpu, [2, -1, 16, 1], DTYPE_BF16, "s_q"),
        (cpu, [2, 1, 0, 1], DTYPE_BF16, "h_q"),
        (cpu, [2, 1, 16, -2], DTYPE_BF16, "h_kv"),
        (cpu, [2, 1, 3, 2], DTYPE_BF16, "h_q"),
        (cpu, [2, 1, 16, 1], DTYPE_F32, "dtype"),
        (cpu, [2, 1, 16, 1], 0, "dtype"),
        (cpu, [2, m, 16, 1], DTYPE_BF16, "s_q"),
        (cpu, [m, 1, 16, 1], DTYPE_BF16, "workspace size"),
        (cpu, [2, m / 16, 16, 1], DTYPE_BF16, "workspace size"),
    ] {
        let mut out = -7i64;
        // SAFETY: NULL or live handle; writable out pointer.
        let s = unsafe { (api.workspace_size)(b, shape[0], shape[1], shape[2], shape[3], dtype, &mut out) };
        expect_invalid(&api, "flashmla_workspace_size", arg, s, out == -7, &mut f);
    }
    // SAFETY: NULL out pointer is the case under test.
    let s = unsafe { (api.workspace_size)(cpu, 1, 1, 1, 1, DTYPE_BF16, std::ptr::null_mut()) };
    expect_invalid(&api, "flashmla_workspace_size", "out_bytes", s, true, &mut f);

    // Freeing NULL is a no-op, and the last error survives calls that do not fail... until the next call.
    // SAFETY: NULL is allowed.
    unsafe { (api.backend_free)(std::ptr::null_mut()) };
    let mut out = 0i64;
    // SAFETY: live handle, writable out pointer.
    assert_eq!(unsafe { (api.num_sm_parts)(cpu, 4, 1, &mut out) }, OK);
    assert_eq!(api.last_error(), "", "a successful call clears the message");
    assert!(out >= 1);

    assert!(f.is_empty(), "{} bad case(s):\n{}", f.len(), f.join("\n"));
    // SAFETY: live handle, freed once.
    unsafe { (api.backend_free)(cpu) };
}
