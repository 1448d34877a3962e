//! Compiles `kernels/*.cu` to sm_90a cubins with nvcc 13.0 and embeds them (include_bytes! from OUT_DIR).
//!
//! nvcc search order: `$MLA_NVCC`, `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, the project-local toolchain
//! `<workspace>/.cuda` (installed by `scripts/install-cuda.sh`), then `nvcc` on `PATH`. With none found (or
//! `MLA_NO_KERNELS=1`) the crate builds with `cfg(mla_no_kernels)` and reports "kernels not built" at run time.
//! A kernel that fails to compile fails the build: CI must notice.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every kernel source, compiled to `<name>.cubin`.
const KERNELS: [&str; 3] = ["splitkv_mla", "combine", "get_metadata"];
/// Headers the kernels include.
const HEADERS: [&str; 4] = ["mla_ptx.cuh", "mla_params.h", "smem_plan.h", "splitkv_common.cuh"];
/// wgmma and setmaxnreg need the arch-specific target.
const GENCODE: &str = "arch=compute_90a,code=sm_90a";
/// The toolchain version the project pins (the H100 driver is CUDA 13.0).
const PINNED_RELEASE: &str = "release 13.0";

fn nvcc_version(nvcc: &Path) -> Option<String> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find(|l| l.contains("release")).map(|l| l.trim().to_string())
}

fn find_nvcc(workspace: &Path) -> Option<(PathBuf, String)> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("MLA_NVCC") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(var) {
            candidates.push(PathBuf::from(p).join("bin").join("nvcc"));
        }
    }
    candidates.push(workspace.join(".cuda/nvidia/cu13/bin/nvcc"));
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.into_iter().filter(|c| c.is_file()).find_map(|c| nvcc_version(&c).map(|v| (c, v)))
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(mla_no_kernels)");
    for var in ["MLA_NVCC", "CUDA_HOME", "CUDA_PATH", "MLA_NO_KERNELS", "PATH"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest.join("../..");
    // `kernels/` is a symlink to the repository's `kernels/`, which `cargo package` follows, copying the sources
    // into the package: the same path works in the repository and in a registry build.
    let kernel_dir = manifest.join("kernels");
    for f in KERNELS.iter().map(|k| format!("{k}.cu")).chain(HEADERS.iter().map(|h| h.to_string())) {
        println!("cargo::rerun-if-changed={}", kernel_dir.join(f).display());
    }
    println!("cargo::rerun-if-changed={}", workspace.join(".cuda/nvidia/cu13/bin/nvcc").display());

    let skip = env::var("MLA_NO_KERNELS").is_ok_and(|v| v == "1");
    let found = if skip { None } else { find_nvcc(&workspace) };
    let Some((nvcc, version)) = found else {
        let why = if skip { "MLA_NO_KERNELS=1" } else { "no nvcc found (run scripts/install-cuda.sh)" };
        println!("cargo::warning=mla-hopper: kernels not built: {why}");
        println!("cargo::rustc-cfg=mla_no_kernels");
        println!("cargo::rustc-env=MLA_BUILD_INFO=kernels not built: {why}");
        return;
    };
    if !version.contains(PINNED_RELEASE) {
        println!("cargo::warning=mla-hopper: {} is `{version}`, the project pins nvcc 13.0.x", nvcc.display());
    }

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    for k in KERNELS {
        let src = kernel_dir.join(format!("{k}.cu"));
        let dst = out_dir.join(format!("{k}.cubin"));
        let output = Command::new(&nvcc)
            .args(["-gencode", GENCODE, "-cubin", "-O3", "-std=c++17", "-lineinfo", "-Xptxas=-warn-spills"])
            .arg("-I")
            .arg(&kernel_dir)
            .arg("-o")
            .arg(&dst)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("failed to run {}: {e}", nvcc.display()));
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            panic!("nvcc failed on {}:\n{stderr}", src.display());
        }
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            println!("cargo::warning=nvcc {k}: {line}");
        }
    }
    println!("cargo::rustc-env=MLA_BUILD_INFO=sm_90a cubins built by nvcc {version}");
}
