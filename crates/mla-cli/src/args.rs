//! A small command-line parser: `--name value`, `--name=value` and boolean `--flag`.
//!
//! Every error is one line naming the argument; nothing panics. Flags that were given but never read by the
//! command are reported by [`Args::finish`], so a typo is an error rather than silently ignored.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// A command-line error: printed as one line, exit status 2.
#[derive(Debug)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<mla_core::Error> for CliError {
    fn from(e: mla_core::Error) -> Self {
        CliError(e.to_string())
    }
}

/// Shorthand for a failed command.
pub type CliResult<T = ()> = Result<T, CliError>;

/// Builds a [`CliError`] from format arguments.
#[macro_export]
macro_rules! cli_err {
    ($($t:tt)*) => { $crate::args::CliError(format!($($t)*)) };
}

/// Parsed `--name [value]` pairs of one subcommand.
#[derive(Debug)]
pub struct Args {
    pairs: Vec<(String, Option<String>)>,
    used: RefCell<BTreeSet<String>>,
}

impl Args {
    /// Parses the arguments after the subcommand name. `booleans` lists the flags that take no value; those in
    /// `optional` take a value only when the next argument is not an option (`--varlen`, `--varlen fixed,varlen`).
    pub fn parse(raw: &[String], booleans: &[&str], optional: &[&str]) -> CliResult<Args> {
        let mut pairs = Vec::new();
        let mut it = raw.iter().peekable();
        while let Some(a) = it.next() {
            let Some(body) = a.strip_prefix("--") else {
                return Err(cli_err!("unexpected argument `{a}` (options start with --)"));
            };
            if let Some((k, v)) = body.split_once('=') {
                pairs.push((k.to_string(), Some(v.to_string())));
            } else if optional.contains(&body) {
                let v = it.next_if(|next| !next.starts_with("--")).cloned();
                pairs.push((body.to_string(), v));
            } else if booleans.contains(&body) {
                pairs.push((body.to_string(), None));
            } else {
                let v = it.next().ok_or_else(|| cli_err!("--{body} needs a value"))?;
                pairs.push((body.to_string(), Some(v.clone())));
            }
        }
        Ok(Args { pairs, used: RefCell::new(BTreeSet::new()) })
    }

    /// The value of `--name`, if given (the last one wins).
    pub fn value(&self, name: &str) -> Option<&str> {
        self.used.borrow_mut().insert(name.to_string());
        self.pairs.iter().rev().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref())
    }

    /// Whether boolean `--name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.used.borrow_mut().insert(name.to_string());
        self.pairs.iter().any(|(k, _)| k == name)
    }

    /// The value of `--name`, which must be present.
    pub fn required(&self, name: &str) -> CliResult<&str> {
        self.value(name).ok_or_else(|| cli_err!("--{name} is required"))
    }

    /// `--name` parsed as `T`, if present.
    pub fn parsed<T: FromStr>(&self, name: &str) -> CliResult<Option<T>> {
        match self.value(name) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| cli_err!("--{name}: expected {}, got `{v}`", std::any::type_name::<T>())),
        }
    }

    /// `--name` parsed as `T`, or `default`.
    pub fn parsed_or<T: FromStr>(&self, name: &str, default: T) -> CliResult<T> {
        Ok(self.parsed(name)?.unwrap_or(default))
    }

    /// `--name` as a comma-separated list of `T`.
    pub fn list<T: FromStr>(&self, name: &str) -> CliResult<Option<Vec<T>>> {
        let Some(v) = self.value(name) else { return Ok(None) };
        v.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim().parse().map_err(|_| cli_err!("--{name}: `{s}` is not a valid {}", std::any::type_name::<T>()))
            })
            .collect::<CliResult<Vec<T>>>()
            .map(Some)
    }

    /// `--dtype` as an input dtype (`bf16`, `fp16`, `e4m3`), or `bf16` when absent.
    pub fn dtype(&self) -> CliResult<mla_core::DType> {
        let v = self.value("dtype").unwrap_or("bf16");
        mla_core::DType::parse(v).ok_or_else(|| cli_err!("--dtype: expected bf16, fp16 or e4m3, got `{v}`"))
    }

    /// Fails on any option the command never looked at.
    pub fn finish(&self) -> CliResult {
        let used = self.used.borrow();
        match self.pairs.iter().find(|(k, _)| !used.contains(k)) {
            Some((k, _)) => Err(cli_err!("unknown option --{k}")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str], b: &[&str]) -> CliResult<Args> {
        Args::parse(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>(), b, &[])
    }

    #[test]
    fn parses_values_flags_and_lists() {
        let a = args(&["--h-q", "128", "--json", "--seqlens=1,2,3"], &["json"]).unwrap();
        assert_eq!(a.parsed::<usize>("h-q").unwrap(), Some(128));
        assert!(a.flag("json"));
        assert_eq!(a.list::<i32>("seqlens").unwrap(), Some(vec![1, 2, 3]));
        a.finish().unwrap();
    }

    #[test]
    fn errors_name_the_argument() {
        let a = args(&["--h-q", "x"], &[]).unwrap();
        assert!(a.parsed::<usize>("h-q").unwrap_err().0.contains("--h-q"));
        let a = args(&["--typo", "1"], &[]).unwrap();
        assert!(a.finish().unwrap_err().0.contains("--typo"));
        assert!(args(&["--h-q"], &[]).unwrap_err().0.contains("--h-q needs a value"));
        assert!(args(&["plain"], &[]).is_err());
    }

    #[test]
    fn optional_values() {
        let raw = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let a = Args::parse(&raw(&["--varlen", "fixed", "--x", "1"]), &[], &["varlen"]).unwrap();
        assert_eq!(a.value("varlen"), Some("fixed"));
        assert_eq!(a.value("x"), Some("1"));
        let a = Args::parse(&raw(&["--varlen", "--x", "1"]), &[], &["varlen"]).unwrap();
        assert!(a.flag("varlen") && a.value("varlen").is_none());
        let a = Args::parse(&raw(&["--varlen"]), &[], &["varlen"]).unwrap();
        assert!(a.flag("varlen") && a.value("varlen").is_none());
    }
}
