//! Decode benchmark on upstream FlashMLA's grid (b = 128, h_kv = 1): times the whole `decode` call (split kernel +
//! combine) with CUDA events, median over many launches that rotate between several KV caches so the cache is
//! never served from L2. The scheduler step is timed separately. Prints time, TFLOPS and GB/s with upstream's
//! formulas and the ratio to upstream's figure on the same H100 (`shared/docs/anchors-h100.md`; > 1 = faster).
//!
//! ```text
//! bench [--dtypes bf16,fp16,e4m3] [--sk 4096,8192,16384] [--hq 16,32,64,128] [--sq 1,2] [--varlen fixed,varlen]
//!       [--iters 30] [--sets 2] [--small]
//! ```
//! BF16/FP16 run causal (as upstream's BF16 anchors), E4M3 non-causal (as upstream's FP8 anchors). `--small` times
//! issue 6's small and imbalanced batches instead (b = 4 with lengths [4641, 45118, 1730, 1696], s_q = 4, h_q = 16;
//! b = 1..8 with s_k = 1k..64k, h_q = 128).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use cudarc::driver::sys;
use mla_core::{DType, MlaBackend, Stream, Workspace};
use mla_hopper::HopperBackend;

const BATCH: usize = 128;

/// Upstream's H100 times in ms: (dtype, s_k, h_q, s_q, varlen) → ms. BF16 = the 2025-04 kernel, causal;
/// E4M3 = FP8 pull request #54, non-causal. FP16 is compared with the BF16 figure.
const ANCHORS: &[(&str, usize, usize, usize, bool, f64)] = &[
    ("bf16", 4096, 16, 1, false, 0.229),
    ("bf16", 4096, 16, 2, false, 0.229),
    ("bf16", 4096, 32, 1, false, 0.229),
    ("bf16", 4096, 32, 2, false, 0.232),
    ("bf16", 4096, 64, 1, false, 0.232),
    ("bf16", 4096, 64, 2, false, 0.261),
    ("bf16", 4096, 128, 1, false, 0.264),
    ("bf16", 4096, 128, 2, false, 0.471),
    ("bf16", 8192, 16, 1, false, 0.433),
    ("bf16", 8192, 16, 2, false, 0.434),
    ("bf16", 8192, 32, 1, false, 0.434),
    ("bf16", 8192, 32, 2, false, 0.436),
    ("bf16", 8192, 64, 1, false, 0.436),
    ("bf16", 8192, 64, 2, false, 0.533),
    ("bf16", 8192, 128, 1, false, 0.531),
    ("bf16", 8192, 128, 2, false, 0.936),
    ("bf16", 16384, 16, 1, false, 0.833),
    ("bf16", 16384, 16, 2, false, 0.838),
    ("bf16", 16384, 32, 1, false, 0.841),
    ("bf16", 16384, 32, 2, false, 0.862),
    ("bf16", 16384, 64, 1, false, 0.862),
    ("bf16", 16384, 64, 2, false, 1.027),
    ("bf16", 16384, 128, 1, false, 1.014),
    ("bf16", 16384, 128, 2, false, 1.842),
    ("bf16", 4096, 16, 1, true, 0.240),
    ("bf16", 4096, 16, 2, true, 0.249),
    ("bf16", 4096, 32, 1, true, 0.254),
    ("bf16", 4096, 32, 2, true, 0.253),
    ("bf16", 4096, 64, 1, true, 0.250),
    ("bf16", 4096, 64, 2, true, 0.298),
    ("bf16", 4096, 128, 1, true, 0.299),
    ("bf16", 4096, 128, 2, true, 0.495),
    ("bf16", 8192, 16, 1, true, 0.442),
    ("bf16", 8192, 16, 2, true, 0.476),
    ("bf16", 8192, 32, 1, true, 0.428),
    ("bf16", 8192, 32, 2, true, 0.441),
    ("bf16", 8192, 64, 1, true, 0.444),
    ("bf16", 8192, 64, 2, true, 0.555),
    ("bf16", 8192, 128, 1, true, 0.571),
    ("bf16", 8192, 128, 2, true, 0.897),
    ("bf16", 16384, 16, 1, true, 0.828),
    ("bf16", 16384, 16, 2, true, 0.901),
    ("bf16", 16384, 32, 1, true, 0.915),
    ("bf16", 16384, 32, 2, true, 0.880),
    ("bf16", 16384, 64, 1, true, 0.857),
    ("bf16", 16384, 64, 2, true, 0.990),
    ("bf16", 16384, 128, 1, true, 0.955),
    ("bf16", 16384, 128, 2, true, 1.800),
    ("e4m3", 4096, 16, 1, false, 0.129),
    ("e4m3", 4096, 16, 2, false, 0.131),
    ("e4m3", 4096, 32, 1, false, 0.131),
    ("e4m3", 4096, 32, 2, false, 0.135),
    ("e4m3", 4096, 64, 1, false, 0.135),
    ("e4m3", 4096, 64, 2, false, 0.228),
    ("e4m3", 4096, 128, 1, false, 0.228),
    ("e4m3", 4096, 128, 2, false, 0.430),
    ("e4m3", 8192, 16, 1, false, 0.233),
    ("e4m3", 8192, 16, 2, false, 0.234),
    ("e4m3", 8192, 32, 1, false, 0.234),
    ("e4m3", 8192, 32, 2, false, 0.239),
    ("e4m3", 8192, 64, 1, false, 0.239),
    ("e4m3", 8192, 64, 2, false, 0.430),
    ("e4m3", 8192, 128, 1, false, 0.428),
    ("e4m3", 8192, 128, 2, false, 0.825),
    ("e4m3", 4096, 16, 1, true, 0.142),
    ("e4m3", 4096, 16, 2, true, 0.150),
    ("e4m3", 4096, 32, 1, true, 0.154),
    ("e4m3", 4096, 32, 2, true, 0.157),
    ("e4m3", 4096, 64, 1, true, 0.156),
    ("e4m3", 4096, 64, 2, true, 0.247),
    ("e4m3", 4096, 128, 1, true, 0.244),
    ("e4m3", 4096, 128, 2, true, 0.447),
    ("e4m3", 8192, 16, 1, true, 0.247),
    ("e4m3", 8192, 16, 2, true, 0.268),
    ("e4m3", 8192, 32, 1, true, 0.245),
    ("e4m3", 8192, 32, 2, true, 0.258),
    ("e4m3", 8192, 64, 1, true, 0.262),
    ("e4m3", 8192, 64, 2, true, 0.451),
    ("e4m3", 8192, 128, 1, true, 0.463),
    ("e4m3", 8192, 128, 2, true, 0.812),
];

fn anchor(dtype: DType, s_k: usize, h_q: usize, s_q: usize, varlen: bool) -> Option<f64> {
    let key = if dtype == DType::E4M3 { "e4m3" } else { "bf16" };
    ANCHORS.iter().find(|a| a.0 == key && a.1 == s_k && a.2 == h_q && a.3 == s_q && a.4 == varlen).map(|a| a.5)
}

fn list<T: std::str::FromStr>(args: &[String], flag: &str, default: &str) -> Vec<T> {
    let v = args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).map_or(default, |s| s.as_str());
    v.split(',').filter_map(|x| x.trim().parse().ok()).collect()
}

fn median(v: &mut [f32]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2] as f64
}

/// Times `f` (enqueued on the default stream) `iters` times with events; returns the median in ms.
fn time_ms(gpu: &Gpu, iters: usize, mut f: impl FnMut(usize)) -> f64 {
    // As many warm-up launches as timed ones: the first configuration otherwise runs on idle clocks.
    for i in 0..iters.max(3) {
        f(i);
    }
    let mut t = Vec::with_capacity(iters);
    for i in 0..iters {
        let a = gpu.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        let b = gpu.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        a.record(&gpu.stream).unwrap();
        f(i);
        b.record(&gpu.stream).unwrap();
        t.push(a.elapsed_ms(&b).unwrap());
    }
    median(&mut t)
}

fn copy_ceiling(gpu: &Gpu) -> f64 {
    let bytes = 2usize << 30;
    let src = gpu.filled(bytes, &[1]);
    let dst = gpu.filled(bytes, &[2]);
    let ms = time_ms(gpu, 10, |_| {
        // SAFETY: both buffers are live device allocations of `bytes` bytes.
        let r = unsafe { sys::cuMemcpyDtoDAsync_v2(dst.ptr, src.ptr, bytes, gpu.stream.cu_stream()) };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
    });
    2.0 * bytes as f64 / (ms * 1e-3) / 1e9
}

/// One small-batch configuration: allocates its own caches, returns (decode ms, scheduler ms, total splits).
#[allow(clippy::too_many_arguments)]
fn measure_small(
    be: &HopperBackend,
    gpu: &Gpu,
    rng: &mut Rng,
    dtype: DType,
    seqlens: &[i32],
    h_q: usize,
    s_q: usize,
    iters: usize,
    sets: usize,
    pattern: &[u8],
) -> (f64, f64, usize) {
    let b = seqlens.len();
    let elt = dtype.size_bytes();
    let blocks: Vec<usize> = seqlens.iter().map(|&s| (s as usize).div_ceil(PAGE)).collect();
    let num_blocks: usize = blocks.iter().sum();
    let max_blocks = *blocks.iter().max().unwrap();
    let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
    for i in (1..num_blocks).rev() {
        perm.swap(i, rng.below(i + 1));
    }
    let mut bt = vec![BT_GARBAGE; b * max_blocks];
    let mut next = 0;
    for (i, &nb) in blocks.iter().enumerate() {
        for j in 0..nb {
            bt[i * max_blocks + j] = perm[next];
            next += 1;
        }
    }
    let caches: Vec<Buf> = (0..sets).map(|_| gpu.filled(num_blocks * PAGE * D_K * elt, pattern)).collect();
    let qs: Vec<Buf> = (0..sets).map(|_| gpu.filled(b * s_q * h_q * D_K * elt, pattern)).collect();
    let bt_buf = gpu.upload(as_bytes(&bt));
    let sl_buf = gpu.upload(as_bytes(seqlens));
    let dq = gpu.upload(as_bytes(&[0.5f32]));
    let dk = gpu.upload(as_bytes(&[0.25f32]));
    let parts = be.num_sm_parts(s_q * h_q, 1);
    let shape = mla_core::DecodeShape { batch: b, s_q, h_q, h_kv: 1, dtype };
    let ws = gpu.filled(be.workspace_size(&shape).unwrap(), &[0]);
    let out = gpu.filled(b * s_q * h_q * D_V * 2, &[0]);
    let lse = gpu.filled(b * s_q * h_q * 4, &[0]);
    let meta = gpu.filled(parts * 32, &[0]);
    let splits = gpu.filled((b + 1) * 4, &[0]);
    let i32t = mla_core::ScalarType::I32;
    let md = mla_core::MetadataArgs {
        cache_seqlens: desc(&sl_buf, i32t, &[b as i64], &[1]),
        q_seq_per_hk: s_q * h_q,
        h_kv: 1,
        tile_scheduler_metadata: desc(&meta, i32t, &[parts as i64, 8], &[8, 1]),
        num_splits: desc(&splits, i32t, &[b as i64 + 1], &[1]),
    };
    let sched_ms = time_ms(gpu, iters, |_| be.get_mla_metadata(&md, Stream::DEFAULT).unwrap());
    let total_splits = *mla_core::scheduler::plan(seqlens, parts).unwrap().num_splits.last().unwrap() as usize;
    let q_shape = [b as i64, s_q as i64, h_q as i64, D_K as i64];
    let k_shape = [num_blocks as i64, PAGE as i64, 1, D_K as i64];
    let o_shape = [b as i64, s_q as i64, h_q as i64, D_V as i64];
    let l_shape = [b as i64, h_q as i64, s_q as i64];
    let fp8 = dtype == DType::E4M3;
    let all: Vec<mla_core::DecodeArgs> = (0..sets)
        .map(|set| mla_core::DecodeArgs {
            q: desc(&qs[set], dtype.scalar(), &q_shape, &contig(&q_shape)),
            k_cache: desc(&caches[set], dtype.scalar(), &k_shape, &contig(&k_shape)),
            block_table: desc(&bt_buf, i32t, &[b as i64, max_blocks as i64], &[max_blocks as i64, 1]),
            cache_seqlens: md.cache_seqlens,
            head_dim_v: D_V,
            tile_scheduler_metadata: md.tile_scheduler_metadata,
            num_splits: md.num_splits,
            softmax_scale: None,
            causal: !fp8,
            descale_q: fp8.then(|| desc(&dq, mla_core::ScalarType::F32, &[1], &[1])),
            descale_k: fp8.then(|| desc(&dk, mla_core::ScalarType::F32, &[1], &[1])),
            out: desc(&out, dtype.out_dtype(), &o_shape, &contig(&o_shape)),
            lse: desc(&lse, mla_core::ScalarType::F32, &l_shape, &contig(&l_shape)),
        })
        .collect();
    let wsd = Workspace { ptr: ws.ptr as *mut std::ffi::c_void, bytes: ws.bytes };
    let ms = time_ms(gpu, iters, |i| be.decode(&all[i % sets], wsd, Stream::DEFAULT).unwrap());
    (ms, sched_ms, total_splits)
}

/// Small and imbalanced batches (issue 6): latency of the whole decode call.
fn small_batches(be: &HopperBackend, gpu: &Gpu, rng: &mut Rng, dtypes: &[DType], iters: usize, sets: usize) {
    println!("small batches: whole decode call (split + combine), median of {iters}");
    println!(
        "{:<5} {:>2} {:>3} {:>4} {:<28} {:>6} {:>9} {:>8} {:>8}",
        "dtype", "b", "s_q", "h_q", "lengths", "splits", "us", "GB/s", "sched_us"
    );
    let mut configs: Vec<(Vec<i32>, usize, usize)> = vec![(vec![4641, 45118, 1730, 1696], 4, 16)];
    for b in [1usize, 2, 4, 8] {
        for s_k in [1024, 4096, 16384, 65536] {
            configs.push((vec![s_k; b], 1, 128));
        }
    }
    for &dtype in dtypes {
        let pattern = random_pattern(rng, dtype);
        for (seqlens, s_q, h_q) in &configs {
            let (ms, sched, splits) = measure_small(be, gpu, rng, dtype, seqlens, *h_q, *s_q, iters, sets, &pattern);
            let total: usize = seqlens.iter().map(|&s| s as usize).sum();
            let elt = dtype.size_bytes();
            let bytes =
                (elt * (total * D_K + seqlens.len() * s_q * h_q * D_K) + 2 * seqlens.len() * s_q * h_q * D_V) as f64;
            let lens = if seqlens.iter().all(|&s| s == seqlens[0]) {
                format!("{} x {}", seqlens.len(), seqlens[0])
            } else {
                format!("{seqlens:?}")
            };
            println!(
                "{:<5} {:>2} {:>3} {:>4} {:<28} {:>6} {:>9.1} {:>8.0} {:>8.1}",
                dtype.name(),
                seqlens.len(),
                s_q,
                h_q,
                lens,
                splits,
                ms * 1e3,
                bytes / (ms * 1e-3) / 1e9,
                sched * 1e3
            );
        }
    }
}

/// A 16 MiB random pattern in `dtype`, tiled over caches and queries (content only needs to be finite and
/// non-trivial).
fn random_pattern(rng: &mut Rng, dtype: DType) -> Vec<u8> {
    let elt = dtype.size_bytes();
    (0..(16usize << 20) / elt)
        .flat_map(|_| {
            let x = rng.normal() as f32;
            match dtype {
                DType::Bf16 => mla_core::dtype::f32_to_bf16(x).to_le_bytes().to_vec(),
                DType::F16 => mla_core::dtype::f32_to_f16(x).to_le_bytes().to_vec(),
                DType::E4M3 => vec![mla_core::dtype::f32_to_e4m3(x * 8.0)],
            }
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let be = match HopperBackend::new(0) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("bench: Hopper backend unavailable: {e}");
            std::process::exit(2);
        }
    };
    let dtypes: Vec<DType> =
        list::<String>(&args, "--dtypes", "bf16,fp16,e4m3").iter().filter_map(|s| DType::parse(s)).collect();
    let sks: Vec<usize> = list(&args, "--sk", "4096,8192,16384");
    let hqs: Vec<usize> = list(&args, "--hq", "16,32,64,128");
    let sqs: Vec<usize> = list(&args, "--sq", "1,2");
    let modes: Vec<String> = list(&args, "--varlen", "fixed,varlen");
    let iters = list::<usize>(&args, "--iters", "30")[0];
    let sets = list::<usize>(&args, "--sets", "2")[0].max(1);
    let gpu = Gpu::new();
    println!(
        "device: {} ({} SMs), {}",
        be.capabilities().device_name,
        be.capabilities().sm_count,
        mla_hopper::build_info()
    );
    println!("copy ceiling: {:.0} GB/s (2 GiB device-to-device, read + write)", copy_ceiling(&gpu));
    println!(
        "{:<5} {:>6} {:>4} {:>3} {:<6} {:>3} {:>9} {:>8} {:>8} {:>9} {:>7} {:>8}",
        "dtype", "s_k", "h_q", "s_q", "mode", "cau", "ms", "TFLOPS", "GB/s", "anchor", "ratio", "sched_us"
    );
    let mut rng = Rng::new(seed());
    if args.iter().any(|a| a == "--small") {
        small_batches(&be, &gpu, &mut rng, &dtypes, iters, sets);
        return;
    }
    for &dtype in &dtypes {
        let causal = dtype != DType::E4M3;
        let elt = dtype.size_bytes();
        let pattern = random_pattern(&mut rng, dtype);
        for &s_k in &sks {
            for mode in &modes {
                let varlen = mode == "varlen";
                let seqlens: Vec<i32> = (0..BATCH)
                    .map(|_| {
                        if varlen { ((s_k as f64 + rng.normal() * s_k as f64 / 2.0) as i32).max(2) } else { s_k as i32 }
                    })
                    .collect();
                let total: usize = seqlens.iter().map(|&s| s as usize).sum();
                let blocks: Vec<usize> = seqlens.iter().map(|&s| (s as usize).div_ceil(PAGE)).collect();
                let num_blocks: usize = blocks.iter().sum();
                let max_blocks = *blocks.iter().max().unwrap();
                let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
                for i in (1..num_blocks).rev() {
                    perm.swap(i, rng.below(i + 1));
                }
                let mut bt = vec![BT_GARBAGE; BATCH * max_blocks];
                let mut next = 0;
                for (i, &nb) in blocks.iter().enumerate() {
                    for j in 0..nb {
                        bt[i * max_blocks + j] = perm[next];
                        next += 1;
                    }
                }
                let cache_bytes = num_blocks * PAGE * D_K * elt;
                let caches: Vec<Buf> = (0..sets).map(|_| gpu.filled(cache_bytes, &pattern)).collect();
                let bt_buf = gpu.upload(as_bytes(&bt));
                let sl_buf = gpu.upload(as_bytes(&seqlens));
                let dq = gpu.upload(as_bytes(&[0.5f32]));
                let dk = gpu.upload(as_bytes(&[0.25f32]));
                for &h_q in &hqs {
                    for &s_q in &sqs {
                        let qsph = s_q * h_q;
                        let parts = be.num_sm_parts(qsph, 1);
                        let shape = mla_core::DecodeShape { batch: BATCH, s_q, h_q, h_kv: 1, dtype };
                        let ws = gpu.filled(be.workspace_size(&shape).unwrap(), &[0]);
                        let qs: Vec<Buf> =
                            (0..sets).map(|_| gpu.filled(BATCH * s_q * h_q * D_K * elt, &pattern)).collect();
                        let out = gpu.filled(BATCH * s_q * h_q * D_V * 2, &[0]);
                        let lse = gpu.filled(BATCH * s_q * h_q * 4, &[0]);
                        let meta = gpu.filled(parts * 32, &[0]);
                        let splits = gpu.filled((BATCH + 1) * 4, &[0]);
                        let md = mla_core::MetadataArgs {
                            cache_seqlens: desc(&sl_buf, mla_core::ScalarType::I32, &[BATCH as i64], &[1]),
                            q_seq_per_hk: qsph,
                            h_kv: 1,
                            tile_scheduler_metadata: desc(
                                &meta,
                                mla_core::ScalarType::I32,
                                &[parts as i64, 8],
                                &[8, 1],
                            ),
                            num_splits: desc(&splits, mla_core::ScalarType::I32, &[BATCH as i64 + 1], &[1]),
                        };
                        let sched_ms = time_ms(&gpu, iters, |_| be.get_mla_metadata(&md, Stream::DEFAULT).unwrap());
                        let dt = dtype.scalar();
                        let q_shape = [BATCH as i64, s_q as i64, h_q as i64, D_K as i64];
                        let k_shape = [num_blocks as i64, PAGE as i64, 1, D_K as i64];
                        let o_shape = [BATCH as i64, s_q as i64, h_q as i64, D_V as i64];
                        let l_shape = [BATCH as i64, h_q as i64, s_q as i64];
                        let make = |set: usize| mla_core::DecodeArgs {
                            q: desc(&qs[set], dt, &q_shape, &contig(&q_shape)),
                            k_cache: desc(&caches[set], dt, &k_shape, &contig(&k_shape)),
                            block_table: desc(
                                &bt_buf,
                                mla_core::ScalarType::I32,
                                &[BATCH as i64, max_blocks as i64],
                                &[max_blocks as i64, 1],
                            ),
                            cache_seqlens: md.cache_seqlens,
                            head_dim_v: D_V,
                            tile_scheduler_metadata: md.tile_scheduler_metadata,
                            num_splits: md.num_splits,
                            softmax_scale: None,
                            causal,
                            descale_q: (dtype == DType::E4M3).then(|| desc(&dq, mla_core::ScalarType::F32, &[1], &[1])),
                            descale_k: (dtype == DType::E4M3).then(|| desc(&dk, mla_core::ScalarType::F32, &[1], &[1])),
                            out: desc(&out, dtype.out_dtype(), &o_shape, &contig(&o_shape)),
                            lse: desc(&lse, mla_core::ScalarType::F32, &l_shape, &contig(&l_shape)),
                        };
                        let all: Vec<mla_core::DecodeArgs> = (0..sets).map(make).collect();
                        let wsd = Workspace { ptr: ws.ptr as *mut std::ffi::c_void, bytes: ws.bytes };
                        let ms = time_ms(&gpu, iters, |i| be.decode(&all[i % sets], wsd, Stream::DEFAULT).unwrap());
                        let flops = 2.0 * (s_q * total * h_q * (D_K + D_V)) as f64;
                        let bytes =
                            (elt * (total * D_K + BATCH * s_q * h_q * D_K) + 2 * BATCH * s_q * h_q * D_V) as f64;
                        let a = anchor(dtype, s_k, h_q, s_q, varlen);
                        println!(
                            "{:<5} {:>6} {:>4} {:>3} {:<6} {:>3} {:>9.4} {:>8.1} {:>8.0} {:>9} {:>7} {:>8.1}",
                            dtype.name(),
                            s_k,
                            h_q,
                            s_q,
                            mode,
                            causal as u8,
                            ms,
                            flops / (ms * 1e-3) / 1e12,
                            bytes / (ms * 1e-3) / 1e9,
                            a.map_or("-".into(), |a| format!("{a:.3}")),
                            a.map_or("-".into(), |a| format!("{:.3}", a / ms)),
                            sched_ms * 1e3
                        );
                    }
                }
            }
        }
    }
}
