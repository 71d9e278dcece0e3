//! Products whose inner dimension is a LoRA rank (kernels/lowrank.cu): the rank expansion
//! `c = alpha·a·B (+ c)` of the adapters' up-projection `xa·Bᵀ` and of `dxa·A` in the backward
//! pass. They write a full activation-sized `c` from a few multiply-adds per value; cuBLAS runs
//! them at about half the memory bandwidth (bench/NOTES.md), the kernel at the speed of the
//! stores.

use super::launch::{Arg, Shape, MAX_GRID};
use super::{CudaBackend, CudaTensor};
use crate::error::Result;

/// Threads per block and the rows a block covers (kernels/lowrank.cu).
const THREADS: usize = 128;
const EXPAND_ROWS: usize = 32;

/// The kernel for rank `k` (the smallest template rank holding it), if one does.
fn expand_kernel(k: usize) -> Option<&'static str> {
    match k {
        1..=8 => Some("lowrank_expand_r8"),
        9..=16 => Some("lowrank_expand_r16"),
        17..=32 => Some("lowrank_expand_r32"),
        _ => None,
    }
}

impl CudaBackend {
    /// `c = alpha·a·op(b) (+ c when accumulate)` for f32 `a` (rows×k, not transposed) and `b`
    /// (k×cols, or cols×k when `trans_b`) when `k` is a rank the kernel takes and `c`'s rows
    /// are whole 16-byte groups; returns whether it ran (else nothing was queued).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lowrank_expand(
        &self,
        a: &CudaTensor,
        b: &CudaTensor,
        trans_b: bool,
        alpha: f32,
        c: &mut CudaTensor,
        accumulate: bool,
    ) -> Result<bool> {
        let (rows, cols, k) = (c.rows, c.cols, a.cols);
        let out = self.ptr(c)?;
        let Some(kernel) = expand_kernel(k) else {
            return Ok(false);
        };
        let b_shape = if trans_b {
            (b.cols, b.rows)
        } else {
            (b.rows, b.cols)
        };
        // Mismatched shapes are left to the general product, which names them.
        let fits = a.rows == rows && b_shape == (k, cols) && rows > 0;
        if !fits || cols % 4 != 0 || out % 16 != 0 || rows.div_ceil(EXPAND_ROWS) > MAX_GRID {
            return Ok(false);
        }
        let shape = Shape::grid(
            cols.div_ceil(4 * THREADS),
            rows.div_ceil(EXPAND_ROWS),
            1,
            THREADS as u32,
        );
        let args = [
            Arg::Ptr(self.ptr(a)?),
            Arg::Ptr(self.ptr(b)?),
            Arg::Ptr(out),
            Arg::I32(rows as i32),
            Arg::I32(cols as i32),
            Arg::I32(k as i32),
            Arg::I32(trans_b as i32),
            Arg::F32(alpha),
            Arg::F32(if accumulate { 1.0 } else { 0.0 }),
        ];
        self.run("lowrank", kernel, shape, &args)?;
        Ok(true)
    }
}
