//! Upstream FlashMLA's H100 figures, the anchors of `flashmla bench --backend hopper`: measured on this
//! workplace's H100 with upstream's own test script (`shared/docs/anchors-h100.md` / `anchors-h100.json`: b = 128,
//! h_kv = 1, page size 64, `triton.testing.do_bench` around the whole call). BF16 = the 2025-04 kernel, causal;
//! E4M3 = FP8 pull request #54, non-causal. FP16 has no upstream figure and is compared with BF16's.

use mla_core::DType;

/// Batch size of every anchor.
pub const ANCHOR_BATCH: usize = 128;

/// `(dtype, s_k, h_q, s_q, varlen, ms)`; `dtype` is `bf16` (causal) or `e4m3` (non-causal).
pub const ANCHORS: &[(&str, usize, usize, usize, bool, f64)] = &[
    ("bf16", 4096, 16, 1, false, 0.229),
    ("bf16", 4096, 16, 2, false, 0.229),
    ("bf16", 4096, 32, 1, false, 0.229),
    ("bf16", 4096, 32, 2, false, 0.232),
    ("bf16", 4096, 64, 1, false, 0.232),
    ("bf16", 4096, 64, 2, false, 0.261),
    ("bf16", 4096, 128, 1, false, 0.264),
    ("bf16", 4096, 128, 2, false, 0.471),
    ("bf16", 8192, 16, 1, false, 0.433),
    ("bf16", 8192, 16, 2, false, 0.434),
    ("bf16", 8192, 32, 1, false, 0.434),
    ("bf16", 8192, 32, 2, false, 0.436),
    ("bf16", 8192, 64, 1, false, 0.436),
    ("bf16", 8192, 64, 2, false, 0.533),
    ("bf16", 8192, 128, 1, false, 0.531),
    ("bf16", 8192, 128, 2, false, 0.936),
    ("bf16", 16384, 16, 1, false, 0.833),
    ("bf16", 16384, 16, 2, false, 0.838),
    ("bf16", 16384, 32, 1, false, 0.841),
    ("bf16", 16384, 32, 2, false, 0.862),
    ("bf16", 16384, 64, 1, false, 0.862),
    ("bf16", 16384, 64, 2, false, 1.027),
    ("bf16", 16384, 128, 1, false, 1.014),
    ("bf16", 16384, 128, 2, false, 1.842),
    ("bf16", 4096, 16, 1, true, 0.240),
    ("bf16", 4096, 16, 2, true, 0.249),
    ("bf16", 4096, 32, 1, true, 0.254),
    ("bf16", 4096, 32, 2, true, 0.253),
    ("bf16", 4096, 64, 1, true, 0.250),
    ("bf16", 4096, 64, 2, true, 0.298),
    ("bf16", 4096, 128, 1, true, 0.299),
    ("bf16", 4096, 128, 2, true, 0.495),
    ("bf16", 8192, 16, 1, true, 0.442),
    ("bf16", 8192, 16, 2, true, 0.476),
    ("bf16", 8192, 32, 1, true, 0.428),
    ("bf16", 8192, 32, 2, true, 0.441),
    ("bf16", 8192, 64, 1, true, 0.444),
    ("bf16", 8192, 64, 2, true, 0.555),
    ("bf16", 8192, 128, 1, true, 0.571),
    ("bf16", 8192, 128, 2, true, 0.897),
    ("bf16", 16384, 16, 1, true, 0.828),
    ("bf16", 16384, 16, 2, true, 0.901),
    ("bf16", 16384, 32, 1, true, 0.915),
    ("bf16", 16384, 32, 2, true, 0.880),
    ("bf16", 16384, 64, 1, true, 0.857),
    ("bf16", 16384, 64, 2, true, 0.990),
    ("bf16", 16384, 128, 1, true, 0.955),
    ("bf16", 16384, 128, 2, true, 1.800),
    ("e4m3", 4096, 16, 1, false, 0.129),
    ("e4m3", 4096, 16, 2, false, 0.131),
    ("e4m3", 4096, 32, 1, false, 0.131),
    ("e4m3", 4096, 32, 2, false, 0.135),
    ("e4m3", 4096, 64, 1, false, 0.135),
    ("e4m3", 4096, 64, 2, false, 0.228),
    ("e4m3", 4096, 128, 1, false, 0.228),
    ("e4m3", 4096, 128, 2, false, 0.430),
    ("e4m3", 8192, 16, 1, false, 0.233),
    ("e4m3", 8192, 16, 2, false, 0.234),
    ("e4m3", 8192, 32, 1, false, 0.234),
    ("e4m3", 8192, 32, 2, false, 0.239),
    ("e4m3", 8192, 64, 1, false, 0.239),
    ("e4m3", 8192, 64, 2, false, 0.430),
    ("e4m3", 8192, 128, 1, false, 0.428),
    ("e4m3", 8192, 128, 2, false, 0.825),
    ("e4m3", 4096, 16, 1, true, 0.142),
    ("e4m3", 4096, 16, 2, true, 0.150),
    ("e4m3", 4096, 32, 1, true, 0.154),
    ("e4m3", 4096, 32, 2, true, 0.157),
    ("e4m3", 4096, 64, 1, true, 0.156),
    ("e4m3", 4096, 64, 2, true, 0.247),
    ("e4m3", 4096, 128, 1, true, 0.244),
    ("e4m3", 4096, 128, 2, true, 0.447),
    ("e4m3", 8192, 16, 1, true, 0.247),
    ("e4m3", 8192, 16, 2, true, 0.268),
    ("e4m3", 8192, 32, 1, true, 0.245),
    ("e4m3", 8192, 32, 2, true, 0.258),
    ("e4m3", 8192, 64, 1, true, 0.262),
    ("e4m3", 8192, 64, 2, true, 0.451),
    ("e4m3", 8192, 128, 1, true, 0.463),
    ("e4m3", 8192, 128, 2, true, 0.812),
];

/// Upstream's time in ms for this configuration, if it measured it (b = 128, h_kv = 1; BF16 and FP16 causal, E4M3
/// non-causal, as upstream ran them).
pub fn anchor(
    dtype: DType,
    batch: usize,
    s_k: usize,
    h_q: usize,
    s_q: usize,
    varlen: bool,
    causal: bool,
) -> Option<f64> {
    let (key, anchor_causal) = if dtype == DType::E4M3 { ("e4m3", false) } else { ("bf16", true) };
    if batch != ANCHOR_BATCH || causal != anchor_causal {
        return None;
    }
    ANCHORS.iter().find(|a| a.0 == key && a.1 == s_k && a.2 == h_q && a.3 == s_q && a.4 == varlen).map(|a| a.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        assert_eq!(anchor(DType::Bf16, 128, 4096, 16, 1, false, true), Some(0.229));
        assert_eq!(anchor(DType::F16, 128, 16384, 128, 2, true, true), Some(1.800));
        assert_eq!(anchor(DType::E4M3, 128, 8192, 128, 2, false, false), Some(0.825));
        assert_eq!(anchor(DType::E4M3, 128, 16384, 16, 1, false, false), None, "upstream ran FP8 up to 8192");
        assert_eq!(anchor(DType::Bf16, 64, 4096, 16, 1, false, true), None, "other batch");
        assert_eq!(anchor(DType::Bf16, 128, 4096, 16, 1, false, false), None, "non-causal BF16");
        assert_eq!(ANCHORS.len(), 48 + 32);
    }

    /// The table above is `anchors-h100.json`'s (when the shared docs sit next to the repository).
    #[test]
    fn table_matches_the_shared_json() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/docs/anchors-h100.json");
        let Ok(text) = std::fs::read_to_string(path) else {
            eprintln!("skipped: {path} not found");
            return;
        };
        // The file is pretty-printed, one `"key": value` per line; a row ends with `}`.
        let mut row: Vec<(String, String)> = Vec::new();
        let mut found = Vec::new();
        for line in text.lines().map(str::trim) {
            if let Some((k, v)) = line.split_once(':') {
                row.push((
                    k.trim().trim_matches('"').to_string(),
                    v.trim().trim_end_matches(',').trim_matches('"').to_string(),
                ));
            } else if line.starts_with('}') {
                let get = |k: &str| row.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
                if let (Some(dt), Some(causal), Some(ms)) = (get("dtype"), get("causal"), get("ms")) {
                    let num = |k: &str| get(k).and_then(|v| v.parse::<usize>().ok()).unwrap();
                    let want_causal = dt == "bf16";
                    let kernel = get("kernel").unwrap_or("");
                    if (dt == "bf16" || dt == "e4m3") && (causal == "true") == want_causal && !kernel.contains("first")
                    {
                        assert_eq!(num("b"), ANCHOR_BATCH);
                        assert_eq!(num("h_kv"), 1);
                        found.push((
                            dt.to_string(),
                            num("s_k"),
                            num("h_q"),
                            num("s_q"),
                            get("varlen") == Some("true"),
                            ms.parse::<f64>().unwrap(),
                        ));
                    }
                }
                row.clear();
            }
        }
        assert_eq!(found.len(), ANCHORS.len(), "{found:?}");
        for (dt, s_k, h_q, s_q, varlen, ms) in found {
            let ours = ANCHORS.iter().find(|a| a.0 == dt && a.1 == s_k && a.2 == h_q && a.3 == s_q && a.4 == varlen);
            assert_eq!(ours.map(|a| a.5), Some(ms), "{dt} {s_k} {h_q} {s_q} varlen={varlen}");
        }
    }
}
