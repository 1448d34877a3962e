//! `flashmla._native`: the compiled half of the `flashmla` Python package.
//!
//! It implements upstream FlashMLA's two functions directly over the Rust API ([`flashmla::MlaBackend`]): the
//! arguments are read in Rust (a few C-level attribute calls per tensor, see `args.rs`), outputs and the split-KV
//! workspace are allocated through the caller's framework (`alloc.rs`), and CUDA work is enqueued on PyTorch's
//! current stream without synchronising. The package's Python modules add the exceptions, the `torch.library`
//! registration and the NumPy bit helpers; the two hot functions are these, called with no Python frame between.
//!
//! Both generations of upstream's calling convention are accepted:
//!
//! | upstream | scheduler step | decode step |
//! |---|---|---|
//! | 2025 | `get_mla_metadata(cache_seqlens, s_q·h_q/h_kv, h_kv)` → `(tile_scheduler_metadata, num_splits)` | `flash_mla_with_kvcache(…, tile_scheduler_metadata, num_splits, …)` |
//! | HEAD (2026) | `get_mla_metadata()` → `(FlashMLASchedMeta, None)` | `flash_mla_with_kvcache(…, sched, None, …)`: the first call fills `sched` |

use std::sync::{Arc, Mutex, OnceLock};

use flashmla::{DType, DecodeArgs, Device, Error, MetadataArgs, MlaBackend, ScalarType, Workspace, open_backend};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

mod alloc;
mod args;
mod errors;
mod fp8;

use alloc::Allocator;
use args::{Arg, Repr, describe, describe_opt};
use errors::{OrRaise, invalid};

/// The decode function's name, as its messages start.
const FUNC_DECODE: &str = "flash_mla_with_kvcache";
/// Words per row of `tile_scheduler_metadata`.
const METADATA_WORDS: i64 = flashmla::scheduler::METADATA_WORDS as i64;

type Backend = Arc<dyn MlaBackend>;

static CPU: OnceLock<Backend> = OnceLock::new();
/// Hopper backends by CUDA ordinal; a failure to open is kept too, so a machine without a GPU pays for the probe
/// once, not on every call.
static CUDA: Mutex<Vec<(i32, Result<Backend, Error>)>> = Mutex::new(Vec::new());

/// The backend that runs tensors living on `device`: `hopper` for CUDA, `cpu` for host memory.
fn backend_for(device: Device) -> Result<Backend, Error> {
    match device {
        Device::Host => {
            Ok(CPU.get_or_init(|| Arc::from(open_backend("cpu", 0).expect("the CPU backend always opens"))).clone())
        }
        Device::Cuda(ordinal) => {
            let mut cache = CUDA.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, r)) = cache.iter().find(|(o, _)| *o == ordinal) {
                return r.clone();
            }
            let opened = open_backend("hopper", ordinal).map(Arc::from).map_err(|e| match e {
                Error::Unavailable { backend, reason } => Error::Unavailable {
                    backend,
                    reason: format!("CUDA tensors run on the `hopper` backend (sm_90a), which cannot run on cuda:{ordinal}: {reason}"),
                },
                other => other,
            });
            cache.push((ordinal, opened.clone()));
            opened
        }
    }
}

fn usize_arg(py: Python<'_>, func: &str, name: &str, v: &Bound<'_, PyAny>) -> PyResult<usize> {
    let i: i64 = v
        .extract()
        .map_err(|_| invalid(py, func, name, "an integer", v.repr().map(|r| r.to_string()).unwrap_or_default()))?;
    usize::try_from(i).map_err(|_| invalid(py, func, name, "an integer >= 0", i))
}

/// Runs the scheduler step; returns `(tile_scheduler_metadata, num_splits)` as the caller's framework's tensors.
fn run_metadata<'py>(
    py: Python<'py>,
    func: &'static str,
    seqlens: &Arg<'py>,
    q_seq_per_hk: usize,
    h_kv: usize,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let backend = backend_for(seqlens.desc.device()).or_raise(py, func)?;
    let alloc = Allocator::new(py, func, seqlens)?;
    let parts = backend.num_sm_parts(q_seq_per_hk.max(1), h_kv.max(1)) as i64;
    let batch = match seqlens.dims() {
        [b] => (*b).max(0),
        _ => 0, // the library reports the shape of cache_seqlens
    };
    let meta = alloc.empty("tile_scheduler_metadata", &[parts, METADATA_WORDS], ScalarType::I32, Repr::Native)?;
    let splits = alloc.empty("num_splits", &[batch + 1], ScalarType::I32, Repr::Native)?;
    let args = MetadataArgs {
        cache_seqlens: seqlens.desc,
        q_seq_per_hk,
        h_kv,
        tile_scheduler_metadata: meta.desc,
        num_splits: splits.desc,
    };
    let stream = alloc.stream()?;
    backend.get_mla_metadata(&args, stream).or_raise(py, func)?;
    Ok((meta.obj, splits.obj))
}

/// The scheduler step, once per decoding step.
///
/// `get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)` (upstream's 2025 API) splits the
/// batch's KV blocks into balanced parts and returns `(tile_scheduler_metadata, num_splits)`: int32
/// `(num_sm_parts, 8)` and `(batch + 1,)` of `cache_seqlens`' framework and device. `get_mla_metadata()` with no
/// arguments (upstream HEAD's API) returns `(FlashMLASchedMeta(), None)`, a schedule that the first
/// `flash_mla_with_kvcache` call using it fills.
#[pyfunction]
#[pyo3(signature = (*args, **kwargs))]
fn get_mla_metadata<'py>(
    py: Python<'py>,
    args: &Bound<'py, PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyTuple>> {
    const FUNC: &str = "get_mla_metadata";
    let kw = |name: &str| -> PyResult<Option<Bound<'py, PyAny>>> {
        match kwargs {
            Some(k) => k.get_item(name),
            None => Ok(None),
        }
    };
    let names = ["cache_seqlens", "num_heads_per_head_k", "num_heads_k"];
    let mut vals: Vec<Option<Bound<'py, PyAny>>> = Vec::with_capacity(3);
    for (i, n) in names.iter().enumerate() {
        vals.push(if i < args.len() { Some(args.get_item(i)?) } else { kw(n)? });
    }
    if args.len() > names.len() {
        return Err(invalid(py, FUNC, "args", "at most 3 positional arguments", args.len()));
    }
    if let Some(k) = kwargs {
        for key in k.keys() {
            let key: String = key.extract()?;
            if !names.contains(&key.as_str()) {
                return Err(invalid(py, FUNC, key, format!("one of {names:?}"), "an unknown keyword argument"));
            }
        }
    }
    if vals.iter().all(Option::is_none) {
        let sched = Bound::new(py, Schedule::default())?;
        return PyTuple::new(py, [sched.into_any(), py.None().into_bound(py)]);
    }
    let [Some(seqlens), Some(n), Some(h_kv)] = [vals[0].take(), vals[1].take(), vals[2].take()] else {
        let missing: Vec<&str> = names.iter().zip(&vals).filter(|(_, v)| v.is_none()).map(|(n, _)| *n).collect();
        return Err(invalid(py, FUNC, missing[0], "all three arguments (or none: upstream HEAD's API)", "missing"));
    };
    let q_seq_per_hk = usize_arg(py, FUNC, "num_heads_per_head_k", &n)?;
    let h_kv = usize_arg(py, FUNC, "num_heads_k", &h_kv)?;
    let seqlens = describe(py, FUNC, "cache_seqlens", &seqlens, None)?;
    let (meta, splits) = run_metadata(py, FUNC, &seqlens, q_seq_per_hk, h_kv)?;
    PyTuple::new(py, [meta, splits])
}

/// With a `FlashMLASchedMeta` (upstream HEAD's convention) `num_splits` must be None: the schedule holds its own.
fn no_num_splits_with_schedule(py: Python<'_>, num_splits: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    if num_splits.is_some_and(|n| !n.is_none()) {
        return Err(invalid(
            py,
            FUNC_DECODE,
            "num_splits",
            "None when tile_scheduler_metadata is a FlashMLASchedMeta",
            "a value",
        ));
    }
    Ok(())
}

/// The shapes a schedule was made for (upstream HEAD's `FlashMLASchedMeta.Config`, plus the device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ScheduleConfig {
    b: i64,
    s_q: i64,
    h_q: i64,
    page_block_size: i64,
    h_k: i64,
    causal: bool,
    device: Device,
    is_fp8_kvcache: bool,
    topk: Option<i64>,
    extra_page_block_size: Option<i64>,
    extra_topk: Option<i64>,
}

impl ScheduleConfig {
    const FIELDS: [&'static str; 11] = [
        "b",
        "s_q",
        "h_q",
        "page_block_size",
        "h_k",
        "causal",
        "device",
        "is_fp8_kvcache",
        "topk",
        "extra_page_block_size",
        "extra_topk",
    ];

    /// A dense BF16/FP16/E4M3 schedule's configuration.
    fn dense(b: i64, s_q: i64, h_q: i64, page_block_size: i64, h_k: i64, causal: bool, device: Device) -> Self {
        ScheduleConfig {
            b,
            s_q,
            h_q,
            page_block_size,
            h_k,
            causal,
            device,
            is_fp8_kvcache: false,
            topk: None,
            extra_page_block_size: None,
            extra_topk: None,
        }
    }

    fn values(&self) -> [String; 11] {
        let opt = |v: Option<i64>| v.map_or_else(|| "None".to_string(), |v| v.to_string());
        [
            self.b.to_string(),
            self.s_q.to_string(),
            self.h_q.to_string(),
            self.page_block_size.to_string(),
            self.h_k.to_string(),
            self.causal.to_string(),
            self.device.to_string(),
            self.is_fp8_kvcache.to_string(),
            opt(self.topk),
            opt(self.extra_page_block_size),
            opt(self.extra_topk),
        ]
    }

    /// Ok when a schedule made for `self` may serve a call with `want`; else the error naming the first field that
    /// differs.
    fn check_same(&self, py: Python<'_>, want: &ScheduleConfig) -> PyResult<()> {
        if self == want {
            return Ok(());
        }
        let (hv, wv) = (self.values(), want.values());
        let i = (0..hv.len()).find(|&i| hv[i] != wv[i]).unwrap_or(0);
        Err(invalid(
            py,
            FUNC_DECODE,
            format!("tile_scheduler_metadata.config.{}", ScheduleConfig::FIELDS[i]),
            format!(
                "{} (the schedule was filled by a call with other shapes; make a new one with get_mla_metadata() for these)",
                hv[i]
            ),
            &wv[i],
        ))
    }
}

/// A tile schedule in upstream HEAD's style: `get_mla_metadata()` returns an empty one, the first
/// `flash_mla_with_kvcache` call that uses it runs the scheduler step on its `cache_seqlens` and keeps the result,
/// and later calls (the other layers of the step) reuse it. Reusing it with other shapes is an error naming the
/// shape that differs; with other lengths (values of `cache_seqlens`) it is the caller's contract, as upstream's.
#[pyclass(module = "flashmla", name = "FlashMLASchedMeta")]
#[derive(Default)]
struct Schedule {
    config: Option<ScheduleConfig>,
    metadata: Option<Py<PyAny>>,
    num_splits: Option<Py<PyAny>>,
}

#[pymethods]
impl Schedule {
    #[new]
    fn new() -> Self {
        Schedule::default()
    }

    /// Whether a decode call has filled this schedule.
    #[getter]
    fn have_initialized(&self) -> bool {
        self.config.is_some()
    }

    /// int32 `(num_sm_parts, 8)`, or None before the first decode call.
    #[getter]
    fn tile_scheduler_metadata(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.metadata.as_ref().map(|m| m.clone_ref(py))
    }

    /// int32 `(batch + 1,)`, or None before the first decode call.
    #[getter]
    fn num_splits(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.num_splits.as_ref().map(|m| m.clone_ref(py))
    }

    /// The shapes the schedule was made for, as a dict, or None before the first decode call.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(c) = &self.config else { return Ok(None) };
        let d = PyDict::new(py);
        for (k, v) in ScheduleConfig::FIELDS.iter().zip(c.values()) {
            d.set_item(k, v)?;
        }
        Ok(Some(d))
    }

    fn __repr__(&self) -> String {
        match &self.config {
            None => "FlashMLASchedMeta(uninitialized)".into(),
            Some(c) => format!("FlashMLASchedMeta({c:?})"),
        }
    }
}

/// The decode step, once per layer: attention of `q` over the paged latent cache; returns `(out, lse)`.
///
/// See the package documentation (`help(flashmla)`) for the arguments; upstream's signature, with
/// `descale_q`/`descale_k` (float32 `(1,)`, e4m3 inputs only) in pull request #122's positions and `dtype=` for
/// raw-bit NumPy arrays. `tile_scheduler_metadata`/`num_splits` come from `get_mla_metadata(...)`, or are a
/// `FlashMLASchedMeta` and None (upstream HEAD).
#[pyfunction]
#[pyo3(signature = (
    q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits=None,
    softmax_scale=None, causal=false, descale_q=None, descale_k=None, *, is_fp8_kvcache=false, indices=None,
    attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None, extra_topk_length=None,
    dtype=None
))]
#[allow(clippy::too_many_arguments)]
fn flash_mla_with_kvcache<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k_cache: &Bound<'py, PyAny>,
    block_table: &Bound<'py, PyAny>,
    cache_seqlens: &Bound<'py, PyAny>,
    head_dim_v: &Bound<'py, PyAny>,
    tile_scheduler_metadata: &Bound<'py, PyAny>,
    num_splits: Option<&Bound<'py, PyAny>>,
    softmax_scale: Option<&Bound<'py, PyAny>>,
    causal: bool,
    descale_q: Option<&Bound<'py, PyAny>>,
    descale_k: Option<&Bound<'py, PyAny>>,
    is_fp8_kvcache: bool,
    indices: Option<&Bound<'py, PyAny>>,
    attn_sink: Option<&Bound<'py, PyAny>>,
    extra_k_cache: Option<&Bound<'py, PyAny>>,
    extra_indices_in_kvcache: Option<&Bound<'py, PyAny>>,
    topk_length: Option<&Bound<'py, PyAny>>,
    extra_topk_length: Option<&Bound<'py, PyAny>>,
    dtype: Option<&str>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    const FUNC: &str = FUNC_DECODE;
    let hint = dtype_hint(py, FUNC, dtype)?;
    let sparse =
        fp8::SparseArgs { indices, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length };
    if !is_fp8_kvcache && let Some(name) = sparse.first_given() {
        return Err(invalid(
            py,
            FUNC,
            name,
            "None unless is_fp8_kvcache=True (sparse decode reads an FP8 cache)",
            "a value",
        ));
    }
    if is_fp8_kvcache
        && let Some(name) = [("descale_q", descale_q), ("descale_k", descale_k)]
            .into_iter()
            .find(|(_, v)| v.is_some_and(|v| !v.is_none()))
            .map(|(n, _)| n)
    {
        return Err(invalid(
            py,
            FUNC,
            name,
            "None with is_fp8_kvcache=True (the cache carries its own scales; descales are for float8_e4m3fn q and \
             k_cache, dense FP8 decode)",
            "a value",
        ));
    }
    let head_dim_v = usize_arg(py, FUNC, "head_dim_v", head_dim_v)?;
    let softmax_scale = match softmax_scale {
        None => None,
        Some(s) if s.is_none() => None,
        Some(s) => {
            let v: f64 = s.extract().map_err(|_| {
                invalid(
                    py,
                    FUNC,
                    "softmax_scale",
                    "None or a float",
                    s.repr().map(|r| r.to_string()).unwrap_or_default(),
                )
            })?;
            Some(v as f32)
        }
    };
    if is_fp8_kvcache {
        return fp8::decode(
            py,
            q,
            k_cache,
            block_table,
            cache_seqlens,
            head_dim_v,
            tile_scheduler_metadata,
            num_splits,
            softmax_scale,
            causal,
            &sparse,
            hint,
        );
    }
    let qa = describe(py, FUNC, "q", q, hint)?;
    let ka = describe(py, FUNC, "k_cache", k_cache, hint)?;
    let bt = describe(py, FUNC, "block_table", block_table, None)?;
    let sl = describe(py, FUNC, "cache_seqlens", cache_seqlens, None)?;
    let dq = describe_opt(py, FUNC, "descale_q", descale_q, None)?;
    let dk = describe_opt(py, FUNC, "descale_k", descale_k, None)?;

    // Output shapes come from q; a q the library will reject gets empty outputs, so that the library's own message
    // (which checks q before out) reaches the caller.
    let (b, s_q, h_q) = match qa.dims() {
        [b, s, h, _] => ((*b).max(0), (*s).max(0), (*h).max(0)),
        _ => (0, 0, 0),
    };
    let h_kv = match ka.dims() {
        [_, _, h, _] => (*h).max(1),
        _ => 1,
    };

    // The scheduler's output: the caller's tensors (2025), or a HEAD schedule filled on first use.
    let (meta_obj, splits_obj) = if let Ok(sched) = tile_scheduler_metadata.cast::<Schedule>() {
        no_num_splits_with_schedule(py, num_splits)?;
        let page = match ka.dims() {
            [_, p, _, _] => *p,
            _ => 0,
        };
        let want = ScheduleConfig::dense(b, s_q, h_q, page, h_kv, causal, qa.desc.device());
        let mut s = sched.borrow_mut();
        match s.config {
            Some(have) => have.check_same(py, &want)?,
            None => {
                let q_seq_per_hk = usize::try_from(s_q * h_q / h_kv).unwrap_or(0);
                let (m, n) = run_metadata(py, FUNC, &sl, q_seq_per_hk, h_kv as usize)?;
                s.metadata = Some(m.unbind());
                s.num_splits = Some(n.unbind());
                s.config = Some(want);
            }
        }
        let m = s.metadata.as_ref().map(|m| m.bind(py).clone()).expect("filled above");
        let n = s.num_splits.as_ref().map(|m| m.bind(py).clone()).expect("filled above");
        (m, n)
    } else {
        let Some(n) = num_splits.filter(|n| !n.is_none()) else {
            return Err(invalid(
                py,
                FUNC,
                "num_splits",
                "the num_splits tensor from get_mla_metadata(cache_seqlens, ...)",
                "None",
            ));
        };
        (tile_scheduler_metadata.clone(), n.clone())
    };
    let meta = describe(py, FUNC, "tile_scheduler_metadata", &meta_obj, None)?;
    let splits = describe(py, FUNC, "num_splits", &splits_obj, None)?;

    let backend = backend_for(qa.desc.device()).or_raise(py, FUNC)?;
    let alloc = Allocator::new(py, FUNC, &qa)?;
    let out_scalar = match qa.desc.dtype().as_input() {
        Some(d) => d.out_dtype(),
        None => ScalarType::F32, // q's dtype is rejected by the library before out is looked at
    };
    let out = alloc.empty("out", &[b, s_q, h_q, head_dim_v as i64], out_scalar, qa.repr)?;
    let lse = alloc.empty("lse", &[b, h_q, s_q], ScalarType::F32, Repr::Native)?;
    let shape = flashmla::DecodeShape {
        batch: b as usize,
        s_q: s_q as usize,
        h_q: h_q as usize,
        h_kv: h_kv as usize,
        dtype: qa.desc.dtype().as_input().unwrap_or(DType::Bf16),
    };
    // An invalid shape gets no workspace: the decode call below reports it in full.
    let bytes =
        if b > 0 && s_q > 0 && h_q > 0 && h_q % h_kv == 0 { backend.workspace_size(&shape).unwrap_or(0) } else { 0 };
    let (_ws_owner, ws_ptr) = alloc.workspace(bytes)?;
    let stream = alloc.stream()?;
    let args = DecodeArgs {
        q: qa.desc,
        k_cache: ka.desc,
        block_table: bt.desc,
        cache_seqlens: sl.desc,
        head_dim_v,
        tile_scheduler_metadata: meta.desc,
        num_splits: splits.desc,
        softmax_scale,
        causal,
        descale_q: dq.as_ref().map(|a| a.desc),
        descale_k: dk.as_ref().map(|a| a.desc),
        out: out.desc,
        lse: lse.desc,
    };
    // SAFETY: `ws_ptr` is `bytes` bytes inside the buffer `_ws_owner` allocated above on q's device (or 0 with
    // `bytes` 0), held until the end of this function and referenced by nothing else.
    let workspace = unsafe { Workspace::from_raw(ws_ptr as *mut std::ffi::c_void, bytes, qa.desc.device()) };
    // The GIL stays held: descriptors are not Send (another Python thread must not hand the same buffers to a
    // concurrent call), and the call itself is short on CUDA (an enqueue) and parallel inside on the CPU.
    backend.decode(&args, workspace, stream).or_raise(py, FUNC)?;
    // Everything the library read or wrote (the arguments, the workspace) stays referenced until here; on CUDA the
    // workspace goes back to PyTorch's caching allocator, which orders its reuse on the same stream.
    Ok((out.obj, lse.obj))
}

/// The element type that a `dtype=` argument names for raw-bit NumPy arrays (None: take it from the arrays).
fn dtype_hint(py: Python<'_>, func: &str, dtype: Option<&str>) -> PyResult<Option<ScalarType>> {
    let Some(s) = dtype else { return Ok(None) };
    Ok(Some(match s.to_ascii_lowercase().as_str() {
        "bf16" | "bfloat16" => ScalarType::Bf16,
        "fp16" | "float16" => ScalarType::F16,
        "e4m3" | "float8_e4m3fn" => ScalarType::E4M3,
        _ => {
            return Err(invalid(
                py,
                func,
                "dtype",
                "None or one of ['bf16', 'bfloat16', 'e4m3', 'float16', 'float8_e4m3fn', 'fp16']",
                format!("{s:?}"),
            ));
        }
    }))
}

/// `num_sm_parts` of the backend for `device` (`"cpu"`, `"cuda"`, `"cuda:N"`): rows of
/// `tile_scheduler_metadata` for this shape. Used by the `torch.library` fake implementations.
#[pyfunction]
fn num_sm_parts(py: Python<'_>, device: &str, num_heads_per_head_k: usize, num_heads_k: usize) -> PyResult<usize> {
    let backend = backend_for(parse_device(py, "num_sm_parts", device)?).or_raise(py, "num_sm_parts")?;
    Ok(backend.num_sm_parts(num_heads_per_head_k.max(1), num_heads_k.max(1)))
}

fn parse_device(py: Python<'_>, func: &str, text: &str) -> PyResult<Device> {
    if text == "cpu" {
        return Ok(Device::Host);
    }
    if let Some(rest) = text.strip_prefix("cuda") {
        let ordinal = match rest.strip_prefix(':') {
            None if rest.is_empty() => Some(0),
            Some(n) => n.parse::<i32>().ok(),
            None => None,
        };
        if let Some(o) = ordinal {
            return Ok(Device::Cuda(o));
        }
    }
    Err(invalid(py, func, "device", "'cpu', 'cuda' or 'cuda:N'", format!("{text:?}")))
}

/// What the backend for `device` supports: `"cpu"`, `"cuda"`/`"cuda:N"` (or anything whose `str()` is one).
///
/// Returns a dict with `backend`, `device_name`, `sm_count`, `compute_capability`, `dtypes`, `page_sizes` (None
/// for any) and `fp8_cache`: `{"sparse": {layout: [features]}, "dense": [layouts]}` for `is_fp8_kvcache=True`
/// (layouts `"v32"`/`"model1"`; empty where the backend has no FP8-cache decode). Raises `BackendUnavailableError`
/// with the reason when the backend cannot run here.
#[pyfunction]
#[pyo3(signature = (device=None))]
fn backend_info<'py>(py: Python<'py>, device: Option<Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyDict>> {
    const FUNC: &str = "backend_info";
    let text = match device {
        Some(d) => d.str()?.to_string(),
        None => "cpu".into(),
    };
    let backend = backend_for(parse_device(py, FUNC, &text)?).or_raise(py, FUNC)?;
    let c = backend.capabilities();
    let d = PyDict::new(py);
    d.set_item("backend", c.backend)?;
    d.set_item("device_name", &c.device_name)?;
    d.set_item("sm_count", c.sm_count)?;
    d.set_item("compute_capability", c.compute_capability)?;
    d.set_item("dtypes", c.dtypes.iter().map(|t| t.name()).collect::<Vec<_>>())?;
    match &c.page_sizes {
        flashmla::PageSizes::Any => d.set_item("page_sizes", py.None())?,
        flashmla::PageSizes::Only(v) => d.set_item("page_sizes", v)?,
    }
    let sparse = PyDict::new(py);
    for s in &c.fp8.sparse {
        let features = [
            ("attn_sink", s.attn_sink),
            ("topk_length", s.topk_length),
            ("extra_k_cache", s.extra_cache),
            ("extra_topk_length", s.extra_topk_length),
        ];
        let on: Vec<&str> = features.iter().filter(|(_, on)| *on).map(|(name, _)| *name).collect();
        sparse.set_item(s.layout.name(), on)?;
    }
    let fp8 = PyDict::new(py);
    fp8.set_item("sparse", sparse)?;
    fp8.set_item("dense", c.fp8.dense.iter().map(|l| l.name()).collect::<Vec<_>>())?;
    d.set_item("fp8_cache", fp8)?;
    Ok(d)
}

/// What the library is handed for `obj`: a dict with `data` (the address), `dtype`, `shape`, `strides` (in
/// elements) and `device`. For tests and for debugging "why is my tensor rejected"; not part of upstream's API.
#[pyfunction]
#[pyo3(signature = (obj, dtype=None))]
fn _describe<'py>(py: Python<'py>, obj: &Bound<'py, PyAny>, dtype: Option<&str>) -> PyResult<Bound<'py, PyDict>> {
    let hint = dtype_hint(py, "_describe", dtype)?;
    let a = describe(py, "_describe", "obj", obj, hint)?;
    let d = PyDict::new(py);
    d.set_item("data", a.desc.data() as usize)?;
    d.set_item("dtype", a.desc.dtype().name())?;
    d.set_item("shape", a.desc.dims().to_vec())?;
    d.set_item("strides", a.desc.stride_slice().to_vec())?;
    d.set_item("device", a.desc.device().to_string())?;
    Ok(d)
}

/// The version of the compiled library (the Cargo package version, which is also the wheel's).
#[pyfunction]
fn library_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// The compiled half of the `flashmla` package.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(get_mla_metadata, m)?)?;
    m.add_function(wrap_pyfunction!(flash_mla_with_kvcache, m)?)?;
    m.add_function(wrap_pyfunction!(num_sm_parts, m)?)?;
    m.add_function(wrap_pyfunction!(backend_info, m)?)?;
    m.add_function(wrap_pyfunction!(library_version, m)?)?;
    m.add_function(wrap_pyfunction!(_describe, m)?)?;
    m.add_class::<Schedule>()?;
    m.add("METADATA_WORDS", METADATA_WORDS)?;
    m.add("HEAD_DIM_K", flashmla::HEAD_DIM_K)?;
    m.add("HEAD_DIM_V", flashmla::HEAD_DIM_V)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
