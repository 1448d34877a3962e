//! `flashmla bench --plot FILE`: the results as a roofline, SVG or PNG (plotters).
//!
//! x: arithmetic intensity (FLOP per byte, upstream's formulas), y: achieved FLOP/s, both logarithmic. The
//! memory ceiling is the diagonal `y = copy bandwidth · x` (so a point's GB/s is read off its distance below it),
//! the compute ceiling (when measured: the CPU's FMA peak) the horizontal line; where they meet is the ridge.
//! One colour per dtype: filled dots are this run, hollow rings at the same intensity upstream's figures (anchors).
//!
//! Text is drawn with DejaVu Sans embedded in the binary (the `dejavu` crate), so a PNG renders the same on a
//! machine without fonts.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Deserialize;

use crate::args::CliResult;
use crate::cli_err;

/// Size of the picture, pixels.
const SIZE: (u32, u32) = (1200, 800);
/// Margin of the axes beyond the data, as a factor on each logarithmic axis.
const AXIS_MARGIN: f64 = 1.6;
/// Radius of a marker, pixels.
const MARKER: i32 = 5;
/// Colours of bf16, fp16, e4m3 (and any other dtype after them).
const PALETTE: [RGBColor; 4] =
    [RGBColor(31, 119, 180), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189)];
/// Labels per axis, at most (plotters picks round values; more crowd a logarithmic decade).
const AXIS_LABELS: usize = 8;
/// The font family name registered for plotters.
const FONT: &str = "sans-serif";
/// GFLOP/s above which the y axis is labelled in TFLOP/s.
const TERA_FROM_GIGA: f64 = 1000.0;

/// One configuration: achieved throughput, and upstream's on the same configuration where it measured one.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// `bf16`, `fp16`, `e4m3`.
    pub dtype: String,
    /// Achieved GFLOP/s.
    pub gflops: f64,
    /// Achieved GB/s.
    pub gbs: f64,
    /// Upstream's GFLOP/s on this configuration.
    pub anchor_gflops: Option<f64>,
}

/// What a plot shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Plot {
    /// First line of the title (backend and device).
    pub title: String,
    /// Measured copy bandwidth, GB/s (the memory ceiling).
    pub copy_gbs: Option<f64>,
    /// Measured compute peak, GFLOP/s.
    pub peak_gflops: Option<f64>,
    /// Legend name of the hollow rings (`upstream FlashMLA, H200`).
    pub anchor_label: String,
    /// Every configuration.
    pub points: Vec<Point>,
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded DejaVu Sans is a valid TrueType font; a failure here is a build of a broken `dejavu` crate.
        if plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_err() {
            panic!("the embedded DejaVu Sans font is invalid");
        }
    });
}

/// Draws `plot` to `path` (`.svg` or `.png`).
pub fn draw(plot: &Plot, path: &Path) -> CliResult {
    if plot.points.iter().all(|p| !(p.gflops > 0.0 && p.gbs > 0.0)) {
        return Err(cli_err!("--plot {}: no results to draw", path.display()));
    }
    register_font();
    let fail = |e: String| cli_err!("--plot {}: {e}", path.display());
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("svg") => {
            let root = SVGBackend::new(path, SIZE).into_drawing_area();
            render(plot, &root).map_err(fail)?;
            root.present().map_err(|e| fail(e.to_string()))
        }
        Some("png") => {
            let root = BitMapBackend::new(path, SIZE).into_drawing_area();
            render(plot, &root).map_err(fail)?;
            root.present().map_err(|e| fail(e.to_string()))
        }
        other => Err(cli_err!("--plot {}: expected a .svg or .png file name, got extension {other:?}", path.display())),
    }
}

/// A tick label: whole numbers from 10 up, two significant digits below.
fn tick(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn colour(dtypes: &[String], dtype: &str) -> RGBColor {
    PALETTE[dtypes.iter().position(|d| d == dtype).unwrap_or(0).min(PALETTE.len() - 1)]
}

fn render<DB: DrawingBackend>(plot: &Plot, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let pts: Vec<&Point> = plot.points.iter().filter(|p| p.gflops > 0.0 && p.gbs > 0.0).collect();
    let intensity = |p: &Point| p.gflops / p.gbs;
    let ys = pts.iter().flat_map(|p| [Some(p.gflops), p.anchor_gflops]).flatten();
    let (mut x0, mut x1) =
        pts.iter().map(|p| intensity(p)).fold((f64::INFINITY, 0f64), |(a, b), x| (a.min(x), b.max(x)));
    let (y0, mut y1) = ys.fold((f64::INFINITY, 0f64), |(a, b), y| (a.min(y), b.max(y)));
    if let Some(peak) = plot.peak_gflops {
        y1 = y1.max(peak);
        if let Some(bw) = plot.copy_gbs {
            let ridge = peak / bw;
            (x0, x1) = (x0.min(ridge), x1.max(ridge));
        }
    }
    let (x0, x1, mut y0, y1) = (x0 / AXIS_MARGIN, x1 * AXIS_MARGIN, y0 / AXIS_MARGIN, y1 * AXIS_MARGIN);
    if plot.copy_gbs.is_some_and(|bw| bw * x0 < y0) {
        y0 = plot.copy_gbs.map_or(y0, |bw| bw * x0);
    }
    let tera = y1 > TERA_FROM_GIGA;
    let (unit, div) = if tera { ("TFLOP/s", TERA_FROM_GIGA) } else { ("GFLOP/s", 1.0) };

    let mut chart = ChartBuilder::on(root)
        .caption(format!("{} — roofline", plot.title), (FONT, 24))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d((x0..x1).log_scale(), (y0 / div..y1 / div).log_scale())
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_labels(AXIS_LABELS)
        .y_labels(AXIS_LABELS)
        .x_label_formatter(&|x| tick(*x))
        .y_label_formatter(&|y| tick(*y))
        .x_desc("arithmetic intensity (FLOP per byte moved, upstream's formulas)")
        .y_desc(format!("achieved {unit}"))
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .draw()
        .map_err(e)?;

    if let Some(bw) = plot.copy_gbs {
        // plotters clamps points outside the axes onto their edge (bending the line), so the diagonal ends where it
        // leaves the chart: at the ridge, the right edge or the top edge, whichever comes first.
        let top = plot.peak_gflops.map_or(x1, |peak| (peak / bw).min(x1)).min(y1 / bw);
        chart
            .draw_series(LineSeries::new([(x0, bw * x0 / div), (top, bw * top / div)], BLACK.stroke_width(2)))
            .map_err(e)?
            .label(format!("memory ceiling: copy bandwidth {bw:.0} GB/s (measured)"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    }
    if let Some(peak) = plot.peak_gflops {
        let from = plot.copy_gbs.map_or(x0, |bw| (peak / bw).max(x0));
        let grey = RGBColor(90, 90, 90);
        chart
            .draw_series(LineSeries::new([(from, peak / div), (x1, peak / div)], grey.stroke_width(2)))
            .map_err(e)?
            .label(format!("compute ceiling: FMA peak {:.1} {unit} (measured)", peak / div))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], grey.stroke_width(2)));
    }
    let mut dtypes: Vec<String> = Vec::new();
    for p in &pts {
        if !dtypes.contains(&p.dtype) {
            dtypes.push(p.dtype.clone());
        }
    }
    for dtype in &dtypes {
        let c = colour(&dtypes, dtype);
        let mine = pts.iter().filter(|p| &p.dtype == dtype);
        chart
            .draw_series(mine.clone().map(|p| Circle::new((intensity(p), p.gflops / div), MARKER, c.filled())))
            .map_err(e)?
            .label(format!("{dtype}: this run"))
            .legend(move |(x, y)| Circle::new((x + 10, y), MARKER, c.filled()));
        let anchors: Vec<(f64, f64)> = mine.filter_map(|p| p.anchor_gflops.map(|a| (intensity(p), a / div))).collect();
        if !anchors.is_empty() {
            chart
                .draw_series(anchors.into_iter().map(|xy| Circle::new(xy, MARKER + 2, c.stroke_width(2))))
                .map_err(e)?
                .label(format!("{dtype}: {}", plot.anchor_label))
                .legend(move |(x, y)| Circle::new((x + 10, y), MARKER + 2, c.stroke_width(2)));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    Ok(())
}

/// A run saved by `flashmla bench --json` (either backend's format), as far as a plot needs it.
#[derive(Debug, Deserialize)]
struct Saved {
    backend: String,
    device: String,
    ceilings: Option<SavedCeilings>,
    /// Hopper runs: the anchor file compared with.
    anchors: Option<String>,
    results: Vec<SavedRow>,
}

#[derive(Debug, Deserialize)]
struct SavedCeilings {
    copy_gbs: f64,
    /// CPU runs only.
    fma_gflops: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct SavedRow {
    dtype: String,
    gbs: f64,
    /// CPU rows.
    gflops: Option<f64>,
    /// Hopper rows.
    tflops: Option<f64>,
    /// Hopper rows: our time and upstream's.
    ms: Option<f64>,
    anchor_ms: Option<f64>,
}

/// Reads a run saved with `--json` into a [`Plot`].
pub fn from_saved(path: &Path) -> CliResult<Plot> {
    let text =
        std::fs::read_to_string(path).map_err(|e| cli_err!("--from-json {}: cannot read: {e}", path.display()))?;
    let s: Saved = serde_json::from_str(&text)
        .map_err(|e| cli_err!("--from-json {}: not a `flashmla bench --json` file: {e}", path.display()))?;
    let mut points = Vec::new();
    for (i, r) in s.results.iter().enumerate() {
        let gflops = r.gflops.or(r.tflops.map(|t| t * TERA_FROM_GIGA)).ok_or_else(|| {
            cli_err!("--from-json {}: results[{i}] has neither `gflops` nor `tflops`", path.display())
        })?;
        let anchor_gflops = match (r.ms, r.anchor_ms) {
            (Some(ms), Some(a)) if a > 0.0 => Some(gflops * ms / a),
            _ => None,
        };
        points.push(Point { dtype: r.dtype.clone(), gflops, gbs: r.gbs, anchor_gflops });
    }
    Ok(Plot {
        title: format!("flashmla bench, {} on {}", s.backend, s.device),
        copy_gbs: s.ceilings.as_ref().map(|c| c.copy_gbs),
        peak_gflops: s.ceilings.as_ref().and_then(|c| c.fma_gflops),
        anchor_label: anchor_label(s.anchors.as_deref()),
        points,
    })
}

/// The legend name of the anchors, from the anchor file's name.
pub fn anchor_label(file: Option<&str>) -> String {
    match file {
        Some(f) => format!("upstream FlashMLA ({f})"),
        None => "upstream FlashMLA".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Plot {
        Plot {
            title: "test".into(),
            copy_gbs: Some(100.0),
            peak_gflops: Some(1000.0),
            anchor_label: anchor_label(Some("anchors-h100.json")),
            points: vec![
                Point { dtype: "bf16".into(), gflops: 400.0, gbs: 20.0, anchor_gflops: Some(500.0) },
                Point { dtype: "e4m3".into(), gflops: 50.0, gbs: 90.0, anchor_gflops: None },
            ],
        }
    }

    #[test]
    fn draws_svg_and_png() {
        let dir = std::env::temp_dir().join(format!("flashmla-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        draw(&sample(), &dir.join("r.svg")).unwrap();
        let svg = std::fs::read_to_string(dir.join("r.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("memory ceiling: copy bandwidth 100 GB/s"), "{svg}");
        assert!(svg.contains("bf16: upstream FlashMLA (anchors-h100.json)") && svg.contains("e4m3: this run"));
        draw(&sample(), &dir.join("r.png")).unwrap();
        let png = std::fs::read(dir.join("r.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(draw(&sample(), &dir.join("r.jpg")).unwrap_err().to_string().contains("expected a .svg or .png"));
        let empty = Plot { points: vec![], ..sample() };
        assert!(draw(&empty, &dir.join("e.svg")).unwrap_err().to_string().contains("no results"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn reads_both_saved_formats() {
        let dir = std::env::temp_dir().join(format!("flashmla-plot-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cpu = dir.join("cpu.json");
        std::fs::write(
            &cpu,
            r#"{"backend": "cpu", "device": "cpu (2 threads)", "ceilings": {"copy_gbs": 10.0, "fma_gflops": 80.0, "threads": 2},
                "results": [{"dtype": "bf16", "gbs": 2.0, "gflops": 30.0}]}"#,
        )
        .unwrap();
        let p = from_saved(&cpu).unwrap();
        assert_eq!((p.copy_gbs, p.peak_gflops), (Some(10.0), Some(80.0)));
        assert_eq!(p.points, vec![Point { dtype: "bf16".into(), gflops: 30.0, gbs: 2.0, anchor_gflops: None }]);
        let gpu = dir.join("gpu.json");
        std::fs::write(
            &gpu,
            r#"{"backend": "hopper", "device": "NVIDIA H200", "ceilings": {"copy_gbs": 4247.0, "copy_bytes": 1},
                "anchors": "anchors-h200.json",
                "results": [{"dtype": "e4m3", "gbs": 3000.0, "tflops": 100.0, "ms": 0.2, "anchor_ms": 0.25}]}"#,
        )
        .unwrap();
        let p = from_saved(&gpu).unwrap();
        assert_eq!((p.copy_gbs, p.peak_gflops), (Some(4247.0), None));
        assert_eq!(p.points[0].gflops, 100_000.0);
        assert!((p.points[0].anchor_gflops.unwrap() - 80_000.0).abs() < 1e-6);
        std::fs::write(&gpu, "{}").unwrap();
        assert!(from_saved(&gpu).unwrap_err().to_string().contains("not a `flashmla bench --json` file"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
