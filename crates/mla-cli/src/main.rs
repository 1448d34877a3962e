//! `flashmla`: the command-line face of flashmla-rs.
//!
//! | command | what it does |
//! |---|---|
//! | `info` | which backends run here, and why the others do not |
//! | `plan` | the split-KV scheduler's output for given lengths |
//! | `decode` | one decode step, `.npy` files in and out |
//! | `demo` | a random engine-like step on the best backend, checked against the CPU reference, timed |
//! | `bench` | upstream's benchmark grid (scaled), with this machine's measured ceilings; `--backend hopper`: upstream's H100 benchmark against its figures |
//!
//! Errors are one line on stderr and exit status 2; nothing panics on bad input.

mod anchors;
mod args;
mod bench;
mod bench_hopper;
mod check;
mod decode;
mod demo;
mod exec;
mod exec_cuda;
mod info;
mod npy;
mod plan;

use std::process::ExitCode;

use args::{Args, CliResult};

const USAGE: &str = "\
usage: flashmla <command> [options]

commands:
  info    [--device N]                      backends usable on this machine, and why not
  plan    --seqlens L,L,... | --seqlens-file F.npy
          [--s-q 1] [--h-q 128] [--h-kv 1] [--num-sms 132] [--json]
                                            the scheduler's metadata for these lengths
  decode  --q Q.npy --kv-cache KV.npy --block-table BT.npy --seqlens SL.npy --out OUT.npy --lse LSE.npy
          [--backend auto|cpu|hopper] [--device N] [--dtype bf16|fp16|e4m3] [--causal]
          [--softmax-scale X] [--descale-q X] [--descale-k X]
                                            one decode step; inputs float32 (rounded to --dtype) and int32,
                                            outputs float32 out [b,s_q,h_q,512] and lse [b,h_q,s_q]
  demo    [--backend auto] [--device N] [--dtype bf16] [--batch 32] [--seqlen 2048] [--s-q 2] [--h-q 16]
          [--h-kv 1] [--page-size 64] [--fixed-len] [--no-causal] [--iters 5] [--seed 0] [--check-rows 24]
          [--save DIR]                      (--save: also write the inputs and outputs as .npy files)
                                            a random engine-like step on the best backend: timed, and
                                            checked against the CPU reference (exit 2 if a check fails)
  bench   [--backend cpu] [--threads N] [--grid all|upstream|mem] [--dtype bf16,fp16,e4m3]
          [--h-q 16,32,64,128] [--s-q 1,2] [--batch 16] [--seqlen N] [--varlen] [--no-causal]
          [--iters 3] [--min-time 0.3] [--json FILE] [--no-ceilings]
                                            time, GB/s, GFLOP/s next to measured copy bandwidth and FMA peak
  bench   --backend hopper [--device N] [--grid upstream|small] [--dtype bf16,fp16,e4m3]
          [--sk 4096,8192,16384] [--h-q 16,32,64,128] [--s-q 1,2] [--varlen [fixed,varlen]] [--batch 128]
          [--no-causal] [--iters 30] [--sets 2] [--seed 0] [--sync-each] [--json FILE] [--no-ceilings] [--dry-run]
                                            upstream's H100 benchmark: whole decode call timed with CUDA events
                                            (median, input sets rotated past L2), TFLOPS, GB/s, ratio to
                                            upstream's figure, the device's copy bandwidth; --grid small: issue 6's
                                            small and imbalanced batches (aliases: --dtypes, --seqlen, --hq, --sq)
";

/// Boolean options of `bench`.
const BENCH_BOOLEANS: &[&str] = &["no-causal", "no-ceilings", "sync-each", "dry-run"];
/// Options of `bench` that take a value only when one follows (`--varlen`, `--varlen fixed,varlen`).
const BENCH_OPTIONAL: &[&str] = &["varlen"];

/// Boolean options, by command.
fn booleans(cmd: &str) -> &'static [&'static str] {
    match cmd {
        "plan" => &["json"],
        "decode" => &["causal"],
        "demo" => &["fixed-len", "no-causal"],
        "bench" => BENCH_BOOLEANS,
        _ => &[],
    }
}

/// Options that may or may not take a value, by command.
fn optional_values(cmd: &str) -> &'static [&'static str] {
    match cmd {
        "bench" => BENCH_OPTIONAL,
        _ => &[],
    }
}

fn dispatch(cmd: &str, rest: &[String]) -> CliResult {
    let args = Args::parse(rest, booleans(cmd), optional_values(cmd))?;
    match cmd {
        "info" => info::run(&args),
        "plan" => plan::run(&args),
        "decode" => decode::run(&args),
        "demo" => demo::run(&args),
        "bench" => bench::run(&args),
        other => Err(cli_err!("unknown command `{other}` (try `flashmla help`)")),
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    if matches!(cmd.as_str(), "help" | "--help" | "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match dispatch(cmd, &argv[1..]) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flashmla {cmd}: error: {e}");
            ExitCode::from(2)
        }
    }
}
