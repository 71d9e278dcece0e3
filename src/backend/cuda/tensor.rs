//! Device tensors: row-major matrices in f32 (activations, adapters, optimizer state), bf16
//! (frozen base matrices) or NF4 (frozen projection matrices for QLoRA), bf16 matrices and NF4
//! codes kept in host memory (with the device copies passes brought over), and integer vectors
//! with a host copy for validation.

use super::device::{driver_error, DeviceBuffer};
use super::head_chunks::HeadChunks;
use super::host_table::HostTable;
use super::lock;
use super::offload::{HostBuffer, HostBuffers};
use crate::error::Result;
use cudarc::driver::{CudaEvent, CudaStream};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

/// The element type a tensor is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    /// bfloat16 bits.
    Bf16,
    /// Packed 4-bit NF4 codes with per-block absmax ([`Nf4Storage`]).
    Nf4,
    /// bfloat16 bits in host memory (`embedding` reads them over the bus, products read a
    /// device copy).
    HostBf16,
    /// f32 or bf16 values moved to pinned host memory (an offloaded activation: only the
    /// backend's `fetch_stashed`, `settle` and `download` read it).
    Offloaded,
}

#[derive(Debug)]
pub enum Storage {
    F32(DeviceBuffer<f32>),
    Bf16(DeviceBuffer<u16>),
    /// bf16 rows `pitch` values apart (`pitch > cols`): a product input with spare columns after
    /// each row, where an adapted product writes its adapter's term, or a projection matrix
    /// with spare columns and, past its rows, spare rows for its adapter's factors (fold.rs).
    /// Only products, `copy_rows`, `duplicate`, `download`, `stash` and the attention backward
    /// (its `out`) read it.
    Bf16Pitched {
        values: DeviceBuffer<u16>,
        pitch: usize,
    },
    Nf4(Box<Nf4Storage>),
    /// A frozen matrix kept in pinned host memory as bf16 bits: read by the embedding kernel
    /// over the bus, copied to the device for products (an untied embedding table, the output
    /// projection when the backend keeps it in host memory: 1 GiB of device memory each on
    /// Llama 3; the projection matrices of decoder layers kept there: 421 MiB a layer).
    Host {
        table: HostTable,
        /// Values from one row to the next: the columns, or more for a projection matrix laid
        /// out with spare columns and rows like `Bf16Pitched` (its device copies are too).
        pitch: usize,
        /// The output projection, which the loss reads a chunk of rows at a time: a pass brings
        /// it over in chunks (`chunks`) instead of whole.
        in_chunks: bool,
        /// The device copies passes brought over (`Backend::bring_to_device`); without one, a
        /// product copies the matrix for itself.
        copies: HostCopies,
        /// For `in_chunks`: the chunks a pass started bringing over, one queue per thread, taken
        /// by its loss.
        chunks: Mutex<HashMap<ThreadId, HeadChunks>>,
    },
    /// A tensor (f32 or bf16) moved to pinned host memory by `Backend::stash` (offload.rs).
    Offloaded(Box<Offloaded>),
}

impl Storage {
    /// A matrix in host memory holding `table` (rows `pitch` values apart), with no device
    /// copy; `in_chunks` for the output projection.
    pub fn host(table: HostTable, pitch: usize, in_chunks: bool) -> Self {
        Storage::Host {
            table,
            pitch,
            in_chunks,
            copies: Mutex::default(),
            chunks: Mutex::default(),
        }
    }
}

/// The device copies of a table in host memory that passes brought over
/// (`Backend::bring_to_device`), one per thread (a pass runs on one thread; a model's passes may
/// run on several at once, recording or not), each read by its thread's products until released.
pub type HostCopies = Mutex<HashMap<ThreadId, Arrival<u16>>>;

/// A device buffer being written by a copy on another stream. Dropped before the compute stream
/// waited for the copy, it is freed only after the copy: the compute stream waits first.
#[derive(Debug)]
pub struct Arrival<T> {
    /// The buffer (taken by `settle`).
    buffer: Option<DeviceBuffer<T>>,
    /// The event marking the copy's end, until the compute stream waits for it.
    copying: Option<CudaEvent>,
    /// The compute stream, which frees the buffer.
    compute: Arc<CudaStream>,
}

impl<T> Arrival<T> {
    pub fn new(buffer: DeviceBuffer<T>, ready: CudaEvent, compute: Arc<CudaStream>) -> Self {
        Arrival {
            buffer: Some(buffer),
            copying: Some(ready),
            compute,
        }
    }

    /// Makes the compute stream wait for the copy (the first time) and returns the buffer.
    pub fn wait(&mut self) -> Result<&DeviceBuffer<T>> {
        if let Some(ready) = &self.copying {
            // On failure the event stays, and dropping this waits for the copy again.
            self.compute
                .wait(ready)
                .map_err(driver_error("waiting for a copy to the device"))?;
            self.copying = None;
        }
        Ok(self.buffer.as_ref().expect("taken only by settle"))
    }

    /// Makes the compute stream wait for the copy and returns the buffer.
    pub fn settle(mut self) -> Result<DeviceBuffer<T>> {
        self.wait()?;
        Ok(self.buffer.take().expect("present above"))
    }
}

impl<T> Drop for Arrival<T> {
    fn drop(&mut self) {
        if let Some(ready) = &self.copying {
            let _ = self.compute.wait(ready);
        }
    }
}

/// A tensor moved to pinned host memory, or on its way back to the device.
#[derive(Debug)]
pub struct Offloaded {
    /// The bytes of its device values.
    pub host: Option<HostBuffer>,
    /// How they lay on the device, as they will again.
    pub layout: StashedLayout,
    /// While coming back: the device buffer being written.
    pub arriving: Option<Arriving>,
    /// Where `host` goes when this is dropped (offload.rs): kept for reuse, never freed here.
    pub home: HostBuffers,
}

/// The device storage an offloaded tensor had and gets back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StashedLayout {
    F32,
    Bf16,
    /// `Storage::Bf16Pitched` with this pitch.
    Bf16Pitched(usize),
}

/// The device buffer an offloaded tensor's values are coming back to.
#[derive(Debug)]
pub enum Arriving {
    F32(Arrival<f32>),
    Bf16(Arrival<u16>),
}

impl Drop for Offloaded {
    fn drop(&mut self) {
        // A reuse comes after the copies that read it: the unrecorded copies of activations run
        // in order on one copy stream, and a recording is captured after they finished
        // (`Offload::finish_copies`).
        if let Some(host) = self.host.take() {
            lock(&self.home).push(host);
        }
    }
}

/// An NF4 matrix on the device, laid out as src/quant/nf4.rs describes (and as its
/// `Nf4Tensor::storage_bytes` counts).
#[derive(Debug)]
pub struct Nf4Storage {
    /// ⌈n/2⌉ bytes, value 2k in the high nibble of byte k.
    pub codes: Nf4Codes,
    pub absmax: DeviceAbsmax,
    /// Unique in the process: names these values in the dequantization scratch.
    pub id: u64,
}

impl Nf4Storage {
    pub fn new(codes: Nf4Codes, absmax: DeviceAbsmax) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Nf4Storage {
            codes,
            absmax,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// Where an NF4 matrix's packed codes lie: on the device, or in pinned host memory (a decoder
/// layer kept there: its absmax values, ~3 % of its bytes, stay on the device), read by the
/// dequantization from a device copy a pass brought over.
#[derive(Debug)]
pub enum Nf4Codes {
    Device(DeviceBuffer<u8>),
    Host {
        /// The bytes in 16-bit words, in memory order (two bytes a word, the last one padded
        /// with 0 for an odd count): a device copy of the words holds the bytes as they were.
        table: HostTable,
        /// The byte count.
        bytes: usize,
        copies: HostCopies,
    },
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

    /// Values from the start of one row to the next (`cols` unless the rows have spare columns).
    pub fn pitch(&self) -> usize {
        match self.storage {
            Storage::Bf16Pitched { pitch, .. } | Storage::Host { pitch, .. } => pitch,
            _ => self.cols,
        }
    }

    pub fn dtype(&self) -> Dtype {
        match self.storage {
            Storage::F32(_) => Dtype::F32,
            Storage::Bf16(_) | Storage::Bf16Pitched { .. } => Dtype::Bf16,
            Storage::Nf4(_) => Dtype::Nf4,
            Storage::Host { .. } => Dtype::HostBf16,
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
