//! Upstream FlashMLA's own figures, the anchors of `flashmla bench --backend hopper`: measured on this workplace's
//! H100 and H200 with upstream's test scripts (`anchors/anchors-h100.md`, `anchors/anchors-h200.md` in this crate
//! say how; the `.json` beside each is the table, embedded here at compile time so the binary carries it).
//!
//! The bench compares with the figures of the device it runs on: H200 on an H200, H100 on an H100 or H800 (same
//! SMs and clocks), and H100's, said so, on any other device. Per dtype, the anchor rows fix the causality upstream
//! ran (H100: BF16 causal, E4M3 non-causal; H200: every dtype causal); FP16 without rows of its own is compared
//! with BF16's. The H100 file's rows of upstream's first (2025-02) kernel are superseded and left out.

use mla_core::DType;
use serde::Deserialize;

/// Batch size of every anchor row.
pub const ANCHOR_BATCH: usize = 128;

/// Kernel names containing this are upstream's superseded first kernel (H100 file), not an anchor.
const SUPERSEDED_KERNEL: &str = "first kernel";

/// Which device's figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// `anchors-h100.json`.
    H100,
    /// `anchors-h200.json`.
    H200,
}

impl Which {
    /// `h100` / `h200` (the `--anchors` values).
    pub fn parse(s: &str) -> Option<Which> {
        match s {
            "h100" => Some(Which::H100),
            "h200" => Some(Which::H200),
            _ => None,
        }
    }

    /// The figures for a device name, and whether they were measured on that kind of device.
    pub fn for_device(device_name: &str) -> (Which, bool) {
        let n = device_name.to_ascii_uppercase();
        if n.contains("H200") { (Which::H200, true) } else { (Which::H100, n.contains("H100") || n.contains("H800")) }
    }

    fn file(self) -> (&'static str, &'static str) {
        match self {
            Which::H100 => ("anchors-h100.json", include_str!("../anchors/anchors-h100.json")),
            Which::H200 => ("anchors-h200.json", include_str!("../anchors/anchors-h200.json")),
        }
    }
}

#[derive(Debug, Deserialize)]
struct AnchorFile {
    device: String,
    date: String,
    ceilings: FileCeilings,
    rows: Vec<AnchorRow>,
}

#[derive(Debug, Deserialize)]
struct FileCeilings {
    copy_gbps: f64,
}

/// One configuration upstream measured.
#[derive(Clone, Debug, Deserialize)]
pub struct AnchorRow {
    dtype: String,
    kernel: String,
    causal: bool,
    b: usize,
    s_k: usize,
    h_q: usize,
    h_kv: usize,
    s_q: usize,
    varlen: bool,
    ms: f64,
}

/// The figures of one device.
#[derive(Clone, Debug)]
pub struct AnchorSet {
    /// The file's name (`anchors-h200.json`).
    pub file: &'static str,
    /// The device upstream ran on, as the file says.
    pub device: String,
    /// The date of the measurements.
    pub date: String,
    /// The device's copy bandwidth measured with them, GB/s.
    pub copy_gbs: f64,
    rows: Vec<AnchorRow>,
}

impl AnchorSet {
    /// Loads the embedded figures of `which`.
    pub fn load(which: Which) -> AnchorSet {
        let (file, text) = which.file();
        // The files are part of this crate's source; the unit tests parse both.
        let f: AnchorFile = serde_json::from_str(text).unwrap_or_else(|e| panic!("{file} is malformed: {e}"));
        AnchorSet {
            file,
            device: f.device,
            date: f.date,
            copy_gbs: f.ceilings.copy_gbps,
            rows: f.rows.into_iter().filter(|r| !r.kernel.contains(SUPERSEDED_KERNEL)).collect(),
        }
    }

    /// The rows of `dtype`: its own, or BF16's for FP16 without figures of its own.
    fn rows_of(&self, dtype: DType) -> impl Iterator<Item = &AnchorRow> {
        let own = self.rows.iter().any(|r| r.dtype == dtype.name());
        let key = if own || dtype != DType::F16 { dtype.name() } else { DType::Bf16.name() };
        self.rows.iter().filter(move |r| r.dtype == key)
    }

    /// Whether upstream ran `dtype` causal (the bench's default for that dtype), if it ran it at all.
    pub fn causal(&self, dtype: DType) -> Option<bool> {
        self.rows_of(dtype).next().map(|r| r.causal)
    }

    /// Upstream's time in ms for this configuration, if it measured it (h_kv = 1).
    #[allow(clippy::too_many_arguments)]
    pub fn anchor(
        &self,
        dtype: DType,
        batch: usize,
        s_k: usize,
        h_q: usize,
        s_q: usize,
        varlen: bool,
        causal: bool,
    ) -> Option<f64> {
        self.rows_of(dtype)
            .find(|r| {
                (r.b, r.s_k, r.h_q, r.h_kv, r.s_q, r.varlen, r.causal) == (batch, s_k, h_q, 1, s_q, varlen, causal)
            })
            .map(|r| r.ms)
    }

    /// How many anchor rows there are for `dtype`.
    #[cfg(test)]
    fn count(&self, dtype: DType) -> usize {
        self.rows_of(dtype).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h100_lookups() {
        let a = AnchorSet::load(Which::H100);
        assert_eq!(a.copy_gbs, 3021.0);
        assert_eq!(a.anchor(DType::Bf16, 128, 4096, 16, 1, false, true), Some(0.229));
        assert_eq!(a.anchor(DType::F16, 128, 16384, 128, 2, true, true), Some(1.800), "FP16 uses BF16's");
        assert_eq!(a.anchor(DType::E4M3, 128, 8192, 128, 2, false, false), Some(0.825));
        assert_eq!(a.anchor(DType::E4M3, 128, 16384, 16, 1, false, false), None, "upstream ran FP8 up to 8192");
        assert_eq!(a.anchor(DType::Bf16, 64, 4096, 16, 1, false, true), None, "other batch");
        assert_eq!(a.anchor(DType::Bf16, 128, 4096, 16, 1, false, false), None, "the first kernel is left out");
        assert_eq!(
            (a.causal(DType::Bf16), a.causal(DType::F16), a.causal(DType::E4M3)),
            (Some(true), Some(true), Some(false))
        );
        assert_eq!((a.count(DType::Bf16), a.count(DType::E4M3)), (48, 32));
    }

    #[test]
    fn h200_lookups() {
        let a = AnchorSet::load(Which::H200);
        assert_eq!(a.copy_gbs, 4247.0);
        assert!(a.device.contains("H200"), "{}", a.device);
        assert_eq!(a.anchor(DType::Bf16, 128, 4096, 16, 1, false, true), Some(0.168));
        assert_eq!((a.causal(DType::F16), a.causal(DType::E4M3)), (Some(true), Some(true)));
        assert!(a.anchor(DType::E4M3, 128, 16384, 16, 1, false, true).is_some(), "PR #122 ran FP8 to 16384");
        assert_eq!((a.count(DType::Bf16), a.count(DType::F16), a.count(DType::E4M3)), (48, 48, 48));
    }

    #[test]
    fn the_device_picks_the_figures() {
        assert_eq!(Which::for_device("NVIDIA H200"), (Which::H200, true));
        assert_eq!(Which::for_device("NVIDIA H100 80GB HBM3"), (Which::H100, true));
        assert_eq!(Which::for_device("NVIDIA H800"), (Which::H100, true));
        assert_eq!(Which::for_device("cpu (2 threads)"), (Which::H100, false));
    }

    /// The embedded tables are the shared docs' (when those sit next to the repository).
    #[test]
    fn tables_match_the_shared_json() {
        for name in ["anchors-h100.json", "anchors-h200.json"] {
            let path = format!("{}/../../../shared/docs/{name}", env!("CARGO_MANIFEST_DIR"));
            let Ok(shared) = std::fs::read_to_string(&path) else {
                eprintln!("skipped: {path} not found");
                continue;
            };
            let ours = std::fs::read_to_string(format!("{}/anchors/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
            assert_eq!(ours, shared, "{name}: copy the shared file into crates/mla-cli/anchors/");
        }
    }
}
