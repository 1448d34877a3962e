//! A Rust host decoding from CUDA device memory through the safe views of `flashmla::cuda`, with the backend picked
//! at run time, checked against the CPU backend on the same inputs.
//!
//! ```sh
//! cargo run -p flashmla --example cuda_decode            # "auto": Hopper if it opens
//! cargo run -p flashmla --example cuda_decode -- hopper
//! ```
//!
//! The buffers are cudarc's (`gpu.stream().clone_htod`, `alloc_zeros`, `clone_dtoh`); `DeviceTensor`,
//! `DeviceTensorMut` and `DeviceWorkspace` borrow them for the calls, so no address can be out of bounds or outlive
//! its memory, and both steps run on the legacy default stream (`Stream::DEFAULT`) the views are taken for. Without
//! a usable GPU, or when the backend takes host memory (`examples/host_decode.rs` is that case), it says that it
//! skipped and exits successfully.

use flashmla::cuda::{DeviceTensor, DeviceTensorMut, DeviceWorkspace, Gpu, driver_error};
use flashmla::scheduler::METADATA_WORDS;
use flashmla::{
    DType, DecodeArgs, DecodeShape, Device, Error, HEAD_DIM_K, HEAD_DIM_V, HostTensor, HostTensorMut, MetadataArgs,
    MlaBackend, Stream, Workspace,
};
use half::bf16;

/// Three requests: one long enough to be split, one of exactly a page, one of a few tokens.
const SEQLENS: [i32; 3] = [700, 64, 5];
/// Query heads (one KV head, one query token per request).
const H_Q: usize = 16;
/// Tokens per page (the Hopper backend's).
const PAGE: usize = 64;
/// Upstream FlashMLA's bar for a tensor-core `out` against an exact one: two bf16 ulps relative, or 8e-4 absolute.
const OUT_REL_TOL: f64 = 2.01 / 128.0;
/// See [`OUT_REL_TOL`].
const OUT_ABS_TOL: f64 = 8e-4;
/// Upstream's bar for `lse`: relative 8.01 / 65536, or 1e-6 absolute.
const LSE_REL_TOL: f64 = 8.01 / 65536.0;
/// See [`LSE_REL_TOL`].
const LSE_ABS_TOL: f64 = 1e-6;

/// The problem's host data.
struct Inputs {
    q: Vec<bf16>,
    kv: Vec<bf16>,
    block_table: Vec<i32>,
    pages: usize,
    width: usize,
    shape: DecodeShape,
}

impl Inputs {
    /// Deterministic pseudo-random q and cache; request i's pages follow request i − 1's.
    fn new() -> Inputs {
        let b = SEQLENS.len();
        let pages_of: Vec<usize> = SEQLENS.iter().map(|&s| (s as usize).div_ceil(PAGE)).collect();
        let (pages, width) = (pages_of.iter().sum(), pages_of.iter().copied().max().unwrap_or(1));
        let mut state = 1u32;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            bf16::from_f32((state >> 8) as f32 / (1 << 24) as f32 - 0.5)
        };
        let q = (0..b * H_Q * HEAD_DIM_K).map(|_| next()).collect();
        let kv = (0..pages * PAGE * HEAD_DIM_K).map(|_| next()).collect();
        // Entries past a request's last page are never read; 0 is as good a filler as any.
        let mut block_table = vec![0i32; b * width];
        let mut page = 0;
        for (i, &n) in pages_of.iter().enumerate() {
            for j in 0..n {
                block_table[i * width + j] = page;
                page += 1;
            }
        }
        let shape = DecodeShape { batch: b, s_q: 1, h_q: H_Q, h_kv: 1, dtype: DType::Bf16 };
        Inputs { q, kv, block_table, pages, width, shape }
    }

    fn q_shape(&self) -> [usize; 4] {
        [self.shape.batch, 1, H_Q, HEAD_DIM_K]
    }

    fn kv_shape(&self) -> [usize; 4] {
        [self.pages, PAGE, 1, HEAD_DIM_K]
    }

    fn out_shape(&self) -> [usize; 4] {
        [self.shape.batch, 1, H_Q, HEAD_DIM_V]
    }

    fn lse_shape(&self) -> [usize; 3] {
        [self.shape.batch, H_Q, 1]
    }
}

/// Both steps on `backend`'s device from device buffers; returns `out`, `lse` and the decode's GPU time in ms.
fn decode_on_device(
    backend: &dyn MlaBackend,
    ordinal: i32,
    x: &Inputs,
) -> flashmla::Result<(Vec<bf16>, Vec<f32>, f32)> {
    let gpu = Gpu::open(ordinal)?;
    let stream = gpu.stream();
    let (upload, alloc) = (driver_error("cuMemcpyHtoDAsync"), driver_error("cuMemAllocAsync"));
    let b = x.shape.batch;
    let q = stream.clone_htod(&x.q).map_err(&upload)?;
    let kv = stream.clone_htod(&x.kv).map_err(&upload)?;
    let block_table = stream.clone_htod(&x.block_table).map_err(&upload)?;
    let seqlens = stream.clone_htod(&SEQLENS).map_err(&upload)?;

    // Step 1, once per decoding step: the scheduler's metadata, computed on the device.
    let parts = backend.num_sm_parts(x.shape.q_seq_per_hk(), x.shape.h_kv);
    let mut metadata = stream.alloc_zeros::<i32>(parts * METADATA_WORDS).map_err(&alloc)?;
    let mut num_splits = stream.alloc_zeros::<i32>(b + 1).map_err(&alloc)?;
    {
        // Views are bound to locals: a descriptor borrows its view, which must outlive the call.
        let seqlens = DeviceTensor::new(stream, &seqlens, &[b])?;
        let metadata = DeviceTensorMut::new(stream, &mut metadata, &[parts, METADATA_WORDS])?;
        let num_splits = DeviceTensorMut::new(stream, &mut num_splits, &[b + 1])?;
        let args = MetadataArgs {
            cache_seqlens: seqlens.desc(),
            q_seq_per_hk: x.shape.q_seq_per_hk(),
            h_kv: x.shape.h_kv,
            tile_scheduler_metadata: metadata.desc(),
            num_splits: num_splits.desc(),
        };
        backend.get_mla_metadata(&args, Stream::DEFAULT)?;
    }

    // Step 2, once per layer: the decode, into caller-owned device outputs and workspace.
    let mut out = stream.alloc_zeros::<bf16>(b * H_Q * HEAD_DIM_V).map_err(&alloc)?;
    let mut lse = stream.alloc_zeros::<f32>(b * H_Q).map_err(&alloc)?;
    // At least one byte: an empty allocation has no address.
    let mut workspace = stream.alloc_zeros::<u8>(backend.workspace_size(&x.shape)?.max(1)).map_err(&alloc)?;
    let ms = {
        let q = DeviceTensor::new(stream, &q, &x.q_shape())?;
        let kv = DeviceTensor::new(stream, &kv, &x.kv_shape())?;
        let block_table = DeviceTensor::new(stream, &block_table, &[b, x.width])?;
        let seqlens = DeviceTensor::new(stream, &seqlens, &[b])?;
        let metadata = DeviceTensor::new(stream, &metadata, &[parts, METADATA_WORDS])?;
        let num_splits = DeviceTensor::new(stream, &num_splits, &[b + 1])?;
        let out = DeviceTensorMut::new(stream, &mut out, &x.out_shape())?;
        let lse = DeviceTensorMut::new(stream, &mut lse, &x.lse_shape())?;
        let workspace = DeviceWorkspace::new(stream, &mut workspace)?;
        let args = DecodeArgs {
            q: q.desc(),
            k_cache: kv.desc(),
            block_table: block_table.desc(),
            cache_seqlens: seqlens.desc(),
            head_dim_v: HEAD_DIM_V,
            tile_scheduler_metadata: metadata.desc(),
            num_splits: num_splits.desc(),
            softmax_scale: None,
            causal: false,
            descale_q: None,
            descale_k: None,
            out: out.desc(),
            lse: lse.desc(),
        };
        gpu.time_ms(|| backend.decode(&args, workspace.workspace(), Stream::DEFAULT))?.1
    };
    let download = driver_error("cuMemcpyDtoHAsync");
    Ok((stream.clone_dtoh(&out).map_err(&download)?, stream.clone_dtoh(&lse).map_err(&download)?, ms))
}

/// The same problem on the CPU backend, from host views.
fn decode_on_cpu(x: &Inputs) -> flashmla::Result<(Vec<bf16>, Vec<f32>)> {
    let cpu = flashmla::open_backend("cpu", 0)?;
    let b = x.shape.batch;
    let parts = cpu.num_sm_parts(x.shape.q_seq_per_hk(), x.shape.h_kv);
    let (mut metadata, mut num_splits) = (vec![0i32; parts * METADATA_WORDS], vec![0i32; b + 1]);
    let seqlens = HostTensor::new(&SEQLENS, &[b])?;
    cpu.get_mla_metadata(
        &MetadataArgs {
            cache_seqlens: seqlens.desc(),
            q_seq_per_hk: x.shape.q_seq_per_hk(),
            h_kv: x.shape.h_kv,
            tile_scheduler_metadata: HostTensorMut::new(&mut metadata, &[parts, METADATA_WORDS])?.desc(),
            num_splits: HostTensorMut::new(&mut num_splits, &[b + 1])?.desc(),
        },
        Stream::DEFAULT,
    )?;
    let (mut out, mut lse) = (vec![bf16::ZERO; b * H_Q * HEAD_DIM_V], vec![0f32; b * H_Q]);
    let mut workspace = vec![0f32; cpu.workspace_size(&x.shape)?.div_ceil(4)];
    let args = DecodeArgs {
        q: HostTensor::new(&x.q, &x.q_shape())?.desc(),
        k_cache: HostTensor::new(&x.kv, &x.kv_shape())?.desc(),
        block_table: HostTensor::new(&x.block_table, &[b, x.width])?.desc(),
        cache_seqlens: seqlens.desc(),
        head_dim_v: HEAD_DIM_V,
        tile_scheduler_metadata: HostTensor::new(&metadata, &[parts, METADATA_WORDS])?.desc(),
        num_splits: HostTensor::new(&num_splits, &[b + 1])?.desc(),
        softmax_scale: None,
        causal: false,
        descale_q: None,
        descale_k: None,
        out: HostTensorMut::new(&mut out, &x.out_shape())?.desc(),
        lse: HostTensorMut::new(&mut lse, &x.lse_shape())?.desc(),
    };
    cpu.decode(&args, Workspace::host(&mut workspace), Stream::DEFAULT)?;
    Ok((out, lse))
}

/// The largest error over `got` against `want`, in units of the tolerance `abs` or `rel · |want|` (whichever is
/// larger): at most 1 passes.
fn worst(got: impl Iterator<Item = f64>, want: impl Iterator<Item = f64>, abs: f64, rel: f64) -> f64 {
    got.zip(want).map(|(g, w)| (g - w).abs() / abs.max(rel * w.abs())).fold(0.0, f64::max)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "auto".into());
    let backend: Box<dyn MlaBackend> = match flashmla::open_backend(&name, 0) {
        Ok(b) => b,
        Err(e @ (Error::Unavailable { .. } | Error::Unsupported { .. })) => {
            println!("skipped: backend `{name}` does not open here ({e})");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let Device::Cuda(ordinal) = backend.capabilities().device else {
        println!(
            "skipped: `{name}` opened `{}`, which takes host memory (examples/host_decode.rs decodes from host memory)",
            backend.name()
        );
        return Ok(());
    };
    println!("backend: {} on {}", backend.name(), backend.capabilities().device_name);

    let inputs = Inputs::new();
    let (out, lse, ms) = decode_on_device(backend.as_ref(), ordinal, &inputs)?;
    let (cpu_out, cpu_lse) = decode_on_cpu(&inputs)?;
    let out_err = worst(out.iter().map(|x| x.to_f64()), cpu_out.iter().map(|x| x.to_f64()), OUT_ABS_TOL, OUT_REL_TOL);
    let lse_err = worst(lse.iter().map(|&x| x as f64), cpu_lse.iter().map(|&x| x as f64), LSE_ABS_TOL, LSE_REL_TOL);
    println!(
        "decode of lengths {SEQLENS:?}, {H_Q} heads: {ms:.3} ms on the GPU; against the cpu backend: out {out_err:.3}, \
         lse {lse_err:.3} of the tolerance"
    );
    if !(out_err <= 1.0 && lse_err <= 1.0) {
        return Err(format!("the device decode differs from the cpu backend (out {out_err}, lse {lse_err})").into());
    }
    println!("ok");
    Ok(())
}
