//! What both benchmarks (`bench` on the CPU, [`crate::bench_hopper`] on the GPU) print and save alike: text tables
//! whose header and rows are padded from one list of columns, optional figures shown as `-`, and the `--json` file
//! with its figures rounded.

use std::fmt::Display;
use std::path::Path;

use serde::Serialize;

use crate::args::CliResult;
use crate::cli_err;

/// How a column pads its cells to its width.
#[derive(Clone, Copy, Debug)]
enum Align {
    Left,
    Right,
}

/// One column of a text table: its header and width.
#[derive(Clone, Copy, Debug)]
pub struct Col {
    name: &'static str,
    width: usize,
    align: Align,
}

impl Col {
    /// A column whose cells are padded on the right (names, labels).
    pub const fn left(name: &'static str, width: usize) -> Col {
        Col { name, width, align: Align::Left }
    }

    /// A column whose cells are padded on the left (figures).
    pub const fn right(name: &'static str, width: usize) -> Col {
        Col { name, width, align: Align::Right }
    }

    fn pad(&self, cell: &dyn Display) -> String {
        match self.align {
            Align::Left => format!("{cell:<w$}", w = self.width),
            Align::Right => format!("{cell:>w$}", w = self.width),
        }
    }
}

/// A text table: columns separated by one space, the header and every row padded from the same widths (so the two
/// cannot drift apart).
#[derive(Clone, Copy, Debug)]
pub struct Table(pub &'static [Col]);

impl Table {
    /// The column names.
    pub fn header(&self) -> String {
        self.line(self.0.iter().map(|c| &c.name as &dyn Display))
    }

    /// One row, a cell per column. Figures come formatted to their precision (`format!("{:.3}", x)`, [`or_dash`]);
    /// integers and names as they are.
    pub fn row(&self, cells: &[&dyn Display]) -> String {
        debug_assert_eq!(cells.len(), self.0.len(), "one cell per column");
        self.line(cells.iter().copied())
    }

    fn line<'c>(&self, cells: impl Iterator<Item = &'c dyn Display>) -> String {
        self.0.iter().zip(cells).map(|(col, cell)| col.pad(cell)).collect::<Vec<_>>().join(" ")
    }
}

/// `x` with `digits` decimals (a float; an integer prints whole), or `-` where there is no figure.
pub fn or_dash(x: Option<impl Display>, digits: usize) -> String {
    x.map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// `x` rounded to `digits` decimals (the figures are measurements: more digits are noise in the file).
pub fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// `x` as a percentage of `of` (one decimal), where there is an `of`.
pub fn pct(x: f64, of: Option<f64>) -> Option<f64> {
    of.map(|o| round(100.0 * x / o, 1))
}

/// Writes `value` as pretty-printed JSON (the `--json` file).
pub fn save_json(path: &Path, value: &impl Serialize) -> CliResult {
    let text = serde_json::to_string_pretty(value).map_err(|e| cli_err!("--json {}: {e}", path.display()))?;
    std::fs::write(path, text + "\n").map_err(|e| cli_err!("--json {}: cannot write: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Table = Table(&[Col::left("dtype", 5), Col::right("Σs_k", 6), Col::right("ms", 7)]);

    #[test]
    fn header_and_rows_share_the_widths() {
        assert_eq!(T.header(), "dtype   Σs_k      ms");
        assert_eq!(T.row(&[&"bf16", &4096, &format!("{:.3}", 0.2291)]), "bf16    4096   0.229");
        assert_eq!(T.row(&[&"e4m3", &12, &or_dash(None::<f64>, 3)]), "e4m3      12       -");
        // A cell wider than its column is not cut.
        assert_eq!(T.row(&[&"bf16", &12345678, &"x"]), "bf16  12345678       x");
    }

    #[test]
    fn figures_round_and_percentages_need_a_ceiling() {
        assert_eq!(round(2.3456, 2), 2.35);
        assert_eq!(pct(1500.0, Some(3000.0)), Some(50.0));
        assert_eq!(pct(1.0, None), None);
        assert_eq!(or_dash(Some(0.12345), 3), "0.123");
        assert_eq!(or_dash(Some(4096), 0), "4096");
        assert_eq!(or_dash(None::<usize>, 0), "-");
    }
}
