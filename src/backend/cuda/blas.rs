//! Matrix products through cuBLASLt: bf16 or f32 operands, f32 accumulation, f32 output (bf16
//! for bf16 operands where the caller asks, rounded by cuBLAS's epilogue).
//!
//! cuBLASLt is column-major. A row-major `[r, c]` matrix read column-major is its transpose, so
//! the row-major product `C = op(A)·op(B)` is computed as the column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`:
//! B goes first, the transposition flags keep their meaning, and each leading dimension is the
//! row-major column count.
//!
//! Each distinct product (shape, transpositions, dtype, compute mode, operand alignments) is
//! planned once: its descriptors are made and cuBLASLt's heuristic picks an algorithm, and the
//! plan is kept. A call then only launches (`cublasGemmEx` asks the heuristic at every call),
//! and the same product always runs the same algorithm, whatever else the process has done.

use super::device::{driver_error, DeviceBuffer, Gpu};
use super::tensor::Dtype;
use crate::error::{Error, Result};
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::DevicePtr;
use std::collections::hash_map::{Entry, HashMap};
use std::ffi::c_void;
use std::sync::Mutex;

/// Scratch memory the algorithms may use (split-K partial sums); the heuristic picks among the
/// algorithms that fit. The products of a training step ask for at most 2 MiB.
const WORKSPACE_BYTES: usize = 8 << 20;

/// What a product's result is added to: `d = alpha·op(a)·op(b) + addend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addend {
    /// Nothing: `d` is overwritten.
    Nothing,
    /// The output's own values: `d += alpha·op(a)·op(b)`.
    Output,
    /// The matrix at this address, laid out like the output (same dtype, rows and pitch), left
    /// as it is: cuBLASLt reads it as its `C` and writes `D` elsewhere.
    Matrix(u64),
}

impl Addend {
    /// `beta` of cuBLASLt's `D = alpha·op(A)·op(B) + beta·C`.
    fn beta(self) -> f32 {
        match self {
            Addend::Nothing => 0.0,
            Addend::Output | Addend::Matrix(_) => 1.0,
        }
    }
}

/// A row-major matrix operand by device address.
#[derive(Debug, Clone, Copy)]
pub struct Operand {
    pub ptr: u64,
    pub dtype: Dtype,
    pub rows: usize,
    pub cols: usize,
    /// Elements from the start of one row to the next (at least `cols`).
    pub pitch: usize,
}

impl Operand {
    /// A matrix whose rows follow each other with no gap.
    pub fn dense(ptr: u64, dtype: Dtype, rows: usize, cols: usize) -> Self {
        Operand {
            ptr,
            dtype,
            rows,
            cols,
            pitch: cols,
        }
    }
}

fn data_type(d: Dtype) -> Result<sys::cudaDataType> {
    match d {
        Dtype::F32 => Ok(sys::cudaDataType::CUDA_R_32F),
        Dtype::Bf16 => Ok(sys::cudaDataType::CUDA_R_16BF),
        Dtype::Nf4 => Err(Error::InvalidArgument(
            "matmul: cuBLAS cannot read an NF4 matrix (it is dequantized to bf16 first)".into(),
        )),
        Dtype::HostBf16 | Dtype::Offloaded => Err(Error::InvalidArgument(
            "matmul: a matrix in host memory or an offloaded activation must be on the device \
             first"
                .into(),
        )),
    }
}

fn blas_error(what: String) -> impl FnOnce(lt::CublasError) -> Error {
    move |e| Error::Device(format!("cuBLASLt {what}: {e:?}"))
}

/// The largest power of two up to 256 that divides `ptr`: what the heuristic may assume.
fn alignment(ptr: u64) -> u32 {
    1 << ptr.trailing_zeros().min(8)
}

/// What makes two products the same to cuBLASLt: the column-major call's dimensions
/// `[m, k]·[k, n]`, its transpositions, dtypes, compute mode and operand alignments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Product {
    m: u64,
    n: u64,
    k: u64,
    trans_a: bool,
    trans_b: bool,
    bf16: bool,
    tf32: bool,
    /// C (= D) in bf16 (else f32).
    bf16_out: bool,
    /// Alignment in bytes of A, B and C (C is also the output D).
    align: [u32; 3],
    /// Leading dimensions (elements between columns) of A, B and C.
    ld: [u64; 3],
}

/// A planned product: its descriptors and the algorithm chosen for it.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// Layouts of A, B and C (= D).
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are host-side objects, only read by cuBLASLt calls made while the plan
// table's lock is held.
unsafe impl Send for Plan {}

impl Plan {
    fn new(handle: sys::cublasLtHandle_t, p: &Product) -> Result<Plan> {
        let what = || format!("planning [{}, {}]·[{}, {}]", p.m, p.k, p.k, p.n);
        let elem = if p.bf16 {
            sys::cudaDataType::CUDA_R_16BF
        } else {
            sys::cudaDataType::CUDA_R_32F
        };
        let compute = if p.tf32 {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let desc = lt::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F)
            .map_err(blas_error(what()))?;
        // From here on the plan owns what is made, so an early return frees it.
        let mut plan = Plan {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            // SAFETY: the algorithm is plain data (an array of integers); all zeros is a valid
            // value, replaced by the heuristic's choice below.
            algo: unsafe { std::mem::zeroed() },
        };
        // Stored shapes: op(A) is [m, k], op(B) is [k, n], each stored transposed when flagged.
        let stored = |t: bool, r: u64, c: u64| if t { (c, r) } else { (r, c) };
        let (ar, ac) = stored(p.trans_a, p.m, p.k);
        let (br, bc) = stored(p.trans_b, p.k, p.n);
        for (i, (ty, rows, cols)) in [
            (elem, ar, ac),
            (elem, br, bc),
            (
                if p.bf16_out {
                    sys::cudaDataType::CUDA_R_16BF
                } else {
                    sys::cudaDataType::CUDA_R_32F
                },
                p.m,
                p.n,
            ),
        ]
        .into_iter()
        .enumerate()
        {
            plan.layouts[i] = lt::create_matrix_layout(ty, rows, cols, p.ld[i].max(1) as i64)
                .map_err(blas_error(what()))?;
        }
        for (attr, t) in [
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                p.trans_a,
            ),
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                p.trans_b,
            ),
        ] {
            // CUBLAS_OP_T = 1, CUBLAS_OP_N = 0.
            let op = t as i32;
            // SAFETY: a live descriptor; the value is an i32 the size given.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    attr,
                    &op as *const i32 as *const c_void,
                    4,
                )
            }
            .map_err(blas_error(what()))?;
        }
        plan.algo = plan
            .choose_algorithm(handle, p)
            .map_err(blas_error(what()))?;
        Ok(plan)
    }

    /// The heuristic's first choice for `p` within the workspace and the operands' alignments.
    fn choose_algorithm(
        &self,
        handle: sys::cublasLtHandle_t,
        p: &Product,
    ) -> std::result::Result<sys::cublasLtMatmulAlgo_t, lt::CublasError> {
        use sys::cublasLtMatmulPreferenceAttributes_t as Pref;
        let pref = lt::create_matmul_pref()?;
        let workspace = WORKSPACE_BYTES as u64;
        let settings = [
            (
                Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &workspace as *const u64 as *const c_void,
                8,
            ),
            (
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                &p.align[0] as *const u32 as *const c_void,
                4,
            ),
            (
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                &p.align[1] as *const u32 as *const c_void,
                4,
            ),
            (
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                &p.align[2] as *const u32 as *const c_void,
                4,
            ),
            (
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                &p.align[2] as *const u32 as *const c_void,
                4,
            ),
        ];
        // SAFETY: live descriptors; each value lives across its call and has the size given.
        let chosen = unsafe {
            settings
                .iter()
                .try_for_each(|&(attr, value, size)| {
                    lt::set_matmul_pref_attribute(pref, attr, value, size)
                })
                .and_then(|()| {
                    let [a, b, c] = self.layouts;
                    lt::get_matmul_algo_heuristic(handle, self.desc, a, b, c, c, pref)
                })
        };
        // SAFETY: made above, used by nothing else.
        unsafe { lt::destroy_matmul_pref(pref) }?;
        Ok(chosen?.algo)
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was made by this plan and is destroyed once; null layouts
        // (a plan abandoned while being made) are skipped.
        unsafe {
            for l in self.layouts.into_iter().filter(|l| !l.is_null()) {
                let _ = lt::destroy_matrix_layout(l);
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// The stream a product is queued on, each with a workspace of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// [`Gpu::stream`], where all work runs in order.
    Compute,
    /// [`Gpu::side_stream`], beside it (aside.rs).
    Side,
}

/// One cuBLASLt handle, the plans of the products seen so far, and the algorithms' workspaces.
pub struct Blas {
    handle: sys::cublasLtHandle_t,
    plans: Mutex<HashMap<Product, Plan>>,
    workspace: DeviceBuffer<u8>,
    /// The side lane's, made for its first product.
    side_workspace: Mutex<Option<DeviceBuffer<u8>>>,
}

// SAFETY: a cuBLASLt handle may be used from any thread; the plans sit behind a lock.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

impl Blas {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Device(
                "the cuBLASLt library (libcublasLt.so) was not found; install the CUDA toolkit's \
                 cuBLAS or put it on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        gpu.ctx
            .bind_to_thread()
            .map_err(driver_error("binding the CUDA context"))?;
        let handle = lt::create_handle().map_err(blas_error("creating the handle".into()))?;
        let workspace = gpu.alloc::<u8>(WORKSPACE_BYTES, "the matrix products' workspace")?;
        Ok(Blas {
            handle,
            plans: Mutex::new(HashMap::new()),
            workspace,
            side_workspace: Mutex::new(None),
        })
    }

    /// Whether the side lane has its workspace: made here (ordered on the main stream) when it
    /// fits in device memory; false when it does not.
    pub fn side_workspace_fits(&self, gpu: &Gpu) -> Result<bool> {
        let mut side = self.side_workspace.lock().expect("no panic holds it");
        if side.is_none() {
            let what = "the side products' workspace";
            match gpu.alloc_on::<u8>(gpu.main_stream(), WORKSPACE_BYTES, what) {
                Ok(buffer) => *side = Some(buffer),
                Err(Error::OutOfMemory { .. }) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// The address of `lane`'s workspace.
    fn workspace(&self, gpu: &Gpu, lane: Lane) -> Result<u64> {
        let buffer_ptr = |b: &DeviceBuffer<u8>| b.slice.device_ptr(gpu.main_stream()).0;
        match lane {
            Lane::Compute => Ok(buffer_ptr(&self.workspace)),
            Lane::Side => match &*self.side_workspace.lock().expect("no panic holds it") {
                Some(b) => Ok(buffer_ptr(b)),
                None => Err(Error::Device(
                    "a product on the side stream before its workspace was made".into(),
                )),
            },
        }
    }

    /// `c = alpha·op(a)·op(b) + beta·c` with `c` `[m, n]`, f32 or (with bf16 `a` and `b`) bf16.
    /// `a` and `b` must share a dtype; with `tf32`, f32 operands are rounded to TF32 for the
    /// tensor cores.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        gpu: &Gpu,
        lane: Lane,
        a: Operand,
        trans_a: bool,
        b: Operand,
        trans_b: bool,
        alpha: f32,
        addend: Addend,
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
        let pitched = [a, b, c].iter().all(|o| o.pitch >= o.cols);
        let out_fits = c.dtype == Dtype::F32 || (c.dtype == Dtype::Bf16 && a.dtype == Dtype::Bf16);
        if k != kb || (c.rows, c.cols) != (m, n) || a.dtype != b.dtype || !out_fits || !pitched {
            return Err(Error::InvalidArgument(format!(
                "matmul: op(a) [{m}, {k}] ({:?}), op(b) [{kb}, {n}] ({:?}), c [{}, {}] ({:?}); \
                 row pitches {}, {}, {}",
                a.dtype, b.dtype, c.rows, c.cols, c.dtype, a.pitch, b.pitch, c.pitch
            )));
        }
        let bf16 = data_type(a.dtype)? == sys::cudaDataType::CUDA_R_16BF;
        // C, read with beta: the output itself unless another matrix is added.
        let read = match addend {
            Addend::Matrix(ptr) => ptr,
            Addend::Nothing | Addend::Output => c.ptr,
        };
        let beta = addend.beta();
        if m == 0 || n == 0 {
            return Ok(());
        }
        // The column-major call: Cᵀ [n, m] = op(B)ᵀ [n, k]·op(A)ᵀ [k, m].
        let product = Product {
            m: n as u64,
            n: m as u64,
            k: k as u64,
            trans_a: trans_b,
            trans_b: trans_a,
            bf16,
            tf32: tf32 && !bf16,
            bf16_out: c.dtype == Dtype::Bf16,
            align: [
                alignment(b.ptr),
                alignment(a.ptr),
                alignment(c.ptr).min(alignment(read)),
            ],
            // A row-major matrix with row pitch p is column-major with leading dimension p.
            ld: [b.pitch as u64, a.pitch as u64, c.pitch as u64],
        };
        let mut plans = self.plans.lock().expect("no panic holds it");
        let plan = match plans.entry(product) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Plan::new(self.handle, &product)?),
        };
        gpu.ctx
            .bind_to_thread()
            .map_err(driver_error("binding the CUDA context"))?;
        let workspace = self.workspace(gpu, lane)?;
        let stream = match lane {
            Lane::Compute => gpu.stream(),
            Lane::Side => gpu.side_stream(),
        };
        let [la, lb, lc] = plan.layouts;
        // SAFETY: the operands are live device allocations of at least (rows − 1)·pitch + cols
        // elements of their dtype (checked by the callers) at the alignments planned for; alpha
        // and beta are host scalars that outlive the call; the workspace is this handle's own.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b.ptr as *const c_void,
                la,
                a.ptr as *const c_void,
                lb,
                read as *const c_void,
                lc,
                c.ptr as *mut c_void,
                lc,
                &plan.algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(blas_error(format!(
            "matmul [{m}, {k}]·[{k}, {n}] ({:?})",
            a.dtype
        )))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        self.plans.lock().expect("no panic holds it").clear();
        // SAFETY: made in `new`, destroyed once, after every plan made with it.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}
