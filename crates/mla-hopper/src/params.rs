//! Kernel parameter blocks: `#[repr(C)]` mirrors of `kernels/mla_params.h`, passed to the kernels by value.
//!
//! Device addresses are `u64`, strides are in elements. Field order and types must match the C structs exactly:
//! the size assertions below catch a drift at compile time, and the test at the end compares every field's offset
//! and the shared tile constants with what the system C++ compiler makes of the header.

/// `mla::DecodeParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DecodeParams {
    pub q: u64,
    pub block_table: u64,
    pub seqlens: u64,
    pub metadata: u64,
    pub num_splits: u64,
    pub out: u64,
    pub lse: u64,
    pub lse_accum: u64,
    pub o_accum: u64,
    pub descale_q: u64,
    pub descale_k: u64,
    pub q_stride_b: i64,
    pub q_stride_t: i64,
    pub q_stride_h: i64,
    pub bt_stride_b: i64,
    pub o_stride_b: i64,
    pub o_stride_t: i64,
    pub o_stride_h: i64,
    pub lse_stride_b: i64,
    pub lse_stride_h: i64,
    pub lse_stride_t: i64,
    pub scale_log2: f32,
    pub batch: i32,
    pub s_q: i32,
    pub h_q: i32,
    pub h_kv: i32,
    pub heads_per_kv: i32,
    pub q_seq_per_hk: i32,
    pub max_blocks_per_seq: i32,
    pub causal: i32,
    pub pad0: i32,
}

/// `mla::CombineParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CombineParams {
    pub lse_accum: u64,
    pub o_accum: u64,
    pub num_splits: u64,
    pub out: u64,
    pub lse: u64,
    pub o_stride_b: i64,
    pub o_stride_t: i64,
    pub o_stride_h: i64,
    pub lse_stride_b: i64,
    pub lse_stride_h: i64,
    pub lse_stride_t: i64,
    pub batch: i32,
    pub h_kv: i32,
    pub heads_per_kv: i32,
    pub q_seq_per_hk: i32,
}

/// `mla::MetadataParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MetadataParams {
    pub seqlens: u64,
    pub metadata: u64,
    pub num_splits: u64,
    pub batch: i32,
    pub num_sm_parts: i32,
    pub seqlens_in_smem: i32,
    pub pad0: i32,
}

// 11 pointers + 10 strides (8 B each) + 10 four-byte fields.
const _: () = assert!(std::mem::size_of::<DecodeParams>() == 21 * 8 + 10 * 4);
const _: () = assert!(std::mem::size_of::<CombineParams>() == 11 * 8 + 4 * 4);
const _: () = assert!(std::mem::size_of::<MetadataParams>() == 3 * 8 + 4 * 4);

#[cfg(test)]
mod layout {
    //! The C++ compiler's view of `kernels/mla_params.h` and `kernels/smem_plan.h` against the host's: one offset
    //! per field, the sizes, the tile constants shared with `mla_core::scheduler` and the shared-memory plan.
    use super::*;
    use std::mem::{offset_of, size_of};
    use std::path::Path;
    use std::process::Command;

    /// `(C++ expression, Rust value)` for every field of `$ty` and its size.
    macro_rules! layout {
        ($ty:ident { $($field:ident),* $(,)? }) => {
            vec![
                (format!("sizeof(mla::{})", stringify!($ty)), size_of::<$ty>()),
                $((format!("offsetof(mla::{}, {})", stringify!($ty), stringify!($field)), offset_of!($ty, $field)),)*
            ]
        };
    }

    fn expected() -> Vec<(String, usize)> {
        let mut v = layout!(DecodeParams {
            q,
            block_table,
            seqlens,
            metadata,
            num_splits,
            out,
            lse,
            lse_accum,
            o_accum,
            descale_q,
            descale_k,
            q_stride_b,
            q_stride_t,
            q_stride_h,
            bt_stride_b,
            o_stride_b,
            o_stride_t,
            o_stride_h,
            lse_stride_b,
            lse_stride_h,
            lse_stride_t,
            scale_log2,
            batch,
            s_q,
            h_q,
            h_kv,
            heads_per_kv,
            q_seq_per_hk,
            max_blocks_per_seq,
            causal,
            pad0,
        });
        v.extend(layout!(CombineParams {
            lse_accum,
            o_accum,
            num_splits,
            out,
            lse,
            o_stride_b,
            o_stride_t,
            o_stride_h,
            lse_stride_b,
            lse_stride_h,
            lse_stride_t,
            batch,
            h_kv,
            heads_per_kv,
            q_seq_per_hk,
        }));
        v.extend(layout!(MetadataParams { seqlens, metadata, num_splits, batch, num_sm_parts, seqlens_in_smem, pad0 }));
        use mla_core::scheduler as s;
        v.extend([
            ("(size_t)mla::BLOCK_M".to_string(), s::BLOCK_SIZE_M),
            ("(size_t)mla::PAGE_TOKENS".to_string(), s::BLOCK_SIZE_N),
            ("(size_t)mla::PAGE_TOKENS".to_string(), crate::PAGE_SIZE),
            ("(size_t)mla::HEAD_DIM_K".to_string(), mla_core::HEAD_DIM_K),
            ("(size_t)mla::HEAD_DIM_V".to_string(), mla_core::HEAD_DIM_V),
            ("(size_t)mla::METADATA_WORDS".to_string(), s::METADATA_WORDS),
            ("(size_t)mla::FIXED_OVERHEAD_BLOCKS".to_string(), s::FIXED_OVERHEAD_BLOCKS as usize),
            ("(size_t)mla::CHUNK_BYTES".to_string(), crate::CHUNK_BYTES as usize),
            ("(size_t)mla::Smem<mla::KIND_BF16>::DYNAMIC_BYTES".to_string(), crate::SMEM_16BIT as usize),
            ("(size_t)mla::Smem<mla::KIND_F16>::DYNAMIC_BYTES".to_string(), crate::SMEM_16BIT as usize),
            ("(size_t)mla::Smem<mla::KIND_E4M3>::DYNAMIC_BYTES".to_string(), crate::SMEM_E4M3 as usize),
            ("(size_t)mla::SMEM_OPT_IN_LIMIT".to_string(), crate::SMEM_OPT_IN_LIMIT as usize),
        ]);
        v
    }

    #[test]
    fn rust_mirrors_match_the_header_field_by_field() {
        let expected = expected();
        let body: String =
            expected.iter().map(|(expr, _)| format!("  std::printf(\"%zu\\n\", (size_t)({expr}));\n")).collect();
        let src = format!(
            "#include <cstddef>\n#include <cstdio>\n#include \"mla_params.h\"\n#include \"smem_plan.h\"\nint main() {{\n{body}}}\n"
        );

        let dir = std::env::temp_dir().join(format!("mla-params-layout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        let (cpp, exe) = (dir.join("layout.cpp"), dir.join("layout"));
        std::fs::write(&cpp, src).expect("write layout.cpp");
        let target = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
        let mut cmd = cc::Build::new()
            .cargo_metadata(false)
            .cpp(true)
            .opt_level(0)
            .debug(false)
            .target(&target)
            .host(&target)
            .out_dir(&dir)
            .try_get_compiler()
            .expect("no C++ compiler found (install g++ or set CXX)")
            .to_command();
        let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let built = cmd.arg("-std=c++17").arg("-I").arg(&kernels).arg(&cpp).arg("-o").arg(&exe).output();
        let built = built.expect("run the C++ compiler");
        assert!(built.status.success(), "compiling the header failed:\n{}", String::from_utf8_lossy(&built.stderr));
        let run = Command::new(&exe).output().expect("run the layout program");
        assert!(run.status.success());
        let got: Vec<usize> =
            String::from_utf8(run.stdout).unwrap().lines().map(|l| l.parse().expect("a number")).collect();
        std::fs::remove_dir_all(&dir).ok();

        assert_eq!(got.len(), expected.len());
        let drift: Vec<String> = expected
            .iter()
            .zip(&got)
            .filter(|((_, rust), c)| *rust != **c)
            .map(|((expr, rust), c)| format!("{expr}: C++ {c}, Rust {rust}"))
            .collect();
        assert!(drift.is_empty(), "kernels/mla_params.h and src/params.rs disagree:\n{}", drift.join("\n"));
    }
}
