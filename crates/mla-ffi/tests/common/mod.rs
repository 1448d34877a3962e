//! Shared by the Rust tests that go through the shared library: the library loaded with `libloading` exactly as a
//! plugin host loads it (own copies of the C structs, function pointers looked up by name), and a randomized
//! decode problem held in host buffers.
//!
//! | item | what |
//! |---|---|
//! | [`Api`] | `libflashmla.so` built by [`library_path`], every entry point as a typed function pointer |
//! | [`Tensor`], [`Caps`] | `flashmla_tensor`, `flashmla_capabilities` declared again here, from the header |
//! | [`Spec`] / [`Problem`] | a problem (any dtype, page size, causal, garbage past the ends) and its buffers |
#![allow(dead_code)] // each test binary uses a different part

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use mla_core::DType;

/// Every entry point of the C ABI, as exported by the library and declared in `include/flashmla.h`.
pub const ENTRY_POINTS: [&str; 11] = [
    "flashmla_abi_version",
    "flashmla_version",
    "flashmla_last_error_message",
    "flashmla_status_name",
    "flashmla_backend_open",
    "flashmla_backend_free",
    "flashmla_backend_capabilities",
    "flashmla_num_sm_parts",
    "flashmla_workspace_size",
    "flashmla_get_mla_metadata",
    "flashmla_with_kvcache",
];

/// The entry points ABI version 2 added (the decode over FP8 caches), declared in `include/flashmla.h` too.
pub const FP8_ENTRY_POINTS: [&str; 7] = [
    "flashmla_backend_fp8_capabilities",
    "flashmla_fp8_num_sm_parts",
    "flashmla_fp8_workspace_size",
    "flashmla_fp8_get_metadata",
    "flashmla_fp8_decode",
    "flashmla_fp8_quantize",
    "flashmla_fp8_dequantize",
];

pub type Status = i32;
pub const OK: Status = 0;
pub const INVALID_ARGUMENT: Status = 1;
pub const UNSUPPORTED: Status = 2;
pub const UNAVAILABLE: Status = 3;
pub const BACKEND_ERROR: Status = 4;
pub const PANIC: Status = 5;

pub const DTYPE_BF16: i32 = 1;
pub const DTYPE_FP16: i32 = 2;
pub const DTYPE_E4M3: i32 = 3;
pub const DTYPE_F32: i32 = 4;
pub const DTYPE_I32: i32 = 5;
pub const DEVICE_CPU: i32 = 1;
pub const DEVICE_CUDA: i32 = 2;

/// `flashmla_tensor`, as a plugin host declares it from the header.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Tensor {
    pub data: *mut c_void,
    pub device_type: i32,
    pub device_id: i32,
    pub dtype: i32,
    pub ndim: i32,
    pub shape: [i64; 4],
    pub strides: [i64; 4],
}

impl Tensor {
    /// A contiguous host tensor.
    pub fn host(data: *mut c_void, dtype: i32, shape: &[i64]) -> Tensor {
        let mut t = Tensor {
            data,
            device_type: DEVICE_CPU,
            device_id: 0,
            dtype,
            ndim: shape.len() as i32,
            shape: [0; 4],
            strides: [0; 4],
        };
        let mut stride = 1;
        for i in (0..shape.len()).rev() {
            t.shape[i] = shape[i];
            t.strides[i] = stride;
            stride *= shape[i];
        }
        t
    }
}

/// `flashmla_capabilities`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    pub backend: *const c_char,
    pub device_name: *const c_char,
    pub device_type: i32,
    pub device_id: i32,
    pub sm_count: i32,
    pub compute_capability_major: i32,
    pub compute_capability_minor: i32,
    pub dtypes: u32,
    pub num_head_dims: i32,
    pub head_dims_k: [i32; 4],
    pub head_dims_v: [i32; 4],
    pub any_page_size: i32,
    pub num_page_sizes: i32,
    pub page_sizes: [i32; 16],
}

/// The opaque `flashmla_backend`.
pub enum Backend {}

type T = *const Tensor;

/// The shared library and its entry points.
pub struct Api {
    _lib: libloading::Library,
    pub abi_version: unsafe extern "C" fn() -> u32,
    pub version: unsafe extern "C" fn() -> *const c_char,
    pub last_error_message: unsafe extern "C" fn() -> *const c_char,
    pub status_name: unsafe extern "C" fn(i32) -> *const c_char,
    pub backend_open: unsafe extern "C" fn(*const c_char, i32, *mut *mut Backend) -> Status,
    pub backend_free: unsafe extern "C" fn(*mut Backend),
    pub backend_capabilities: unsafe extern "C" fn(*const Backend, *mut Caps) -> Status,
    pub num_sm_parts: unsafe extern "C" fn(*const Backend, i64, i64, *mut i64) -> Status,
    pub workspace_size: unsafe extern "C" fn(*const Backend, i64, i64, i64, i64, i32, *mut i64) -> Status,
    pub get_mla_metadata: unsafe extern "C" fn(*const Backend, T, i64, i64, T, T, *mut c_void) -> Status,
    #[allow(clippy::type_complexity)]
    pub with_kvcache: unsafe extern "C" fn(
        *const Backend,
        T,
        T,
        T,
        T,
        i64,
        T,
        T,
        f32,
        i32,
        T,
        T,
        T,
        T,
        *mut c_void,
        i64,
        *mut c_void,
    ) -> Status,
}

// SAFETY: the function pointers are plain code addresses inside the library, which `_lib` keeps loaded; the
// library documents every entry point as callable from any thread.
unsafe impl Send for Api {}
// SAFETY: as above.
unsafe impl Sync for Api {}

/// `libflashmla.so` as this package's features build it: built here, once per test process, by the `cargo` that
/// runs the tests. Cargo does not build it for integration tests by itself: the library is `cdylib` + `staticlib`
/// only (the `flashmla` facade crate owns the rlib of that name), and a test target only depends on a library it
/// can link.
pub fn library_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(build_cdylib).clone()
}

fn build_cdylib() -> PathBuf {
    // The test executable lives in <target>/<profile dir>/deps/; build the library in the same profile so that the
    // tests exercise the code they were compiled with. The profile dir of `dev` is `debug`.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(Path::parent).and_then(Path::file_name).expect("target/<profile>/deps");
    let profile = match profile_dir.to_str().expect("UTF-8 profile directory") {
        "debug" => "dev",
        other => other,
    };
    let mut features = Vec::new();
    if cfg!(feature = "cuda") {
        features.push("cuda");
    }
    if cfg!(feature = "soname") {
        features.push("soname");
    }
    // The target directory comes from the environment and configuration this process inherited from cargo.
    let output = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "mla-ffi", "--lib", "--no-default-features", "--profile", profile])
        .args(["--message-format", "json-render-diagnostics", "--features", &features.join(",")])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo to build libflashmla.so");
    assert!(output.status.success(), "cargo build -p mla-ffi failed ({})", output.status);
    let stdout = String::from_utf8(output.stdout).expect("cargo prints UTF-8");
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "flashmla")
        .flat_map(|msg| msg["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|f| f.extension().is_some_and(|e| e == "so"))
        .expect("cargo build -p mla-ffi reported no libflashmla.so")
}

macro_rules! sym {
    ($lib:expr, $name:literal) => {
        // SAFETY: the type is the one declared in include/flashmla.h for this symbol.
        *unsafe { $lib.get(concat!($name, "\0").as_bytes()) }.unwrap_or_else(|e| panic!("{}: {e}", $name))
    };
}

impl Api {
    /// dlopens the library and resolves every entry point.
    pub fn load() -> Api {
        // SAFETY: loading runs no initialisers with preconditions (the library has no constructors).
        let lib = unsafe { libloading::Library::new(library_path()) }.expect("dlopen libflashmla.so");
        Api {
            abi_version: sym!(lib, "flashmla_abi_version"),
            version: sym!(lib, "flashmla_version"),
            last_error_message: sym!(lib, "flashmla_last_error_message"),
            status_name: sym!(lib, "flashmla_status_name"),
            backend_open: sym!(lib, "flashmla_backend_open"),
            backend_free: sym!(lib, "flashmla_backend_free"),
            backend_capabilities: sym!(lib, "flashmla_backend_capabilities"),
            num_sm_parts: sym!(lib, "flashmla_num_sm_parts"),
            workspace_size: sym!(lib, "flashmla_workspace_size"),
            get_mla_metadata: sym!(lib, "flashmla_get_mla_metadata"),
            with_kvcache: sym!(lib, "flashmla_with_kvcache"),
            _lib: lib,
        }
    }

    /// This thread's last error message.
    pub fn last_error(&self) -> String {
        // SAFETY: never NULL, valid until the next call on this thread; copied at once.
        unsafe { CStr::from_ptr((self.last_error_message)()) }.to_string_lossy().into_owned()
    }

    /// Opens a backend (the status and, on success, the handle).
    pub fn open(&self, name: &str, ordinal: i32) -> (Status, *mut Backend) {
        let name = CString::new(name).unwrap();
        let mut b = std::ptr::null_mut();
        // SAFETY: valid C string and out pointer.
        let s = unsafe { (self.backend_open)(name.as_ptr(), ordinal, &mut b) };
        (s, b)
    }

    /// Opens the CPU backend or panics with the library's message.
    pub fn open_cpu(&self) -> *mut Backend {
        let (s, b) = self.open("cpu", 0);
        assert_eq!(s, OK, "{}", self.last_error());
        b
    }
}

/// A decode problem.
#[derive(Clone, Debug)]
pub struct Spec {
    pub seqlens: Vec<i32>,
    pub s_q: usize,
    pub h_q: usize,
    pub h_kv: usize,
    pub page: usize,
    pub dtype: DType,
    pub causal: bool,
    pub scale: Option<f32>,
    pub seed: u64,
}

impl Spec {
    pub fn batch(&self) -> usize {
        self.seqlens.len()
    }
    pub fn q_seq_per_hk(&self) -> usize {
        self.s_q * self.h_q / self.h_kv
    }
    pub fn dtype_code(&self) -> i32 {
        match self.dtype {
            DType::Bf16 => DTYPE_BF16,
            DType::F16 => DTYPE_FP16,
            DType::E4M3 => DTYPE_E4M3,
        }
    }
    pub fn out_code(&self) -> i32 {
        if self.dtype == DType::F16 { DTYPE_FP16 } else { DTYPE_BF16 }
    }
}

/// Bytes of a host buffer, 8-byte aligned (element views of any API dtype are aligned).
pub struct Buf {
    words: Vec<u64>,
    pub bytes: usize,
}

impl Buf {
    pub fn new(bytes: usize) -> Buf {
        Buf { words: vec![0; bytes.div_ceil(8).max(1)], bytes }
    }
    pub fn ptr(&mut self) -> *mut c_void {
        self.words.as_mut_ptr().cast()
    }
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `bytes` <= 8 * words.len(); u8 has no alignment or validity requirements.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.bytes) }
    }
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.bytes) }
    }
    pub fn fill(&mut self, byte: u8) {
        self.as_bytes_mut().fill(byte);
    }
}

/// A problem's host buffers (inputs filled, outputs poisoned).
pub struct Problem {
    pub spec: Spec,
    pub num_blocks: usize,
    pub max_blocks: usize,
    pub num_sm_parts: usize,
    pub q: Buf,
    pub kv: Buf,
    pub block_table: Vec<i32>,
    pub seqlens: Vec<i32>,
    pub descale_q: Vec<f32>,
    pub descale_k: Vec<f32>,
    pub meta: Vec<i32>,
    pub splits: Vec<i32>,
    pub out: Buf,
    pub lse: Vec<f32>,
    pub workspace: Buf,
}

pub const OUT_SENTINEL: u8 = 0xA5;
pub const LSE_SENTINEL: f32 = -12345.0;
pub const META_SENTINEL: i32 = -777;

impl Problem {
    /// Random inputs for `spec`, from the test kit's generator (`mla_testkit::Problem`: shuffled pages, unused
    /// pages, NaN in every cache row past a request's length, garbage block-table entries past its last page).
    /// `num_sm_parts` and `workspace_bytes` are the library's answers for this shape.
    pub fn new(spec: Spec, num_sm_parts: usize, workspace_bytes: usize) -> Problem {
        let b = spec.batch();
        let e4m3 = spec.dtype == DType::E4M3;
        let mut case = mla_testkit::Case::new(&spec.seqlens, spec.s_q, spec.h_q);
        case.h_kv = spec.h_kv;
        case.page_size = spec.page;
        case.dtype = spec.dtype;
        case.causal = spec.causal;
        case.softmax_scale = spec.scale;
        case.seed = spec.seed;
        if e4m3 {
            // Descales away from 1 so that they matter.
            (case.descale_q, case.descale_k) = (0.25, 0.125);
        }
        let generated = mla_testkit::Problem::generate(&case);
        let buf = |bytes: Vec<u8>| {
            let mut b = Buf::new(bytes.len());
            b.as_bytes_mut().copy_from_slice(&bytes);
            b
        };
        let (q, kv) = (buf(generated.q.to_le_bytes()), buf(generated.cache.to_le_bytes()));
        let (num_blocks, max_blocks, block_table) =
            (generated.num_blocks, generated.max_blocks_per_seq, generated.block_table);
        let (dq, dk) = if e4m3 { (vec![case.descale_q], vec![case.descale_k]) } else { (vec![], vec![]) };
        let mut p = Problem {
            num_blocks,
            max_blocks,
            num_sm_parts,
            q,
            kv,
            block_table,
            seqlens: spec.seqlens.clone(),
            descale_q: dq,
            descale_k: dk,
            meta: vec![META_SENTINEL; num_sm_parts * 8],
            splits: vec![META_SENTINEL; b + 1],
            out: Buf::new(b * spec.s_q * spec.h_q * mla_core::HEAD_DIM_V * 2),
            lse: vec![LSE_SENTINEL; b * spec.h_q * spec.s_q],
            workspace: Buf::new(workspace_bytes),
            spec,
        };
        p.poison_outputs();
        p
    }

    /// Sizes from the library, then [`Problem::new`].
    pub fn for_backend(api: &Api, backend: *const Backend, spec: Spec) -> Problem {
        let (mut parts, mut ws) = (0i64, 0i64);
        // SAFETY: live handle, valid out pointers.
        unsafe {
            assert_eq!((api.num_sm_parts)(backend, spec.q_seq_per_hk() as i64, spec.h_kv as i64, &mut parts), OK);
            let (b, s, h, g) = (spec.batch() as i64, spec.s_q as i64, spec.h_q as i64, spec.h_kv as i64);
            assert_eq!(
                (api.workspace_size)(backend, b, s, h, g, spec.dtype_code(), &mut ws),
                OK,
                "{}",
                api.last_error()
            );
        }
        Problem::new(spec, parts as usize, ws as usize)
    }

    pub fn poison_outputs(&mut self) {
        self.out.fill(OUT_SENTINEL);
        self.lse.fill(LSE_SENTINEL);
    }

    pub fn outputs_untouched(&self) -> bool {
        self.out.as_bytes().iter().all(|&b| b == OUT_SENTINEL) && self.lse.iter().all(|&x| x == LSE_SENTINEL)
    }

    pub fn metadata_untouched(&self) -> bool {
        self.meta.iter().chain(&self.splits).all(|&x| x == META_SENTINEL)
    }

    /// Descriptors of every tensor argument, in the order of the C signatures.
    pub fn tensors(&mut self) -> Tensors {
        let s = &self.spec;
        let (b, sq, hq, hkv) = (s.batch() as i64, s.s_q as i64, s.h_q as i64, s.h_kv as i64);
        let (kd, vd) = (mla_core::HEAD_DIM_K as i64, mla_core::HEAD_DIM_V as i64);
        let dt = s.dtype_code();
        let out_code = s.out_code();
        let e4m3 = s.dtype == DType::E4M3;
        let (page, nb, mb, parts) = (s.page as i64, self.num_blocks as i64, self.max_blocks as i64, self.num_sm_parts);
        Tensors {
            q: Tensor::host(self.q.ptr(), dt, &[b, sq, hq, kd]),
            k_cache: Tensor::host(self.kv.ptr(), dt, &[nb, page, hkv, kd]),
            block_table: Tensor::host(self.block_table.as_mut_ptr().cast(), DTYPE_I32, &[b, mb]),
            cache_seqlens: Tensor::host(self.seqlens.as_mut_ptr().cast(), DTYPE_I32, &[b]),
            meta: Tensor::host(self.meta.as_mut_ptr().cast(), DTYPE_I32, &[parts as i64, 8]),
            splits: Tensor::host(self.splits.as_mut_ptr().cast(), DTYPE_I32, &[b + 1]),
            descale_q: e4m3.then(|| Tensor::host(self.descale_q.as_mut_ptr().cast(), DTYPE_F32, &[1])),
            descale_k: e4m3.then(|| Tensor::host(self.descale_k.as_mut_ptr().cast(), DTYPE_F32, &[1])),
            out: Tensor::host(self.out.ptr(), out_code, &[b, sq, hq, vd]),
            lse: Tensor::host(self.lse.as_mut_ptr().cast(), DTYPE_F32, &[b, hq, sq]),
        }
    }
}

/// Every tensor argument of the two steps; mutate one to make a bad call.
#[derive(Clone, Copy, Debug)]
pub struct Tensors {
    pub q: Tensor,
    pub k_cache: Tensor,
    pub block_table: Tensor,
    pub cache_seqlens: Tensor,
    pub meta: Tensor,
    pub splits: Tensor,
    pub descale_q: Option<Tensor>,
    pub descale_k: Option<Tensor>,
    pub out: Tensor,
    pub lse: Tensor,
}

impl Api {
    /// `flashmla_get_mla_metadata` with `t`'s descriptors on `stream` (NULL: the legacy default stream).
    ///
    /// # Safety
    /// `backend` is live; `t`'s `cache_seqlens`, `meta` and `splits` describe live buffers on the backend's device;
    /// `stream` is NULL or a stream of that device.
    pub unsafe fn metadata(&self, backend: *const Backend, t: &Tensors, spec: &Spec, stream: *mut c_void) -> Status {
        // SAFETY: the caller's contract.
        unsafe {
            (self.get_mla_metadata)(
                backend,
                &t.cache_seqlens,
                spec.q_seq_per_hk() as i64,
                spec.h_kv as i64,
                &t.meta,
                &t.splits,
                stream,
            )
        }
    }

    /// `flashmla_with_kvcache` with `t`'s descriptors and `spec`'s scale and mask; `q` is passed apart so that a
    /// test can hand in a mismatched one.
    ///
    /// # Safety
    /// As [`Api::metadata`], for every descriptor and `q`; `workspace` holds `workspace_bytes` bytes on the device.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn decode(
        &self,
        backend: *const Backend,
        q: &Tensor,
        t: &Tensors,
        spec: &Spec,
        workspace: *mut c_void,
        workspace_bytes: usize,
        stream: *mut c_void,
    ) -> Status {
        // SAFETY: the caller's contract.
        unsafe {
            (self.with_kvcache)(
                backend,
                q,
                &t.k_cache,
                &t.block_table,
                &t.cache_seqlens,
                mla_core::HEAD_DIM_V as i64,
                &t.meta,
                &t.splits,
                spec.scale.unwrap_or(f32::NAN),
                spec.causal as i32,
                opt(&t.descale_q),
                opt(&t.descale_k),
                &t.out,
                &t.lse,
                workspace,
                workspace_bytes as i64,
                stream,
            )
        }
    }
}

/// Pointer to an optional descriptor (NULL when absent).
pub fn opt(t: &Option<Tensor>) -> *const Tensor {
    t.as_ref().map_or(std::ptr::null(), |t| t as *const Tensor)
}
