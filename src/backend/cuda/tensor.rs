//! Device tensors: row-major matrices in f32 (activations, adapters, optimizer state), bf16
//! (frozen base matrices) or NF4 (frozen projection matrices for QLoRA), a bf16 lookup table kept
//! in host memory, and integer vectors with a host copy for validation.

use super::device::DeviceBuffer;
use super::host_table::HostTable;
use super::offload::{HostBuffer, HostBuffers};
use cudarc::driver::{CudaEvent, CudaStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The element type a tensor is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    /// bfloat16 bits.
    Bf16,
    /// Packed 4-bit NF4 codes with per-block absmax ([`Nf4Storage`]).
    Nf4,
    /// bfloat16 bits in host memory (a lookup table: only `embedding` reads it).
    HostBf16,
    /// f32 values moved to pinned host memory (an offloaded activation: only the backend's
    /// `fetch_stashed` and `settle` read it).
    Offloaded,
}

#[derive(Debug)]
pub enum Storage {
    F32(DeviceBuffer<f32>),
    Bf16(DeviceBuffer<u16>),
    Nf4(Box<Nf4Storage>),
    /// A frozen lookup table kept in pinned host memory as bf16 bits, read by the embedding
    /// kernel over the bus (an untied embedding table: 1 GiB of device memory saved on Llama 3).
    Host(HostTable),
    /// An f32 tensor moved to pinned host memory by `Backend::stash` (offload.rs).
    Offloaded(Box<Offloaded>),
}

/// An f32 tensor in pinned host memory, or on its way back to the device.
#[derive(Debug)]
pub struct Offloaded {
    /// The values.
    pub host: Option<HostBuffer>,
    /// While coming back: the device buffer being written and the event marking the copy's end.
    pub arriving: Option<(DeviceBuffer<f32>, CudaEvent)>,
    /// The compute stream, which frees `arriving`'s buffer.
    pub compute: Arc<CudaStream>,
    /// Where `host` goes when this is dropped (offload.rs): kept for reuse, never freed here.
    pub home: HostBuffers,
}

impl Drop for Offloaded {
    fn drop(&mut self) {
        // The buffer is freed on the compute stream: not before the copy into it has finished.
        if let Some((_, ready)) = &self.arriving {
            let _ = self.compute.wait(ready);
        }
        // A reuse waits for the copies that read it: cudarc's copies wait for the buffer's own
        // event; a recording is captured after the earlier copies finished
        // (`Offload::finish_copies`).
        if let Some(host) = self.host.take() {
            self.home
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(host);
        }
    }
}

/// An NF4 matrix on the device, laid out as src/quant/nf4.rs describes (and as its
/// `Nf4Tensor::storage_bytes` counts).
#[derive(Debug)]
pub struct Nf4Storage {
    /// ⌈n/2⌉ bytes, value 2k in the high nibble of byte k.
    pub packed: DeviceBuffer<u8>,
    pub absmax: DeviceAbsmax,
    /// Unique in the process: names these values in the dequantization scratch.
    pub id: u64,
}

impl Nf4Storage {
    pub fn new(packed: DeviceBuffer<u8>, absmax: DeviceAbsmax) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Nf4Storage {
            packed,
            absmax,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// The per-block absmax values of an [`Nf4Storage`].
#[derive(Debug)]
// One per NF4 matrix (a few hundred in a model): boxing the larger variant would save nothing.
#[allow(clippy::large_enum_variant)]
pub enum DeviceAbsmax {
    /// One f32 per block of 64 values.
    Plain(DeviceBuffer<f32>),
    /// Double quantized: one 8-bit code per block, one f32 scale per 256 codes, the 256-value
    /// map the codes index and the offset (one f32).
    Double {
        codes: DeviceBuffer<u8>,
        nested_absmax: DeviceBuffer<f32>,
        map: DeviceBuffer<f32>,
        offset: DeviceBuffer<f32>,
    },
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
            Storage::Nf4(_) => Dtype::Nf4,
            Storage::Host(_) => Dtype::HostBf16,
            Storage::Offloaded(_) => Dtype::Offloaded,
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
