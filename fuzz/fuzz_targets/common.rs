//! What the fuzz targets share: a reader that turns the fuzzer's bytes into the integers that matter (edge values
//! near overflow more often than uniform ones), and host arenas the descriptors may point into.
//!
//! The contract of `TensorDesc::from_raw` (and of the C ABI) says the described memory is valid; a fuzzer cannot
//! keep that promise for arbitrary shapes. So every descriptor points into its own arena, and a backend is only
//! called when every descriptor's addressed bytes lie inside its arena (checked here, independently of the
//! library); otherwise only the inspection-only paths run (validation, conversion), which never dereference.
#![allow(dead_code)]

/// Bytes of each argument's arena.
pub const ARENA_BYTES: usize = 1 << 17;
/// Argument slots: q, k_cache, block_table, cache_seqlens, metadata, num_splits, descale_q, descale_k, out, lse.
pub const SLOTS: usize = 10;

/// Values a dimension, stride or count takes more often than a uniform draw would give them.
const EDGES: [i64; 16] =
    [0, 1, 2, -1, 8, 16, 64, 512, 576, 1 << 31, (1 << 31) - 1, 1 << 32, 1 << 62, i64::MAX, i64::MIN, i64::MAX / 576];

/// Reads the fuzzer's bytes; past the end it yields zeros.
pub struct Reader<'a>(pub &'a [u8]);

impl Reader<'_> {
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |acc, _| (acc << 8) | self.u8() as u64)
    }

    /// An integer: an edge value, a small one, or 64 raw bits.
    pub fn int(&mut self) -> i64 {
        match self.u8() % 4 {
            0 => EDGES[self.u8() as usize % EDGES.len()],
            1 | 2 => (self.u8() % 40) as i64,
            _ => self.u64() as i64,
        }
    }
}

/// One 8-byte aligned arena per argument slot, filled with small i32 values (lengths, page ids, metadata words),
/// so index tensors read as plausible as often as not.
pub struct Arenas(pub Vec<Vec<u64>>);

impl Arenas {
    pub fn new(r: &mut Reader) -> Arenas {
        Arenas::with_slots(r, SLOTS)
    }

    /// `slots` arenas (the FP8 decode has more arguments than the dense one).
    pub fn with_slots(r: &mut Reader, slots: usize) -> Arenas {
        let words = ARENA_BYTES / 8;
        let fill = r.u64();
        Arenas(
            (0..slots)
                .map(|s| {
                    (0..words)
                        .map(|i| {
                            let x = fill.rotate_left((i as u32 + s as u32) % 64) & 0x0000_003F_0000_003F;
                            x ^ ((i as u64 % 7) << 32)
                        })
                        .collect()
                })
                .collect(),
        )
    }

    pub fn base(&mut self, slot: usize) -> *mut u8 {
        self.0[slot].as_mut_ptr().cast()
    }
}

/// Does an element of `elem` bytes, at offsets `Σ i_k · stride_k` for `i_k < shape_k`, stay inside one arena?
/// Computed in i128 so that no shape overflows here.
pub fn inside_arena(elem: usize, shape: &[i64], strides: &[i64]) -> bool {
    if shape.iter().any(|&d| d == 0) {
        return true;
    }
    let mut last: i128 = 0;
    for (&d, &s) in shape.iter().zip(strides) {
        if d < 0 || s < 0 {
            return false;
        }
        last += (d as i128 - 1) * s as i128;
    }
    (last + 1) * elem as i128 <= ARENA_BYTES as i128
}

/// A descriptor of any of `dtypes` into arena `slot` (arbitrary rank, shape, strides, sometimes a CUDA device), and
/// whether its bytes stay inside the arena.
pub fn desc<'a>(
    r: &mut Reader,
    arenas: &mut Arenas,
    slot: usize,
    dtypes: &[mla_core::ScalarType],
) -> (mla_core::TensorDesc<'a>, bool) {
    use mla_core::Device;
    let ndim = (r.u8() % 5) as usize;
    let dtype = dtypes[r.u8() as usize % dtypes.len()];
    let shape: Vec<i64> = (0..ndim).map(|_| r.int()).collect();
    let strides: Vec<i64> = match r.u8() % 2 {
        0 => mla_core::tensor::contiguous_strides(&shape)[..ndim].to_vec(),
        _ => (0..ndim).map(|_| r.int()).collect(),
    };
    let device = if r.u8() % 8 == 0 { Device::Cuda(0) } else { Device::Host };
    let inside = device == Device::Host && inside_arena(dtype.size_bytes(), &shape, &strides);
    // SAFETY: the descriptor is dereferenced only when `inside` holds (its bytes lie in the arena, which outlives
    // every call of the target); otherwise it only reaches validation, which inspects it.
    let d = unsafe { mla_core::TensorDesc::from_raw(arenas.base(slot).cast(), dtype, &shape, &strides, device) };
    (d.expect("at most 4 dims, one stride each"), inside)
}
