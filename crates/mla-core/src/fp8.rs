//! The FP8 KV-cache layouts DeepSeek V3.2 and MODEL1 (V4) are served with: byte offsets, scale formats, and exact
//! quantisation and dequantisation of one token row.
//!
//! A token row is `head_dim_k` values: a "NoPE" part quantised to E4M3 in tiles that share one scale, then 64 RoPE
//! values kept in bfloat16. Both layouts are single-KV-head (`h_kv = 1`); `k_cache` is described as
//! `[num_blocks, page_size, 1, bytes_per_token]` bytes (dtype E4M3; a `u8` host slice is described so), and
//! `bytes_per_token` names the layout.
//!
//! [`quantize_tensor`] and [`dequantize_tensor`] convert whole host tensors (validated like any call's arguments).
//!
//! **V3.2** (`d_qk = 576`, 656 bytes per token): token `t` of a page block is one record at byte `t · 656`.
//!
//! | bytes of the record | what |
//! |---|---|
//! | `[0, 512)` | 512 E4M3 codes, NoPE columns 0..512 |
//! | `[512, 528)` | 4 little-endian float32 scales; scale `k` covers columns `[128k, 128k + 128)` |
//! | `[528, 656)` | 64 little-endian bfloat16 RoPE values, columns 512..576 |
//!
//! **MODEL1** (`d_qk = 512`, 584 bytes per token): a page block of `page_size` tokens is two regions, padded to a
//! multiple of 576 bytes (the stride between blocks is then `ceil(page_size · 584 / 576) · 576`).
//!
//! | bytes from the block start | what |
//! |---|---|
//! | `[576t, 576t + 448)` | 448 E4M3 codes of token `t`, NoPE columns 0..448 |
//! | `[576t + 448, 576t + 576)` | 64 little-endian bfloat16 RoPE values of token `t`, columns 448..512 |
//! | `[576·page_size + 8t, 576·page_size + 8t + 7)` | 7 UE8M0 scales of token `t`; scale `k` covers columns `[64k, 64k + 64)` |
//! | `576·page_size + 8t + 7` | pad byte (written 0, never read) |
//!
//! **Scales.** A UE8M0 byte `e` is the power of two `2^(e − 127)` (`0xFF` is NaN). The quantiser (upstream's, whose
//! test code defines both layouts; docs/sparse-fp8.md) gives every tile the scale
//! `s = 2^ceil(log2(max(amax / 448, 1e-4)))`, `amax` the tile's largest magnitude and `amax / 448` an f32 division,
//! and stores `e4m3(x / s)` (round to nearest even); V3.2 stores `s` as a float32, MODEL1 as UE8M0. Here the power of
//! two is found exactly from the bits of the f32 (upstream takes a float `log2`, which for `amax / 448` a few ulps
//! above a power of two may pick the power below; the codes then saturate at ±448, within the same rounding).
//! A tile holding a NaN or an infinity is stored as NaN: scale NaN (float32 NaN, or UE8M0 `0xFF`), codes `0x7F`.
//!
//! **Dequantisation.** Column `c` of the NoPE part is `bf16(e4m3(code_c) · s_k)`, the product taken in f32 and
//! rounded to bfloat16, as upstream's `dequantize_k_cache`; the RoPE part is its bfloat16 values. For the scales the
//! quantiser writes (powers of two) the product is exact. A V3.2 cache with other float32 scales dequantises here as
//! in upstream's `dequantize_k_cache`, which upstream's Hopper kernel can differ from by one bfloat16 rounding (it
//! rounds the scale to bfloat16 first).

use crate::dtype::{
    E4M3_MAX, F32_MANTISSA_BITS, ScalarType, bf16_to_f32, e4m3_to_f32, f32_to_bf16, f32_to_e4m3, pow2_f32,
};
use crate::error::{Error, Result};
use crate::problem::{HEAD_DIM_V, Region, check_disjoint, check_last_contiguous, check_memory, check_writable};
use crate::sparse::{CacheGeometry, validate_cache};
use crate::tensor::{Device, HostTensor, TensorDesc};

/// Columns of the RoPE part of a token row, in both layouts (the row's last 64 columns).
pub const ROPE_DIM: usize = 64;
/// Bytes of one bfloat16.
const BF16_BYTES: usize = 2;
/// Bytes of a token's RoPE part.
pub const ROPE_BYTES: usize = ROPE_DIM * BF16_BYTES;
/// Lower clamp of `amax / 448` before it is rounded up to a power of two: a tile of zeros gets the scale `2^-13`.
pub const MIN_SCALE: f32 = 1e-4;
/// The E4M3 code stored for every value of a tile that holds a NaN or an infinity.
pub const E4M3_NAN_CODE: u8 = 0x7F;
/// The UE8M0 byte that is NaN.
pub const UE8M0_NAN: u8 = 0xFF;
/// Exponent bias of UE8M0: byte `e` is `2^(e − 127)`.
const UE8M0_BIAS: i32 = 127;
/// The f32 mantissa field.
const F32_MANTISSA_MASK: u32 = (1 << F32_MANTISSA_BITS) - 1;

/// Byte offsets of the V3.2 record (one per token, tokens of a page contiguous).
pub mod v32 {
    use super::ROPE_BYTES;

    /// Width of a K row (`d_qk`).
    pub const HEAD_DIM_K: usize = 576;
    /// Quantised (NoPE) columns.
    pub const NOPE_DIM: usize = 512;
    /// Columns per scale.
    pub const TILE: usize = 128;
    /// Scales per token.
    pub const NUM_SCALES: usize = NOPE_DIM / TILE;
    /// Bytes of one scale (float32).
    pub const SCALE_BYTES: usize = 4;
    /// Offset of the E4M3 codes in the record.
    pub const NOPE_OFFSET: usize = 0;
    /// Offset of the scales in the record.
    pub const SCALES_OFFSET: usize = NOPE_OFFSET + NOPE_DIM;
    /// Offset of the RoPE values in the record.
    pub const ROPE_OFFSET: usize = SCALES_OFFSET + NUM_SCALES * SCALE_BYTES;
    /// Bytes per token: 656.
    pub const BYTES_PER_TOKEN: usize = ROPE_OFFSET + ROPE_BYTES;
}

/// Byte offsets of the MODEL1 page block (a data region of 576-byte records, then a scale region of 8-byte records).
pub mod model1 {
    use super::ROPE_BYTES;

    /// Width of a K row (`d_qk`).
    pub const HEAD_DIM_K: usize = 512;
    /// Quantised (NoPE) columns.
    pub const NOPE_DIM: usize = 448;
    /// Columns per scale.
    pub const TILE: usize = 64;
    /// Scales per token.
    pub const NUM_SCALES: usize = NOPE_DIM / TILE;
    /// Offset of the E4M3 codes in a data record.
    pub const NOPE_OFFSET: usize = 0;
    /// Offset of the RoPE values in a data record.
    pub const ROPE_OFFSET: usize = NOPE_OFFSET + NOPE_DIM;
    /// Bytes of a token's data record (codes + RoPE): 576.
    pub const DATA_RECORD_BYTES: usize = ROPE_OFFSET + ROPE_BYTES;
    /// Bytes of a token's scale record (7 UE8M0 scales + 1 pad byte): 8.
    pub const SCALE_RECORD_BYTES: usize = NUM_SCALES + 1;
    /// Bytes per token: 584.
    pub const BYTES_PER_TOKEN: usize = DATA_RECORD_BYTES + SCALE_RECORD_BYTES;
    /// Page blocks are padded to a multiple of this many bytes by upstream's quantiser.
    pub const BLOCK_ALIGN: usize = 576;
}

/// How a layout stores its scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScaleFormat {
    /// Little-endian IEEE float32 (V3.2).
    F32,
    /// One byte, the power of two `2^(e − 127)` (MODEL1).
    Ue8m0,
}

impl ScaleFormat {
    /// Bytes of one scale.
    pub const fn bytes(self) -> usize {
        match self {
            ScaleFormat::F32 => v32::SCALE_BYTES,
            ScaleFormat::Ue8m0 => 1,
        }
    }
}

/// An FP8 KV-cache layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Layout {
    /// DeepSeek V3.2: `d_qk = 576`, 656 bytes per token.
    V32,
    /// MODEL1 (DeepSeek V4): `d_qk = 512` (the last 64 columns RoPE), 584 bytes per token.
    Model1,
}

/// Byte offsets of one token's three parts, from the start of its page block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenOffsets {
    /// First E4M3 code.
    pub nope: usize,
    /// First scale.
    pub scales: usize,
    /// First RoPE value.
    pub rope: usize,
}

/// The bytes of one token's three parts (lengths `nope_dim`, `num_scales · scale bytes`, 128).
#[derive(Clone, Copy, Debug)]
pub struct TokenBytes<'a> {
    /// The E4M3 codes.
    pub nope: &'a [u8],
    /// The scales.
    pub scales: &'a [u8],
    /// The RoPE values (little-endian bfloat16).
    pub rope: &'a [u8],
}

impl Fp8Layout {
    /// Both layouts.
    pub const ALL: [Fp8Layout; 2] = [Fp8Layout::V32, Fp8Layout::Model1];

    /// Short name: `v32`, `model1`.
    pub const fn name(self) -> &'static str {
        match self {
            Fp8Layout::V32 => "v32",
            Fp8Layout::Model1 => "model1",
        }
    }

    /// Parses `v32` / `v3.2`, `model1` / `v4`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "v32" | "v3.2" => Some(Fp8Layout::V32),
            "model1" | "v4" => Some(Fp8Layout::Model1),
            _ => None,
        }
    }

    /// The layout with this many bytes per token (656 or 584): how a cache's last dimension names its layout.
    pub fn from_bytes_per_token(bytes: usize) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.bytes_per_token() == bytes)
    }

    /// The layout whose K rows are `d` wide (576 or 512).
    pub fn from_head_dim_k(d: usize) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.head_dim_k() == d)
    }

    /// Bytes per token: 656 (V3.2) or 584 (MODEL1).
    pub const fn bytes_per_token(self) -> usize {
        match self {
            Fp8Layout::V32 => v32::BYTES_PER_TOKEN,
            Fp8Layout::Model1 => model1::BYTES_PER_TOKEN,
        }
    }

    /// Width of a K row and of a query (`d_qk`): 576 or 512.
    pub const fn head_dim_k(self) -> usize {
        match self {
            Fp8Layout::V32 => v32::HEAD_DIM_K,
            Fp8Layout::Model1 => model1::HEAD_DIM_K,
        }
    }

    /// Width of a V row: the first 512 columns of the K row in both layouts (for MODEL1 that includes the RoPE part).
    pub const fn head_dim_v(self) -> usize {
        HEAD_DIM_V
    }

    /// Quantised columns: 512 or 448.
    pub const fn nope_dim(self) -> usize {
        match self {
            Fp8Layout::V32 => v32::NOPE_DIM,
            Fp8Layout::Model1 => model1::NOPE_DIM,
        }
    }

    /// Columns per scale: 128 or 64.
    pub const fn tile(self) -> usize {
        match self {
            Fp8Layout::V32 => v32::TILE,
            Fp8Layout::Model1 => model1::TILE,
        }
    }

    /// Scales per token: 4 or 7.
    pub const fn num_scales(self) -> usize {
        self.nope_dim() / self.tile()
    }

    /// How the scales are stored.
    pub const fn scale_format(self) -> ScaleFormat {
        match self {
            Fp8Layout::V32 => ScaleFormat::F32,
            Fp8Layout::Model1 => ScaleFormat::Ue8m0,
        }
    }

    /// Upstream's default `softmax_scale`: `d_qk^-0.5`.
    pub fn default_softmax_scale(self) -> f32 {
        1.0 / (self.head_dim_k() as f32).sqrt()
    }

    /// Bytes the tokens of one page block occupy (`page_size · bytes_per_token`); `None` on overflow.
    pub fn block_bytes(self, page_size: usize) -> Option<usize> {
        page_size.checked_mul(self.bytes_per_token())
    }

    /// The stride between page blocks upstream's quantiser uses: [`Fp8Layout::block_bytes`], rounded up to a
    /// multiple of 576 bytes for MODEL1. `None` on overflow.
    pub fn padded_block_bytes(self, page_size: usize) -> Option<usize> {
        let bytes = self.block_bytes(page_size)?;
        match self {
            Fp8Layout::V32 => Some(bytes),
            Fp8Layout::Model1 => bytes.checked_next_multiple_of(model1::BLOCK_ALIGN),
        }
    }

    /// Where token `t` of a page block of `page_size` tokens lives (`t < page_size`; no overflow for blocks whose
    /// [`Fp8Layout::block_bytes`] fit in `usize`).
    pub const fn token_offsets(self, page_size: usize, t: usize) -> TokenOffsets {
        match self {
            Fp8Layout::V32 => {
                let base = t * v32::BYTES_PER_TOKEN;
                TokenOffsets {
                    nope: base + v32::NOPE_OFFSET,
                    scales: base + v32::SCALES_OFFSET,
                    rope: base + v32::ROPE_OFFSET,
                }
            }
            Fp8Layout::Model1 => {
                let data = t * model1::DATA_RECORD_BYTES;
                TokenOffsets {
                    nope: data + model1::NOPE_OFFSET,
                    scales: page_size * model1::DATA_RECORD_BYTES + t * model1::SCALE_RECORD_BYTES,
                    rope: data + model1::ROPE_OFFSET,
                }
            }
        }
    }

    /// Bytes of one token's scales.
    const fn scales_bytes(self) -> usize {
        self.num_scales() * self.scale_format().bytes()
    }

    /// Checks the block slice, the token index and the row length shared by the block-level functions.
    fn check_token(self, block_len: usize, page_size: usize, t: usize, row_len: usize, row: &str) -> Result<()> {
        if page_size == 0 || t >= page_size {
            return Err(Error::invalid("token", format!("an index in [0, page_size = {page_size})"), t));
        }
        let need = self
            .block_bytes(page_size)
            .ok_or_else(|| Error::invalid("page_size", "a block size that fits in usize", page_size))?;
        if block_len < need {
            return Err(Error::invalid(
                "block",
                format!("at least {need} bytes ({page_size} tokens of the {} layout)", self.name()),
                format!("{block_len} bytes"),
            ));
        }
        if row_len != self.head_dim_k() {
            return Err(Error::invalid(
                row,
                format!("{} values (d_qk of {})", self.head_dim_k(), self.name()),
                row_len,
            ));
        }
        Ok(())
    }

    /// The three parts of token `t` inside `block`.
    fn token_bytes(self, block: &[u8], page_size: usize, t: usize) -> TokenBytes<'_> {
        let o = self.token_offsets(page_size, t);
        TokenBytes {
            nope: &block[o.nope..o.nope + self.nope_dim()],
            scales: &block[o.scales..o.scales + self.scales_bytes()],
            rope: &block[o.rope..o.rope + ROPE_BYTES],
        }
    }

    /// Quantises one token row (`head_dim_k` values) into token `t` of a page block of `page_size` tokens.
    ///
    /// The values are used as given: upstream quantises a bfloat16 cache, so pass bfloat16-representable values to
    /// reproduce its bytes. The RoPE part is rounded to bfloat16 (nearest even). MODEL1's pad byte is written 0.
    pub fn quantize_token(self, values: &[f32], block: &mut [u8], page_size: usize, t: usize) -> Result<()> {
        self.check_token(block.len(), page_size, t, values.len(), "values")?;
        let o = self.token_offsets(page_size, t);
        let (nope, rope) = values.split_at(self.nope_dim());
        for (k, tile) in nope.chunks_exact(self.tile()).enumerate() {
            let scale = tile_scale(tile);
            let codes = &mut block[o.nope + k * self.tile()..][..self.tile()];
            for (c, &x) in codes.iter_mut().zip(tile) {
                // x / scale is exact (a power of two, far from f32's subnormals), so the E4M3 rounding is the only one.
                *c = if scale.is_nan() { E4M3_NAN_CODE } else { f32_to_e4m3(x / scale) };
            }
            match self.scale_format() {
                ScaleFormat::F32 => {
                    block[o.scales + k * v32::SCALE_BYTES..][..v32::SCALE_BYTES].copy_from_slice(&scale.to_le_bytes())
                }
                ScaleFormat::Ue8m0 => block[o.scales + k] = pow2_to_ue8m0(scale),
            }
        }
        if self == Fp8Layout::Model1 {
            block[o.scales + model1::NUM_SCALES] = 0;
        }
        for (pair, &x) in block[o.rope..o.rope + ROPE_BYTES].chunks_exact_mut(BF16_BYTES).zip(rope) {
            pair.copy_from_slice(&f32_to_bf16(x).to_le_bytes());
        }
        Ok(())
    }

    /// Dequantises token `t` of a page block of `page_size` tokens into `out` (`head_dim_k` values).
    pub fn dequantize_token(self, block: &[u8], page_size: usize, t: usize, out: &mut [f32]) -> Result<()> {
        self.check_token(block.len(), page_size, t, out.len(), "out")?;
        self.dequantize_parts(self.token_bytes(block, page_size, t), out)
    }

    /// Dequantises one token from its three parts (see [`Fp8Layout::token_offsets`]) into `out` (`head_dim_k`
    /// values): what a backend that holds raw pointers calls once per token row.
    pub fn dequantize_parts(self, parts: TokenBytes<'_>, out: &mut [f32]) -> Result<()> {
        let lens = [
            ("nope", parts.nope.len(), self.nope_dim()),
            ("scales", parts.scales.len(), self.scales_bytes()),
            ("rope", parts.rope.len(), ROPE_BYTES),
            ("out", out.len(), self.head_dim_k()),
        ];
        for (name, got, want) in lens {
            if got != want {
                return Err(Error::invalid(name, format!("{want} (the {} layout)", self.name()), got));
            }
        }
        let (out_nope, out_rope) = out.split_at_mut(self.nope_dim());
        for (k, (dst, codes)) in
            out_nope.chunks_exact_mut(self.tile()).zip(parts.nope.chunks_exact(self.tile())).enumerate()
        {
            let scale = match self.scale_format() {
                ScaleFormat::F32 => f32::from_le_bytes(
                    parts.scales[k * v32::SCALE_BYTES..][..v32::SCALE_BYTES].try_into().expect("4 bytes"),
                ),
                ScaleFormat::Ue8m0 => ue8m0_to_f32(parts.scales[k]),
            };
            for (d, &c) in dst.iter_mut().zip(codes) {
                *d = dequantize_value(c, scale);
            }
        }
        for (d, pair) in out_rope.iter_mut().zip(parts.rope.chunks_exact(BF16_BYTES)) {
            *d = bf16_to_f32(u16::from_le_bytes([pair[0], pair[1]]));
        }
        Ok(())
    }
}

impl std::fmt::Display for Fp8Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One dequantised value: `bf16(e4m3(code) · scale)`, the product in f32.
#[inline]
pub fn dequantize_value(code: u8, scale: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(e4m3_to_f32(code) * scale))
}

/// The scale the quantiser gives a tile: the smallest power of two `>= max(amax / 448, 1e-4)` (`amax / 448` an f32
/// division); NaN if the tile holds a NaN or an infinity.
pub fn tile_scale(tile: &[f32]) -> f32 {
    let mut amax = 0f32;
    for &x in tile {
        if !x.is_finite() {
            return f32::NAN;
        }
        amax = amax.max(x.abs());
    }
    pow2_ceil((amax / E4M3_MAX).max(MIN_SCALE))
}

/// The smallest power of two `>= v`, for a positive normal f32 whose result is finite.
fn pow2_ceil(v: f32) -> f32 {
    let bits = v.to_bits();
    if bits & F32_MANTISSA_MASK == 0 {
        v
    } else {
        // Clearing the mantissa gives the power of two below; one more in the exponent field doubles it.
        f32::from_bits((bits & !F32_MANTISSA_MASK) + (1 << F32_MANTISSA_BITS))
    }
}

/// UE8M0 byte of a scale from [`tile_scale`] (a normal power of two, or NaN).
fn pow2_to_ue8m0(scale: f32) -> u8 {
    if scale.is_nan() {
        return UE8M0_NAN;
    }
    debug_assert!(scale.is_normal() && scale.to_bits() & F32_MANTISSA_MASK == 0, "{scale} is not a power of two");
    // For a normal power of two the f32 exponent field is exactly the UE8M0 byte (both have bias 127).
    (scale.to_bits() >> F32_MANTISSA_BITS) as u8
}

/// The value of a UE8M0 byte: `2^(e − 127)`, NaN for `0xFF`. Exact in f32 (`2^-127` is an f32 subnormal).
pub fn ue8m0_to_f32(e: u8) -> f32 {
    match e {
        UE8M0_NAN => f32::NAN,
        0 => pow2_f32(-UE8M0_BIAS),
        _ => f32::from_bits((e as u32) << F32_MANTISSA_BITS),
    }
}

/// An FP8 cache in host memory: `num_blocks` page blocks of `page_size` tokens, `block_stride` bytes apart.
///
/// As a tensor it is `[num_blocks, page_size, 1, bytes_per_token]` bytes with strides
/// `[block_stride, bytes_per_token, bytes_per_token, 1]` (for MODEL1 that view's rows are not the tokens' bytes:
/// the layout of a block is the one in the module docs; the view only fixes the block's start and size).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fp8Cache {
    /// The layout.
    pub layout: Fp8Layout,
    /// Page blocks.
    pub num_blocks: usize,
    /// Tokens per page block.
    pub page_size: usize,
    /// Bytes from one block's start to the next (`>= layout.block_bytes(page_size)`).
    pub block_stride: usize,
    /// `num_blocks · block_stride` bytes.
    pub bytes: Vec<u8>,
}

impl Fp8Cache {
    /// A cache of zero bytes. `block_stride` `None` is upstream's ([`Fp8Layout::padded_block_bytes`]).
    pub fn zeroed(layout: Fp8Layout, num_blocks: usize, page_size: usize, block_stride: Option<usize>) -> Result<Self> {
        if page_size == 0 {
            return Err(Error::invalid("page_size", ">= 1", 0));
        }
        let overflow = || Error::invalid("page_size", "a cache size that fits in usize", page_size);
        let min = layout.block_bytes(page_size).ok_or_else(overflow)?;
        let stride = match block_stride {
            None => layout.padded_block_bytes(page_size).ok_or_else(overflow)?,
            Some(s) if s < min => {
                return Err(Error::invalid(
                    "block_stride",
                    format!(">= {min} bytes ({page_size} tokens of {layout})"),
                    s,
                ));
            }
            Some(s) => s,
        };
        let len = num_blocks.checked_mul(stride).ok_or_else(overflow)?;
        Ok(Fp8Cache { layout, num_blocks, page_size, block_stride: stride, bytes: vec![0; len] })
    }

    /// Quantises `values` (`[num_blocks, page_size, head_dim_k]`, row-major) into a new cache with upstream's
    /// block stride.
    pub fn quantize(layout: Fp8Layout, num_blocks: usize, page_size: usize, values: &[f32]) -> Result<Self> {
        let mut cache = Self::zeroed(layout, num_blocks, page_size, None)?;
        let d = layout.head_dim_k();
        let want = num_blocks.checked_mul(page_size).and_then(|n| n.checked_mul(d));
        if want != Some(values.len()) {
            return Err(Error::invalid(
                "values",
                format!("[{num_blocks}, {page_size}, {d}] = {want:?} values"),
                values.len(),
            ));
        }
        for (n, row) in values.chunks_exact(d).enumerate() {
            cache.quantize_token(n / page_size, n % page_size, row)?;
        }
        Ok(cache)
    }

    fn check_block(&self, block: usize) -> Result<()> {
        if block >= self.num_blocks {
            return Err(Error::invalid("block", format!("an index in [0, {})", self.num_blocks), block));
        }
        Ok(())
    }

    /// The bytes of page block `block` (`block_stride` of them).
    pub fn block(&self, block: usize) -> Result<&[u8]> {
        self.check_block(block)?;
        Ok(&self.bytes[block * self.block_stride..][..self.block_stride])
    }

    /// Quantises one token row into token `t` of page block `block`.
    pub fn quantize_token(&mut self, block: usize, t: usize, values: &[f32]) -> Result<()> {
        self.check_block(block)?;
        let bytes = &mut self.bytes[block * self.block_stride..][..self.block_stride];
        self.layout.quantize_token(values, bytes, self.page_size, t)
    }

    /// Dequantises token `t` of page block `block` into `out` (`head_dim_k` values).
    pub fn dequantize_token(&self, block: usize, t: usize, out: &mut [f32]) -> Result<()> {
        self.layout.dequantize_token(self.block(block)?, self.page_size, t, out)
    }

    /// Every token dequantised: `[num_blocks, page_size, head_dim_k]`, row-major.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        let d = self.layout.head_dim_k();
        let mut out = vec![0f32; self.num_blocks * self.page_size * d];
        for (n, row) in out.chunks_exact_mut(d).enumerate() {
            self.dequantize_token(n / self.page_size, n % self.page_size, row)?;
        }
        Ok(out)
    }

    /// Shape of the cache tensor: `[num_blocks, page_size, 1, bytes_per_token]`.
    pub fn shape(&self) -> [usize; 4] {
        [self.num_blocks, self.page_size, 1, self.layout.bytes_per_token()]
    }

    /// Strides (in bytes) of the cache tensor: `[block_stride, bytes_per_token, bytes_per_token, 1]`.
    pub fn strides(&self) -> [usize; 4] {
        let bpt = self.layout.bytes_per_token();
        [self.block_stride, bpt, bpt, 1]
    }

    /// The cache as a host tensor of bytes (dtype E4M3), to pass as `k_cache` or `extra_k_cache`.
    pub fn tensor(&self) -> Result<HostTensor<'_>> {
        HostTensor::strided::<u8>(&self.bytes, &self.shape(), Some(&self.strides()))
    }
}

/// Checks a values tensor `[num_blocks, page_size, 1, d_qk]` (f32 or bf16, last dimension contiguous, host) that
/// matches the cache `geo` of `layout`; returns its element type.
fn check_values(name: &str, v: &TensorDesc, layout: Fp8Layout, geo: &CacheGeometry) -> Result<ScalarType> {
    let d = layout.head_dim_k();
    let want = [geo.num_blocks as i64, geo.page_size as i64, 1, d as i64];
    if v.dims() != want {
        return Err(Error::invalid(
            format!("{name}.shape"),
            format!("{want:?} (the cache's blocks and tokens, d_qk {d} of {layout})"),
            v.shape_string(),
        ));
    }
    if !matches!(v.dtype(), ScalarType::F32 | ScalarType::Bf16) {
        return Err(Error::invalid(format!("{name}.dtype"), "f32 or bf16", v.dtype()));
    }
    if v.device() != Device::Host {
        return Err(Error::invalid(format!("{name}.device"), "host (quantisation runs on the CPU)", v.device()));
    }
    check_last_contiguous(name, v)?;
    check_memory(name, v, Device::Host)?;
    Ok(v.dtype())
}

/// Validates the two tensors of [`quantize_tensor`] / [`dequantize_tensor`]: the cache (host), the values matching
/// it, the output writable and disjoint from the input. Returns the layout, the cache geometry and the values'
/// element type.
fn check_cache_and_values(
    cache: &TensorDesc,
    values: &TensorDesc,
    cache_written: bool,
) -> Result<(Fp8Layout, CacheGeometry, ScalarType)> {
    let (layout, geo) = validate_cache("cache", cache, Device::Host)?;
    let dtype = check_values("values", values, layout, &geo)?;
    let (written, name) = if cache_written { (cache, "cache") } else { (values, "values") };
    check_writable(name, written)?;
    check_disjoint(&[Region::of("cache", cache, cache_written), Region::of("values", values, !cache_written)])?;
    Ok((layout, geo, dtype))
}

/// Byte address of element `[blk, t, 0, 0]` of a validated values tensor.
fn values_row(v: &TensorDesc, blk: usize, t: usize) -> *mut u8 {
    let off = blk as i64 * v.stride_slice()[0] + t as i64 * v.stride_slice()[1];
    (v.data() as *mut u8).wrapping_offset((off * v.dtype().size_bytes() as i64) as isize)
}

/// Quantises a host tensor `values [num_blocks, page_size, 1, d_qk]` (f32 or bf16, last dimension contiguous) into
/// the host cache `cache [num_blocks, page_size, 1, bytes_per_token]` (e4m3; the layout from
/// `bytes_per_token`), token by token as [`Fp8Layout::quantize_token`] (upstream's `quantize_k_cache`). Bytes
/// between page blocks are left as they are. Both tensors are validated first (the cache as `k_cache` is,
/// writable and disjoint from `values`); on an error nothing has been written.
pub fn quantize_tensor(values: &TensorDesc, cache: &TensorDesc) -> Result<()> {
    let (layout, geo, dtype) = check_cache_and_values(cache, values, true)?;
    let block_len = layout.block_bytes(geo.page_size).expect("validate_cache checked the block size");
    let mut row = vec![0f32; layout.head_dim_k()];
    for blk in 0..geo.num_blocks {
        // SAFETY: validation checked that every block's page_size · bytes_per_token bytes lie in the cache's extent
        // (blocks block_stride apart, non-overlapping), that the cache is writable host memory and that it overlaps
        // no other argument; the descriptor's constructor guarantees live memory of that extent.
        let block =
            unsafe { std::slice::from_raw_parts_mut((cache.data() as *mut u8).add(blk * geo.block_stride), block_len) };
        for t in 0..geo.page_size {
            // SAFETY: the row [blk, t, 0, 0..d_qk] lies in the validated values tensor, last dimension contiguous.
            unsafe { read_row(values_row(values, blk, t), dtype, &mut row) };
            layout.quantize_token(&row, block, geo.page_size, t)?;
        }
    }
    Ok(())
}

/// Dequantises the host cache `cache` into `values` (shapes as [`quantize_tensor`]; exact for bf16 values: every
/// dequantised value is a bfloat16). Validated first (`values` writable and disjoint from the cache).
pub fn dequantize_tensor(cache: &TensorDesc, values: &TensorDesc) -> Result<()> {
    let (layout, geo, dtype) = check_cache_and_values(cache, values, false)?;
    let block_len = layout.block_bytes(geo.page_size).expect("validate_cache checked the block size");
    let mut row = vec![0f32; layout.head_dim_k()];
    for blk in 0..geo.num_blocks {
        // SAFETY: as in `quantize_tensor`, read-only.
        let block =
            unsafe { std::slice::from_raw_parts((cache.data() as *const u8).add(blk * geo.block_stride), block_len) };
        for t in 0..geo.page_size {
            layout.dequantize_token(block, geo.page_size, t, &mut row)?;
            // SAFETY: as in `quantize_tensor`; `values` is writable and overlaps nothing else.
            unsafe { write_row(values_row(values, blk, t), dtype, &row) };
        }
    }
    Ok(())
}

/// Reads `row.len()` contiguous f32 or bf16 values.
///
/// # Safety
/// `p` points to `row.len()` readable values of `dtype` (f32, else bf16).
unsafe fn read_row(p: *const u8, dtype: ScalarType, row: &mut [f32]) {
    for (k, x) in row.iter_mut().enumerate() {
        // SAFETY: `k < row.len()` (caller's contract); host tensors may be unaligned.
        *x = unsafe {
            match dtype {
                ScalarType::F32 => p.cast::<f32>().add(k).read_unaligned(),
                _ => bf16_to_f32(p.cast::<u16>().add(k).read_unaligned()),
            }
        };
    }
}

/// Writes `row` as contiguous f32 or bf16 values.
///
/// # Safety
/// `p` points to `row.len()` writable values of `dtype` (f32, else bf16) that nothing else accesses.
unsafe fn write_row(p: *mut u8, dtype: ScalarType, row: &[f32]) {
    for (k, &x) in row.iter().enumerate() {
        // SAFETY: `k < row.len()` (caller's contract); host tensors may be unaligned.
        unsafe {
            match dtype {
                ScalarType::F32 => p.cast::<f32>().add(k).write_unaligned(x),
                _ => p.cast::<u16>().add(k).write_unaligned(f32_to_bf16(x)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::pow2_f64;

    /// Independent E4M3 decoder, from the format's definition, in f64.
    fn e4m3_f64(code: u8) -> f64 {
        let s = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let (e, m) = (((code >> 3) & 15) as i32, (code & 7) as f64);
        if e == 15 && m == 7.0 {
            return f64::NAN;
        }
        if e == 0 { s * m / 8.0 * pow2_f64(-6) } else { s * (1.0 + m / 8.0) * pow2_f64(e - 7) }
    }

    /// Nearest E4M3 code to `x` (|x| <= 448), ties to the even code, by search over every finite code.
    fn nearest_code(x: f64) -> u8 {
        let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
        let a = x.abs();
        let mut best = (0u8, f64::INFINITY);
        for c in 0u8..0x7F {
            let d = (e4m3_f64(c) - a).abs();
            if d < best.1 || (d == best.1 && c % 2 == 0) {
                best = (c, d);
            }
        }
        best.0 | sign
    }

    /// The quantiser's scale from its definition, in f64: the smallest power of two >= max(amax / 448, 1e-4), where
    /// amax / 448 is the f32 division.
    fn scale_f64(tile: &[f32]) -> f64 {
        let amax = tile.iter().fold(0f32, |m, x| m.max(x.abs()));
        let v = ((amax / 448.0).max(1e-4)) as f64;
        let mut s = pow2_f64(-40);
        while s < v {
            s *= 2.0;
        }
        s
    }

    /// SplitMix64 for test data.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// A bf16-representable value of random magnitude 2^[-20, 8) and sign.
        fn value(&mut self) -> f32 {
            let r = self.next();
            let mag = pow2_f32((r % 28) as i32 - 20) * (1.0 + ((r >> 8) % 1000) as f32 / 1000.0);
            let v = if r >> 63 == 1 { -mag } else { mag };
            bf16_to_f32(f32_to_bf16(v))
        }
    }

    #[test]
    fn layout_constants_match_upstream() {
        assert_eq!(v32::BYTES_PER_TOKEN, 656);
        assert_eq!((v32::SCALES_OFFSET, v32::ROPE_OFFSET), (512, 528));
        assert_eq!(model1::BYTES_PER_TOKEN, 584);
        assert_eq!((model1::ROPE_OFFSET, model1::DATA_RECORD_BYTES, model1::SCALE_RECORD_BYTES), (448, 576, 8));
        assert_eq!((Fp8Layout::V32.num_scales(), Fp8Layout::Model1.num_scales()), (4, 7));
        assert_eq!(Fp8Layout::from_bytes_per_token(656), Some(Fp8Layout::V32));
        assert_eq!(Fp8Layout::from_bytes_per_token(584), Some(Fp8Layout::Model1));
        assert_eq!(Fp8Layout::from_bytes_per_token(576), None);
        assert_eq!(Fp8Layout::from_head_dim_k(512), Some(Fp8Layout::Model1));
        // MODEL1 blocks: 64 tokens = 37376 bytes, padded to 65 · 576; 2 tokens = 1168, padded to 3 · 576.
        assert_eq!(Fp8Layout::Model1.padded_block_bytes(64), Some(37440));
        assert_eq!(Fp8Layout::Model1.padded_block_bytes(2), Some(1728));
        assert_eq!(Fp8Layout::V32.padded_block_bytes(3), Some(3 * 656));
        assert_eq!(
            Fp8Layout::Model1.token_offsets(2, 1),
            TokenOffsets { nope: 576, rope: 576 + 448, scales: 2 * 576 + 8 }
        );
        assert_eq!(Fp8Layout::V32.token_offsets(9, 2), TokenOffsets { nope: 1312, scales: 1824, rope: 1840 });
        assert_eq!(Fp8Layout::parse("V3.2"), Some(Fp8Layout::V32));
        assert_eq!(Fp8Layout::parse("v4"), Some(Fp8Layout::Model1));
    }

    #[test]
    fn ue8m0_decodes_every_byte() {
        for e in 0..=255u8 {
            let got = ue8m0_to_f32(e);
            if e == 0xFF {
                assert!(got.is_nan());
            } else {
                assert_eq!(got as f64, pow2_f64(e as i32 - 127), "byte {e}");
                if e > 0 {
                    assert_eq!(pow2_to_ue8m0(got), e);
                }
            }
        }
    }

    /// A V3.2 token written byte by byte from the layout table, then read back.
    #[test]
    fn v32_hand_built_token() {
        let page_size = 2;
        let mut block = vec![0u8; 2 * 656];
        let base = 656; // token 1
        block[base] = 0x38; // +1.0
        block[base + 1] = 0xB8; // -1.0
        block[base + 127] = 0x01; // 2^-9, last column of tile 0
        block[base + 128] = 0x7E; // 448, first column of tile 1
        block[base + 300] = 0x39; // 1.125, tile 2
        block[base + 511] = 0xC0; // -2.0, tile 3
        let scales = [0.5f32, 2.0, 1.0, 0.25];
        for (k, s) in scales.iter().enumerate() {
            block[base + 512 + 4 * k..][..4].copy_from_slice(&s.to_le_bytes());
        }
        block[base + 528] = 0xC0; // bf16 1.5 = 0x3FC0, little-endian
        block[base + 529] = 0x3F;
        block[base + 654] = 0x80; // bf16 -0.25 = 0xBE80, RoPE column 63
        block[base + 655] = 0xBE;
        let mut out = vec![f32::NAN; 576];
        Fp8Layout::V32.dequantize_token(&block, page_size, 1, &mut out).unwrap();
        let mut want = vec![0f32; 576];
        want[0] = 0.5;
        want[1] = -0.5;
        want[127] = pow2_f32(-10);
        want[128] = 896.0;
        want[300] = 1.125;
        want[511] = -0.5;
        want[512] = 1.5;
        want[575] = -0.25;
        assert_eq!(out, want);
        // Token 0 is all zero bytes: zero codes and zero scales.
        Fp8Layout::V32.dequantize_token(&block, page_size, 0, &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 0.0));
    }

    /// A MODEL1 block of two tokens written byte by byte from the layout table, then read back.
    #[test]
    fn model1_hand_built_block() {
        let page_size = 2;
        let mut block = vec![0u8; 1728];
        let data1 = 576; // token 1's data record
        block[data1] = 0x38; // 1.0
        block[data1 + 64] = 0xB0; // -0.5, tile 1
        block[data1 + 447] = 0x48; // 4.0, tile 6
        block[data1 + 448] = 0x00; // bf16 2.0 = 0x4000, little-endian
        block[data1 + 449] = 0x40;
        let scales1 = 2 * 576 + 8; // token 1's scale record
        let exps = [127u8, 128, 120, 127, 127, 127, 130]; // 1, 2, 2^-7, 1, 1, 1, 8
        block[scales1..scales1 + 7].copy_from_slice(&exps);
        block[scales1 + 7] = 0xAA; // the pad byte is never read
        // Token 0: one code and a NaN scale on tile 0, a plain value on tile 1.
        block[0] = 0x38;
        block[64] = 0x40; // 2.0
        block[2 * 576] = 0xFF;
        block[2 * 576 + 1] = 126; // 0.5
        let mut out = vec![0f32; 512];
        Fp8Layout::Model1.dequantize_token(&block, page_size, 1, &mut out).unwrap();
        let mut want = vec![0f32; 512];
        want[0] = 1.0;
        want[64] = -1.0;
        want[447] = 32.0;
        want[448] = 2.0;
        assert_eq!(out, want);
        Fp8Layout::Model1.dequantize_token(&block, page_size, 0, &mut out).unwrap();
        assert!(out[..64].iter().all(|x| x.is_nan()), "a NaN scale poisons its tile");
        assert_eq!(out[64], 1.0);
        assert!(out[65..].iter().all(|&x| x == 0.0));
    }

    /// Quantisation against its float64 definition: the scale is the power of two of the definition, every code is
    /// the nearest (ties to even) to x / scale, and dequantisation gives code · scale exactly.
    #[test]
    fn quantize_matches_float64_definition() {
        let mut rng = Rng(5);
        for layout in Fp8Layout::ALL {
            let (d, tile) = (layout.head_dim_k(), layout.tile());
            for page_size in [1, 3, 64] {
                let n = 3 * page_size;
                let mut values: Vec<f32> = (0..n * d).map(|_| rng.value()).collect();
                // Tiles of zeros, of one tiny value, and a tile whose amax / 448 is exactly a power of two.
                values[..tile].fill(0.0);
                values[d..d + tile].fill(0.0);
                values[d + 3] = 1e-30;
                values[2 * d + tile..2 * d + 2 * tile].fill(0.25);
                values[2 * d + tile + 5] = -448.0 * pow2_f32(-3);
                let cache = Fp8Cache::quantize(layout, 3, page_size, &values).unwrap();
                let deq = cache.dequantize().unwrap();
                for (r, row) in values.chunks_exact(d).enumerate() {
                    let block = cache.block(r / page_size).unwrap();
                    let o = layout.token_offsets(page_size, r % page_size);
                    for (k, t) in row[..layout.nope_dim()].chunks_exact(tile).enumerate() {
                        let s = scale_f64(t);
                        let stored = match layout.scale_format() {
                            ScaleFormat::F32 => {
                                f32::from_le_bytes(block[o.scales + 4 * k..][..4].try_into().unwrap()) as f64
                            }
                            ScaleFormat::Ue8m0 => pow2_f64(block[o.scales + k] as i32 - 127),
                        };
                        assert_eq!(stored, s, "{layout} row {r} tile {k}");
                        for (j, &x) in t.iter().enumerate() {
                            let col = k * tile + j;
                            let code = block[o.nope + col];
                            assert_eq!(code, nearest_code(x as f64 / s), "{layout} row {r} col {col} x {x}");
                            let exact = e4m3_f64(code) * s;
                            assert_eq!(deq[r * d + col] as f64, exact, "{layout} row {r} col {col}");
                            // The round trip is within half an E4M3 step at the tile's scale.
                            assert!((exact - x as f64).abs() <= s * pow2_f64(-10).max((x as f64 / s).abs() / 16.0));
                        }
                    }
                    // RoPE values pass through (they are bf16-representable here).
                    assert_eq!(&deq[r * d + layout.nope_dim()..(r + 1) * d], &row[layout.nope_dim()..]);
                }
            }
        }
    }

    #[test]
    fn dequantize_matches_float64_for_every_code_and_scale() {
        // Powers of two: the product is exact. Other float32 scales (V3.2 only): f32 product rounded to bf16.
        for layout in Fp8Layout::ALL {
            let mut block = vec![0u8; layout.padded_block_bytes(1).unwrap()];
            let o = layout.token_offsets(1, 0);
            let mut out = vec![0f32; layout.head_dim_k()];
            for scale_e in [0u8, 1, 100, 127, 135, 254] {
                let scale = ue8m0_to_f32(scale_e);
                for code in 0..=255u8 {
                    block[o.nope] = code;
                    match layout.scale_format() {
                        ScaleFormat::F32 => block[o.scales..o.scales + 4].copy_from_slice(&scale.to_le_bytes()),
                        ScaleFormat::Ue8m0 => block[o.scales] = scale_e,
                    }
                    layout.dequantize_token(&block, 1, 0, &mut out).unwrap();
                    let want = e4m3_f64(code) * scale as f64;
                    let want = half::bf16::from_f64(want).to_f64();
                    if want.is_nan() {
                        assert!(out[0].is_nan());
                    } else {
                        assert_eq!(out[0] as f64, want, "{layout} code {code:#04x} scale 2^{}", scale_e as i32 - 127);
                    }
                }
            }
        }
        assert_eq!(dequantize_value(0x38, 0.3), bf16_to_f32(f32_to_bf16(0.3)));
        assert_eq!(dequantize_value(0x39, 0.3), bf16_to_f32(f32_to_bf16(1.125f32 * 0.3)));
    }

    #[test]
    fn non_finite_tiles_are_stored_as_nan() {
        for layout in Fp8Layout::ALL {
            let d = layout.head_dim_k();
            let mut row: Vec<f32> = (0..d).map(|i| i as f32 / 100.0).collect();
            row[1] = f32::NAN;
            row[layout.tile() + 2] = f32::NEG_INFINITY;
            row[d - 1] = f32::NAN; // a NaN RoPE value stays NaN
            let mut cache = Fp8Cache::zeroed(layout, 1, 4, None).unwrap();
            cache.quantize_token(0, 2, &row).unwrap();
            let mut out = vec![0f32; d];
            cache.dequantize_token(0, 2, &mut out).unwrap();
            assert!(out[..2 * layout.tile()].iter().all(|x| x.is_nan()));
            assert!(out[2 * layout.tile()..d - 1].iter().all(|x| !x.is_nan()));
            assert!(out[d - 1].is_nan());
        }
    }

    #[test]
    fn bad_arguments_are_named() {
        let l = Fp8Layout::Model1;
        let mut block = vec![0u8; 100];
        let e = l.quantize_token(&[0.0; 512], &mut block, 2, 0).unwrap_err().to_string();
        assert!(e.contains("`block`") && e.contains("at least 1168 bytes"), "{e}");
        let e = l.quantize_token(&[0.0; 576], &mut vec![0u8; 1168], 2, 0).unwrap_err().to_string();
        assert!(e.contains("`values`: expected 512"), "{e}");
        let e = l.dequantize_token(&[0u8; 1168], 2, 2, &mut [0.0; 512]).unwrap_err().to_string();
        assert!(e.contains("`token`"), "{e}");
        let e = Fp8Cache::zeroed(Fp8Layout::V32, 2, 4, Some(2000)).unwrap_err().to_string();
        assert!(e.contains("`block_stride`: expected >= 2624"), "{e}");
        let e = Fp8Cache::quantize(Fp8Layout::V32, 1, 1, &[0.0; 10]).unwrap_err().to_string();
        assert!(e.contains("`values`"), "{e}");
        assert!(Fp8Cache::zeroed(Fp8Layout::V32, 1, 1, None).unwrap().block(1).is_err());
        let parts = TokenBytes { nope: &[0; 448], scales: &[0; 7], rope: &[0; 127] };
        let e = l.dequantize_parts(parts, &mut [0.0; 512]).unwrap_err().to_string();
        assert!(e.contains("`rope`: expected 128"), "{e}");
    }

    #[test]
    fn cache_tensor_view_covers_the_blocks() {
        let c = Fp8Cache::zeroed(Fp8Layout::Model1, 3, 64, None).unwrap();
        let t = c.tensor().unwrap().desc();
        assert_eq!(t.dims(), &[3, 64, 1, 584]);
        assert_eq!(t.stride_slice(), &[37440, 584, 584, 1]);
        // The view's extent reaches the last block's scale region: 2 blocks + 64 · 584 bytes.
        assert_eq!(t.extent_elements(), Some(2 * 37440 + 64 * 584));
    }
}
