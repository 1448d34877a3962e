//! What the binary's integration tests share: running it, scratch directories, and a small `.npy` v1 writer and
//! reader written independently of the binary's (so a bug there cannot hide itself).
#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The built `flashmla` binary, not yet run.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flashmla"))
}

/// Runs a command built from [`bin`].
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("the binary runs")
}

/// Runs the binary with `args`.
pub fn flashmla(args: &[&str]) -> Output {
    run(bin().args(args))
}

/// Bytes as text, lossily.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn stderr(o: &Output) -> String {
    text(&o.stderr)
}

pub fn stdout(o: &Output) -> String {
    text(&o.stdout)
}

/// A fresh scratch directory per test process, `tag` naming the test file and `name` the test.
pub fn tmpdir(tag: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flashmla-{tag}-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A `.npy` v1 file as NumPy writes it (header padded to 64 bytes); `descr` is NumPy's type string (`'<V2'` is what
/// `np.save` writes for an ml_dtypes.bfloat16 array).
pub fn write_npy(path: &Path, descr: &str, shape: &[usize], payload: &[u8]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if shape.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(payload);
    std::fs::write(path, out).unwrap();
}

/// The little-endian bytes of `v`.
pub fn bytes_of<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

pub fn write_f32(path: &Path, shape: &[usize], v: &[f32]) {
    write_npy(path, "<f4", shape, &bytes_of(v, f32::to_le_bytes));
}

pub fn write_i32(path: &Path, shape: &[usize], v: &[i32]) {
    write_npy(path, "<i4", shape, &bytes_of(v, i32::to_le_bytes));
}

/// Reads a float32 `.npy` written by the binary: (shape, data).
pub fn read_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap();
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let h = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(h.contains("'<f4'"), "{h}");
    let inner = h.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape = inner.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    let data = b[10 + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (shape, data)
}
