//! Products with an NF4 base matrix: the matrix is dequantized a block of rows at a time into a
//! bounded f32 scratch (at most [`SCRATCH_VALUES`] values, or one row if rows are longer), and
//! each block enters the `gemm` kernels as a dense matrix. No f32 copy of the whole matrix exists.
//!
//! With W `[R, K]` cut into row blocks `W_j = W[r0..r1, :]`, the rows of W are either rows or
//! columns of the output, or the summed (inner) dimension of the product:
//!
//! ```text
//!     op(a) = W :   c[r0..r1, :]  = α·W_j·B          (+ c)      blocks fill disjoint rows of c
//!     op(a) = Wᵀ:   c            += α·W_jᵀ·B[r0..r1, :]         blocks add up over the inner dim
//!     op(b) = W :   c            += α·A[:, r0..r1]·W_j          blocks add up over the inner dim
//!     op(b) = Wᵀ:   c[:, r0..r1]  = α·A·W_jᵀ          (+ c)      blocks fill disjoint columns of c
//! ```
//!
//! Where blocks add up, the first one starts from `c` or from zero as asked and the others add to
//! it, so the result is the product with the whole dequantized matrix (summed in another order).

use super::gemm::{self, parallelism, MatRef};
use super::pool::BufferPool;
use super::CpuTensor;
use crate::error::Result;
use crate::quant::Nf4Tensor;

/// f32 values dequantized at once (4 MiB).
const SCRATCH_VALUES: usize = 1 << 20;

/// Which operand of `c = α·op(a)·op(b)` the NF4 matrix is.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    A,
    B,
}

/// The NF4 operand of a product: its values, its shape as a tensor, its side and transposition.
pub struct Nf4Operand<'a> {
    values: &'a Nf4Tensor,
    rows: usize,
    cols: usize,
    side: Side,
    trans: bool,
}

impl<'a> Nf4Operand<'a> {
    /// `values` as held by `tensor` (whose shape may be a reshape of the quantized one).
    pub fn new(values: &'a Nf4Tensor, tensor: &CpuTensor, side: Side, trans: bool) -> Self {
        Nf4Operand {
            values,
            rows: tensor.rows,
            cols: tensor.cols,
            side,
            trans,
        }
    }
}

/// `c = α·op(a)·op(b) + (accumulate ? c : 0)` where `w` is one operand and `other` the other one
/// with its transposition applied. Shapes are checked by the caller.
pub fn matmul(
    w: Nf4Operand,
    other: MatRef,
    alpha: f32,
    c: &mut CpuTensor,
    accumulate: bool,
    threads: usize,
    buffers: &BufferPool,
) -> Result<()> {
    if c.data.is_empty() {
        return Ok(());
    }
    let c_cols = c.cols;
    let product = |a: MatRef, b: MatRef, out: &mut [f32], acc: bool| {
        let par = parallelism(a.rows, b.cols, a.cols, threads);
        gemm::gemm(a, b, alpha, out, c_cols, acc, par);
    };
    let block_rows = (SCRATCH_VALUES / w.cols).clamp(1, w.rows);
    let mut scratch = buffers.uninit(block_rows * w.cols);
    for r0 in (0..w.rows).step_by(block_rows) {
        let r1 = (r0 + block_rows).min(w.rows);
        let values = &mut scratch[..(r1 - r0) * w.cols];
        w.values
            .dequantize_range_into(r0 * w.cols..r1 * w.cols, values)?;
        let block = MatRef::new(values, r1 - r0, w.cols);
        let add = accumulate || r0 > 0;
        match (w.side, w.trans) {
            (Side::A, false) => product(block, other, &mut c.data[r0 * c_cols..], accumulate),
            (Side::A, true) => product(block.t(), other.rows(r0, r1), &mut c.data, add),
            (Side::B, false) => product(other.cols(r0, r1), block, &mut c.data, add),
            (Side::B, true) => product(other, block.t(), &mut c.data[r0..], accumulate),
        }
    }
    Ok(())
}
