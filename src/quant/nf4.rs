//! NF4 (4-bit NormalFloat) weights with double quantization, bit for bit as bitsandbytes stores
//! them (`quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`).
//!
//! # First level: NF4
//!
//! The flattened row-major matrix `x` (n = rows·cols values) is cut into blocks of
//! [`BLOCK`] = 64 values (the last block may be shorter). For block `b`:
//!
//! ```text
//!     M_b   = max_j |x_j|                                  (f32, the block's absmax)
//!     s_j   = x_j · (1 / M_b)                              (f32 reciprocal, then f32 product)
//!     q_j   = the index of the NF4 value nearest to s_j    (0..16)
//!     x'_j  = NF4[q_j] · M_b                               (dequantization, one f32 product)
//! ```
//!
//! "Nearest" is decided on 15 thresholds `T_i` between adjacent codes: `q` is the number of
//! thresholds with `s > T_i`, so a value exactly on a threshold takes the lower code. The thresholds
//! are those of bitsandbytes' CUDA decision tree (`dQuantizeNF4`): the midpoints of adjacent code
//! values, written as decimals and so rounded to f32 from the decimal. In 4 of the 15 places that is
//! one ulp away from the f32 midpoint `(NF4[i] + NF4[i+1]) · 0.5` which bitsandbytes' CPU path
//! (`bucketize`) compares against, so CPU and CUDA bitsandbytes disagree on exactly 4 f32 inputs
//! (measured on an H200; see the unit tests). We follow CUDA, where checkpoints come from.
//!
//! A block whose absmax is 0 stores the code of 0.0 (7) and dequantizes to exactly 0, as
//! bitsandbytes' CPU path does; its CUDA kernel computes 0 · (1/0) = NaN there and stores code 0
//! (-1 times the block's absmax, which is only about 0 once double quantized). That is the one
//! place where the packed bytes of a CUDA-quantized checkpoint differ from ours (tests/nf4.rs
//! checks both against bitsandbytes).
//!
//! Codes are packed two per byte, the **first** element of each pair in the **high** nibble:
//! `byte_k = q_{2k} << 4 | q_{2k+1}`. With an odd n the last low nibble is padding, the code of 0.0.
//!
//! # Second level: double quantization of the absmax values
//!
//! The f32 absmax values `M_b` (one per block) are stored in 8 bits:
//!
//! ```text
//!     c      = mean_b M_b                                  (the "offset", f32)
//!     d_b    = M_b - c                                     (f32)
//!     D_g    = max_{b in g} |d_b|     over groups g of NESTED_BLOCK = 256 values ("nested_absmax")
//!     t_b    = d_b · (1 / D_g)
//!     k_b    = the index of the dynamic-map value nearest to t_b            (u8)
//!     M'_b   = DYN[k_b] · D_g + c                          (two f32 operations, in this order)
//! ```
//!
//! `DYN` is bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`, see
//! [`dynamic_map`]). Nearest is again decided on f32 midpoints `(DYN[i] + DYN[i+1]) · 0.5`; a value
//! exactly on a midpoint takes the even index, as the binary search of bitsandbytes' CUDA kernel
//! (`dQuantize`) does. (bitsandbytes' *CPU* kernel instead looks `t_b` up in a 65536-entry table
//! over [-1, 1], which picks a neighbouring code when `t_b` lies within one table step, 3.05e-5, of
//! a midpoint; checkpoints in the wild come from the CUDA kernel.)
//!
//! The mean is computed in f64 and rounded once to f32. torch sums in f32 in an order that depends
//! on the device, so bitsandbytes' offset can be an ulp away: on the test fixture the CPU gave one
//! ulp above this mean and CUDA one below, for the same absmax values. Given bitsandbytes' offset
//! ([`DoubleQuant::quantize_with`]), the codes and nested absmax values match its CUDA kernel
//! exactly.
//!
//! Dequantization uses the block absmax `M'_b`: `x'_j = NF4[q_j] · M'_b`.
//!
//! # Error
//!
//! With exact absmax, `|x - x'| ≤ (G/2)·M_b` where `G` = [`NF4_MAX_GAP`] (0.3038, between -1 and
//! -0.696) is the widest gap between adjacent NF4 values, plus f32 rounding. Double quantization
//! moves `M_b` by at most `(H/2)·D_g` with `H` = [`DYNAMIC_MAX_GAP`] (0.0140625, the spacing of the
//! map's top decade), and since `|NF4[q]| ≤ 1` that adds at most as much to each value:
//! `|x - x'| ≤ (G/2)·M_b + (H/2)·D_g` (+ rounding).

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Values per NF4 block (one absmax each).
pub const BLOCK: usize = 64;

/// Absmax values per block of the second-level (8-bit) quantization.
pub const NESTED_BLOCK: usize = 256;

/// The NF4 code book: quantiles of N(0, 1) normalised to [-1, 1], with an exact 0 (QLoRA,
/// Dettmers et al. 2023, appendix E; bitsandbytes `get_4bit_type("nf4")`). Index = 4-bit code.
/// The digits are bitsandbytes' (each the shortest decimal of an f32 printed as a double).
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// The code of 0.0 in [`NF4_CODE`]: padding nibbles and all-zero blocks.
pub const NF4_ZERO_CODE: u8 = 7;

/// The decision thresholds between adjacent NF4 codes: `s > T_i` means a code above `i`. These
/// are the constants of bitsandbytes' CUDA decision tree (`dQuantizeNF4` in csrc/kernels.cu), its
/// digits, as f32.
#[allow(clippy::excessive_precision)]
pub const NF4_THRESHOLDS: [f32; 15] = [
    -0.848_096_400_499_343_9,
    -0.610_632_926_225_662_2,
    -0.459_995_269_775_390_6,
    -0.339_679_434_895_515_44,
    -0.234_607_405_960_559_84,
    -0.137_911_733_239_889_14,
    -0.045_525_018_125_772_476,
    0.039_790_149_778_127_67,
    0.120_255_250_483_751_3,
    0.203_521_251_678_466_8,
    0.292_013_771_831_989_3,
    0.389_312_535_524_368_3,
    0.501_663_416_624_069_2,
    0.642_786_920_070_648_2,
    0.861_478_418_111_801_1,
];

/// The widest gap between adjacent NF4 values (`NF4[1] - NF4[0]`).
pub const NF4_MAX_GAP: f32 = NF4_CODE[1] - NF4_CODE[0];

/// The widest gap between adjacent values of [`dynamic_map`]: its top decade holds the means of
/// 65 equally spaced points of [0.1, 1], spaced 0.9/64.
pub const DYNAMIC_MAX_GAP: f32 = 0.9 / 64.0;

/// The NF4 code nearest to `s` (normally in [-1, 1]): the number of thresholds below `s`, a binary
/// search making the comparisons of bitsandbytes' decision tree. A value on a threshold takes the
/// lower code; NaN gives 0.
#[inline]
pub fn nf4_code(s: f32) -> u8 {
    NF4_THRESHOLDS.partition_point(|&t| s > t) as u8
}

/// `torch.linspace(start, end, n)` in f32 as torch computes it: `step = (end - start) / (n - 1)`,
/// then `start + step·i` for the first half and `end - step·(n-1-i)` for the second, each a fused
/// multiply-add (one rounding; torch's CPU kernel is compiled that way, and two roundings give
/// different values for some points).
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    let step = (end - start) / (n - 1) as f32;
    (0..n)
        .map(|i| {
            if i < n / 2 {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)`), sorted ascending. For each decade `e = 0..7` it holds `±10^(e-6)·μ` for the
/// `2^e` means `μ` of adjacent points of `linspace(0.1, 1, 2^e + 1)`, all in f32; then 0 and 1.
/// That is 2·(1+2+...+64) + 2 = 256 values in [-0.993, 1].
///
/// Equal bit for bit to the map bitsandbytes 0.50 stored in both test fixtures (torch 2.15 on an
/// x86-64 CPU, torch 2.11 on the GPU host); a checkpoint carries the map it was quantized with
/// anyway, and dequantization uses that one.
pub fn dynamic_map() -> [f32; 256] {
    const SCALE: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut values = Vec::with_capacity(256);
    for (e, scale) in SCALE.iter().enumerate() {
        let scale = *scale as f32;
        let points = linspace_f32(0.1, 1.0, (1 << e) + 1);
        for pair in points.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            values.push(scale * mean);
            values.push(-(scale * mean));
        }
    }
    values.push(0.0);
    values.push(1.0);
    values.sort_by(f32::total_cmp);
    values.try_into().expect("256 values")
}

/// Nearest-value search over a sorted 256-entry map, as bitsandbytes' CUDA `dQuantize`.
struct MapSearch {
    /// `(map[i] + map[i+1]) · 0.5` in f32.
    midpoints: Vec<f32>,
}

impl MapSearch {
    fn new(map: &[f32; 256]) -> Self {
        MapSearch {
            midpoints: map.windows(2).map(|p| (p[0] + p[1]) * 0.5).collect(),
        }
    }

    /// The index `i` whose value is nearest to `t`. `t` between map[i] and map[i+1] goes to the
    /// side of its midpoint; exactly on the midpoint it goes to the even index of the two (the
    /// CUDA kernel's binary search always ends on an even pivot and keeps it on a tie). NaN → 0.
    fn index(&self, t: f32) -> u8 {
        let i = self.midpoints.partition_point(|&m| t > m);
        let tie_to_odd = i < self.midpoints.len() && t == self.midpoints[i] && i % 2 == 1;
        (if tie_to_odd { i + 1 } else { i }) as u8
    }
}

/// `x · (1/m)` as bitsandbytes scales a value by its block's absmax; 0 for an all-zero block, and a
/// plain quotient where `1/m` overflows (a subnormal absmax, which real weights never have).
#[inline]
fn scale_factor(m: f32) -> Option<f32> {
    if m == 0.0 {
        Some(0.0)
    } else {
        let inv = 1.0 / m;
        inv.is_finite().then_some(inv)
    }
}

#[inline]
fn scaled(x: f32, m: f32, inv: Option<f32>) -> f32 {
    match inv {
        Some(inv) => x * inv,
        None => x / m,
    }
}

/// The absmax values of the NF4 blocks, 8-bit quantized against their mean ("double
/// quantization"; bitsandbytes `compress_statistics=True`). See the module comment for the formulas.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    codes: Vec<u8>,
    nested_absmax: Vec<f32>,
    offset: f32,
    map: Box<[f32; 256]>,
}

impl DoubleQuant {
    /// Quantizes `absmax` (one value per NF4 block) with offset = their mean and the map of
    /// [`dynamic_map`].
    pub fn quantize(absmax: &[f32]) -> Result<Self> {
        if absmax.is_empty() {
            return Err(Error::InvalidArgument(
                "double quantization of an empty absmax list".into(),
            ));
        }
        let mean = absmax.iter().map(|&m| f64::from(m)).sum::<f64>() / absmax.len() as f64;
        Self::quantize_with(absmax, mean as f32, &dynamic_map())
    }

    /// Quantizes `absmax` around a given `offset` with a given sorted `map` (bitsandbytes'
    /// `quantize_blockwise(absmax - offset, code=map, blocksize=256)`).
    pub fn quantize_with(absmax: &[f32], offset: f32, map: &[f32; 256]) -> Result<Self> {
        if let Some(i) = absmax.iter().position(|m| !m.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "absmax[{i}] is {}, not finite",
                absmax[i]
            )));
        }
        if !offset.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "double-quantization offset {offset} is not finite"
            )));
        }
        if let Some(i) = map.windows(2).position(|p| p[0] >= p[1]) {
            return Err(Error::InvalidArgument(format!(
                "8-bit map is not strictly ascending at index {i} ({} then {})",
                map[i],
                map[i + 1]
            )));
        }
        let search = MapSearch::new(map);
        let mut codes = vec![0u8; absmax.len()];
        let mut nested_absmax = Vec::with_capacity(absmax.len().div_ceil(NESTED_BLOCK));
        for (group, out) in absmax
            .chunks(NESTED_BLOCK)
            .zip(codes.chunks_mut(NESTED_BLOCK))
        {
            // d_b = M_b - c; D_g = max |d_b|; k_b = nearest(d_b · (1/D_g)).
            let d_max = group
                .iter()
                .fold(0.0f32, |acc, &m| acc.max((m - offset).abs()));
            let inv = scale_factor(d_max);
            for (&m, code) in group.iter().zip(out.iter_mut()) {
                *code = search.index(scaled(m - offset, d_max, inv));
            }
            nested_absmax.push(d_max);
        }
        Ok(DoubleQuant {
            codes,
            nested_absmax,
            offset,
            map: Box::new(*map),
        })
    }

    /// Assembles stored parts (as read from a checkpoint), checking that there is one nested
    /// absmax per [`NESTED_BLOCK`] codes and that the floats are finite.
    pub fn from_parts(
        codes: Vec<u8>,
        nested_absmax: Vec<f32>,
        offset: f32,
        map: [f32; 256],
    ) -> Result<Self> {
        let groups = codes.len().div_ceil(NESTED_BLOCK);
        if nested_absmax.len() != groups {
            return Err(Error::InvalidArgument(format!(
                "{} absmax codes need {groups} nested absmax values (one per {NESTED_BLOCK}), found {}",
                codes.len(),
                nested_absmax.len()
            )));
        }
        if let Some(i) = nested_absmax.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "nested absmax[{i}] is {}, not finite",
                nested_absmax[i]
            )));
        }
        if !offset.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "double-quantization offset {offset} is not finite"
            )));
        }
        if let Some(i) = map.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "8-bit map[{i}] is {}, not finite",
                map[i]
            )));
        }
        Ok(DoubleQuant {
            codes,
            nested_absmax,
            offset,
            map: Box::new(map),
        })
    }

    /// One 8-bit code per NF4 block.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// One f32 scale per [`NESTED_BLOCK`] codes.
    pub fn nested_absmax(&self) -> &[f32] {
        &self.nested_absmax
    }

    /// The mean subtracted before quantizing.
    pub fn offset(&self) -> f32 {
        self.offset
    }

    /// The 8-bit map the codes index.
    pub fn map(&self) -> &[f32; 256] {
        &self.map
    }

    /// Number of absmax values (NF4 blocks).
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    /// `M'_b = DYN[k_b] · D_{b/256} + c`, rounded after each operation as bitsandbytes does.
    #[inline]
    pub fn value(&self, b: usize) -> f32 {
        self.map[self.codes[b] as usize] * self.nested_absmax[b / NESTED_BLOCK] + self.offset
    }

    /// All dequantized absmax values.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.codes.len()).map(|b| self.value(b)).collect()
    }
}

/// How the per-block absmax values of an [`Nf4Tensor`] are stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// f32, one per block (bitsandbytes `compress_statistics=False`).
    Plain(Vec<f32>),
    /// 8-bit double quantization (bitsandbytes `compress_statistics=True`, QLoRA's default).
    Double(DoubleQuant),
}

impl Absmax {
    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Double(d) => d.len(),
        }
    }

    /// Whether there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The absmax of block `b` as dequantization uses it.
    #[inline]
    pub fn value(&self, b: usize) -> f32 {
        match self {
            Absmax::Plain(v) => v[b],
            Absmax::Double(d) => d.value(b),
        }
    }

    /// The absmax values of `blocks`.
    pub fn values(&self, blocks: Range<usize>) -> Vec<f32> {
        blocks.map(|b| self.value(b)).collect()
    }
}

/// Values dequantized per parallel task.
const DEQUANT_CHUNK: usize = 1 << 16;

/// A row-major `rows × cols` matrix in NF4: packed 4-bit codes and per-block absmax values.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    rows: usize,
    cols: usize,
    packed: Vec<u8>,
    absmax: Absmax,
}

impl Nf4Tensor {
    /// Quantizes row-major `values` (`rows × cols`) to NF4 with double-quantized absmax, as
    /// bitsandbytes `quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)`.
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        let (packed, absmax) = quantize_nf4(values, rows, cols)?;
        let absmax = Absmax::Double(DoubleQuant::quantize(&absmax)?);
        Ok(Nf4Tensor {
            rows,
            cols,
            packed,
            absmax,
        })
    }

    /// Like [`Nf4Tensor::quantize`] but keeps the absmax values in f32 (`compress_statistics=False`).
    pub fn quantize_plain(values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        let (packed, absmax) = quantize_nf4(values, rows, cols)?;
        Ok(Nf4Tensor {
            rows,
            cols,
            packed,
            absmax: Absmax::Plain(absmax),
        })
    }

    /// Assembles stored parts, checking that `packed` holds ⌈n/2⌉ bytes and `absmax` one value per
    /// block of [`BLOCK`] (n = rows·cols), and that plain absmax values are finite.
    pub fn from_parts(rows: usize, cols: usize, packed: Vec<u8>, absmax: Absmax) -> Result<Self> {
        let n = element_count(rows, cols)?;
        if packed.len() != n.div_ceil(2) {
            return Err(Error::InvalidArgument(format!(
                "a {rows}x{cols} NF4 matrix packs into {} bytes, found {}",
                n.div_ceil(2),
                packed.len()
            )));
        }
        if absmax.len() != n.div_ceil(BLOCK) {
            return Err(Error::InvalidArgument(format!(
                "a {rows}x{cols} NF4 matrix has {} blocks of {BLOCK}, but {} absmax values",
                n.div_ceil(BLOCK),
                absmax.len()
            )));
        }
        if let Absmax::Plain(v) = &absmax {
            if let Some(i) = v.iter().position(|m| !m.is_finite()) {
                return Err(Error::InvalidArgument(format!(
                    "absmax[{i}] is {}, not finite",
                    v[i]
                )));
            }
        }
        Ok(Nf4Tensor {
            rows,
            cols,
            packed,
            absmax,
        })
    }

    /// Rows (output features of a linear layer).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether the matrix has no values (never true for a constructed tensor).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The packed codes: ⌈n/2⌉ bytes, value `2k` in the high nibble of byte `k`, `2k+1` in the low.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The per-block absmax values, as stored.
    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }

    /// The 4-bit code of value `i` (row-major).
    #[inline]
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i % 2 == 0 {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// Bytes held: packed codes plus absmax storage.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(v) => 4 * v.len(),
                Absmax::Double(d) => d.len() + 4 * d.nested_absmax.len() + 4 + 4 * 256,
            }
    }

    /// The whole matrix in f32: `x'_j = NF4[q_j] · M'_{j/64}`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.dequantize_rows_into(0..self.rows, &mut out)
            .expect("whole range");
        out
    }

    /// Rows `rows` in f32 (`rows.len() × cols` values).
    pub fn dequantize_rows(&self, rows: Range<usize>) -> Result<Vec<f32>> {
        let len = rows.end.saturating_sub(rows.start) * self.cols;
        let mut out = vec![0.0; len];
        self.dequantize_rows_into(rows, &mut out)?;
        Ok(out)
    }

    /// Dequantizes rows `rows` into `out` (`rows.len() × cols` values). A row range may start and
    /// end inside a block; each value uses its own block's absmax.
    pub fn dequantize_rows_into(&self, rows: Range<usize>, out: &mut [f32]) -> Result<()> {
        if rows.start > rows.end || rows.end > self.rows {
            return Err(Error::InvalidArgument(format!(
                "row range {}..{} is outside the {} rows of the NF4 matrix",
                rows.start, rows.end, self.rows
            )));
        }
        self.dequantize_range_into(rows.start * self.cols..rows.end * self.cols, out)
    }

    /// Dequantizes the values `range` of the flattened row-major matrix into `out`
    /// (`range.len()` values).
    pub fn dequantize_range_into(&self, range: Range<usize>, out: &mut [f32]) -> Result<()> {
        let (start, end) = (range.start, range.end);
        if start > end || end > self.len() {
            return Err(Error::InvalidArgument(format!(
                "value range {start}..{end} is outside the {} values of the {}x{} NF4 matrix",
                self.len(),
                self.rows,
                self.cols
            )));
        }
        if out.len() != end - start {
            return Err(Error::InvalidArgument(format!(
                "values {start}..{end} of the NF4 matrix need an output of {} values, found {}",
                end - start,
                out.len()
            )));
        }
        if start == end {
            return Ok(());
        }
        // The absmax of every block the range touches, computed once.
        let first_block = start / BLOCK;
        let scales = self.absmax.values(first_block..(end - 1) / BLOCK + 1);
        out.par_chunks_mut(DEQUANT_CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let base = start + c * DEQUANT_CHUNK;
                for (k, y) in chunk.iter_mut().enumerate() {
                    let i = base + k;
                    *y = NF4_CODE[self.code(i) as usize] * scales[i / BLOCK - first_block];
                }
            });
        Ok(())
    }
}

fn element_count(rows: usize, cols: usize) -> Result<usize> {
    match rows.checked_mul(cols) {
        Some(n) if n > 0 => Ok(n),
        Some(_) => Err(Error::InvalidArgument(format!(
            "an NF4 matrix needs at least one value, shape is {rows}x{cols}"
        ))),
        None => Err(Error::InvalidArgument(format!(
            "NF4 matrix shape {rows}x{cols} overflows"
        ))),
    }
}

/// Checks that `values` fill a non-empty `rows × cols` matrix and are all finite, as NF4
/// quantization (here or on a device) needs.
pub fn check_quantizable(values: &[f32], rows: usize, cols: usize) -> Result<()> {
    let n = element_count(rows, cols)?;
    if values.len() != n {
        return Err(Error::InvalidArgument(format!(
            "NF4 quantization of a {rows}x{cols} matrix got {} values",
            values.len()
        )));
    }
    if let Some(i) = values.par_iter().position_first(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "cannot quantize to NF4: value at row {}, column {} is {}",
            i / cols,
            i % cols,
            values[i]
        )));
    }
    Ok(())
}

/// The first level: packed codes and the f32 absmax of every block.
fn quantize_nf4(values: &[f32], rows: usize, cols: usize) -> Result<(Vec<u8>, Vec<f32>)> {
    let n = element_count(rows, cols)?;
    check_quantizable(values, rows, cols)?;
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0.0f32; n.div_ceil(BLOCK)];
    // A block of 64 values fills exactly 32 bytes, so blocks are independent tasks.
    packed
        .par_chunks_mut(BLOCK / 2)
        .zip(values.par_chunks(BLOCK))
        .zip(absmax.par_iter_mut())
        .with_min_len(256)
        .for_each(|((bytes, block), m)| *m = quantize_block(block, bytes));
    Ok((packed, absmax))
}

/// Quantizes one block into its bytes and returns its absmax.
fn quantize_block(block: &[f32], bytes: &mut [u8]) -> f32 {
    let m = block.iter().fold(0.0f32, |acc, v| acc.max(v.abs()));
    let inv = scale_factor(m);
    for (pair, byte) in block.chunks(2).zip(bytes.iter_mut()) {
        let high = nf4_code(scaled(pair[0], m, inv));
        let low = pair
            .get(1)
            .map_or(NF4_ZERO_CODE, |&x| nf4_code(scaled(x, m, inv)));
        *byte = high << 4 | low;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_the_code_midpoints_within_an_ulp() {
        assert!(NF4_THRESHOLDS.windows(2).all(|p| p[0] < p[1]));
        let mut off_by_one = Vec::new();
        for (i, &t) in NF4_THRESHOLDS.iter().enumerate() {
            let mid = (NF4_CODE[i] + NF4_CODE[i + 1]) * 0.5;
            let ulps = (t.to_bits() as i64 - mid.to_bits() as i64).abs();
            assert!(ulps <= 1, "threshold {i}: {t} vs midpoint {mid}");
            if ulps == 1 {
                off_by_one.push(i);
            }
        }
        assert_eq!(off_by_one, [0, 8, 12, 14]);
    }

    /// Codes bitsandbytes 0.50.2 gave on an H200 (CUDA) for values on and one ulp either side of
    /// each threshold and each f32 midpoint (in a block whose absmax is 1, so s = x). Its CPU path
    /// differs at exactly four of them: 0xbf591cd8 → 0, 0x3df64863 → 9, 0x3f006d04 → 12,
    /// 0x3f5c89da → 14.
    #[test]
    fn nf4_codes_match_bitsandbytes_cuda_at_every_threshold() {
        const CUDA: [(u32, u8); 49] = [
            (0xbf591cda, 0),
            (0xbf591cd9, 0),
            (0xbf591cd8, 1),
            (0xbf591cd7, 1),
            (0xbf1c5271, 1),
            (0xbf1c5270, 1),
            (0xbf1c526f, 2),
            (0xbeeb8481, 2),
            (0xbeeb8480, 2),
            (0xbeeb847f, 3),
            (0xbeadea77, 3),
            (0xbeadea76, 3),
            (0xbeadea75, 4),
            (0xbe703ced, 4),
            (0xbe703cec, 4),
            (0xbe703ceb, 5),
            (0xbe0d38bd, 5),
            (0xbe0d38bc, 5),
            (0xbe0d38bb, 6),
            (0xbd3a7872, 6),
            (0xbd3a7871, 6),
            (0xbd3a7870, 7),
            (0x3d22fafe, 7),
            (0x3d22faff, 7),
            (0x3d22fb00, 8),
            (0x3df64861, 8),
            (0x3df64862, 8),
            (0x3df64863, 8),
            (0x3df64864, 9),
            (0x3e5067df, 9),
            (0x3e5067e0, 9),
            (0x3e5067e1, 10),
            (0x3e9582d3, 10),
            (0x3e9582d4, 10),
            (0x3e9582d5, 11),
            (0x3ec753f8, 11),
            (0x3ec753f9, 11),
            (0x3ec753fa, 12),
            (0x3f006d02, 12),
            (0x3f006d03, 12),
            (0x3f006d04, 13),
            (0x3f006d05, 13),
            (0x3f248dae, 13),
            (0x3f248daf, 13),
            (0x3f248db0, 14),
            (0x3f5c89d8, 14),
            (0x3f5c89d9, 14),
            (0x3f5c89da, 15),
            (0x3f5c89db, 15),
        ];
        for (bits, code) in CUDA {
            assert_eq!(nf4_code(f32::from_bits(bits)), code, "{bits:#010x}");
        }
        // Through the whole quantizer too: [1.0, x, 0, ...] blocks.
        let mut w = vec![0.0f32; CUDA.len() * BLOCK];
        for (k, (bits, _)) in CUDA.iter().enumerate() {
            w[k * BLOCK] = 1.0;
            w[k * BLOCK + 1] = f32::from_bits(*bits);
        }
        let q = Nf4Tensor::quantize_plain(&w, CUDA.len(), BLOCK).unwrap();
        for (k, (bits, code)) in CUDA.iter().enumerate() {
            assert_eq!(q.code(k * BLOCK + 1), *code, "{bits:#010x}");
        }
    }

    #[test]
    fn nf4_code_ties_and_extremes() {
        for (i, &t) in NF4_THRESHOLDS.iter().enumerate() {
            assert_eq!(nf4_code(t) as usize, i, "a tie takes the lower code");
            let above = if t > 0.0 {
                t.to_bits() + 1
            } else {
                t.to_bits() - 1
            };
            assert_eq!(nf4_code(f32::from_bits(above)) as usize, i + 1);
        }
        for (i, &c) in NF4_CODE.iter().enumerate() {
            assert_eq!(nf4_code(c) as usize, i);
        }
        assert_eq!(nf4_code(1.5), 15);
        assert_eq!(nf4_code(-1.5), 0);
        assert_eq!(nf4_code(f32::NAN), 0);
        assert_eq!(nf4_code(0.0), NF4_ZERO_CODE);
        assert_eq!(nf4_code(-0.0), NF4_ZERO_CODE);
    }

    #[test]
    fn dynamic_map_shape() {
        let map = dynamic_map();
        assert!(map.windows(2).all(|p| p[0] < p[1]));
        assert_eq!(map[127], 0.0);
        assert_eq!(map[255], 1.0);
        assert!((map[0] + 0.992_968_75).abs() < 1e-6, "{}", map[0]);
        let gap = map.windows(2).map(|p| p[1] - p[0]).fold(0.0f32, f32::max);
        assert!((gap - DYNAMIC_MAX_GAP).abs() < 1e-6, "{gap}");
    }

    #[test]
    fn map_search_ties_go_to_the_even_index() {
        let map = dynamic_map();
        let search = MapSearch::new(&map);
        for i in 0..255 {
            let mid = (map[i] + map[i + 1]) * 0.5;
            let even = if i % 2 == 0 { i } else { i + 1 };
            assert_eq!(search.index(mid) as usize, even);
            assert_eq!(search.index(map[i]) as usize, i);
        }
        assert_eq!(search.index(f32::NAN), 0);
        assert_eq!(search.index(-1.0), 0);
        assert_eq!(search.index(2.0), 255);
    }
}
