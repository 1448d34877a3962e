//! `flashmla`: the command-line face of flashmla-rs.
//!
//! | command | what it does |
//! |---|---|
//! | `info` | which backends run here, and why the others do not |
//! | `plan` | the split-KV scheduler's output for given lengths |
//!
//! Errors are one line on stderr and exit status 2; nothing panics on bad input.

mod args;
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
";

/// Boolean options, by command.
fn booleans(cmd: &str) -> &'static [&'static str] {
    match cmd {
        "plan" => &["json"],
        _ => &[],
    }
}

fn dispatch(cmd: &str, rest: &[String]) -> CliResult {
    let args = Args::parse(rest, booleans(cmd))?;
    match cmd {
        "info" => info::run(&args),
        "plan" => plan::run(&args),
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
