//! Kernel launches with arguments passed by value: device addresses and scalars, matching the
//! `extern "C"` signatures of kernels/README.md.

use super::device::{driver_error, Gpu};
use crate::error::Result;
use cudarc::driver::{result, sys, CudaFunction};
use std::ffi::c_void;

/// One kernel argument.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// A device address (`float*`, `const int*`, ...).
    Ptr(u64),
    I32(i32),
    I64(i64),
    U64(u64),
    F32(f32),
}

impl Arg {
    /// The argument's bytes in the low end of a 64-bit slot (the driver reads the parameter's
    /// own size from the slot's address; the target is little-endian).
    fn slot(self) -> u64 {
        match self {
            Arg::Ptr(p) | Arg::U64(p) => p,
            Arg::I32(x) => x as u32 as u64,
            Arg::I64(x) => x as u64,
            Arg::F32(x) => x.to_bits() as u64,
        }
    }
}

/// Grid and block shape, and the bytes of dynamic shared memory per block.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub shared: u32,
}

/// Threads of the elementwise and row kernels' blocks.
pub const BLOCK: u32 = 256;

/// The most blocks this backend puts along a grid's x (and, at most, y) dimension.
pub const MAX_GRID: usize = 65535;

/// Bytes of shared memory a block may use without opting in.
const STATIC_SHARED_LIMIT: u32 = 48 << 10;

impl Shape {
    /// Grid-stride elementwise kernels over `n` elements.
    pub fn elementwise(n: usize) -> Self {
        Shape {
            grid: (n.div_ceil(BLOCK as usize).clamp(1, MAX_GRID) as u32, 1, 1),
            block: BLOCK,
            shared: 0,
        }
    }

    /// One block per row.
    pub fn per_row(rows: usize) -> Self {
        Shape {
            grid: (rows as u32, 1, 1),
            block: BLOCK,
            shared: 0,
        }
    }

    pub fn grid(x: usize, y: usize, z: usize, block: u32) -> Self {
        Shape {
            grid: (x as u32, y as u32, z as u32),
            block,
            shared: 0,
        }
    }

    /// The same shape with `bytes` of dynamic shared memory per block.
    pub fn with_shared(self, bytes: usize) -> Self {
        Shape {
            shared: bytes as u32,
            ..self
        }
    }
}

/// Values a thread takes in the kernels with a 16-byte path over `cols`-wide rows
/// (kernels/pointwise.cu: the gated kernels' `gated_octets`, `cast_f32_bf16_rows`): 8 where
/// `cols` and every operand's row pitch are multiples of 8 and every operand's address is
/// 16-byte aligned, as the kernels test, else 4. `operands`: (row pitch in values, address).
pub fn values_a_thread(cols: usize, operands: impl IntoIterator<Item = (usize, u64)>) -> usize {
    let octets = cols % 8 == 0
        && operands
            .into_iter()
            .all(|(pitch, address)| pitch % 8 == 0 && address % 16 == 0);
    if octets {
        8
    } else {
        4
    }
}

/// Queues `f` on the GPU's stream.
///
/// # Safety
/// `args` must match the kernel's parameter list in count and types, and every address must
/// point to a live device allocation large enough for what the kernel reads and writes there.
pub unsafe fn launch(
    gpu: &Gpu,
    f: &CudaFunction,
    name: &str,
    shape: Shape,
    args: &[Arg],
) -> Result<()> {
    let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
    let mut params: Vec<*mut c_void> = slots
        .iter_mut()
        .map(|s| s as *mut u64 as *mut c_void)
        .collect();
    gpu.ctx.bind_to_thread().map_err(driver_error(name))?;
    if shape.shared > STATIC_SHARED_LIMIT {
        // Above 48 KiB a function must opt in to its dynamic shared memory.
        f.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shape.shared as i32,
        )
        .map_err(driver_error(name))?;
    }
    result::launch_kernel(
        f.cu_function(),
        shape.grid,
        (shape.block, 1, 1),
        shape.shared,
        gpu.stream().cu_stream(),
        &mut params,
    )
    .map_err(driver_error(name))
}

#[cfg(test)]
mod tests {
    use super::values_a_thread;

    #[test]
    fn eight_values_a_thread_only_where_every_operand_allows_them() {
        let aligned = [(4104, 0x1000), (14336, 0x7f00_0010)];
        assert_eq!(values_a_thread(14336, aligned), 8);
        assert_eq!(values_a_thread(14336, []), 8);
        assert_eq!(values_a_thread(14332, aligned), 4, "columns");
        assert_eq!(values_a_thread(14336, [(4100, 0x1000)]), 4, "a pitch");
        assert_eq!(values_a_thread(14336, [(4104, 0x1008)]), 4, "an address");
        assert_eq!(
            values_a_thread(136, [(136, 0x100), (144, 0x208)]),
            4,
            "one of two"
        );
    }
}
