//! A Rust host choosing a backend at run time and decoding a small problem from host memory, checked against a
//! float64 computation of the definition.
//!
//! ```sh
//! cargo run -p flashmla --example host_decode            # "auto": Hopper if it opens, else the CPU backend
//! cargo run -p flashmla --example host_decode -- cpu
//! ```
//!
//! Host views (`HostTensor`, `HostTensorMut`, `Workspace::host`) are the safe way in: they borrow the slices, so no
//! address can outlive its memory. A GPU backend takes device memory, which enters through the device views of
//! `flashmla::cuda` (`examples/cuda_decode.rs`); this example therefore decodes on a host backend and says so when
//! `auto` opened a GPU one.

use flashmla::{
    DecodeArgs, DecodeShape, Device, HEAD_DIM_K, HEAD_DIM_V, HostTensor, HostTensorMut, MetadataArgs, MlaBackend,
    Stream, Workspace,
};
use half::bf16;

/// Two requests of 100 and 7 tokens, one query token each, 16 query heads sharing one KV head, page size 64.
const SEQLENS: [i32; 2] = [100, 7];
const H_Q: usize = 16;
const PAGE: usize = 64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "auto".into());
    let mut backend: Box<dyn MlaBackend> = flashmla::open_backend(&name, 0)?;
    if backend.capabilities().device != Device::Host {
        println!("`{name}` opened `{}`, which takes device memory; decoding on `cpu` instead", backend.name());
        backend = flashmla::open_backend("cpu", 0)?;
    }
    println!("backend: {} on {}", backend.name(), backend.capabilities().device_name);

    // Inputs: a deterministic pseudo-random q and cache, pages 0-1 for request 0 and page 2 for request 1.
    let b = SEQLENS.len();
    let mut state = 1u32;
    let mut next = || {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        bf16::from_f32((state >> 8) as f32 / (1 << 24) as f32 - 0.5)
    };
    let q: Vec<bf16> = (0..b * H_Q * HEAD_DIM_K).map(|_| next()).collect();
    let kv: Vec<bf16> = (0..3 * PAGE * HEAD_DIM_K).map(|_| next()).collect();
    let block_table = vec![0, 1, 2, 0];

    // Step 1, once per decoding step: the scheduler's metadata.
    let shape = DecodeShape { batch: b, s_q: 1, h_q: H_Q, h_kv: 1, dtype: flashmla::DType::Bf16 };
    let parts = backend.num_sm_parts(shape.q_seq_per_hk(), 1);
    let (mut metadata, mut num_splits) = (vec![0i32; parts * 8], vec![0i32; b + 1]);
    let seqlens = HostTensor::new(&SEQLENS, &[b])?;
    backend.get_mla_metadata(
        &MetadataArgs {
            cache_seqlens: seqlens.desc(),
            q_seq_per_hk: shape.q_seq_per_hk(),
            h_kv: 1,
            tile_scheduler_metadata: HostTensorMut::new(&mut metadata, &[parts, 8])?.desc(),
            num_splits: HostTensorMut::new(&mut num_splits, &[b + 1])?.desc(),
        },
        Stream::DEFAULT,
    )?;

    // Step 2, once per layer: the decode, into caller-owned outputs and workspace.
    let mut out = vec![bf16::ZERO; b * H_Q * HEAD_DIM_V];
    let mut lse = vec![0f32; b * H_Q];
    let mut workspace = vec![0f32; backend.workspace_size(&shape)?.div_ceil(4)];
    let args = DecodeArgs {
        q: HostTensor::new(&q, &[b, 1, H_Q, HEAD_DIM_K])?.desc(),
        k_cache: HostTensor::new(&kv, &[3, PAGE, 1, HEAD_DIM_K])?.desc(),
        block_table: HostTensor::new(&block_table, &[b, 2])?.desc(),
        cache_seqlens: seqlens.desc(),
        head_dim_v: HEAD_DIM_V,
        tile_scheduler_metadata: HostTensor::new(&metadata, &[parts, 8])?.desc(),
        num_splits: HostTensor::new(&num_splits, &[b + 1])?.desc(),
        softmax_scale: None,
        causal: false,
        descale_q: None,
        descale_k: None,
        out: HostTensorMut::new(&mut out, &[b, 1, H_Q, HEAD_DIM_V])?.desc(),
        lse: HostTensorMut::new(&mut lse, &[b, H_Q, 1])?.desc(),
    };
    backend.decode(&args, Workspace::host(&mut workspace), Stream::DEFAULT)?;

    // Check: softmax(scale · q · Kᵀ) · V in float64, V the first 512 columns of each K row.
    let scale = 1.0 / (HEAD_DIM_K as f64).sqrt();
    let mut worst = 0f64;
    for (i, &len) in SEQLENS.iter().enumerate() {
        let key = |j: usize| {
            let page = block_table[i * 2 + j / PAGE] as usize;
            &kv[(page * PAGE + j % PAGE) * HEAD_DIM_K..][..HEAD_DIM_K]
        };
        for h in 0..H_Q {
            let qrow = &q[(i * H_Q + h) * HEAD_DIM_K..][..HEAD_DIM_K];
            let scores: Vec<f64> = (0..len as usize)
                .map(|j| scale * qrow.iter().zip(key(j)).map(|(a, k)| a.to_f64() * k.to_f64()).sum::<f64>())
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
            worst = worst.max((lse[i * H_Q + h] as f64 - (m + z.ln())).abs());
            for d in 0..HEAD_DIM_V {
                let want: f64 = scores.iter().enumerate().map(|(j, s)| (s - m).exp() / z * key(j)[d].to_f64()).sum();
                let got = out[(i * H_Q + h) * HEAD_DIM_V + d].to_f64();
                // One bf16 rounding of the output: half an ulp relative, plus a little for the f32 accumulation.
                worst = worst.max((got - want).abs() / (want.abs() * 2f64.powi(-8) + 1e-6));
            }
        }
    }
    println!("out [{b}, 1, {H_Q}, {HEAD_DIM_V}], lse [{b}, {H_Q}, 1]: worst error {worst:.3} (in bf16 half-ulps)");
    if worst > 1.01 {
        return Err(format!("the decode differs from the definition (worst error {worst})").into());
    }
    println!("ok");
    Ok(())
}
