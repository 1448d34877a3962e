//! NumPy `.npy` files through the `npyz` crate: every format version, either byte order, C order.
//!
//! | reader | accepts | into |
//! |---|---|---|
//! | [`read_indices`] | int32, int64 (each value range-checked into int32) | `Vec<i32>` |
//! | [`read_elements`] | float32, float16, float64 | values to round to the problem's dtype |
//! | [`read_elements`] | raw 2-byte (`<V2`: ml_dtypes.bfloat16; `<u2`, `<i2`) | bf16/fp16 bit patterns, taken as they are |
//! | [`read_elements`] | raw 1-byte (`|V1`: ml_dtypes.float8_e4m3fn; `|u1`, `|i1`) | e4m3 codes, taken as they are |
//!
//! ml_dtypes' types are not NumPy built-ins: `np.save` writes them as void (`V`) elements of their size, so the
//! file itself does not say which 16-bit format it holds; `--dtype` does.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use half::f16;
use npyz::{DType, NpyFile, Order, TypeChar, WriterBuilder};

use crate::args::{CliError, CliResult};
use crate::cli_err;

fn bad(path: &Path, what: impl std::fmt::Display) -> CliError {
    cli_err!("{}: {what}", path.display())
}

/// An opened array: its shape and its element type, checked to be plain and in C order.
struct Opened {
    file: NpyFile<BufReader<File>>,
    shape: Vec<usize>,
    /// `(kind, bytes)`: NumPy's type character and element size.
    kind: (TypeChar, u64),
    /// NumPy's name of the element type, for messages (`<i8`).
    descr: String,
}

fn open(path: &Path) -> CliResult<Opened> {
    let f = File::open(path).map_err(|e| bad(path, format!("cannot read: {e}")))?;
    let file = NpyFile::new(BufReader::new(f)).map_err(|e| bad(path, format!("not a readable .npy file: {e}")))?;
    if file.order() == Order::Fortran {
        return Err(bad(path, "Fortran-ordered arrays are not supported (save with C order)"));
    }
    let DType::Plain(ts) = file.dtype() else {
        return Err(bad(path, "structured arrays are not supported (expected a plain numeric array)"));
    };
    let shape = file
        .shape()
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| bad(path, format!("dimension {d} does not fit in memory"))))
        .collect::<CliResult<Vec<_>>>()?;
    Ok(Opened { kind: (ts.type_char(), ts.size_field()), descr: ts.to_string(), file, shape })
}

/// Reads every element as `T` (the file's type already checked to match); a short file is an error naming it.
fn elements<T: npyz::Deserialize>(path: &Path, o: Opened) -> CliResult<(Vec<usize>, Vec<T>)> {
    let (n, size) = (o.file.len(), o.kind.1);
    let v = o.file.into_vec::<T>().map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => bad(
            path,
            format!(
                "truncated: shape {:?} of '{}' needs {} bytes of data, the file has fewer",
                o.shape,
                o.descr,
                n * size
            ),
        ),
        _ => bad(path, format!("cannot read the data ('{}'): {e}", o.descr)),
    })?;
    Ok((o.shape, v))
}

/// An index array (block table, lengths): int32, or int64 with every value in int32's range (NumPy's default
/// integer type is int64: `np.array([100, 200])`).
pub fn read_indices(path: &Path) -> CliResult<(Vec<usize>, Vec<i32>)> {
    let o = open(path)?;
    match o.kind {
        (TypeChar::Int, 4) => elements::<i32>(path, o),
        (TypeChar::Int, 8) => {
            let (shape, wide) = elements::<i64>(path, o)?;
            let narrow = wide
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    i32::try_from(x).map_err(|_| {
                        bad(path, format!("element {i} is {x}, outside int32's range (indices must fit in int32)"))
                    })
                })
                .collect::<CliResult<Vec<i32>>>()?;
            Ok((shape, narrow))
        }
        _ => Err(bad(path, format!("expected an int32 or int64 array, got dtype '{}'", o.descr))),
    }
}

/// The elements of a q or KV-cache file.
#[derive(Debug, Clone, PartialEq)]
pub enum Elements {
    /// Real values (float32, or float16/float64 widened or narrowed to float32), to be rounded to the dtype.
    Values(Vec<f32>),
    /// 2-byte elements taken as bf16 or fp16 bit patterns.
    Bits16(Vec<u16>),
    /// 1-byte elements taken as e4m3 codes.
    Bits8(Vec<u8>),
}

/// A q or KV-cache array: float32/float16/float64, or raw 2-byte or 1-byte elements (see the module table).
pub fn read_elements(path: &Path) -> CliResult<(Vec<usize>, Elements)> {
    let o = open(path)?;
    match o.kind {
        (TypeChar::Float, 4) => elements::<f32>(path, o).map(|(s, v)| (s, Elements::Values(v))),
        (TypeChar::Float, 2) => {
            elements::<f16>(path, o).map(|(s, v)| (s, Elements::Values(v.into_iter().map(f16::to_f32).collect())))
        }
        // float64 rounds once to float32 and once to the dtype: every bf16/fp16/e4m3 value is a float32, and the
        // rounding to float32 keeps 24 bits, so the result differs from one direct rounding only on exact ties.
        (TypeChar::Float, 8) => {
            elements::<f64>(path, o).map(|(s, v)| (s, Elements::Values(v.into_iter().map(|x| x as f32).collect())))
        }
        (TypeChar::RawData, 2) => elements::<npyz::FixedSizeBytes<2>>(path, o)
            .map(|(s, v)| (s, Elements::Bits16(v.into_iter().map(|b| u16::from_le_bytes(b.0)).collect()))),
        (TypeChar::Uint, 2) => elements::<u16>(path, o).map(|(s, v)| (s, Elements::Bits16(v))),
        (TypeChar::Int, 2) => {
            elements::<i16>(path, o).map(|(s, v)| (s, Elements::Bits16(v.into_iter().map(|x| x as u16).collect())))
        }
        (TypeChar::RawData, 1) => elements::<npyz::FixedSizeBytes<1>>(path, o)
            .map(|(s, v)| (s, Elements::Bits8(v.into_iter().map(|b| b.0[0]).collect()))),
        (TypeChar::Uint, 1) => elements::<u8>(path, o).map(|(s, v)| (s, Elements::Bits8(v))),
        (TypeChar::Int, 1) => {
            elements::<i8>(path, o).map(|(s, v)| (s, Elements::Bits8(v.into_iter().map(|x| x as u8).collect())))
        }
        _ => Err(bad(
            path,
            format!(
                "expected float32, float16, float64 or raw 2-byte/1-byte elements (e.g. ml_dtypes.bfloat16), got \
                 dtype '{}'",
                o.descr
            ),
        )),
    }
}

fn write<T: npyz::AutoSerialize + Clone>(path: &Path, shape: &[usize], data: &[T]) -> CliResult {
    let io = |e: std::io::Error| bad(path, format!("cannot write: {e}"));
    let f = File::create(path).map_err(io)?;
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut w =
        npyz::WriteOptions::new().default_dtype().shape(&shape).writer(BufWriter::new(f)).begin_nd().map_err(io)?;
    w.extend(data.iter().cloned()).map_err(io)?;
    w.finish().map_err(io)
}

/// Writes a float32 array.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> CliResult {
    write(path, shape, data)
}

/// Writes an int32 array.
pub fn write_i32(path: &Path, shape: &[usize], data: &[i32]) -> CliResult {
    write(path, shape, data)
}

/// Writes a uint8 array (an FP8 cache's bytes).
pub fn write_u8(path: &Path, shape: &[usize], data: &[u8]) -> CliResult {
    write(path, shape, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.npy` v1 file as NumPy writes it (independent of npyz's writer): `descr` is NumPy's type string.
    fn npy_bytes(descr: &str, shape: &str, payload: &[u8]) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(payload);
        out
    }

    struct Dir(std::path::PathBuf);
    impl Dir {
        fn new(name: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("flashmla-npy-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
        fn file(&self, name: &str, bytes: &[u8]) -> std::path::PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }

    #[test]
    fn round_trips_and_rejects_garbage() {
        let d = Dir::new("rt");
        let p = d.0.join("a.npy");
        write_f32(&p, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.5]).unwrap();
        assert_eq!(read_elements(&p).unwrap(), (vec![2, 3], Elements::Values(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5])));
        write_i32(&p, &[3], &[7, -1, 0]).unwrap();
        assert_eq!(read_indices(&p).unwrap(), (vec![3], vec![7, -1, 0]));
        let err = read_elements(&p).unwrap_err().to_string();
        assert!(err.contains("a.npy") && err.contains("'<i4'"), "{err}");
        let junk = d.file("junk.npy", b"hello");
        assert!(read_indices(&junk).unwrap_err().to_string().contains("not a readable .npy file"));
        let short = d.file("short.npy", &npy_bytes("<f4", "(4,)", &[0; 15]));
        let err = read_elements(&short).unwrap_err().to_string();
        assert!(err.contains("short.npy") && err.contains("truncated") && err.contains("needs 16 bytes"), "{err}");
        let text = d.file("text.npy", &npy_bytes("<U3", "(1,)", &[0; 12]));
        assert!(read_elements(&text).unwrap_err().to_string().contains("'<U3'"));
    }

    #[test]
    fn int64_indices_are_range_checked() {
        let d = Dir::new("i8");
        let ok: Vec<u8> = [100i64, -1, 200].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(
            read_indices(&d.file("ok.npy", &npy_bytes("<i8", "(3,)", &ok))).unwrap(),
            (vec![3], vec![100, -1, 200])
        );
        let big: Vec<u8> = [1i64, 1 << 31].iter().flat_map(|x| x.to_le_bytes()).collect();
        let err = read_indices(&d.file("big.npy", &npy_bytes("<i8", "(2,)", &big))).unwrap_err().to_string();
        assert!(err.contains("big.npy") && err.contains("element 1 is 2147483648"), "{err}");
        // Big-endian int32 is read by value.
        let be: Vec<u8> = [5i32, 6].iter().flat_map(|x| x.to_be_bytes()).collect();
        assert_eq!(read_indices(&d.file("be.npy", &npy_bytes(">i4", "(2,)", &be))).unwrap().1, vec![5, 6]);
    }

    #[test]
    fn floats_and_raw_elements() {
        let d = Dir::new("el");
        let h: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect();
        assert_eq!(
            read_elements(&d.file("h.npy", &npy_bytes("<f2", "(2,)", &h))).unwrap().1,
            Elements::Values(vec![1.5, -2.0])
        );
        let f8: Vec<u8> = [0.1f64, 3.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(
            read_elements(&d.file("d.npy", &npy_bytes("<f8", "(1, 2)", &f8))).unwrap(),
            (vec![1, 2], Elements::Values(vec![0.1f32, 3.0]))
        );
        // What `np.save` writes for ml_dtypes.bfloat16 ([1.0, -2.0]) and float8_e4m3fn arrays.
        let bf: Vec<u8> = [0x3f80u16, 0xc000].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(
            read_elements(&d.file("bf.npy", &npy_bytes("<V2", "(2,)", &bf))).unwrap().1,
            Elements::Bits16(vec![0x3f80, 0xc000])
        );
        assert_eq!(
            read_elements(&d.file("u2.npy", &npy_bytes("<u2", "(2,)", &bf))).unwrap().1,
            Elements::Bits16(vec![0x3f80, 0xc000])
        );
        assert_eq!(
            read_elements(&d.file("e.npy", &npy_bytes("|V1", "(2,)", &[0x38, 0xff]))).unwrap().1,
            Elements::Bits8(vec![0x38, 0xff])
        );
        assert_eq!(
            read_elements(&d.file("e2.npy", &npy_bytes("<V1", "(2,)", &[0x38, 0xff]))).unwrap().1,
            Elements::Bits8(vec![0x38, 0xff])
        );
        assert_eq!(
            read_elements(&d.file("u1.npy", &npy_bytes("|u1", "(1,)", &[7]))).unwrap().1,
            Elements::Bits8(vec![7])
        );
    }
}
