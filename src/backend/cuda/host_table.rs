//! A frozen table in pinned host memory mapped into the GPU's address space: kernels read the
//! rows they look up straight over the bus, so the table costs no device memory and a step
//! needs no host-side gather (the embedding kernel reads `table[ids[t]]` itself, which also lets
//! a recorded step replay with other ids); products read a device copy made for the step.

use super::device::{driver_error, Gpu};
use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaStream, PinnedHostSlice};

/// bf16 bits in pinned, device-mapped host memory.
#[derive(Debug)]
pub struct HostTable {
    values: PinnedHostSlice<u16>,
    /// The host address of the values, read once: cudarc's accessors wait for the buffer's last
    /// copy, which is not allowed while a stream is being captured.
    host_addr: usize,
    /// The address kernels read the values at.
    device_ptr: u64,
}

impl HostTable {
    /// A table holding `bits`.
    pub fn new(gpu: &Gpu, bits: &[u16]) -> Result<Self> {
        let bytes = std::mem::size_of_val(bits);
        // SAFETY: every value is written below before anything reads the table.
        let mut values = unsafe {
            gpu.ctx.alloc_pinned_with_flags::<u16>(
                bits.len(),
                sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE,
            )
        }
        .map_err(|e| Error::OutOfMemory {
            requested: bytes,
            what: "pinned host memory for a frozen matrix".into(),
            detail: e.to_string(),
        })?;
        let host = values
            .as_mut_slice()
            .map_err(driver_error("writing a frozen matrix to host memory"))?;
        host.copy_from_slice(bits);
        let host_addr = host.as_ptr() as usize;
        let mut device_ptr = 0;
        // SAFETY: `host` is a live allocation made with CU_MEMHOSTALLOC_DEVICEMAP in this
        // context; the call only writes `device_ptr`.
        unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, host.as_mut_ptr().cast(), 0)
                .result()
                .map_err(driver_error(
                    "mapping a frozen matrix into the GPU's address space",
                ))?;
        }
        Ok(HostTable {
            values,
            host_addr,
            device_ptr,
        })
    }

    /// Queues a copy of the values `range` (an index range of the table) to device address
    /// `dst` on `stream` (a plain driver copy, which a recording may hold).
    ///
    /// # Safety
    /// `range` must lie within the table; `dst` must be a device allocation of at least the
    /// range's bytes that lives until the copy has finished, and the table must outlive the copy
    /// (and every replay of a recording that holds it).
    pub unsafe fn copy_to_device(
        &self,
        dst: u64,
        range: std::ops::Range<usize>,
        stream: &CudaStream,
    ) -> sys::CUresult {
        let value = std::mem::size_of::<u16>();
        sys::cuMemcpyHtoDAsync_v2(
            dst,
            (self.host_addr + value * range.start) as *const _,
            value * range.len(),
            stream.cu_stream(),
        )
    }

    /// The address kernels read the values at.
    pub fn device_ptr(&self) -> u64 {
        self.device_ptr
    }

    /// The number of values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// The bf16 bits.
    pub fn bits(&self) -> Result<&[u16]> {
        self.values
            .as_slice()
            .map_err(driver_error("reading a frozen matrix in host memory"))
    }
}
