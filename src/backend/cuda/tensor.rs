//! Device tensors: row-major matrices in f32 (activations, adapters, optimizer state) or bf16
//! (frozen base matrices), and integer vectors with a host copy for validation.

use super::device::DeviceBuffer;

/// The element type a tensor is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    /// bfloat16 bits.
    Bf16,
}

#[derive(Debug)]
pub enum Storage {
    F32(DeviceBuffer<f32>),
    Bf16(DeviceBuffer<u16>),
}

/// A row-major `[rows, cols]` matrix on the GPU.
#[derive(Debug)]
pub struct CudaTensor {
    pub rows: usize,
    pub cols: usize,
    pub storage: Storage,
}

impl CudaTensor {
    pub fn elements(&self) -> usize {
        self.rows * self.cols
    }

    pub fn dtype(&self) -> Dtype {
        match self.storage {
            Storage::F32(_) => Dtype::F32,
            Storage::Bf16(_) => Dtype::Bf16,
        }
    }
}

/// 32-bit integers on the GPU plus the host values they were made from (ids and labels are
/// checked against the vocabulary on the host before a kernel reads them).
#[derive(Debug)]
pub struct CudaInts {
    pub device: DeviceBuffer<i32>,
    pub host: Vec<i32>,
}
