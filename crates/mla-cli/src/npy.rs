//! Reading and writing NumPy `.npy` files (format versions 1–3, little-endian `<i4` and `<f4`, C order).

use std::fs;
use std::path::Path;

use crate::args::{CliError, CliResult};
use crate::cli_err;

const MAGIC: &[u8] = b"\x93NUMPY";

/// The payload of a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    /// `<i4`
    I32(Vec<i32>),
    /// `<f4`
    F32(Vec<f32>),
}

/// A parsed array.
#[derive(Debug, Clone, PartialEq)]
pub struct Npy {
    /// Extents, C order.
    pub shape: Vec<usize>,
    /// Elements.
    pub data: NpyData,
}

fn header_field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pos = header.find(&format!("'{key}'"))?;
    let rest = header[pos + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
    Some(rest)
}

fn bad(path: &Path, what: impl std::fmt::Display) -> CliError {
    cli_err!("{}: {what}", path.display())
}

/// Reads an array from `path`.
pub fn read(path: &Path) -> CliResult<Npy> {
    let bytes = fs::read(path).map_err(|e| bad(path, format!("cannot read: {e}")))?;
    parse(&bytes).map_err(|e| bad(path, e))
}

fn parse(bytes: &[u8]) -> Result<Npy, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (bad magic)".into());
    }
    let major = bytes[6];
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        _ => return Err(format!("unsupported .npy version {major}")),
    };
    let header = bytes.get(start..start + hlen).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let descr = header_field(header, "descr").ok_or("header has no 'descr'")?;
    let fortran = header_field(header, "fortran_order").ok_or("header has no 'fortran_order'")?;
    if fortran.starts_with("True") {
        return Err("Fortran-ordered arrays are not supported (save with C order)".into());
    }
    let shape_txt = header_field(header, "shape").ok_or("header has no 'shape'")?;
    let inner = shape_txt.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or("malformed 'shape'")?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("malformed shape entry `{s}`")))
        .collect::<Result<_, _>>()?;
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
    let body = &bytes[start + hlen..];
    let elem = |want: usize| -> Result<(), String> {
        if body.len() != n * want {
            return Err(format!("data holds {} bytes, shape {:?} needs {}", body.len(), shape, n * want));
        }
        Ok(())
    };
    let data = if descr.starts_with("'<i4'") || descr.starts_with("'|i4'") {
        elem(4)?;
        NpyData::I32(body.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect())
    } else if descr.starts_with("'<f4'") {
        elem(4)?;
        NpyData::F32(body.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    } else {
        let d = descr.split(',').next().unwrap_or(descr);
        return Err(format!("dtype {d} is not supported (expected '<i4' int32 or '<f4' float32)"));
    };
    Ok(Npy { shape, data })
}

impl Npy {
    /// The int32 payload, or an error naming the file.
    pub fn into_i32(self, path: &Path) -> CliResult<(Vec<usize>, Vec<i32>)> {
        match self.data {
            NpyData::I32(v) => Ok((self.shape, v)),
            NpyData::F32(_) => Err(bad(path, "expected an int32 array, got float32")),
        }
    }

    /// The float32 payload, or an error naming the file.
    pub fn into_f32(self, path: &Path) -> CliResult<(Vec<usize>, Vec<f32>)> {
        match self.data {
            NpyData::F32(v) => Ok((self.shape, v)),
            NpyData::I32(_) => Err(bad(path, "expected a float32 array, got int32")),
        }
    }
}

fn encode(descr: &str, shape: &[usize], payload: Vec<u8>) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if shape.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Pad with spaces so that the data starts on a 64-byte boundary, ending the header with a newline.
    let total = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat(total.next_multiple_of(64) - total));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Writes a float32 array.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> CliResult {
    let payload = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    fs::write(path, encode("<f4", shape, payload)).map_err(|e| bad(path, format!("cannot write: {e}")))
}

/// Writes an int32 array.
pub fn write_i32(path: &Path, shape: &[usize], data: &[i32]) -> CliResult {
    let payload = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    fs::write(path, encode("<i4", shape, payload)).map_err(|e| bad(path, format!("cannot write: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let dir = std::env::temp_dir().join(format!("flashmla-npy-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        write_f32(&p, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.5]).unwrap();
        let a = read(&p).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, NpyData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5]));
        write_i32(&p, &[3], &[7, -1, 0]).unwrap();
        assert_eq!(read(&p).unwrap().into_i32(&p).unwrap(), (vec![3], vec![7, -1, 0]));
        let err = read(&p).unwrap().into_f32(&p).unwrap_err();
        assert!(err.0.contains("a.npy") && err.0.contains("expected a float32"), "{err}");
        fs::write(&p, b"hello").unwrap();
        assert!(read(&p).unwrap_err().0.contains("bad magic"));
        let mut truncated = encode("<f4", &[4], vec![0; 8]);
        truncated.truncate(truncated.len() - 1);
        assert!(parse(&truncated).unwrap_err().contains("needs 16"));
        assert!(parse(&encode("<f8", &[1], vec![0; 8])).unwrap_err().contains("'<f8'"));
        fs::remove_dir_all(&dir).ok();
    }
}
