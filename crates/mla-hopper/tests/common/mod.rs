//! Shared by the GPU tests and the bench example: device buffers, random decode problems laid out like upstream's
//! HEAD test (permuted block tables, garbage past each request's end), and a float64 reference.

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use mla_core::dtype::{f32_to_bf16, f32_to_e4m3, f32_to_f16};
use mla_core::{DType, DecodeArgs, Device, ScalarType, TensorDesc};

/// Block-table filler past a request's last page (upstream HEAD's test value): reading it would be a bug.
pub const BT_GARBAGE: i32 = 2_147_480_000;
/// Tokens per page.
pub const PAGE: usize = 64;
/// K row width.
pub const D_K: usize = 576;
/// V row width.
pub const D_V: usize = 512;

pub use mla_testkit::Rng;

/// The run's seed: `FLASHMLA_SEED` or the clock (fresh inputs every run).
pub fn seed() -> u64 {
    std::env::var("FLASHMLA_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    })
}

/// Quantizes `x` to `dtype` and returns (raw little-endian bytes appended to `out`, the exact value represented).
fn push_quantized(dtype: DType, x: f32, out: &mut Vec<u8>) -> f32 {
    match dtype {
        DType::Bf16 => {
            let b = f32_to_bf16(x);
            out.extend_from_slice(&b.to_le_bytes());
            mla_core::dtype::bf16_to_f32(b)
        }
        DType::F16 => {
            let b = f32_to_f16(x);
            out.extend_from_slice(&b.to_le_bytes());
            mla_core::dtype::f16_to_f32(b)
        }
        DType::E4M3 => {
            let b = f32_to_e4m3(x);
            out.push(b);
            mla_core::dtype::e4m3_to_f32(b)
        }
    }
}

/// One decode problem on the host: inputs as raw bytes (what the GPU gets) and as exact f32 values (what the
/// reference uses; e4m3 values before descaling).
pub struct Problem {
    pub dtype: DType,
    pub b: usize,
    pub s_q: usize,
    pub h_q: usize,
    pub h_kv: usize,
    pub causal: bool,
    pub seqlens: Vec<i32>,
    pub num_blocks: usize,
    pub max_blocks: usize,
    pub block_table: Vec<i32>,
    pub q_bytes: Vec<u8>,
    pub k_bytes: Vec<u8>,
    pub q_val: Vec<f32>,
    pub k_val: Vec<f32>,
    pub descale_q: f32,
    pub descale_k: f32,
    pub softmax_scale: f32,
    /// Pad the output's head stride and lay `lse` out token-major, to exercise arbitrary strides.
    pub strided_outputs: bool,
}

/// The largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;

/// A problem's shape and flags.
struct Shape {
    dtype: DType,
    b: usize,
    s_q: usize,
    h_q: usize,
    h_kv: usize,
    causal: bool,
    strided_outputs: bool,
}

/// The paged cache's layout: a random permutation of the pages (plus spare ones) and the block table.
struct Pages {
    num_blocks: usize,
    max_blocks: usize,
    block_table: Vec<i32>,
    /// page → (request, block of the request), None for spare pages
    page_of: Vec<Option<(usize, usize)>>,
}

impl Pages {
    fn random(rng: &mut Rng, seqlens: &[i32]) -> Pages {
        let b = seqlens.len();
        let blocks: Vec<usize> = seqlens.iter().map(|&s| (s as usize).div_ceil(PAGE)).collect();
        let used: usize = blocks.iter().sum();
        let spare = 3;
        let num_blocks = used + spare;
        let max_blocks = blocks.iter().copied().max().unwrap_or(0) + 1;
        let mut perm: Vec<usize> = (0..num_blocks).collect();
        for i in (1..num_blocks).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        let mut block_table = vec![BT_GARBAGE; b * max_blocks];
        let mut page_of = vec![None; num_blocks];
        let mut next = 0;
        for i in 0..b {
            for j in 0..blocks[i] {
                block_table[i * max_blocks + j] = perm[next] as i32;
                page_of[perm[next]] = Some((i, j));
                next += 1;
            }
        }
        Pages { num_blocks, max_blocks, block_table, page_of }
    }

    /// Real values of q (`rows` rows of 576) and of the cache, in that order from `rng`: `draw` for live cache rows,
    /// NaN for rows past each request's end and for spare pages.
    fn draw(
        &self,
        rng: &mut Rng,
        rows: usize,
        h_kv: usize,
        seqlens: &[i32],
        mut draw: impl FnMut(&mut Rng) -> f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let q: Vec<f32> = (0..rows * D_K).map(|_| draw(rng)).collect();
        let mut k = Vec::with_capacity(self.num_blocks * PAGE * h_kv * D_K);
        for owner in &self.page_of {
            for tok in 0..PAGE {
                let live = owner.is_some_and(|(i, j)| j * PAGE + tok < seqlens[i] as usize);
                for _ in 0..h_kv * D_K {
                    k.push(if live { draw(rng) } else { f32::NAN });
                }
            }
        }
        (q, k)
    }
}

impl Problem {
    /// Random inputs. Pages are a random permutation of the cache (plus spare pages full of NaN); rows past
    /// each request's end hold NaN; block-table entries past the end hold [`BT_GARBAGE`].
    #[allow(clippy::too_many_arguments)]
    pub fn random(
        rng: &mut Rng,
        dtype: DType,
        b: usize,
        s_q: usize,
        h_q: usize,
        h_kv: usize,
        causal: bool,
        seqlens: Vec<i32>,
        strided_outputs: bool,
    ) -> Problem {
        let pages = Pages::random(rng, &seqlens);
        // 16-bit: upstream HEAD's clamp(N(0, 1) / 10, ±1). e4m3: real values ~ N(0, 1), stored as value / descale
        // (so the codes use the format's range).
        let descales = if dtype == DType::E4M3 { [1.0 / 16.0, 1.0 / 8.0] } else { [1.0, 1.0] };
        let draw = |rng: &mut Rng| -> f32 {
            if dtype == DType::E4M3 { rng.normal() as f32 } else { (rng.normal() / 10.0).clamp(-1.0, 1.0) as f32 }
        };
        let real = pages.draw(rng, b * s_q * h_q, h_kv, &seqlens, draw);
        let shape = Shape { dtype, b, s_q, h_q, h_kv, causal, strided_outputs };
        Self::assemble(shape, seqlens, pages, real, descales)
    }

    /// E4M3 inputs as upstream's accuracy script draws them (h_kv = 1): q and k ~ N(0, amp²), each tensor quantised
    /// with the descale amax / 448 (its largest value lands on the format's largest code). A large `amp` gives large
    /// logits, where the FP8 tensor cores' reduced-precision accumulation of Q·Kᵀ shows in the lse.
    pub fn random_e4m3_amax(rng: &mut Rng, b: usize, s_q: usize, h_q: usize, seqlens: Vec<i32>, amp: f64) -> Problem {
        let pages = Pages::random(rng, &seqlens);
        let real = pages.draw(rng, b * s_q * h_q, 1, &seqlens, |rng| (rng.normal() * amp) as f32);
        let amax = |v: &[f32]| v.iter().filter(|x| x.is_finite()).fold(0f32, |m, x| m.max(x.abs()));
        let descales = [amax(&real.0) / E4M3_MAX, amax(&real.1) / E4M3_MAX];
        let shape = Shape { dtype: DType::E4M3, b, s_q, h_q, h_kv: 1, causal: true, strided_outputs: false };
        Self::assemble(shape, seqlens, pages, real, descales)
    }

    /// Quantises the real values `(q, k)` with `descales` (e4m3: code = value / descale) into a problem.
    fn assemble(sh: Shape, seqlens: Vec<i32>, pages: Pages, real: (Vec<f32>, Vec<f32>), descales: [f32; 2]) -> Problem {
        assert_eq!(seqlens.len(), sh.b);
        let quantize = |values: &[f32], descale: f32| {
            let mut bytes = Vec::with_capacity(values.len() * sh.dtype.size_bytes());
            let vals: Vec<f32> = values.iter().map(|&x| push_quantized(sh.dtype, x / descale, &mut bytes)).collect();
            (bytes, vals)
        };
        let (q_bytes, q_val) = quantize(&real.0, descales[0]);
        let (k_bytes, k_val) = quantize(&real.1, descales[1]);
        Problem {
            dtype: sh.dtype,
            b: sh.b,
            s_q: sh.s_q,
            h_q: sh.h_q,
            h_kv: sh.h_kv,
            causal: sh.causal,
            seqlens,
            num_blocks: pages.num_blocks,
            max_blocks: pages.max_blocks,
            block_table: pages.block_table,
            q_bytes,
            k_bytes,
            q_val,
            k_val,
            descale_q: descales[0],
            descale_k: descales[1],
            softmax_scale: mla_core::default_softmax_scale(),
            strided_outputs: sh.strided_outputs,
        }
    }

    /// `s_q · h_q / h_kv`.
    pub fn q_seq_per_hk(&self) -> usize {
        self.s_q * self.h_q / self.h_kv
    }

    /// Element strides of `out` `[b, s_q, h_q, 512]`.
    pub fn out_strides(&self) -> [i64; 4] {
        let hs = if self.strided_outputs { D_V as i64 + 8 } else { D_V as i64 };
        [self.s_q as i64 * self.h_q as i64 * hs, self.h_q as i64 * hs, hs, 1]
    }

    /// Element strides of `lse` `[b, h_q, s_q]` (token-major storage when strided).
    pub fn lse_strides(&self) -> [i64; 3] {
        let (h, s) = (self.h_q as i64, self.s_q as i64);
        if self.strided_outputs { [h * s, 1, h] } else { [h * s, s, 1] }
    }

    /// Elements to allocate for `out` and `lse`.
    pub fn out_elems(&self) -> usize {
        self.b * self.out_strides()[0] as usize
    }
    /// Elements to allocate for `lse`.
    pub fn lse_elems(&self) -> usize {
        self.b * self.h_q * self.s_q
    }

    /// Reference flops (for sizing test grids).
    pub fn flops(&self) -> f64 {
        self.seqlens.iter().map(|&s| s as f64).sum::<f64>() * (self.s_q * self.h_q * (D_K + D_V) * 2) as f64
    }
}

/// float64 reference: `out` `[b, s_q, h_q, 512]` (contiguous) and `lse` `[b, h_q, s_q]` (contiguous, natural log).
/// Rows that see nothing: out 0, lse +inf.
pub fn reference(p: &Problem) -> (Vec<f64>, Vec<f64>) {
    let (b, s_q, h_q, h_kv) = (p.b, p.s_q, p.h_q, p.h_kv);
    let hpk = h_q / h_kv;
    let dq = p.descale_q as f64;
    let dk = p.descale_k as f64;
    let scale = p.softmax_scale as f64 * dq * dk;
    let mut out = vec![0f64; b * s_q * h_q * D_V];
    let mut lse = vec![0f64; b * h_q * s_q];
    let jobs = b * s_q;
    let counter = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    /// (job, out rows of the job's heads, lse of the job's heads)
    type JobResult = (usize, Vec<f64>, Vec<f64>);
    let results: Vec<Vec<JobResult>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                sc.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let job = counter.fetch_add(1, Ordering::Relaxed);
                        if job >= jobs {
                            break;
                        }
                        let (i, t) = (job / s_q, job % s_q);
                        let s_k = p.seqlens[i].max(0) as usize;
                        let limit = if p.causal {
                            (s_k as i64 - s_q as i64 + t as i64 + 1).clamp(0, s_k as i64) as usize
                        } else {
                            s_k
                        };
                        let mut o = vec![0f64; h_q * D_V];
                        let mut l = vec![f64::INFINITY; h_q];
                        let mut logits = vec![0f64; limit];
                        for h in 0..h_q {
                            let g = h / hpk;
                            let qrow = &p.q_val[((i * s_q + t) * h_q + h) * D_K..][..D_K];
                            let krow = |j: usize| {
                                let page = p.block_table[i * p.max_blocks + j / PAGE] as usize;
                                &p.k_val[((page * PAGE + j % PAGE) * h_kv + g) * D_K..][..D_K]
                            };
                            let mut mx = f64::NEG_INFINITY;
                            for (j, lg) in logits.iter_mut().enumerate() {
                                let k = krow(j);
                                let mut acc = [0f64; 4];
                                for d in (0..D_K).step_by(4) {
                                    for u in 0..4 {
                                        acc[u] += qrow[d + u] as f64 * k[d + u] as f64;
                                    }
                                }
                                *lg = (acc[0] + acc[1] + acc[2] + acc[3]) * scale;
                                mx = mx.max(*lg);
                            }
                            if limit == 0 {
                                continue;
                            }
                            let mut sum = 0f64;
                            for lg in logits.iter_mut() {
                                *lg = (*lg - mx).exp();
                                sum += *lg;
                            }
                            let orow = &mut o[h * D_V..][..D_V];
                            for (j, &w) in logits.iter().enumerate() {
                                let v = krow(j);
                                let w = w / sum * dk;
                                for d in 0..D_V {
                                    orow[d] += w * v[d] as f64;
                                }
                            }
                            l[h] = mx + sum.ln();
                        }
                        done.push((job, o, l));
                    }
                    done
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("reference thread")).collect()
    });
    for (job, o, l) in results.into_iter().flatten() {
        let (i, t) = (job / s_q, job % s_q);
        out[(i * s_q + t) * h_q * D_V..][..h_q * D_V].copy_from_slice(&o);
        for h in 0..h_q {
            lse[(i * h_q + h) * s_q + t] = l[h];
        }
    }
    (out, lse)
}

/// A device, its default stream, and raw byte buffers.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

/// A device buffer and its address.
pub struct Buf {
    pub slice: CudaSlice<u8>,
    pub ptr: u64,
    pub bytes: usize,
}

/// Reinterprets a slice of plain numbers as bytes.
pub fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: T is a plain number type (i32, f32, u16) with no padding; any byte pattern of it is readable.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

impl Gpu {
    /// Device 0 with event tracking off (the backend orders its own work).
    pub fn new() -> Gpu {
        let ctx = CudaContext::new(0).expect("CUDA context");
        // SAFETY: right after creating the context, before any allocation; tests use one stream at a time.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Gpu { ctx, stream }
    }

    fn wrap(&self, slice: CudaSlice<u8>, bytes: usize) -> Buf {
        let ptr = slice.device_ptr(&self.stream).0;
        Buf { slice, ptr, bytes }
    }

    /// Copies `data` to a new buffer (at least 256 bytes, so even empty inputs get a valid address).
    pub fn upload(&self, data: &[u8]) -> Buf {
        let mut v = data.to_vec();
        v.resize(data.len().max(256), 0);
        let slice = self.stream.clone_htod(&v).expect("upload");
        self.wrap(slice, data.len())
    }

    /// Copies `data` (non-empty) to a buffer of exactly its size, so compute-sanitizer flags any read past it.
    pub fn upload_exact(&self, data: &[u8]) -> Buf {
        assert!(!data.is_empty());
        let slice = self.stream.clone_htod(data).expect("upload");
        self.wrap(slice, data.len())
    }

    /// A buffer filled with repetitions of `fill` (copied in 16 MiB pieces, so multi-GB caches stay cheap).
    pub fn filled(&self, bytes: usize, fill: &[u8]) -> Buf {
        const PIECE: usize = 16 << 20;
        let n = bytes.max(256);
        let piece: Vec<u8> = fill.iter().copied().cycle().take(n.min(PIECE)).collect();
        let mut slice = self.stream.alloc_zeros::<u8>(n).expect("alloc");
        let mut off = 0;
        while off < n {
            let len = piece.len().min(n - off);
            let mut view = slice.slice_mut(off..off + len);
            self.stream.memcpy_htod(&piece[..len], &mut view).expect("fill");
            off += len;
        }
        self.wrap(slice, bytes)
    }

    /// Reads a buffer back (synchronises).
    pub fn download(&self, b: &Buf) -> Vec<u8> {
        let mut v = self.stream.clone_dtoh(&b.slice).expect("download");
        v.truncate(b.bytes);
        v
    }
}

/// A descriptor over a device buffer; it borrows the buffer.
pub fn desc<'b>(buf: &'b Buf, dtype: ScalarType, shape: &[i64], strides: &[i64]) -> TensorDesc<'b> {
    // SAFETY: every caller describes a buffer allocated on device 0 for (at least) this shape and these strides,
    // and the descriptor borrows it.
    unsafe { TensorDesc::from_raw(buf.ptr as *mut std::ffi::c_void, dtype, shape, strides, Device::Cuda(0)) }
        .expect("descriptor")
}

/// Contiguous element strides.
pub fn contig(shape: &[i64]) -> Vec<i64> {
    let mut s = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// A problem's inputs and outputs on the device.
pub struct DeviceProblem {
    pub q: Buf,
    pub k: Buf,
    pub block_table: Buf,
    pub seqlens: Buf,
    pub metadata: Buf,
    pub num_splits: Buf,
    pub out: Buf,
    pub lse: Buf,
    pub descale_q: Buf,
    pub descale_k: Buf,
    pub workspace: Buf,
    pub parts: usize,
}

/// NaN patterns used to poison outputs, so an element the kernels never write fails the comparison.
pub const NAN_F32: [u8; 4] = 0x7FC0_0000u32.to_le_bytes();
/// 16-bit NaN (a quiet NaN in both bf16 and f16).
pub const NAN_16: [u8; 2] = 0x7FFFu16.to_le_bytes();

impl DeviceProblem {
    /// Uploads `p`, with outputs poisoned and metadata buffers sized for `parts` and a workspace of `ws_bytes`.
    pub fn upload(gpu: &Gpu, p: &Problem, parts: usize, ws_bytes: usize) -> DeviceProblem {
        DeviceProblem {
            q: gpu.upload(&p.q_bytes),
            k: gpu.upload(&p.k_bytes),
            block_table: gpu.upload(as_bytes(&p.block_table)),
            seqlens: gpu.upload(as_bytes(&p.seqlens)),
            metadata: gpu.filled(parts * 8 * 4, &[0xAB]),
            num_splits: gpu.filled((p.b + 1) * 4, &[0xAB]),
            out: gpu.filled(p.out_elems() * 2, &NAN_16),
            lse: gpu.filled(p.lse_elems() * 4, &NAN_F32),
            descale_q: gpu.upload(as_bytes(&[p.descale_q])),
            descale_k: gpu.upload(as_bytes(&[p.descale_k])),
            workspace: gpu.filled(ws_bytes, &[0xFF]),
            parts,
        }
    }

    /// The metadata-step arguments.
    pub fn metadata_args(&self, p: &Problem) -> mla_core::MetadataArgs<'_> {
        mla_core::MetadataArgs {
            cache_seqlens: desc(&self.seqlens, ScalarType::I32, &[p.b as i64], &[1]),
            q_seq_per_hk: p.q_seq_per_hk(),
            h_kv: p.h_kv,
            tile_scheduler_metadata: desc(&self.metadata, ScalarType::I32, &[self.parts as i64, 8], &[8, 1]),
            num_splits: desc(&self.num_splits, ScalarType::I32, &[p.b as i64 + 1], &[1]),
        }
    }

    /// The decode-step arguments.
    pub fn decode_args(&self, p: &Problem) -> DecodeArgs<'_> {
        let dt = p.dtype.scalar();
        let q_shape = [p.b as i64, p.s_q as i64, p.h_q as i64, D_K as i64];
        let k_shape = [p.num_blocks as i64, PAGE as i64, p.h_kv as i64, D_K as i64];
        let bt_shape = [p.b as i64, p.max_blocks as i64];
        let o_shape = [p.b as i64, p.s_q as i64, p.h_q as i64, D_V as i64];
        let l_shape = [p.b as i64, p.h_q as i64, p.s_q as i64];
        let fp8 = p.dtype == DType::E4M3;
        DecodeArgs {
            q: desc(&self.q, dt, &q_shape, &contig(&q_shape)),
            k_cache: desc(&self.k, dt, &k_shape, &contig(&k_shape)),
            block_table: desc(&self.block_table, ScalarType::I32, &bt_shape, &contig(&bt_shape)),
            cache_seqlens: desc(&self.seqlens, ScalarType::I32, &[p.b as i64], &[1]),
            head_dim_v: D_V,
            tile_scheduler_metadata: desc(&self.metadata, ScalarType::I32, &[self.parts as i64, 8], &[8, 1]),
            num_splits: desc(&self.num_splits, ScalarType::I32, &[p.b as i64 + 1], &[1]),
            softmax_scale: Some(p.softmax_scale),
            causal: p.causal,
            descale_q: fp8.then(|| desc(&self.descale_q, ScalarType::F32, &[1], &[1])),
            descale_k: fp8.then(|| desc(&self.descale_k, ScalarType::F32, &[1], &[1])),
            out: desc(&self.out, p.dtype.out_dtype(), &o_shape, &p.out_strides()),
            lse: desc(&self.lse, ScalarType::F32, &l_shape, &p.lse_strides()),
        }
    }
}
