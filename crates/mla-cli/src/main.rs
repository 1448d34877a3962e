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
//! `flashmla <command> --help` describes each command's options. Errors are one line on stderr and exit status 2;
//! nothing panics on bad input.

#[cfg(feature = "cuda")]
mod anchors;
mod args;
mod bench;
#[cfg(feature = "cuda")]
mod bench_hopper;
mod check;
mod decode;
mod decode_fp8;
mod demo;
mod exec;
#[cfg(feature = "cuda")]
mod exec_cuda;
mod info;
mod npy;
mod plan;
mod plot;
mod progress;
mod report;
mod sparse;

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

use args::{COMMANDS, Cli, Command};

/// Exit status of a failed command or a bad command line (clap's convention too).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with status 0; a bare `flashmla` prints the help to stderr, status 2.
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::from(e.exit_code() as u8);
            }
            let cmd = std::env::args().nth(1).filter(|c| COMMANDS.contains(&c.as_str()));
            let prefix = cmd.map_or("flashmla".to_string(), |c| format!("flashmla {c}"));
            eprintln!("{prefix}: error: {}", args::one_line(&e));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let name = cli.command.name();
    let result = match cli.command {
        Command::Info(a) => info::run(&a),
        Command::Plan(a) => plan::run(&a),
        Command::Decode(a) => decode::run(&a),
        Command::Demo(a) => demo::run(&a),
        Command::Bench(a) => bench::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flashmla {name}: error: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}
