//! A thin safe layer over the `gemm` crate's packed, SIMD, multithreaded f32 kernels.

use gemm::Parallelism;

/// A read-only strided view: element (i, j) is `data[i·row_stride + j·col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix view out of bounds");
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// A column block `[rows, cols]` of a row-major matrix whose rows are `stride` apart.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Self {
        assert!(
            rows == 0 || data.len() >= (rows - 1) * stride + cols,
            "matrix view out of bounds"
        );
        MatRef {
            data,
            rows,
            cols,
            row_stride: stride,
            col_stride: 1,
        }
    }

    /// Rows `r0..r1` (no copy).
    pub fn rows(self, r0: usize, r1: usize) -> Self {
        assert!(r0 <= r1 && r1 <= self.rows, "row range out of bounds");
        MatRef {
            data: &self.data[(r0 * self.row_stride).min(self.data.len())..],
            rows: r1 - r0,
            ..self
        }
    }

    /// Columns `c0..c1` (no copy).
    pub fn cols(self, c0: usize, c1: usize) -> Self {
        assert!(c0 <= c1 && c1 <= self.cols, "column range out of bounds");
        MatRef {
            data: &self.data[(c0 * self.col_stride).min(self.data.len())..],
            cols: c1 - c0,
            ..self
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// Threads to use for one product: small products run on the calling thread.
pub fn parallelism(m: usize, n: usize, k: usize, threads: usize) -> Parallelism {
    if threads <= 1 || m * n * k < 64 * 64 * 64 {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    }
}

/// `c = alpha·a·b + (accumulate ? c : 0)` where `c` is a strided `[a.rows, b.cols]` block of
/// `c_data` with rows `c_stride` apart.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    a: MatRef,
    b: MatRef,
    alpha: f32,
    c_data: &mut [f32],
    c_stride: usize,
    accumulate: bool,
    par: Parallelism,
) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        c_data.len() >= (m - 1) * c_stride + n,
        "output view out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c_data[r * c_stride..r * c_stride + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every index the kernel touches inside the three slices
    // (a and b were bounds-checked when their views were built), and `c_data` is borrowed mutably.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c_data.as_mut_ptr(),
            1,
            c_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}
