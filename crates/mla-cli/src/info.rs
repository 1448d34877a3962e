//! `flashmla info`: which backends can run here, and why the others cannot.

use mla_core::MlaBackend;

use crate::args::{CliResult, InfoArgs};

fn describe(b: &dyn MlaBackend) -> String {
    let c = b.capabilities();
    // A GPU's parallelism is its SM count; the CPU backend names its threads in the device name, and its
    // `sm_count` is a fixed scheduler width (so results do not depend on the thread count).
    let device = match c.compute_capability {
        Some((ma, mi)) => format!("{} ({} SMs, sm_{ma}{mi})", c.device_name, c.sm_count),
        None => c.device_name.clone(),
    };
    let dtypes: Vec<&str> = c.dtypes.iter().map(|d| d.name()).collect();
    format!("available: {device}, dtypes {}, {}", dtypes.join("/"), c.page_sizes.describe())
}

/// Runs `flashmla info`.
pub fn run(args: &InfoArgs) -> CliResult {
    let ordinal = args.device;
    println!("flashmla {} (ABI and backends of flashmla-rs)", env!("CARGO_PKG_VERSION"));
    println!("build: {}; sm_90a kernels: {}", profile(), kernels());
    for name in ["cpu", "hopper"] {
        let line = match flashmla::open_backend(name, ordinal) {
            Ok(b) => describe(b.as_ref()),
            Err(e) => format!("unavailable: {e}"),
        };
        println!("  {name:<7} {line}");
    }
    let auto = flashmla::open_backend("auto", ordinal).map(|b| b.name()).unwrap_or("none");
    println!("  auto    -> {auto}");
    Ok(())
}

#[cfg(feature = "cuda")]
fn kernels() -> &'static str {
    mla_hopper::build_info()
}

#[cfg(not(feature = "cuda"))]
fn kernels() -> &'static str {
    "none (built without the `cuda` feature)"
}

fn profile() -> &'static str {
    if cfg!(debug_assertions) { "debug" } else { "release" }
}
