//! The command line, declared with clap's derive API: one struct per subcommand, help for each
//! (`flashmla <command> --help`), `-V/--version`, suggestions for misspelt commands and options.
//!
//! Errors stay one line on stderr, naming the argument ([`one_line`] condenses clap's multi-line reports), with
//! exit status 2. Checks that span several options (exclusive pairs with custom wording, options that apply to one
//! backend only) are made by each command, with the same one-line errors.

use std::path::PathBuf;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, Parser, Subcommand};
use mla_core::DType;

/// Every failure of a command: printed as one line, exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A bad argument or input file, said in one line naming it.
    #[error("{0}")]
    Message(String),
    /// A rejected call of the library (its messages name the argument, the expected and the actual value).
    #[error(transparent)]
    Core(#[from] mla_core::Error),
}

/// Shorthand for a failed command.
pub type CliResult<T = ()> = Result<T, CliError>;

/// Builds a [`CliError::Message`] from format arguments.
#[macro_export]
macro_rules! cli_err {
    ($($t:tt)*) => { $crate::args::CliError::Message(format!($($t)*)) };
}

/// SM count used when `--num-sms` is not given: an H100 SXM.
pub const DEFAULT_NUM_SMS: usize = 132;

/// `flashmla`: multi-head latent attention (MLA) decoding, from the command line.
#[derive(Debug, Parser)]
#[command(name = "flashmla", version, propagate_version = true, arg_required_else_help = true)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Backends usable on this machine, and why the others are not.
    Info(InfoArgs),
    /// The split-KV scheduler's metadata for given sequence lengths.
    Plan(PlanArgs),
    /// One decode step, `.npy` files in and out.
    Decode(DecodeArgs),
    /// A random engine-like decode step on the best backend: timed, and checked against the CPU reference.
    Demo(DemoArgs),
    /// Upstream's benchmark grid with this machine's measured ceilings (`--backend hopper`: upstream's GPU benchmark).
    Bench(Box<BenchArgs>),
}

impl Command {
    /// The subcommand's name, as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Info(_) => "info",
            Command::Plan(_) => "plan",
            Command::Decode(_) => "decode",
            Command::Demo(_) => "demo",
            Command::Bench(_) => "bench",
        }
    }
}

/// Every subcommand name (the error prefix names the subcommand when the command line starts with one).
pub const COMMANDS: [&str; 5] = ["info", "plan", "decode", "demo", "bench"];

/// `--dtype` values: bf16, fp16 or e4m3 (and their NumPy/PyTorch spellings).
fn dtype_arg(s: &str) -> Result<DType, String> {
    DType::parse(s).ok_or_else(|| "expected bf16, fp16 or e4m3".to_string())
}

/// `--backend` values.
const BACKENDS: [&str; 3] = flashmla::BACKEND_NAMES;

/// `flashmla info`.
#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct InfoArgs {
    /// CUDA device ordinal for GPU backends.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub device: i32,
}

/// `flashmla plan`.
#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct PlanArgs {
    /// Cache lengths of the batch, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "L,L,...", allow_negative_numbers = true)]
    pub seqlens: Option<Vec<i32>>,
    /// Cache lengths from a 1-D int32 or int64 `.npy` file (instead of --seqlens).
    #[arg(long, value_name = "F.npy")]
    pub seqlens_file: Option<PathBuf>,
    /// Query tokens per request (MTP).
    #[arg(long, default_value_t = 1)]
    pub s_q: usize,
    /// Query heads.
    #[arg(long, default_value_t = 128)]
    pub h_q: usize,
    /// KV heads (must divide --h-q).
    #[arg(long, default_value_t = 1)]
    pub h_kv: usize,
    /// SM count of the device the plan is for.
    #[arg(long, default_value_t = DEFAULT_NUM_SMS)]
    pub num_sms: usize,
    /// Print the metadata as one line of JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `flashmla decode`.
#[derive(Debug, Args)]
#[command(
    args_override_self = true,
    after_help = "Inputs q and kv-cache: float32, float16 or float64 arrays (rounded to --dtype), or raw elements \
                  already in --dtype (2-byte '<V2'/'<u2' for bf16 and fp16, e.g. ml_dtypes.bfloat16 arrays; \
                  1-byte '|V1'/'|u1' e4m3 codes, e.g. ml_dtypes.float8_e4m3fn). Block table and lengths: int32 or \
                  int64. Outputs: float32 out [b, s_q, h_q, 512] and lse [b, h_q, s_q].\n\n\
                  FP8 cache (--fp8-cache, docs/sparse-fp8.md): --kv-cache holds the cache's bytes, uint8 (or '|V1') \
                  [num_blocks, page_size, 1, 656 | 584]; its last dimension names the layout (656: V3.2, q \
                  [b, s_q, h_q, 576]; 584: MODEL1, q [b, s_q, h_q, 512]); q is bf16 (floats rounded, or raw 2-byte \
                  bf16). With --indices int32/int64 [b, s_q, topk] the decode is sparse (no --block-table, \
                  --seqlens or --causal; optional --topk-length [b], --attn-sink float32 [h_q], and an extra cache: \
                  --extra-k-cache with --extra-indices [b, s_q, extra_topk] and optional --extra-topk-length [b]); \
                  without, it is dense over --block-table and --seqlens (V3.2 only). Entries of an index file outside \
                  the cache (-1 above all) are skipped; every value must fit in int32. Outputs as above (out: the \
                  bf16 values, widened)."
)]
pub struct DecodeArgs {
    /// Queries `[b, s_q, h_q, 576]` (512 over a MODEL1 FP8 cache).
    #[arg(long, value_name = "Q.npy")]
    pub q: PathBuf,
    /// Paged KV cache `[num_blocks, page_size, h_kv, 576]`.
    #[arg(long, value_name = "KV.npy")]
    pub kv_cache: PathBuf,
    /// Page ids of each request `[b, max_blocks_per_seq]` (not with --indices).
    #[arg(long, value_name = "BT.npy", required_unless_present = "indices")]
    pub block_table: Option<PathBuf>,
    /// Cache length of each request `[b]` (not with --indices).
    #[arg(long, value_name = "SL.npy", required_unless_present = "indices")]
    pub seqlens: Option<PathBuf>,
    /// Where to write the attention output.
    #[arg(long, value_name = "OUT.npy")]
    pub out: PathBuf,
    /// Where to write the log-sum-exp.
    #[arg(long, value_name = "LSE.npy")]
    pub lse: PathBuf,
    /// Backend to run on.
    #[arg(long, default_value = "auto", value_parser = BACKENDS)]
    pub backend: String,
    /// CUDA device ordinal for GPU backends.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub device: i32,
    /// Element type of q and the KV cache [default: bf16; with --fp8-cache only bf16].
    #[arg(long, value_parser = dtype_arg)]
    pub dtype: Option<DType>,
    /// Causal mask over the s_q query tokens (not with --indices).
    #[arg(long)]
    pub causal: bool,
    /// Softmax scale (default 1/sqrt(d_qk): 1/sqrt(576), or 1/sqrt(512) over a MODEL1 FP8 cache).
    #[arg(long, value_name = "X")]
    pub softmax_scale: Option<f32>,
    /// Per-tensor descale of q (e4m3 only): stored codes are e4m3(x / X).
    #[arg(long, value_name = "X")]
    pub descale_q: Option<f32>,
    /// Per-tensor descale of the KV cache (e4m3 only).
    #[arg(long, value_name = "X")]
    pub descale_k: Option<f32>,
    /// --kv-cache is an FP8 cache: uint8 `[num_blocks, page_size, 1, 656 | 584]`, the layout named by the last
    /// dimension (656: V3.2, 584: MODEL1); q is bf16 `[b, s_q, h_q, 576 | 512]`.
    #[arg(long)]
    pub fp8_cache: bool,
    /// Sparse decode (needs --fp8-cache): top-k token indices `[b, s_q, topk]`, int32 or int64, each
    /// `page · page_size + offset`; entries outside the cache are skipped.
    #[arg(long, value_name = "IDX.npy")]
    pub indices: Option<PathBuf>,
    /// Entries of --indices that count, per request `[b]` (default: all topk).
    #[arg(long, value_name = "TL.npy")]
    pub topk_length: Option<PathBuf>,
    /// Attention sink per query head `[h_q]`, float32 (sparse only).
    #[arg(long, value_name = "SINK.npy")]
    pub attn_sink: Option<PathBuf>,
    /// A second FP8 cache attended in addition (sparse only; same layout, own page size).
    #[arg(long, value_name = "KV2.npy")]
    pub extra_k_cache: Option<PathBuf>,
    /// Indices into --extra-k-cache `[b, s_q, extra_topk]` (required with it).
    #[arg(long, value_name = "IDX2.npy")]
    pub extra_indices: Option<PathBuf>,
    /// Entries of --extra-indices that count, per request `[b]`.
    #[arg(long, value_name = "TL2.npy")]
    pub extra_topk_length: Option<PathBuf>,
}

/// `flashmla demo`.
#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct DemoArgs {
    /// Backend to run on (auto: hopper if it opens, else cpu).
    #[arg(long, default_value = "auto", value_parser = BACKENDS)]
    pub backend: String,
    /// CUDA device ordinal for GPU backends.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub device: i32,
    /// Element type of q and the KV cache [default: bf16; --mode sparse: bf16 only].
    #[arg(long, value_parser = dtype_arg)]
    pub dtype: Option<DType>,
    /// dense: the paged decode over a bf16/fp16/e4m3 cache; sparse: top-k selections over an FP8 cache
    /// (docs/sparse-fp8.md), with `topk_length`, `attn_sink`, invalid and duplicate indices.
    #[arg(long, default_value = "dense", value_parser = ["dense", "sparse"])]
    pub mode: String,
    /// FP8 cache layout (--mode sparse): v32 (656 bytes per token, d_qk 576) or model1 (584, d_qk 512).
    #[arg(long, default_value = "v32", value_parser = ["v32", "model1"])]
    pub layout: String,
    /// Selected tokens per query token (--mode sparse).
    #[arg(long, default_value_t = 2048)]
    pub topk: usize,
    /// Selected tokens of an extra cache per query token (--mode sparse; 0: no extra cache).
    #[arg(long, default_value_t = 0)]
    pub extra_topk: usize,
    /// Requests in the batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Mean cache length.
    #[arg(long, default_value_t = 2048)]
    pub seqlen: usize,
    /// Query tokens per request.
    #[arg(long, default_value_t = 2)]
    pub s_q: usize,
    /// Query heads.
    #[arg(long, default_value_t = 16)]
    pub h_q: usize,
    /// KV heads (must divide --h-q).
    #[arg(long, default_value_t = 1)]
    pub h_kv: usize,
    /// Tokens per KV page.
    #[arg(long, default_value_t = 64)]
    pub page_size: usize,
    /// Every request has exactly --seqlen tokens (default: random lengths around it).
    #[arg(long)]
    pub fixed_len: bool,
    /// No causal mask.
    #[arg(long)]
    pub no_causal: bool,
    /// Timed calls.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Seed of the random problem.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Rows checked against float64 from the definition.
    #[arg(long, default_value_t = 24)]
    pub check_rows: usize,
    /// Also write the inputs and outputs as `.npy` files to DIR, with the `decode` command that reproduces them.
    #[arg(long, value_name = "DIR")]
    pub save: Option<PathBuf>,
}

/// `flashmla bench`: one set of options for both benchmarks; each rejects the other's.
#[derive(Debug, Args)]
#[command(
    args_override_self = true,
    after_help = "CPU grid (--backend cpu, the default): time, GB/s and GFLOP/s next to the measured copy \
                  bandwidth and FMA peak; --grid sparse: top-k decodes over FP8 caches, bytes = the selected \
                  token rows read + q + out, the Σs_k column counts the selected rows. --backend hopper: upstream's GPU benchmark (whole decode call timed with \
                  CUDA events, median, input sets rotated past L2) against upstream's figures on the same kind of \
                  device (H100 or H200). Progress ([k/N], elapsed, remaining) goes to stderr; tables to stdout."
)]
pub struct BenchArgs {
    /// Backend to benchmark (auto: hopper if it opens, else cpu).
    #[arg(long, default_value = "cpu", value_parser = BACKENDS)]
    pub backend: String,
    /// CUDA device ordinal (hopper).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub device: i32,
    /// Worker threads (cpu).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Configurations: cpu all|upstream|mem|sparse (default all: upstream and mem; sparse: top-k decodes over
    /// FP8 caches, h_q 64,128, topk 2048, V3.2 and MODEL1); hopper upstream|small (default upstream).
    #[arg(long, value_parser = ["all", "upstream", "mem", "sparse", "small"])]
    pub grid: Option<String>,
    /// Selected tokens per query token (cpu, --grid sparse; default 2048).
    #[arg(long, value_name = "K")]
    pub topk: Option<usize>,
    /// FP8 cache layouts, comma-separated (cpu, --grid sparse; default v32,model1).
    #[arg(long, value_delimiter = ',', value_parser = ["v32", "model1"], value_name = "v32,model1")]
    pub layout: Option<Vec<String>>,
    /// Element types, comma-separated (alias --dtypes).
    #[arg(long, value_delimiter = ',', value_parser = dtype_arg, value_name = "bf16,fp16,e4m3")]
    pub dtype: Option<Vec<DType>>,
    /// Alias of --dtype (the former hopper-bench example's name).
    #[arg(long, value_delimiter = ',', value_parser = dtype_arg, hide = true)]
    pub dtypes: Option<Vec<DType>>,
    /// Query heads, comma-separated (default 16,32,64,128; alias --hq).
    #[arg(long, value_delimiter = ',', value_name = "H,...")]
    pub h_q: Option<Vec<usize>>,
    /// Alias of --h-q.
    #[arg(long, value_delimiter = ',', hide = true)]
    pub hq: Option<Vec<usize>>,
    /// Query tokens per request, comma-separated (default 1,2; alias --sq).
    #[arg(long, value_delimiter = ',', value_name = "S,...")]
    pub s_q: Option<Vec<usize>>,
    /// Alias of --s-q.
    #[arg(long, value_delimiter = ',', hide = true)]
    pub sq: Option<Vec<usize>>,
    /// Requests per batch (cpu default 16, hopper 128).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Cache length: cpu one mean length; hopper a list, like --sk.
    #[arg(long, value_delimiter = ',', value_name = "N")]
    pub seqlen: Option<Vec<usize>>,
    /// Cache lengths, comma-separated (hopper; default 4096,8192,16384).
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub sk: Option<Vec<usize>>,
    /// Random lengths around the mean; hopper also takes a list of fixed,varlen.
    #[arg(long, num_args = 0..=1, value_name = "fixed,varlen")]
    pub varlen: Option<Option<String>>,
    /// No causal mask (default: causal, as upstream ran each dtype).
    #[arg(long)]
    pub no_causal: bool,
    /// Timed calls per configuration (cpu: at least; default cpu 3, hopper 30).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Least seconds of timed calls per configuration (cpu; default 0.3).
    #[arg(long, value_name = "SECONDS")]
    pub min_time: Option<f64>,
    /// Input sets the launches rotate through, so no launch finds its cache in L2 (hopper; default 2).
    #[arg(long)]
    pub sets: Option<usize>,
    /// Seed of the random inputs.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Wait for every launch instead of queueing them back to back (hopper).
    #[arg(long)]
    pub sync_each: bool,
    /// Write every row, with the ceilings, as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Skip measuring the ceilings.
    #[arg(long)]
    pub no_ceilings: bool,
    /// List the configurations (hopper: and their anchors) without running them.
    #[arg(long)]
    pub dry_run: bool,
    /// Upstream figures to compare with: h100 or h200 (hopper; default: the device's own, h100 for --dry-run).
    #[arg(long, value_parser = ["h100", "h200"])]
    pub anchors: Option<String>,
    /// Draw the results as a roofline: achieved throughput per configuration against the ceilings and
    /// upstream's figures (`.svg` or `.png`).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Plot a run saved with --json instead of running one (needs --plot).
    #[arg(long, value_name = "FILE.json")]
    pub from_json: Option<PathBuf>,
}

/// The text of a clap context value.
fn context_text(v: Option<&ContextValue>) -> Option<String> {
    match v? {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(v) => Some(v.join(", ")),
        ContextValue::StyledStr(s) => Some(s.to_string()),
        _ => None,
    }
}

/// `--name <VALUE>` → `--name`.
fn arg_name(s: &str) -> String {
    s.split([' ', '=']).next().unwrap_or(s).to_string()
}

/// Condenses a clap error into one line naming the argument (clap's own report spans several lines: usage and a
/// tip). Suggestions for misspelt options, commands and values are kept, as `(did you mean …?)`.
pub fn one_line(e: &clap::Error) -> String {
    let get = |k| context_text(e.get(k));
    let arg = get(ContextKind::InvalidArg).map(|a| arg_name(&a)).unwrap_or_default();
    let value = get(ContextKind::InvalidValue).unwrap_or_default();
    let did_you_mean = |k| get(k).map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default();
    match e.kind() {
        ErrorKind::UnknownArgument if arg.starts_with('-') => {
            format!("unknown option {arg}{}", did_you_mean(ContextKind::SuggestedArg))
        }
        ErrorKind::UnknownArgument => format!("unexpected argument `{arg}` (options start with --)"),
        ErrorKind::InvalidSubcommand => {
            let cmd = get(ContextKind::InvalidSubcommand).unwrap_or_default();
            format!(
                "unknown command `{cmd}`{}; commands: {}",
                did_you_mean(ContextKind::SuggestedSubcommand),
                COMMANDS.join(", ")
            )
        }
        ErrorKind::InvalidValue if value.is_empty() => format!("{arg} needs a value"),
        ErrorKind::InvalidValue => format!(
            "{arg}: expected one of {}, got `{value}`{}",
            get(ContextKind::ValidValue).unwrap_or_default(),
            did_you_mean(ContextKind::SuggestedValue)
        ),
        ErrorKind::ValueValidation => {
            let why = std::error::Error::source(e).map(|s| format!(": {s}")).unwrap_or_default();
            format!("{arg}: invalid value `{value}`{why}")
        }
        ErrorKind::MissingRequiredArgument => {
            let missing: Vec<String> = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::Strings(v)) => v.iter().map(|a| arg_name(a)).collect(),
                _ => vec![arg],
            };
            match missing.as_slice() {
                [one] => format!("{one} is required"),
                many => format!("{} are required", many.join(", ")),
            }
        }
        ErrorKind::ArgumentConflict => {
            let prior = get(ContextKind::PriorArg).map(|a| arg_name(&a)).unwrap_or_default();
            format!("{arg} and {prior} are exclusive; give one")
        }
        _ => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("").trim();
            first.strip_prefix("error: ").unwrap_or(first).to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("flashmla").chain(s.iter().copied())).map_err(|e| one_line(&e))
    }

    #[test]
    fn the_declaration_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let names: Vec<String> = Cli::command().get_subcommands().map(|c| c.get_name().to_string()).collect();
        assert_eq!(names, COMMANDS);
    }

    #[test]
    fn parses_values_flags_and_lists() {
        let Command::Plan(p) = parse(&["plan", "--h-q", "64", "--json", "--seqlens=1,2,3"]).unwrap().command else {
            panic!("plan")
        };
        assert_eq!((p.h_q, p.json, p.seqlens), (64, true, Some(vec![1, 2, 3])));
        // The last of a repeated option wins, as before clap.
        let Command::Plan(p) = parse(&["plan", "--h-q", "64", "--h-q", "16"]).unwrap().command else { panic!() };
        assert_eq!(p.h_q, 16);
        let Command::Bench(b) = parse(&["bench", "--varlen", "fixed", "--sk", "1"]).unwrap().command else { panic!() };
        assert_eq!((b.varlen, b.sk), (Some(Some("fixed".into())), Some(vec![1])));
        let Command::Bench(b) = parse(&["bench", "--varlen", "--sk", "1"]).unwrap().command else { panic!() };
        assert_eq!(b.varlen, Some(None));
    }

    #[test]
    fn parses_the_fp8_options() {
        let Command::Decode(d) = parse(&[
            "decode",
            "--fp8-cache",
            "--q",
            "q",
            "--kv-cache",
            "k",
            "--indices",
            "i",
            "--out",
            "o",
            "--lse",
            "l",
        ])
        .unwrap()
        .command
        else {
            panic!("decode")
        };
        // --indices stands in for the dense inputs.
        assert!(d.fp8_cache && d.indices.is_some() && d.block_table.is_none() && d.seqlens.is_none());
        assert_eq!(d.dtype, None);
        let Command::Demo(d) = parse(&["demo", "--mode", "sparse", "--layout", "model1"]).unwrap().command else {
            panic!("demo")
        };
        assert_eq!((d.mode.as_str(), d.layout.as_str(), d.topk, d.extra_topk), ("sparse", "model1", 2048, 0));
        let Command::Bench(b) = parse(&["bench", "--grid", "sparse", "--layout", "v32,model1"]).unwrap().command else {
            panic!("bench")
        };
        assert_eq!(b.layout, Some(vec!["v32".to_string(), "model1".to_string()]));
        assert!(parse(&["demo", "--mode", "fp8"]).unwrap_err().starts_with("--mode: expected one of dense, sparse"));
    }

    #[test]
    fn errors_are_one_line_and_name_the_argument() {
        let err = |s: &[&str]| parse(s).unwrap_err();
        assert_eq!(err(&["plan", "--h-q", "x"]), "--h-q: invalid value `x`: invalid digit found in string");
        assert_eq!(err(&["plan", "--h-q"]), "--h-q needs a value");
        assert_eq!(err(&["plan", "--typo", "1"]), "unknown option --typo");
        assert_eq!(err(&["plan", "--jsn"]), "unknown option --jsn (did you mean `--json`?)");
        assert!(err(&["plna"]).starts_with("unknown command `plna` (did you mean `plan`?)"));
        assert_eq!(err(&["plan", "plain"]), "unexpected argument `plain` (options start with --)");
        assert_eq!(err(&["decode", "--dtype", "int8"]), "--dtype: invalid value `int8`: expected bf16, fp16 or e4m3");
        assert!(
            err(&["demo", "--backend", "tpu"]).starts_with("--backend: expected one of auto, cpu, hopper, got `tpu`")
        );
        assert_eq!(err(&["decode", "--q", "q.npy"]), "--kv-cache, --out, --lse, --block-table, --seqlens are required");
        for e in [err(&["plan", "--h-q", "x"]), err(&["plan", "--jsn"]), err(&["decode"])] {
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }
}
