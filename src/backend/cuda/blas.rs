//! Matrix products through cuBLAS: bf16 or f32 operands, f32 output, f32 accumulation.
//!
//! cuBLAS is column-major. A row-major `[r, c]` matrix read column-major is its transpose, so the
//! row-major product `C = op(A)·op(B)` is computed as the column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`:
//! B goes first, the transposition flags keep their meaning, and each leading dimension is the
//! row-major column count.

use super::device::Gpu;
use super::tensor::Dtype;
use crate::error::{Error, Result};
use cudarc::cublas::{result as cublas, sys, CudaBlas};
use std::sync::Mutex;

/// A row-major matrix operand by device address.
#[derive(Debug, Clone, Copy)]
pub struct Operand {
    pub ptr: u64,
    pub dtype: Dtype,
    pub rows: usize,
    pub cols: usize,
}

/// One cuBLAS handle bound to the GPU's stream.
pub struct Blas {
    handle: Mutex<CudaBlas>,
}

fn data_type(d: Dtype) -> Result<sys::cudaDataType> {
    match d {
        Dtype::F32 => Ok(sys::cudaDataType::CUDA_R_32F),
        Dtype::Bf16 => Ok(sys::cudaDataType::CUDA_R_16BF),
        Dtype::Nf4 => Err(Error::InvalidArgument(
            "matmul: cuBLAS cannot read an NF4 matrix (it is dequantized to bf16 first)".into(),
        )),
        Dtype::HostBf16 => Err(Error::InvalidArgument(
            "matmul: a lookup table in host memory is read only by embedding".into(),
        )),
        Dtype::Offloaded => Err(Error::InvalidArgument(
            "matmul: an offloaded activation must be settled back on the device first".into(),
        )),
    }
}

impl Blas {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Device(
                "the cuBLAS library (libcublas.so) was not found; install the CUDA toolkit's \
                 cuBLAS or put it on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let blas = CudaBlas::new(gpu.stream.clone())
            .map_err(|e| Error::Device(format!("creating the cuBLAS handle: {e:?}")))?;
        Ok(Blas {
            handle: Mutex::new(blas),
        })
    }

    /// `c = alpha·op(a)·op(b) + beta·c` with `c` f32 `[m, n]`. `a` and `b` must share a dtype;
    /// with `tf32`, f32 operands are rounded to TF32 for the tensor cores.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        gpu: &Gpu,
        a: Operand,
        trans_a: bool,
        b: Operand,
        trans_b: bool,
        alpha: f32,
        beta: f32,
        c: Operand,
        tf32: bool,
    ) -> Result<()> {
        let (m, k) = if trans_a {
            (a.cols, a.rows)
        } else {
            (a.rows, a.cols)
        };
        let (kb, n) = if trans_b {
            (b.cols, b.rows)
        } else {
            (b.rows, b.cols)
        };
        if k != kb || (c.rows, c.cols) != (m, n) || a.dtype != b.dtype || c.dtype != Dtype::F32 {
            return Err(Error::InvalidArgument(format!(
                "matmul: op(a) [{m}, {k}] ({:?}), op(b) [{kb}, {n}] ({:?}), c [{}, {}] ({:?})",
                a.dtype, b.dtype, c.rows, c.cols, c.dtype
            )));
        }
        let dim = |x: usize| {
            i32::try_from(x).map_err(|_| {
                Error::InvalidArgument(format!("matmul dimension {x} exceeds cuBLAS's int range"))
            })
        };
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (a_type, b_type) = (data_type(a.dtype)?, data_type(b.dtype)?);
        let handle = self.handle.lock().expect("no panic holds it");
        gpu.ctx
            .bind_to_thread()
            .map_err(|e| Error::Device(format!("binding the CUDA context: {e}")))?;
        // SAFETY: the operands are live device allocations of at least rows·cols elements of their
        // dtype (checked by the callers), and alpha/beta are host scalars that outlive the call.
        unsafe {
            cublas::gemm_ex(
                *handle.handle(),
                op(trans_b),
                op(trans_a),
                dim(n)?,
                dim(m)?,
                dim(k)?,
                &alpha as *const f32 as *const _,
                b.ptr as *const _,
                b_type,
                dim(b.cols.max(1))?,
                a.ptr as *const _,
                a_type,
                dim(a.cols.max(1))?,
                &beta as *const f32 as *const _,
                c.ptr as *mut _,
                sys::cudaDataType::CUDA_R_32F,
                dim(n.max(1))?,
                if tf32 {
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
                } else {
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
                },
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            Error::Device(format!(
                "cuBLAS matmul [{m}, {k}]·[{k}, {n}] ({:?}): {e:?}",
                a.dtype
            ))
        })
    }
}
